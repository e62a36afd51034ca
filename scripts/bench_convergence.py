"""Convergence benchmark: dense, fp16, Top-K 1% and 0.1% (defaults, and each technique off).

Runs examples/train.py on 2 ranks (horovodrun --gloo) with one seed and equal epochs per
configuration, prints a Markdown table of final test accuracy and bytes sent per step, and
writes the table (``--out``, .md) and a PNG of test accuracy per epoch.

    python scripts/bench_convergence.py                       # digits, the offline default
    python scripts/bench_convergence.py --dataset mnist --epochs 3 --seeds 1
    python scripts/bench_convergence.py --seeds 42 43 44      # mean over seeds
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (label, flags). "defaults" means the library's defaults for everything but the ratio.
CONFIGS = [
    ("dense (SGD momentum)", ["--topk", "0"]),
    ("Horovod fp16", ["--fp16"]),
    ("Top-K 1%, defaults", ["--topk", "0.01"]),
    ("Top-K 0.1%, defaults", ["--topk", "0.001"]),
    ("Top-K 0.1%, no momentum correction", ["--topk", "0.001", "--momentum-correction", "off"]),
    ("Top-K 0.1%, no momentum masking", ["--topk", "0.001", "--no-momentum-masking"]),
    ("Top-K 0.1%, no warm-up", ["--topk", "0.001", "--warmup-steps", "0"]),
    ("Top-K 0.1%, small tensors sparse too", ["--topk", "0.001", "--min-numel", "0",
                                             "--no-density-aware"]),
    ("Top-K 0.1%, fp16 values", ["--topk", "0.001", "--value-dtype", "fp16"]),
    ("Top-K 0.1%, local clipping 1.0", ["--topk", "0.001", "--local-clip-norm", "1.0"]),
    ("dense, AdamW", ["--topk", "0", "--optimizer", "adamw", "--lr", "0.002"]),
    ("Top-K 1%, AdamW", ["--topk", "0.01", "--optimizer", "adamw", "--lr", "0.002"]),
    ("Top-K 0.1%, AdamW", ["--topk", "0.001", "--optimizer", "adamw", "--lr", "0.002"]),
]

EPOCH_RE = re.compile(r"epoch\s+(\d+).*test acc ([\d.]+)%.*sent/step ([\d.]+) KB \(([\d.]+)% of dense\)")


def run(flags, args, seed):
    cmd = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(args.np), "-H",
           f"localhost:{args.np}", "--gloo", sys.executable, str(REPO / "examples" / "train.py"),
           "--dataset", args.dataset, "--model", args.model, "--epochs", str(args.epochs),
           "--seed", str(seed), "--no-progress", *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    epochs = [(int(m[0]), float(m[1]), float(m[2]), float(m[3])) for m in EPOCH_RE.findall(out.stdout)]
    return epochs


def main(args):
    rows, curves = [], {}
    for label, flags in CONFIGS:
        if args.only and not any(o in label for o in args.only):
            continue
        accs, curve = [], None
        for seed in args.seeds:
            epochs = run(flags, args, seed)
            accs.append(epochs[-1][1])
            curve = curve or [e[1] for e in epochs]
            kb, share = epochs[-1][2], epochs[-1][3]
        mean = sum(accs) / len(accs)
        rows.append((label, " ".join(flags), mean, accs, kb, share))
        curves[label] = curve
        print(f"{label}: {mean:.2f}% {accs}", file=sys.stderr, flush=True)

    dense = rows[0][2]
    seeds = ", ".join(map(str, args.seeds))
    lines = [f"{args.dataset}, {args.model}, {args.np} ranks, {args.epochs} epochs, seed(s) {seeds}",
             "", "| configuration | flags | test acc. (mean) | per seed | Δ vs dense | sent/step |",
             "|---|---|---|---|---|---|"]
    for label, flags, mean, accs, kb, share in rows:
        per = " / ".join(f"{a:.2f}" for a in accs)
        sent = "100%" if not flags.startswith("--topk 0.") else f"{kb:.1f} KB ({share:.2f}%)"
        if flags.startswith("--fp16"):
            sent = "50%"
        lines.append(f"| {label} | `{flags}` | {mean:.2f}% | {per} | {mean - dense:+.2f} | {sent} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            fig, ax = plt.subplots(figsize=(8, 5))
            for label, curve in curves.items():
                ax.plot(range(1, len(curve) + 1), curve, label=label, marker=".")
            ax.set_xlabel("epoch")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{args.dataset}: test accuracy per epoch (seed {args.seeds[0]})")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(Path(args.out).with_suffix(".png"), dpi=110)
        except ImportError:
            print("matplotlib missing: no PNG", file=sys.stderr)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits", help="digits, mnist, fashion_mnist, cifar10")
    p.add_argument("--model", default="simple_cnn", help="simple_cnn, resnet18, mlp")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="one run per seed")
    p.add_argument("--np", type=int, default=2, help="ranks")
    p.add_argument("--only", nargs="*", default=[], help="run configurations whose label contains these")
    p.add_argument("--out", default="docs/convergence_digits.md", help="Markdown table (+ .png beside it)")
    main(p.parse_args())

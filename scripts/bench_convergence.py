"""Convergence benchmark: dense, fp16, Top-K 1% and 0.1% (defaults, and each technique off).

``--task digits`` (the default) runs examples/train.py on 2 ranks (horovodrun --gloo; the
``DDP`` rows ``--engine ddp`` under torchrun, Gloo) with one seed and equal epochs per
configuration, prints a Markdown table of final test accuracy and bytes sent per step, and
writes the table (``--out``, .md) and a PNG of test accuracy per epoch. The DDP rows (dense
DDP, PyTorch's PowerSGD hook, the hvd_topk.ddp Top-K hook) count no bytes.

    python scripts/bench_convergence.py                       # digits, the offline default
    python scripts/bench_convergence.py --only DDP --out /tmp/ddp.md   # the DDP rows alone
    python scripts/bench_convergence.py --dataset mnist --epochs 3 --seeds 1
    python scripts/bench_convergence.py --seeds 42 43 44      # mean over seeds

``--task lm`` runs examples/train_lm.py (a character-level Transformer LM on CPython's pydoc
text, offline): dense AdamW and SGD against Top-K 1% and 0.1%, once per step budget
(``--steps``, each run with its own cosine schedule) and seed. The table gives the final
validation loss (nats/char) per budget, its change against the dense run of the same optimizer
(AdamW rows against dense AdamW, SGD rows against dense SGD) and the bytes one rank sent over
the whole largest-budget run, Top-K warm-up included; the PNG beside it the validation loss
per step of the largest budget and the first seed.

    python scripts/bench_convergence.py --task lm             # --steps 400 800 --seeds 0 1
    python scripts/bench_convergence.py --task lm --steps 800 --seeds 0 --only AdamW
"""

from __future__ import annotations

import argparse
import json
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
    ("Top-K 1%, allgather", ["--topk", "0.01", "--exchange", "allgather"]),
    ("Top-K 1%, sparse allreduce", ["--topk", "0.01", "--exchange", "sparse_allreduce"]),
    ("Top-K 0.1%, allgather", ["--topk", "0.001", "--exchange", "allgather"]),
    ("Top-K 0.1%, sparse allreduce", ["--topk", "0.001", "--exchange", "sparse_allreduce"]),
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
    # the same training under torchrun + DistributedDataParallel (examples/train.py --engine ddp)
    ("DDP dense (SGD momentum)", ["--engine", "ddp", "--topk", "0"]),
    ("DDP PowerSGD hook, rank 4", ["--engine", "ddp", "--powersgd", "4"]),
    ("DDP Top-K 1% hook, defaults", ["--engine", "ddp", "--topk", "0.01"]),
]

# examples/train_lm.py; the optimizer is AdamW unless the flags say --optimizer sgd.
LM_CONFIGS = [
    ("dense AdamW", ["--topk", "0"]),
    ("dense SGD momentum", ["--topk", "0", "--optimizer", "sgd"]),
    ("Top-K 1% AdamW, defaults", ["--topk", "0.01"]),
    ("Top-K 0.1% AdamW, defaults", ["--topk", "0.001"]),
    ("Top-K 1% AdamW, no Adam correction", ["--topk", "0.01", "--adam-correction", "off"]),
    ("Top-K 1% SGD, defaults", ["--topk", "0.01", "--optimizer", "sgd"]),
    ("Top-K 0.1% SGD, defaults", ["--topk", "0.001", "--optimizer", "sgd"]),
    # Adam correction with nothing compressed: each rank's own moments, the variance frozen
    # after 100 steps, every entry sent -- what Top-K 1% / 0.1% AdamW lose to compression alone
    ("Adam correction, ratio 1 (nothing dropped)", ["--topk", "1", "--adam-correction", "on",
                                                    "--no-density-aware"]),
    # ablations of Adam correction (left out unless asked: --only ablation)
    ("ablation, AdamW 1%: variance never frozen", ["--topk", "0.01", "--adam-variance-steps", "0"]),
    ("ablation, AdamW 0.1%: no Adam correction", ["--topk", "0.001", "--adam-correction", "off"]),
]

# The DDP engine prints no sent/step: its two groups are then empty.
EPOCH_RE = re.compile(r"epoch\s+(\d+).*test acc ([\d.]+)%(?:.*sent/step ([\d.]+) KB \(([\d.]+)% of dense\))?")
LM_STEP_RE = re.compile(r"step (\d+) train_loss \S+ val_loss (\S+) .*\(([\d.]+)% of dense\) "
                        r"total_sent ([\d.]+) MB")
LM_FINAL_RE = re.compile(r"final val_loss (\S+)")


def horovodrun(script, argv, args, timeout=3600):
    """stdout of ``script`` (in examples/) run on ``args.np`` local ranks with Gloo."""
    cmd = [str(Path(sys.executable).parent / "horovodrun"), "-np", str(args.np), "-H",
           f"localhost:{args.np}", "--gloo", sys.executable, str(REPO / "examples" / script), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def torchrun(script, argv, args, timeout=3600):
    """stdout of ``script`` (in examples/) run on ``args.np`` local ranks by torchrun."""
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(args.np),
           str(REPO / "examples" / script), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out.stdout


def run(flags, args, seed):
    """(epoch, test acc., KB sent per step, % of dense) per epoch; the last two None for DDP."""
    launch = torchrun if "ddp" in flags else horovodrun
    stdout = launch("train.py", ["--dataset", args.dataset, "--model", args.model, "--epochs",
                                 str(args.epochs), "--seed", str(seed), "--no-progress", *flags], args)
    return [(int(m[0]), float(m[1]), float(m[2]) if m[2] else None, float(m[3]) if m[3] else None)
            for m in EPOCH_RE.findall(stdout)]


def lm_flags(flags, args):
    """A configuration's flags, with ``--adam-lr`` given to the Adam/AdamW ones."""
    if args.adam_lr is not None and lm_family(flags) != "sgd":
        return [*flags, "--lr", str(args.adam_lr)]
    return list(flags)


def run_lm(flags, args, seed, steps):
    """(step, val loss, % of dense, MB sent) per evaluation, and the final validation loss.
    With ``--cache DIR`` a run already made with the same flags, seed and steps is read back."""
    argv = ["--steps", str(steps), "--seed", str(seed), "--eval-every", str(args.eval_every), *flags]
    cached = Path(args.cache) / (re.sub(r"[^\w.-]+", "_", " ".join(argv)) + ".json") if args.cache else None
    if cached is not None and cached.exists():
        evals, final = json.loads(cached.read_text())
        return [tuple(e) for e in evals], final
    stdout = horovodrun("train_lm.py", argv, args, timeout=args.timeout)
    evals = [(int(m[0]), float(m[1]), float(m[2]), float(m[3])) for m in LM_STEP_RE.findall(stdout)]
    final = LM_FINAL_RE.search(stdout)
    if not evals or final is None:
        raise RuntimeError(f"train_lm.py {' '.join(flags)}: no step/final lines in\n{stdout[-3000:]}")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_text(json.dumps([evals, float(final[1])]))
    return evals, float(final[1])


def save_plot(curves, path, xlabel, ylabel, title, styles=None):
    """A PNG of ``{label: (xs, ys)}``; a note on stderr instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, (styles or {}).get(label, "-"), label=label, marker=".")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lm_family(flags):
    """The optimizer a train_lm.py flag list trains with (its default is adamw)."""
    return flags[flags.index("--optimizer") + 1] if "--optimizer" in flags else "adamw"


def main_lm(args):
    budgets = sorted(set(args.steps))
    rows, curves, styles = [], {}, {}
    for label, flags in LM_CONFIGS:
        if (args.only and not any(o in label for o in args.only)) or (
                not args.only and label.startswith("ablation")):
            continue
        flags = lm_flags(flags, args)
        finals = {b: [] for b in budgets}
        for steps in budgets:
            for seed in args.seeds:
                evals, final = run_lm(flags, args, seed, steps)
                finals[steps].append(final)
                if steps == budgets[-1] and seed == args.seeds[0]:
                    curves[label] = ([e[0] for e in evals], [e[1] for e in evals])
                    share, mb = evals[-1][2], evals[-1][3]
                print(f"{label}, {steps} steps, seed {seed}: val loss {final:.4f}", file=sys.stderr,
                      flush=True)
        means = {b: sum(v) / len(v) for b, v in finals.items()}
        rows.append((label, flags, means, finals, mb, share))
        styles[label] = "--" if lm_family(flags) == "sgd" else "-"

    dense = {lm_family(flags): means for _, flags, means, _, _, _ in rows if flags[:2] == ["--topk", "0"]}
    seeds = ", ".join(map(str, args.seeds))
    lines = [f"char LM (pydoc topics, examples/train_lm.py defaults), {args.np} ranks, "
             f"steps {' / '.join(map(str, budgets))}, seed(s) {seeds}, Adam/AdamW lr "
             f"{args.adam_lr if args.adam_lr is not None else 'default (3e-3)'}. "
             "Validation loss in nats/char: "
             "mean (per seed); Δ against the dense run of the same optimizer; bytes one rank sent over "
             f"the {budgets[-1]}-step run, Top-K warm-up included.", "",
             "| configuration | flags | " + " | ".join(f"val loss, {b} steps" for b in budgets) + " | "
             + " | ".join(f"Δ vs dense, {b}" for b in budgets) + f" | sent per rank, {budgets[-1]} steps |",
             "|---" * (3 + 2 * len(budgets)) + "|"]
    for label, flags, means, finals, mb, share in rows:
        losses = [f"{means[b]:.4f} ({' / '.join(f'{v:.4f}' for v in finals[b])})" for b in budgets]
        ref = dense.get(lm_family(flags))
        deltas = [f"{100 * (means[b] - ref[b]) / ref[b]:+.2f}%" if ref else "n/a" for b in budgets]
        lines.append(f"| {label} | `{' '.join(flags)}` | {' | '.join(losses)} | {' | '.join(deltas)} | "
                     f"{mb:.1f} MB ({share:.2f}%) |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        save_plot(curves, Path(args.out).with_suffix(".png"), "step", "validation loss (nats/char)",
                  f"char LM: validation loss ({budgets[-1]} steps, seed {args.seeds[0]})", styles)


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
        if flags.startswith("--engine ddp"):
            sent = "100%" if flags.endswith("--topk 0") else "not counted"
        lines.append(f"| {label} | `{flags}` | {mean:.2f}% | {per} | {mean - dense:+.2f} | {sent} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        save_plot({label: (range(1, len(c) + 1), c) for label, c in curves.items()},
                  Path(args.out).with_suffix(".png"), "epoch", "test accuracy (%)",
                  f"{args.dataset}: test accuracy per epoch (seed {args.seeds[0]})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="digits", choices=["digits", "lm"],
                   help="digits: examples/train.py; lm: examples/train_lm.py")
    p.add_argument("--dataset", default="digits", help="digits, mnist, fashion_mnist, cifar10 (digits task)")
    p.add_argument("--model", default="simple_cnn", help="simple_cnn, resnet18, mlp (digits task)")
    p.add_argument("--epochs", type=int, default=10, help="epochs per run (digits task)")
    p.add_argument("--steps", type=int, nargs="+", default=[400, 800],
                   help="step budgets, one run each (lm task)")
    p.add_argument("--eval-every", type=int, default=50, help="validation interval in steps (lm task)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run (lm task)")
    p.add_argument("--adam-lr", type=float, default=None,
                   help="--lr of the Adam/AdamW configurations (lm task; default: train_lm.py's)")
    p.add_argument("--cache", default="", metavar="DIR",
                   help="keep each run's result here and reuse it when run again (lm task)")
    p.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="one run per seed (default: 42 for digits, 0 1 for lm)")
    p.add_argument("--np", type=int, default=2, help="ranks")
    p.add_argument("--only", nargs="*", default=[], help="run configurations whose label contains these")
    p.add_argument("--out", default=None,
                   help="Markdown table (+ .png beside it); default docs/convergence_digits.md or "
                        "docs/convergence_lm.md")
    args = p.parse_args()
    if args.seeds is None:
        args.seeds = [42] if args.task == "digits" else [0, 1]
    if args.out is None:
        args.out = f"docs/convergence_{args.task}.md"
    (main_lm if args.task == "lm" else main)(args)

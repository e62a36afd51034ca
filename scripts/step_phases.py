"""Where one training step's time goes, per phase, for one method (a diagnostic for
bench_network.py's step times).

Launch it like a training script, e.g. inside the emulated cluster (as root)::

    scripts/netem.sh run 2 1gbit -- -np 2 -x OMP_NUM_THREADS=1 -x GLOO_SOCKET_IFNAME=hvd0 \
        python scripts/step_phases.py --model mlp --method topk1

Prints, on rank 0, the median over the timed steps (ms) of: the whole step, forward,
backward (which includes ``compress``: Horovod's hooks run in it), ``synchronize()`` (waiting
for the exchange, which includes ``decompress``) and ``step()``; then ``compress`` and
``decompress`` on their own (Top-K methods).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_network import MODELS, build_model, horovod_optimizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mlp", choices=sorted(MODELS))
    p.add_argument("--method", default="topk1", help="none, dense, fp16, topk<percent>")
    p.add_argument("--batch-size", type=int, default=None, help="per rank (default: the model's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    import horovod.torch as hvd

    torch.set_num_threads(1)
    hvd.init()
    torch.manual_seed(0)
    model = build_model(args.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    decompress_s = [0.0]
    if args.method != "none":
        opt = horovod_optimizer(args.method, model, opt)
    if args.method.startswith("topk"):
        comp = opt._compression
        plain = comp.decompress

        def timed(payload, ctx):
            t0 = time.perf_counter()
            out = plain(payload, ctx)
            decompress_s[0] += time.perf_counter() - t0
            return out

        comp.decompress = timed
    batch = args.batch_size or MODELS[args.model][1]
    x = torch.randn(batch, 3, 32, 32)  # (B, C, H, W)
    y = torch.randint(0, 10, (batch,))
    names = ["step", "forward", "backward", "synchronize", "optimizer step", "compress", "decompress"]
    rows = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if args.method != "none":
            opt.synchronize()
        t3 = time.perf_counter()
        if args.method != "none":
            with opt.skip_synchronize():
                opt.step()
        else:
            opt.step()
        t4 = time.perf_counter()
        stats = getattr(opt, "comm_stats", None)
        compress_s = stats.compress_ms / 1e3 if stats is not None else 0.0
        if i >= args.warmup:
            rows.append((t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3, compress_s, decompress_s[0]))
        decompress_s[0] = 0.0
    medians = {n: 1e3 * statistics.median(col) for n, col in zip(names, zip(*rows))}
    if hvd.rank() == 0:
        print(f"{args.model} {args.method}: " + ", ".join(f"{n} {ms:.1f} ms" for n, ms in medians.items()),
              flush=True)
    return medians


if __name__ == "__main__":
    main(parse_args())

"""Where one training step's time goes, per phase, for one method (a diagnostic for
bench_network.py's step times).

Launch it like a training script, e.g. inside the emulated cluster (as root)::

    scripts/netem.sh run 2 1gbit -- -np 2 -x OMP_NUM_THREADS=1 -x GLOO_SOCKET_IFNAME=hvd0 \
        python scripts/step_phases.py --model mlp --method topk1

Prints, on rank 0, the median over the timed steps (ms) of: the whole step, forward,
backward (which includes ``compress``: Horovod's hooks run in it), ``synchronize()`` (waiting
for the exchange, which includes ``decompress``) and ``step()``; then, for Top-K methods,
``compress`` on its own and ``synchronize()``'s parts (``CommStats``): ``agree`` (the ranks'
model and trained-set agreement), ``collectives`` (blocked in Horovod's waits), ``scatter``
(decompressing) and ``check`` (every flag resolved: the one host sync); then the process's
system time and minor page faults per step (all threads), and the page faults of forward
alone (memory the allocator gave back and asks for again). With ``--trace
PATH``, Horovod's timeline of the timed steps is written there and summarised per activity
(ms per step, summed over tensors, which overlap): ``NEGOTIATE_*`` is the time from the first
rank's request to the last one's (ranks waiting for each other, plus the background thread's
cycle), the collective's name its own work (fusion copies, the transfer).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
    p.add_argument("--trace", default=None, help="write Horovod's timeline of the timed steps here")
    return p.parse_args(argv)


def timeline_summary(path: str, steps: int) -> dict:
    """ms per step of each activity of a Horovod timeline (chrome trace), summed over tensors."""
    text = Path(path).read_text().rstrip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")
    open_at, total = {}, {}
    for e in events:
        if e.get("ph") == "B":
            open_at.setdefault(e["pid"], []).append((e["name"], e["ts"]))
        elif e.get("ph") == "E" and open_at.get(e["pid"]):
            name, ts = open_at[e["pid"]].pop()
            total[name] = total.get(name, 0.0) + (e["ts"] - ts) / 1e3
    return {name: ms / steps for name, ms in sorted(total.items(), key=lambda kv: -kv[1])}


def main(args: argparse.Namespace) -> dict:
    import horovod.torch as hvd

    torch.set_num_threads(1)
    if args.trace:
        os.environ["HOROVOD_TIMELINE"] = "DYNAMIC"  # started and stopped around the timed steps
    hvd.init()
    torch.manual_seed(0)
    model = build_model(args.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if args.method != "none":
        opt = horovod_optimizer(args.method, model, opt)
    batch = args.batch_size or MODELS[args.model][1]
    x = torch.randn(batch, 3, 32, 32)  # (B, C, H, W)
    y = torch.randint(0, 10, (batch,))
    names = ["step", "forward", "backward", "synchronize", "optimizer step", "compress", "agree",
             "collectives", "scatter", "check", "system time", "page faults", "of which in forward"]
    rows = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and args.trace and args.method != "none":
            hvd.start_timeline(args.trace)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
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
        r4 = resource.getrusage(resource.RUSAGE_SELF)
        # The process's system time (s) and minor page faults, all threads (page faults are
        # counted as if seconds, /1e3: the table prints every column times 1e3).
        kernel = (r4.ru_stime - r0.ru_stime, (r4.ru_minflt - r0.ru_minflt) / 1e3,
                  (r1.ru_minflt - r0.ru_minflt) / 1e3)
        stats = getattr(opt, "comm_stats", None)  # hvd_topk's optimizer only
        parts = ([getattr(stats, f) / 1e3 for f in ("compress_ms", "agree_ms", "collective_ms", "scatter_ms",
                                                     "check_ms")] if stats is not None else [0.0] * 5)
        if i >= args.warmup:
            rows.append((t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3, *parts, *kernel))
    medians = {n: 1e3 * statistics.median(col) for n, col in zip(names, zip(*rows))}
    if args.trace and args.method != "none":
        hvd.stop_timeline()
    if hvd.rank() == 0:
        counts = ("page faults", "of which in forward")
        print(f"{args.model} {args.method}: " + ", ".join(f"{n} {v:.0f}" if n in counts else f"{n} {v:.1f} ms"
                                                          for n, v in medians.items()), flush=True)
        if args.trace and args.method != "none":
            summary = timeline_summary(args.trace, args.steps)
            print(f"{args.model} {args.method} timeline (ms/step): "
                  + ", ".join(f"{n} {ms:.1f}" for n, ms in summary.items()), flush=True)
    return medians


if __name__ == "__main__":
    main(parse_args())

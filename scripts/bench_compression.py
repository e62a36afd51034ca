"""Speed of Top-K selection and of the whole compress, in multiples of one copy of the tensor.

For each size x ratio it times, on the same tensor:

- ``copy``: ``y.copy_(x)`` into a preallocated buffer, the memory-speed yardstick;
- ``clone``: ``x.clone()`` (a fresh allocation: on CPU its page faults often cost more than the copy);
- ``torch.topk``: ``torch.topk(x.abs(), k, sorted=False)``, the obvious baseline;
- ``select_topk``: ``hvd_topk.select_topk`` (exact, sampled threshold + candidates);
- ``select_group``: the pipeline's threshold, candidates and exact top-k steps
  (``hvd_topk.selection.select_group``: no host sync; on CPU this is the torch path, which the
  C++ kernel replaces inside ``compress`` for float32);
- ``naive``: what a plain implementation does per tensor: ``residual += g``, ``torch.topk``,
  gather the values, zero them in the residual;
- ``compress``: ``TopKCompressor.compress`` -- compensate ``g + e`` in place, select, pack,
  update the residual (the residual is warm: this is a steady-state step);
- ``pack+unpack``: ``hvd_topk.pack`` of (values, int32 indices), then ``unpack`` of two ranks' payloads;
- ``decompress``: ``TopKCompressor.scatter`` of two ranks' payloads into a preallocated
  gradient (zero, scatter-add, divide by 2) and ``check`` of their headers, as the optimizer
  does after the allgather.

Each timing is the median of ``--repeats`` runs, the methods interleaved round by round so that
a noisy neighbour slows all of them alike. Run::

    python scripts/bench_compression.py                       # CPU, 1M / 4M / 25M, ratios 0.01 / 0.001
    python scripts/bench_compression.py --device cuda --out bench_compression.md
    OMP_NUM_THREADS=1 python scripts/bench_compression.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

import hvd_topk
from hvd_topk.selection import GroupLayout, select_group

METHODS = ["copy", "clone", "torch.topk", "select_topk", "select_group", "naive", "compress",
           "pack+unpack", "decompress"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--sizes", default="1M,4M,25M", help="comma-separated, K/M suffixes allowed")
    p.add_argument("--ratios", default="0.01,0.001")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    return p.parse_args(argv)


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 10**3, "M": 10**6}.get(text[-1:], 1)
    return int(float(text.rstrip("KM")) * scale)


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def bench_one(n: int, ratio: float, device: str, repeats: int, seed: int) -> Dict[str, float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen).to(device)
    grads = [torch.randn(n, generator=gen).to(device) for _ in range(2)]
    y = torch.empty_like(x)
    k = hvd_topk.num_selected(n, ratio)
    comp = hvd_topk.TopKCompressor(ratio, min_numel=0, warmup_steps=0)  # steady state
    step = [0]

    def compress():
        step[0] += 1
        return comp.compress(grads[step[0] % 2], name="w")

    residual = grads[1].clone()  # the naive loop's own warm buffer
    layout = GroupLayout((n,), (k,))

    def naive():
        step[0] += 1
        c = residual.add_(grads[step[0] % 2])
        idx = torch.topk(c.abs(), k, sorted=False).indices  # (k,)
        sent = c.index_select(0, idx)
        c.index_fill_(0, idx, 0)
        return sent, idx

    payload, ctx = comp.compress(grads[0], name="w")
    gathered = torch.cat([payload, payload])  # (2 * nbytes,) what a 2-rank allgather returns
    ctx.divisor, ctx.world = 2, 2
    out = torch.empty_like(x)  # the gradient's own storage, as the optimizer passes it
    vals, idx = x[:k].clone(), torch.arange(k, dtype=torch.int32, device=device)

    def pack_unpack():
        hvd_topk.unpack(torch.cat([hvd_topk.pack(vals, idx)] * 2), k, vals.dtype, idx.dtype)

    fns = {
        "copy": lambda: y.copy_(x),
        "clone": lambda: x.clone(),
        "torch.topk": lambda: torch.topk(x.abs(), k, sorted=False),
        "select_topk": lambda: hvd_topk.select_topk(x, k),
        "select_group": lambda: select_group(x, layout),
        "naive": naive,
        "compress": compress,
        "pack+unpack": pack_unpack,
        "decompress": lambda: (comp.scatter(gathered, ctx, out), comp.check([ctx])),
    }
    times: Dict[str, List[float]] = {m: [] for m in METHODS}
    for m in METHODS:  # warm-up (allocator, first residual)
        timed(fns[m], sync)
    for _ in range(repeats):
        for m in METHODS:
            times[m].append(timed(fns[m], sync))
    return {m: statistics.median(v) for m, v in times.items()}


def table(rows: List[dict], device: str, threads: int) -> str:
    head = (f"Device `{device}`, {threads} thread(s); median ms (multiple of one `copy_`). "
            "`compress` = compensate + select + pack + residual update.\n\n")
    lines = ["| size | ratio | k | " + " | ".join(METHODS) + " |",
             "|---:|---:|---:|" + "---:|" * len(METHODS)]
    for r in rows:
        copy = r["copy"]
        cells = [f"{r[m]:.2f} ({r[m] / copy:.1f}x)" for m in METHODS]
        lines.append(f"| {r['n'] / 1e6:g}M | {r['ratio']:g} | {r['k']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> str:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    rows = []
    for size in args.sizes.split(","):
        n = parse_size(size)
        for ratio in (float(r) for r in args.ratios.split(",")):
            res = bench_one(n, ratio, args.device, args.repeats, args.seed)
            rows.append({"n": n, "ratio": ratio, "k": hvd_topk.num_selected(n, ratio), **res})
    out = table(rows, args.device, torch.get_num_threads())
    print(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(out)
    return out


if __name__ == "__main__":
    main(parse_args())

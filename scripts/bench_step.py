"""Training-step time with Top-K against Horovod's dense and fp16 steps, on one rank.

One rank runs the whole exchange when Horovod registers its hooks, which it does with
``HOROVOD_ELASTIC=1`` (a GPU takes one NCCL rank, so one GPU means one rank)::

    HOROVOD_ELASTIC=1 mpirun --allow-run-as-root -np 1 python scripts/bench_step.py
    HOROVOD_ELASTIC=1 mpirun -np 1 python scripts/bench_step.py --models resnet18 --steps 30 --out step.md
    HOROVOD_ELASTIC=1 mpirun -np 1 python scripts/bench_step.py --device cpu --models mlp --batch 32

It prints, per model (synthetic data, SGD with momentum 0.9, fp32):

- ``fwd+bwd``: forward and backward alone (no hooks, no exchange): the floor;
- one row per method: ``dense`` (``hvd.DistributedOptimizer``), ``fp16``
  (``hvd.Compression.fp16``), ``topk<ratio>`` (``hvd_topk.DistributedOptimizer`` with
  ``TopKCompressor(ratio, warmup_steps=0)``; ``topk<ratio>+clip`` with ``clip_grad_norm=1.0``,
  which compresses and sends after backward instead of during it): median ms per step over
  ``--steps`` timed steps
  (after ``--warmup``), and the ratio to ``dense``;
- ``compress+scatter`` of every gradient of the model (``--loop``): hvd_topk's grouped
  pipeline as the optimizer runs it, the same one tensor at a time (``group_bytes=0``), and the
  naive loop (``torch.topk`` + residual update + ``index_add_`` per tensor);
- host syncs (CUDA): ``torch.cuda.set_sync_debug_mode("warn")`` over one Top-K step; each
  warning is one synchronisation, listed with where it happened.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable, Dict, List

import horovod.torch as hvd
import torch
import torch.nn as nn

import hvd_topk


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--models", default="resnet50,resnet18", help="torchvision names, or mlp")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first")
    p.add_argument("--methods", default="dense,fp16,topk0.01,topk0.001")
    p.add_argument("--loop", type=int, default=20,
                   help="repeats of the compress-every-gradient timing (0: skip)")
    p.add_argument("--out", default=None, help="also write the Markdown tables to this file")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's table of one grouped compress + scatter of every "
                        "gradient (Top-K 1%%), by device time (CUDA) or CPU time")
    p.add_argument("--interleave", action="store_true",
                   help="time one step of each method in turn (a model and optimizer each, built "
                        "first), so that a busy patch of a shared machine slows every method alike")
    return p.parse_args(argv)


def make_model(name: str) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                             nn.ReLU(), nn.Linear(1024, 10))
    import torchvision
    return getattr(torchvision.models, name)(num_classes=1000)


def batch_for(name: str, batch: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    side, classes = (32, 10) if name == "mlp" else (224, 1000)
    x = torch.randn(batch, 3, side, side, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return x, y


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> List[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def timed_interleaved(steps: Dict[str, Callable[[], None]], device: torch.device, warmup: int,
                      n: int) -> Dict[str, List[float]]:
    """``timed_steps`` of every step function at once: ``n`` rounds of one step of each."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {k: [] for k in steps}
    for _ in range(n):
        for k, step in steps.items():
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def make_optimizer(method: str, model: nn.Module):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    named = list(model.named_parameters())
    if method == "dense":
        return hvd.DistributedOptimizer(opt, named_parameters=named)
    if method == "fp16":
        return hvd.DistributedOptimizer(opt, named_parameters=named, compression=hvd.Compression.fp16)
    if method.startswith("topk"):  # topk<ratio>, or topk<ratio>+clip: clip_grad_norm=1.0
        ratio, clip = method[4:].removesuffix("+clip"), method.endswith("+clip")
        comp = hvd_topk.TopKCompressor(float(ratio), warmup_steps=0)
        return hvd_topk.DistributedOptimizer(opt, named_parameters=named, compression=comp, log_every=0,
                                             clip_grad_norm=1.0 if clip else None)
    raise ValueError(f"unknown method {method!r}")


def bench_model(name: str, args, device: torch.device) -> Dict[str, List[float]]:
    x, y = batch_for(name, args.batch, device)
    loss_fn = nn.CrossEntropyLoss()
    results = {}

    torch.manual_seed(0)
    model = make_model(name).to(device)

    def fwd_bwd(model=model):
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    if args.interleave:
        steps = {"fwd+bwd": fwd_bwd}
        for method in args.methods.split(","):
            torch.manual_seed(0)
            m = make_model(name).to(device)
            steps[method] = lambda m=m, opt=make_optimizer(method, m): _train_step(m, opt, loss_fn, x, y)
        return timed_interleaved(steps, device, args.warmup, args.steps)
    results["fwd+bwd"] = timed_steps(fwd_bwd, device, args.warmup, args.steps)
    for method in args.methods.split(","):
        torch.manual_seed(0)
        model = make_model(name).to(device)
        opt = make_optimizer(method, model)

        def step(model=model, opt=opt):
            _train_step(model, opt, loss_fn, x, y)

        results[method] = timed_steps(step, device, args.warmup, args.steps)
        if method.startswith("topk") and device.type == "cuda":
            results[f"{method} syncs"] = count_syncs(step)
    return results


def _train_step(model, opt, loss_fn, x, y) -> None:
    opt.zero_grad()  # Horovod's takes no argument; torch's default sets None
    loss_fn(model(x), y).backward()
    opt.step()


def count_syncs(step: Callable[[], None]) -> List[str]:
    """Where one step synchronises the host with the GPU (one entry per sync)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = []
    for w in caught:
        if "synchroniz" in str(w.message):
            where.append(f"{w.filename.split('/')[-1]}:{w.lineno}")
    return where


def bench_compress_loop(name: str, args, device: torch.device) -> Dict[str, float]:
    """ms to compress + scatter every gradient (>= min_numel) of one backward pass."""
    torch.manual_seed(0)
    model = make_model(name).to(device)
    x, y = batch_for(name, args.batch, device)
    nn.CrossEntropyLoss()(model(x), y).backward()
    params = [(n, p.grad) for n, p in reversed(list(model.named_parameters())) if p.grad.numel() >= 4096]
    out = {}
    for ratio in (0.01, 0.001):
        for label, group_bytes in (("grouped", None), ("per tensor", 0)):
            comp = hvd_topk.TopKCompressor(ratio, warmup_steps=0, group_bytes=group_bytes)
            groups, cur, size = [], [], 0
            limit = comp.group_bytes(device)
            for n, g in params:
                if cur and size + g.numel() * 4 > limit:
                    groups.append(cur)
                    cur, size = [], 0
                cur.append((n, g))
                size += g.numel() * 4
            groups.append(cur)

            def run(comp=comp, groups=groups):
                ctxs = []
                for grp in groups:
                    payload, ctx = comp.compress_group([g for _, g in grp], [n for n, _ in grp])
                    ctx.world = 1
                    comp.scatter(payload, ctx)
                    ctxs.append(ctx)
                comp.check(ctxs)
                comp.step_done()

            out[f"hvd_topk {label} {ratio}"] = statistics.median(timed_steps(run, device, 3, args.loop))
            if args.profile and ratio == 0.01 and group_bytes is None:
                print_profile(run, device)
        residuals = {n: torch.zeros_like(g).reshape(-1) for n, g in params}

        def naive(ratio=ratio, residuals=residuals):
            for n, g in params:
                c = residuals[n].add_(g.reshape(-1))
                idx = torch.topk(c.abs(), hvd_topk.num_selected(c.numel(), ratio), sorted=False).indices
                vals = c[idx]
                c[idx] = 0
                torch.zeros_like(c).index_add_(0, idx, vals)

        out[f"naive torch.topk loop {ratio}"] = statistics.median(timed_steps(naive, device, 3, args.loop))
    return out


def print_profile(run: Callable[[], None], device: torch.device) -> None:
    """torch.profiler's table of one call of ``run``, the ops by the time they took."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)


def main(args) -> None:
    hvd.init()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(hvd.local_rank())
        torch.backends.cudnn.benchmark = True
    lines = [f"# bench_step: {args.device}"
             + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
             + f", torch {torch.__version__}, batch {args.batch}, {hvd.size()} rank(s), "
             f"median of {args.steps} steps",
             ""]
    for name in args.models.split(","):
        first = len(lines)
        res = bench_model(name, args, device)
        dense = statistics.median(res["dense"]) if "dense" in res else None
        lines += [f"## {name}", "", "| method | ms/step | x dense | spread (min-max) |",
                  "|---|---:|---:|---:|"]
        for method, times in res.items():
            if method.endswith("syncs"):
                continue
            med = statistics.median(times)
            ratio = f"{med / dense:.2f}x" if dense else "-"
            lines.append(f"| {method} | {med:.2f} | {ratio} | {min(times):.2f}-{max(times):.2f} |")
        for method, where in res.items():
            if method.endswith("syncs"):
                lines.append(f"\nhost syncs in one {method[:-6]} step: {len(where)}"
                             + (f" ({', '.join(where)})" if where else ""))
        if args.loop:
            lines += ["", "| compress + scatter of every gradient | ms |", "|---|---:|"]
            lines += [f"| {k} | {v:.3f} |" for k, v in bench_compress_loop(name, args, device).items()]
        lines.append("")
        if hvd.rank() == 0:
            print("\n".join(lines[first:]), flush=True)
    if hvd.rank() == 0 and args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(parse_args())

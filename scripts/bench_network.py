"""End-to-end step time and bytes on the wire on an emulated cluster (scripts/netem.sh).

Two hosts (network namespaces, one rank each, one CPU thread per rank), links shaped to
1 Gbit/s and 10 Gbit/s, synthetic CIFAR-shaped data. For each model and link it runs:

- ``none``: the same training step with no exchange at all -- the floor;
- ``dense``: ``hvd.DistributedOptimizer`` (allreduce);
- ``fp16``: ``hvd.DistributedOptimizer(compression=hvd.Compression.fp16)``;
- ``topk1`` / ``topk0.1``: ``hvd_topk.DistributedOptimizer`` with ``TopKCompressor(0.01 / 0.001)``
  (``exchange="auto"``); a suffix ``ag`` / ``sar`` forces the allgather / the sparse allreduce
  (``topk1sar``);
- ``powersgd4``: PyTorch DDP (gloo backend) with the PowerSGD comm hook, rank 4;
- ``ddpdense`` / ``ddpfp16``: PyTorch DDP with its default allreduce / its fp16 hook;
- ``ddptopk1`` / ``ddptopk0.1``: PyTorch DDP with the ``hvd_topk.ddp`` Top-K hook (1% / 0.1%,
  momentum correction in the hook, a momentum-free SGD).

Models: ResNet-18, ``mlp`` (5.3M parameters, batch 16: the communication-bound extreme) and
``mlp10m`` (10.1M parameters, batch 384: shaped like the issue's reference workload). Each
host is pinned to its own core (netem.sh).

Step time is the median over the timed steps of rank 0 (after warm-up); with ``--repeats N``
the methods run N times round-robin and the table shows the median of the runs' medians and
every run's. Bytes per step are
what rank 0's link (``/sys/class/net/hvd0/statistics/tx_bytes`` inside its namespace) carried
during the timed steps, TCP/IP headers included, divided by the steps. Needs root. Run::

    python scripts/bench_network.py --repeats 3 --out-dir docs/performance  # ~25 min on 2 cores
    python scripts/bench_network.py --models mlp --rates 1gbit --methods none,dense,topk1

Each rank is launched by ``mpirun`` through netem.sh's rsh agent; the script re-runs itself
with ``--worker`` inside the hosts.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NETEM = REPO / "scripts" / "netem.sh"
METHODS = ["none", "dense", "fp16", "topk1", "topk0.1", "powersgd4"]
LABELS = {"none": "no communication (floor)", "dense": "dense allreduce", "fp16": "Horovod fp16",
          "topk1": "Top-K 1%", "topk0.1": "Top-K 0.1%", "powersgd4": "DDP PowerSGD rank 4",
          "topk1ag": "Top-K 1%, allgather", "topk0.1ag": "Top-K 0.1%, allgather",
          "topk1sar": "Top-K 1%, sparse allreduce", "topk0.1sar": "Top-K 0.1%, sparse allreduce",
          "ddpdense": "DDP allreduce", "ddpfp16": "DDP fp16 hook", "ddptopk1": "DDP Top-K 1% hook",
          "ddptopk0.1": "DDP Top-K 0.1% hook"}
DDP_METHODS = ("powersgd4", "ddpdense", "ddpfp16", "ddptopk1", "ddptopk0.1")
EXCHANGE_SUFFIX = {"ag": "allgather", "sar": "sparse_allreduce"}
IFACE = "hvd0"
MASTER = "10.77.0.1"


def topk_method(method: str):
    """``topk<percent>[ag|sar]`` -> (ratio, exchange), or None for other methods."""
    if not method.startswith("topk"):
        return None
    body, exchange = method[4:], "auto"
    for suffix, name in EXCHANGE_SUFFIX.items():
        if body.endswith(suffix):
            body, exchange = body[:-len(suffix)], name
    return float(body) / 100, exchange


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="resnet18,mlp,mlp10m", help=f"of {sorted(MODELS)}")
    p.add_argument("--rates", default="1gbit,10gbit")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--hosts", type=int, default=2)
    p.add_argument("--delay", default="", help="one-way netem delay per link, e.g. 100us")
    p.add_argument("--batch-size", type=int, default=None,
                   help="per rank (default: the model's, see MODELS)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every method this many times, round-robin (so that slow spells "
                        "of the machine hit every method alike); report the median")
    p.add_argument("--out-dir", default=None, help="write results.json, network.md, network.png")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--mpirun-extra", default="",
                   help="more mpirun options, e.g. '-x HOROVOD_CPU_OPERATIONS=gloo'")
    # Inside a host (launched by mpirun):
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="resnet18", help=argparse.SUPPRESS)
    p.add_argument("--method", default="dense", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- worker (one rank)
def tx_bytes() -> int:
    with open(f"/sys/class/net/{IFACE}/statistics/tx_bytes") as f:
        return int(f.read())


# name -> (description, per-rank batch). The batch sets how much compute hides the exchange:
# `mlp` is the communication-bound extreme (16 ms of compute against 21 MB of gradient),
# `mlp10m` is shaped like the reference workload (a 10M-parameter model whose
# compute is a fraction of a dense exchange at 1 Gbit/s), ResNet-18 is compute-heavy.
MODELS = {"resnet18": ("ResNet-18, 11.2M parameters", 16),
          "mlp": ("MLP 3072-1024-1024-1024-10, 5.3M parameters", 16),
          "mlp10m": ("MLP 3072-1600-1600-1600-10, 10.1M parameters", 384)}


def build_model(name: str):
    sys.path.insert(0, str(REPO / "examples"))
    from models import MLP, ResNet18  # examples/models.py

    if name == "resnet18":
        return ResNet18(3, 10)
    return MLP(3 * 32 * 32, 10, hidden=1600 if name == "mlp10m" else 1024)


def horovod_optimizer(method: str, model, opt):
    """``opt`` wrapped for ``method``: ``dense`` / ``fp16`` (Horovod's DistributedOptimizer)
    or ``topk<percent>`` (hvd_topk's, steady state: no warm-up). Call ``hvd.init()`` first."""
    import horovod.torch as hvd

    import hvd_topk

    named = model.named_parameters()
    if topk_method(method):
        ratio, exchange = topk_method(method)
        comp = hvd_topk.TopKCompressor(ratio, warmup_steps=0, exchange=exchange)
        return hvd_topk.DistributedOptimizer(opt, named_parameters=named, compression=comp, log_every=0)
    comp = hvd.Compression.fp16 if method == "fp16" else hvd.Compression.none
    return hvd.DistributedOptimizer(opt, named_parameters=named, compression=comp)


def ddp_model(method: str, model, opt, rank: int, world: int):
    """``(model wrapped in DDP with the method's comm hook, optimizer)`` over Gloo."""
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

    import hvd_topk.ddp

    port = int(os.environ.get("BENCH_PORT", "29512"))
    dist.init_process_group("gloo", init_method=f"tcp://{MASTER}:{port}", rank=rank, world_size=world)
    state = None
    if method.startswith("ddptopk"):  # the hook holds the momentum (DGC's correction)
        state = hvd_topk.ddp.TopKState(model, float(method[len("ddptopk"):]) / 100, momentum=0.9,
                                       warmup_steps=0)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)
    # An explicit bucket cap also makes the first bucket 25 MB instead of DDP's 1 MB: with
    # two small early buckets PyTorch's PowerSGD hook on Gloo raced its own collectives
    # ("Received data size doesn't match expected size", pytorch/pytorch#58467).
    model = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=25)
    if method == "powersgd4":
        model.register_comm_hook(psgd.PowerSGDState(process_group=None, matrix_approximation_rank=4,
                                                    start_powerSGD_iter=2, use_error_feedback=True,
                                                    warm_start=True), psgd.powerSGD_hook)
    elif method == "ddpfp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif state is not None:
        model.register_comm_hook(state, hvd_topk.ddp.topk_hook)
    return model, opt


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", 0))
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", 1))
    torch.manual_seed(0)
    model = build_model(args.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    barrier = lambda: None  # noqa: E731
    if args.method in DDP_METHODS:
        model, opt = ddp_model(args.method, model, opt, rank, world)
        barrier = torch.distributed.barrier
    elif args.method != "none":
        import horovod.torch as hvd

        hvd.init()
        opt = horovod_optimizer(args.method, model, opt)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        barrier = lambda: hvd.allreduce(torch.zeros(1), name="barrier")  # noqa: E731
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=gen)  # (B, C, H, W)
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    barrier()
    times, b0 = [], tx_bytes()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    sent = tx_bytes() - b0
    # No rank leaves while another still reads its last collective (a rank that exits first
    # resets the connection under the other: PowerSGD's Gloo hook then fails).
    barrier()
    if args.method in DDP_METHODS:
        torch.distributed.destroy_process_group()
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        # The byte model's bytes per step on this rank's link (hvd_topk's comm_stats; a ring
        # allreduce of every gradient for Horovod's dense and fp16).
        if hasattr(opt, "comm_stats"):
            model_bytes = opt.comm_stats.link_bytes
        elif args.method in ("dense", "fp16", "ddpdense", "ddpfp16"):
            from hvd_topk.exchange import ring_allreduce_bytes
            model_bytes = ring_allreduce_bytes(params * (2 if args.method.endswith("fp16") else 4), world)
        else:
            model_bytes = None
        print("RESULT " + json.dumps({"step_ms": 1e3 * statistics.median(times),
                                      "step_ms_all": [1e3 * t for t in times],
                                      "bytes_per_step": sent / args.steps, "params": params,
                                      "model_bytes": model_bytes}),
              flush=True)


# --------------------------------------------------------------------------- orchestration
def netem(*argv: str) -> str:
    return subprocess.run([str(NETEM), *argv], check=True, capture_output=True, text=True).stdout


def run_one(args, model: str, method: str) -> dict:
    mpi = netem("mpirun-args", str(args.hosts)).split("\n")
    cmd = ["mpirun", *[a for a in mpi if a], "-np", str(args.hosts), "-x", "OMP_NUM_THREADS=1",
           "-x", "BENCH_PORT", *shlex.split(args.mpirun_extra),
           "-x", f"GLOO_SOCKET_IFNAME={IFACE}", "-x", f"HOROVOD_GLOO_IFACE={IFACE}",
           sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model,
           "--method", method, "--batch-size", str(args.batch_size or MODELS[model][1]),
           "--warmup", str(args.warmup),
           "--steps", str(args.steps)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for attempt in range(2):  # a concurrent mpirun on the machine can collide at start-up
        env["BENCH_PORT"] = str(29512 + attempt)  # a fresh port: the last one may be in TIME_WAIT
        with tempfile.TemporaryDirectory(prefix="hvdn-ompi-") as tmp:
            # A private session directory: another job's Open MPI files cannot clash with ours.
            full = cmd[:1] + ["--mca", "orte_tmpdir_base", tmp] + cmd[1:]
            proc = subprocess.run(full, capture_output=True, text=True, timeout=args.timeout, env=env)
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{model}/{method} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                       f"{proc.stderr[-3000:]}")


def summarize(runs: list) -> list:
    """One row per (model, rate, method): the median over the repeats of each run's median
    step time, the range of those, and the median bytes per step."""
    rows = {}
    for r in runs:
        rows.setdefault((r["model"], r["rate"], r["method"]), []).append(r)
    out = []
    for (model, rate, method), rs in rows.items():
        steps = [r["step_ms"] for r in rs]
        out.append({"model": model, "rate": rate, "method": method, "params": rs[0]["params"],
                    "step_ms": statistics.median(steps), "step_ms_runs": steps,
                    "bytes_per_step": statistics.median(r["bytes_per_step"] for r in rs),
                    "model_bytes": rs[0].get("model_bytes")})
    return out


def markdown(results: list) -> str:
    def find(r, method):
        return next((q for q in results if q["model"] == r["model"] and q["rate"] == r["rate"]
                     and q["method"] == method), None)

    lines = ["| model | link | method | step ms | runs (ms) | x floor | MB on the wire per step "
             "| % of dense bytes | byte model MB | wire / model |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in results:
        floor, dense = find(r, "none"), find(r, "dense")
        x_floor = f"{r['step_ms'] / floor['step_ms']:.2f}" if floor else "-"
        share = (f"{100 * r['bytes_per_step'] / dense['bytes_per_step']:.2f}%"
                 if dense and r["method"] != "none" else "-")
        runs = ", ".join(f"{t:.0f}" for t in r["step_ms_runs"])
        mb = r.get("model_bytes")
        model = f"{mb / 1e6:.3f} | {r['bytes_per_step'] / mb:.3f}" if mb else "- | -"
        lines.append(f"| {r['model']} | {r['rate']} | {LABELS[r['method']]} | {r['step_ms']:.0f} | "
                     f"{runs} | {x_floor} | {r['bytes_per_step'] / 1e6:.3f} | {share} | {model} |")
    return "\n".join(lines) + "\n"


def plot(results: list, path: Path, hosts: int = 2) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["rate"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (model, rate) in zip(axes[0], panels):
        rows = [r for r in results if r["model"] == model and r["rate"] == rate]
        ax.bar([LABELS[r["method"]] for r in rows], [r["step_ms"] for r in rows],
               yerr=[[r["step_ms"] - min(r["step_ms_runs"]) for r in rows],
                     [max(r["step_ms_runs"]) - r["step_ms"] for r in rows]], capsize=3,
               color=["0.6" if r["method"] == "none" else "C0" if "topk" in r["method"]
                      else "C1" for r in rows])
        ax.set_title(f"{model}, {hosts} hosts, {rate}")
        ax.set_ylabel("median step time (ms)")
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace) -> list:
    if args.worker:
        worker(args)
        return []
    for model in args.models.split(","):
        if model not in MODELS:
            raise SystemExit(f"--models: {model!r} is not one of {sorted(MODELS)}")
    runs = []
    try:
        for rate in args.rates.split(","):
            netem("up", str(args.hosts), rate, *([args.delay] if args.delay else []))
            for model in args.models.split(","):
                for rep in range(args.repeats):
                    for method in args.methods.split(","):
                        t0 = time.time()
                        try:
                            r = run_one(args, model, method)
                        except (RuntimeError, subprocess.TimeoutExpired) as e:
                            print(f"{model} {rate} {method} FAILED: {str(e)[-2000:]}", flush=True)
                            continue
                        r.update(model=model, rate=rate, method=method, repeat=rep)
                        runs.append(r)
                        print(f"{model:9s} {rate:7s} {method:10s} run {rep + 1}/{args.repeats} "
                              f"{r['step_ms']:8.1f} ms/step {r['bytes_per_step'] / 1e6:9.3f} MB/step "
                              f"({time.time() - t0:.0f} s)", flush=True)
    finally:
        netem("down")
    results = summarize(runs)
    table = markdown(results)
    print("\n" + table)
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "network.json").write_text(json.dumps({"hosts": args.hosts, "results": results, "runs": runs},
                                                     indent=1))
        (out / "network.md").write_text(table)
        plot(results, out / "network.png", args.hosts)
    return results


if __name__ == "__main__":
    main(parse_args())

"""Memory of a training run with Top-K against Horovod's dense and fp16 training.

Each method runs in processes of its own (``horovodrun -np 2 --gloo``, started by this
script), so that one method's freed memory never hides another's::

    python scripts/bench_memory.py                       # the default table (CPU, 2 ranks)
    python scripts/bench_memory.py --methods dense,topk0.01 --optimizers sgd --steps 130
    python scripts/bench_memory.py --device cuda --np 1  # on a GPU (one NCCL rank, HOROVOD_ELASTIC=1)
    python scripts/bench_memory.py --owner-step           # the sparse allreduce's steps alone
    python scripts/bench_memory.py --model gpt2 --width 512 --layers 4 --batch 8  # a language model
    python scripts/bench_memory.py --methods ddpdense,ddptopk0.01 --optimizers sgd  # the DDP hook

The model (``--model``) is an MLP of ``--layers`` x ``Linear(--width, --width)`` (4 x 2304:
21.2M fp32 parameters, 85 MB), batch 32; or a language model of ``examples/models.py``
(``transformer``, or ``gpt2``/``llama`` from ``transformers``, built from a config) of width
``--width``, ``--layers`` blocks, ``--vocab`` tokens and ``--context`` positions, trained on
random tokens (its embeddings, layer norms and biases make many small tensors, exchanged
densely below ``min_numel``). ``--steps`` steps (longer than the default warm-up of 100
steps). Per method and optimizer (SGD momentum 0.9, AdamW), on rank 0, in units of the
parameters' own bytes:

- ``peak``: the largest growth over any step, from just before the first step, and the step
  where it happened, of ``torch.cuda.max_memory_allocated`` (CUDA) or, on CPU, in two tables:
  the process's resident memory (sampled every millisecond by a thread, with
  ``MALLOC_MMAP_THRESHOLD_=131072`` so that freed tensors leave it), and the bytes allocated
  through malloc by every thread (``scripts/malloc_count.c``, built into ``build/`` and
  preloaded into each rank where a C compiler is found: the CPU's counterpart of
  ``max_memory_allocated``, which neither glibc's habits of keeping or returning freed memory
  nor code paged in move);
- ``steady``: the growth after the last step;
- ``held``: the bytes of the tensors the optimizer and compressor keep alive after the last
  step (``hvd_topk.held_bytes``: residuals, velocities, moments, caches);
- ``temporaries``: the most a step's own temporaries took above what the step started with
  (payloads, gathered buffers, selections): what scales with ``k`` and a group;
- ``after warm-up``: ``peak`` over the steps after the warm-up (its ratio reached);
- on CPU, a second table splits the steady growth (``breakdown``): the tensors reachable from
  Python, the free chunks glibc's heap keeps, the other anonymous memory (Horovod's and
  Gloo's buffers, Python's objects) and file-backed pages (code paged in);
- ``vs dense``: the column before it minus the dense run's ``peak`` with the same optimizer:
  the memory hvd_topk adds.

Methods: ``dense`` (``hvd.DistributedOptimizer``), ``fp16`` (``hvd.Compression.fp16``),
``topk<ratio>`` (the allgather), ``topk<ratio>sar`` (the sparse allreduce), ``...gen`` (the
generic torch path instead of the CPU kernel: the path CUDA tensors take); and on PyTorch DDP
(``torchrun``, Gloo on CPU): ``ddpdense`` (DDP's own allreduce) and ``ddptopk<ratio>`` (the
``hvd_topk.ddp`` hook; its rows are compared with ``ddpdense``). Top-K runs take the defaults
(warm-up included) and the automatic corrections.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--np", type=int, default=2, help="ranks (Gloo on CPU)")
    p.add_argument("--methods", default="dense,fp16,topk0.01,topk0.001,topk0.01sar,topk0.001sar,topk0.01gen")
    p.add_argument("--optimizers", default="sgd,adamw")
    p.add_argument("--model", default="mlp", choices=["mlp", "transformer", "gpt2", "llama"])
    p.add_argument("--vocab", type=int, default=8192, help="language models: tokens")
    p.add_argument("--context", type=int, default=128, help="language models: positions")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=2304)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=130)
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    p.add_argument("--owner-step", action="store_true",
                   help="instead: the sparse allreduce's per-step buffers, one process, one tensor "
                        "of width^2 entries at a density of 1/64, per alltoall slot")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "method:optimizer", inside a run
    return p.parse_args(argv)


# -- one run, inside horovodrun -----------------------------------------------------------------

class RssSampler:
    """The process's resident bytes, sampled every millisecond; ``peak()`` since ``reset()``."""

    def __init__(self, interval: float = 0.001) -> None:
        self._interval = interval
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._peak = self.now()
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop:
            self._peak = max(self._peak, self.now())
            time.sleep(self._interval)

    def reset(self) -> int:
        self._peak = now = self.now()
        return now

    def peak(self) -> int:
        return max(self._peak, self.now())


class AllocCounter:
    """The bytes this process holds allocated through malloc (all threads: tensor storages,
    Horovod's and Gloo's buffers), counted by ``scripts/malloc_count.c`` when the launcher
    preloads it: the CPU's counterpart of ``torch.cuda.memory_allocated``, untouched by what
    glibc keeps or returns to the system. ``now()``, ``reset()`` and ``peak()`` as
    ``RssSampler``'s."""

    def __init__(self) -> None:
        import ctypes

        self._lib = ctypes.CDLL(None)
        for name in ("malloc_count_live", "malloc_count_peak", "malloc_count_reset_peak"):
            getattr(self._lib, name).restype = ctypes.c_size_t

    @staticmethod
    def loaded() -> bool:
        import ctypes

        return hasattr(ctypes.CDLL(None), "malloc_count_live")

    def now(self) -> int:
        return self._lib.malloc_count_live()

    def reset(self) -> int:
        return self._lib.malloc_count_reset_peak()

    def peak(self) -> int:
        return self._lib.malloc_count_peak()


class CudaMeter:
    """``torch.cuda.memory_allocated`` and its peak on ``device``, as ``RssSampler``'s."""

    def __init__(self, device) -> None:
        self._device = device

    def now(self) -> int:
        import torch

        return torch.cuda.memory_allocated(self._device)

    def reset(self) -> int:
        import torch

        torch.cuda.reset_peak_memory_stats(self._device)
        return self.now()

    def peak(self) -> int:
        import torch

        return torch.cuda.max_memory_allocated(self._device)


def malloc_counter() -> Optional[Path]:
    """``scripts/malloc_count.c`` built into ``build/`` (once), or None where it cannot be
    (no C compiler, not glibc)."""
    lib = REPO / "build" / "malloc_count.so"
    src = REPO / "scripts" / "malloc_count.c"
    if lib.exists() and lib.stat().st_mtime >= src.stat().st_mtime:
        return lib
    lib.parent.mkdir(exist_ok=True)
    try:
        subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", "-o", str(lib), str(src)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return lib


def breakdown() -> dict:
    """Where this process's resident memory lies (CPU), in bytes: ``anon`` and ``file``
    (``/proc/self/smaps_rollup``); ``tensors``, the CPU tensor storages reachable from Python
    (each storage once); ``heap_free``, the free chunks glibc's arenas keep (``mallinfo2``;
    freed small blocks it has not returned). The rest of ``anon`` is what no Python tensor
    holds: Horovod's and Gloo's buffers, Python's objects, the heap's other blocks."""
    import ctypes
    import gc
    import warnings

    import torch

    out = {}
    with open("/proc/self/smaps_rollup") as f:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[-1] == "kB"}
    out["anon"], out["file"] = fields["Anonymous"], fields["Rss"] - fields["Anonymous"]
    storages = {}
    with warnings.catch_warnings():  # isinstance() on some of torch's deprecated objects warns
        warnings.simplefilter("ignore")
        for o in gc.get_objects():
            if isinstance(o, torch.Tensor) and o.device.type == "cpu" and not o.is_meta:
                st = o.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
    out["tensors"] = sum(storages.values())

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        m = libc.mallinfo2()
        out["heap_free"] = m.fordblks
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        out["heap_free"] = 0
    return out


def build(args, device, rank):
    """The model and four batches of this rank's inputs."""
    import torch
    import torch.nn as nn

    gen = torch.Generator().manual_seed(1 + rank)
    if args.model == "mlp":
        layers = []
        for _ in range(args.layers):
            layers += [nn.Linear(args.width, args.width), nn.ReLU()]
        batches = [torch.randn(args.batch, args.width, generator=gen).to(device) for _ in range(4)]
        return nn.Sequential(*layers[:-1]).to(device), batches
    sys.path.insert(0, str(REPO / "examples"))
    from models import build_lm

    model = build_lm(args.model, args.vocab, d_model=args.width, n_layers=args.layers,
                     n_heads=max(1, args.width // 64), context=args.context).to(device)
    batches = [torch.randint(args.vocab, (args.batch, args.context + 1), generator=gen).to(device)
               for _ in range(4)]
    return model, batches


def loss(model, batch):
    """The MLP's mean square output, or the language model's next-token loss."""
    import torch.nn.functional as F

    if batch.is_floating_point():
        return model(batch).square().mean()
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def run_one(args) -> None:
    import torch

    import hvd_topk

    method, opt_name = args.one.split(":")
    ddp = method.startswith("ddp")
    if ddp:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    else:
        import horovod.torch as hvd
        hvd.init()
        rank, local_rank = hvd.rank(), hvd.local_rank()
    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model, batches = build(args, device, rank)
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    if opt_name == "sgd":
        base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    comp = None
    if ddp:
        opt, comp, model = ddp_setup(method, opt_name, model, base, device)
    elif method == "dense":
        opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())
    elif method == "fp16":
        opt = hvd.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                       compression=hvd.Compression.fp16)
    else:
        spec = method[len("topk"):]
        exchange = "sparse_allreduce" if "sar" in spec else "allgather"
        ratio = float(spec.replace("sar", "").replace("gen", ""))
        comp = hvd_topk.TopKCompressor(ratio, exchange=exchange)
        opt = hvd_topk.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                            compression=comp, log_every=0)

    if cuda:
        meters = {"cuda": CudaMeter(device)}
    else:
        meters = {"rss": RssSampler()}
        if AllocCounter.loaded():
            meters["alloc"] = AllocCounter()
    if ddp:
        torch.distributed.barrier()
    else:
        hvd.allreduce(torch.zeros(1), name="bench_memory.ready")
    start = {key: m.reset() for key, m in meters.items()}
    before_run = None if cuda else breakdown()
    runs = {key: {"peak": 0, "peak_step": 0, "temporaries": 0, "after_warmup": 0} for key in meters}
    warmup = comp.warmup_steps if comp is not None else 0  # the length in force (Adam: longer)
    for t in range(args.steps):
        before = {key: m.now() for key, m in meters.items()}
        for m in meters.values():
            m.reset()
        opt.zero_grad()
        loss(model, batches[t % len(batches)]).backward()
        opt.step()
        for key, m in meters.items():
            r, top = runs[key], m.peak()
            r["temporaries"] = max(r["temporaries"], top - max(before[key], m.now()))
            if top - start[key] > r["peak"]:
                r["peak"], r["peak_step"] = top - start[key], t
            if t >= warmup:
                r["after_warmup"] = max(r["after_warmup"], top - start[key])
    for key, m in meters.items():
        runs[key]["steady"] = m.now() - start[key]
    grown = {} if cuda else {key: value - before_run[key] for key, value in breakdown().items()}
    grads = [p.grad for p in params if p.grad is not None]
    held = hvd_topk.held_bytes(opt, comp, exclude=params + grads)
    if rank == 0:
        print("RESULT " + json.dumps({"method": method, "optimizer": opt_name, "param_bytes": param_bytes,
                                      "held": held, "grown": grown, **runs}), flush=True)


def ddp_setup(method, opt_name, model, base, device):
    """``(optimizer, TopKState or None, DDP model)`` for a DDP method: ``ddpdense`` (DDP's own
    allreduce) or ``ddptopk<ratio>`` (the ``hvd_topk.ddp`` hook with its defaults; with SGD the
    hook holds the momentum, DGC's correction, and SGD none; with AdamW, Adam correction
    paired with the loop's AdamW)."""
    import torch

    import hvd_topk.ddp

    state, opt = None, base
    if method.startswith("ddptopk"):
        ratio = float(method[len("ddptopk"):])
        if opt_name == "sgd":
            state = hvd_topk.ddp.TopKState(model, ratio, momentum=0.9)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.0)
        else:
            state = hvd_topk.ddp.TopKState(model, ratio, optimizer=base)
    ddp_model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    if state is not None:
        ddp_model.register_comm_hook(state, hvd_topk.ddp.topk_hook)
    return opt, state, ddp_model


# -- the driver ---------------------------------------------------------------------------------

def launch(args, method: str, opt_name: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if method.endswith("gen"):
        env["HVD_TOPK_CPU_KERNEL"] = "0"
    counter = malloc_counter() if args.device == "cpu" else None
    if counter is not None:
        env["LD_PRELOAD"] = " ".join(filter(None, [str(counter), env.get("LD_PRELOAD")]))
    bin_dir = Path(sys.executable).parent
    if method.startswith("ddp"):
        cmd = [str(bin_dir / "torchrun"), "--standalone", "--nproc-per-node", str(args.np)]
    elif args.device == "cuda":
        env["HOROVOD_ELASTIC"] = "1"
        cmd = ["mpirun", "--allow-run-as-root", "-np", str(args.np)]
    else:
        cmd = [str(bin_dir / "horovodrun"), "-np", str(args.np), "-H", f"localhost:{args.np}", "--gloo"]
    if not method.startswith("ddp"):
        cmd.append(sys.executable)  # torchrun starts the script with its own interpreter
    cmd += [__file__, "--one", f"{method}:{opt_name}", "--device", args.device,
            "--model", args.model, "--vocab", str(args.vocab), "--context", str(args.context),
            "--layers", str(args.layers), "--width", str(args.width), "--batch", str(args.batch),
            "--steps", str(args.steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    for line in out.stdout.splitlines():
        if "RESULT " in line:
            return json.loads(line.split("RESULT ", 1)[1])
    raise RuntimeError(f"{' '.join(cmd)} gave no result (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")


#: The tables' measures: the row's key and its title.
MEASURES = [("rss", "Resident memory (RSS, sampled every millisecond):"),
            ("alloc", "Allocated through malloc (`scripts/malloc_count.c`, all threads; "
                      "independent of what glibc keeps or returns):"),
            ("cuda", "`torch.cuda.max_memory_allocated`:")]


def table(rows, args) -> str:
    p = rows[0]["param_bytes"]
    engine = lambda r: "ddp" if r["method"].startswith("ddp") else "horovod"  # noqa: E731
    fmt = "{:.2f}x".format
    if args.model == "mlp":
        name = f"{args.layers} x Linear({args.width}, {args.width})"
    else:
        name = (f"{args.model}, width {args.width}, {args.layers} layers, vocabulary {args.vocab}, "
                f"context {args.context}")
    lines = [f"Model: {name}, {p / 1e6:.1f} MB of fp32 "
             f"parameters; {args.np} ranks, batch {args.batch}, {args.steps} steps, {args.device}. "
             "Multiples of the parameters' bytes."]
    for key, title in MEASURES:
        if not all(key in r for r in rows):
            continue
        dense = {(engine(r), r["optimizer"]): r[key]["peak"] for r in rows
                 if r["method"] in ("dense", "ddpdense")}
        lines += ["", title, "", "| optimizer | method | peak (step) | vs dense | after warm-up | vs dense "
                  "| steady | held | temporaries |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            m, base = r[key], dense.get((engine(r), r["optimizer"]))
            vs = f"{(m['peak'] - base) / p:+.2f}x" if base is not None else ""
            after = m["after_warmup"]
            vs_after = f"{(after - base) / p:+.2f}x" if base is not None else ""
            lines.append(f"| {r['optimizer']} | {r['method']} | {fmt(m['peak'] / p)} "
                         f"({m['peak'] / 1e6:.0f} MB, step {m['peak_step']}) | {vs} | {fmt(after / p)} | "
                         f"{vs_after} | {fmt(m['steady'] / p)} | {fmt(r['held'] / p)} | "
                         f"{m['temporaries'] / p:.3f}x ({m['temporaries'] / 1e6:.1f} MB) |")
    if all(r.get("grown") for r in rows):
        lines += ["", "Where the steady growth lies (`breakdown()`: after the last step minus before "
                  "the first):",
                  "", "| optimizer | method | anonymous | tensors | free in glibc's heap | other anonymous "
                  "| file-backed |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            g = r["grown"]
            rest = g["anon"] - g["tensors"] - g["heap_free"]
            cells = [g["anon"], g["tensors"], g["heap_free"], rest, g["file"]]
            lines.append(f"| {r['optimizer']} | {r['method']} | "
                         + " | ".join(f"{c / p:+.2f}x" for c in cells) + " |")
    return "\n".join(lines)


def owner_step(args) -> None:
    """The sparse allreduce's three steps on one tensor of ``width^2`` entries at a density of
    1/64 (the edge of its memory budget), two ranks' rows made in this process: the peak each
    step adds, per alltoall slot (``P * c``) and in MB."""
    import torch

    from hvd_topk import sparse_allreduce as sar
    from hvd_topk.exchange_core import header_words
    from hvd_topk.layout import GroupLayout

    torch.set_num_threads(1)
    cuda = args.device == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    n, P = args.width * args.width, 2
    layout = GroupLayout((n,), (n // 64,))
    plan = sar.RegionPlan(layout, P, 2.0)
    bounds = sar.uniform_bounds(layout, P, device)
    sig = torch.tensor([7], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(P):
        sel = torch.randperm(n, generator=gen)[:layout.k].sort().values.to(device)
        sent = torch.randn(layout.k, generator=gen).to(device)
        rows.append((sel, sent))
    payloads = [sar.to_regions(sel, sent, plan, bounds, sig, torch.int32)[0] for sel, sent in rows]
    row = payloads[0].numel() // P
    received = torch.cat([pl[:row] for pl in payloads])  # owner 0's rows from ranks 0 and 1
    header = torch.zeros(header_words(1), dtype=torch.int32, device=device)
    out = torch.zeros(n, device=device)
    meter = CudaMeter(device) if cuda else RssSampler(interval=0.0001)
    slots = P * plan.slots

    def measure(fn):
        if cuda:
            torch.cuda.synchronize()
        start = meter.reset()
        result = fn()
        if cuda:
            torch.cuda.synchronize()
        return result, meter.peak() - start

    sel, sent = rows[0]
    _, sender = measure(lambda: sar.to_regions(sel, sent, plan, bounds, sig, torch.int32))
    row2, owner = measure(lambda: sar.reduce_region(received, plan, 7, header, P, torch.float32,
                                                    torch.float32, torch.int32))
    gathered = torch.cat([row2, row2])
    _, receive = measure(lambda: sar.finish(gathered, plan, header_words(1), torch.float32,
                                            torch.int32, out))
    lines = [f"One tensor of {n} entries, k = {layout.k} (density 1/64), {P} ranks, {slots} alltoall "
             f"slots (P * c), {args.device}.", "", "| step | peak above its inputs | bytes per slot |",
             "|---|---:|---:|"]
    for name, b in [("sender: bucket into rows (to_regions)", sender),
                    ("owner: sum and keep (reduce_region)", owner),
                    ("every rank: scatter and kept set (finish)", receive)]:
        lines.append(f"| {name} | {b / 1e6:.2f} MB | {b / slots:.1f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


def main(args) -> None:
    if args.owner_step:
        if args.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "131072":
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")  # freed tensors leave the RSS
            os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
        return owner_step(args)
    if args.one:
        return run_one(args)
    rows = []
    for opt_name in args.optimizers.split(","):
        for method in args.methods.split(","):
            if opt_name == "adamw" and method == "fp16":
                continue  # fp16 changes the wire only: the SGD row shows it
            rows.append(launch(args, method, opt_name))
            r = rows[-1]
            print(f"{opt_name} {method}: " + ", ".join(f"{key} peak {r[key]['peak'] / r['param_bytes']:.2f}x"
                                                       for key, _ in MEASURES if key in r), flush=True)
    text = table(rows, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main(parse_args())

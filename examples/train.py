"""Data-parallel training with hvd_topk's Top-K compression, on Horovod or PyTorch DDP.

Launch (2 ranks on this machine, offline digits data, Top-K 1%)::

    horovodrun -np 2 python examples/train.py --topk 0.01
    torchrun --nproc-per-node 2 examples/train.py --engine ddp --topk 0.01   # DDP + hvd_topk.ddp
    torchrun --nproc-per-node 2 examples/train.py --engine ddp --topk 0      # DDP's allreduce
    torchrun --nproc-per-node 2 examples/train.py --engine ddp --powersgd 4  # DDP's PowerSGD hook
    horovodrun -np 2 python examples/train.py --topk 0          # dense baseline
    horovodrun -np 2 python examples/train.py --fp16            # Horovod's fp16 compression
    mpirun -np 2 python examples/train.py --topk 0.001 --epochs 5
    horovodrun -np 8 -H host1:4,host2:4 python examples/train.py --model resnet18 \\
        --dataset cifar10 --topk 0.01 --log-dir runs/cifar

``--engine horovod`` (the default) wraps the optimizer in ``hvd_topk.DistributedOptimizer``;
``--engine ddp`` wraps the model in ``DistributedDataParallel`` (Gloo on CPU, NCCL on CUDA)
with the ``hvd_topk.ddp.topk_hook`` communication hook (``--fp16``, ``--powersgd``: DDP's
fp16 and PowerSGD hooks), and needs no Horovod. Only wiring lives here; hvd_topk does the
work. Rank 0 alone prints.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from config import config_argv  # noqa: E402
from data import DATASETS, load_dataset  # noqa: E402
from models import MODELS, build_model  # noqa: E402

import hvd_topk  # noqa: E402
import hvd_topk.ddp  # noqa: E402

try:
    import horovod.torch as hvd
except ImportError:  # --engine ddp needs no Horovod
    hvd = None


def add_compression_flags(p):
    """The flags ``make_compression`` reads (this script's, and examples/train_lm.py's)."""
    p.add_argument("--topk", type=float, default=0.01, metavar="RATIO",
                   help="fraction of each gradient sent (Top-K with error feedback); 0 = dense")
    p.add_argument("--fp16", action="store_true",
                   help="Horovod's fp16 compression instead of Top-K (a baseline)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="Top-K warm-up: density decays from --warmup-ratio to --topk over this many "
                        "steps (default: the library's)")
    p.add_argument("--warmup-ratio", type=float, default=0.25, help="Top-K warm-up start density")
    p.add_argument("--momentum-correction", default="auto", choices=["auto", "on", "off"],
                   help="DGC momentum correction (auto: on for SGD with momentum)")
    p.add_argument("--adam-correction", default="auto", choices=["auto", "on", "off"],
                   help="Adam correction (auto: on for Adam/AdamW)")
    p.add_argument("--adam-variance-steps", type=int, default=None,
                   help="local steps before Adam correction freezes the variance (default: the "
                        "library's; 0: never frozen)")
    p.add_argument("--adam-select", default=None, choices=["agreement", "signal", "momentum", "displacement"],
                   help="what Top-K ranks entries by under Adam correction (default: the library's, "
                        "agreement: owed displacement * m / (sqrt(v) + eps) where positive)")
    p.add_argument("--no-momentum-masking", action="store_true",
                   help="keep local momentum at sent coordinates (DGC masks it)")
    p.add_argument("--min-numel", type=int, default=None,
                   help="tensors smaller than this go dense (default: the library's)")
    p.add_argument("--exchange", default="auto", choices=["auto", "allgather", "sparse_allreduce"],
                   help="how Top-K entries travel (auto: the fewest bytes per tensor)")
    p.add_argument("--no-density-aware", action="store_true",
                   help="always use the sparse allgather, even where a dense allreduce is cheaper")
    p.add_argument("--value-dtype", default="auto", choices=["auto", "fp16", "bf16"],
                   help="dtype of Top-K values on the wire (auto: the gradient's)")
    p.add_argument("--local-clip-norm", type=float, default=None, help="DGC local gradient clipping")


def parse_args(argv=None, extra=()):
    """Flags (see ``--help``); ``extra``: ``(names, kwargs)`` pairs a variant of this script adds."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engine", default="horovod", choices=sorted(ENGINES),
                   help="horovod: hvd_topk.DistributedOptimizer under horovodrun/mpirun; ddp: "
                        "DistributedDataParallel with the hvd_topk.ddp hook under torchrun")
    p.add_argument("--powersgd", type=int, default=0, metavar="RANK",
                   help="--engine ddp: PyTorch's PowerSGD hook of this matrix rank instead of Top-K "
                        f"(0: off), compressing from iteration {POWERSGD_START}")
    p.add_argument("--config", default="", metavar="YAML",
                   help="flag values from a YAML file (configs/*.yaml); flags given here override it")
    add_compression_flags(p)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="wrapped optimizer")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: autocast (fp16 on CUDA, bf16 on CPU) and a GradScaler, "
                        "with Horovod's recipe (synchronize, unscale_, skip_synchronize)")
    p.add_argument("--model", default="simple_cnn", choices=sorted(MODELS), help="network")
    p.add_argument("--dataset", default="digits", choices=sorted(DATASETS),
                   help="digits is bundled with scikit-learn (offline); mnist, fashion_mnist and "
                        "cifar10 need torchvision")
    p.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--lr", type=float, default=0.05, help="for the global batch (not scaled)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="SGD weight decay")
    p.add_argument("--seed", type=int, default=42, help="model init and data shuffling")
    p.add_argument("--data-dir", default="", help="where torchvision datasets live or download to")
    p.add_argument("--log-dir", default="", help="TensorBoard event files (rank 0)")
    p.add_argument("--checkpoint", default="",
                   help="save here after every epoch, resume from it if it exists")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = no limit)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: this rank's GPU (local rank) when CUDA is available, else cpu")
    for names, kwargs in extra:
        p.add_argument(*names, **kwargs)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = p.parse_args(config_argv(argv, p) + argv)
    if args.topk < 0 or args.topk > 1:
        p.error(f"--topk must be in [0, 1], got {args.topk}")
    check_engine_flags(p, args)
    return args


#: ``--momentum-correction`` / ``--adam-correction`` -> the ``TopKSettings`` value.
TRISTATE = {"auto": None, "on": True, "off": False}


def topk_settings(args) -> dict:
    """The Top-K settings both engines take (``TopKSettings`` keywords) from the flags."""
    kwargs = dict(ratio=args.topk, warmup_ratio=args.warmup_ratio,
                  momentum_masking=not args.no_momentum_masking,
                  density_aware=not args.no_density_aware, local_clip_norm=args.local_clip_norm,
                  exchange=args.exchange,
                  value_dtype={"auto": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.value_dtype])
    if args.warmup_steps is not None:
        kwargs["warmup_steps"] = args.warmup_steps
    if args.min_numel is not None:
        kwargs["min_numel"] = args.min_numel
    kwargs["adam_correction"] = TRISTATE[args.adam_correction]
    if args.adam_variance_steps is not None:
        kwargs["adam_variance_steps"] = args.adam_variance_steps or None
    if args.adam_select is not None:
        kwargs["adam_select"] = args.adam_select
    return kwargs


def make_compression(args):
    if args.fp16:
        return hvd_topk.make_compressor("fp16")
    if args.topk > 0:
        kwargs = dict(topk_settings(args), momentum_correction=TRISTATE[args.momentum_correction])
        return hvd_topk.make_compressor("topk", **kwargs)
    return hvd_topk.make_compressor("none")


def pick_device(choice: str, local_rank: Optional[int] = None) -> torch.device:
    """One GPU per rank (by local rank, default Horovod's) when CUDA is wanted and present,
    else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: no CUDA device visible (torch built for CUDA "
                         f"{torch.version.cuda})")
    local_rank = hvd.local_rank() if local_rank is None else local_rank
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def make_optimizer(model, args, momentum: float):
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=momentum,
                           weight_decay=args.weight_decay)


class HorovodEngine:
    """Horovod: ``hvd_topk.DistributedOptimizer`` with Top-K (or fp16, or none) as its
    compression; checkpoints by ``hvd_topk.save_checkpoint``."""

    start_epoch = 0

    def __init__(self, args):
        if hvd is None:
            raise SystemExit("--engine horovod needs Horovod (pip install horovod); "
                             "--engine ddp does not")
        hvd.init()
        self.rank, self.size, self.local_size = hvd.rank(), hvd.size(), hvd.local_size()
        self.device = pick_device(args.device)

    def wrap(self, model, args, scaler):
        """``(module to train, optimizer, description)``; resumes ``--checkpoint``."""
        compression = make_compression(args)
        optimizer = hvd_topk.DistributedOptimizer(make_optimizer(model, args, args.momentum),
                                                  named_parameters=model.named_parameters(),
                                                  compression=compression, log_every=0,
                                                  grad_scaler=scaler if args.amp else None)
        if args.checkpoint and os.path.exists(args.checkpoint):
            self.start_epoch = int(hvd_topk.load_checkpoint(args.checkpoint, model, optimizer)["epoch"]) + 1
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        return model, optimizer, f"compression: {compression!r}"

    def step(self, loss, optimizer, scaler, amp: bool):
        if amp:
            # Horovod's AMP recipe: exchange, unscale the averaged gradients, and let the
            # scaler skip the step (on every rank alike) when they are not finite.
            scaler.scale(loss).backward()
            optimizer.synchronize()
            scaler.unscale_(optimizer)
            with optimizer.skip_synchronize():
                scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return hvd.allreduce(t, op=hvd.Sum)

    def save(self, path, model, optimizer, epoch):
        hvd_topk.save_checkpoint(path, model, optimizer, epoch=epoch)

    def comm(self, optimizer) -> dict:
        s = optimizer.comm_stats
        return {"bytes_sent": s.bytes_sent, "bytes_received": s.bytes_received, "dense_bytes": s.dense_bytes,
                "density": s.density, "compress_ms": s.compress_ms, "wait_ms": s.wait_ms}

    def sent(self, optimizer) -> str:
        s = optimizer.comm_stats
        return f"  sent/step {s.bytes_sent / 1e3:.1f} KB ({100 * s.density:.2f}% of dense)"


class DDPEngine:
    """``torchrun`` + ``DistributedDataParallel``: the ``hvd_topk.ddp`` Top-K hook (with
    momentum correction the hook holds the momentum and SGD runs without; with AdamW, Adam
    correction pairs the hook with the optimizer), DDP's fp16 or
    PowerSGD hook, or DDP's own allreduce (``--topk 0``)."""

    start_epoch = 0

    def __init__(self, args):
        self.device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.local_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))

    def wrap(self, model, args, scaler):
        topk = args.topk > 0 and not (args.fp16 or args.powersgd)
        correct = topk and args.optimizer == "sgd" and args.momentum > 0 and args.momentum_correction != "off"
        state = None
        optimizer = make_optimizer(model, args, 0.0 if correct else args.momentum)
        if topk:  # with AdamW, Adam correction through the optimizer pairing (unless --adam-correction off)
            state = hvd_topk.ddp.TopKState(model, momentum=args.momentum if correct else 0.0,
                                           optimizer=optimizer if args.optimizer == "adamw" else None,
                                           **topk_settings(args))
        net = DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None)
        if state is not None:
            net.register_comm_hook(state, hvd_topk.ddp.topk_hook)
            what = (f"hvd_topk.ddp.topk_hook (ratio {args.topk}, momentum correction {state.momentum}, "
                    f"Adam correction {'on' if state.adam else 'off'})")
        elif args.fp16:
            net.register_comm_hook(None, default_hooks.fp16_compress_hook)
            what = "DDP fp16_compress_hook"
        elif args.powersgd:
            net.register_comm_hook(powerSGD_hook.PowerSGDState(
                None, matrix_approximation_rank=args.powersgd, start_powerSGD_iter=POWERSGD_START),
                powerSGD_hook.powerSGD_hook)
            what = f"DDP powerSGD_hook (rank {args.powersgd})"
        else:
            what = "DDP allreduce"
        return net, optimizer, f"DDP, {what}"

    def step(self, loss, optimizer, scaler, amp: bool):
        # A tensor some rank left non-finite arrives NaN everywhere: the scaler skips the step.
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device)
        dist.all_reduce(t)
        return t.cpu()

    def comm(self, optimizer) -> dict:
        return {}

    def sent(self, optimizer) -> str:
        return ""


#: ``--powersgd``: PowerSGD's dense iterations before it compresses (``start_powerSGD_iter``;
#: PyTorch's docs advise a warm-up, and its error feedback needs at least 2).
POWERSGD_START = 10

#: ``--engine``: the training engines.
ENGINES = {"horovod": HorovodEngine, "ddp": DDPEngine}


def check_engine_flags(p, args):
    """Flags the DDP engine does not have (``hvd_topk.ddp.HOOK_SETTINGS`` and DDP's hooks)."""
    if args.engine != "ddp":
        if args.powersgd:
            p.error("--powersgd needs --engine ddp")
        return
    if args.powersgd and args.fp16:
        p.error("--powersgd and --fp16 are two hooks: choose one")
    if args.checkpoint:
        p.error("--checkpoint needs --engine horovod (with ddp, save hvd_topk.ddp.TopKState.state_dict() "
                "per rank)")
    if args.exchange == "sparse_allreduce":
        p.error("--exchange sparse_allreduce needs --engine horovod (the DDP hook allgathers)")
    if args.amp and args.optimizer == "adamw" and args.topk > 0 and args.adam_correction != "off":
        p.error("--engine ddp: Adam correction and --amp's GradScaler do not mix (it would unscale the "
                "averaged Adam step); add --adam-correction off, or use --engine horovod")
    if args.momentum_correction == "on" and (args.optimizer != "sgd" or args.momentum == 0):
        p.error("--momentum-correction on needs SGD with --momentum > 0")


def evaluate(model, loader, total=None):
    """``(accuracy, loss)`` over every rank's share of ``loader``; ``total`` sums a tensor over
    the ranks (default: Horovod's allreduce)."""
    device = next(model.parameters()).device
    model.eval()
    correct = count = loss = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            count += y.numel()
    sums = torch.tensor([correct, count, loss], dtype=torch.float64)
    sums = hvd.allreduce(sums, op=hvd.Sum) if total is None else total(sums)
    model.train()
    return (sums[0] / sums[1]).item(), (sums[2] / sums[1]).item()


def main(args):
    engine = ENGINES[args.engine](args)
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, engine.local_size)))
    rank0 = engine.rank == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    data = load_dataset(args.dataset, args.data_dir, seed=0)
    train_sampler = DistributedSampler(data.train, num_replicas=engine.size, rank=engine.rank,
                                       shuffle=True, seed=args.seed)
    test_sampler = DistributedSampler(data.test, num_replicas=engine.size, rank=engine.rank,
                                      shuffle=False)
    train_loader = DataLoader(data.train, batch_size=args.batch_size, sampler=train_sampler)
    test_loader = DataLoader(data.test, batch_size=256, sampler=test_sampler)

    device = engine.device
    model = build_model(args.model, data.input_shape, data.num_classes).to(device)
    # Mixed precision: the scaler multiplies the loss; the Horovod optimizer, told of it, keeps
    # the Top-K residuals in unscaled units when the scale changes. (With bf16 on CPU the scale
    # mostly stays put, but the recipe is the same as with fp16 on GPUs.)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    net, optimizer, what = engine.wrap(model, args, scaler)
    start_epoch = engine.start_epoch

    writer = None
    if rank0 and args.log_dir:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(args.log_dir)
    if rank0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.model} ({n_params / 1e6:.2f}M params) on {args.dataset} "
              f"({len(data.train)} train / {len(data.test)} test), {engine.size} ranks, {what}", flush=True)

    step, t_start = 0, time.time()
    acc = float("nan")
    for epoch in range(start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        batches = train_loader
        if rank0 and not args.no_progress:
            from tqdm import tqdm
            batches = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False)
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp):
                loss = F.cross_entropy(net(x), y)
            engine.step(loss, optimizer, scaler, args.amp)
            step += 1
            if writer is not None:
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                for key, value in engine.comm(optimizer).items():
                    writer.add_scalar(f"comm/{key}", value, step)
            if args.max_steps and step >= args.max_steps:
                break
        acc, test_loss = evaluate(model, test_loader, engine.sum)
        if args.checkpoint:
            engine.save(args.checkpoint, model, optimizer, epoch)
        if rank0:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  test loss {test_loss:.4f}  "
                  f"test acc {100 * acc:.2f}%{engine.sent(optimizer)}  {time.time() - t_start:.1f}s",
                  flush=True)
        if writer is not None:
            writer.add_scalar("test/accuracy", acc, step)
            writer.add_scalar("test/loss", test_loss, step)
        if args.max_steps and step >= args.max_steps:
            break
    if writer is not None:
        writer.close()
    if rank0:
        print(f"final test accuracy: {100 * acc:.2f}%", flush=True)
    if args.engine == "ddp":
        # Let go of DDP (its reducer holds the last step's futures and the hook's callbacks)
        # while Python still runs: a collective's thread must not drop the last reference to
        # a Python callback during interpreter shutdown (std::terminate).
        del model, optimizer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return acc


if __name__ == "__main__":
    main(parse_args())

"""Data-parallel training with Horovod and hvd_topk's Top-K compression.

Launch (2 ranks on this machine, offline digits data, Top-K 1%)::

    horovodrun -np 2 python examples/train.py --topk 0.01
    horovodrun -np 2 python examples/train.py --topk 0          # dense baseline
    horovodrun -np 2 python examples/train.py --fp16            # Horovod's fp16 compression
    mpirun -np 2 python examples/train.py --topk 0.001 --epochs 5
    horovodrun -np 8 -H host1:4,host2:4 python examples/train.py --model resnet18 \\
        --dataset cifar10 --topk 0.01 --log-dir runs/cifar

Only wiring lives here; hvd_topk does the work. Rank 0 alone prints.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from config import config_argv  # noqa: E402
from data import DATASETS, load_dataset  # noqa: E402
from models import MODELS, build_model  # noqa: E402

import hvd_topk  # noqa: E402


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
    return args


def make_compression(args):
    if args.fp16:
        return hvd_topk.make_compressor("fp16")
    if args.topk > 0:
        tristate = {"auto": None, "on": True, "off": False}
        kwargs = dict(ratio=args.topk, warmup_ratio=args.warmup_ratio,
                      momentum_correction=tristate[args.momentum_correction],
                      adam_correction=tristate[args.adam_correction],
                      momentum_masking=not args.no_momentum_masking,
                      density_aware=not args.no_density_aware, local_clip_norm=args.local_clip_norm,
                      exchange=args.exchange,
                      value_dtype={"auto": None, "fp16": torch.float16,
                                   "bf16": torch.bfloat16}[args.value_dtype])
        if args.warmup_steps is not None:
            kwargs["warmup_steps"] = args.warmup_steps
        if args.min_numel is not None:
            kwargs["min_numel"] = args.min_numel
        if args.adam_variance_steps is not None:
            kwargs["adam_variance_steps"] = args.adam_variance_steps or None
        return hvd_topk.make_compressor("topk", **kwargs)
    return hvd_topk.make_compressor("none")


def pick_device(choice: str) -> torch.device:
    """One GPU per rank (by local rank) when CUDA is wanted and present, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: no CUDA device visible (torch built for CUDA "
                         f"{torch.version.cuda})")
    device = torch.device("cuda", hvd.local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def evaluate(model, loader):
    device = next(model.parameters()).device
    model.eval()
    correct = total = loss = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            total += y.numel()
    sums = hvd.allreduce(torch.tensor([correct, total, loss], dtype=torch.float64), op=hvd.Sum)
    model.train()
    return (sums[0] / sums[1]).item(), (sums[2] / sums[1]).item()


def main(args):
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, hvd.local_size())))
    rank0 = hvd.rank() == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")

    data = load_dataset(args.dataset, args.data_dir, seed=0)
    train_sampler = DistributedSampler(data.train, num_replicas=hvd.size(), rank=hvd.rank(),
                                       shuffle=True, seed=args.seed)
    test_sampler = DistributedSampler(data.test, num_replicas=hvd.size(), rank=hvd.rank(),
                                      shuffle=False)
    train_loader = DataLoader(data.train, batch_size=args.batch_size, sampler=train_sampler)
    test_loader = DataLoader(data.test, batch_size=256, sampler=test_sampler)

    device = pick_device(args.device)
    model = build_model(args.model, data.input_shape, data.num_classes).to(device)
    if args.optimizer == "adamw":
        base = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)
    compression = make_compression(args)
    # Mixed precision: the scaler multiplies the loss; telling the optimizer keeps the Top-K
    # residuals in unscaled units when the scale changes. (With bf16 on CPU the scale mostly
    # stays put, but the recipe is the same as with fp16 on GPUs.)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    optimizer = hvd_topk.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                              compression=compression, log_every=0,
                                              grad_scaler=scaler if args.amp else None)
    start_epoch = 0
    if args.checkpoint and os.path.exists(args.checkpoint):
        start_epoch = int(hvd_topk.load_checkpoint(args.checkpoint, model, optimizer)["epoch"]) + 1
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    writer = None
    if rank0 and args.log_dir:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(args.log_dir)
    if rank0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.model} ({n_params / 1e6:.2f}M params) on {args.dataset} "
              f"({len(data.train)} train / {len(data.test)} test), {hvd.size()} ranks, "
              f"compression: {compression!r}", flush=True)

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
                loss = F.cross_entropy(model(x), y)
            if args.amp:
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
            step += 1
            if writer is not None:
                s = optimizer.comm_stats
                writer.add_scalar("train/loss", loss.item(), step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                writer.add_scalar("comm/bytes_sent", s.bytes_sent, step)
                writer.add_scalar("comm/bytes_received", s.bytes_received, step)
                writer.add_scalar("comm/dense_bytes", s.dense_bytes, step)
                writer.add_scalar("comm/density", s.density, step)
                writer.add_scalar("comm/compress_ms", s.compress_ms, step)
                writer.add_scalar("comm/wait_ms", s.wait_ms, step)
            if args.max_steps and step >= args.max_steps:
                break
        acc, test_loss = evaluate(model, test_loader)
        if args.checkpoint:
            hvd_topk.save_checkpoint(args.checkpoint, model, optimizer, epoch=epoch)
        if rank0:
            sent = optimizer.comm_stats
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  test loss {test_loss:.4f}  "
                  f"test acc {100 * acc:.2f}%  sent/step {sent.bytes_sent / 1e3:.1f} KB "
                  f"({100 * sent.density:.2f}% of dense)  {time.time() - t_start:.1f}s", flush=True)
        if writer is not None:
            writer.add_scalar("test/accuracy", acc, step)
            writer.add_scalar("test/loss", test_loss, step)
        if args.max_steps and step >= args.max_steps:
            break
    if writer is not None:
        writer.close()
    if rank0:
        print(f"final test accuracy: {100 * acc:.2f}%", flush=True)
    return acc


if __name__ == "__main__":
    main(parse_args())

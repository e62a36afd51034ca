"""Data-parallel training of a small character-level Transformer LM with Horovod and hvd_topk.

Offline: the text is CPython's pydoc topic pages (``--corpus pydoc``) or its standard
library's code (``--corpus stdlib``; examples/data.py ``load_text``), the model a causal
pre-LayerNorm Transformer (``--model transformer``, examples/models.py ``CharTransformer``) or a
GPT-2 or Llama of the same size built by Hugging Face ``transformers`` from a config
(``--model gpt2|llama``). For comparing dense AdamW/SGD with Top-K compression
(``scripts/bench_convergence.py --task lm``, ``scripts/bench_lm.py``).

Launch (2 ranks on this machine)::

    horovodrun -np 2 -H localhost:2 --gloo python examples/train_lm.py --topk 0.01
    horovodrun -np 2 -H localhost:2 --gloo python examples/train_lm.py --topk 0    # dense AdamW
    horovodrun -np 2 -H localhost:2 --gloo python examples/train_lm.py --topk 0.001 \\
        --optimizer sgd
    horovodrun -np 2 -H localhost:2 --gloo python examples/train_lm.py --topk 0.01 \\
        --adam-correction off --steps 400
    horovodrun -np 2 -H localhost:2 --gloo python examples/train_lm.py --topk 0.01 \\
        --clip-grad-norm 1.0    # each rank's gradient clipped before Top-K (clip_grad_norm=)
    torchrun --nproc-per-node 2 examples/train_lm.py --engine ddp --topk 0.01   # the DDP hook
    torchrun --nproc-per-node 2 examples/train_lm.py --engine ddp --topk 0      # DDP's allreduce

Every step each rank draws ``--batch-size`` random windows of the training text (its own
generator, seeded with ``(--seed, rank)``); the model is initialised from ``--seed`` and
broadcast from rank 0. The learning rate warms up linearly over ``--warmup-lr-steps``, then
follows a cosine down to 10% of ``--lr`` at the last step. Every ``--eval-every`` steps and at
the end, rank 0 evaluates its model on a fixed validation set (20 batches of 64 windows drawn
with seed 1234) and prints a line a script can parse::

    step 100 train_loss 2.4712 val_loss 2.2925 lr 2.95e-03 sent/step 12.3 KB (4.72% of dense) \\
        total_sent 1.23 MB 14.2s
    ...
    final val_loss 1.9876

``sent/step``, the share of dense and ``total_sent`` are this rank's counts since the start
(``optimizer.comm_totals``), Top-K warm-up steps included.

The SGD default ``--lr`` (1.0, momentum 0.9) is the best of a sweep of dense SGD over lr 0.3,
1.0 and 3.0 at 200 steps (seed 0, 2 ranks, the default model, batch and warm-up + cosine
schedule): final validation loss 2.2508, 2.0636 and NaN (diverged) nats/char.

Only wiring lives here; hvd_topk does the work. Rank 0 alone prints.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

try:
    import horovod.torch as hvd
except ImportError:  # --engine ddp needs no Horovod
    hvd = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import CORPORA, load_text, sample_windows  # noqa: E402
from models import LM_FAMILIES, build_lm  # noqa: E402
from train import add_compression_flags, make_compression, pick_device, topk_settings  # noqa: E402

import hvd_topk  # noqa: E402
import hvd_topk.ddp  # noqa: E402

ADAM_LR = 3e-3
SGD_LR = 1.0  # see the module docstring
ADAMW_WEIGHT_DECAY = 0.1
VAL_BATCHES, VAL_BATCH_SIZE, VAL_SEED = 20, 64, 1234


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_compression_flags(p)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"],
                   help="wrapped optimizer")
    p.add_argument("--engine", default="horovod", choices=["horovod", "ddp"],
                   help="horovod: hvd_topk.DistributedOptimizer; ddp: DistributedDataParallel with the "
                        "hvd_topk.ddp hook (Adam correction paired with the optimizer), under torchrun")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default: {ADAM_LR} for adam/adamw, {SGD_LR} for sgd)")
    p.add_argument("--weight-decay", type=float, default=None,
                   help=f"on weight matrices and embeddings (default: {ADAMW_WEIGHT_DECAY} for adamw, "
                        "0 otherwise)")
    p.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.99], help="Adam/AdamW betas")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--warmup-lr-steps", type=int, default=40,
                   help="linear learning-rate warm-up, then cosine decay to 10%% of --lr")
    p.add_argument("--model", default="transformer", choices=LM_FAMILIES,
                   help="transformer: examples/models.py CharTransformer; gpt2 / llama: built by "
                        "Hugging Face transformers from a config of the same size (a bench dependency)")
    p.add_argument("--corpus", default="pydoc", choices=sorted(CORPORA),
                   help="pydoc: English prose (pydoc topics); stdlib: Python code (the standard library)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per rank and step")
    p.add_argument("--context", type=int, default=64, help="characters per sequence")
    p.add_argument("--d-model", type=int, default=96, help="embedding width")
    p.add_argument("--layers", type=int, default=2, help="Transformer blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--eval-every", type=int, default=100, help="validate every N steps (and at the end)")
    p.add_argument("--clip-grad-norm", type=float, default=0.0,
                   help="clip gradients to this total norm (0: off): with --topk, each rank's gradient "
                        "before compression (hvd_topk's clip_grad_norm=); dense, the averaged gradient "
                        "after optimizer.synchronize(), as the Hugging Face Trainer does")
    p.add_argument("--clip-after-synchronize", action="store_true",
                   help="with --topk, clip p.grad after optimizer.synchronize() instead (the dense habit: "
                        "with Adam or momentum correction it clips corrected updates, not gradients)")
    p.add_argument("--seed", type=int, default=0, help="model init and (with the rank) the batches")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: this rank's GPU (local rank) when CUDA is available, else cpu")
    args = p.parse_args(argv)
    if args.topk < 0 or args.topk > 1:
        p.error(f"--topk must be in [0, 1], got {args.topk}")
    if args.steps < 1 or args.eval_every < 1 or args.warmup_lr_steps < 0:
        p.error("--steps and --eval-every must be >= 1, --warmup-lr-steps >= 0")
    if args.lr is None:
        args.lr = SGD_LR if args.optimizer == "sgd" else ADAM_LR
    if args.weight_decay is None:
        args.weight_decay = ADAMW_WEIGHT_DECAY if args.optimizer == "adamw" else 0.0
    if args.engine == "ddp" and args.topk > 0 and (args.clip_grad_norm > 0 or args.optimizer == "sgd"):
        p.error("--engine ddp with --topk: AdamW/Adam without --clip-grad-norm (the hook's output of a "
                "corrected tensor is an update, not a gradient to clip)")
    return args


def make_optimizer(args, model):
    """The base optimizer; weight decay on matrices and embeddings only (nanoGPT's split)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum)
    cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=args.lr, betas=tuple(args.betas))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of --lr for 0-based ``step``: linear warm-up to 1, then cosine to 0.1 at the last."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - 1 - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model, batches) -> float:
    """Mean cross-entropy (nats/char) over ``batches`` of (x, y)."""
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


class Horovod:
    """``hvd_topk.DistributedOptimizer`` over Horovod."""

    def __init__(self, args, model, device):
        self.net = model
        compression = make_compression(args)
        self.clip_in_optimizer = args.clip_grad_norm > 0 and args.topk > 0 and not args.clip_after_synchronize
        self.optimizer = hvd_topk.DistributedOptimizer(
            make_optimizer(args, model), named_parameters=model.named_parameters(), compression=compression,
            log_every=0, clip_grad_norm=args.clip_grad_norm if self.clip_in_optimizer else None)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        self.what = f"{hvd.size()} ranks, compression: " + (
            "none (dense allreduce)" if args.topk == 0 else repr(compression))

    def sent(self) -> str:
        return sent_line(self.optimizer.comm_totals)


class DDP:
    """``DistributedDataParallel`` (Gloo on CPU, NCCL on CUDA), with the ``hvd_topk.ddp`` hook
    for ``--topk``; with Adam/AdamW, Adam correction pairs the hook with the optimizer."""

    clip_in_optimizer = False

    def __init__(self, args, model, device):
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.optimizer = make_optimizer(args, model)
        self.net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        self.what = f"{dist.get_world_size()} ranks, DDP allreduce"
        if args.topk > 0:
            state = hvd_topk.ddp.TopKState(model, optimizer=self.optimizer, **topk_settings(args))
            self.net.register_comm_hook(state, hvd_topk.ddp.topk_hook)
            self.what = (f"{dist.get_world_size()} ranks, DDP hvd_topk.ddp.topk_hook ratio {args.topk}, "
                         f"Adam correction {'on' if state.adam else 'off'}")
            self.state = state
        else:
            self.state = None

    def sent(self) -> str:
        return "" if self.state is None else sent_line(self.state.comm_totals)


def sent_line(totals) -> str:
    """This rank's bytes since the start (a ``CommStats`` of either engine)."""
    return (f"sent/step {totals.bytes_sent / max(1, totals.steps) / 1e3:.1f} KB "
            f"({100 * totals.density:.2f}% of dense) total_sent {totals.bytes_sent / 1e6:.2f} MB")


def main(args):
    torch.set_num_threads(args.threads)
    if args.engine == "horovod":
        if hvd is None:
            raise SystemExit("--engine horovod needs Horovod; --engine ddp does not")
        hvd.init()
    rank = int(os.environ.get("RANK", 0)) if args.engine == "ddp" else hvd.rank()
    device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", 0)) if args.engine == "ddp" else None)
    text = load_text(args.corpus)
    torch.manual_seed(args.seed)
    model = build_lm(args.model, len(text.vocab), args.d_model, args.layers, args.heads,
                     args.context).to(device)
    engine = (DDP if args.engine == "ddp" else Horovod)(args, model, device)
    rank0 = rank == 0
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    optimizer, net = engine.optimizer, engine.net
    # Each rank its own stream of windows; the factor keeps (seed, rank) pairs apart.
    batch_gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rank)
    val_batches = []
    if rank0:
        g = torch.Generator().manual_seed(VAL_SEED)
        val_batches = [tuple(t.to(device) for t in sample_windows(text.val, VAL_BATCH_SIZE,
                                                                  args.context, g))
                       for _ in range(VAL_BATCHES)]
    clip_in_optimizer = engine.clip_in_optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup_lr_steps, args.steps))
    if rank0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.model} ({n_params / 1e6:.3f}M params, vocab {len(text.vocab)}) on {args.corpus}: "
              f"{len(text.train)} train / {len(text.val)} val chars, "
              f"{args.optimizer} lr {args.lr:g} wd {args.weight_decay:g}, {engine.what}", flush=True)

    t_start, loss_sum, loss_n, val_loss = time.time(), 0.0, 0, float("nan")
    for step in range(1, args.steps + 1):
        x, y = (t.to(device) for t in sample_windows(text.train, args.batch_size, args.context,
                                                     batch_gen))
        lr = optimizer.param_groups[0]["lr"]  # this step's (the scheduler moves it after)
        optimizer.zero_grad()
        loss = F.cross_entropy(net(x).flatten(0, 1), y.flatten())  # (B * T, vocab) vs (B * T,)
        loss.backward()
        if args.clip_grad_norm > 0 and not clip_in_optimizer and args.engine == "ddp":
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)  # dense DDP
            optimizer.step()
        elif args.clip_grad_norm > 0 and not clip_in_optimizer:
            optimizer.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            with optimizer.skip_synchronize():
                optimizer.step()
        else:
            optimizer.step()
        scheduler.step()
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        if rank0 and (step % args.eval_every == 0 or step == args.steps):
            val_loss = evaluate(model, val_batches)
            print(f"step {step} train_loss {loss_sum / loss_n:.4f} val_loss {val_loss:.4f} "
                  f"lr {lr:.2e} {engine.sent()} {time.time() - t_start:.1f}s", flush=True)
            loss_sum, loss_n = 0.0, 0
    if rank0:
        print(f"final val_loss {val_loss:.4f}", flush=True)
    return val_loss


if __name__ == "__main__":
    main(parse_args())

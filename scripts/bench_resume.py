"""Resuming from ``optimizer.state_dict()``: each recipe against an uninterrupted run.

The Transformer LM of ``examples/train_lm.py`` (its flags and defaults; Top-K 1% unless
``--topk`` says otherwise) trains ``--before`` steps; each rank saves
``{"model", "opt", "sched"}`` with its own ``optimizer.state_dict()``. Then, from that point,
``--after`` more steps (the same batches) for each way of resuming:

- ``uninterrupted``: the run goes on;
- ``own files``: each rank loads its own file (bit-identical to uninterrupted);
- ``rank 0's file``: every rank loads rank 0's file (Horovod's examples): every rank starts
  from rank 0's residuals, velocities and Adam moments;
- ``broadcast``: rank 0 loads its file, then ``hvd.broadcast_parameters`` and
  ``hvd.broadcast_optimizer_state``: the same state as the line above;
- ``hvd_topk state dropped``: the model and the wrapped optimizer's state only (what a
  ``state_dict()`` without hvd_topk's state resumes): residuals, velocities, Adam moments and
  the warm-up start again from zero.

Rank 0 prints the validation loss (``examples/train_lm.py``'s fixed validation set) after the
``--after`` steps, and its difference from the uninterrupted run::

    horovodrun -np 2 -H localhost:2 --gloo python scripts/bench_resume.py --optimizer adamw
    horovodrun -np 2 -H localhost:2 --gloo python scripts/bench_resume.py --optimizer sgd
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

import horovod.torch as hvd
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import train_lm  # noqa: E402
from data import load_text, sample_windows  # noqa: E402
from models import CharTransformer  # noqa: E402
from train import make_compression  # noqa: E402

import hvd_topk  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--before", type=int, default=150, help="steps before the checkpoint")
    p.add_argument("--after", type=int, default=150, help="steps after it")
    p.add_argument("--dir", default=None, help="where the ranks write their files (default: a temp dir)")
    ours, rest = p.parse_known_args(argv)
    lm = train_lm.parse_args(rest + ["--steps", str(ours.before + ours.after)]
                             + ([] if "--topk" in rest else ["--topk", "0.01"]))
    return ours, lm


class Run:
    """One model, optimizer, scheduler and batch stream, as examples/train_lm.py builds them."""

    def __init__(self, lm, text):
        torch.manual_seed(lm.seed)
        self.lm = lm
        self.text = text
        self.model = CharTransformer(len(text.vocab), lm.d_model, lm.layers, lm.heads, lm.context)
        self.opt = hvd_topk.DistributedOptimizer(train_lm.make_optimizer(lm, self.model),
                                                 named_parameters=self.model.named_parameters(),
                                                 compression=make_compression(lm), log_every=0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: train_lm.lr_factor(s, lm.warmup_lr_steps, lm.steps))
        self.gen = torch.Generator().manual_seed(lm.seed * 1_000_003 + hvd.rank())

    def train(self, steps):
        for _ in range(steps):
            x, y = sample_windows(self.text.train, self.lm.batch_size, self.lm.context, self.gen)
            self.opt.zero_grad()
            F.cross_entropy(self.model(x).flatten(0, 1), y.flatten()).backward()
            self.opt.step()
            self.sched.step()

    def save(self, path):
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                    "sched": self.sched.state_dict(), "gen": self.gen.get_state()}, path)

    def load(self, saved, topk=True):
        self.model.load_state_dict(saved["model"])
        opt = saved["opt"]
        if not topk:
            opt, _ = hvd_topk.checkpoint.split_topk_state(opt)
        self.opt.load_state_dict(opt)
        self.sched.load_state_dict(saved["sched"])
        self.gen.set_state(saved["gen"])


def main(ours, lm):
    hvd.init()
    torch.set_num_threads(lm.threads)
    logging.basicConfig(level=logging.INFO if hvd.rank() == 0 else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    text = load_text()
    g = torch.Generator().manual_seed(train_lm.VAL_SEED)
    val = [sample_windows(text.val, train_lm.VAL_BATCH_SIZE, lm.context, g)
           for _ in range(train_lm.VAL_BATCHES)]
    folder = ours.dir or tempfile.mkdtemp(prefix="hvd_topk_resume.")
    folder = hvd.broadcast_object(folder, root_rank=0, name="bench_resume.dir")
    own = os.path.join(folder, f"rank{hvd.rank()}.pt")
    rank0 = os.path.join(folder, "rank0.pt")

    base = Run(lm, text)
    hvd.broadcast_parameters(base.model.state_dict(), root_rank=0)
    base.train(ours.before)
    base.save(own)
    hvd.barrier()
    base.train(ours.after)
    losses = {"uninterrupted": train_lm.evaluate(base.model, val)}

    def resume(name, path, topk=True, broadcast=False):
        run = Run(lm, text)
        saved = torch.load(path, weights_only=True)
        if broadcast:
            if hvd.rank() == 0:
                run.load(saved)
            else:
                run.gen.set_state(saved["gen"])  # this rank's batches (its own file)
            hvd.broadcast_parameters(run.model.state_dict(), root_rank=0)
            hvd.broadcast_optimizer_state(run.opt, root_rank=0)
            run.sched.load_state_dict(hvd.broadcast_object(run.sched.state_dict(), root_rank=0,
                                                           name="bench_resume.sched"))
        else:
            run.load(saved, topk=topk)
            if path == rank0:
                run.gen.set_state(torch.load(own, weights_only=True)["gen"])  # this rank's batches
        run.train(ours.after)
        losses[name] = train_lm.evaluate(run.model, val)

    resume("own files", own)
    resume("rank 0's file", rank0)
    resume("broadcast", own, broadcast=True)
    resume("hvd_topk state dropped", own, topk=False)
    if hvd.rank() == 0:
        ref = losses["uninterrupted"]
        print(f"{lm.optimizer}, Top-K {lm.topk}, {hvd.size()} ranks: {ours.before} steps, checkpoint, "
              f"{ours.after} more", flush=True)
        print("| resumed from | val loss | vs uninterrupted |\n|---|---|---|", flush=True)
        for name, loss in losses.items():
            print(f"| {name} | {loss:.4f} | {loss - ref:+.4f} |", flush=True)


if __name__ == "__main__":
    main(*parse_args())

"""Ranks of tests/test_ddp.py: a small MLP under ``DistributedDataParallel`` with the
``hvd_topk.ddp`` hook, on Gloo.

    torchrun --standalone --nproc-per-node 2 tests/workers/ddp_worker.py OUT SCENARIO...

Each scenario saves what the test compares to ``OUT/<scenario>_rank<r>.pt``; the test holds
the reference and the tolerances, the worker only trains and records.
"""

from __future__ import annotations

import copy
import faulthandler
import io
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import hvd_topk.ddp
import hvd_topk.ddp.hook
from hvd_topk._cpu_kernel import use_cpu_kernel
from sync_ops import SyncRecorder, recording  # tests/ is on the ranks' path (launch.worker_env)

MIN_NUMEL = 256  # the weights (2048, 3072, 480 entries) are sent sparse, the biases densely


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 48),
                               torch.nn.Tanh(), torch.nn.Linear(48, 10))


def wide() -> torch.nn.Module:
    """Two weights over the group size's floor (1 MiB): groups of their own, in one bucket."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 600), torch.nn.Tanh(), torch.nn.Linear(600, 600),
                               torch.nn.Tanh(), torch.nn.Linear(600, 600), torch.nn.Tanh(),
                               torch.nn.Linear(600, 10))


def batch(step: int, rank: int):
    """This rank's batch at ``step``: ``(x (8, 32), y (8, 10))``, different on every rank."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 32, generator=gen), torch.randn(8, 10, generator=gen)


def loss_of(model, x, y) -> torch.Tensor:
    return (model(x) - y).square().mean()


def wrap(model, state=None, bucket_cap_mb=0.01, hook=hvd_topk.ddp.topk_hook) -> DistributedDataParallel:
    # Buckets of ~10 KB: several per model, most holding a weight (sparse) and biases (dense).
    ddp = DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
    if state is not None:
        ddp.register_comm_hook(state, hook)
    return ddp


def grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def observed_step(model, replica, ddp, state, x, y) -> dict:
    """One step's backward, observed: the step's ratio, this rank's own gradient (from
    ``replica``, a copy without DDP), the residuals before and after, and what DDP leaves."""
    replica.load_state_dict(model.state_dict())
    local = torch.autograd.grad(loss_of(replica, x, y), list(replica.parameters()))
    record = {"ratio": state.current_ratio(),
              "grad_in": {n: g.clone() for (n, _), g in zip(model.named_parameters(), local)},
              "residual_before": {n: state.residual(n) for n, _ in model.named_parameters()}}
    ddp.zero_grad()
    loss_of(ddp, x, y).backward()
    record["grad_out"] = grads(model)
    record["residual_after"] = {n: state.residual(n) for n, _ in model.named_parameters()}
    return record


def observed_run(rank: int, budget=None, model_fn=mlp, bucket_cap_mb=0.01, **settings) -> dict:
    """Three observed steps (``observed_step``) of SGD with the hook under ``settings``; the
    byte counters and the state's sparse allreduce regions after them; the large gradients
    (over 1 MiB) of each bucket the hook saw. ``budget``: the in-flight budget instead of the
    default (0: each group's exchange is finished before the next group's selection)."""
    model = model_fn()
    replica = copy.deepcopy(model)
    state = hvd_topk.ddp.TopKState(model, ratio=0.05, min_numel=MIN_NUMEL, **settings)
    if budget is not None:
        state.in_flight.budget = budget
    large = []

    def hook(state, bucket):
        large.append(sum(g.numel() * g.element_size() > 1 << 20 for g in bucket.gradients()))
        return hvd_topk.ddp.topk_hook(state, bucket)

    ddp = wrap(model, state, bucket_cap_mb, hook)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    for step in range(3):
        steps.append(observed_step(model, replica, ddp, state, *batch(step, rank)))
        opt.step()
    return {"steps": steps, "steps_counted": state.steps, "comm_totals": state.comm_totals.as_dict(),
            "comm_stats": state.comm_stats.as_dict(), "regions": state.state_dict()["sparse_allreduce"],
            "large": large}


EXACT = {"warmup_steps": 2, "warmup_ratio": 0.25}
SAR = {"warmup_steps": 0, "exchange": "sparse_allreduce", "density_aware": False, "region_refresh": 1000}


def exact(rank: int, world: int) -> dict:
    """Three steps through the warm-up (ratios 0.25, ~0.11, 0.05): each rank's own gradient
    and residual before the step (from a replica without DDP), and what DDP leaves."""
    return observed_run(rank, **EXACT)


def sar(rank: int, world: int) -> dict:
    """Three steps of the sparse allreduce (named, ratio 0.05, no warm-up, regions never
    refreshed: equal regions)."""
    return observed_run(rank, **SAR)


def exact_bounded(rank: int, world: int) -> dict:
    """``exact`` with an in-flight budget of 0: every bucket finished by the next one's hook."""
    return observed_run(rank, budget=0, **EXACT)


def sar_bounded(rank: int, world: int) -> dict:
    """``sar`` with an in-flight budget of 0."""
    return observed_run(rank, budget=0, **SAR)


def groups(rank: int, world: int) -> dict:
    """``exact`` on ``wide()`` in DDP's default buckets: a bucket of several groups."""
    return observed_run(rank, model_fn=wide, bucket_cap_mb=25, **EXACT)


def groups_bounded(rank: int, world: int) -> dict:
    """``groups`` with an in-flight budget of 0: a bucket's groups finished one by one."""
    return observed_run(rank, budget=0, model_fn=wide, bucket_cap_mb=25, **EXACT)


def ratio_one(rank: int, world: int) -> dict:
    """Ratio 1 (every entry sent, density_aware off so the sparse path runs) against DDP's
    default allreduce, from the same parameters at every step."""
    hooked = mlp()
    state = hvd_topk.ddp.TopKState(hooked, ratio=1.0, min_numel=MIN_NUMEL, warmup_steps=0,
                                   density_aware=False)
    return {"pairs": against_default(hooked, mlp(), state, rank)}


def against_default(hooked, plain, state, rank: int, bucket_cap_mb=0.01) -> list:
    """Three steps of ``hooked`` under the hook with ``state`` and of ``plain`` under DDP's
    default allreduce, from ``plain``'s parameters at every step (SGD on ``plain``): each
    step's ``(hooked's gradients, plain's)``."""
    ddp_hooked, ddp_plain = wrap(hooked, state, bucket_cap_mb), wrap(plain, bucket_cap_mb=bucket_cap_mb)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    pairs = []
    for step in range(3):
        x, y = batch(step, rank)
        with torch.no_grad():
            for p, q in zip(hooked.parameters(), plain.parameters()):
                p.copy_(q)
        for ddp in (ddp_hooked, ddp_plain):
            ddp.zero_grad()
            loss_of(ddp, x, y).backward()
        pairs.append((grads(hooked), grads(plain)))
        opt.step()
    return pairs


def dense_large(rank: int, world: int) -> dict:
    """``wide()`` with every gradient allreduced densely (``min_numel`` above them all; the
    weights, over 1 MiB, reduced where they lie in the bucket, the rest joined) under
    momentum correction, against DDP's default allreduce from the same parameters."""
    hooked = wide()
    state = hvd_topk.ddp.TopKState(hooked, ratio=0.01, min_numel=1 << 30, momentum=0.9, nesterov=True)
    pairs = against_default(hooked, wide(), state, rank, bucket_cap_mb=25)
    return {"pairs": pairs, "dense_bytes": state.comm_totals.as_dict()["dense_bytes"]}


def train(state_kwargs: dict, steps: int, rank: int, checkpoint_at=None) -> dict:
    """``steps`` steps of SGD without momentum (the hook's momentum correction stands in for
    it); with ``checkpoint_at``, everything is saved there and restored into fresh objects."""
    model = mlp()
    state = hvd_topk.ddp.TopKState(model, **state_kwargs)
    ddp = wrap(model, state)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        if step == checkpoint_at:
            blob = io.BytesIO()
            saved = {"model": model.state_dict(), "opt": opt.state_dict(), "topk": state.state_dict()}
            torch.save(saved, blob)
            blob.seek(0)
            saved = torch.load(blob, weights_only=True)
            model = mlp()
            model.load_state_dict(saved["model"])
            state = hvd_topk.ddp.TopKState(model, **state_kwargs)
            state.load_state_dict(saved["topk"])
            ddp = wrap(model, state)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            opt.load_state_dict(saved["opt"])
        x, y = batch(step, rank)
        opt.zero_grad()
        loss_of(ddp, x, y).backward()
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "residuals": {n: state.residual(n) for n, _ in model.named_parameters()}, "steps": state.steps}


def train_settings(world: int) -> dict:
    """Momentum correction, float16 values, a warm-up of 4 steps. At 3 ranks every tensor is
    sent sparse (``min_numel=0``): Gloo's allreduce of three ranks sums in an order that
    depends on the bucket's layout, which a fresh DDP builds differently in its first
    iteration, so densely reduced biases would differ by an ulp after a restore (as with
    plain DDP); the sparse path sums in rank order whatever the layout. A sum of two is
    exact in any order: at 2 ranks the biases stay dense."""
    return {"ratio": 0.05, "min_numel": MIN_NUMEL if world == 2 else 0, "warmup_steps": 4,
            "momentum": 0.9, "value_dtype": torch.float16}


def identical(rank: int, world: int) -> dict:
    """Six steps (``train_settings``): the parameters and residuals on every rank."""
    return train(train_settings(world), 6, rank)


def resume(rank: int, world: int) -> dict:
    """The same six steps, checkpointed and restored after three (mid warm-up)."""
    return train(train_settings(world), 6, rank, checkpoint_at=3)


SAR_SETTINGS = {"exchange": "sparse_allreduce", "density_aware": False, "region_refresh": 2}


def identical_sar(rank: int, world: int) -> dict:
    """``identical`` by the sparse allreduce, its regions refreshed every two steps."""
    return train({**train_settings(world), **SAR_SETTINGS}, 6, rank)


def resume_sar(rank: int, world: int) -> dict:
    """``resume`` by the sparse allreduce: the refreshed regions travel in the checkpoint."""
    return train({**train_settings(world), **SAR_SETTINGS}, 6, rank, checkpoint_at=3)


def nonfinite(rank: int, world: int) -> dict:
    """At step 1 the gradient of ``2.weight`` holds NaNs (column 3) on rank ``world - 1``:
    each rank's own gradient (a replica without DDP, NaNs left out), the residuals before
    and after, and what DDP leaves."""
    model = mlp()
    replica = copy.deepcopy(model)
    state = hvd_topk.ddp.TopKState(model, ratio=0.05, min_numel=MIN_NUMEL, warmup_steps=0)
    ddp = wrap(model, state)
    poisoned = rank == world - 1
    hook = model[2].weight.register_hook(
        lambda g: g.index_fill(1, torch.tensor([3]), float("nan")) if poisoned and state.steps == 1 else g)
    out = [observed_step(model, replica, ddp, state, *batch(step, rank)) for step in range(2)]
    hook.remove()
    return {"steps": out, "poisoned": poisoned}


def nonfinite_policy(rank: int, world: int) -> dict:
    """``nonfinite="raise"`` and ``"skip"`` with AdamW (Adam correction paired): at step 1 the
    gradient of ``2.weight`` holds NaNs on rank ``world - 1``. Per policy and step: whether
    ``optimizer.step()`` raised, whether the parameters moved, and the skipped steps."""
    out = {}
    for policy in ("raise", "skip"):
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        state = hvd_topk.ddp.TopKState(model, ratio=0.05, min_numel=MIN_NUMEL, warmup_steps=0, optimizer=opt,
                                       nonfinite=policy)
        ddp = wrap(model, state)
        def poison(g, state=state, poisoned=rank == world - 1):
            return g.index_fill(1, torch.tensor([3]), float("nan")) if poisoned and state.steps == 1 else g

        hook = model[2].weight.register_hook(poison)
        steps = []
        for step in range(3):
            before = [p.detach().clone() for p in model.parameters()]
            opt.zero_grad()
            loss_of(ddp, *batch(step, rank)).backward()
            try:
                opt.step()
                raised = None
            except FloatingPointError as e:
                raised = str(e)
            moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
            finite = all(bool(p.isfinite().all()) for p in model.parameters())
            steps.append({"raised": raised, "moved": moved, "finite": finite})
        hook.remove()
        out[policy] = {"steps": steps, "skipped": state.skipped_steps}
    return out


def disagree(rank: int, world: int) -> dict:
    """The last rank asks for another ratio: every rank's error."""
    try:
        hvd_topk.ddp.TopKState(mlp(), ratio=0.02 if rank == world - 1 else 0.01)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def adam(rank: int, world: int) -> dict:
    """Four steps of AdamW (decoupled weight decay; a scheduler halves ``lr`` every step) with
    Adam correction through the optimizer pairing, warm-up ratios 0.25 -> 0.05: each rank's own
    gradients (from a replica without DDP), the ratio and ``lr`` of each step, the parameters
    after it, and which params the optimizer kept state for."""
    model = mlp()
    replica = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    state = hvd_topk.ddp.TopKState(model, ratio=0.05, min_numel=MIN_NUMEL, warmup_steps=2, warmup_ratio=0.25,
                                   optimizer=opt)
    ddp = wrap(model, state)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    steps = []
    for step in range(4):
        x, y = batch(step, rank)
        replica.load_state_dict(model.state_dict())
        local = torch.autograd.grad(loss_of(replica, x, y), list(replica.parameters()))
        record = {"ratio": state.current_ratio(), "lr": opt.param_groups[0]["lr"],
                  "grad_in": {n: g.clone() for (n, _), g in zip(model.named_parameters(), local)}}
        opt.zero_grad()
        loss_of(ddp, x, y).backward()
        opt.step()
        sched.step()
        record["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        steps.append(record)
    return {"steps": steps, "opt_state": {n: bool(opt.state[p]) for n, p in model.named_parameters()},
            "initial": {n: p.detach().clone() for n, p in mlp().named_parameters()}}


def adam_clip(rank: int, world: int) -> dict:
    """AdamW with the Adam pairing, with and without ``gradient_as_bucket_view``: two plain
    steps, then ``clip_grad_norm_`` between ``backward()`` and ``step()`` (the loop users
    write), then a plain step again. The warnings each step raised."""
    out = {}
    for view in (False, True):
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        state = hvd_topk.ddp.TopKState(model, ratio=0.05, min_numel=MIN_NUMEL, warmup_steps=0, optimizer=opt)
        ddp = DistributedDataParallel(model, bucket_cap_mb=0.01, gradient_as_bucket_view=view)
        ddp.register_comm_hook(state, hvd_topk.ddp.topk_hook)
        seen = []
        for step in range(4):
            x, y = batch(step, rank)
            opt.zero_grad()
            loss_of(ddp, x, y).backward()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if step == 2:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            seen.append([str(w.message) for w in caught if "Adam correction" in str(w.message)])
        out[view] = seen
    return out


def no_sync(rank: int, world: int) -> dict:
    """The ops of the hook and of its callbacks that would force a host sync on CUDA, on the
    torch path (the CPU kernel off), at the warm-up's ratio and after it, by the allgather
    and by the sparse allreduce. The callbacks run on Gloo's threads, and a dispatch mode
    records one thread only: each gets its own."""
    found = []

    def recorded(fn):
        def run(*args):
            with SyncRecorder() as rec:
                fn(*args)
            found.extend(rec.syncs)
        return run

    receivers = {name: getattr(hvd_topk.ddp.hook, name)
                 for name in ("_receive_allgather", "_receive_sparse_allreduce", "_receive_dense")}
    for name, fn in receivers.items():
        setattr(hvd_topk.ddp.hook, name, recorded(fn))
    try:
        for exchange in ("auto", "sparse_allreduce"):
            model = mlp()
            state = hvd_topk.ddp.TopKState(model, ratio=0.01, min_numel=MIN_NUMEL, warmup_steps=1,
                                           momentum=0.9, exchange=exchange)
            ddp = wrap(model, state)
            with use_cpu_kernel(False):
                for step in range(3):
                    x, y = batch(step, rank)
                    with recording() as rec:
                        loss_of(ddp, x, y).backward()
                    found.extend(rec.syncs)
            assert state.comm_totals.sparse_tensors > 0
    finally:
        for name, fn in receivers.items():
            setattr(hvd_topk.ddp.hook, name, fn)
    return {"syncs": [(op, where) for op, where in found if where != "outside hvd_topk"]}


SCENARIOS = {f.__name__: f for f in (exact, sar, exact_bounded, sar_bounded, groups, groups_bounded,
                                     ratio_one, dense_large, identical, resume,
                                     identical_sar, resume_sar,
                                     nonfinite, nonfinite_policy, disagree, adam, adam_clip, no_sync)}


def main(out: Path, names) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for name in names:
        result = SCENARIOS[name](rank, world)
        torch.save(result, out / f"{name}_rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's finalization. A Gloo work issued under a dispatch mode
    # (``no_sync``'s recorder) keeps that mode in its thread-local state; when a Gloo worker
    # thread drops the last reference to such a work while Python finalizes, its decref
    # cannot take the GIL and the thread's forced unwind calls std::terminate (core dumps:
    # ``ProcessGroupGloo::AsyncWork::~AsyncWork`` -> ``SafePyObject`` decref -> ``take_gil``
    # -> ``pthread_exit``, about one run in ten with three ranks). Everything is saved and
    # every rank has passed the last barrier by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    faulthandler.enable(all_threads=True)  # a rank that aborts shows where every thread was
    os.environ.setdefault("HVD_TOPK_LOG", "warning")
    main(Path(sys.argv[1]), sys.argv[2:])

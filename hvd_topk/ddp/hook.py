"""``topk_hook``: the DDP communication hook, a bucket at a time (``TopKState`` documents the
algorithm). The sparse gradients take the selection pipeline and an allgather of fixed-size
payloads; the rest take an allreduce; both are launched before either is waited for.

No ``from __future__ import annotations`` here: DDP checks the hook's annotations as objects
(``dist.GradBucket``, ``torch.futures.Future[torch.Tensor]``)."""

import math
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..exchange_core import scatter_add_
from ..packing import pack_header, unpack
from ..selection import select
from ..update import clip_local
from ..wire import to_wire
from .plan import BucketPlan
from .state import TopKState

__all__ = ["topk_hook"]


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Top-K with error feedback for one DDP bucket: ``ddp_model.register_comm_hook(state,
    topk_hook)``. Returns a future of the bucket's buffer holding the averaged gradient.

    Arguments:
        state: a ``TopKState`` (settings, residuals, the step).
        bucket: DDP's ``GradBucket``; its gradients are views of its buffer.
    """
    plan = state.begin_bucket(bucket)
    grads = bucket.gradients()
    for g in grads:
        state.counter.gradient(g)
    futures, finish = [], []
    if plan.layout is not None:
        gathered = _send_sparse(state, plan, grads, futures)
        finish.append(lambda: _receive_sparse(state, plan, grads, gathered))
    if plan.dense:
        summed, velocity = _send_dense(state, plan, grads, futures)
        finish.append(lambda: _receive_dense(state, plan, grads, summed, velocity))
    state.end_bucket(bucket)
    buffer = bucket.buffer()

    def done(_) -> torch.Tensor:
        for f in futures:
            f.value()  # a collective's error surfaces here, in DDP's wait
        for part in finish:
            part()
        return buffer

    fut = futures[0] if len(futures) == 1 else torch.futures.collect_all(futures)
    return fut.then(done)


def _send_sparse(state: TopKState, plan: BucketPlan, grads: Sequence[torch.Tensor],
                 futures: List[torch.futures.Future]) -> torch.Tensor:
    """Steps 2-4 for the bucket's sparse gradients: select, pack, start the allgather.
    Returns the ``(P * nbytes,)`` uint8 buffer the allgather fills."""
    layout = plan.layout
    t0 = time.perf_counter()
    g = torch.cat([grads[i].reshape(-1) for i in plan.sparse])  # (n,)
    residual, velocity = state.buffers(plan.sparse_names, layout.sizes, g, residual=True)
    clip = state.settings.local_clip_norm
    if clip is not None:  # DGC 3.3, to local_clip_norm / sqrt(P)
        g = clip_local(g, layout, 1.0, clip / math.sqrt(state.world_size))
    adam = state.adam
    moments = adam.moments(plan.sparse_names, layout, g) if adam and adam.covers(plan.sparse_names) else None
    chosen = select(residual, g, layout, velocity=velocity, momentum=state.momentum,
                    nesterov=state.nesterov, adam=moments, fused=clip is None, owned=True)  # 2.-3.
    header = chosen.bad.to(device=g.device, dtype=torch.int32)  # (S,) 1: not finite
    payload = pack_header(header, to_wire(chosen.values, plan.value_dtype),
                          chosen.positions.to(plan.index_dtype))  # (nbytes,) uint8
    state.commits.add(residual, velocity, chosen.positions, plan.value_dtype)
    gathered = payload.new_empty(state.world_size * payload.numel())  # (P * nbytes,)
    state.counter.add_ms("compress_ms", t0)
    work = _ALL_GATHER(gathered, payload, group=state.process_group, async_op=True)
    futures.append(work.get_future())
    state.counter.sparse((payload.numel(), gathered.numel(), (state.world_size - 1) * payload.numel()),
                         "allgather", len(plan.sparse))
    return gathered


def _receive_sparse(state: TopKState, plan: BucketPlan, grads: Sequence[torch.Tensor],
                    gathered: torch.Tensor) -> None:
    """Step 5: every rank's values divided by ``P`` and summed in rank order straight into the
    sparse gradients (views of the bucket's buffer); a tensor some rank flagged becomes NaN.
    One write per gradient entry (0, or NaN where flagged) and the ``P * K`` adds: no
    group-sized buffer, no copy back."""
    layout = plan.layout
    world = state.world_size
    headers, values, indices = unpack(gathered, layout.k, plan.value_dtype, plan.index_dtype, world,
                                      layout.segments)  # (P, S), (P, K), (P, K)
    bad = headers.ne(0).any(0)  # (S,) some rank's gradient was not finite
    dtype = grads[plan.sparse[0]].dtype
    fill = torch.zeros((), dtype=dtype, device=gathered.device).masked_fill(bad, float("nan"))  # (S,)
    # Divide the P * K values, not the result, and sum them in rank order: the same bits on
    # every rank (the Horovod path's scatter-add).
    values = values.to(dtype).div_(world)
    first = 0
    for s, (i, offset, n, k) in enumerate(zip(plan.sparse, layout.offsets, layout.sizes, layout.ks)):
        out = grads[i].view(-1)
        out.fill_(fill[s])  # 0, or NaN for a flagged tensor (NaN plus any value stays NaN)
        # This tensor's slots: group positions -> its own, clamped into it (never out of bounds).
        pos = indices[:, first:first + k].long().sub_(offset).clamp_(0, n - 1)  # (P, k)
        scatter_add_(out, pos.reshape(-1), values[:, first:first + k].reshape(-1))
        first += k
    state.commits.flag(bad.any())


def _send_dense(state: TopKState, plan: BucketPlan, grads: Sequence[torch.Tensor],
                futures: List[torch.futures.Future]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The dense gradients back to back, the start of their allreduce (a sum), and their
    velocity with momentum correction (taken here: the callbacks, on the collectives'
    threads, touch no shared state but tensors)."""
    flat = torch.cat([grads[i].reshape(-1) for i in plan.dense])  # (n_dense,)
    _, velocity = state.buffers(plan.dense_names, plan.dense_sizes, flat, residual=False)
    work = dist.all_reduce(flat, group=state.process_group, async_op=True)
    futures.append(work.get_future())
    for i in plan.dense:
        state.counter.dense(grads[i], state.world_size)
    return flat, velocity


def _receive_dense(state: TopKState, plan: BucketPlan, grads: Sequence[torch.Tensor],
                   summed: torch.Tensor, velocity: Optional[torch.Tensor]) -> None:
    """The average into the dense gradients; with momentum correction, heavy-ball momentum
    of the average (what a momentum SGD would apply to them)."""
    avg = summed.div_(state.world_size)  # (n_dense,)
    state.commits.flag(~torch.isfinite(avg).all())
    if velocity is not None:
        velocity.mul_(state.momentum).add_(avg)
        avg = avg.add(velocity, alpha=state.momentum) if state.nesterov else velocity
    for i, part in zip(plan.dense, torch.split(avg, plan.dense_sizes)):
        grads[i].view(-1).copy_(part)


# ``all_gather_single`` where torch has it (``all_gather_into_tensor``, the same collective,
# warns there that it is deprecated), else ``all_gather_into_tensor``.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

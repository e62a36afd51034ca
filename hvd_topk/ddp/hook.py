"""``topk_hook``: the DDP communication hook, a bucket at a time (``TopKState`` documents the
algorithm). The sparse gradients take the selection pipeline and an allgather of fixed-size
payloads, or the sparse allreduce (an ``all_to_all_single`` to each region's owner, then an
allgather of what the owners keep); the rest take an allreduce; the allgathers and the
allreduce are launched before any is waited for.

No ``from __future__ import annotations`` here: DDP checks the hook's annotations as objects
(``dist.GradBucket``, ``torch.futures.Future[torch.Tensor]``)."""

import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..exchange_core import SCATTER_ENTRIES, scatter_add_, traffic
from ..headers import build_header, flagged_segments
from ..interface import SparseContext
from ..packing import Rows, pack_header
from ..positions import PositionSet
from ..selection import segment_views, select
from ..sparse_allreduce import was_kept
from ..update import clip_local, nonfinite_flag
from ..wire import to_wire
from .in_flight import ExchangeWork
from .plan import BucketPlan, SparseGroup
from .state import TopKState

__all__ = ["topk_hook", "scatter_gathered"]


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
    futures, works = [], []
    for group in plan.groups:
        state.in_flight.make_room()  # past the budget, the oldest exchanges are finished first
        send = _send_allgather if group.exchange == "allgather" else _send_sparse_allreduce
        started, buffers = [], []
        receive = send(state, group, grads, started, buffers)
        works.append(ExchangeWork(started, [receive], buffers[:1], buffers[1:]))
        futures += started
        state.in_flight.add(works[-1])  # past the budget, the older ones (this bucket's too) now
    if plan.dense:
        pieces = _send_dense(state, plan, grads, futures)
        receive = [lambda: _receive_dense(state, grads, pieces)]
        works.append(ExchangeWork(futures[-len(pieces):], receive, []))
    buffer = bucket.buffer()

    def done(_) -> torch.Tensor:
        for work in works:
            work.complete()  # a collective's error surfaces here, in DDP's wait
        return buffer

    fut = futures[0] if len(futures) == 1 else torch.futures.collect_all(futures)
    result = fut.then(done)
    state.end_bucket(bucket)
    return result


def _select(state: TopKState, group: SparseGroup, grads: Sequence[torch.Tensor]):
    """Steps 2-3 for a group: ``(chosen, residual, velocity)`` (``selection.Selection``, the
    group's buffers)."""
    layout = group.layout
    # A lone gradient is read where it lies in the bucket (no copy of the group); several are
    # joined into a buffer of the group's own, which step 1 may then overwrite.
    owned = len(group.members) > 1
    g = (torch.cat([grads[i].reshape(-1) for i in group.members]) if owned
         else grads[group.members[0]].reshape(-1))  # (n,)
    residual, velocity = state.buffers(group.names, layout.sizes, g, residual=True)
    clip = state.settings.local_clip_norm
    if clip is not None:  # DGC 3.3, to local_clip_norm / sqrt(P)
        g, owned = clip_local(g, layout, 1.0, clip / math.sqrt(state.world_size)), True
    adam = state.adam
    moments = adam.moments(group.names, layout, g) if adam and adam.covers(group.names) else None
    chosen = select(residual, g, layout, velocity=velocity, momentum=state.momentum,
                    nesterov=state.nesterov, adam=moments, fused=clip is None, owned=owned)
    return chosen, residual, velocity


def _send_allgather(state: TopKState, group: SparseGroup, grads: Sequence[torch.Tensor],
                    futures: List[torch.futures.Future], buffers: List[torch.Tensor]) -> Callable[[], None]:
    """Steps 2-4 by the allgather: select, pack ``[header | K values | K positions]`` (the
    Horovod path's header: signature and flags, ``headers.build_header``), start the
    allgather. Returns step 5, to run once it is done."""
    t0 = time.perf_counter()
    chosen, residual, velocity = _select(state, group, grads)
    ctx = _context(state, group, grads, "allgather")
    signature = state.signatures.get(ctx, chosen.positions.device)
    header = build_header(ctx, signature, chosen.bad, chosen.inexact).to(chosen.positions.device)
    payload = pack_header(header, to_wire(chosen.values, group.value_dtype),
                          chosen.positions.to(group.index_dtype))  # (nbytes,) uint8
    state.commits.add(residual, velocity, chosen.positions, group.value_dtype)
    gathered = payload.new_empty(state.world_size * payload.numel())  # (P * nbytes,)
    state.counter.add_ms("compress_ms", t0)
    work = _ALL_GATHER(gathered, payload, group=state.process_group, async_op=True)
    futures.append(work.get_future())
    buffers += [gathered, payload]  # what step 5 reads, then what was sent
    state.counter.sparse((payload.numel(), gathered.numel(), (state.world_size - 1) * payload.numel()),
                         "allgather", len(group.members))

    return lambda: _receive_allgather(state, ctx, group, grads, gathered, signature)


def _context(state: TopKState, group: SparseGroup, grads: Sequence[torch.Tensor], exchange: str,
             regions=None) -> SparseContext:
    """The group's ``SparseContext``: what its header's signature digests (shapes, dtype,
    ``k``'s, wire dtypes) and the header's layout."""
    world, shapes = state.world_size, tuple(grads[i].shape for i in group.members)
    return SparseContext(group.names, shapes, grads[group.members[0]].dtype, group.layout, group.value_dtype,
                         group.index_dtype, divisor=world, world=world, exchange=exchange, regions=regions)


def _send_sparse_allreduce(state: TopKState, group: SparseGroup, grads: Sequence[torch.Tensor],
                           futures: List[torch.futures.Future],
                           buffers: List[torch.Tensor]) -> Callable[[], None]:
    """Steps 2-4 by the sparse allreduce (``sparse_allreduce.py``, the Horovod path's own
    exchange): select, bucket by region, ``all_to_all_single`` to the owners -- waited for
    here, since the owner's step needs its rows --, the owner's sums, then start the
    allgather of the owners' rows. Returns step 5, to run once it is done: every owner's
    kept entries into the gradients; what no owner kept stays owed."""
    t0 = time.perf_counter()
    chosen, residual, velocity = _select(state, group, grads)
    world, sar = state.world_size, state.sparse_allreduce
    ctx = _context(state, group, grads, "sparse_allreduce", sar.plan(group.layout, world))
    sent = to_wire(chosen.values, group.value_dtype)
    signature = state.signatures.get(ctx, sent.device)
    ctx.sending(build_header(ctx, signature, chosen.bad, chosen.inexact).to(sent.device))
    rows, travels = sar.payload(ctx, chosen.positions, sent, signature)
    selection = state.commits.add(residual, velocity, chosen.positions, group.value_dtype)
    state.counter.add_ms("compress_ms", t0)
    received = torch.empty_like(rows)
    dist.all_to_all_single(received, rows, group=state.process_group)  # the owner's step needs it
    row = sar.reduce(received, ctx)  # (row2,) this rank's region: its kept sums
    gathered = row.new_empty(world * row.numel())
    work = _ALL_GATHER(gathered, row, group=state.process_group, async_op=True)
    futures.append(work.get_future())
    buffers += [gathered, row]
    state.counter.sparse(traffic("sparse_allreduce", group.layout.ks, world, group.value_dtype.itemsize,
                                 group.index_dtype.itemsize, ctx.regions.capacity),
                         "sparse_allreduce", len(group.members))
    step = state.steps
    return lambda: _receive_sparse_allreduce(state, group, grads, ctx, gathered, travels, selection, step)


def _receive_allgather(state: TopKState, ctx: SparseContext, group: SparseGroup,
                       grads: Sequence[torch.Tensor], gathered: torch.Tensor, signature: torch.Tensor
                       ) -> None:
    """Step 5 of the allgather: every rank's values divided by ``P`` and summed in rank order
    straight into the group's gradients (views of the bucket's buffer); a tensor some rank
    flagged, or every tensor of the group where some rank's signature differs from this
    rank's, becomes NaN (``scatter_gathered``), and nothing of the step leaves the residuals."""
    outs = [grads[i].view(-1) for i in group.members]
    bad = scatter_gathered(gathered, ctx, outs, state.world_size, signature)
    state.commits.flag(bad.any())


def scatter_gathered(gathered: torch.Tensor, ctx: SparseContext, outs: Sequence[torch.Tensor], world: int,
                     signature: Optional[torch.Tensor] = None, limit: int = SCATTER_ENTRIES) -> torch.Tensor:
    """Sum ``world`` gathered payloads of ``ctx``'s group into ``outs`` (its tensors, flat):
    each tensor is set to 0 (NaN where some rank flagged it, or everywhere if some rank's
    signature is not ``signature``), then every rank's values, divided by ``world``, are
    scatter-added at their positions, rank after rank. One write per entry and the ``P * K``
    adds: no group-sized buffer, no copy back. The same bits on every rank (the Horovod path's
    scatter-add), and the same bits for any ``limit``.

    The payloads are read ``limit`` entries at a time (``packing.Rows``): whole payloads of a
    few ranks while ``K <= limit``, else one rank's values and positions cut into slices of at
    most ``limit``. So what a receive copies, converts and widens stays near ``limit`` entries,
    however many ranks there are and however large the warm-up's ``K``; each tensor's entries
    still arrive in rank order.

    Arguments:
        gathered: ``(world * nbytes,)`` uint8, every rank's ``[header | K values | K positions]``.
        ctx: the group (its layout gives each tensor's ``k``, offset and size; its header's
            words and wire dtypes).
        outs: each tensor of the group, flat (the gradients themselves).
        world: ranks.
        signature: this rank's signature of the group (an int or a ``(1,)`` int32 tensor);
            ``None``: not compared.
        limit: entries read at once.

    Returns:
        ``(S,)`` bool: the tensors some rank flagged (not finite, or another signature).
        Raises ``ValueError`` when ``gathered`` is not ``world`` payloads of this group.
    """
    layout = ctx.layout
    pieces = [(s, first, min(limit, k - first))  # (segment, first slot in it, slots)
              for s, k in enumerate(layout.ks) for first in range(0, k, limit)]
    # packing.payload_spec with the values and the positions each cut into the pieces.
    spec = ([(ctx.header_words, torch.int32)] + [(w, ctx.value_dtype) for _, _, w in pieces]
            + [(w, ctx.index_dtype) for _, _, w in pieces])
    rows = Rows(gathered, world, spec)
    bad = flagged_segments(ctx, rows.part(0), signature)  # (S,)
    fill = torch.zeros((), dtype=outs[0].dtype, device=gathered.device).masked_fill(bad, float("nan"))  # (S,)
    for out, value in zip(outs, fill):
        out.fill_(value)  # 0, or NaN for a flagged tensor (NaN plus any value stays NaN)
    per = max(1, limit // max(layout.k, 1))  # ranks read at once: below `limit`, a piece is a whole tensor
    for first in range(0, world, per):
        for j, (s, _, _) in enumerate(pieces):
            out, offset, n = outs[s], layout.offsets[s], layout.sizes[s]
            values = rows.part(1 + j, first, first + per).to(out.dtype).div_(world)  # (p, w) fresh
            # Group positions -> the tensor's own, clamped into it (never out of bounds), in place.
            pos = rows.part(1 + len(pieces) + j, first, first + per).sub_(offset).clamp_(0, n - 1)  # (p, w)
            scatter_add_(out, pos.reshape(-1), values.reshape(-1))
    return bad


def _receive_sparse_allreduce(state: TopKState, group: SparseGroup, grads: Sequence[torch.Tensor],
                              ctx: SparseContext, gathered: torch.Tensor, travels: PositionSet,
                              selection, step: int) -> None:
    """Step 5 of the sparse allreduce: every owner's kept sums into the gradients (a tensor
    some rank flagged, or sent for another layout, becomes NaN); the selection learns which
    of its entries some owner kept (only those leave the residual at the commit). Where the
    group's gradients lie back to back in the bucket's buffer (one gradient, or several with
    no dense one between), the sums are scattered into them directly; else into a group-sized
    buffer, then copied: a gradient is a view of the buffer DDP reads back, so it cannot be
    made a view of another buffer, as the Horovod path's ``synchronize._write_back`` does."""
    out = _span(grads, group.members, ctx.dtype)
    if out is None:
        out = torch.empty(group.layout.numel, dtype=ctx.dtype, device=gathered.device)
    headers, kept = state.sparse_allreduce.receive(gathered, ctx, out, step)  # (P, words), (n,)
    pos, fits = travels.positions()
    selection.only(PositionSet(pos, group.layout.numel, valid=was_kept(pos, kept) & fits))
    bad = flagged_segments(ctx, headers)  # (S,)
    for i, part, flagged in zip(group.members, segment_views(out, group.layout), bad):
        part.masked_fill_(flagged, float("nan"))
        grad = grads[i].view(-1)
        if part.data_ptr() != grad.data_ptr():  # else it is the gradient itself
            grad.copy_(part)
    state.commits.flag(bad.any())


def _span(grads: Sequence[torch.Tensor], members: Sequence[int],
          dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The gradients ``members`` as one flat view of their storage, where they lie back to
    back in that order with ``dtype``; else None."""
    first = grads[members[0]]
    storage, n = first.untyped_storage().data_ptr(), 0
    for i in members:
        g = grads[i]
        if (g.dtype != dtype or not g.is_contiguous() or g.untyped_storage().data_ptr() != storage
                or g.storage_offset() != first.storage_offset() + n):
            return None
        n += g.numel()
    return first.as_strided((n,), (1,))  # from first's own storage offset


@dataclass
class _DensePiece:
    """Dense gradients of a bucket reduced by one allreduce: their bucket positions, the
    flat buffer summed (``in_place``: the gradient itself, a view of the bucket) and their
    velocity (momentum correction), or None."""
    members: Tuple[int, ...]
    summed: torch.Tensor
    in_place: bool
    velocity: Optional[torch.Tensor]


#: A dense gradient of at least this many bytes is allreduced where it lies in the bucket; the
#: smaller ones are joined into one buffer (one collective for them all).
_IN_PLACE_BYTES = 1 << 20


def _send_dense(state: TopKState, plan: BucketPlan, grads: Sequence[torch.Tensor],
                futures: List[torch.futures.Future]) -> List[_DensePiece]:
    """The dense gradients' allreduces (sums), started: a contiguous gradient of at least
    ``_IN_PLACE_BYTES`` is reduced where it lies in the bucket (``_span``; no copy: during the
    warm-up the large ones may be sent dense, most of the model), the others back to back in
    one buffer of their own. Returns the pieces, each with its velocity under momentum
    correction (taken here: the callbacks, on the collectives' threads, touch no shared state
    but tensors)."""
    spans = {i: _span(grads, (i,), grads[i].dtype) for i in plan.dense
             if grads[i].numel() * grads[i].element_size() >= _IN_PLACE_BYTES}
    parts = [((i,), span, True) for i, span in spans.items() if span is not None]
    joined = tuple(i for i in plan.dense if spans.get(i) is None)
    if joined:
        parts.append((joined, torch.cat([grads[i].reshape(-1) for i in joined]), False))  # (n,)
    pieces = []
    for members, summed, in_place in parts:
        _, velocity = state.buffers(tuple(plan.names[i] for i in members),
                                    tuple(plan.sizes[i] for i in members), summed, residual=False)
        pieces.append(_DensePiece(members, summed, in_place, velocity))
        work = dist.all_reduce(summed, group=state.process_group, async_op=True)
        futures.append(work.get_future())
    for i in plan.dense:
        state.counter.dense(grads[i], state.world_size)
    return pieces


def _receive_dense(state: TopKState, grads: Sequence[torch.Tensor], pieces: Sequence[_DensePiece]) -> None:
    """The average into the dense gradients; with momentum correction, heavy-ball momentum
    of the average (what a momentum SGD would apply to them)."""
    for piece in pieces:
        avg = piece.summed.div_(state.world_size)  # (n,)
        state.commits.flag(nonfinite_flag(avg))
        if piece.velocity is not None:
            piece.velocity.mul_(state.momentum).add_(avg)
            if state.nesterov:
                avg.add_(piece.velocity, alpha=state.momentum)
            else:
                avg.copy_(piece.velocity)
        if not piece.in_place:
            for i, part in zip(piece.members, torch.split(avg, [grads[i].numel() for i in piece.members])):
                grads[i].view(-1).copy_(part)


# ``all_gather_single`` where torch has it (``all_gather_into_tensor``, the same collective,
# warns there that it is deprecated), else ``all_gather_into_tensor``.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

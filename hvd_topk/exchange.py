"""The sparse exchange: allgather the packed payloads, scatter-add them into a dense gradient.

::

    rank r:  grad_r ──compress──► payload_r = [vals_r | idx_r]   (k entries, ~2k*4 bytes)
                                        │  allgather (Horovod; fused with other tensors)
    every rank:  [payload_0 | payload_1 | ... | payload_{P-1}]    (P * nbytes)
                                        │  divide the P*k values by P, scatter-add into zeros(n)
                     grad = Σ_r  scatter(vals_r / P at idx_r)

Only the payloads cross the wire; nothing dense-sized does. Every rank sums the same gathered
buffer in the same order, so every rank ends with bit-identical gradients.

The allgather's bytes per rank grow with the world size, ``(P-1) * k`` entries; the sparse
allreduce (``sparse_allreduce.py``: an alltoall to region owners, then an allgather of what
they keep) stays near ``3 k (P-1)/P``. ``traffic`` is the one byte model: ``comm_stats`` counts
by it, and the time model behind ``TopKCompressor(exchange="auto")`` (``cost.py``) charges its
bytes to the link.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from horovod.torch import mpi_ops

from .interface import SAME_MODEL, Exchange, RankMismatchError, SparseContext, header_words
from .packing import pack_header, payload_rows
from .layout import GroupLayout, index_dtype, num_selected
from .positions import PositionSet
from .settings import TopKSettings

__all__ = ["sparse_allgather_async", "sparse_alltoall_async", "scatter_add_", "exchange_bytes", "traffic",
           "ring_allreduce_bytes", "region_sizes", "cheapest_exchange", "gradient_costs",
           "AllgatherExchange", "local_indices", "EXCHANGES", "QUANTILES"]

#: The exchanges a gradient can take, cheapest first when the model ties.
EXCHANGES = ("dense", "allgather", "sparse_allreduce")
#: The sparse allreduce's load statistics per (owner, tensor), in its allgather row: the
#: demand, then QUANTILES - 1 inner quantiles (``sparse_allreduce.refresh_bounds``).
QUANTILES = 8


def region_sizes(k: int, world: int, capacity: float) -> Tuple[int, int]:
    """The sparse allreduce's ``(c, R)`` for a tensor sending ``k`` entries over ``world``
    ranks: at most ``c`` entries per (sender, region), and ``R`` entries kept per region
    (``P * R >= k``)."""
    if k == 0:
        return 0, 0
    c = min(k, math.ceil(capacity * k / world))
    return c, math.ceil(k / world)


def ring_allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes a ring allreduce of ``nbytes`` carries on each rank's link, each way:
    ``2 (P-1)/P * nbytes`` (0 for one rank)."""
    return math.ceil(2 * (world - 1) * nbytes / world) if world > 1 else 0


def traffic(exchange: str, ks: Sequence[int], world: int, value_bytes: int, index_bytes: int,
            capacity: float = 2.0) -> Tuple[int, int, int]:
    """The byte model, the wire's own: ``(sent, received, link)`` bytes of one rank for one
    group of tensors sending ``ks`` entries each over ``world`` ranks, ``link`` being what its
    link carries to other ranks (each way, for the symmetric collectives used here).

    - ``allgather``: one payload, header (``2`` int32 words, ``2 + S`` for a group of ``S``
      tensors) plus ``K`` values and indices; every rank receives all ``P``;
    - ``sparse_allreduce``: ``P`` alltoall rows of ``1 + S`` header words and ``C`` entries,
      then an allgather of each owner's row: header, ``R`` entries, ``S * QUANTILES`` load
      statistics (``sparse_allreduce.RegionPlan``).
    """
    entry, segments = value_bytes + index_bytes, len(ks)
    head = 4 * header_words(segments)
    if exchange == "sparse_allreduce":
        sizes = [region_sizes(k, world, capacity) for k in ks]
        row1 = 4 * (1 + segments) + sum(c for c, _ in sizes) * entry
        row2 = head + sum(r for _, r in sizes) * entry + segments * QUANTILES * index_bytes
        return (world - 1) * row1 + row2, (world - 1) * row1 + world * row2, (world - 1) * (row1 + row2)
    if exchange != "allgather":
        raise ValueError(f"no byte model for exchange {exchange!r}")
    payload = head + sum(ks) * entry
    return payload, world * payload, (world - 1) * payload


def exchange_bytes(numel: int, k: int, world: int, grad_bytes: int, value_bytes: int,
                   index_bytes: int, capacity: float = 2.0) -> dict:
    """Bytes each rank's link carries to exchange one gradient of ``numel`` entries, ``k`` of
    them selected, over ``world`` ranks, by each exchange -- the model behind
    ``TopKCompressor(exchange="auto")`` (``docs/performance/scaling.md`` measures it against
    real links): a ring allreduce's ``2 (P-1)/P * n * b_grad`` for ``dense``, ``traffic``'s
    ``link`` for the sparse ones. With one rank nothing is sent; the model is then evaluated
    for two, so that a single-rank run compresses as a small job would.
    """
    p = max(world, 2)
    costs = {"dense": ring_allreduce_bytes(numel * grad_bytes, p)}
    for name in EXCHANGES[1:]:
        costs[name] = traffic(name, (k,), p, value_bytes, index_bytes, capacity)[2]
    return costs


def cheapest_exchange(costs: dict, allowed) -> str:
    """The allowed exchange of fewest bytes in ``costs`` (ties: the earlier in ``EXCHANGES``)."""
    return min((e for e in EXCHANGES if e in allowed), key=lambda e: (costs[e], EXCHANGES.index(e)))


def gradient_costs(settings: TopKSettings, tensor: torch.Tensor, world: int, ratio: float) -> dict:
    """``exchange_bytes`` for one gradient at ``ratio`` under ``settings``."""
    n = tensor.numel()
    vdt = settings.value_dtype or tensor.dtype
    return exchange_bytes(n, num_selected(n, ratio), world, tensor.element_size(), vdt.itemsize,
                          index_dtype(n).itemsize, settings.region_capacity)


def sparse_allgather_async(payload: torch.Tensor, name: str,
                           process_set=mpi_ops.global_process_set) -> Callable[[], torch.Tensor]:
    """Start an allgather of ``payload`` and return a callable that waits for the result.

    A callable handle is what Horovod's own sparse path returns and what its
    ``DistributedOptimizer.synchronize()`` accepts.
    """
    handle = mpi_ops.allgather_async(payload, name=name, process_set=process_set)

    def wait() -> torch.Tensor:
        return mpi_ops.synchronize(handle)  # (world * nbytes,) uint8

    return wait


def sparse_alltoall_async(payload: torch.Tensor, rows: int, name: str,
                          process_set=mpi_ops.global_process_set) -> Callable[[], torch.Tensor]:
    """Start an alltoall of ``payload``, ``rows`` equal rows (row j to rank j), and return a
    callable that waits for the ``(rows * row_bytes,)`` received rows (row r from rank r).

    The splits are explicit, so that a rank whose rows have another size is received (and
    detected by ``sparse_allreduce.reduce_region``) instead of failing in Horovod. They are
    host numbers known before the step: nothing is read from the device.
    """
    splits = torch.full((rows,), payload.numel() // max(rows, 1), dtype=torch.int32)
    handle = mpi_ops.alltoall_async(payload, splits=splits, name=name, process_set=process_set)

    def wait() -> torch.Tensor:
        output, _received_splits = mpi_ops.synchronize(handle)
        return output

    return wait


def scatter_add_(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[indices[i]] += values[i]`` for all i, duplicates summed, deterministically.

    Arguments:
        out: ``(n,)`` dense buffer, modified in place.
        indices: ``(m,)`` int32/int64 indices (duplicates across ranks are expected).
        values: ``(m,)`` values, cast to ``out``'s dtype.
    """
    values = values.to(out.dtype)
    if out.device.type == "cpu":
        out.index_add_(0, indices, values)
    else:
        # CUDA index_add_ uses atomics (order varies between ranks); index_put_ with
        # accumulate=True sorts first, so every rank gets the same bits.
        out.index_put_((indices.long(),), values, accumulate=True)
    return out


def local_indices(sel: torch.Tensor, layout: GroupLayout, index_dtype: torch.dtype) -> torch.Tensor:
    """``(K,)`` each slot's index within its own tensor, in the wire's index dtype."""
    if layout.segments == 1:
        return sel.to(index_dtype)
    return (sel - layout.slot_tables(sel.device)["slot_start"]).to(index_dtype)


#: Gathered entries ``AllgatherExchange.receive`` copies out at once (at least one rank's).
_SCATTER_ENTRIES = 1 << 20


def _slot_bounds(layout: GroupLayout, device: torch.device,
                 dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(slot_start, slot_max)`` of each slot (0-dim for one segment), in the wire's index
    dtype where every group position fits it, so that positions are computed in place."""
    t = layout.slot_tables(device)
    if dtype != torch.int64 and layout.numel >= 2**31:
        dtype = torch.int64
    return t["slot_start"].to(dtype), t["slot_max"].to(dtype)


def _scatter_rows(out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  bounds: Tuple[torch.Tensor, torch.Tensor], ctx: SparseContext) -> None:
    """Scatter-add some ranks' ``(p, K)`` values at their ``(p, K)`` local indices into ``out``."""
    start, last = bounds
    # A rank that disagrees on the layout is caught by check(); clamp its indices into each
    # slot's own tensor so that the scatter never writes out of bounds.
    pos = indices.to(start.dtype).clamp_(min=0)  # (p, K), one buffer for the chain (in place)
    pos = torch.minimum(pos, last, out=pos).add_(start)
    vals = values.reshape(-1).to(ctx.dtype)  # (p * K,)
    if ctx.divisor != 1:
        # Divide the P * K gathered values, not the n-element result: every rank still
        # computes the same bits (same bytes, same order).
        vals = vals.div_(ctx.divisor)
    scatter_add_(out, pos.reshape(-1), vals)


class AllgatherExchange(Exchange):
    """Every rank's payload to every rank (Horovod's allgather, fused with other tensors), then
    each rank divides the ``P * K`` gathered values and scatter-adds them in rank order, so
    every rank ends with the same bits. A payload is ``[header | K values | K indices]``
    (``packing.py``); its bytes are ``traffic("allgather", ...)``. It keeps no state."""

    name = "allgather"

    def payload(self, ctx: SparseContext, sel: torch.Tensor, sent: torch.Tensor,
                signature: torch.Tensor) -> Tuple[torch.Tensor, Optional[PositionSet]]:
        return pack_header(ctx.header, sent, local_indices(sel, ctx.layout, ctx.index_dtype)), None

    @staticmethod
    def time(numel: int, ks: Sequence[int], world: int, value_bytes: int, index_bytes: int,
             capacity: float, model) -> float:
        """Its bytes over the link, fused with the step's other allgathers (no messages of its
        own), the selection, and the scatter-add of the ``P * K`` gathered entries."""
        link = traffic("allgather", ks, world, value_bytes, index_bytes, capacity)[2]
        return (link / model.bytes_per_s
                + 1e-9 * (model.select_ns * numel + model.scatter_ns * world * sum(ks)))

    def receive(self, gathered: torch.Tensor, ctx: SparseContext, out: torch.Tensor,
                step: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        try:
            rows = payload_rows(gathered, ctx.k, ctx.value_dtype, ctx.index_dtype, ctx.world,
                                ctx.header_words)
        except ValueError as e:
            raise RankMismatchError(f"parameter {ctx.name!r} ({ctx.describe()} on this rank): {e}. "
                                    + SAME_MODEL) from None
        out.zero_()
        if ctx.k:
            # A few ranks' entries at a time (rank order kept: the same bits), so that the
            # copies a scatter needs stay near one payload however many ranks there are.
            per = max(1, _SCATTER_ENTRIES // ctx.k)
            bounds = _slot_bounds(ctx.layout, gathered.device, rows.spec[2][1])
            for first in range(0, rows.rows, per):
                _scatter_rows(out, rows.part(1, first, first + per), rows.part(2, first, first + per),
                              bounds, ctx)
        return rows.part(0), None  # (P, header_words)

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        return None  # it keeps none

    def reset(self) -> None:
        return None  # nothing that ranks must agree on

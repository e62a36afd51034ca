"""The sparse exchange: allgather the packed payloads, scatter-add them into a dense gradient.

::

    rank r:  grad_r ──compress──► payload_r = [vals_r | idx_r]   (k entries, ~2k*4 bytes)
                                        │  allgather (Horovod; fused with other tensors)
    every rank:  [payload_0 | payload_1 | ... | payload_{P-1}]    (P * nbytes)
                                        │  divide the P*k values by P, scatter-add into zeros(n)
                     grad = Σ_r  scatter(vals_r / P at idx_r)

Only the payloads cross the wire; nothing dense-sized does. Every rank sums the same gathered
buffer in the same order, so every rank ends with bit-identical gradients.

The byte model, the scatter-add and the local indices are engine-independent
(``exchange_core.py``, shared with the DDP hook); the Horovod collectives are in
``collectives.py``. Both are re-exported here under their old names.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .collectives import sparse_allgather_async, sparse_alltoall_async
from .cost import allgather_time
from .exchange_core import (EXCHANGES, QUANTILES, SCATTER_ENTRIES, cheapest_exchange, exchange_bytes,
                            gradient_costs, local_indices, region_sizes, ring_allreduce_bytes, scatter_add_,
                            traffic)
from .interface import SAME_MODEL, Exchange, RankMismatchError, SparseContext
from .packing import pack_header, payload_rows
from .layout import GroupLayout
from .positions import PositionSet

__all__ = ["sparse_allgather_async", "sparse_alltoall_async", "scatter_add_", "exchange_bytes", "traffic",
           "ring_allreduce_bytes", "region_sizes", "cheapest_exchange", "gradient_costs",
           "AllgatherExchange", "local_indices", "EXCHANGES", "QUANTILES", "SPARSE_APPLY_DENSITY"]

#: A single tensor's scattered positions are kept (``SparseContext.scattered_at``) while the
#: ``P * K`` entries gathered are at most ``1 / SPARSE_APPLY_DENSITY`` of its entries, and a
#: corrected update is then applied at them alone. Denser, the positions touch most of the
#: tensor's cache lines anyway: on one CPU core, for 4.9M float32 entries, the dense apply took
#: 1.29 ms, the sparse one 1.28 ms at 2% of the entries, 0.47 at 1%, 0.13 at 0.2% (sorted
#: positions, medians of 11). The kept int64 positions weigh at most 2% of the gradient.
SPARSE_APPLY_DENSITY = 100



def _slot_bounds(layout: GroupLayout, device: torch.device,
                 dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(slot_start, slot_max)`` of each slot (0-dim for one segment), in the wire's index
    dtype where every group position fits it, so that positions are computed in place."""
    t = layout.slot_tables(device)
    if dtype != torch.int64 and layout.numel >= 2**31:
        dtype = torch.int64
    return t["slot_start"].to(dtype), t["slot_max"].to(dtype)


def _scatter_rows(out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                  bounds: Tuple[torch.Tensor, torch.Tensor], ctx: SparseContext) -> torch.Tensor:
    """Scatter-add some ranks' ``(p, K)`` values at their ``(p, K)`` local indices into ``out``;
    returns the ``(p * K,)`` positions written."""
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
    return pos.reshape(-1)


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
        own), the selection, and the scatter-add of the ``P * K`` gathered entries
        (``cost.allgather_time``)."""
        return allgather_time(numel, ks, world, value_bytes, index_bytes, capacity, model)

    def receive(self, gathered: torch.Tensor, ctx: SparseContext, out: torch.Tensor,
                step: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        try:
            rows = payload_rows(gathered, ctx.k, ctx.value_dtype, ctx.index_dtype, ctx.world,
                                ctx.header_words)
        except ValueError as e:
            raise RankMismatchError(f"parameter {ctx.name!r} ({ctx.describe()} on this rank): {e}. "
                                    + SAME_MODEL) from None
        out.zero_()
        # A single corrected update's positions are kept while they are few
        # (SPARSE_APPLY_DENSITY), for it to be applied there alone.
        keep = (ctx.corrected and ctx.layout.segments == 1
                and rows.rows * ctx.k * SPARSE_APPLY_DENSITY <= ctx.numel)
        touched = []
        if ctx.k:
            # A few ranks' entries at a time (rank order kept: the same bits), so that the
            # copies a scatter needs stay near one payload however many ranks there are.
            per = max(1, SCATTER_ENTRIES // ctx.k)
            bounds = _slot_bounds(ctx.layout, gathered.device, rows.spec[2][1])
            for first in range(0, rows.rows, per):
                pos = _scatter_rows(out, rows.part(1, first, first + per), rows.part(2, first, first + per),
                                    bounds, ctx)
                if keep:
                    touched.append(pos.long())  # int64 for the index ops (int32 positions: a copy)
        ctx.scattered_at((torch.cat(touched) if len(touched) > 1 else touched[0]) if touched else None)
        return rows.part(0), None  # (P, header_words)

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        return None  # it keeps none

    def reset(self) -> None:
        return None  # nothing that ranks must agree on

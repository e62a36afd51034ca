"""The sparse allreduce: a space-partitioned reduce-scatter (``alltoall``) and an ``allgather``
of Top-K entries, after Ok-Topk (Li & Hoefler, PPoPP'22), on Horovod's public collectives.

Each tensor's index space is cut into P *regions*, one per rank (its *owner*), balanced by load::

    rank r:   local top-k of its compensated gradient                      k entries
              bucket them by region; at most c = ceil(capacity * k / P) of the largest per
              region (the rest stay in r's residual, as if not selected)
       │ alltoall: row j (c entries + header) goes to rank j          (P-1) * row1 bytes/rank
    owner j:  sum every rank's entries of region j (in rank order; only j does), keep the
              R = ceil(k / P) largest sums of the region: the global selection; divide by P
       │ allgather of every owner's R entries + load statistics       (P-1) * row2 bytes/rank
    every rank: scatter the P * R entries (each index once) -> the same dense gradient, bit for
              bit (each sum was computed once, by its owner); what r sent that no owner kept
              goes back into r's residual: nothing is lost, only delayed.

Bytes per rank stay about ``(capacity + 1) * k * (P-1)/P`` entries whatever P is, against
``(P-1) * k`` for the allgather (``exchange.exchange_bytes``).

**The global selection** keeps the R largest sums of each region: exactly ``P * R >= k``
entries, the top-k of the summed sparse gradient when the regions hold equal shares of it.
The regions are balanced on the measured load: each owner reports, with its entries, how many
entries the ranks had for its region (*demand*, before the capacity cut) and ``QUANTILES - 1``
quantiles of the indices it received; every rank rebuilds the load's distribution over the
index space from those numbers and cuts it into P equal parts (``refresh_bounds``). Every rank
holds the same gathered numbers, so every rank computes the same regions, with no extra round;
they are refreshed every ``region_refresh`` steps (``TopKCompressor``). Balance is a matter of
bytes and of how close the selection is to the exact global top-k, never of correctness: a
tensor whose mass sits in one region still trains (the excess waits in the residuals).

The functions here are the pipeline's pure steps (device tensors in, device tensors out; no
host sync, fixed sizes from the ``RegionPlan``); ``TopKCompressor`` keeps the state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .cost import sparse_allreduce_time
from .exchange_core import QUANTILES, region_sizes, scatter_add_
from .packing import FLAG_MISMATCH, pack_rows, unpack_rows
from .interface import SAME_MODEL, Exchange, RankMismatchError, SparseContext
from .layout import StepTables
from .positions import bitmask, bits_at
from .regions import refresh_bounds, uniform_bounds
from .bit_topk import top_by_bits_in_blocks
from .selection import GroupLayout, PositionSet, expand_counts, magnitude, segment_order
from .state import GroupCache
from .wire import to_wire

__all__ = ["RegionPlan", "SparseAllreduceExchange", "uniform_bounds", "to_regions",
           "reduce_region", "finish", "was_kept", "refresh_bounds"]

@dataclass
class RegionPlan:
    """The fixed sizes of one group's sparse allreduce over ``world`` ranks (host numbers, built
    once per layout; index tensors cached per device).

    Arguments:
        layout: the group's segments and their ``k``.
        world: ranks, hence regions per segment.
        capacity: a sender's entries per region are at most ``ceil(capacity * k_s / P)``.
    """

    layout: GroupLayout
    world: int
    capacity: float
    caps: Tuple[int, ...] = field(init=False)  # c_s: slots per (sender, region) of segment s
    keeps: Tuple[int, ...] = field(init=False)  # R_s: entries each owner keeps of segment s
    _device: Dict[torch.device, Dict[str, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _step: StepTables = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._step = StepTables(self.layout.numel)
        sizes = [region_sizes(k, self.world, self.capacity) for k in self.layout.ks]
        self.caps = tuple(c for c, _ in sizes)
        self.keeps = tuple(r for _, r in sizes)

    @property
    def slots(self) -> int:
        """C: entries of one alltoall row (every segment's ``c_s``)."""
        return sum(self.caps)

    @property
    def kept(self) -> int:
        """R: entries of one owner's allgather row."""
        return sum(self.keeps)

    def row1_spec(self, value_dtype, index_dtype) -> List[Tuple[int, torch.dtype]]:
        """An alltoall row: [signature, demand per segment] int32, C values, C indices."""
        S = self.layout.segments
        return [(1 + S, torch.int32), (self.slots, value_dtype), (self.slots, index_dtype)]

    def row2_spec(self, header_words, value_dtype, index_dtype) -> List[Tuple[int, torch.dtype]]:
        """An owner's allgather row: its header (as the allgather path's), R values, R indices,
        then ``(S, QUANTILES)`` load statistics (demand, quantiles) in the index dtype."""
        S = self.layout.segments
        return [(header_words, torch.int32), (self.kept, value_dtype), (self.kept, index_dtype),
                (S * QUANTILES, index_dtype)]

    def tensors(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """The per-segment tables on ``device`` (cached: their size does not depend on ``k``)."""
        device = torch.device(device)
        cached = self._device.get(device)
        if cached is not None:
            return cached
        caps = torch.tensor(self.caps, dtype=torch.long).to(device)
        keeps = torch.tensor(self.keeps, dtype=torch.long).to(device)
        t = {"caps": caps, "cap_off": torch.cumsum(caps, 0) - caps,  # (S,)
             "keeps": keeps, "keep_off": torch.cumsum(keeps, 0) - keeps}  # (S,)
        self._device[device] = t
        return t

    def slot_tables(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """The ``(C,)`` and ``(R,)`` tables of the rows' slots, kept for the rest of the step
        when small (they scale with ``k``, see ``GroupLayout.slot_tables``)."""
        device = torch.device(device)
        return self._step.get(device, 16 * (self.slots + self.kept), lambda: self._slot_tables(device))

    def end_step(self) -> None:
        """The step is over: drop the tables kept for it."""
        self._step.end_step()

    def _slot_tables(self, device: torch.device) -> Dict[str, torch.Tensor]:
        lt, t = self.layout.tensors(device), self.tensors(device)
        if self.layout.segments == 1:  # constants broadcast from 0-dim tensors: no (C,) memory
            zero, last = lt["offsets"][0], lt["lengths"][0] - 1
            return {"start1": zero, "max1": last, "start2": zero, "max2": last}
        col1, _ = expand_counts(t["caps"], self.slots)  # (C,) segment of each slot
        col2, _ = expand_counts(t["keeps"], self.kept)  # (R,) segment of each kept slot
        return {
            "start1": lt["offsets"][col1], "max1": lt["lengths"][col1] - 1,  # (C,)
            "start2": lt["offsets"][col2], "max2": lt["lengths"][col2] - 1,  # (R,)
        }


def to_regions(sel: torch.Tensor, sent: torch.Tensor, plan: RegionPlan, bounds: torch.Tensor,
               signature: torch.Tensor, index_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 1: this rank's selected entries, bucketed by region, as the alltoall's rows.

    Arguments:
        sel: ``(K,)`` int64 positions in the group (segment by segment).
        sent: ``(K,)`` their values as they travel (wire dtype, loss-scaled).
        bounds: ``(S, P + 1)`` region starts (``uniform_bounds`` / ``refresh_bounds``).
        signature: ``(1,)`` int32, what this rank believes it sends.
        index_dtype: the wire's index dtype.

    Returns:
        ``(payload, in_cap)``: ``(P * row1,)`` uint8, row j for rank j; ``(K,)`` bool, the
        entries that fit their region's ``c_s`` slots (the largest of each region). Empty slots
        carry index -1.
    """
    layout, P = plan.layout, plan.world
    S, C, K = layout.segments, plan.slots, layout.k
    lt, t, slots = layout.tensors(sel.device), plan.tensors(sel.device), layout.slot_tables(sel.device)
    # Every segment's inner boundaries, in group positions: one ascending array; an entry of
    # segment s finds s * (P-1) of them below its own segment's, so adding s makes the key.
    # (Each (K,) temporary is dropped or overwritten once used: at the warm-up's ratios K is
    # a quarter of the group.)
    inner = (bounds[:, 1:P] + lt["offsets"][:S, None]).reshape(-1)  # (S * (P-1),)
    key = torch.searchsorted(inner, sel, right=True).add_(slots["slot_seg"])  # (K,) seg * P + owner
    order = segment_order(key, magnitude(sent))  # by (segment, owner), largest first
    key = key.index_select(0, order)
    first = torch.searchsorted(key, torch.arange(S * P + 1, device=sel.device))  # (S*P + 1,)
    demand = (first[1:] - first[:-1]).view(S, P)  # (S, P) entries bound for each owner
    rank = torch.arange(K, device=sel.device).sub_(first.index_select(0, key))  # (K,) rank in its region
    dest = key.remainder(P)  # (K,) owner
    sseg = key.div_(P, rounding_mode="floor")  # (K,) segment
    del key
    fits = rank < t["caps"].index_select(0, sseg)
    dest.mul_(C).add_(t["cap_off"].index_select(0, sseg)).add_(rank)  # (K,) slot in the rows
    del sseg, rank
    dest.masked_fill_(~fits, P * C)  # P * C: dropped
    vals = torch.zeros(P * C + 1, dtype=sent.dtype, device=sent.device)
    vals.index_put_((dest,), sent.index_select(0, order))
    local = sel.index_select(0, order)  # (K,) index within its tensor
    start = slots["slot_start"]
    local.sub_(start.index_select(0, order) if start.dim() else start)
    idx = torch.full((P * C + 1,), -1, dtype=index_dtype, device=sel.device)
    idx.index_put_((dest,), local.to(index_dtype))
    del local, dest
    in_cap = torch.empty(K, dtype=torch.bool, device=sel.device)
    in_cap.index_put_((order,), fits)
    header = torch.cat([signature.reshape(1, 1).expand(P, 1), demand.t().to(torch.int32)], dim=1)  # (P, 1+S)
    payload = pack_rows([header, vals[:-1].view(P, C), idx[:-1].view(P, C)])
    return payload, in_cap


def reduce_region(received: torch.Tensor, plan: RegionPlan, signature: int, header: torch.Tensor,
                  divisor: float, dtype: torch.dtype, value_dtype: torch.dtype,
                  index_dtype: torch.dtype) -> torch.Tensor:
    """Step 2, at the owner: sum every rank's entries of this rank's region, keep the ``R_s``
    largest sums of each segment, divided by ``divisor``; returns this rank's allgather row.

    Arguments:
        received: the alltoall's output, ``(P * row1,)`` uint8 (row r from rank r).
        signature: this rank's signature; a row with another one (or rows of another size) sets
            ``FLAG_MISMATCH`` in the returned header, for every rank to see.
        header: ``(header_words,)`` int32, this rank's own header (its flags).
        dtype: the gradient's dtype (the sums are taken in it, at least in float32).

    Returns:
        ``(row2,)`` uint8: header, R values, R local indices (-1: empty slot), statistics.
    """
    layout, P = plan.layout, plan.world
    S, C, R, n = layout.segments, plan.slots, plan.kept, layout.numel
    device = received.device
    t, lt = plan.slot_tables(device), layout.tensors(device)
    header = header.clone()
    try:
        hdr, vals, idx = unpack_rows(received, P, plan.row1_spec(value_dtype, index_dtype))
    except ValueError:  # rows of another size: another k, layout or wire dtype on some rank
        header[1] = header[1] | FLAG_MISMATCH
        stats = torch.full((S * QUANTILES,), -1, dtype=index_dtype, device=device)
        return pack_rows([header.view(1, -1), torch.zeros(1, R, dtype=value_dtype, device=device),
                          torch.full((1, R), -1, dtype=index_dtype, device=device), stats.view(1, -1)])
    header[1] = header[1] | (hdr[:, 0] != signature).any().to(torch.int32) * FLAG_MISMATCH
    valid = idx >= 0  # (P, C)
    # Group positions in int32 where they fit (half the bytes of every (P*C,) buffer below);
    # in place from here: each (P*C,) buffer is the step's own.
    pdt = torch.int32 if n < 2**31 - 1 else torch.int64
    at = idx.to(pdt)  # (P, C)
    del idx
    torch.minimum(at.clamp_(min=0), t["max1"].to(pdt), out=at).add_(t["start1"].to(pdt))
    # Sum by position without a dense buffer: sort the P*C entries by position (stable: rank
    # order within a position), number the runs of equal positions, add each run in order.
    at.masked_fill_(~valid, n)  # n: an empty slot, sorts last
    ordered, order = torch.sort(at.reshape(-1), stable=True)  # (P*C,) ascending positions
    del at
    head = torch.ones_like(ordered, dtype=torch.bool)
    torch.ne(ordered[1:], ordered[:-1], out=head[1:])  # the first entry of each position
    run = torch.cumsum(head, 0, dtype=pdt).sub_(1)  # (P*C,) which position
    acc = torch.promote_types(dtype, torch.float32)  # half-precision sums of P values could overflow
    vals = vals.to(acc).masked_fill_(~valid, 0).reshape(-1).index_select(0, order)
    del valid, order
    sums = torch.zeros(P * C, dtype=acc, device=device)
    scatter_add_(sums, run, vals)
    del vals
    sums = sums.index_select(0, run)  # (P*C,) each entry's position's sum
    del run
    head.logical_and_(ordered < n)  # one entry per position received, no empty slot
    # The R_s largest sums of each segment, by bisection on their bits (no sort of the P*C
    # entries), in ascending position order within each segment's block of the row.
    seg = None if S == 1 else layout.segment_of(ordered)  # (P*C,)
    pt = plan.tensors(device)
    pick, ok = top_by_bits_in_blocks(magnitude(sums), head, pt["keeps"], pt["keep_off"], seg, R,
                                     ascending=True)  # (R,); seg ascends with the positions
    del head, seg
    out_vals = sums.index_select(0, pick)
    del sums
    if divisor != 1:
        out_vals = out_vals / divisor
    out_vals = to_wire(out_vals.masked_fill(~ok, 0), value_dtype)
    out_pos = ordered.index_select(0, pick).clamp_(max=n - 1)
    out_idx = torch.where(ok, out_pos - t["start2"], -1).to(index_dtype)
    # Load statistics: the demand, and quantiles of the positions received, per segment.
    demand = hdr[:, 1:].sum(0).to(index_dtype)  # (S,)
    fs = torch.searchsorted(ordered, lt["offsets"].to(pdt))  # (S + 1,)
    got = fs[1:] - fs[:-1]  # (S,)
    j = torch.arange(1, QUANTILES, device=device)
    qi = (fs[:-1, None] + (got[:, None] * j) // QUANTILES).clamp(max=max(P * C - 1, 0))  # (S, Q-1)
    quant = torch.where(got[:, None] > 0, ordered[qi] - lt["offsets"][:S, None], -1).to(index_dtype)
    stats = torch.cat([demand[:, None], quant], dim=1)  # (S, Q)
    return pack_rows([header.view(1, -1), out_vals.view(1, R), out_idx.view(1, R), stats.view(1, -1)])


def finish(gathered: torch.Tensor, plan: RegionPlan, header_words: int, value_dtype: torch.dtype,
           index_dtype: torch.dtype, out: torch.Tensor
           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 3, on every rank: scatter every owner's kept entries into ``out`` (zeroed here).

    Returns:
        ``(headers, kept, stats)``: ``(P, header_words)`` int32; the positions some owner
        kept, as a ``positions.bitmask`` of ``n`` bits; ``(P, S, QUANTILES)`` statistics.
        Raises ``ValueError`` when ``gathered`` is not P rows of this plan's size.
    """
    layout, P = plan.layout, plan.world
    n = layout.numel
    t = plan.slot_tables(out.device)
    headers, vals, idx, stats = unpack_rows(gathered, P, plan.row2_spec(header_words, value_dtype,
                                                                        index_dtype))
    valid = idx >= 0  # (P, R)
    pos = idx.long()  # (P, R) group positions (in place: the buffers are this call's own)
    del idx
    torch.minimum(pos.clamp_(min=0), t["max2"], out=pos).add_(t["start2"])
    out.zero_()
    # Regions are disjoint: each position arrives once, so any order gives the same bits.
    scatter_add_(out, pos.reshape(-1), vals.masked_fill_(~valid, 0).reshape(-1))
    del vals
    kept = bitmask(pos.reshape(-1), n, valid.reshape(-1))  # n / 8 bytes, not a sort of P * R
    return headers, kept, stats.view(P, layout.segments, QUANTILES)


def was_kept(sel: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``(K,)`` bool: which of ``sel``'s positions ``kept`` (the bitmask from ``finish``) holds."""
    return bits_at(kept, sel)


class SparseAllreduceExchange(Exchange):
    """The sparse allreduce as an exchange: its plans (one per group in use) and its regions
    (``bounds``, ``(S, P + 1)`` per ``(names, world)``, the same on every rank) are its own
    state. Per step: ``payload`` (this rank's alltoall rows), ``reduce`` (the owner's step,
    after the alltoall), ``receive`` (after the allgather of the owners' rows); its bytes are
    ``exchange_core.traffic("sparse_allreduce", ...)``.

    Arguments:
        capacity: ``region_capacity``, see ``TopKSettings``.
        refresh: regions are rebalanced every this many steps.
    """

    name = "sparse_allreduce"

    def __init__(self, capacity: float, refresh: int) -> None:
        self.capacity, self.refresh = capacity, refresh
        self.bounds: Dict[Tuple[str, int], torch.Tensor] = {}  # (name, world) -> (P + 1,) starts
        self._plans = GroupCache()  # (sizes, world) -> RegionPlan

    def plan(self, layout: GroupLayout, world: int) -> RegionPlan:
        """The group's ``RegionPlan`` over ``world`` ranks (cached per group)."""
        return self._plans.get((layout.sizes, world), lambda plan: plan.layout.ks == layout.ks,
                               lambda: RegionPlan(layout, world, self.capacity))

    def prune(self) -> None:
        """Forget the plans of groups no step used since the last call (once per step)."""
        self._plans.prune()

    @staticmethod
    def time(numel: int, ks: Sequence[int], world: int, value_bytes: int, index_bytes: int,
             capacity: float, model) -> float:
        """Its bytes over the link, its alltoall's ``P - 1`` messages (Horovod does not fuse
        alltoalls), the selection, the owners' work per selected entry, and the scatter-add
        of the ``P * R`` entries the owners keep (``cost.sparse_allreduce_time``)."""
        return sparse_allreduce_time(numel, ks, world, value_bytes, index_bytes, capacity, model)

    def _bounds(self, ctx: SparseContext, device: torch.device) -> torch.Tensor:
        """The group's ``(S, P + 1)`` region starts, from each tensor's own (equal regions for a
        tensor not seen before): regions belong to tensors, not to the groups they travel in,
        so they outlive a regrouping (DDP rebuilds its buckets after the first iteration)."""
        world = ctx.regions.world
        rows = [self.bounds.get((name, world)) for name in ctx.names]
        if any(r is None or r.device != device for r in rows):
            uniform = uniform_bounds(ctx.layout, world, device)
            rows = [uniform[s] if r is None else r.to(device) for s, r in enumerate(rows)]
            self._store(ctx, rows)
        return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)

    def _store(self, ctx: SparseContext, rows) -> None:
        for name, row in zip(ctx.names, rows):
            self.bounds[(name, ctx.regions.world)] = row

    def payload(self, ctx: SparseContext, sel: torch.Tensor, sent: torch.Tensor,
                signature: torch.Tensor) -> Tuple[torch.Tensor, Optional[PositionSet]]:
        rows, in_cap = to_regions(sel, sent, ctx.regions, self._bounds(ctx, sent.device), signature,
                                  ctx.index_dtype)
        return rows, PositionSet(sel, ctx.numel, valid=in_cap)

    def reduce(self, received: torch.Tensor, ctx: SparseContext) -> torch.Tensor:
        """The owner's step: this rank's allgather row from the alltoall's ``received`` rows."""
        return reduce_region(received, ctx.regions, ctx.signature, ctx.header, ctx.divisor,
                             ctx.dtype, ctx.value_dtype, ctx.index_dtype)

    def receive(self, gathered: torch.Tensor, ctx: SparseContext, out: torch.Tensor,
                step: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        try:
            headers, kept, stats = finish(gathered, ctx.regions, ctx.header_words, ctx.value_dtype,
                                          ctx.index_dtype, out)
        except ValueError as e:
            raise RankMismatchError(f"parameter {ctx.name!r} ({ctx.describe()} on this rank): {e}: ranks "
                                    "disagree on this tensor's size, ratio or wire dtypes. "
                                    + SAME_MODEL) from None
        if (step + 1) % self.refresh == 0:
            self._store(ctx, refresh_bounds(self._bounds(ctx, out.device), stats, ctx.layout).unbind(0))
        return headers, kept

    def state_dict(self) -> Dict[str, Any]:
        return {"regions": [{"names": [name], "world": world, "bounds": b.cpu().unsqueeze(0)}
                            for (name, world), b in self.bounds.items()]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.bounds = {}
        regions = state.get("regions", [])
        if isinstance(regions, dict):  # keyed by "name\nname...@world" strings
            regions = [{"names": key.rpartition("@")[0].split("\n"), "world": key.rpartition("@")[2],
                        "bounds": b} for key, b in regions.items()]
        for r in regions:  # a group's rows (as saved before regions were per tensor) or one tensor's
            for name, row in zip(r["names"], r["bounds"].reshape(len(r["names"]), -1)):
                self.bounds[(name, int(r["world"]))] = row.clone()

    def reset(self) -> None:
        self.bounds = {}

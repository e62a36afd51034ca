"""The exact Top-K of magnitudes without a sort, per segment: for ``selection.exact_topk`` when
the candidates are a large share of the group (the warm-up's ratios), and for the sparse
allreduce's owner step (``sparse_allreduce.reduce_region``). A sort of ``m`` entries holds some
26 (int32 keys) to 32 (int64) bytes per entry on CPU; counting by bits holds under 6, and
reads nothing back to the host."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout import GroupLayout

__all__ = ["exact_topk_by_bits", "top_by_bits", "top_by_bits_in_blocks"]


def top_by_bits(mag: torch.Tensor, valid: torch.Tensor, ks: torch.Tensor, seg: Optional[torch.Tensor],
                size: int, ascending: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Of each segment's valid entries, the ``ks[s]`` of largest magnitude (of those equal to
    the ``ks[s]``-th, the lowest indices), found by bisection on the magnitudes' bits
    (non-negative floats order like their bit patterns, NaN above Inf): 31 counting passes for
    float32, 63 for float64. Every valid entry of a segment with fewer than ``ks[s]`` is taken.

    Arguments:
        mag: ``(m,)`` float32 or float64 magnitudes, consumed (its buffer becomes the keys).
        valid: ``(m,)`` bool, the entries that may be taken.
        ks: ``(S,)`` int64, entries to take per segment.
        seg: ``(m,)`` int32 segment of each entry, in ``[0, S)``; None for one segment.
        size: the result's length, at least ``ks.sum()``.
        ascending: ``seg`` never decreases (each segment's entries are together): counts per
            segment are then differences of a running sum, cheaper than adding by index.

    Returns:
        ``(take, have)``: ``(size,)`` int64 indices of the entries taken, ascending, padded with
        0; ``(S,)`` valid entries per segment.
    """
    itype, bits = (torch.int64, 63) if mag.dtype == torch.float64 else (torch.int32, 31)
    keys = mag.view(itype).masked_fill_(~valid, -1)  # (m,) invalid entries count nowhere
    del mag
    S = ks.numel()
    if seg is None:
        def count(mask):  # (1,) per segment (no int copy of the mask, as a sum would make)
            return torch.count_nonzero(mask).reshape(1)
    elif ascending:
        starts = torch.searchsorted(seg, torch.arange(S + 1, dtype=seg.dtype, device=seg.device))  # (S + 1,)
        before, has = (starts - 1).clamp_(min=0), starts > 0
        def count(mask):  # (S,) int32: a running sum (4 bytes per entry) read at the segments' starts
            at = torch.cumsum(mask, 0, dtype=torch.int32).index_select(0, before).masked_fill_(~has, 0)
            return at[1:] - at[:-1]
    else:
        def count(mask):  # (S,) int32: 4 bytes per entry, not an int64 copy of the mask
            counts = torch.zeros(S, dtype=torch.int32, device=mask.device)
            return counts.index_add_(0, seg, mask.to(torch.int32))
    def per_entry(x):  # (S,) -> what each entry compares with
        return x if seg is None else x.index_select(0, seg)
    kth = torch.zeros(S, dtype=itype, device=keys.device)
    for bit in range(bits - 1, -1, -1):  # the largest kth with count(keys >= kth) >= k_s
        trial = kth | (1 << bit)
        kth = torch.where(count(keys >= per_entry(trial)) >= ks, trial, kth)
    have = count(valid)  # (S,)
    at = per_entry(kth)  # (m,)
    above = keys > at
    need = (ks - count(above)).to(torch.int32)  # (S,) how many equal to kth each segment takes
    tie = keys == at
    del at, keys
    rank = tie.to(torch.int32).cumsum_(0)  # (m,) ties up to here, inclusive (in place)
    if seg is not None:  # minus the ties of the segments before
        ties = count(tie)
        rank -= (ties.cumsum(0) - ties).to(torch.int32).index_select(0, seg)
    keep = above.logical_or_(tie.logical_and_(rank <= per_entry(need)))
    del rank, tie
    return torch.nonzero_static(keep, size=size, fill_value=0).squeeze(1), have


def top_by_bits_in_blocks(mag: torch.Tensor, valid: torch.Tensor, ks: torch.Tensor, block_off: torch.Tensor,
                          seg: Optional[torch.Tensor], size: int,
                          ascending: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``top_by_bits`` laid out as a row of ``size`` slots in blocks: segment ``s``'s block
    starts at ``block_off[s]`` and holds its ``ks[s]`` slots, its entries taken in ascending
    index order, then empty slots where it had fewer valid entries.

    Returns:
        ``(pick, ok)``: ``(size,)`` int64, the entry in each slot (0 where empty); ``(size,)``
        bool, the slots that hold one.
    """
    take, have = top_by_bits(mag, valid, ks, seg, size, ascending)  # (size,) ascending
    nkeep = torch.minimum(have, ks)  # (S,) entries each segment takes
    i = torch.arange(size, device=take.device)
    if seg is None:
        return take, i < nkeep
    slot = (block_off - nkeep.cumsum(0) + nkeep).index_select(0, seg.index_select(0, take)).add_(i)
    slot.masked_fill_(i >= nkeep.sum(), size)  # padding: past the row's end
    pick = torch.zeros(size + 1, dtype=take.dtype, device=take.device).index_put_((slot,), take)[:size]
    ok = torch.zeros(size + 1, dtype=torch.bool, device=take.device).index_fill_(0, slot, True)[:size]
    return pick, ok


def exact_topk_by_bits(cmag: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, full: torch.Tensor,
                        layout: GroupLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """``exact_topk`` without a sort (``top_by_bits`` over the candidates, by segment): the
    same set as the sort; ``sel`` in ascending position order (the CPU kernel's order).
    ``cmag`` is consumed."""
    t = layout.tensors(cmag.device)
    seg = None if layout.segments == 1 else layout.segment_of(pos)  # (cap,)
    take, have = top_by_bits(cmag, valid, t["ks"], seg, layout.k)  # (K,) int64, ascending
    inexact = (have < t["ks"]).any() | full
    return take.copy_(pos.index_select(0, take)), inexact  # the positions, into take's buffer

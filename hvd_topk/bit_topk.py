"""The exact Top-K of float32 magnitudes without a sort, for ``selection.exact_topk`` when the
candidates are a large share of the group (the warm-up's ratios): a sort of the candidates
would hold some 18 bytes per candidate; counting by bits holds under 4, and reads nothing back
to the host."""

from __future__ import annotations

from typing import Tuple

import torch

from .layout import GroupLayout

__all__ = ["exact_topk_by_bits"]


def exact_topk_by_bits(cmag: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, full: torch.Tensor,
                        layout: GroupLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """``exact_topk`` for float32 magnitudes without a sort: each segment's ``k_s``-th largest
    magnitude by bisection on its bits (31 counting passes; non-negative floats order like
    their bit patterns, NaN above Inf), then every candidate above it and, of those equal to
    it, the lowest positions. The same set as the sort; ``sel`` in ascending position order
    (the CPU kernel's order). ``cmag`` is consumed (its buffer becomes the keys)."""
    t = layout.tensors(cmag.device)
    keys = cmag.view(torch.int32).masked_fill_(~valid, -1)  # (cap,) padding counts nowhere
    del cmag
    S, ks = layout.segments, t["ks"]
    if S == 1:
        seg = None
        def count(mask):  # (1,) per segment (no int copy of the mask, as a sum would make)
            return torch.count_nonzero(mask).reshape(1)
    else:
        seg = torch.searchsorted(t["ends"].to(torch.int32), pos.to(torch.int32), right=True,
                                 out_int32=True).clamp_(max=S - 1)  # (cap,)
        def count(mask):  # (S,) int32: 4 bytes per candidate, not an int64 copy of the mask
            counts = torch.zeros(S, dtype=torch.int32, device=mask.device)
            return counts.index_add_(0, seg, mask.to(torch.int32))
    def per_entry(x):  # (S,) -> what each candidate compares with
        return x if seg is None else x.index_select(0, seg)
    kth = torch.zeros(S, dtype=torch.int32, device=keys.device)
    for bit in range(30, -1, -1):  # the largest kth with count(keys >= kth) >= k_s
        trial = kth | (1 << bit)
        kth = torch.where(count(keys >= per_entry(trial)) >= ks, trial, kth)
    have = count(valid)  # (S,) candidates per segment
    at = per_entry(kth)  # (cap,)
    above = keys > at
    need = (ks - count(above)).to(torch.int32)  # (S,) how many equal to kth each segment keeps
    tie = keys == at
    del at, keys
    rank = tie.to(torch.int32).cumsum_(0)  # (cap,) ties up to here, inclusive (in place)
    if seg is not None:  # minus the ties of the segments before
        ties = count(tie)
        rank -= (ties.cumsum(0) - ties).to(torch.int32).index_select(0, seg)
    keep = above.logical_or_(tie.logical_and_(rank <= per_entry(need)))
    del rank, tie
    take = torch.nonzero_static(keep, size=layout.k, fill_value=0).squeeze(1)  # (K,) int64, ascending
    del keep
    inexact = (have < ks).any() | full
    return take.copy_(pos.index_select(0, take)), inexact  # the positions, into take's buffer

"""The sparse allreduce's regions: where each owner's share of a tensor's index space starts.

Every rank computes the same regions from the same gathered numbers (no extra round): equal
regions at first (``uniform_bounds``), then balanced on the load the owners measured
(``refresh_bounds``, every ``region_refresh`` steps). Pure functions, device tensors in and out.
"""

from __future__ import annotations

import torch

from .exchange_core import QUANTILES
from .selection import GroupLayout

__all__ = ["uniform_bounds", "refresh_bounds"]

#: The share of the load spread uniformly over the index space when regions are refreshed:
#: no region collapses to nothing because it was idle for a while.
_PRIOR = 0.05


def uniform_bounds(layout: GroupLayout, world: int, device) -> torch.Tensor:
    """``(S, P + 1)`` int64 region starts of each segment (local indices), equal lengths:
    region j of segment s is ``[b[s, j], b[s, j + 1])``."""
    rows = [[(j * n) // world for j in range(world + 1)] for n in layout.sizes]
    return torch.tensor(rows, dtype=torch.long).to(device)


def refresh_bounds(bounds: torch.Tensor, stats: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """New ``(S, P + 1)`` region starts from the owners' statistics ``(P, S, QUANTILES)``.

    Each region's demand is spread evenly between its quantile points (a piecewise-linear
    cumulative load over the segment; regions that received nothing spread it evenly over
    their length), ``_PRIOR`` of the total is spread uniformly, and the segment is cut where
    the cumulative load reaches ``j / P`` of the total. Same inputs, same bits, on every rank.
    """
    S, P1 = bounds.shape
    P, Q = P1 - 1, QUANTILES
    device = bounds.device
    lo, hi = bounds[:, :-1].double(), bounds[:, 1:].double()  # (S, P)
    demand = stats[:, :, 0].t().double().clamp(min=0)  # (S, P)
    quant = stats[:, :, 1:].permute(1, 0, 2).double()  # (S, P, Q-1)
    frac = torch.arange(1, Q, device=device, dtype=torch.float64) / Q
    even = lo[..., None] + (hi - lo)[..., None] * frac  # (S, P, Q-1)
    inner = torch.where(quant >= 0, quant, even)
    inner = torch.minimum(torch.maximum(inner, lo[..., None]), hi[..., None]).cummax(dim=-1).values
    sizes = layout.tensors(device)["lengths"].double()  # (S,)
    x = torch.cat([torch.cat([lo[..., None], inner], dim=-1).reshape(S, P * Q), sizes[:, None]], dim=1)
    width = x[:, 1:] - x[:, :-1]  # (S, P*Q)
    mass = torch.repeat_interleave(demand / Q, Q, dim=1)  # (S, P*Q)
    total = demand.sum(dim=1, keepdim=True)
    mass = mass + (_PRIOR * total + 1e-9) * width / sizes[:, None]
    y = torch.cat([torch.zeros(S, 1, dtype=torch.float64, device=device), torch.cumsum(mass, dim=1)], dim=1)
    targets = y[:, -1:] * torch.arange(1, P, device=device, dtype=torch.float64) / P  # (S, P-1)
    i = torch.searchsorted(y, targets).clamp(1, P * Q)  # y[i-1] < target <= y[i]
    y0, y1 = y.gather(1, i - 1), y.gather(1, i)
    x0, x1 = x.gather(1, i - 1), x.gather(1, i)
    cut = x0 + (x1 - x0) * ((targets - y0) / (y1 - y0).clamp(min=1e-300))
    cut = torch.minimum(cut.round().long().clamp(min=0), sizes.long()[:, None]).cummax(dim=1).values
    return torch.cat([torch.zeros(S, 1, dtype=torch.long, device=device), cut, sizes.long()[:, None]], dim=1)


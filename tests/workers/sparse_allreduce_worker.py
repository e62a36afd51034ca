"""Multi-rank checks of the sparse allreduce (run by tests/test_sparse_allreduce.py, on 2, 3
and 4 ranks, Gloo and MPI).

The reference is written here from the algorithm's description, with dense tensors and plain
loops, no hvd_topk code: every rank's own top-k (torch.topk) of its compensated gradient;
per region (the bounds the compressor holds before the step: how regions are balanced is a
performance choice, what is done with them is what is checked), each rank's ``c`` largest
entries; each owner's sum in rank order and its ``R`` largest sums; the average of those. The
residual is the compensated gradient minus what this rank sent *and an owner kept*.
Tolerance: rtol 1e-6 / atol 1e-7 on gradients (summation order is the only possible
difference); residuals must be equal; parameters bit-identical across ranks.
"""

import math
import os

import horovod.torch as hvd
import torch
import torch.nn as nn

import hvd_topk
from exchange_worker import (DEVICE, allgather_dense, assert_same_on_all_ranks, make_model, run_checks,
                             train_against_reference)

RTOL, ATOL = 1e-6, 1e-7


def reference_step(c, ratio, bounds, capacity):
    """The sparse allreduce of ``c`` ((n,) this rank's compensated gradient), computed densely.
    Returns (the averaged result (n,), this rank's residual after the step (n,))."""
    P, n = hvd.size(), c.numel()
    k = hvd_topk.num_selected(n, ratio)
    cap, keep = min(k, math.ceil(capacity * k / P)), math.ceil(k / P)
    every = allgather_dense(c)  # (P, n)
    b = bounds.tolist()
    total = torch.zeros(n, dtype=c.dtype, device=c.device)
    kept_by_rank = [set() for _ in range(P)]
    sent_by_rank = [dict() for _ in range(P)]  # region -> positions rank r sent its owner
    for r in range(P):
        top = torch.topk(every[r].abs(), k).indices
        for j in range(P):
            mine = top[(top >= b[j]) & (top < b[j + 1])]
            # by magnitude, largest first; ties keep topk's order (a stable sort)
            order = torch.sort(-every[r][mine].abs(), stable=True).indices
            sent_by_rank[r][j] = mine[order][:cap]
    for j in range(P):
        acc = torch.zeros(n, dtype=c.dtype, device=c.device)
        for r in range(P):  # rank order; a rank sends a position at most once
            sent = sent_by_rank[r][j]
            acc[sent] += every[r][sent]
        # every position sent to owner j, in the order first sent
        touched = list(dict.fromkeys(torch.cat([sent_by_rank[r][j] for r in range(P)]).tolist()))
        if not touched:
            continue
        pos = torch.tensor(touched, dtype=torch.long, device=c.device)
        best = pos[torch.topk(acc[pos].abs(), min(keep, len(touched))).indices]
        total[best] = acc[best]
        chosen = set(best.tolist())
        for r in range(P):
            kept_by_rank[r] |= chosen & set(sent_by_rank[r][j].tolist())
    residual = c.clone()
    mine = sorted(kept_by_rank[hvd.rank()])
    residual[mine] = 0
    applied = c - residual
    assert torch.equal(residual + applied, c)  # the identity of error feedback, exactly
    return total / P, residual


def check_matches_reference(steps=6, grouped=False, momentum=0.0, ratio=0.05, refresh=2):
    """Through hvd_topk.DistributedOptimizer: gradients and residuals equal the reference at
    every step, the regions refreshed every ``refresh`` steps; parameters bit-identical."""
    model = make_model()
    comp = hvd_topk.TopKCompressor(ratio, exchange="sparse_allreduce", min_numel=0, density_aware=False,
                                   warmup_steps=0, region_refresh=refresh,
                                   group_bytes=(1 << 30) if grouped else 0,
                                   momentum_correction=False)
    opt = hvd_topk.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum),
                                        named_parameters=model.named_parameters(), compression=comp)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    names = [n for n, _ in model.named_parameters()]

    def expect(step, name, p, c):
        bounds = _bounds_now(comp, name, p.numel())
        return reference_step(c, ratio, bounds, comp.region_capacity)

    train_against_reference(model, opt, comp, steps, expect, sparse_allreduce_tensors=6, allgather_tensors=0)
    assert_same_on_all_ranks(model, "sparse allreduce")
    sizes = dict(zip(names, _sizes(model, names)))
    moved = [n for (n, _), b in comp.exchanges["sparse_allreduce"].bounds.items()
             if not torch.equal(b.cpu(), _equal_regions(sizes[n]))]
    assert hvd.size() == 1 or moved, "no region was ever rebalanced"


def _equal_regions(n):
    """The region starts every tensor of ``n`` entries begins with: ``P`` equal regions."""
    return torch.tensor([(j * n) // hvd.size() for j in range(hvd.size() + 1)])


def _bounds_now(comp, name, n):
    """The region starts of tensor ``name`` (``n`` entries) for this step: the compressor's
    (regions belong to tensors, whatever group they travel in), equal until its first refresh."""
    key = (name, hvd.size())
    bounds = comp.exchanges["sparse_allreduce"].bounds
    return bounds[key].cpu() if key in bounds else _equal_regions(n)


def _sizes(model, names):
    params = dict(model.named_parameters())
    return [params[n].numel() for n in names]


def check_grouped():
    check_matches_reference(grouped=True)


def check_in_flight_bound():
    """An in-flight budget smaller than a group's rows: every group but the newest runs its
    phase 2 during backward (waited for, the same decision on every rank), and every gradient
    and residual still equals the reference."""
    import hvd_topk.plan
    import hvd_topk.synchronize
    exchange = hvd_topk.synchronize.StepExchange
    floor, advance, early = hvd_topk.settings.IN_FLIGHT_FLOOR, exchange._advance, []

    def counting(self, budget):
        before = len(self._owners)
        advance(self, budget)
        early.append(before - len(self._owners))

    hvd_topk.settings.IN_FLIGHT_FLOOR, exchange._advance = 0, counting
    try:
        check_matches_reference(steps=3)
    finally:
        hvd_topk.settings.IN_FLIGHT_FLOOR, exchange._advance = floor, advance
    assert sum(early) >= 3, f"no phase 2 ran during backward: {early}"


def check_momentum():
    """SGD momentum without correction: the wrapped optimizer applies momentum to the result."""
    check_matches_reference(momentum=0.9, steps=4)


class Concentrated(nn.Module):
    """One parameter whose gradient lives in its first 2% of entries: one region gets it all."""

    def __init__(self, n=20000):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n, device=DEVICE))
        self.hot = n // 50

    def forward(self, step):
        g = torch.Generator().manual_seed(97 * hvd.rank() + step)
        target = torch.zeros_like(self.w)
        target[:self.hot] = torch.randn(self.hot, generator=g).to(DEVICE)
        return (self.w * target).sum()


def check_all_mass_in_one_region(steps=12):
    """Every entry of the gradient is in region 0 at first: correct at every step (against the
    reference), the regions move to the hot entries, and nothing is lost."""
    model = Concentrated()
    comp = hvd_topk.TopKCompressor(0.01, exchange="sparse_allreduce", min_numel=0, density_aware=False,
                                   warmup_steps=0, region_refresh=3)
    opt = hvd_topk.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=1.0),
                                        named_parameters=model.named_parameters(), compression=comp)
    residual = torch.zeros(model.w.numel(), device=DEVICE)
    fed = torch.zeros_like(residual)  # every gradient this rank produced
    applied = torch.zeros_like(residual)  # every averaged result
    for step in range(steps):
        opt.zero_grad()
        model(step).backward()
        bounds = _bounds_now(comp, "w", model.w.numel())
        fed += model.w.grad.reshape(-1)
        c = model.w.grad.detach().reshape(-1) + residual
        want, residual = reference_step(c, 0.01, bounds, comp.region_capacity)
        opt.synchronize()
        torch.testing.assert_close(model.w.grad.reshape(-1), want, rtol=RTOL, atol=ATOL)
        assert torch.equal(comp.state.residuals.get("w"), residual)
        applied += model.w.grad.reshape(-1)
        with opt.skip_synchronize():
            opt.step()
    # Nothing lost: the sum over ranks of (what was fed - what is still owed) was applied.
    owed = allgather_dense(fed - comp.state.residuals.get("w")).sum(0) / hvd.size()
    torch.testing.assert_close(applied, owed, rtol=1e-5, atol=1e-5)
    b = comp.exchanges["sparse_allreduce"].bounds[("w", hvd.size())].cpu()
    if hvd.size() > 1:
        assert b[1] < model.hot, f"regions did not move to the hot entries: {b.tolist()}"
    assert_same_on_all_ranks(model, "concentrated gradient")


def check_auto_choice():
    """``exchange="auto"`` on every rank: the fastest under the time model (default link and
    CPU figures, ``hvd_topk.exchange_times``) for a 1% tensor of 100k entries: the allgather up
    to 4 ranks (its bytes alone would take the sparse allreduce at 4), the same on every rank."""
    comp = hvd_topk.TopKCompressor(0.01, warmup_steps=0, link_gbps=1, link_latency_us=50)
    t = torch.zeros(100_000)
    times = hvd_topk.exchange_times(100_000, 1000, hvd.size(), 4, 4, 4, 2.0, hvd_topk.CostModel())
    want = min(("dense", "allgather", "sparse_allreduce"), key=lambda e: times[e])
    assert comp.exchange_for(t, hvd.size()) == want, (times, comp.exchange_for(t, hvd.size()))
    assert want == "allgather", times
    costs = hvd_topk.exchange_bytes(100_000, 1000, hvd.size(), 4, 4, 4)
    assert hvd.size() < 4 or costs["sparse_allreduce"] < costs["allgather"], costs
    choices = hvd.allgather(torch.tensor([hvd_topk.EXCHANGES.index(want)]), name="auto_choice")
    assert choices.eq(choices[0]).all(), choices


CHECKS = {
    "reference": check_matches_reference,
    "grouped": check_grouped,
    "momentum": check_momentum,
    "in_flight": check_in_flight_bound,
    "one_region": check_all_mass_in_one_region,
    "auto": check_auto_choice,
}

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run_checks(CHECKS)

"""The sparse allreduce (``exchange="sparse_allreduce"``): on 2, 3 and 4 ranks under Gloo and
MPI against an independent reference (tests/workers/sparse_allreduce_worker.py), and its
pure steps on one process."""

import math

import pytest
import torch
from launch import run_ranks

import hvd_topk
from hvd_topk import exchange, sparse_allreduce as sar
from hvd_topk.packing import pack_rows, row_nbytes, unpack_rows
from hvd_topk.selection import GroupLayout

CHECKS = ["auto", "reference", "grouped", "momentum", "in_flight", "one_region"]


@pytest.mark.parametrize("np_", [2, 3, 4])
@pytest.mark.parametrize("backend", ["gloo", "mpi"])
def test_sparse_allreduce_matches_reference(backend, np_):
    out = run_ranks("sparse_allreduce_worker.py", *CHECKS, backend=backend, np=np_, timeout=420)
    for check in CHECKS:
        for rank in range(np_):
            assert f"rank {rank}/{np_} [{backend}] {check}: OK" in out, out


def test_rows_round_trip():
    parts = [torch.arange(6, dtype=torch.int32).view(3, 2), torch.randn(3, 4),
             torch.randn(3, 5).half(), torch.arange(3, dtype=torch.int64).view(3, 1)]
    spec = [(p.shape[1], p.dtype) for p in parts]
    buf = pack_rows(parts)
    assert buf.dtype == torch.uint8 and buf.numel() == 3 * row_nbytes(spec)
    for a, b in zip(parts, unpack_rows(buf, 3, spec)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        unpack_rows(buf[:-1], 3, spec)


def test_region_sizes_and_byte_model():
    assert exchange.region_sizes(1000, 4, 2.0) == (500, 250)
    assert exchange.region_sizes(10, 1024, 2.0) == (1, 1)
    assert exchange.region_sizes(100, 2, 2.0) == (100, 50)  # never more slots than entries
    costs = hvd_topk.exchange_bytes(1_000_000, 10_000, 64, 4, 4, 4)
    assert costs["allgather"] == 63 * (8 + 10_000 * 8)
    c, r = math.ceil(2 * 10_000 / 64), math.ceil(10_000 / 64)
    assert costs["sparse_allreduce"] == 63 * ((8 + c * 8) + (8 + r * 8 + exchange.QUANTILES * 4))
    assert costs["dense"] == math.ceil(2 * 63 * 4_000_000 / 64)
    # the sparse allreduce's bytes stay bounded as the world grows; the allgather's do not
    big = hvd_topk.exchange_bytes(1_000_000, 10_000, 1024, 4, 4, 4)
    assert big["sparse_allreduce"] < 4 * 10_000 * 8 < big["allgather"] / 100


def test_exchange_choice():
    comp = hvd_topk.TopKCompressor(0.01, warmup_steps=0, link_gbps=1, link_latency_us=50)
    t = torch.zeros(1_000_000)
    assert comp.exchange_for(t, 2) == "allgather"
    assert comp.exchange_for(t, 8) == "allgather"  # fewer bytes, but its owners' work costs more
    assert comp.exchange_for(t, 16) == "sparse_allreduce"
    assert comp.exchange_for(t, 1024) == "sparse_allreduce"
    # The warm-up's first ratio (25%): at 8 ranks the sparse exchanges save too little.
    assert hvd_topk.TopKCompressor(0.01, link_gbps=1).exchange_for(t, 8) == "dense"
    assert hvd_topk.TopKCompressor(0.01, exchange="allgather").exchange_for(t, 1024) == "dense"
    assert hvd_topk.TopKCompressor(0.01, exchange="allgather",
                                   density_aware=False).exchange_for(t, 1024) == "allgather"
    assert hvd_topk.TopKCompressor(0.5).exchange_for(t, 64) == "dense"  # never more than dense
    named = hvd_topk.TopKCompressor(0.01, exchange="sparse_allreduce", warmup_steps=0)
    assert named.exchange_for(t, 2) == "sparse_allreduce"
    # The warm-up's first ratio (25%): its owner step would hold 8x the gradient (fits_memory).
    assert hvd_topk.TopKCompressor(0.01, exchange="sparse_allreduce").exchange_for(t, 2) == "dense"
    with pytest.raises(ValueError, match="exchange must be"):
        hvd_topk.TopKCompressor(exchange="ring")
    with pytest.raises(ValueError, match="region_capacity"):
        hvd_topk.TopKCompressor(region_capacity=0.5)


def _simulate(cs, layout, world, bounds, capacity=2.0):
    """One sparse allreduce of every rank's compensated gradient ``cs[r]`` in one process,
    through the module's pure steps (exact top-k per rank)."""
    plan = sar.RegionPlan(layout, world, capacity)
    sig = torch.tensor([7], dtype=torch.int32)
    rows, caps = [], []
    for c in cs:
        sel = torch.cat([torch.topk(c[o:o + n].abs(), k).indices + o
                         for o, n, k in zip(layout.offsets, layout.sizes, layout.ks)])
        payload, in_cap = sar.to_regions(sel, c[sel], plan, bounds, sig, torch.int32)
        rows.append(payload.view(world, -1))
        caps.append((sel, in_cap))
    header = torch.tensor([7, 0], dtype=torch.int32)
    owners = [sar.reduce_region(torch.stack([rows[r][j] for r in range(world)]).reshape(-1), plan, 7,
                                header, world, torch.float32, torch.float32, torch.int32)
              for j in range(world)]
    out = torch.zeros(layout.numel)
    headers, kept, stats = sar.finish(torch.cat(owners), plan, 2, torch.float32, torch.int32, out)
    kept = sar.was_kept(torch.arange(layout.numel), kept)  # the bitmask, as (n,) bool
    return out, kept.nonzero().squeeze(1), stats, caps  # the kept positions, ascending


def summed_sparse(cs, k):
    """The summed sparse gradient, plain torch: each rank's exact top-k (torch.topk) of its
    ``c`` kept, the rest zeroed, added rank after rank."""
    total = torch.zeros_like(cs[0])
    for c in cs:
        sparse = torch.zeros_like(c)
        idx = torch.topk(c.abs(), k).indices
        sparse[idx] = c[idx]
        total += sparse
    return total


def test_one_process_simulation_against_exact_global_topk():
    """The global selection, against references computed here from the summed sparse gradient
    ``S`` (no hvd_topk code): on a random load, each region's ``R`` largest ``|S|`` kept, the
    result ``S / P`` there and 0 elsewhere; on an even load (every region holds the same share
    of ``S``, ``k = P * R``), the kept positions are the exact global top-k of ``|S|``. Exact
    comparisons: the owner adds the same float32 values in rank order, as ``S`` does (adding
    a rank's 0 is exact), and divides once by ``P``. Then the refreshed regions balance a
    skewed load."""
    torch.manual_seed(0)
    n, k, world = 50_000, 500, 8
    layout = GroupLayout((n,), (k,))
    keep, cap = math.ceil(k / world), math.ceil(2 * k / world)  # R, and c at capacity 2
    bounds = sar.uniform_bounds(layout, world, "cpu")
    b = bounds[0].tolist()
    assert b == [j * (n // world) for j in range(world + 1)]

    def under_cap(cs):  # every rank sends its whole top-k: the owners receive all of S
        per_region = [(torch.topk(c.abs(), k).indices // (n // world)).bincount(minlength=world) for c in cs]
        return all(int(counts.max()) <= cap for counts in per_region)

    # Random load: each region's share of S is even only on average.
    cs = [torch.randn(n) for _ in range(world)]
    assert under_cap(cs)
    out, kept, stats, _ = _simulate(cs, layout, world, bounds)
    S = summed_sparse(cs, k)
    want = torch.cat([torch.topk(S[b[j]:b[j + 1]].abs(), keep).indices + b[j] for j in range(world)])
    assert torch.equal(kept, want.sort().values)  # each position once, P * R of them
    expected = torch.zeros(n)
    expected[want] = S[want] / world
    assert torch.equal(out, expected)
    # Even load: every rank's c repeats one random block in each region and k = P * R, so
    # each rank's top-k has R entries in every region and each region holds the same share of
    # S: the kept positions are then the exact global top-k of |S|.
    m, k_even = n // world, world * keep
    even = [torch.randn(m).repeat(world) for _ in range(world)]
    out, kept, _, _ = _simulate(even, GroupLayout((n,), (k_even,)), world, bounds)
    S = summed_sparse(even, k_even)
    ranked = S.abs().sort(descending=True).values
    assert ranked[k_even - 1] > ranked[k_even]  # no tie at the cut: the exact top-k is one set
    assert torch.equal(kept, torch.topk(S.abs(), k_even).indices.sort().values)
    expected = torch.zeros(n)
    expected[kept] = S[kept] / world
    assert torch.equal(out, expected)
    # A skewed load: most mass in the first 5% of the tensor.
    skew = [c * torch.where(torch.arange(n) < n // 20, 50.0, 1.0) for c in cs]
    _, _, stats, caps = _simulate(skew, layout, world, bounds)
    before = sum(int(c[1].sum()) for c in caps)
    fresh = sar.refresh_bounds(bounds, stats, layout)
    assert fresh[0, 0] == 0 and fresh[0, -1] == n and bool((fresh[0, 1:] >= fresh[0, :-1]).all())
    assert fresh[0, 1] < n // 20  # region 0 shrank onto the hot entries
    _, _, _, caps2 = _simulate(skew, layout, world, fresh)
    after = sum(int(c[1].sum()) for c in caps2)
    assert after > before  # more of every rank's top-k fits its region's slots

"""Exact selection: the set torch.topk picks, on every path (full, sampled, fallback)."""

import pytest
import torch

from hvd_topk import index_dtype, num_selected, select_topk
from hvd_topk import selection
from hvd_topk.selection import SAMPLED_MIN_NUMEL, compensate_and_select


ADVERSARIAL = [
    lambda n: torch.arange(n, dtype=torch.float32),  # sorted: a strided sample is biased
    lambda n: torch.cat([torch.zeros(n - 50), torch.full((50,), 3.0)]),  # k > nonzeros
    lambda n: torch.randn(n) * (torch.arange(n) % 1000 == 0),  # mostly zeros
    lambda n: torch.randn(n).pow(9),  # heavy tails
]


@pytest.fixture
def fallbacks(monkeypatch):
    """The k of every full-topk fallback taken during the test."""
    calls = []
    full = selection._full_topk
    monkeypatch.setattr(selection, "_full_topk", lambda x, k: calls.append(k) or full(x, k))
    return calls


def reference(x, k):
    return set(torch.topk(x.abs().double(), k).indices.tolist())


@pytest.mark.parametrize("n,ratio", [(1, 0.01), (7, 0.5), (1000, 0.01), (SAMPLED_MIN_NUMEL, 0.01),
                                     (300_000, 0.01), (300_000, 0.001), (1_000_000, 0.0001)])
def test_select_matches_torch_topk(n, ratio):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    k = num_selected(n, ratio)
    idx = select_topk(x, k)
    assert idx.numel() == k
    assert idx.unique().numel() == k
    assert set(idx.tolist()) == reference(x, k)


@pytest.mark.parametrize("make", ADVERSARIAL)
def test_adversarial_inputs_stay_exact(make):
    x = make(400_000)
    k = num_selected(x.numel(), 0.001)
    got = select_topk(x, k)
    # Compare magnitudes (ties make index sets ambiguous): the k-th largest must agree.
    want = torch.topk(x.abs(), k).values
    assert torch.equal(x[got].abs().sort().values, want.sort().values)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_select_dtypes(dtype):
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1)).to(dtype)
    k = num_selected(x.numel(), 0.01)
    got = select_topk(x, k)
    want = torch.topk(x.abs().float(), k).values
    assert torch.equal(x[got].abs().float().sort().values, want.sort().values)


def test_num_selected():
    assert num_selected(0, 0.01) == 0
    assert num_selected(1, 0.01) == 1
    assert num_selected(50, 0.01) == 1  # numel < 1/ratio still sends one entry
    assert num_selected(300, 0.01) == 3  # no float-rounding overshoot
    assert num_selected(1001, 0.01) == 11
    assert num_selected(10, 1.0) == 10


def test_index_dtype():
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64


def test_select_does_not_touch_rng_or_input():
    x = torch.randn(500_000)
    before = x.clone()
    state = torch.get_rng_state()
    select_topk(x, 500)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(x, before)


def test_chunked_candidate_pass_is_exact_across_chunk_boundaries(monkeypatch):
    # A chunk much smaller than the tensor, not dividing it: candidates straddle boundaries.
    monkeypatch.setattr(selection, "CPU_CHUNK", 1000)
    monkeypatch.setattr(selection.torch, "get_num_threads", lambda: 1)
    x = torch.randn(300_007, generator=torch.Generator().manual_seed(3))
    for ratio in (0.01, 0.001):
        k = num_selected(x.numel(), ratio)
        assert set(select_topk(x, k).tolist()) == reference(x, k)


def test_unlucky_sample_falls_back_to_full_topk_and_stays_exact(fallbacks):
    # Every sampled position is large, everything else small: the sampled threshold lets
    # fewer than k entries through, so the fallback must run -- and still be exact.
    n, ratio = 1 << 20, 0.1
    k = num_selected(n, ratio)
    s = max(4096, -(-selection._SAMPLE_HITS * n // k))
    x = torch.rand(n, generator=torch.Generator().manual_seed(4))
    x[:: n // s] = 5.0
    got = select_topk(x, k)
    assert fallbacks == [k]
    assert torch.equal(x[got].sort().values, torch.topk(x, k).values.sort().values)


def test_sampled_path_does_not_fall_back_on_gaussian_input(monkeypatch):
    calls = []
    monkeypatch.setattr(selection, "_full_topk", lambda x, k: calls.append(k))
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(5))
    for ratio in (0.01, 0.001):
        select_topk(x, num_selected(x.numel(), ratio))
    assert calls == []


def test_sampled_path_returns_ascending_indices():
    x = torch.randn(500_000, generator=torch.Generator().manual_seed(6))
    idx = select_topk(x, num_selected(x.numel(), 0.01))
    assert torch.equal(idx, idx.sort().values)


# -- compensate_and_select: buf += alpha * g in the candidate pass ----------------------------

def _check_compensate(buf0, g, k, alpha=1.0):
    """Bitwise the buf of buf.add_(g, alpha), and the top-k magnitudes of the result."""
    want_buf = buf0.clone().add_(g) if alpha == 1.0 else buf0.clone().add_(g, alpha=alpha)
    buf = buf0.clone()
    idx = compensate_and_select(buf, g, k, alpha)
    assert torch.equal(buf.view(-1).view(torch.uint8), want_buf.view(-1).view(torch.uint8))
    assert idx.dtype == torch.int64 and idx.numel() == k and idx.unique().numel() == k
    # Compare magnitudes (ties make index sets ambiguous): the k-th largest must agree.
    want = torch.topk(want_buf.abs().double(), k).values
    assert torch.equal(buf[idx].abs().double().sort().values, want.sort().values)
    return idx


@pytest.mark.parametrize("n,ratio", [(7, 0.5), (1000, 0.01), (300_007, 0.01), (300_007, 0.001),
                                     (1_000_000, 0.0001), (100_000, 0.2)])
def test_compensate_and_select_matches_add_then_topk(n, ratio):
    gen = torch.Generator().manual_seed(n)
    buf, g = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    idx = _check_compensate(buf, g, num_selected(n, ratio))
    want_buf = buf + g
    assert set(idx.tolist()) == reference(want_buf, idx.numel())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2**-10, 0.3])
def test_compensate_and_select_dtypes_and_alpha(dtype, alpha):
    gen = torch.Generator().manual_seed(7)
    buf = torch.randn(200_003, generator=gen).to(dtype)
    g = (torch.randn(200_003, generator=gen) * 4).to(dtype)
    for ratio in (0.01, 0.001):
        _check_compensate(buf, g, num_selected(buf.numel(), ratio), alpha)


@pytest.mark.parametrize("make", ADVERSARIAL)
def test_compensate_and_select_adversarial_inputs(make):
    g = make(400_000)
    buf = torch.zeros_like(g)
    _check_compensate(buf, g, num_selected(g.numel(), 0.001))
    _check_compensate(make(400_000), g, num_selected(g.numel(), 0.001), alpha=0.5)


def test_compensate_and_select_sampled_path_across_chunks_ascending(monkeypatch):
    monkeypatch.setattr(selection, "CPU_CHUNK", 1000)
    monkeypatch.setattr(selection.torch, "get_num_threads", lambda: 1)
    calls = []
    monkeypatch.setattr(selection, "_full_topk", lambda x, k: calls.append(k))
    gen = torch.Generator().manual_seed(8)
    buf, g = torch.randn(300_007, generator=gen), torch.randn(300_007, generator=gen)
    for ratio in (0.01, 0.001):
        k = num_selected(buf.numel(), ratio)
        idx = _check_compensate(buf, g, k, alpha=0.5)
        assert torch.equal(idx, idx.sort().values)
    assert calls == []  # the sampled path ran, no fallback


def test_compensate_and_select_falls_back_when_the_sample_is_unlucky(fallbacks):
    # The sample is taken from buf + g before the update: make the sampled positions large.
    n, ratio = 1 << 20, 0.1
    k = num_selected(n, ratio)
    stride, _ = selection._sample_plan(n, k)
    g = torch.rand(n, generator=torch.Generator().manual_seed(9))
    g[::stride] = 5.0
    _check_compensate(torch.zeros(n), g, k)
    assert fallbacks == [k]


def test_compensate_and_select_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="dtype"):
        compensate_and_select(torch.zeros(10), torch.zeros(10, dtype=torch.float64), 1)
    with pytest.raises(ValueError, match="1-D"):
        compensate_and_select(torch.zeros(2, 5), torch.zeros(2, 5), 1)


def test_top_mask_keeps_exactly_k_with_ties():
    mag = torch.tensor([1.0, 2.0, 2.0, 2.0, 3.0, 0.5, 2.0])
    keep = selection._top_mask(mag, 3)
    assert keep.sum() == 3 and keep[4] and mag[keep].sort().values.tolist() == [2.0, 2.0, 3.0]


@pytest.mark.parametrize("alpha", [1.0, 2.0**-7])
@pytest.mark.parametrize("poison", [None, "nan", "inf", "overflow"])
def test_cpu_kernel_matches_the_torch_path(monkeypatch, alpha, poison):
    """The compiled kernel (built by scripts/install.sh) and the torch/NumPy path give the same
    buffer bit for bit, the same indices and the same finite flag -- NaN/Inf dropped, an
    overflowing sum zeroed."""
    from hvd_topk import _cpu_kernel
    assert _cpu_kernel.cpu_kernel() is not None, "CPU kernel not built (compiler, ninja?)"
    gen = torch.Generator().manual_seed(3)
    n, k = 300_001, 3000
    base = torch.randn(n, generator=gen) * 0.1
    g = torch.randn(n, generator=gen)
    if poison == "nan":
        g[[5, 150_000, n - 1]] = float("nan")
    elif poison == "inf":
        g[77] = float("-inf")
    elif poison == "overflow":
        base[9], g[9] = 3.4e38, 3.4e38  # e + alpha g > float max for both alphas
    results = []
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(selection, "cpu_kernel", lambda: None)
        buf = base.clone()
        idx, finite = selection.compensate_finite_and_select(buf, g, k, alpha)
        results.append((buf, idx, finite))
    (b1, i1, f1), (b2, i2, f2) = results
    assert torch.equal(b1, b2) and torch.equal(i1, i2) and f1 == f2 == (poison is None)
    assert bool(torch.isfinite(b1).all())


# 0.9 * max + alpha * max overflows float32 only for alpha = 1.
@pytest.mark.parametrize("alpha,poison", [(1.0, None), (1.0, "nan"), (1.0, "overflow"),
                                          (2.0**-5, None), (2.0**-5, "nan")])
def test_momentum_kernel_matches_the_torch_path(monkeypatch, alpha, poison):
    """DGC momentum correction fused (u = m u + alpha g; v += u; select) gives the bits of
    the separate torch passes, velocity included."""
    from hvd_topk import _cpu_kernel
    assert _cpu_kernel.cpu_kernel() is not None, "CPU kernel not built (compiler, ninja?)"
    gen = torch.Generator().manual_seed(4)
    n, k = 200_003, 2000
    v0, u0, g = (torch.randn(n, generator=gen) for _ in range(3))
    if poison == "nan":
        g[[0, 99_999]] = float("nan")
    elif poison == "overflow":  # u overflows: reset to 0 (v keeps its value), reported
        u0[3], g[3] = 3.4e38, 3.4e38
    results = []
    for use_kernel in (True, False):
        if not use_kernel:
            monkeypatch.setattr(selection, "cpu_kernel", lambda: None)
        v, u = v0.clone(), u0.clone()
        idx, finite = selection.momentum_compensate_finite_and_select(v, u, g, k, 0.9, alpha)
        results.append((v, u, idx, finite))
    (v1, u1, i1, f1), (v2, u2, i2, f2) = results
    assert torch.equal(u1, u2) and torch.equal(v1, v2) and torch.equal(i1, i2)
    assert f1 == f2 == (poison is None)
    expected_u = u0.mul(0.9).add(torch.nan_to_num(g, nan=0.0), alpha=alpha)
    if poison == "overflow":
        expected_u[3] = 0
    assert torch.equal(u1, expected_u) and torch.equal(v1, v0 + expected_u)


def _fused_reference(monkeypatch, v, u, g, k, momentum, alpha):
    """What compress() did before the fused kernel: the torch path, then gather and zero."""
    with monkeypatch.context() as m:
        m.setattr(selection, "cpu_kernel", lambda: None)
        if u is None:
            idx, finite = selection.compensate_finite_and_select(v, g, k, alpha)
        else:
            idx, finite = selection.momentum_compensate_finite_and_select(v, u, g, k, momentum, alpha)
    idx = idx.sort().values
    vals, u_vals = v[idx].clone(), (u[idx].clone() if u is not None else None)
    v[idx] = 0
    if u is not None:
        u[idx] = 0
    return idx, vals, u_vals, finite


@pytest.mark.parametrize("n", [1000, SAMPLED_MIN_NUMEL + 3, 300_001])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("alpha", [1.0, 2.0**-6])
@pytest.mark.parametrize("poison", [None, "nan", "overflow"])
def test_fused_update_matches_the_reference_path(monkeypatch, n, momentum, alpha, poison):
    """fused_update_and_select (one kernel call: update, sample, scan, exact top-k, zeroing)
    leaves the same bits in v and u and picks the same entries as the separate passes."""
    from hvd_topk import _cpu_kernel
    assert _cpu_kernel.cpu_kernel() is not None, "CPU kernel not built (compiler, ninja?)"
    gen = torch.Generator().manual_seed(5)
    k = max(1, n // 100)
    v0, u0, g = (torch.randn(n, generator=gen) for _ in range(3))
    if poison == "nan":
        g[[0, n // 2, n - 1]] = float("nan")
    elif poison == "overflow":
        v0[7], g[7], u0[7] = 3.4e38, 3.4e38, 3.4e38  # the update overflows to Inf
    out = []
    for fused in (True, False):
        v, u = v0.clone(), (u0.clone() if momentum else None)
        if fused:
            res = selection.fused_update_and_select(v, u, g, k, momentum, alpha)
            assert res is not None
        else:
            res = _fused_reference(monkeypatch, v, u, g, k, momentum, alpha)
        out.append((v, u) + tuple(res))
    (v1, u1, i1, x1, y1, f1), (v2, u2, i2, x2, y2, f2) = out
    assert torch.equal(v1, v2) and torch.equal(i1, i2) and torch.equal(x1, x2)
    if momentum:
        assert torch.equal(u1, u2) and torch.equal(y1, y2)
    else:
        assert y1 is None
    assert f1 == f2 == (poison is None)
    assert bool(torch.isfinite(v1).all()) and torch.equal(i1, i1.sort().values)


@pytest.mark.parametrize("make", ADVERSARIAL + [lambda n: torch.ones(n)])
def test_fused_update_stays_exact_on_adversarial_inputs(make):
    """Biased samples, ties, mostly-zero and heavy-tailed inputs: the magnitudes picked are
    torch.topk's, and among equal magnitudes the lowest indices are kept."""
    n, k = 200_000, 2000
    g = make(n).float()
    v = torch.zeros(n)
    want = torch.topk(g.abs(), k).values.sort().values
    idx, vals, _, finite = selection.fused_update_and_select(v, None, g, k)
    assert finite and idx.numel() == k and torch.equal(vals.abs().sort().values, want)
    assert torch.equal(vals, g[idx]) and bool((v[idx] == 0).all())
    kth = want[0]
    ties = idx[g[idx].abs() == kth]
    assert torch.equal(ties, (g.abs() == kth).nonzero().squeeze(1)[:ties.numel()])


def test_fused_update_declines_what_it_does_not_cover():
    """Other dtypes, non-power-of-two scales and dense-ish large tensors go to the other paths."""
    v, g = torch.zeros(100_000), torch.randn(100_000)
    assert selection.fused_update_and_select(v.double(), None, g.double(), 100) is None
    assert selection.fused_update_and_select(v, None, g, 100, alpha=0.3) is None
    assert selection.fused_update_and_select(v, None, g, 50_000) is None  # k > n / 8
    assert selection.fused_update_and_select(v[:1000], None, g[:1000], 500) is not None


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fused_update_is_the_same_on_one_thread_and_several(momentum):
    """The kernel scans ranges of a large tensor on torch's intra-op threads; the residual,
    velocity, picked entries and finite flag are those of a single thread."""
    gen = torch.Generator().manual_seed(6)
    n, k = 1_200_007, 12_000
    v0, u0, g = (torch.randn(n, generator=gen) for _ in range(3))
    g[[3, 700_000]] = float("nan")
    before = torch.get_num_threads()
    out = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            v, u = v0.clone(), (u0.clone() if momentum else None)
            idx, vals, u_vals, finite = selection.fused_update_and_select(v, u, g, k, momentum)
            out.append((v, u, idx, vals, u_vals, finite))
    finally:
        torch.set_num_threads(before)
    (v1, u1, i1, x1, y1, f1), (v2, u2, i2, x2, y2, f2) = out
    assert torch.equal(v1, v2) and torch.equal(i1, i2) and torch.equal(x1, x2) and f1 == f2 is False
    if momentum:
        assert torch.equal(u1, u2) and torch.equal(y1, y2)

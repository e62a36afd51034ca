"""Exact selection: the set torch.topk picks, on every path (sampled, fallback, CPU kernel),
for one tensor and for groups."""

import math
import pytest
import torch

import hvd_topk
from hvd_topk._cpu_kernel import add_at, zero_at
from hvd_topk import index_dtype, num_selected, select_topk
from hvd_topk import layout, selection
from hvd_topk.headers import FLAG_INEXACT
from hvd_topk.layout import group_runs
from hvd_topk.selection import SAMPLED_MIN_NUMEL, GroupLayout, select_group, update_


ADVERSARIAL = [
    lambda n: torch.arange(n, dtype=torch.float32),  # sorted: a strided sample is biased
    lambda n: torch.cat([torch.zeros(n - 50), torch.full((50,), 3.0)]),  # k > nonzeros
    lambda n: torch.randn(n) * (torch.arange(n) % 1000 == 0),  # mostly zeros
    lambda n: torch.randn(n).pow(9),  # heavy tails
]


@pytest.fixture
def fallbacks(monkeypatch):
    """The layouts of every exact fallback taken during the test."""
    calls = []
    full = selection.exact_topk_fallback
    monkeypatch.setattr(selection, "exact_topk_fallback",
                        lambda v, layout: calls.append(layout.ks) or full(v, layout))
    return calls


def kernel():
    if hvd_topk.cpu_kernel() is None:
        pytest.skip("CPU kernel not built (compiler, ninja?): nothing to compare")


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


def test_unlucky_sample_is_flagged_and_the_fallback_stays_exact(fallbacks):
    # Every sampled position is large, everything else small: the sampled threshold lets
    # fewer than k entries through, so the group is flagged inexact -- and redone exactly.
    n, ratio = 1 << 20, 0.01
    k = num_selected(n, ratio)
    stride, _ = layout.sample_plan(n, k)
    x = torch.rand(n, generator=torch.Generator().manual_seed(4))
    x[::stride] = 5.0
    _, inexact = select_group(x, GroupLayout((n,), (k,)))
    assert bool(inexact)
    got = select_topk(x, k)
    assert fallbacks == [(k,)]
    assert torch.equal(x[got].sort().values, torch.topk(x, k).values.sort().values)


def test_sampled_path_is_exact_on_gaussian_input(fallbacks):
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(5))
    for ratio in (0.01, 0.001):
        select_topk(x, num_selected(x.numel(), ratio))
    assert fallbacks == []


def test_ties_keep_the_lower_index():
    x = torch.zeros(100_000)
    x[::7] = 1.0  # 14286 entries tie at 1.0
    k = 1000
    got = select_topk(x, k)
    assert torch.equal(got.sort().values, torch.arange(0, 7 * k, 7))


# -- groups: one pipeline run over several tensors, each with its own k -----------------------

SIZES = (300_000, 5000, 12, 70_000, 4096 * 3, 1)


@pytest.mark.parametrize("ratio", [0.01, 0.001, 0.2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_group_selects_each_segments_own_top_k(ratio, dtype):
    gen = torch.Generator().manual_seed(7)
    layout = GroupLayout(SIZES, tuple(num_selected(n, ratio) for n in SIZES))
    v = torch.randn(layout.numel, generator=gen).to(dtype)
    v[300_000:305_000] *= 100  # segments of very different scales
    sel, inexact = select_group(v, layout)
    assert not bool(inexact) and sel.numel() == layout.k == sel.unique().numel()
    at = 0
    for off, n, k in zip(layout.offsets, layout.sizes, layout.ks):
        mine = sel[at:at + k]
        at += k
        assert bool(((mine >= off) & (mine < off + n)).all())  # slots are segment by segment
        seg = v[off:off + n].double().abs()
        assert torch.equal(seg[mine - off].sort().values, torch.topk(seg, k).values.sort().values)


def test_update_flags_the_segments_with_nan_and_adds_them_as_zero():
    layout = GroupLayout((5000, 6000, 7000), (50, 60, 70))
    v = torch.randn(layout.numel)
    g = torch.randn(layout.numel)
    g[5100], g[12_000] = float("nan"), float("inf")
    want = v + torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    bad = update_(v, g, layout)
    assert bad.tolist() == [False, True, True]
    assert torch.equal(v, want)


def test_update_momentum_and_nesterov_are_sgds():
    layout = GroupLayout((5000,), (50,))
    v, u, g = torch.randn(5000), torch.randn(5000), torch.randn(5000)
    v1, u1 = v.clone(), u.clone()
    update_(v1, g, layout, u=u1, momentum=0.9)
    assert torch.equal(u1, u * 0.9 + g) and torch.equal(v1, v + (u * 0.9 + g))
    v2, u2 = v.clone(), u.clone()
    update_(v2, g, layout, u=u2, momentum=0.9, nesterov=True)
    assert torch.equal(v2, v + (g + 0.9 * (u * 0.9 + g)))


def test_group_runs_cut_at_key_changes_and_the_cap():
    """Runs end at a change of key or where the cap would be passed; a larger item is alone."""
    items = [("a", 4), ("a", 4), ("a", 4), ("b", 1), ("b", 20), ("b", 1), ("a", 1)]
    runs = group_runs(items, nbytes=lambda it: it[1], key=lambda it: it[0], cap=lambda it: 8)
    assert [[b for _, b in run] for run in runs] == [[4, 4], [4], [1], [20], [1], [1]]
    assert group_runs([], nbytes=len, key=len, cap=len) == []


def test_group_layout_validates():
    with pytest.raises(ValueError, match="one k per segment"):
        GroupLayout((10, 20), (1,))


# -- the CPU kernel: the same steps fused per tensor ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cpu_kernel_scattered_writes_match_torch(dtype):
    """The kernel's commit (``zero_at``) and scatter-add (``add_at``) leave the bits of
    ``scatter_(0, idx, 0.0)`` and of ``index_add_`` (duplicates summed in order), and refuse
    a position out of range."""
    kernel()
    gen = torch.Generator().manual_seed(3)
    n = 50_000
    idx = torch.randint(0, n, (3000,), generator=gen)
    idx[:500] = idx[500:1000]  # duplicates, as two ranks sending one position
    x = torch.randn(3000, generator=gen) * 1e3
    out = torch.randn(n, generator=gen)
    expect = out.clone().index_add_(0, idx, x)
    assert add_at(out, idx.to(dtype), x) and torch.equal(out, expect)
    v, u = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    v_ref, u_ref = v.clone().scatter_(0, idx, 0.0), u.clone().scatter_(0, idx, 0.0)
    assert zero_at(v, u, idx.to(dtype)) and torch.equal(v, v_ref) and torch.equal(u, u_ref)
    w = torch.randn(n, generator=gen)
    assert zero_at(w, None, idx.to(dtype)) and torch.equal(w, w.clone().scatter_(0, idx, 0.0))
    with pytest.raises(RuntimeError, match="out of"):
        zero_at(v, u, torch.tensor([0, n], dtype=dtype))
    assert not add_at(out.double(), idx, x.double())  # not float32: the torch op runs instead


@pytest.mark.parametrize("n", [1000, SAMPLED_MIN_NUMEL + 3, 300_001])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("alpha", [1.0, 2.0**-6])
@pytest.mark.parametrize("nan", [False, True])
def test_cpu_kernel_matches_the_torch_steps(n, momentum, alpha, nan):
    """fused_update_and_select (one kernel call) leaves the same bits in v and u as update_,
    and picks the same entries as select_group."""
    kernel()
    gen = torch.Generator().manual_seed(5)
    k = max(1, n // 100)
    v0, u0, g = (torch.randn(n, generator=gen) for _ in range(3))
    if nan:
        g[[0, n // 2, n - 1]] = float("nan")
    layout = GroupLayout((n,), (k,))
    v1, u1 = v0.clone(), (u0.clone() if momentum else None)
    idx, vals, u_vals, finite = selection.fused_update_and_select(v1, u1, g, k, momentum, alpha,
                                                                  zero_v=False, zero_u=False)
    v2, u2 = v0.clone(), (u0.clone() if momentum else None)
    bad = update_(v2, g, layout, alpha=alpha, u=u2, momentum=momentum)
    sel, inexact = select_group(v2, layout)
    assert torch.equal(v1, v2) and (u1 is None or torch.equal(u1, u2))
    assert not bool(inexact) and torch.equal(idx, sel.sort().values)
    assert torch.equal(vals, v2[idx]) and (u_vals is None or torch.equal(u_vals, u2[idx]))
    assert finite == (not nan) == (not bool(bad.any()))


@pytest.mark.parametrize("make", ADVERSARIAL + [lambda n: torch.ones(n)])
def test_fused_update_stays_exact_on_adversarial_inputs(make):
    """Biased samples, ties, mostly-zero and heavy-tailed inputs: the magnitudes picked are
    torch.topk's, and among equal magnitudes the lowest indices are kept."""
    kernel()
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
    """Other dtypes and non-power-of-two scales go to the torch steps."""
    kernel()
    v, g = torch.zeros(100_000), torch.randn(100_000)
    assert selection.fused_update_and_select(v.double(), None, g.double(), 100) is None
    assert selection.fused_update_and_select(v, None, g, 100, alpha=0.3) is None
    assert selection.fused_update_and_select(v[:1000], None, g[:1000], 500) is not None


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fused_update_is_the_same_on_one_thread_and_several(momentum):
    """The kernel scans ranges of a large tensor on torch's intra-op threads; the residual,
    velocity, picked entries and finite flag are those of a single thread."""
    kernel()
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


@pytest.mark.parametrize("rows,cols", [(2304, 2304), (768, 3072), (1024, 1000), (512, 4608)])
@pytest.mark.parametrize("ratio", [0.25, 0.1, 0.01])
def test_sample_sees_every_column_of_a_structured_gradient(rows, cols, ratio):
    """A weight's gradient ``delta x^T`` differs by column. The strided sample must not see only
    some columns (a stride sharing a factor with the row length does): its threshold would be
    misjudged and the selection flagged inexact (a redo: a second exchange and host sync)."""
    gen = torch.Generator().manual_seed(0)
    delta, x = torch.randn(rows, generator=gen), torch.randn(cols, generator=gen)
    x[::4] *= 0.05  # every fourth input small: columns 0, 4, 8, ... carry little
    g = torch.outer(delta, x).reshape(-1)
    with hvd_topk.use_cpu_kernel(False):
        comp = hvd_topk.TopKCompressor(ratio, warmup_steps=0)
        _, ctx = comp.compress_group([g], ["w"])
        assert not ctx.flags & FLAG_INEXACT
        stride = ctx.layout.plans[0][0]
        assert math.gcd(stride, rows * cols) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("segments", [1, 4])
@pytest.mark.parametrize("ascending", [False, True])
def test_top_by_bits_in_blocks_against_a_sort(dtype, segments, ascending):
    """Each segment's ``k_s`` largest valid magnitudes (ties: the lower index) in its block of
    the row, ascending, empty slots after where a segment has fewer: against a plain sort."""
    from hvd_topk.bit_topk import top_by_bits_in_blocks
    gen = torch.Generator().manual_seed(segments)
    m = 3000
    mag = torch.randint(0, 50, (m,), generator=gen).to(dtype) / 7  # many ties
    mag[::97] = float("inf")
    valid = torch.rand(m, generator=gen) > 0.3
    seg = torch.sort(torch.randint(0, segments, (m,), generator=gen)).values.to(torch.int32)
    if segments > 1:
        valid[seg == 2] = False  # a segment with no valid entry at all
        valid[(seg == 3).nonzero()[5:].squeeze(1)] = False  # one with fewer than its k
    ks = torch.tensor([40, 25, 10, 30][:segments])
    off = torch.cumsum(ks, 0) - ks
    size = int(ks.sum())
    pick, ok = top_by_bits_in_blocks(mag.clone(), valid, ks, off, seg if segments > 1 else None, size,
                                     ascending)
    want_pick, want_ok = torch.zeros(size, dtype=torch.long), torch.zeros(size, dtype=torch.bool)
    for s in range(segments):
        idx = [i for i in range(m) if int(seg[i]) == s and bool(valid[i])]
        idx = sorted(sorted(idx, key=lambda i: (-float(mag[i]), i))[:int(ks[s])])
        want_pick[int(off[s]):int(off[s]) + len(idx)] = torch.tensor(idx, dtype=torch.long)
        want_ok[int(off[s]):int(off[s]) + len(idx)] = True
    assert torch.equal(ok, want_ok)
    assert torch.equal(torch.where(ok, pick, 0), want_pick)


@pytest.mark.parametrize("sizes", [(5000, 6000, 7000), (300, 17000, 40, 900), (9000,)])
def test_chunked_thresholds_pass_the_same_candidates(sizes, monkeypatch):
    """A large group of several tensors compares its entries with their tensor's threshold a
    chunk at a time (``threshold_chunks``, chunks cutting through tensors): the same
    candidates as every entry against its own tensor's threshold, written out."""
    gen = torch.Generator().manual_seed(7)
    v = torch.randn(sum(sizes), generator=gen)
    v[3] = float("nan")
    thr = torch.rand(len(sizes), generator=gen) * 2
    thr[-1] = -1.0  # an unsampled segment: every entry passes
    want_passed = torch.cat([(x.abs() > t) & ~x.isnan() for x, t in zip(v.split(list(sizes)), thr)])
    for chunked_min in (1 << 30, 0):
        monkeypatch.setattr(layout, "CHUNKED_MIN_NUMEL", chunked_min)
        lay = GroupLayout(sizes, tuple(max(1, n // 100) for n in sizes))
        chunks = lay.threshold_chunks(v.device)
        assert len(chunks) == (layout.THRESHOLD_CHUNKS if chunked_min == 0 and len(sizes) > 1 else 1)
        assert [c[0] for c in chunks] + [sum(sizes)] == [0] + [c[1] for c in chunks]
        cand, _ = selection.candidates(v, thr.clone(), lay)
        got = cand[cand < lay.numel].long()
        want = want_passed.nonzero().squeeze(1)[:lay.capacity]
        assert torch.equal(got, want), chunked_min

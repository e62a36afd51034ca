"""Property tests of TopKCompressor (single process): round trip, error feedback, top-k,
multi-rank decompress, non-finite input and loss scaling, over shapes, dtypes and ratios.

Hypothesis picks shapes, dtypes, ratios, value distributions and seeds; the tensors come from
torch generators seeded by it (much faster than hypothesis arrays). Where the maths is exact
the comparisons are exact: "bitwise" compares bit patterns (``-0.0 != 0.0``), ``torch.equal``
compares values. Every tolerance is stated where it is used.
"""

import dataclasses
import math

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from hvd_topk import TopKCompressor, num_selected, unpack
from hvd_topk.selection import SAMPLED_MIN_NUMEL

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
WIRE = [None, torch.float16, torch.bfloat16]  # value_dtype; None keeps the gradient's dtype
RATIOS = st.one_of(st.sampled_from([1e-4, 0.001, 0.01, 0.05, 0.125, 0.5, 1.0]),
                   st.floats(1e-4, 1.0, allow_nan=False))
# How gradients look: plain, many ties (small integers, zeros among them), all zeros (one
# big tie), mostly zeros, heavy tails (Cauchy), magnitudes spread log-uniformly over most of
# the dtype's range, and tiny values (the dtype's subnormal range).
KINDS = ["normal", "ties", "zeros", "sparse", "heavy", "wide", "tiny"]
FAST = settings(max_examples=25, deadline=None)
F16, BF16, F32, F64 = DTYPES

_small_shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)  # < 64K: full topk
_large_shapes = st.one_of(  # > SAMPLED_MIN_NUMEL: the sampled threshold path (for ratio <= 1/8)
    st.integers(SAMPLED_MIN_NUMEL + 1, 150_000).map(lambda n: (n,)),
    st.sampled_from([(300, 257), (3, 128, 200)]))
SHAPES = st.one_of(st.just((1,)), _small_shapes, st.integers(1000, SAMPLED_MIN_NUMEL - 1).map(lambda n: (n,)),
                   _large_shapes)


def make_grad(kind, shape, dtype, seed):
    """A finite gradient of ``shape`` and ``dtype``, values of ``kind``, from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if kind == "normal":
        x = torch.randn(n, generator=gen, dtype=torch.float64)
    elif kind == "ties":
        x = torch.randint(-3, 4, (n,), generator=gen).double()
    elif kind == "zeros":
        x = torch.zeros(n, dtype=torch.float64)
    elif kind == "sparse":
        x = torch.randn(n, generator=gen, dtype=torch.float64)
        x *= torch.rand(n, generator=gen, dtype=torch.float64) < 0.01
    elif kind == "heavy":
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        # Cauchy, capped well inside the range so several steps (and ranks) cannot overflow,
        # but beyond fp16's range for the wider dtypes (exercises the wire's clamp).
        cap = min(torch.finfo(dtype).max / 64, 1e30)
        x = torch.tan(math.pi * (u - 0.5)).clamp(-cap, cap)
    elif kind == "wide":
        lo = max(math.log2(torch.finfo(dtype).smallest_normal) - 4, -100)
        hi = min(math.log2(torch.finfo(dtype).max / 64), 100)
        e = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
        x = torch.exp2(e) * (torch.randint(0, 2, (n,), generator=gen) * 2 - 1)
    elif kind == "tiny":
        x = torch.randn(n, generator=gen, dtype=torch.float64) * torch.finfo(dtype).tiny
    else:
        raise ValueError(kind)
    return x.to(dtype).reshape(shape)


def bits(t):
    """The bit patterns of a floating tensor, as integers."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def bitwise_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def compensated(comp, name, g):
    """What compress will select from: ``residual + g`` in the residual's dtype (the residual
    is added into in place), or ``g`` on a name's first step."""
    before = comp.state.residuals.get(name)
    return g.reshape(-1).clone() if before is None else before + g.reshape(-1)


def wire_limit(src, wire):
    """The largest value of the ``wire`` dtype that is at most both dtypes' largest, from
    ``torch.finfo`` alone: with ``B = min(max_src, max_wire)`` and ``2**e <= B < 2**(e+1)``,
    the wire dtype's values there are ``2**e * eps_wire`` apart, so the limit is ``B`` rounded
    down to that spacing (exact in Python floats: powers of two and integers below 2**53)."""
    bound = min(torch.finfo(src).max, torch.finfo(wire).max)
    _, e = math.frexp(bound)  # bound = m * 2**e, 0.5 <= m < 1
    spacing = 2.0 ** (e - 1) * torch.finfo(wire).eps
    return math.floor(bound / spacing) * spacing


def wire_cast(c, vdt):
    """``c`` rounded to the wire dtype as the compressor defines it: clamped to ``wire_limit``
    (the largest wire value that also comes back finite in ``c``'s dtype: fp16 and bf16 round
    past each other's maximum), then round-to-nearest; ``None`` is no cast. Clamped in
    float64, which holds every dtype's values and limits exactly."""
    if vdt is None or vdt == c.dtype:
        return c
    limit = wire_limit(c.dtype, vdt)
    return c.double().clamp(-limit, limit).to(vdt)


_WIRE_PAIRS = [(d, w) for d in DTYPES for w in WIRE]


def test_the_wire_limit_reference():
    """``wire_limit`` against numbers worked out by hand: bf16 values between 2**15 and 2**16
    are 256 apart, so the largest at most fp16's 65504 is 255 * 256; fp16's largest is below
    every other dtype's; bf16's largest is below float32's. Each limit is a wire value that
    comes back finite in the gradient dtype."""
    assert wire_limit(F16, BF16) == 255 * 256 == 65280.0
    assert wire_limit(BF16, F16) == wire_limit(F32, F16) == wire_limit(F64, F16) == 65504.0
    assert wire_limit(F32, BF16) == wire_limit(F64, BF16) == (2 - 2 ** -7) * 2.0 ** 127
    for src, wire in _WIRE_PAIRS:
        if wire is not None and wire != src:  # a wire value, finite when cast back to src
            limit = torch.tensor(wire_limit(src, wire), dtype=torch.float64)
            assert float(limit.to(wire)) == float(limit) and bool(torch.isfinite(limit.to(wire).to(src)))


def near_max(dtype, n, seed, within=1 / 128):
    """``n`` values of random sign within ``within`` (relative) below the dtype's largest."""
    gen = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    frac = 1 - within * torch.rand(n, generator=gen, dtype=torch.float64)
    return (sign * torch.finfo(dtype).max * frac).to(dtype)


def selected(payload, ctx):
    _, values, indices = unpack(payload, ctx.k, ctx.value_dtype, ctx.index_dtype)
    return values[0], indices[0].long()


# -- 1. round trip and 3. top-k ---------------------------------------------------------------
@FAST
@given(shape=SHAPES, dtype=st.sampled_from(DTYPES), vdt=st.sampled_from(WIRE), ratio=RATIOS,
       kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=3), seed=st.integers(0, 2**31 - 1))
# Always run (whatever hypothesis draws): the sampled path with ties and with a narrower wire,
# and a single element.
@example(shape=(131_072,), dtype=BF16, vdt=None, ratio=0.001, kinds=["ties", "normal"], seed=1)
@example(shape=(3, 128, 200), dtype=F32, vdt=F16, ratio=0.01, kinds=["heavy", "wide", "zeros"], seed=2)
@example(shape=(1,), dtype=F16, vdt=BF16, ratio=0.5, kinds=["normal", "tiny"], seed=3)
def test_round_trip_selects_exactly_k_of_the_largest(shape, dtype, vdt, ratio, kinds, seed):
    """Each step: ``k = num_selected(numel, ratio)`` distinct in-range indices, the top k of
    ``|c|`` (ties in either order), and ``decompress`` is ``c`` at them and 0 elsewhere --
    exactly without a narrower wire dtype; with one, ``c`` rounded to it (checked exactly
    against the clamped cast, and within half an ulp of the wire dtype plus half an ulp of the
    gradient dtype for the cast back, relative to ``|c|``, or half the smallest subnormal)."""
    comp = TopKCompressor(ratio, value_dtype=vdt, warmup_steps=0)
    n = math.prod(shape)
    for step, kind in enumerate(kinds):  # later steps select from gradient + residual
        g = make_grad(kind, shape, dtype, seed + step)
        c = compensated(comp, "w", g)  # (n,)
        payload, ctx = comp.compress(g, name="w")
        assert ctx.k == num_selected(n, ratio) and payload.dtype == torch.uint8
        assert payload.numel() == ctx.nbytes
        values, idx = selected(payload, ctx)  # (k,), (k,)
        assert idx.numel() == ctx.k == idx.unique().numel()
        assert bool((idx >= 0).all()) and bool((idx < n).all())

        # 3. top-k: every selected |c| >= every unselected |c| (float64 holds every dtype exactly).
        mag = c.double().abs()
        rest = torch.ones(n, dtype=torch.bool)
        rest[idx] = False
        if ctx.k < n:
            assert mag[idx].min() >= mag[rest].max()

        out = comp.decompress(payload, ctx)
        assert out.shape == shape and out.dtype == dtype
        flat = out.reshape(-1)
        assert torch.count_nonzero(flat[rest]) == 0
        expected = wire_cast(c[idx], vdt)
        assert bitwise_equal(values, expected)
        # Values, not bits, for the dense result: its scatter-add into zeros turns -0.0 into 0.0.
        if vdt is None or vdt == dtype:
            assert torch.equal(flat[idx], c[idx])
        else:
            assert torch.equal(flat[idx], expected.to(dtype))
            cd, fd = c[idx].double(), flat[idx].double()
            # Clamped (beyond the largest wire value that is finite in both dtypes): that value
            # is sent.
            limit = wire_limit(dtype, vdt)
            wide = cd.abs() > limit
            sent_limit = float(torch.tensor(limit, dtype=torch.float64).to(dtype))  # back in dtype
            assert torch.equal(fd[wide], sent_limit * cd[wide].sign())
            tol = ((torch.finfo(vdt).eps + torch.finfo(dtype).eps) / 2 * cd.abs()
                   + torch.finfo(vdt).smallest_normal * torch.finfo(vdt).eps / 2)
            assert bool(((fd - cd).abs() <= tol)[~wide].all())


@settings(max_examples=20, deadline=None)
@given(pair=st.sampled_from(_WIRE_PAIRS), n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
def test_round_trip_at_the_top_of_the_range_stays_finite(pair, n, seed):
    """Values within 1/128 of the dtype's largest: what is sent and what stays are finite, and
    ``residual + sent == c`` (one step, so ``c = g``), fp16 <-> bf16 included."""
    dtype, vdt = pair
    g = near_max(dtype, n, seed)
    comp = TopKCompressor(1.0, value_dtype=vdt, warmup_steps=0)
    payload, ctx = comp.compress(g, name="w")
    sent = comp.decompress(payload, ctx)
    residual = comp.state.residuals.get("w")
    assert bool(torch.isfinite(sent).all()) and bool(torch.isfinite(residual).all())
    assert torch.equal(residual + sent, g)


# Deterministic cases at fp16's maximum, where fp16 and bf16 round past each other.
@pytest.mark.parametrize("dtype,vdt,value", [(F16, BF16, 65504.0), (F16, BF16, -65408.0),
                                             (BF16, F16, 65536.0), (BF16, F16, 1e10)])
def test_half_to_other_half_at_fp16s_max_stays_finite(dtype, vdt, value):
    comp = TopKCompressor(1.0, value_dtype=vdt, warmup_steps=0)
    payload, ctx = comp.compress(torch.tensor([value, 1.0], dtype=dtype), name="w")
    assert bool(torch.isfinite(comp.decompress(payload, ctx)).all())
    assert bool(torch.isfinite(comp.state.residuals.get("w")).all())


@pytest.mark.parametrize("dtype,value", [(F32, 811509824.0), (F64, 3.937059992050329e17)])
def test_clamped_values_keep_the_error_feedback_identity_to_an_ulp(dtype, value):
    """Beyond the wire's range the value is sent clamped and the residual keeps ``c - sent``
    rounded to the gradient dtype (and the check adds in it again): within eps * abs(c)."""
    g = torch.tensor([value, 1.0], dtype=dtype)
    comp = TopKCompressor(1.0, value_dtype=F16, warmup_steps=0)
    payload, ctx = comp.compress(g, name="w")
    err = (comp.state.residuals.get("w") + comp.decompress(payload, ctx)).double() - g.double()
    assert bool((err.abs() <= torch.finfo(dtype).eps * g.double().abs()).all())


# -- 2. error feedback ------------------------------------------------------------------------
@FAST
@given(shape=SHAPES, dtype=st.sampled_from(DTYPES), vdt=st.sampled_from(WIRE), ratio=RATIOS,
       kinds=st.lists(st.sampled_from(KINDS), min_size=2, max_size=3), seed=st.integers(0, 2**31 - 1))
@example(shape=(100_000,), dtype=F64, vdt=None, ratio=0.001, kinds=["sparse", "ties", "normal"], seed=4)
@example(shape=(70_001,), dtype=F32, vdt=F16, ratio=0.01, kinds=["wide", "heavy", "normal"], seed=5)
@example(shape=(70_001,), dtype=F16, vdt=BF16, ratio=0.01, kinds=["normal", "ties"], seed=6)
def test_error_feedback_identity(shape, dtype, vdt, ratio, kinds, seed):
    """Every step, ``residual_after + sent == residual_before + g`` exactly (values), where
    ``sent`` is what decompress returns (the wire value cast back to the gradient dtype) and
    ``residual_before + g`` is computed in the residual's dtype (entries clamped to the wire's
    range: within eps |c|). Bitwise: unselected entries of the residual are ``c`` untouched;
    selected ones are 0 when nothing is narrowed (and the payload carries ``c``), else
    ``c - v`` with ``v`` the payload's value in the gradient dtype."""
    comp = TopKCompressor(ratio, value_dtype=vdt, warmup_steps=0)
    for step, kind in enumerate(kinds):
        g = make_grad(kind, shape, dtype, seed + step)
        c = compensated(comp, "w", g)  # (n,)
        payload, ctx = comp.compress(g, name="w")
        sent = comp.decompress(payload, ctx).reshape(-1)  # (n,)
        residual = comp.state.residuals.get("w")  # (n,)
        assert residual.dtype == dtype
        values, idx = selected(payload, ctx)
        # Entries beyond the wire's range are sent clamped; c - sent then may round
        # (test_clamped_values_keep_the_error_feedback_identity_to_an_ulp), so for them only
        # |residual + sent - c| <= eps |c| (two roundings of <= u |c| each).
        clamped = torch.zeros_like(c, dtype=torch.bool)
        if vdt is not None:
            clamped[idx] = c[idx].double().abs() > torch.finfo(vdt).max
        assert torch.equal((residual + sent)[~clamped], c[~clamped])
        err = ((residual + sent)[clamped].double() - c[clamped].double()).abs()
        assert bool((err <= torch.finfo(dtype).eps * c[clamped].double().abs()).all())
        rest = torch.ones_like(c, dtype=torch.bool)
        rest[idx] = False
        assert bitwise_equal(residual[rest], c[rest])
        if vdt is None or vdt == dtype:
            assert bitwise_equal(values, c[idx]) and not bool(residual[idx].any())
        else:
            assert bitwise_equal(residual[idx], c[idx] - values.to(dtype))
        comp.step_done()


# -- 4. multi-rank decompress -----------------------------------------------------------------
@FAST
@given(shape=SHAPES, dtype=st.sampled_from(DTYPES), vdt=st.sampled_from(WIRE), ratio=RATIOS,
       kind=st.sampled_from(KINDS), world=st.integers(2, 4), same=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
@example(shape=(80_000,), dtype=F32, vdt=F16, ratio=0.01, kind="heavy", world=3, same=False, seed=7)
@example(shape=(300, 257), dtype=BF16, vdt=None, ratio=0.001, kind="ties", world=4, same=False, seed=8)
def test_multi_rank_decompress_is_the_mean(shape, dtype, vdt, ratio, kind, world, same, seed):
    """The gathered payloads of ``world`` ranks, decompressed with ``world = divisor = P``:

    - exactly (values) the reference written here in plain torch ops: every rank's values,
      cast to the gradient dtype and divided by ``P`` (the code divides the gathered values,
      not the sum), added at its indices into zeros, rank after rank (the same additions in
      the same order);
    - the mean of what each rank sent, within the bound of P - 1 additions and one division
      in the gradient dtype: ``|out - mean| <= rtol * sum_r |d_r| / P + (P + 1) * smallest
      subnormal``, with ``rtol = 1e-6`` for float32/float64 (>= (P + 1) eps) and
      ``(P + 1) eps`` for fp16/bf16, ``mean`` computed in float64.

    ``same``: every rank has the same gradient (every index collides). Each rank's payload is
    read with ``unpack``; nothing of ``decompress`` builds the references."""
    comps = [TopKCompressor(ratio, value_dtype=vdt, warmup_steps=0) for _ in range(world)]
    payloads, sends = [], []
    for r, comp in enumerate(comps):
        g = make_grad(kind, shape, dtype, seed if same else seed + r)
        payload, ctx = comp.compress(g, name="w")
        payloads.append(payload)
        sends.append(selected(payload, ctx))  # (values (k,), indices (k,)), distinct indices
    n = math.prod(shape)
    reference = torch.zeros(n, dtype=dtype)
    dense = torch.zeros(world, n, dtype=torch.float64)  # what each rank sent, densified
    for r, (values, idx) in enumerate(sends):
        reference[idx] += values.to(dtype) / world
        dense[r, idx] = values.to(dtype).double()
    ctx = dataclasses.replace(ctx, world=world, divisor=world)
    out = comps[0].decompress(torch.cat(payloads), ctx)
    assert out.shape == shape and out.dtype == dtype
    assert torch.equal(out.reshape(-1), reference)
    mean = dense.sum(0) / world
    magnitude = dense.abs().sum(0) / world
    fi = torch.finfo(dtype)
    rtol = 1e-6 if fi.bits >= 32 else (world + 1) * fi.eps
    tol = rtol * magnitude + (world + 1) * fi.smallest_normal * fi.eps
    assert bool(((out.reshape(-1).double() - mean).abs() <= tol).all())


# -- 5. non-finite input ----------------------------------------------------------------------
@FAST
@given(shape=SHAPES, dtype=st.sampled_from(DTYPES), vdt=st.sampled_from(WIRE), ratio=RATIOS,
       kind=st.sampled_from(KINDS), warm_steps=st.integers(0, 2), bad=st.sampled_from(["nan", "inf", "-inf"]),
       where=st.floats(0, 1, exclude_max=True), world=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
@example(shape=(70_000,), dtype=BF16, vdt=None, ratio=0.01, kind="normal", warm_steps=1, bad="nan",
         where=0.5, world=2, seed=9)
def test_nonfinite_gradient_never_enters_residual_and_poisons_result(shape, dtype, vdt, ratio, kind,
                                                                      warm_steps, bad, where, world, seed):
    """A NaN/Inf anywhere: it never reaches the residual -- after ``unsend()`` (what the
    optimizer does for a step that is not applied) the residual is bitwise ``before + g`` with
    the non-finite entries dropped -- the decompressed result, alone or gathered with finite
    ranks' payloads (the bad one last), is all NaN, and ``(name, [bad rank])`` is recorded in
    ``comp.nonfinite``."""
    comp = TopKCompressor(ratio, value_dtype=vdt, warmup_steps=0)
    for step in range(warm_steps):
        comp.compress(make_grad(kind, shape, dtype, seed + step), name="w")
        comp.step_done()
    before = comp.state.residuals.get("w")
    before = None if before is None else before.clone()
    g = make_grad(kind, shape, dtype, seed + warm_steps)
    g.view(-1)[int(where * g.numel())] = float(bad)
    payload, ctx = comp.compress(g, name="w")
    comp.unsend()
    clean = torch.nan_to_num(g.reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
    expected = clean if before is None else before + clean
    assert bitwise_equal(comp.state.residuals.get("w"), expected)
    others = [TopKCompressor(ratio, value_dtype=vdt, warmup_steps=0).compress(
        make_grad(kind, shape, dtype, seed + 100 + r), name="w")[0] for r in range(world - 1)]
    ctx = dataclasses.replace(ctx, world=world, divisor=world)
    out = comp.decompress(torch.cat([*others, payload]), ctx)
    assert out.shape == shape and out.dtype == dtype and bool(out.isnan().all())
    assert comp.nonfinite == [("w", [world - 1])]


# -- 6. loss scaling --------------------------------------------------------------------------
@FAST
@given(shape=SHAPES, dtype=st.sampled_from([torch.float32, torch.float64]), ratio=RATIOS,
       kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=3), log2_scale=st.integers(-4, 16),
       seed=st.integers(0, 2**31 - 1))
@example(shape=(90_000,), dtype=F32, ratio=0.01, kinds=["normal", "ties"], log2_scale=16, seed=10)
@example(shape=(90_000,), dtype=F64, ratio=0.001, kinds=["heavy", "normal"], log2_scale=-4, seed=11)
def test_power_of_two_scale_is_exact(shape, dtype, ratio, kinds, log2_scale, seed):
    """``compress(g * s, scale=s)`` leaves bitwise the residual ``compress(g)`` leaves, and
    decompresses to exactly ``s`` times its result, step after step. Examples where ``g * s``
    or ``s`` times a sent value overflows, or loses bits to underflow, are skipped: there the
    scaled gradient no longer carries ``g`` exactly."""
    s = 2.0 ** log2_scale
    plain = TopKCompressor(ratio, warmup_steps=0)
    scaled = TopKCompressor(ratio, warmup_steps=0)
    for step, kind in enumerate(kinds):
        g = make_grad(kind, shape, dtype, seed + step)
        gs = g * s
        assume(bool(torch.isfinite(gs).all()) and bitwise_equal(gs / s, g))
        p_plain, ctx_plain = plain.compress(g, name="w")
        d_plain = plain.decompress(p_plain, ctx_plain)
        ds = d_plain * s
        assume(bool(torch.isfinite(ds).all()) and bitwise_equal(ds / s, d_plain))
        p_scaled, ctx_scaled = scaled.compress(gs, name="w", scale=s)
        assert bitwise_equal(scaled.decompress(p_scaled, ctx_scaled), ds)
        assert bitwise_equal(scaled.state.residuals.get("w"), plain.state.residuals.get("w"))
        plain.step_done()
        scaled.step_done()

"""Single-process behaviour of TopKCompressor: selection, error feedback, payload, validation."""

import math

import pytest
import torch

from hvd_topk import TopKCompressor, exchange_bytes, num_selected, pack, unpack

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def compress_once(comp, g, name="w"):
    before = comp.state.residuals.get(name)
    c = g.reshape(-1) + (before if before is not None else 0)
    payload, ctx = comp.compress(g, name=name)
    return c, payload, ctx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 5), (64, 300), (7, 11, 13)])
def test_exact_k_values_and_residual_identity(dtype, shape):
    comp = TopKCompressor(0.01, warmup_steps=0)
    gen = torch.Generator().manual_seed(0)
    for _step in range(3):  # residuals matter from the second step on
        g = torch.randn(shape, generator=gen).to(dtype)
        c, payload, ctx = compress_once(comp, g)
        n = g.numel()
        assert ctx.k == num_selected(n, 0.01) == max(1, math.ceil(0.01 * n))
        assert payload.dtype == torch.uint8 and payload.numel() == ctx.nbytes
        _, values, indices = unpack(payload, ctx.k, ctx.value_dtype, ctx.index_dtype)
        assert values.dtype == dtype and indices.dtype == torch.int32
        idx = indices[0].long()
        assert idx.unique().numel() == ctx.k
        assert torch.equal(values[0], c[idx])  # values are the compensated tensor at the indices
        # The selected magnitudes are the k largest of |c|.
        assert torch.equal(c[idx].abs().float().sort().values,
                           torch.topk(c.abs().float(), ctx.k).values.sort().values)
        sent = comp.decompress(payload, ctx).reshape(-1)
        assert sent.dtype == dtype and sent.shape == c.shape
        assert torch.equal(comp.state.residuals.get("w") + sent, c)  # residual + sent == compensated, exactly


def test_ratio_one_is_no_compression():
    comp = TopKCompressor(1.0)
    g = torch.randn(40, 30)
    payload, ctx = comp.compress(g, name="w")
    assert torch.equal(comp.decompress(payload, ctx), g)
    assert torch.count_nonzero(comp.state.residuals.get("w")) == 0


def test_numel_below_one_over_ratio_sends_one():
    comp = TopKCompressor(0.001, warmup_steps=0)
    g = torch.tensor([0.1, -5.0, 2.0])
    payload, ctx = comp.compress(g, name="b")
    assert ctx.k == 1
    assert torch.equal(comp.decompress(payload, ctx), torch.tensor([0.0, -5.0, 0.0]))
    assert torch.equal(comp.state.residuals.get("b"), torch.tensor([0.1, 0.0, 2.0]))


def test_error_feedback_eventually_sends_everything():
    comp = TopKCompressor(0.25, warmup_steps=0)
    g = torch.tensor([4.0, 3.0, 2.0, 1.0])
    total = torch.zeros(4)
    for _ in range(4):
        payload, ctx = comp.compress(g if _ == 0 else torch.zeros(4), name="w")
        total += comp.decompress(payload, ctx)
    assert torch.equal(total, g)


def test_default_warmup_starts_dense_ish():
    comp = TopKCompressor(0.01)
    assert comp.warmup_steps == 100 and comp.current_ratio() == 0.25
    comp.state.steps = 100
    assert comp.current_ratio() == 0.01


def test_zero_element_tensor():
    comp = TopKCompressor(0.01)
    payload, ctx = comp.compress(torch.empty(0, 5), name="e")
    assert payload.numel() == 8 and ctx.k == 0  # the header alone
    assert comp.decompress(payload, ctx).shape == (0, 5)


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16])
def test_narrow_value_dtype_keeps_rounding_error_in_residual(value_dtype):
    comp = TopKCompressor(0.05, value_dtype=value_dtype, warmup_steps=0)
    g = torch.randn(1000, dtype=torch.float32)
    payload, ctx = comp.compress(g, name="w")
    assert ctx.nbytes == 8 + ctx.k * (2 + 4)  # header, fp16 values, int32 indices
    sent = comp.decompress(payload, ctx)
    assert sent.dtype == torch.float32
    assert torch.equal(comp.state.residuals.get("w") + sent, g)


def test_decompress_sums_ranks_and_divides():
    comp = TopKCompressor(0.5)
    _, ctx = comp.compress(torch.zeros(4), name="x")
    p0 = pack(torch.tensor([1.0, 2.0]), torch.tensor([0, 3], dtype=torch.int32), ctx.signature)
    p1 = pack(torch.tensor([4.0, 8.0]), torch.tensor([3, 1], dtype=torch.int32), ctx.signature)
    ctx.divisor = 2
    out = comp.decompress(torch.cat([p0, p1]), ctx)
    assert torch.equal(out, torch.tensor([0.5, 4.0, 0.0, 3.0]))


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), float("inf"), "a", None])
def test_bad_ratio_rejected(bad):
    with pytest.raises(ValueError, match=r"ratio must be"):
        TopKCompressor(bad)


def test_other_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="value_dtype"):
        TopKCompressor(0.01, value_dtype=torch.int8)
    with pytest.raises(ValueError, match="min_numel"):
        TopKCompressor(0.01, min_numel=-1)
    with pytest.raises(ValueError, match="warmup_steps"):
        TopKCompressor(0.01, warmup_steps=1.5)


def test_compress_without_name_points_to_our_optimizer():
    with pytest.raises(RuntimeError, match="hvd_topk.DistributedOptimizer"):
        TopKCompressor(0.01).compress(torch.randn(10))


def test_density_aware_decision():
    # allgather: (P-1) (8 + 8 k) against a ring allreduce's 2 (P-1)/P * 4 n
    cost = exchange_bytes(numel=1000, k=10, world=2, grad_bytes=4, value_bytes=4, index_bytes=4)
    assert cost["allgather"] < cost["dense"]
    cost = exchange_bytes(numel=1000, k=10, world=100, grad_bytes=4, value_bytes=4, index_bytes=4)
    assert cost["allgather"] > cost["dense"]
    comp = TopKCompressor(0.01, min_numel=0, warmup_steps=0, exchange="allgather")
    assert comp.wants_sparse(torch.zeros(100_000), world=8)
    assert not comp.wants_sparse(torch.zeros(100_000), world=256)  # 255*8008 > 2*255/256*4e5
    assert not TopKCompressor(0.01).wants_sparse(torch.zeros(100), world=2)  # below min_numel
    assert not comp.wants_sparse(torch.zeros(10, dtype=torch.int64), world=2)  # not floating


def test_state_dict_round_trip_weights_only(tmp_path):
    comp = TopKCompressor(0.1)
    comp.compress(torch.randn(100), name="a")
    comp.step_done()
    torch.save(comp.state_dict(), tmp_path / "s.pt")
    other = TopKCompressor(0.1)
    other.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert other.steps == 1
    assert torch.equal(other.state.residuals.get("a"), comp.state.residuals.get("a"))


def test_nonfinite_gradient_with_momentum_correction_keeps_memory_finite():
    """Momentum path: NaN/Inf entries are dropped before the velocity sees them; after unsend()
    (a step that is not applied) velocity and residual are those of a step whose gradient had
    those entries at 0."""
    comp = TopKCompressor(0.01, warmup_steps=0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        comp.compress(torch.randn(5000, generator=gen), name="w", momentum=0.9)
        comp.step_done()
    u, e = comp.state.velocities.get("w").clone(), comp.state.residuals.get("w").clone()
    g = torch.randn(5000, generator=gen)
    g[7], g[4000] = float("nan"), float("-inf")
    payload, ctx = comp.compress(g, name="w", momentum=0.9)
    assert ctx.flags == 1
    comp.unsend()
    clean = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    u_expected = u.mul(0.9).add(clean)
    assert torch.equal(comp.state.velocities.get("w"), u_expected)
    assert torch.equal(comp.state.residuals.get("w"), e.add(u_expected))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("scale,value_dtype", [(1.0, None), (1024.0, None), (1.0, torch.float16)])
def test_fused_kernel_path_sends_and_keeps_what_the_reference_path_does(momentum, scale, value_dtype):
    """compress() through the one-call CPU kernel and through the torch steps: the same
    (index, value) pairs on the wire, the same residual and velocity bits, over several steps
    (a small tensor, a sampled one; a NaN at step 3). The fused run calls the kernel at every
    step, the reference run never."""
    from hvd_topk import cpu_kernel, use_cpu_kernel
    if cpu_kernel() is None:
        pytest.skip("CPU kernel not built (compiler, ninja?): nothing to compare")

    def run(fused, n):
        comp = TopKCompressor(0.01, warmup_steps=0, value_dtype=value_dtype)
        gen = torch.Generator().manual_seed(1)
        sent = []
        for step in range(5):
            g = torch.randn(n, generator=gen) * (1 + step) * scale
            if step == 3:
                g[n // 3] = float("nan")
            with use_cpu_kernel(fused) as use:
                payload, ctx = comp.compress(g, name="w", momentum=momentum, scale=scale)
            assert (use.calls > 0) == fused, f"fused={fused}, step {step}: {use.calls} kernel calls"
            headers, vals, idx = unpack(payload, ctx.k, ctx.value_dtype, ctx.index_dtype, 1)
            order = idx.reshape(-1).argsort()
            sent.append((headers, vals.reshape(-1)[order], idx.reshape(-1)[order]))
            comp.step_done()
        return sent, comp.state.residuals.get("w"), comp.state.velocities.get("w")

    for n in (5000, 300_000):
        a, b = run(True, n), run(False, n)
        for (h1, v1, i1), (h2, v2, i2) in zip(a[0], b[0]):
            assert torch.equal(h1, h2) and torch.equal(v1, v2) and torch.equal(i1, i2)
        assert torch.equal(a[1], b[1])
        assert (a[2] is None and b[2] is None) or torch.equal(a[2], b[2])


def test_a_regrouped_residual_keeps_its_values_and_frees_the_old_buffer():
    """ResidualMemory.group_buffer: when tensors are regrouped (frozen set, warm-up ratio), the
    residuals move into the new buffer and the superseded one is not kept alive."""
    import gc
    import weakref

    from hvd_topk import ResidualMemory
    memory = ResidualMemory()
    old = memory.group_buffer(["a", "b"], [3, 2], torch.zeros(1))
    old.copy_(torch.arange(5.0))
    gone = weakref.ref(old)
    del old
    new = memory.group_buffer(["a", "b", "c"], [3, 2, 4], torch.zeros(1))
    gc.collect()
    assert gone() is None
    assert torch.equal(new[:5], torch.arange(5.0)) and torch.equal(memory.get("b"), torch.tensor([3.0, 4.0]))


def test_probe_flags_nonfinite_tensors_large_and_small_alike():
    """The dense tensors' NaN/Inf probe: large CPU tensors are probed one by one (with the
    CPU kernel in force), the small ones together; the flags are the same, in the tensors'
    order, for every dtype, on both paths."""
    from hvd_topk import cpu_kernel, use_cpu_kernel
    from hvd_topk.update import CPU_PROBE_ONE_BY_ONE, stacked_probe

    for kernel in ([False, True] if cpu_kernel() is not None else [False]):
        with use_cpu_kernel(kernel):
            _probe_flags(CPU_PROBE_ONE_BY_ONE, stacked_probe)


def _probe_flags(big, stacked_probe):
    tensors = [torch.randn(5), torch.randn(big), torch.randn(3, dtype=torch.float64),
               torch.randn(big + 1, dtype=torch.bfloat16), torch.zeros(0),
               torch.randn(big, dtype=torch.complex64), torch.randn(big, dtype=torch.float64)]
    assert stacked_probe(tensors).tolist() == [False] * 7
    tensors[1][7] = float("nan")
    tensors[2][0] = float("inf")
    tensors[3][-1] = float("-inf")
    tensors[5][9] = complex(0, float("inf"))
    tensors[6][0] = 1e300  # finite, beyond float32
    assert stacked_probe(tensors).tolist() == [False, True, True, True, False, True, False]
    assert stacked_probe([torch.full((big,), float("nan"))]).tolist() == [True]

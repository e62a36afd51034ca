"""Adam correction: the compressor's step against the written-out algorithm (one process),
the optimizer's choice of correction, and the 2-rank checks of tests/workers/adam_worker.py
(Gloo and MPI) against an independent reference."""

import math

import pytest
import torch
from launch import run_ranks

import hvd_topk
from hvd_topk import AdamSettings, TopKCompressor
from hvd_topk import cpu_kernel, use_cpu_kernel


def reference(grads, ratio, adam, variance_steps, value_dtype=None, clip=10.0, select="agreement"):
    """The sent updates, step by step, of one rank's Adam correction (torch.topk, no
    hvd_topk code): local moments, bias correction, frozen variance, error feedback of the
    step lr * direction, ranked as adam_select=``select`` ranks: r * m / (sqrt(s) + eps) where positive,
    |r| * |m| / (sqrt(s) + eps), |r| * |m| or |r|."""
    n = grads[0].numel()
    m, s, smax, r = (torch.zeros(n) for _ in range(4))
    out = []
    for t, g in enumerate(grads, start=1):
        m.lerp_(g, 1 - adam.beta1)
        tv = t if variance_steps is None else min(t, variance_steps)
        if t == tv:
            s.mul_(adam.beta2).addcmul_(g, g, value=1 - adam.beta2)
            smax = torch.maximum(smax, s)
        den = smax if adam.amsgrad else s
        d = (m / (1 - adam.beta1 ** t)) / (den.sqrt() / math.sqrt(1 - adam.beta2 ** tv) + adam.eps)
        r += adam.lr * d.clamp(-clip, clip)
        weight = {"signal": m / (den.sqrt() + adam.eps), "momentum": m, "displacement": 1.0,
                  "agreement": m / (den.sqrt() + adam.eps)}[select]
        score = (weight * r).clamp(min=0) if select == "agreement" else (weight * r).abs()
        idx = torch.topk(score, hvd_topk.num_selected(n, ratio)).indices
        sent = torch.zeros(n)
        sent[idx] = r[idx] if value_dtype is None else r[idx].to(value_dtype).float()
        r -= sent
        out.append((sent, r.clone(), m.clone(), s.clone()))
    return out


def grads_of(steps, n=5000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) * (1 + t) for t in range(steps)]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("variance_steps", [None, 3])
@pytest.mark.parametrize("select", ["agreement", "signal", "momentum", "displacement"])
def test_adam_correction_follows_the_written_out_algorithm(amsgrad, variance_steps, select):
    adam = AdamSettings(0.9, 0.99, 1e-3, amsgrad, lr=0.003)
    comp = TopKCompressor(0.02, warmup_steps=0, adam_variance_steps=variance_steps, adam_select=select)
    grads = grads_of(8)
    want = reference(grads, 0.02, adam, variance_steps, select=select)
    for t, (g, (sent, r, m, s)) in enumerate(zip(grads, want)):
        payload, ctx = comp.compress_group([g], ["w"], adam=adam)
        ctx.world = 1
        got = comp.scatter(payload, ctx)
        comp.step_done()  # the step is applied: its residual write
        torch.testing.assert_close(got, sent, rtol=1e-6, atol=0, msg=lambda e, t=t: f"step {t}: {e}")
        torch.testing.assert_close(comp.state.residuals.get("w"), r, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(comp.state.exp_avg.get("w"), m, rtol=1e-6, atol=0)
        torch.testing.assert_close(comp.state.exp_avg_sq.get("w"), s, rtol=1e-6, atol=0)
        comp.step_done()
    assert comp.state.adam_steps == {"w": 8}


def test_a_group_whose_tensors_took_different_numbers_of_steps():
    """Each tensor keeps its own step count (bias correction, frozen variance): a tensor
    trained alone first, then grouped with a new one, is corrected as if it were alone."""
    adam = AdamSettings(0.9, 0.99, 1e-3)
    # Unclipped: clipped entries tie at +-adam_clip, and torch.topk breaks ties its own way.
    comp = TopKCompressor(0.02, warmup_steps=0, adam_variance_steps=2, adam_clip=None)
    a, b = grads_of(6, seed=1), grads_of(3, n=3000, seed=2)
    for g in a[:3]:
        comp.compress_group([g], ["a"], adam=adam)
        comp.step_done()
    for ga, gb in zip(a[3:], b):  # a is at steps 4..6 (variance frozen), b at 1..3
        payload, ctx = comp.compress_group([ga, gb], ["a", "b"], adam=adam)
        comp.step_done()
    assert comp.state.adam_steps == {"a": 6, "b": 3}
    ref_a, ref_b = (reference(x, 0.02, adam, 2, clip=math.inf)[-1] for x in (a, b))
    for name, (_, r, m, s) in (("a", ref_a), ("b", ref_b)):
        torch.testing.assert_close(comp.state.residuals.get(name), r, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(comp.state.exp_avg.get(name), m, rtol=1e-6, atol=0)
        torch.testing.assert_close(comp.state.exp_avg_sq.get(name), s, rtol=1e-6, atol=0)


def test_a_loss_scale_leaves_the_moments_unscaled():
    """GradScaler's scale (a device tensor, never read): moments and residual are those of
    the unscaled gradient, bit for bit (a power of two); the sent values carry the scale."""
    adam = AdamSettings(0.9, 0.999, 1e-8)
    plain, scaled = TopKCompressor(0.01, warmup_steps=0), TopKCompressor(0.01, warmup_steps=0)
    for g in grads_of(3):
        want, _ = plain.compress_group([g], ["w"], adam=adam)
        got, ctx = scaled.compress_group([g * 512], ["w"], adam=adam, scale=torch.tensor(512.0))
        for memory in ("residuals", "exp_avg", "exp_avg_sq"):
            assert torch.equal(getattr(scaled.state, memory).get("w"),
                               getattr(plain.state, memory).get("w")), memory
        plain.step_done()
        scaled.step_done()
    ctx.world = 1
    sent = scaled.scatter(got, ctx)
    assert torch.count_nonzero(sent) == 50 and sent.abs().max() > 100  # in the scaled units


def test_the_torch_path_is_taken_with_the_kernel_too():
    """The fused CPU kernel has no Adam step: with the kernel switched on, Adam correction makes
    no kernel call and gives the bits of a run with the kernel switched off. Without a built
    kernel both runs would take the torch steps: nothing to compare, skipped."""
    if cpu_kernel() is None:
        pytest.skip("CPU kernel not built (compiler, ninja?): nothing to compare")
    adam = AdamSettings(0.9, 0.99, 1e-8)
    g = grads_of(2)

    def run():
        comp = TopKCompressor(0.01, warmup_steps=0)
        for x in g:
            payload, _ = comp.compress_group([x], ["w"], adam=adam)
            comp.step_done()
        return payload

    with use_cpu_kernel(True) as use:
        with_kernel = run()
        assert use.calls == 0, "Adam correction called the fused kernel"
        # The kernel is live in this block: a plain compression of the same gradient takes it.
        TopKCompressor(0.01, warmup_steps=0).compress_group([g[0]], ["w"])
        assert use.calls > 0, "the kernel was not in force: the comparison would be torch with torch"
    with use_cpu_kernel(False):
        without = run()
    assert torch.equal(with_kernel, without)


def test_state_dict_carries_the_moments():
    adam = AdamSettings(0.9, 0.99, 1e-3, amsgrad=True)
    comp = TopKCompressor(0.02, warmup_steps=0)
    grads = grads_of(4)
    for g in grads[:2]:
        comp.compress_group([g], ["w"], adam=adam)
        comp.step_done()
    state = comp.state_dict()
    assert set(state) >= {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "adam_steps"}
    other = TopKCompressor(0.02, warmup_steps=0)
    other.load_state_dict(state)
    for g in grads[2:]:
        a, _ = comp.compress_group([g], ["w"], adam=adam)
        b, _ = other.compress_group([g], ["w"], adam=adam)
        assert torch.equal(a, b)
        comp.step_done()
        other.step_done()


def test_adam_and_momentum_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        TopKCompressor(0.1).compress_group([torch.randn(10)], ["w"], momentum=0.9,
                                           adam=AdamSettings(0.9, 0.99, 1e-8))


def test_a_frozen_variance_does_not_let_a_late_gradient_explode():
    """An entry whose gradient was tiny while the variance was estimated, then large: its
    direction is clipped to adam_clip (Adam's own would stay near 1)."""
    adam = AdamSettings(0.9, 0.99, 1e-8)
    grads = [torch.full((5000,), 1e-4) for _ in range(3)] + [torch.full((5000,), 1.0)]
    for clip, bound in ((10.0, 10.0), (None, 1e3)):
        comp = TopKCompressor(1.0, warmup_steps=0, adam_variance_steps=3, adam_clip=clip)
        for g in grads:
            payload, ctx = comp.compress_group([g], ["w"], adam=adam)
            comp.step_done()
        ctx.world = 1
        sent = comp.scatter(payload, ctx)
        assert sent.max() <= bound if clip else sent.max() > bound  # unclipped: ~1e3 Adam steps


@pytest.mark.parametrize("bad", [{"adam_correction": "yes"}, {"adam_variance_steps": 0},
                                 {"adam_variance_steps": 2.5}, {"adam_clip": 0},
                                 {"adam_select": "gain"}])
def test_settings_are_validated(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TopKCompressor(0.01, **bad)



@pytest.mark.parametrize("make,kind", [
    (lambda ps: torch.optim.AdamW(ps), "AdamCorrection"),
    (lambda ps: torch.optim.Adam(ps, weight_decay=0.1), "AdamCorrection"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "MomentumCorrection"),
    (lambda ps: torch.optim.SGD(ps, lr=0.1), None),
    (lambda ps: torch.optim.RMSprop(ps), None)])
def test_the_correction_is_chosen_automatically(make, kind):
    from hvd_topk.corrections import correction_groups
    p = torch.nn.Parameter(torch.zeros(3))
    found = correction_groups(make([p]), TopKCompressor(0.01))
    assert (type(found[p]).__name__ if found else None) == kind
    assert correction_groups(make([p]), TopKCompressor(1.0)) == {}  # everything sent: nothing to correct
    assert correction_groups(make([p]), TopKCompressor(0.01, adam_correction=False,
                                                       momentum_correction=False)) == {}


def test_the_automatic_warmup_is_longer_under_adam_correction_below_one_percent():
    from hvd_topk.corrections import CorrectionSet
    from hvd_topk.settings import warmup_steps_for
    assert [warmup_steps_for(r) for r in (0.1, 0.01, 0.001)] == [100, 100, 100]
    adam = [warmup_steps_for(r, adam=True) for r in (0.1, 0.01, 0.005, 0.001, 0.0001)]
    assert adam == [100, 100, 141, 316, 1000]
    p = torch.nn.Parameter(torch.zeros(3))
    for make, ratio, steps in [(torch.optim.AdamW, 0.001, 316), (torch.optim.AdamW, 0.01, 100),
                               (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 0.001, 100)]:
        comp = TopKCompressor(ratio)
        assert comp.warmup_steps == 100 and comp.settings.warmup_steps is None  # auto, no optimizer yet
        CorrectionSet().rebuild(make([p]), comp)
        assert comp.warmup_steps == steps
        schedule = [comp.current_ratio()]
        comp.state.steps = steps - 1
        schedule.append(comp.current_ratio())
        comp.state.steps = steps
        schedule.append(comp.current_ratio())
        assert schedule[0] == 0.25 and schedule[1] > ratio and schedule[2] == ratio, (ratio, steps, schedule)
    comp = TopKCompressor(0.001, warmup_steps=50)  # given: kept whatever the optimizer
    CorrectionSet().rebuild(torch.optim.AdamW([p]), comp)
    assert comp.warmup_steps == 50
    comp = TopKCompressor(0.001, adam_correction=False)  # Adam without the correction: SGD's length
    CorrectionSet().rebuild(torch.optim.AdamW([p]), comp)
    assert comp.warmup_steps == 100


def test_adamw_decoupled_and_adam_coupled_weight_decay():
    from hvd_topk.corrections import correction_groups
    p = torch.nn.Parameter(torch.ones(3))
    adamw = correction_groups(torch.optim.AdamW([p], weight_decay=0.1), TopKCompressor(0.01))[p]
    adam = correction_groups(torch.optim.Adam([p], weight_decay=0.1), TopKCompressor(0.01))[p]
    g = torch.zeros(3)
    assert torch.equal(adamw.local_grad(p, g, 1.0), g)  # applied in step(), not sent
    assert torch.allclose(adam.local_grad(p, g, 4.0), torch.full((3,), 0.4))  # in the scaled units
    with torch.no_grad():
        adamw.apply(p, torch.full((3,), 0.5))  # the update is a displacement: no lr on it
    assert torch.allclose(p, torch.full((3,), 1 - 1e-3 * 0.1 - 0.5))


def test_adam_correction_required_where_it_does_not_fit():
    from hvd_topk.corrections import correction_groups
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="adam_correction=True needs torch.optim.Adam"):
        correction_groups(torch.optim.SGD([p], lr=0.1, momentum=0.9),
                          TopKCompressor(0.01, adam_correction=True, momentum_correction=False))


CHECKS = ["adam_dense_first", "adam_all_options", "adam_all_options_grouped", "adam_coupled_maximize",
          "adam_ratio_one", "adam_elastic_state", "adam_sparse_allreduce",
          "adam_sparse_allreduce_bf16"]


@pytest.mark.parametrize("backend", ["gloo", "mpi"])
def test_adam_correction_on_two_ranks(backend):
    out = run_ranks("adam_worker.py", *CHECKS, backend=backend, np=2, timeout=300)
    for check in CHECKS:
        for rank in range(2):
            assert f"rank {rank}/2 [{backend}] {check}: OK" in out, out

"""Deep Gradient Compression techniques: momentum correction, masking, warm-up, clipping."""

import math

import pytest
import torch

from hvd_topk import TopKCompressor


def sent_of(comp, g, name="w", **kw):
    payload, ctx = comp.compress(g, name=name, **kw)
    return comp.decompress(payload, ctx)


def test_momentum_correction_follows_dgc_equations():
    """u_t = m u_{t-1} + g_t;  v_t = v_{t-1} + u_t;  send top-k of v;  v, u zeroed where sent."""
    m = 0.9
    comp = TopKCompressor(0.5, warmup_steps=0)  # k = 2 of 4
    g1 = torch.tensor([1.0, -4.0, 2.0, 0.5])
    s1 = sent_of(comp, g1, momentum=m)
    assert torch.equal(s1, torch.tensor([0.0, -4.0, 2.0, 0.0]))
    assert torch.equal(comp.state.velocities.get("w"), torch.tensor([1.0, 0.0, 0.0, 0.5]))  # masked
    assert torch.equal(comp.state.residuals.get("w"), torch.tensor([1.0, 0.0, 0.0, 0.5]))
    g2 = torch.tensor([0.25, 1.0, -1.0, 3.0])
    u2 = m * torch.tensor([1.0, 0.0, 0.0, 0.5]) + g2  # [1.15, 1.0, -1.0, 3.45]
    v2 = torch.tensor([1.0, 0.0, 0.0, 0.5]) + u2  # [2.15, 1.0, -1.0, 3.95]
    s2 = sent_of(comp, g2, momentum=m)
    assert torch.allclose(s2, torch.tensor([v2[0], 0, 0, v2[3]]))
    assert torch.allclose(comp.state.residuals.get("w"), torch.tensor([0.0, v2[1], v2[2], 0.0]))
    assert torch.allclose(comp.state.velocities.get("w"), torch.tensor([0.0, u2[1], u2[2], 0.0]))


def test_momentum_correction_nesterov():
    m = 0.5
    comp = TopKCompressor(1.0, momentum_masking=False)
    g1, g2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    assert torch.equal(sent_of(comp, g1, momentum=m, nesterov=True), g1 + m * g1)
    u2 = m * g1 + g2
    assert torch.allclose(sent_of(comp, g2, momentum=m, nesterov=True), g2 + m * u2)


def test_without_masking_full_density_is_momentum_sgd():
    """At ratio 1 without masking, the sent update is exactly SGD's momentum buffer."""
    m = 0.9
    comp = TopKCompressor(1.0, momentum_masking=False)
    buf = torch.zeros(5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        g = torch.randn(5, generator=gen)
        buf = m * buf + g
        assert torch.allclose(sent_of(comp, g, momentum=m), buf, rtol=1e-6, atol=1e-7)


def test_warmup_schedule_is_dgc_exponential():
    comp = TopKCompressor(0.001, warmup_steps=4, warmup_ratio=0.25)
    got = []
    for _ in range(6):
        got.append(comp.current_ratio())
        comp.step_done()
    # DGC: 25% -> 6.25% -> 1.56% -> 0.4% -> 0.1% (here exactly geometric from 0.25 to 0.001)
    want = [0.25 * (0.001 / 0.25) ** (s / 4) for s in range(4)] + [0.001, 0.001]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[1] == pytest.approx(0.0629, abs=1e-4) and got[3] == pytest.approx(0.00397, abs=1e-5)


def test_warmup_changes_k():
    comp = TopKCompressor(0.01, warmup_steps=2, warmup_ratio=0.5)
    _, ctx0 = comp.compress(torch.randn(1000), name="w")
    comp.step_done()
    comp.step_done()
    _, ctx2 = comp.compress(torch.randn(1000), name="w")
    assert (ctx0.k, ctx2.k) == (500, 10)


def test_local_clipping_bounds_the_accumulated_gradient():
    comp = TopKCompressor(0.1, local_clip_norm=1.0, warmup_steps=0)
    comp.world_size = 4
    g = torch.randn(1000) * 100
    sent = sent_of(comp, g)
    total = sent + comp.state.residuals.get("w")
    assert math.isclose(float(total.norm()), 1.0 / math.sqrt(4), rel_tol=1e-4)


def test_state_dict_carries_velocity():
    comp = TopKCompressor(0.5)
    sent_of(comp, torch.tensor([1.0, 2.0, 3.0, 4.0]), momentum=0.9)
    other = TopKCompressor(0.5)
    other.load_state_dict(comp.state_dict())
    assert torch.equal(other.state.velocities.get("w"), comp.state.velocities.get("w"))


@pytest.mark.parametrize("bad", [{"momentum_correction": "yes"}, {"local_clip_norm": 0},
                                 {"warmup_ratio": 2.0}])
def test_bad_options_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TopKCompressor(0.01, **bad)


@pytest.mark.parametrize("lr", [0.1, 0.0123, "tensor"])
@pytest.mark.parametrize("maximize", [False, True])
def test_a_corrected_update_applied_at_its_positions_gives_the_bits_of_the_dense_apply(lr, maximize):
    """The sparse apply (only where the exchange wrote, duplicates among the positions) moves
    every entry to the same bits as the dense ``p -= lr * update`` over the whole tensor, for
    SGD's momentum correction and Adam's; entries outside the positions stay untouched."""
    from hvd_topk.corrections import AdamCorrection, MomentumCorrection
    g = torch.Generator().manual_seed(3)
    n = 100_003  # not a multiple of any vector width
    at = torch.randint(0, n, (3000,), generator=g)
    at = torch.cat([at, at[:500]])  # two ranks sent some of the same positions
    update = torch.zeros(n)
    update[at] = torch.randn(at.numel(), generator=g)
    rate = torch.tensor(0.0123) if lr == "tensor" else lr
    groups = [{"lr": rate, "momentum": 0.9, "nesterov": False, "maximize": maximize}]
    corrections = [MomentumCorrection(groups[0]),
                   AdamCorrection({"lr": rate, "weight_decay": 0.01, "maximize": maximize}, 0, True)]
    for correction in corrections:
        p = torch.randn(n, generator=g)
        dense, sparse = p.clone(), p.clone()
        correction.apply(dense, update)
        correction.apply(sparse, update, at)
        assert torch.equal(dense, sparse), type(correction).__name__

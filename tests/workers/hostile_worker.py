"""Hostile inputs on 2 ranks (run by tests/test_reliability.py): each gets a clear outcome on
every rank -- the same error, or a consistent result -- never a hang or a poisoned residual.

Usage: ``hostile_worker.py CHECK [CHECK ...]``; prints ``rank r/2 CHECK: OK`` per check.
``mismatch_*`` checks end the process (a failed collective leaves Horovod mid-step).
"""

import os

import horovod.torch as hvd
import rank_checks
import torch
import torch.nn as nn

import hvd_topk

# HVD_TOPK_TEST_EXCHANGE=sparse_allreduce runs every check on the sparse allreduce.
EXCHANGE = os.environ.get("HVD_TOPK_TEST_EXCHANGE", "auto")
# A named exchange is asked for as such: without density_aware's dense fallback, which takes
# the sparse allreduce dense above a density of 1/64 (exchange_core.MEMORY_BUDGET).
NAMED = {} if EXCHANGE == "auto" else {"density_aware": False}


class Net(nn.Module):
    """Two layers big enough to go sparse (min_numel=256), a bias-only head, a spare branch."""

    def __init__(self, seed=0, hidden=64):
        super().__init__()
        torch.manual_seed(seed)
        self.big = nn.Linear(32, hidden)
        self.out = nn.Linear(hidden, 4)
        self.spare = nn.Linear(32, 32)  # used only when a check asks for it

    def forward(self, x, use_spare=False):
        h = torch.relu(self.big(x))
        if use_spare:
            h = h + torch.relu(self.spare(x)).sum(dim=1, keepdim=True)
        return self.out(h)


def batch(step):
    g = torch.Generator().manual_seed(1000 * hvd.rank() + step)
    return torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)


def make(model, nonfinite="raise", grad_scaler=None, momentum=0.9, weight_decay=0.0, **comp_kw):
    comp_kw.setdefault("min_numel", 256)
    comp_kw.setdefault("warmup_steps", 0)
    comp = hvd_topk.TopKCompressor(0.05, exchange=EXCHANGE, **NAMED, **comp_kw)
    opt = hvd_topk.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay),
        named_parameters=model.named_parameters(), compression=comp, nonfinite=nonfinite,
        grad_scaler=grad_scaler)
    return comp, opt


def loss_of(model, step, **kw):
    x, y = batch(step)
    return nn.functional.cross_entropy(model(x, **kw), y)


def snapshot(model, comp, poisoned=None):
    """Parameters, and the residual and velocity of the ``poisoned`` parameter (all of them
    when None, none when ""). A step that is not applied leaves the parameters as they were;
    residuals keep that step's finite gradient owed (tests/test_properties.py checks that
    bit for bit), so only their finiteness is checked here."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = comp.state
    residuals = {n: state.residuals.get(n).clone() for n in state.residuals if poisoned in (None, n)}
    velocities = {n: state.velocities.get(n).clone() for n in state.velocities if poisoned in (None, n)}
    assert poisoned is None or poisoned == "" or poisoned in residuals, poisoned
    return params, residuals, velocities


def assert_snapshot_equal(a, b, what):
    for part, x, y in zip(("params", "residuals", "velocities"), a, b):
        assert x.keys() == y.keys(), (what, part)
        for n in x:
            assert torch.equal(x[n], y[n]), f"{what}: {part} {n} changed"


def assert_memory_finite(comp):
    for mem in (comp.state.residuals, comp.state.velocities):
        for n in mem:
            assert torch.isfinite(mem.get(n)).all(), f"residual/velocity of {n} is not finite"


def assert_same_on_all_ranks(model, what):
    for name, p in model.named_parameters():
        t = torch.view_as_real(p.detach()) if p.is_complex() else p.detach()
        g = hvd.allgather(t.reshape(1, -1))
        assert torch.equal(g, g[:1].expand_as(g)), f"{what}: {name} differs between ranks"


def poison_on(rank, param, value=float("nan")):
    """A tensor hook that makes ``param``'s gradient non-finite on ``rank`` (before Horovod's
    hook sees it, as a bad batch would)."""
    if hvd.rank() != rank:
        return None
    return param.register_hook(lambda g: g * value)


def train(model, opt, steps, start=0, **kw):
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, step, **kw).backward()
        opt.step()


def check_nonfinite_raise():
    model = Net()
    comp, opt = make(model)
    train(model, opt, 2)
    before = snapshot(model, comp, "")
    hook = poison_on(1, model.big.weight)
    opt.zero_grad()
    loss_of(model, 2).backward()
    try:
        opt.step()
    except FloatingPointError as e:
        msg = str(e)
    else:
        raise AssertionError("a NaN gradient on rank 1 did not raise")
    assert "'big.weight' (rank [1])" in msg, msg
    assert_snapshot_equal(before, snapshot(model, comp, ""), "after the refused step")
    assert_memory_finite(comp)
    if hook is not None:
        hook.remove()
    train(model, opt, 2, start=3)  # training goes on, residuals finite
    assert_memory_finite(comp)
    assert_same_on_all_ranks(model, "after recovery")


def check_nonfinite_skip():
    model = Net()
    comp, opt = make(model, nonfinite="skip")
    train(model, opt, 2)
    before = snapshot(model, comp, "")
    hook = poison_on(0, model.big.weight, float("inf"))
    opt.zero_grad()
    loss_of(model, 2).backward()
    assert opt.step() is None
    assert opt.skipped_steps == 1
    assert_snapshot_equal(before, snapshot(model, comp, ""), "after the skipped step")
    assert_memory_finite(comp)
    if hook is not None:
        hook.remove()
    train(model, opt, 2, start=3)
    assert opt.skipped_steps == 1
    assert_same_on_all_ranks(model, "after the skip")


def check_nonfinite_dense_tensor():
    """A NaN in a tensor the compressor leaves dense (below min_numel) is reported too."""
    model = Net()
    comp, opt = make(model)
    hook = poison_on(1, model.out.bias)
    loss_of(model, 0).backward()
    try:
        opt.step()
    except FloatingPointError as e:
        assert "'out.bias' (after allreduce)" in str(e), str(e)
    else:
        raise AssertionError("a NaN in a dense tensor did not raise")
    if hook is not None:
        hook.remove()


def amp_step(model, opt, scaler, step):
    """Horovod's AMP recipe (docs: 'Mixed precision'), with torch.amp.GradScaler."""
    opt.zero_grad()
    scaler.scale(loss_of(model, step)).backward()
    opt.synchronize()
    scaler.unscale_(opt)
    with opt.skip_synchronize():
        scaler.step(opt)
    scaler.update()


def check_amp_overflow_skipped():
    model = Net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    comp, opt = make(model, grad_scaler=scaler, weight_decay=1e-4)
    for step in range(3):
        amp_step(model, opt, scaler, step)
    before = snapshot(model, comp, "")
    scale = scaler.get_scale()
    hook = poison_on(0, model.big.weight, float("inf"))
    amp_step(model, opt, scaler, 3)  # the scaler sees the NaN gradient on every rank
    assert scaler.get_scale() == scale / 2, (scaler.get_scale(), scale)
    assert_snapshot_equal(before, snapshot(model, comp, ""), "after the overflow step")
    assert_memory_finite(comp)
    if hook is not None:
        hook.remove()
    for step in range(4, 7):
        amp_step(model, opt, scaler, step)
    assert_same_on_all_ranks(model, "after AMP recovery")


def check_amp_scale_changes_exact():
    """Residuals are kept unscaled: a run whose loss scale doubles every step (and backs off
    after an injected overflow) ends bit-identical to the same run without loss scaling,
    momentum correction and weight decay included."""
    results = []
    for scaled in (False, True):
        model = Net()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**6, growth_interval=1, enabled=scaled)
        comp, opt = make(model, grad_scaler=scaler, weight_decay=1e-3)
        for step in range(6):
            amp_step(model, opt, scaler, step)
        results.append(snapshot(model, comp))
        if scaled:
            assert scaler.get_scale() == 2.0**12, scaler.get_scale()
    assert_snapshot_equal(results[0], results[1], "scaled vs unscaled run")


def check_dynamic_graph():
    """A branch used on some ranks only, some steps: its parameters get no gradient there."""
    model = Net()
    comp, opt = make(model, min_numel=64)
    for step in range(4):
        opt.zero_grad()
        loss_of(model, step, use_spare=(hvd.rank() + step) % 2 == 0).backward()
        opt.step()
    opt.zero_grad()
    loss_of(model, 4, use_spare=False).backward()  # unused on every rank
    opt.step()
    assert "spare.weight" in comp.state.residuals
    assert_same_on_all_ranks(model, "dynamic graph")


def check_zero_element_and_complex():
    model = Net()
    model.empty = nn.Parameter(torch.zeros(0, 5))
    model.z = nn.Parameter(torch.full((300,), 1 + 1j, dtype=torch.complex64))
    comp, opt = make(model, min_numel=0, momentum=0.0)
    z0 = model.z.detach().clone()
    local = []
    model.z.register_hook(lambda g: local.append(g.detach().clone()))
    for step in range(2):
        opt.zero_grad()
        loss = loss_of(model, step) + model.empty.sum() + (model.z * (hvd.rank() + 1)).abs().sum()
        loss.backward()
        opt.step()
        if step == 0:  # the complex gradient was averaged over ranks, not garbled
            mean = hvd.allgather(torch.view_as_real(local[0]).unsqueeze(0)).mean(0)
            expected = z0 - 0.1 * torch.view_as_complex(mean.contiguous())
            assert torch.allclose(model.z.detach(), expected, rtol=1e-6, atol=1e-7)
    assert model.empty.shape == (0, 5)
    assert model.z.dtype == torch.complex64 and torch.isfinite(torch.view_as_real(model.z)).all()
    assert_same_on_all_ranks(model, "zero-element and complex params")


def check_sparse_embedding():
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 16, sparse=True)
    head = nn.Linear(16, 4)
    model = nn.ModuleDict({"emb": emb, "head": head})
    comp = hvd_topk.TopKCompressor(0.05, min_numel=0, warmup_steps=0, exchange=EXCHANGE, **NAMED)
    opt = hvd_topk.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        named_parameters=model.named_parameters(), compression=comp)
    for step in range(3):
        g = torch.Generator().manual_seed(10 * hvd.rank() + step)
        ids, y = torch.randint(0, 1000, (8, 5), generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(head(emb(ids).mean(1)), y).backward()
        opt.step()
    assert "emb.weight" not in comp.state.residuals  # sparse gradients go through Horovod's own path
    assert_same_on_all_ranks(model, "sparse embedding")


def check_registration_order():
    """Rank 1 registers parameters in reverse order: names, not positions, pair the tensors
    each exchanged on its own (group_bytes=0), so the result is bit-identical to both ranks
    using the same order. (Grouped, the ranks would cut other groups: mismatch_order_grouped.)"""
    finals = []
    for reverse in (False, True):
        model = Net()
        opt = _ordered_optimizer(model, reverse, group_bytes=0)
        train(model, opt, 3)
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for n in finals[0]:
        assert torch.equal(finals[0][n], finals[1][n]), n


def _ordered_optimizer(model, reverse, group_bytes):
    """SGD momentum through hvd_topk on ``model``, its params listed in reverse on rank 1."""
    named = list(model.named_parameters())
    if reverse and hvd.rank() == 1:
        named = named[::-1]
    comp = hvd_topk.TopKCompressor(0.05, min_numel=256, warmup_steps=0, exchange=EXCHANGE, **NAMED,
                                   group_bytes=group_bytes)
    return hvd_topk.DistributedOptimizer(torch.optim.SGD([p for _, p in named], lr=0.1, momentum=0.9),
                                         named_parameters=named, compression=comp)


def check_mismatch_order_grouped():
    """Rank 1 lists the params in reverse and the tensors travel in groups: the ranks would
    cut other groups (and wait for each other's collectives forever): a clear error instead."""
    model = Net()
    expect_mismatch(model, _ordered_optimizer(model, True, group_bytes=1 << 30), "mismatch_order_grouped")


def check_elastic_state():
    """hvd.elastic.TorchState commits and restores the residuals, velocities and warm-up step
    with the model and optimizer (a failed step's updates roll back), and sync() makes the
    ranks agree on the step count again."""
    model = Net()
    comp, opt = make(model, warmup_steps=50)
    assert isinstance(opt, hvd_topk.TopKDistributedOptimizer)
    state = hvd.elastic.TorchState(model=model, optimizer=opt, batch=0)
    train(model, opt, 3)
    state.commit()
    committed, steps = snapshot(model, comp), comp.steps
    train(model, opt, 2, start=3)  # progress that a failure would make us lose
    assert comp.steps == steps + 2
    state.restore()
    assert comp.steps == steps
    assert_snapshot_equal(committed, snapshot(model, comp), "after restore")
    if hvd.rank() == 1:
        comp.state.steps += 7  # as if this rank had joined with another history
    state.sync()
    assert comp.steps == steps, comp.steps
    train(model, opt, 2, start=3)
    assert_same_on_all_ranks(model, "after elastic restore + sync")


def expect_mismatch(model, opt, what):
    """One step must raise RankMismatchError on this rank (printed for the test to check)."""
    try:
        train(model, opt, 1)
    except hvd_topk.RankMismatchError as e:
        print(f"rank {hvd.rank()}/2 {what}: OK ({e})", flush=True)
        os._exit(0)  # Horovod is mid-step: skip its shutdown
    raise AssertionError(f"{what}: ranks that disagree trained without an error")


def check_mismatch_shape():
    model = Net(hidden=64 if hvd.rank() == 0 else 65)
    expect_mismatch(model, make(model, min_numel=64)[1], "mismatch_shape")


def check_mismatch_extra_param():
    model = Net()
    if hvd.rank() == 1:
        model.extra = nn.Parameter(torch.zeros(512))
    expect_mismatch(model, make(model, min_numel=64)[1], "mismatch_extra_param")


def mismatched_compressor(what, **per_rank):
    """Same model, a compressor setting that differs on rank 1: caught by the payload check
    (sizes differ) or by the header signature (same size, other meaning)."""
    model = Net()
    kw = {key: value[hvd.rank()] for key, value in per_rank.items()}
    comp = hvd_topk.TopKCompressor(min_numel=64, warmup_steps=0, exchange=EXCHANGE, **NAMED, **kw)
    opt = hvd_topk.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        named_parameters=model.named_parameters(), compression=comp)
    expect_mismatch(model, opt, what)


def check_mismatch_ratio():
    # Both under 1/16: the sparse allreduce is taken on both ranks (above it, dense).
    mismatched_compressor("mismatch_ratio", ratio=(0.02, 0.05))


def check_mismatch_value_dtype():
    mismatched_compressor("mismatch_value_dtype", ratio=(0.05, 0.05),
                          value_dtype=(torch.float16, torch.bfloat16))


if __name__ == "__main__":
    rank_checks.main({name[len("check_"):]: f for name, f in list(globals().items())
                      if name.startswith("check_") and callable(f)})

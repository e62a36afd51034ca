"""Frozen, removed, lr=0 and unused parameters on 2 ranks (run by tests/test_frozen.py); and
parameters trained later than the optimizer was built (unfrozen, or added by add_param_group).

The issue's case: an MLP (64-512-512-10), SGD, ``TopKCompressor(0.01, warmup_steps=0)``, the
first layer frozen on every rank after step 3. A frozen parameter must not move (stock
Horovod: it moves by exactly 0 with plain SGD), its residual and velocity must stay
bit-identical, and unfreezing must resume from the kept residual: the next exchanged
gradient equals the mean over ranks of each rank's own top-k of (kept residual + gradient),
computed here with torch.topk. Tolerance rtol 1e-6 / atol 1e-7 (summation order only).
"""

import copy
import os

import horovod.torch as hvd
import torch
import rank_checks
import torch.nn as nn

import hvd_topk

RTOL, ATOL = 1e-6, 1e-7
FROZEN = ("0.weight", "0.bias")


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def batch(step):
    g = torch.Generator().manual_seed(1000 * hvd.rank() + step)
    return torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)


def train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def make(model, momentum=0.0, weight_decay=0.0, stock=False, params=None, **comp_kw):
    base = torch.optim.SGD(params or model.parameters(), lr=0.05, momentum=momentum,
                           weight_decay=weight_decay)
    if stock:
        return None, hvd.DistributedOptimizer(base, named_parameters=model.named_parameters())
    comp = hvd_topk.TopKCompressor(0.01, warmup_steps=0, **comp_kw)
    return comp, hvd_topk.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                               compression=comp)


def state(model, comp, names):
    params = dict(model.named_parameters())
    out = {f"param {n}": params[n].detach().clone() for n in names}
    for n in names:
        for what, mem in (("residual", comp.state.residuals), ("velocity", comp.state.velocities)):
            if mem.get(n) is not None:
                out[f"{what} {n}"] = mem.get(n).clone()
    return out


def assert_unchanged(before, after, what):
    assert before.keys() == after.keys(), (what, before.keys(), after.keys())
    for k in before:
        assert torch.equal(before[k], after[k]), f"{what}: {k} changed"


def assert_same_on_all_ranks(model, what):
    for name, p in model.named_parameters():
        g = hvd.allgather(p.detach().reshape(1, -1))
        assert torch.equal(g, g[:1].expand_as(g)), f"{what}: {name} differs between ranks"


def own_topk_mean(c, ratio):
    """Mean over ranks of each rank's own top-k of ``c`` (torch.topk, no hvd_topk code)."""
    c = c.reshape(-1)
    idx = torch.topk(c.abs(), hvd_topk.num_selected(c.numel(), ratio)).indices
    sent = torch.zeros_like(c)
    sent[idx] = c[idx]
    return hvd.allgather(sent.reshape(1, -1)).mean(0)


def set_frozen(model, frozen):
    for n, p in model.named_parameters():
        if n in FROZEN:
            p.requires_grad_(not frozen)


def check_frozen(momentum):
    """Frozen on every rank after step 3: no move, residual/velocity untouched, .grad None;
    unfrozen after step 6: the kept residual is what the next exchange starts from."""
    model = make_model()
    comp, opt = make(model, momentum=momentum, weight_decay=1e-3 if momentum else 0.0)
    train(model, opt, 3)
    assert comp.state.residuals.get("0.weight") is not None  # it was compressed before freezing
    if momentum:
        assert comp.state.velocities.get("0.weight") is not None
    set_frozen(model, True)
    before = state(model, comp, FROZEN)
    train(model, opt, 3, start=3)
    for n, p in model.named_parameters():
        if n in FROZEN:
            assert p.grad is None, f"{n}: frozen parameter got a gradient"
    assert_unchanged(before, state(model, comp, FROZEN), f"frozen, momentum={momentum}")
    assert opt.comm_stats.sparse_tensors == 2, opt.comm_stats  # 2.weight and 4.weight only
    assert_same_on_all_ranks(model, "frozen")
    # Unfreeze: the next gradient of 0.weight is the top-k of kept residual (+ velocity) + g.
    set_frozen(model, False)
    kept = comp.state.residuals.get("0.weight").clone()
    velocity = comp.state.velocities.get("0.weight").clone() if momentum else None
    opt.zero_grad()
    x, y = batch(6)
    nn.functional.cross_entropy(model(x), y).backward()
    w = model[0].weight
    g = w.grad.detach().clone() + 1e-3 * w.detach() if momentum else w.grad.detach().clone()
    u = momentum * velocity.view_as(g) + g if momentum else g
    opt.synchronize()
    want = own_topk_mean(kept.view_as(g) + u, 0.01)
    torch.testing.assert_close(w.grad.reshape(-1), want, rtol=RTOL, atol=ATOL)
    with opt.skip_synchronize():
        opt.step()
    assert_same_on_all_ranks(model, "unfrozen")


def check_stock_reference():
    """Stock Horovod, plain SGD: the frozen weight moves by exactly 0 and so does ours."""
    moved = {}
    for stock in (True, False):
        model = make_model()
        _, opt = make(model, stock=stock)
        train(model, opt, 3)
        set_frozen(model, True)
        w0 = model[0].weight.detach().clone()
        train(model, opt, 3, start=3)
        moved[stock] = (model[0].weight.detach() - w0).abs().max().item()
    assert moved == {True: 0.0, False: 0.0}, moved


def check_lr_zero_group(momentum):
    """A param group with lr=0 does not move (its gradient is still exchanged)."""
    model = make_model()
    first = [model[0].weight, model[0].bias]
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    groups = [{"params": first, "lr": 0.0}, {"params": rest}]
    comp, opt = make(model, momentum=momentum, weight_decay=1e-3, params=groups)
    w0 = model[0].weight.detach().clone()
    train(model, opt, 4)
    assert torch.equal(model[0].weight.detach(), w0), "lr=0 group moved"
    assert comp.state.residuals.get("0.weight") is not None  # trained (exchanged) all along
    assert not torch.equal(model[2].weight.detach(), make_model()[2].weight.detach())
    assert_same_on_all_ranks(model, "lr=0")


def check_removed_from_param_groups(momentum):
    """A param removed from the optimizer after step 2: its hook still fires, but it is not
    exchanged and not updated; its residual waits."""
    model = make_model()
    comp, opt = make(model, momentum=momentum)
    train(model, opt, 2)
    opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if p is not model[0].weight]
    before = state(model, comp, ("0.weight",))
    train(model, opt, 3, start=2)
    assert_unchanged(before, state(model, comp, ("0.weight",)), "removed")
    assert_same_on_all_ranks(model, "removed")


def check_unused_on_one_rank(momentum):
    """Trainable but unused on rank 1 this step: rank 1 sends the top-k of its residual
    (+ velocity) with a zero gradient, as stock Horovod sends zeros."""
    model = make_model()
    comp, opt = make(model, momentum=momentum)
    train(model, opt, 2)
    w = model[2].weight
    kept = comp.state.residuals.get("2.weight").clone().view_as(w)
    velocity = comp.state.velocities.get("2.weight").clone().view_as(w) if momentum else None
    opt.zero_grad()
    x, y = batch(2)
    h = model[1](model[0](x))
    out = model[4](model[3](model[2](h))) if hvd.rank() == 0 else model[4](h[:, :512] * 0 + 1)
    nn.functional.cross_entropy(out, y).backward()
    g = w.grad.detach().clone() if w.grad is not None else torch.zeros_like(w)
    assert (w.grad is None) == (hvd.rank() == 1)
    u = momentum * velocity + g if momentum else g
    opt.synchronize()
    torch.testing.assert_close(w.grad.reshape(-1), own_topk_mean(kept + u, 0.01), rtol=RTOL, atol=ATOL)
    with opt.skip_synchronize():
        opt.step()
    assert_same_on_all_ranks(model, "unused on one rank")


def check_disagree(name, group_bytes):
    """Rank 0 freezes the first layer, rank 1 does not: RankMismatchError on both, naming it."""
    model = make_model()
    comp, opt = make(model, group_bytes=group_bytes)
    train(model, opt, 2)
    if hvd.rank() == 0:
        set_frozen(model, True)
    try:
        train(model, opt, 1, start=2)
    except hvd_topk.RankMismatchError as e:
        print(f"rank {hvd.rank()}/2 {name}: OK ({e})", flush=True)
        os._exit(0)  # Horovod is mid-step (a collective without partner): skip its shutdown
    raise AssertionError("ranks that disagree about freezing trained without an error")


def late_optimizer(model, kind, params=None, names=None):
    """``kind``: "sgd" (Top-K 1%, momentum correction), "adamw" (Top-K 1%, Adam correction),
    "dense" (hvd_topk with Horovod's uncompressed allreduce)."""
    params = model.parameters() if params is None else params
    names = model.named_parameters() if names is None else names
    if kind == "adamw":
        base = torch.optim.AdamW(params, lr=0.01)
    else:
        base = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    comp = (hvd.Compression.none if kind == "dense" else
            hvd_topk.TopKCompressor(0.01, warmup_steps=0, min_numel=1024))
    return hvd_topk.DistributedOptimizer(base, named_parameters=names, compression=comp)


def assert_exchanged(model, opt, p, step, dense):
    """One more step by hand: after synchronize(), ``p.grad`` is the same on every rank (the
    exchanged update); with Horovod's allreduce, exactly the mean of the ranks' gradients."""
    x, y = batch(step)
    loss = nn.functional.cross_entropy(model(x), y)
    local = torch.autograd.grad(loss, [p], retain_graph=True)[0]  # no hook fires for this one
    opt.zero_grad()
    loss.backward()
    opt.synchronize()
    g = hvd.allgather(p.grad.detach().reshape(1, -1))
    assert torch.equal(g, g[:1].expand_as(g)), "the late parameter's update differs between ranks"
    if dense:
        torch.testing.assert_close(p.grad, hvd.allreduce(local, name=f"late.{step}"), rtol=RTOL, atol=ATOL)
    with opt.skip_synchronize():
        opt.step()


def check_frozen_when_built(kind):
    """The first layer frozen when the optimizer is built (a backbone during a head's warm-up),
    unfrozen after step 3: from then on it is exchanged like every other parameter (stock
    Horovod never hooks it, and each rank steps it with its own gradient)."""
    model = make_model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = late_optimizer(model, kind)
    train(model, opt, 3)
    sparse_before = opt.comm_stats.sparse_tensors
    before = model[0].weight.detach().clone()
    for p in model[0].parameters():
        p.requires_grad_(True)
    train(model, opt, 2, start=3)
    if kind != "dense":
        assert opt.comm_stats.sparse_tensors == sparse_before + 1, (sparse_before, opt.comm_stats)
    assert_exchanged(model, opt, model[0].weight, 5, kind == "dense")
    assert not torch.equal(before, model[0].weight), "the unfrozen layer did not move"
    assert_same_on_all_ranks(model, f"unfrozen late ({kind})")


def check_add_param_group(kind):
    """``optimizer.add_param_group`` for the last layer, whose params were not named when the
    optimizer was built: exchanged like the others (named ``allreduce.noname.1.*``), the
    ranks identical, its corrections in force; a checkpoint taken after step 3 and loaded
    into an optimizer built the same way resumes bit-identically (the names, and so the
    residuals' keys, are the same in every run)."""
    def build():
        model = make_model()
        named = [(n, p) for n, p in model.named_parameters() if not n.startswith("4.")]
        opt = late_optimizer(model, kind, params=[p for _, p in named], names=named)
        opt.add_param_group({"params": list(model[4].parameters()), "lr": 0.02})
        return model, opt

    model, opt = build()
    train(model, opt, 3)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    assert_exchanged(model, opt, model[4].weight, 3, kind == "dense")
    train(model, opt, 2, start=4)
    assert_same_on_all_ranks(model, f"add_param_group ({kind})")
    names = {opt._parameter_names[p] for p in model[4].parameters()}
    assert names == {"allreduce.noname.1.0", "allreduce.noname.1.1"}, names
    resumed, opt2 = build()
    resumed.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    assert_exchanged(resumed, opt2, resumed[4].weight, 3, kind == "dense")
    train(resumed, opt2, 2, start=4)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), f"add_param_group ({kind}): {name} differs after the resume"


CHECKS = {
    "frozen_when_built": lambda: [check_frozen_when_built(k) for k in ("sgd", "adamw", "dense")],
    "add_param_group": lambda: [check_add_param_group(k) for k in ("sgd", "adamw", "dense")],
    "frozen": lambda: check_frozen(0.0),
    "frozen_momentum": lambda: check_frozen(0.9),
    "stock_reference": check_stock_reference,
    "lr_zero": lambda: [check_lr_zero_group(m) for m in (0.0, 0.9)],
    "removed": lambda: [check_removed_from_param_groups(m) for m in (0.0, 0.9)],
    "unused_on_one_rank": lambda: [check_unused_on_one_rank(m) for m in (0.0, 0.9)],
    "disagree": lambda: check_disagree("disagree", 0),
    "disagree_grouped": lambda: check_disagree("disagree_grouped", 1 << 30),
}

if __name__ == "__main__":
    rank_checks.main(CHECKS)

"""Multi-rank checks of Adam correction (run by tests/test_adam.py).

Each check trains a small MLP with hvd_topk and, beside it, the written-out algorithm on
each rank with no hvd_topk code: the rank's own Adam moments of its own gradient, error
feedback of its Adam step ``lr * direction``, ``torch.topk``, the average of every rank's
densified selection (allgathered), then ``p -= update`` after AdamW's decoupled weight decay.
Tolerance: rtol 1e-5 / atol 1e-7 (the moments' arithmetic and the summation order may round
differently); parameters must be bit-identical across ranks.
"""

import math

import horovod.torch as hvd
import torch
import torch.nn as nn
from exchange_worker import (allgather_dense, assert_same_on_all_ranks, batch,
                             check_ratio_one_matches_horovod, make_model, own_topk, run_checks)

import hvd_topk

RTOL, ATOL = 1e-5, 1e-7


def clipped_direction(m, den, t, tv, b1, b2, eps):
    """One rank's Adam direction ``m_hat / (sqrt(s_hat) + eps)`` (``t`` steps of the first
    moment, ``tv`` of the second), clipped to +-10 (``adam_clip``): ``lr`` times it is what
    the step adds to what the rank owes. torch.optim.Adam's own arithmetic (``sqrt(s) /
    sqrt(1 - b2^t)``, not ``sqrt(s / ...)``), so that fp16 wire values round alike."""
    return ((m / (1 - b1 ** t)) / (den.sqrt() / math.sqrt(1 - b2 ** tv) + eps)).clamp(-10, 10)


class Reference:
    """The written-out Adam correction of one rank: state per parameter name."""

    def __init__(self, variance_steps):
        self.variance_steps = variance_steps
        self.m, self.s, self.smax, self.r, self.t = {}, {}, {}, {}, {}

    def sent(self, name, g, group, ratio, value_dtype):
        """This rank's densified selection for ``name`` given its local gradient ``g``."""
        b1, b2 = group["betas"]
        z = torch.zeros_like(g)
        m, s, smax, r = (d.setdefault(name, z.clone()) for d in (self.m, self.s, self.smax, self.r))
        t = self.t[name] = self.t.get(name, 0) + 1
        m.lerp_(g, 1 - b1)  # m = b1 m + (1 - b1) g, rounded as torch.optim.Adam rounds it
        tv = t if self.variance_steps is None else min(t, self.variance_steps)
        if t == tv:  # the variance is still estimated
            s.mul_(b2).addcmul_(g, g, value=1 - b2)  # as torch.optim.Adam rounds it
            smax.copy_(torch.maximum(smax, s))
        den = smax if group["amsgrad"] else s
        r.add_(clipped_direction(m, den, t, tv, b1, b2, group["eps"]), alpha=group["lr"])  # owed
        # ranked by r * m / (sqrt(s) + eps) where positive (adam_select="agreement")
        sent, _ = own_topk(r, ratio, value_dtype, weight=m / (den.sqrt() + group["eps"]))
        r -= sent
        return sent


def backward(model, opt, step):
    """This rank's gradients of step ``step`` (the hooks start the exchange); returns the
    parameters before the step."""
    opt.zero_grad()
    x, y = batch(step)
    nn.functional.cross_entropy(model(x), y).backward()
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def check_adam_all_options(grouped, steps=6):
    """AdamW, two param groups (lr, weight decay, betas, amsgrad differ), fp16 values, the
    warm-up and a variance frozen after 3 steps: each rank's grads and parameters equal the
    written-out algorithm's, and are the same on every rank. (eps is large enough that the
    first step's directions ``g / (|g| + eps)`` do not round to a tie of +-1 everywhere.)"""
    model = make_model()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = torch.optim.AdamW([
        {"params": weights, "lr": 0.01, "weight_decay": 0.05, "betas": (0.9, 0.99), "amsgrad": True},
        {"params": biases, "lr": 0.02, "weight_decay": 0.0, "betas": (0.8, 0.95)}], eps=1e-3)
    comp = hvd_topk.TopKCompressor(0.05, min_numel=0, density_aware=False, value_dtype=torch.float16,
                                   warmup_steps=2, warmup_ratio=0.3, adam_variance_steps=3,
                                   group_bytes=(1 << 30) if grouped else 0)
    opt = hvd_topk.DistributedOptimizer(opt, named_parameters=model.named_parameters(), compression=comp)
    group_of = {p: g for g in opt.param_groups for p in g["params"]}
    ref = Reference(variance_steps=3)
    for step in range(steps):
        ratio = 0.3 * (0.05 / 0.3) ** (step / 2) if step < 2 else 0.05
        want, before = {}, backward(model, opt, step)
        for name, p in model.named_parameters():
            sent = ref.sent(name, p.grad.detach().reshape(-1), group_of[p], ratio, torch.float16)
            want[name] = allgather_dense(sent).mean(0).view_as(p)
        opt.step()
        for name, p in model.named_parameters():
            group = group_of[p]
            torch.testing.assert_close(p.grad, want[name], rtol=RTOL, atol=ATOL,
                                       msg=lambda msg, n=name, s=step: f"step {s} {n}: {msg}")
            expect = before[name] * (1 - group["lr"] * group["weight_decay"]) - want[name]
            torch.testing.assert_close(p.detach(), expect, rtol=RTOL, atol=ATOL)
    assert_same_on_all_ranks(model, "adam all options")


def check_adam_coupled_weight_decay_maximize(steps=4):
    """torch.optim.Adam's coupled weight decay and maximize: torch's meaning (ascend on the
    gradient, decay added to the negated gradient), through the corrected update."""
    model = make_model()
    lr, wd = 0.01, 0.02
    opt = hvd_topk.DistributedOptimizer(
        torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd, maximize=True, eps=1e-3),
        named_parameters=model.named_parameters(),
        compression=hvd_topk.TopKCompressor(0.1, min_numel=0, density_aware=False, warmup_steps=0))
    group = opt.param_groups[0]
    ref = Reference(variance_steps=100)
    for step in range(steps):
        want, before = {}, backward(model, opt, step)
        for name, p in model.named_parameters():
            q = -p.grad.detach().reshape(-1) + wd * p.detach().reshape(-1)  # torch's maximize
            want[name] = allgather_dense(ref.sent(name, q, group, 0.1, None)).mean(0).view_as(p)
        opt.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[name] - want[name], rtol=RTOL, atol=ATOL,
                                       msg=lambda msg, n=name, s=step: f"step {s} {n}: {msg}")
    assert_same_on_all_ranks(model, "adam coupled weight decay, maximize")


def check_adam_ratio_one_is_dense_adam():
    """At ratio 1.0 the automatic Adam correction is off (everything is sent): AdamW trains
    as under stock Horovod."""
    check_ratio_one_matches_horovod(lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01),
                                    "adam ratio 1.0")


def check_adam_elastic_state():
    """hvd.elastic.TorchState commits and restores each rank's Adam moments and step counts
    with the residuals, model and optimizer: a failed step's updates roll back."""
    model = make_model()
    comp = hvd_topk.TopKCompressor(0.05, min_numel=0, warmup_steps=0, adam_variance_steps=2)
    opt = hvd_topk.DistributedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01),
                                        named_parameters=model.named_parameters(), compression=comp)
    state = hvd.elastic.TorchState(model=model, optimizer=opt, batch=0)

    def snapshot():
        topk = opt.topk_state_dict()
        return ({n: p.detach().clone() for n, p in model.named_parameters()}, topk["adam_steps"],
                *(topk[k] for k in ("exp_avg", "exp_avg_sq", "residuals")))

    def run(steps, start):
        for step in range(start, start + steps):
            opt.zero_grad()
            x, y = batch(step)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    run(3, 0)
    state.commit()
    committed = snapshot()
    assert committed[1] and all(t == 3 for t in committed[1].values()), committed[1]
    run(2, 3)  # progress that a failure would make us lose
    assert all(t == 5 for t in comp.state.adam_steps.values())
    state.restore()
    for what, want, got in zip(("params", "adam_steps", "exp_avg", "exp_avg_sq", "residuals"),
                               committed, snapshot()):
        assert want.keys() == got.keys(), what
        for n in want:
            assert torch.equal(torch.as_tensor(want[n]), torch.as_tensor(got[n])), f"{what} {n}"
    run(2, 3)
    assert_same_on_all_ranks(model, "adam after elastic restore")


def check_adam_starts_from_the_dense_warm_up():
    """A tensor exchanged densely at first (the warm-up's high ratio costs more than an
    allreduce) is stepped by the wrapped AdamW; at its first sparse step each rank's moments
    start from the wrapped optimizer's (those of the average gradient) and its step count."""
    model = make_model()
    opt = hvd_topk.DistributedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.01), named_parameters=model.named_parameters(),
        compression=hvd_topk.TopKCompressor(0.05, min_numel=0, warmup_steps=2, warmup_ratio=0.9))
    comp = opt._compression
    backward(model, opt, 0)
    opt.step()  # ratio 0.9: dense, the wrapped AdamW's step
    assert opt.comm_stats.sparse_tensors == 0 and not comp.state.adam_steps
    names = dict(model.named_parameters())
    dense = {n: (opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone())
             for n, p in names.items()}
    backward(model, opt, 1)
    local = {n: p.grad.detach().clone() for n, p in names.items()}
    opt.step()  # ratio 0.21: sparse, Adam correction from the dense moments
    assert opt.comm_stats.sparse_tensors == 6, opt.comm_stats
    for n, (m, s) in dense.items():
        assert comp.state.adam_steps[n] == 2, comp.state.adam_steps
        g = local[n].reshape(-1)
        torch.testing.assert_close(comp.state.exp_avg.get(n), m.reshape(-1).lerp(g, 0.1), rtol=1e-6, atol=0)
        torch.testing.assert_close(comp.state.exp_avg_sq.get(n), s.reshape(-1) * 0.999 + 0.001 * g * g,
                                   rtol=1e-6, atol=0)
    assert_same_on_all_ranks(model, "adam after a dense warm-up")


def check_adam_sparse_allreduce_conserves_every_step(value_dtype, steps=5):
    """The sparse allreduce with Adam correction and a bfloat16 autocast forward: what the
    ranks owed before a step plus their Adam steps, less what they owe after it, summed over
    the ranks, is what the step applied, on every rank -- error feedback loses nothing:
    entries an owner does not keep, and each sender's rounding to ``value_dtype``, stay owed.
    With narrow values the owner's average is rounded to ``value_dtype`` once more, and that
    rounding is nobody's (the bound: half an ulp of the applied value)."""
    lr, b1, b2, eps = 0.01, 0.9, 0.95, 1e-3
    model = make_model()
    comp = hvd_topk.TopKCompressor(0.05, exchange="sparse_allreduce", min_numel=0, density_aware=False,
                                   warmup_steps=0, value_dtype=value_dtype)
    opt = hvd_topk.DistributedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0),
        named_parameters=model.named_parameters(), compression=comp)
    names, state = dict(model.named_parameters()), comp.state
    ulp = 0.0 if value_dtype is None else torch.finfo(value_dtype).eps
    for step in range(steps):
        owed = {n: (state.residuals.get(n).clone() if n in state.residuals else torch.zeros(p.numel()))
                for n, p in names.items()}
        opt.zero_grad()
        x, y = batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        before = {n: p.detach().clone() for n, p in names.items()}
        opt.step()
        assert opt.comm_stats.sparse_tensors == 6, opt.comm_stats
        for n, p in names.items():
            t = state.adam_steps[n]
            d = clipped_direction(state.exp_avg.get(n), state.exp_avg_sq.get(n), t, t, b1, b2, eps)
            moved = owed[n] + lr * d - state.residuals.get(n)
            total = hvd.allreduce(moved, op=hvd.Sum)
            applied = hvd.size() * (before[n] - p.detach()).reshape(-1)
            off = (total - applied).abs() - (ulp / 2 + 1e-5) * applied.abs()
            assert (off <= 1e-6).all(), f"step {step} {n}: owed and applied differ by {float(off.max())} more"
        assert_same_on_all_ranks(model, "adam sparse allreduce")


CHECKS = {
    "adam_dense_first": check_adam_starts_from_the_dense_warm_up,
    "adam_elastic_state": check_adam_elastic_state,
    "adam_all_options": lambda: check_adam_all_options(grouped=False),
    "adam_all_options_grouped": lambda: check_adam_all_options(grouped=True),
    "adam_coupled_maximize": check_adam_coupled_weight_decay_maximize,
    "adam_ratio_one": check_adam_ratio_one_is_dense_adam,
    "adam_sparse_allreduce": lambda: check_adam_sparse_allreduce_conserves_every_step(None),
    "adam_sparse_allreduce_bf16": lambda: check_adam_sparse_allreduce_conserves_every_step(torch.bfloat16),
}

if __name__ == "__main__":
    run_checks(CHECKS)

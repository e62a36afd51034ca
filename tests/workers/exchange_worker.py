"""Multi-rank checks of the sparse exchange (run by tests/test_distributed.py).

Every check compares hvd_topk against a reference computed here independently: each rank's
own top-k with its own residual (torch.topk, no hvd_topk code), densified, allgathered, and
averaged. Tolerance: rtol 1e-6 / atol 1e-7 on the averaged gradients (summation order is the
only difference); parameters must be bit-identical across ranks.
"""

import contextlib
import os

import horovod.torch as hvd
import rank_checks
import torch
import torch.nn as nn

import hvd_topk

RTOL, ATOL = 1e-6, 1e-7
# HVD_TOPK_TEST_DEVICE=cuda runs every check on this rank's GPU (scripts/gpu_check.sh).
DEVICE = torch.device(os.environ.get("HVD_TOPK_TEST_DEVICE", "cpu"))


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 200), nn.ReLU(),
                         nn.Linear(200, 10)).to(DEVICE)


def batch(step):
    g = torch.Generator().manual_seed(1000 * hvd.rank() + step)  # different data per rank
    x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def allgather_dense(t):
    return hvd.allgather(t.detach().reshape(1, -1))  # (world, n)


def own_topk(c, ratio, value_dtype=None, weight=None):
    """This rank's reference Top-K of ``c`` (torch.topk, no hvd_topk code): (dense sent, idx).
    ``weight``: ranked by ``weight * c`` where positive, else 0, instead (Adam correction's
    ``adam_select="agreement"``)."""
    score = c.abs() if weight is None else (weight * c).clamp(min=0)
    idx = torch.topk(score, hvd_topk.num_selected(c.numel(), ratio)).indices
    sent = torch.zeros_like(c)
    sent[idx] = c[idx] if value_dtype is None else c[idx].to(value_dtype).to(c.dtype)
    return sent, idx


def assert_same_on_all_ranks(model, what):
    for name, p in model.named_parameters():
        g = allgather_dense(p.data)
        assert torch.equal(g, g[:1].expand_as(g)), f"{what}: {name} differs between ranks"


def check_exact_topk(ratio, value_dtype=None, steps=3, group_bytes=None, unlucky=False, torch_path=False):
    """After synchronize(), grad == mean over ranks of each rank's own top-k (with residuals).
    ``group_bytes``: all six tensors in one group; ``torch_path``: without the CPU kernel (the
    path CUDA tensors take); ``unlucky``: rank 0's sampled selection is made wrong and flagged
    inexact, so every rank must exchange the group again, exactly."""
    from hvd_topk import selection
    from hvd_topk import use_cpu_kernel
    exact_topk = selection.exact_topk
    try:
        with use_cpu_kernel(False) if torch_path or unlucky else contextlib.nullcontext():
            _check_exact_topk(ratio, value_dtype, steps, group_bytes, unlucky)
    finally:
        selection.exact_topk = exact_topk


def _check_exact_topk(ratio, value_dtype, steps, group_bytes, unlucky):
    model = make_model()
    comp = hvd_topk.TopKCompressor(ratio, min_numel=0, density_aware=False, value_dtype=value_dtype,
                                   warmup_steps=0, group_bytes=group_bytes)
    if unlucky and hvd.rank() == 0:
        from hvd_topk import selection

        def wrong(mag, cand, full, layout):  # the first k_s entries of each tensor, flagged
            t = layout.slot_tables(mag.device)
            return t["slot_start"] + t["slot_rank"], torch.ones((), dtype=torch.bool, device=mag.device)
        selection.exact_topk = wrong
    opt = hvd_topk.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        named_parameters=model.named_parameters(),
                                        compression=comp)

    def expect(step, name, p, c):
        sent, _ = own_topk(c, ratio, value_dtype)
        return allgather_dense(sent).mean(0), c - sent

    train_against_reference(model, opt, comp, steps, expect, sparse_tensors=6, dense_tensors=0)
    assert_same_on_all_ranks(model, f"top-k {ratio}")


def train_against_reference(model, opt, comp, steps, expect, **counts):
    """Train ``steps`` steps through ``opt`` (an ``hvd_topk.DistributedOptimizer``); at each,
    ``expect(step, name, p, c)`` -> ``(gradient, residual)``, both flat, is what the written-out
    algorithm gives from the compensated gradient ``c`` (this step's plus the reference
    residual). After ``synchronize()`` every gradient and residual must equal it, and each
    ``comm_stats`` counter named in ``counts`` its value."""
    residual = {n: torch.zeros(p.numel(), device=DEVICE) for n, p in model.named_parameters()}
    for step in range(steps):
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        want = {}
        for name, p in model.named_parameters():
            want[name], residual[name] = expect(step, name, p, p.grad.detach().reshape(-1) + residual[name])
        opt.synchronize()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.reshape(-1), want[name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m, s=step, n=name: f"step {s} {n}: {m}")
            assert torch.equal(comp.state.residuals.get(name), residual[name]), \
                f"step {step}: residual of {name}"
        with opt.skip_synchronize():
            opt.step()
        stats = opt.comm_stats
        assert all(getattr(stats, f) == v for f, v in counts.items()), stats


def train(opt_factory, steps=5, momentum=0.9, inner=None):
    """``inner(params)``: the wrapped optimizer (default SGD, lr 0.05, ``momentum``)."""
    model = make_model()
    inner = inner or (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum))
    opt = opt_factory(model, inner(model.parameters()))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for step in range(steps):
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def check_ratio_one_matches_horovod(inner=None, what="ratio 1.0"):
    stock = train(lambda m, o: hvd.DistributedOptimizer(o, named_parameters=m.named_parameters()),
                  inner=inner)
    # density_aware=False forces the allgather path even at ratio 1.0.
    ours = train(lambda m, o: hvd_topk.DistributedOptimizer(
        o, named_parameters=m.named_parameters(),
        compression=hvd_topk.TopKCompressor(1.0, min_numel=0, density_aware=False)), inner=inner)
    for (name, a), (_, b) in zip(stock.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert_same_on_all_ranks(ours, what)


def check_none_and_fp16_match_horovod_exactly():
    for comp in (hvd.Compression.none, hvd.Compression.fp16):
        stock = train(lambda m, o, c=comp: hvd.DistributedOptimizer(
            o, named_parameters=m.named_parameters(), compression=c))
        ours = train(lambda m, o, c=comp: hvd_topk.DistributedOptimizer(
            o, named_parameters=m.named_parameters(), compression=c))
        for (name, a), (_, b) in zip(stock.named_parameters(), ours.named_parameters()):
            assert torch.equal(a, b), f"{comp.__name__}: {name} differs from stock Horovod"


def check_defaults_train_consistently():
    """Default compressor: small tensors dense, large sparse; parameters stay identical."""
    captured = {}

    def factory(m, o):
        opt = hvd_topk.DistributedOptimizer(o, named_parameters=m.named_parameters(),
                                            compression=hvd_topk.TopKCompressor(0.01, warmup_steps=0))
        captured["opt"] = opt
        return opt

    model = train(factory, steps=4)
    stats = captured["opt"].comm_stats
    assert stats.sparse_tensors == 2 and stats.dense_tensors == 4, stats  # 300x64, 200x300 sparse
    assert stats.bytes_sent < 0.1 * stats.dense_bytes, stats
    assert_same_on_all_ranks(model, "defaults")


def check_stock_optimizer_refuses_topk():
    model = make_model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters(),
                                   compression=hvd_topk.TopKCompressor(0.01))
    x, y = batch(0)
    try:
        nn.functional.cross_entropy(model(x), y).backward()
        opt.synchronize()
    except RuntimeError as e:
        assert "hvd_topk.DistributedOptimizer" in str(e), e
    else:
        raise AssertionError("stock hvd.DistributedOptimizer accepted a TopKCompressor")


def check_accumulation():
    """backward_passes_per_step=2: the exchanged gradient is the top-k of the summed passes."""
    model = make_model()
    comp = hvd_topk.TopKCompressor(0.05, min_numel=0, density_aware=False, warmup_steps=0)
    opt = hvd_topk.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        named_parameters=model.named_parameters(),
                                        compression=comp, backward_passes_per_step=2)
    for step in range(2):
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
    local = {n: p.grad.detach().clone().reshape(-1) for n, p in model.named_parameters()}
    opt.synchronize()
    for name, p in model.named_parameters():
        sent, _ = own_topk(local[name], 0.05)
        want = allgather_dense(sent).mean(0).view_as(p)
        torch.testing.assert_close(p.grad, want, rtol=RTOL, atol=ATOL)


def check_dgc_all_options(steps=4):
    """Momentum correction (Nesterov, weight decay), masking, fp16 values, warm-up and local
    clipping all on: grads and the applied update equal an independent reference."""
    m, wd, lr, clip, world = 0.9, 1e-3, 0.05, 5.0, hvd.size()
    model = make_model()
    comp = hvd_topk.TopKCompressor(0.02, min_numel=0, density_aware=False,
                                   value_dtype=torch.float16, warmup_steps=2, warmup_ratio=0.2,
                                   local_clip_norm=clip)
    opt = hvd_topk.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=m, nesterov=True, weight_decay=wd),
        named_parameters=model.named_parameters(), compression=comp)
    u = {n: torch.zeros(p.numel(), device=DEVICE) for n, p in model.named_parameters()}
    v = {n: torch.zeros(p.numel(), device=DEVICE) for n, p in model.named_parameters()}
    for step in range(steps):
        ratio = 0.2 * (0.02 / 0.2) ** (step / 2) if step < 2 else 0.02
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        want, before = {}, {}
        for name, p in model.named_parameters():
            before[name] = p.detach().clone()
            g = p.grad.detach().reshape(-1) + wd * p.detach().reshape(-1)
            g = g * min(1.0, (clip / world ** 0.5) / (float(g.norm()) + 1e-6))
            u[name] = m * u[name] + g
            v[name] = v[name] + g + m * u[name]
            sent, idx = own_topk(v[name], ratio, torch.float16)
            v[name] = v[name] - sent
            u[name][idx] = 0
            want[name] = allgather_dense(sent).mean(0).view_as(p)
        opt.step()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-6,
                                       msg=lambda msg, n=name, s=step: f"step {s} {n}: {msg}")
            torch.testing.assert_close(p.detach(), before[name] - lr * want[name], rtol=1e-5,
                                       atol=1e-6)
    assert_same_on_all_ranks(model, "dgc all options")


def check_momentum_correction_unmasked_ratio_one_is_momentum_sgd():
    stock = train(lambda m, o: hvd.DistributedOptimizer(o, named_parameters=m.named_parameters()))
    ours = train(lambda m, o: hvd_topk.DistributedOptimizer(
        o, named_parameters=m.named_parameters(),
        compression=hvd_topk.TopKCompressor(1.0, min_numel=0, density_aware=False,
                                            momentum_correction=True, momentum_masking=False)))
    for (name, a), (_, b) in zip(stock.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda msg, n=name: f"{n}: {msg}")


def check_small_dense_gradients_travel_in_one_grouped_allreduce():
    """The gradients left dense (biases, small weights) take one grouped allreduce a step, not
    one allreduce each, with the same averages; a member whose gradient goes another way (a
    sparse embedding gradient) or that this rank did not use is sent in synchronize()."""
    from horovod.torch import mpi_ops
    calls = {"single": 0, "grouped": []}
    single, grouped = mpi_ops.allreduce_async_, mpi_ops.grouped_allreduce_async_

    def count_single(*a, **k):
        calls["single"] += 1
        return single(*a, **k)

    def count_grouped(tensors, *a, **k):
        calls["grouped"].append(len(tensors))
        return grouped(tensors, *a, **k)

    torch.manual_seed(0)
    emb, body, head = nn.Embedding(20, 16, sparse=True), nn.Linear(16, 300), nn.Linear(300, 3)
    extra = nn.Linear(3, 3)  # used on rank 0 only: rank 1 sends zeros for it
    model = nn.ModuleDict({"emb": emb, "body": body, "head": head, "extra": extra}).to(DEVICE)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd_topk.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                        named_parameters=model.named_parameters(),
                                        compression=hvd_topk.TopKCompressor(0.01, warmup_steps=0))
    mpi_ops.allreduce_async_, mpi_ops.grouped_allreduce_async_ = count_single, count_grouped
    try:
        for step in range(3):
            opt.zero_grad()
            g = torch.Generator().manual_seed(100 * hvd.rank() + step)
            tokens = torch.randint(0, 20, (8, 5), generator=g).to(DEVICE)
            out = head(body(emb(tokens).mean(1)))
            if hvd.rank() == 0:
                out = extra(out)
            out.square().mean().backward()
            local = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                     for n, p in model.named_parameters() if n != "emb.weight"}
            calls["single"], calls["grouped"] = 0, []
            opt.synchronize()
            # body.weight (4800 entries) goes sparse; body.bias, head's and extra's are left
            # dense: one group (emb.weight is planned in it too, but its sparse gradient goes
            # Horovod's way, so the group leaves in synchronize()).
            assert calls == {"single": 0, "grouped": [5]}, calls
            for n, p in model.named_parameters():
                if n not in ("emb.weight", "body.weight"):  # the dense ones
                    want = allgather_dense(local[n]).mean(0)
                    torch.testing.assert_close(p.grad.reshape(-1), want, rtol=RTOL, atol=ATOL,
                                               msg=lambda m, s=step, n=n: f"step {s} {n}: {m}")
            with opt.skip_synchronize():
                opt.step()
    finally:
        mpi_ops.allreduce_async_, mpi_ops.grouped_allreduce_async_ = single, grouped
    assert_same_on_all_ranks(model, "dense batch")


def check_sparse_apply_matches_the_dense_apply():
    """A lone tensor's corrected update is applied only where the exchange wrote it; the
    parameters end with the bits of the dense apply, which a gradient changed in place after
    synchronize() takes (here ``mul_(1.0)``: the same values, a new version)."""
    for inner in (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                  lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01)):
        finals = []
        for touch in (False, True):
            model = make_model()
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            opt = hvd_topk.DistributedOptimizer(inner(model.parameters()),
                                                named_parameters=model.named_parameters(),
                                                compression=hvd_topk.TopKCompressor(0.001, warmup_steps=0))
            for step in range(4):
                opt.zero_grad()
                x, y = batch(step)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.synchronize()
                kept = [n for n, p in model.named_parameters() if p in opt._corrections._touched]
                assert kept == ["0.weight", "2.weight"], kept  # the two sent sparsely, 0.2% dense
                if touch:
                    for p in model.parameters():
                        p.grad.mul_(1.0)
                with opt.skip_synchronize():
                    opt.step()
            finals.append([p.detach().clone() for p in model.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*finals))
        assert_same_on_all_ranks(model, "sparse apply")


CHECKS = {
    "dgc_all_options": check_dgc_all_options,
    "momentum_correction_linear": check_momentum_correction_unmasked_ratio_one_is_momentum_sgd,
    "exact": lambda: [check_exact_topk(r) for r in (0.01, 0.1, 0.5)],
    "exact_fp16_values": lambda: check_exact_topk(0.05, value_dtype=torch.float16),
    "exact_grouped": lambda: [check_exact_topk(r, group_bytes=1 << 30, torch_path=t)
                              for r in (0.01, 0.1) for t in (False, True)],
    "unlucky_sample_redone": lambda: check_exact_topk(0.01, group_bytes=1 << 30, unlucky=True),
    "ratio_one": check_ratio_one_matches_horovod,
    "dense_compressors": check_none_and_fp16_match_horovod_exactly,
    "defaults": check_defaults_train_consistently,
    "stock_refuses": check_stock_optimizer_refuses_topk,
    "accumulation": check_accumulation,
    "dense_batch": check_small_dense_gradients_travel_in_one_grouped_allreduce,
    "sparse_apply": check_sparse_apply_matches_the_dense_apply,
}

def run_checks(checks):
    """Run the checks named on the command line (default: all), printing one OK line each,
    labelled with the controller (tests/rank_checks.py)."""
    rank_checks.main(checks, label_controller=True, device=DEVICE)


if __name__ == "__main__":
    run_checks(CHECKS)

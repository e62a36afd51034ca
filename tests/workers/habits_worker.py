"""The loops PyTorch users already write, on hvd_topk (run by tests/test_habits.py, 2 ranks).

Checkpoints through ``optimizer.state_dict()`` (each rank its own file: bit-identical to never
stopping; rank 0's file on every rank, or rank 0's state sent by
``hvd.broadcast_optimizer_state``: the ranks stay bit-identical to each other); states that do
not fit raise; ``clip_grad_norm=`` clips each rank's gradient exactly as
``torch.nn.utils.clip_grad_norm_`` would, before error feedback; the warning for clipping
after ``synchronize()``; ``backward_passes_per_step``, ``OneCycleLR`` cycling SGD's momentum,
``torch.compile``, ``zero_grad(set_to_none=False)``, a ``channels_last`` CNN, bfloat16
parameters and two optimizers in one process (a GAN). Files go to
``$HVD_TOPK_HABITS_DIR``.
"""

import os
import warnings

import horovod.torch as hvd
import rank_checks
import torch
import torch.nn as nn
from checkpoint_worker import build, train
from exchange_worker import RTOL, ATOL, allgather_dense, assert_same_on_all_ranks, batch, make_model, own_topk

import hvd_topk

DIR = os.environ.get("HVD_TOPK_HABITS_DIR", ".")
KINDS = ("sgd", "adamw")
MIN_NUMEL = (0, 4096)  # every tensor corrected / the small ones dense, stepped by the optimizer


def own_file(kind, min_numel):
    return os.path.join(DIR, f"{kind}.{min_numel}.rank{hvd.rank()}.pt")


def rank0_file(kind, min_numel):
    return os.path.join(DIR, f"{kind}.{min_numel}.rank0.pt")


def save_at_step_3():
    """Each rank trains 3 steps and saves the usual dict with its own optimizer.state_dict()."""
    for kind in KINDS:
        for min_numel in MIN_NUMEL:
            model, opt = build(kind, min_numel)
            train(model, opt, range(3))
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, own_file(kind, min_numel))
    hvd.barrier()


def resume(kind, min_numel, path, load=True):
    model, opt = build(kind, min_numel)
    if load:
        saved = torch.load(path, weights_only=True)  # tensors, numbers and strings only
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
    return model, opt


def check_own_files():
    save_at_step_3()
    for kind in KINDS:
        for min_numel in MIN_NUMEL:
            model_a, opt_a = build(kind, min_numel)
            train(model_a, opt_a, range(6))
            model, opt = resume(kind, min_numel, own_file(kind, min_numel))
            assert opt._compression.steps == 3
            train(model, opt, range(3, 6))
            for (name, a), (_, b) in zip(model_a.named_parameters(), model.named_parameters()):
                assert torch.equal(a, b), f"{kind} {min_numel}: {name} differs from the uninterrupted run"


def check_own_files_scheduler():
    """The same with an LR scheduler: after load_state_dict() the corrections must follow the
    param groups the scheduler now changes (torch makes new ones)."""
    def run(model, opt, sched, steps):
        for step in steps:
            opt.zero_grad()
            x, y = batch(step)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    for kind in KINDS:
        model_a, opt_a = build(kind, 4096)
        run(model_a, opt_a, torch.optim.lr_scheduler.ExponentialLR(opt_a, 0.7), range(6))
        model, opt = build(kind, 4096)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.7)
        run(model, opt, sched, range(3))
        saved = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
        model, opt = build(kind, 4096)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.7)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        run(model, opt, sched, range(3, 6))
        for (name, a), (_, b) in zip(model_a.named_parameters(), model.named_parameters()):
            assert torch.equal(a, b), f"{kind} with a scheduler: {name} differs from the uninterrupted run"


def check_rank0_file():
    """Horovod's examples: rank 0 saved, every rank loads that file."""
    for kind in KINDS:
        for min_numel in MIN_NUMEL:
            model, opt = resume(kind, min_numel, rank0_file(kind, min_numel))
            state = opt.topk_state_dict()
            for name, r in state["residuals"].items():
                g = allgather_dense(r)
                assert torch.equal(g[0], g[1]), f"{kind}: every rank starts from rank 0's residual ({name})"
            train(model, opt, range(3, 6))
            assert_same_on_all_ranks(model, f"rank 0's file, {kind} {min_numel}")


def check_rank0_broadcast():
    """Horovod's other recipe: rank 0 loads, then broadcast_parameters / broadcast_optimizer_state
    (which initialises the other ranks' optimizers with a zero-gradient step)."""
    for kind in KINDS:
        for min_numel in MIN_NUMEL:
            model, opt = resume(kind, min_numel, rank0_file(kind, min_numel), load=hvd.rank() == 0)
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
            hvd.broadcast_optimizer_state(opt, root_rank=0)
            assert_same_on_all_ranks(model, f"after broadcast_optimizer_state, {kind} {min_numel}")
            train(model, opt, range(3, 4))
            assert opt._compression.steps == 4, opt._compression.steps
            train(model, opt, range(4, 6))
            assert_same_on_all_ranks(model, f"rank 0's state broadcast, {kind} {min_numel}")


def expect_error(load, *words):
    try:
        load()
    except ValueError as e:
        assert all(w in str(e) for w in words), (words, e)
    else:
        raise AssertionError(f"loading a state that does not fit ({words}) did not raise")


def check_mismatch():
    saved = torch.load(own_file("sgd", 0), weights_only=True)["opt"]
    model = make_model()
    other_ratio = hvd_topk.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), named_parameters=model.named_parameters(),
        compression=hvd_topk.TopKCompressor(0.02, min_numel=0))
    expect_error(lambda: other_ratio.load_state_dict(saved), "ratio 0.01", "0.02")
    wider = nn.Sequential(nn.Linear(64, 301), nn.ReLU(), nn.Linear(301, 200), nn.ReLU(), nn.Linear(200, 10))
    other_model = hvd_topk.DistributedOptimizer(
        torch.optim.SGD(wider.parameters(), lr=0.05, momentum=0.9), named_parameters=wider.named_parameters(),
        compression=hvd_topk.TopKCompressor(0.01, min_numel=0))
    expect_error(lambda: other_model.load_state_dict(saved), "parameters differ", "'0.weight (301, 64)'")
    _, opt = build("sgd")
    saved["hvd_topk"]["world_size"] = 4  # as if saved by a 4-rank run
    expect_error(lambda: opt.load_state_dict(saved), "saved at 4 ranks", "this run has 2")
    assert opt._compression.steps == 0  # nothing was loaded


def check_clip_grad_norm():
    """Each rank's gradient is clipped as torch.nn.utils.clip_grad_norm_ clips it (compared
    on a twin model without hooks: bit-identical), then Top-K of it plus the residual is what
    is averaged (reference: each rank's own torch.topk)."""
    ratio, max_norm = 0.05, 0.5
    model, twin = make_model(), make_model()
    comp = hvd_topk.TopKCompressor(ratio, min_numel=0, density_aware=False, warmup_steps=0)
    opt = hvd_topk.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                        named_parameters=model.named_parameters(), compression=comp,
                                        clip_grad_norm=max_norm)
    residual = {n: torch.zeros(p.numel()) for n, p in model.named_parameters()}
    clipped = 0
    for step in range(3):
        twin.load_state_dict(model.state_dict())
        opt.zero_grad()
        twin.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        nn.functional.cross_entropy(twin(x), y).backward()
        clipped += float(torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)) > max_norm
        want = {}
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad), f"step {step} {name}: not clipped as clip_grad_norm_ does"
            sent, _ = own_topk(q.grad.reshape(-1) + residual[name], ratio)
            want[name] = allgather_dense(sent).mean(0)
            residual[name] = q.grad.reshape(-1) + residual[name] - sent
        opt.synchronize()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad.reshape(-1), want[name], rtol=RTOL, atol=ATOL)
        with opt.skip_synchronize():
            opt.step()
    assert clipped == 3, "the bound should act at every step of this check"
    assert_same_on_all_ranks(model, "clip_grad_norm")


def check_synchronize_warning():
    """Clipping after synchronize() with a correction: one warning naming clip_grad_norm=."""
    for kw, warns in (({}, True), ({"clip_grad_norm": 1.0}, False)):
        model, opt = build("sgd", **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(2):
                opt.zero_grad()
                x, y = batch(step)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.synchronize()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                with opt.skip_synchronize():
                    opt.step()
            train(model, opt, range(2, 3))  # step() synchronizing itself: no warning
        ours = [w for w in caught if "clip_grad_norm=" in str(w.message)]
        assert len(ours) == warns, [str(w.message) for w in caught]


def check_backward_passes_per_step():
    """Two passes accumulated locally == one pass over both batches (Top-K 1%, momentum
    correction, 3 steps; rtol 1e-4: the summation order of the gradient differs)."""
    models = []
    for bpps in (1, 2):
        model, opt = build("sgd", backward_passes_per_step=bpps)
        for step in range(3):
            opt.zero_grad()
            batches = [batch(10 * step + i) for i in range(2)]
            if bpps == 2:
                for x, y in batches:
                    nn.functional.cross_entropy(model(x), y).backward()
            else:
                sum(nn.functional.cross_entropy(model(x), y) for x, y in batches).backward()
            opt.step()
        models.append(model)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert_same_on_all_ranks(models[1], "backward_passes_per_step=2")


def check_one_cycle_momentum():
    """OneCycleLR cycles SGD's momentum; the correction reads it every step: at ratio 1.0
    without masking, momentum correction is momentum SGD, so it must match stock Horovod."""
    results = []
    for ours in (False, True):
        model = make_model()
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        if ours:
            comp = hvd_topk.TopKCompressor(1.0, min_numel=0, density_aware=False, warmup_steps=0,
                                           momentum_correction=True, momentum_masking=False)
            opt = hvd_topk.DistributedOptimizer(inner, named_parameters=model.named_parameters(),
                                                compression=comp)
        else:
            opt = hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters())
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=6, cycle_momentum=True)
        momenta = []
        for step in range(6):
            momenta.append(opt.param_groups[0]["momentum"])
            opt.zero_grad()
            x, y = batch(step)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        assert len(set(momenta)) > 3, momenta
        results.append(model)
    for (name, a), (_, b) in zip(results[0].named_parameters(), results[1].named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def check_torch_compile():
    """torch.compile(model) (AOT autograd; backend aot_eager, no C++ build): the hooks still
    see every gradient, training matches eager mode and the ranks stay identical."""
    models = []
    for compiled in (False, True):
        model, opt = build("sgd", min_numel=4096)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        for step in range(3):
            opt.zero_grad()
            x, y = batch(step)
            nn.functional.cross_entropy(run(x), y).backward()
            opt.step()
        assert opt.comm_stats.sparse_tensors == 2 and opt.comm_stats.dense_tensors == 4, opt.comm_stats
        models.append(model)
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert_same_on_all_ranks(models[1], "torch.compile")


def check_zero_grad_in_place():
    """``optimizer.zero_grad(set_to_none=False)`` (gradients zeroed in place, as many loops and
    libraries ask) trains bit-identically to ``zero_grad()``, SGD and AdamW; between
    ``backward()`` and the step it raises Horovod's race-condition error."""
    for kind in KINDS:
        models = []
        for keep in (False, True):
            model, opt = build(kind, min_numel=4096)
            for step in range(3):
                opt.zero_grad(set_to_none=False) if keep else opt.zero_grad()
                x, y = batch(step)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            models.append(model)
        for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
            assert torch.equal(a, b), f"{kind} {name}: zero_grad(set_to_none=False) trained otherwise"
        x, y = batch(9)
        nn.functional.cross_entropy(models[1](x), y).backward()
        try:
            opt.zero_grad(set_to_none=False)
        except AssertionError as e:
            assert "race condition" in str(e), e
        else:
            raise AssertionError("zero_grad() between backward() and step() did not raise")
        opt.synchronize()


def conv_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def check_channels_last():
    """A CNN in ``channels_last`` memory format (the usual layout for mixed precision on
    tensor cores): its conv weights' gradients are not contiguous, whether sent through Top-K
    or allreduced dense (stock Horovod raises there). With SGD, Top-K trains it
    as it trains the same CNN in the default format (3 steps; rtol 1e-4: the convs' summation
    order differs). With AdamW the first steps' Adam directions are all +-lr, so which of
    these near-ties is sent turns on that rounding: there the ranks stay identical and the
    step is applied to the channels_last parameters in place."""
    for kind in KINDS:
        models = []
        for fmt in (torch.contiguous_format, torch.channels_last):
            model = conv_model().to(memory_format=fmt)
            inner = (torch.optim.AdamW(model.parameters(), lr=0.01) if kind == "adamw"
                     else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
            # min_numel: the 3x32x5x5 stem is sent dense (Horovod reduces contiguous tensors
            # only), the 32x32x3x3 conv through Top-K.
            comp = hvd_topk.TopKCompressor(0.01, min_numel=4096, warmup_steps=0)
            opt = hvd_topk.DistributedOptimizer(inner, named_parameters=model.named_parameters(),
                                                compression=comp)
            for step in range(3):
                opt.zero_grad()
                g = torch.Generator().manual_seed(1000 * hvd.rank() + step)
                x = torch.randn(8, 3, 12, 12, generator=g).to(memory_format=fmt)
                y = torch.randint(0, 10, (8,), generator=g)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            assert opt.comm_stats.sparse_tensors == 1, opt.comm_stats
            models.append(model)
        assert models[1][2].weight.is_contiguous(memory_format=torch.channels_last)
        moved = [not torch.equal(a, b) for a, b in zip(conv_model().parameters(), models[1].parameters())]
        assert all(moved), moved
        if kind == "sgd":
            for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        assert_same_on_all_ranks(models[1], f"channels_last {kind}")


def check_bfloat16_params():
    """A model whose parameters are bfloat16 (pure bf16 training, no autocast), SGD and AdamW:
    the large weights go through Top-K, the small ones (biases, the last layer) are averaged
    in float32 and rounded to bfloat16 once (Horovod itself has no bfloat16 allreduce and
    raises), and the ranks stay identical."""
    for kind in KINDS:
        model = make_model().to(torch.bfloat16)
        inner = (torch.optim.AdamW(model.parameters(), lr=0.01) if kind == "adamw"
                 else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        opt = hvd_topk.DistributedOptimizer(inner, named_parameters=model.named_parameters(),
                                            compression=hvd_topk.TopKCompressor(0.01, warmup_steps=0))
        for step in range(3):
            opt.zero_grad()
            x, y = batch(step)
            loss = nn.functional.cross_entropy(model(x.to(torch.bfloat16)).float(), y)
            local = torch.autograd.grad(loss, [model[4].bias], retain_graph=True)[0]
            loss.backward()
            opt.synchronize()
            mean = (allgather_dense(local.float()).mean(0)).to(torch.bfloat16)
            assert torch.equal(model[4].bias.grad, mean), (model[4].bias.grad, mean)
            with opt.skip_synchronize():
                opt.step()
        assert opt.comm_stats.sparse_tensors == 2 and opt.comm_stats.dense_tensors == 4, opt.comm_stats
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())
        for name, p in model.named_parameters():  # as float32 (exact): Horovod has no bfloat16
            g = allgather_dense(p.float())
            assert torch.equal(g, g[:1].expand_as(g)), f"bfloat16 params {kind}: {name} differs between ranks"


def check_two_optimizers():
    """A GAN's loop: two models, each with its own hvd_topk optimizer (SGD and AdamW). The
    generator's backward also reaches the discriminator's parameters, so both optimizers'
    hooks run in one backward (each starts its step's collectives there: their names must
    not collide); the discriminator's are then synchronized and dropped, as Horovod asks."""
    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    disc = make_model()
    both = nn.ModuleDict({"g": gen, "d": disc})  # each optimizer is given every name, as is usual
    g_opt = hvd_topk.DistributedOptimizer(
        torch.optim.SGD(gen.parameters(), lr=0.05, momentum=0.9), named_parameters=both.named_parameters(),
        compression=hvd_topk.TopKCompressor(0.01, min_numel=1024))
    d_opt = hvd_topk.DistributedOptimizer(
        torch.optim.AdamW(disc.parameters(), lr=0.01), named_parameters=both.named_parameters(),
        compression=hvd_topk.TopKCompressor(0.01, min_numel=1024))
    start = [p.detach().clone() for p in (*gen.parameters(), *disc.parameters())]
    for step in range(3):
        x, y = batch(step)
        d_opt.zero_grad()
        nn.functional.cross_entropy(disc(gen(x).detach()), y).backward()
        d_opt.step()
        g_opt.zero_grad()
        (-nn.functional.cross_entropy(disc(gen(x)), y)).backward()  # reaches disc's params too
        g_opt.step()
        d_opt.synchronize()
        with d_opt.skip_synchronize():
            d_opt.zero_grad()
    stats = (g_opt.comm_stats, d_opt.comm_stats)
    assert stats[0].sparse_tensors == 2 and stats[1].sparse_tensors == 3, stats
    end = list((*gen.parameters(), *disc.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(start, end)), "a parameter did not move"
    assert_same_on_all_ranks(gen, "two optimizers: generator")
    assert_same_on_all_ranks(disc, "two optimizers: discriminator")


CHECKS = {"own_files": check_own_files, "own_files_scheduler": check_own_files_scheduler,
          "rank0_file": check_rank0_file,
          "rank0_broadcast": check_rank0_broadcast, "mismatch": check_mismatch,
          "clip_grad_norm": check_clip_grad_norm, "synchronize_warning": check_synchronize_warning,
          "backward_passes_per_step": check_backward_passes_per_step,
          "one_cycle_momentum": check_one_cycle_momentum, "torch_compile": check_torch_compile,
          "zero_grad_in_place": check_zero_grad_in_place, "channels_last": check_channels_last,
          "bfloat16_params": check_bfloat16_params, "two_optimizers": check_two_optimizers}

if __name__ == "__main__":
    rank_checks.main(CHECKS)

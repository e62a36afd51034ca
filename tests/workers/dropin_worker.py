"""Horovod's own DistributedOptimizer tests (test/parallel/test_torch.py, Horovod 0.28.1) as
the specification of a drop-in, on 2 ranks (run by tests/test_dropin.py).

Each case runs stock ``hvd.DistributedOptimizer`` and hvd_topk's, with ``Compression.none``
(must be bit-identical) and with ``TopKCompressor(1.0, min_numel=0, density_aware=False)``
(every tensor through the sparse allgather: must equal dense training, rtol 1e-5 / atol 1e-6,
summation order only). Already covered elsewhere: fp16 compression and bit-identity
(exchange_worker ``dense_compressors``), backward_passes_per_step (``accumulation``).
"""

import warnings

import horovod.torch as hvd
import torch
import rank_checks
import torch.nn as nn

import hvd_topk

RTOL, ATOL = 1e-5, 1e-6


def topk_one(**kw):
    return hvd_topk.TopKCompressor(1.0, min_numel=0, density_aware=False, warmup_steps=0, **kw)


FLAVOURS = {"none": lambda: hvd.Compression.none, "topk1": topk_one}


def wrap(kind, opt, **kw):
    """kind: 'stock' (hvd) or a FLAVOURS key (hvd_topk)."""
    if kind == "stock":
        return hvd.DistributedOptimizer(opt, **kw)
    return hvd_topk.DistributedOptimizer(opt, compression=FLAVOURS[kind](), **kw)


def assert_close(a, b, kind, what):
    for (name, x), y in zip(a.items(), b.values()):
        if kind == "none":
            assert torch.equal(x, y), f"{what}: {name} differs from stock"
        else:
            torch.testing.assert_close(y, x, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{what} {n}: {m}")


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def batch(step):
    g = torch.Generator().manual_seed(100 * hvd.rank() + step)
    return torch.randn(8, 16, generator=g), torch.randint(0, 8, (8,), generator=g)


def run_mlp(kind, steps=3, clip=None, momentum=0.0, **kw):
    model = mlp()
    opt = wrap(kind, torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum),
               named_parameters=model.named_parameters(), **kw)
    for step in range(steps):
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        if clip is None:
            opt.step()
        else:  # Horovod's recipe: synchronize, clip the averaged gradients, step
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            with opt.skip_synchronize():
                opt.step()
    return model, opt


def check_sparse_embeddings():
    """test_sparse_embeddings: SparseAdam on nn.Embedding(sparse=True), rank-dependent input,
    with and without sparse_as_dense (which must hand SparseAdam a sparse gradient back)."""
    for sparse_as_dense in (False, True):
        results = {}
        for kind in ("stock", "none", "topk1"):
            torch.manual_seed(0)
            emb = nn.Embedding(10, 3, sparse=True)
            inp = (torch.LongTensor([[1, 2, 4, 5], [4, 3, 2, 9]]) if hvd.rank() == 0
                   else torch.LongTensor([[1, 3, 4], [4, 7, 9]]))
            opt = wrap(kind, torch.optim.SparseAdam(list(emb.parameters()), lr=0.1),
                       named_parameters=emb.named_parameters(), sparse_as_dense=sparse_as_dense)
            for _ in range(2):
                opt.zero_grad()
                emb(inp).sum().backward()
                opt.step()
                assert emb.weight.grad.is_sparse
            results[kind] = snapshot(emb)
            if kind == "topk1":
                comp = opt._compression
                # sparse_as_dense: through Top-K (it has a residual); else Horovod's allgather
                assert ("weight" in comp.state.residuals) == sparse_as_dense
        for kind in ("none", "topk1"):
            assert_close(results["stock"], results[kind], kind, f"sparse_as_dense={sparse_as_dense}")


def check_clipping_after_synchronize():
    stock, _ = run_mlp("stock", clip=0.1)
    for kind in FLAVOURS:
        ours, _ = run_mlp(kind, clip=0.1)
        assert_close(snapshot(stock), snapshot(ours), kind, "clipping")


def train_groups(kind, kw):
    m = mlp()
    args = dict(kw)
    if args.get("groups") == "list":
        args["groups"] = [[m[0].weight, m[2].weight]]
    opt = wrap(kind, torch.optim.SGD(m.parameters(), lr=0.1), named_parameters=m.named_parameters(), **args)
    for step in range(3):
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m, opt


def check_groups():
    """groups (int and lists) and the deprecated num_groups: same training as stock."""
    for kw in ({"groups": 2}, {"groups": "list"}, {"num_groups": 2}):
        results = {}
        for kind in ("stock", "none", "topk1"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                m, opt = train_groups(kind, kw)
            if "num_groups" in kw:
                assert any(issubclass(w.category, DeprecationWarning) for w in caught), caught
            results[kind] = snapshot(m)
            if kind == "topk1":
                plan = opt._groups_of_step()
                members = sorted(sorted(g.names) for g in set(plan.values()))
                if kw.get("groups") == "list":  # one Top-K group of the two weights, biases alone
                    assert members == [["0.bias"], ["0.weight", "2.weight"], ["2.bias"]], members
                else:  # 2 runs of the 4 params in registration order
                    assert members == [["0.bias", "0.weight"], ["2.bias", "2.weight"]], members
        for kind in ("none", "topk1"):
            assert_close(results["stock"], results[kind], kind, f"groups {kw}")


def check_broadcast_optimizer_state():
    """hvd.broadcast_optimizer_state works on the wrapped optimizer (momentum buffers)."""
    for kind in FLAVOURS:
        model, opt = run_mlp(kind, steps=2, momentum=0.9)
        if hvd.rank() == 1:
            for st in opt.state.values():
                st["momentum_buffer"].add_(1.0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        for p in model.parameters():
            buf = opt.state[p]["momentum_buffer"]
            g = hvd.allgather(buf.reshape(1, -1))
            assert torch.equal(g[0], g[1]), f"{kind}: momentum buffers differ after broadcast"


def check_duplicate_names():
    model = mlp()
    named = [("same", p) for p in model.parameters()]
    for kind in FLAVOURS:
        try:
            wrap(kind, torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=named)
        except ValueError as e:
            assert "Found duplicates: same" in str(e), e
        else:
            raise AssertionError(f"{kind}: duplicate names accepted")


def gan_outcome(kind, nonfinite):
    """Horovod's test_dynamic_requires_grad, 10 rounds: 'inf', 'finite' or 'raised'."""
    torch.manual_seed(0)
    gen, disc = nn.Conv2d(1, 10, 1), nn.Conv2d(10, 1, 1)
    inp = torch.rand([1, 1, 100, 100])
    extra = {} if nonfinite is None else {"nonfinite": nonfinite}
    opts = {"gen": wrap(kind, torch.optim.SGD(gen.parameters(), lr=0.1),
                        named_parameters=gen.named_parameters(), **extra),
            "disc": wrap(kind, torch.optim.SGD(disc.parameters(), lr=0.1),
                         named_parameters=disc.named_parameters(), **extra)}
    nets = {"gen": gen, "disc": disc}
    try:
        for _ in range(10):
            for trained in ("disc", "gen"):
                for name, net in nets.items():
                    for p in net.parameters():
                        p.requires_grad_(name == trained)
                for opt in opts.values():
                    opt.zero_grad()
                disc(gen(inp)).sum().backward()
                for name, net in nets.items():  # frozen: no (or a zero) gradient
                    for p in net.parameters():
                        assert (name == trained) == (p.grad is not None and p.grad.max().is_nonzero())
                opts[trained].step()
    except FloatingPointError:
        return "raised"
    finite = all(torch.isfinite(p).all() for p in [*gen.parameters(), *disc.parameters()])
    return "finite" if finite else "inf"


def check_dynamic_requires_grad():
    """test_dynamic_requires_grad: a generator and a discriminator with one optimizer each,
    trained in turn by toggling requires_grad. The GAN diverges: stock Horovod goes on with
    Inf weights; hvd_topk's nonfinite='raise' (default) stops it with a FloatingPointError,
    'skip' skips those steps."""
    cases = (("stock", None), ("none", None), ("topk1", "raise"), ("topk1", "skip"))
    outcomes = {case: gan_outcome(*case) for case in cases}
    assert outcomes == {("stock", None): "inf", ("none", None): "inf", ("topk1", "raise"): "raised",
                        ("topk1", "skip"): "finite"}, outcomes


def check_process_set():
    """test_horovod_*_process_set: a DistributedOptimizer over a process set of ranks 0 and 1
    (of 3) trains as stock Horovod does there; rank 2, outside it, takes no part and hangs no one.
    Needs HOROVOD_DYNAMIC_PROCESS_SETS=1."""
    ps = hvd.add_process_set([0, 1])
    try:
        if ps.included():
            stock, _ = run_mlp("stock", process_set=ps, momentum=0.9)
            for kind in FLAVOURS:
                ours, opt = run_mlp(kind, process_set=ps, momentum=0.9)
                assert_close(snapshot(stock), snapshot(ours), kind, "process set")
            every = hvd.allgather(torch.cat([p.detach().reshape(-1) for p in ours.parameters()])[None],
                                  process_set=ps)
            assert torch.equal(every[0], every[1]), "parameters differ between the set's ranks"
    finally:
        hvd.remove_process_set(ps)


CHECKS = {name[len("check_"):]: f for name, f in list(globals().items()) if name.startswith("check_")}

if __name__ == "__main__":
    rank_checks.main(CHECKS)

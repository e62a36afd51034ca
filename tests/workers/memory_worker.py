"""What the optimizer and compressor keep alive, step after step through a default warm-up
(run by tests/test_memory.py on 2 ranks).

For each configuration: the bytes of every tensor storage reachable from the optimizer and
the compressor (``hvd_topk.held_bytes``: found from the objects, each storage once, the
parameters and gradients excluded since dense training holds them too), after each of
``STEPS`` steps, against stock ``hvd.DistributedOptimizer``'s for the same model and
optimizer. The bound: dense + 1.25x the parameters' bytes (one fp32 residual, plus what
scales with a group); and nothing that scales with the model or ``k`` grows once the first
step has built the buffers. And within a step, once its groups are scattered, the gradients
and the groups' results weigh one copy of the gradients (``one_result_*``).
"""

import dataclasses

import horovod.torch as hvd
import rank_checks
import torch
import torch.nn as nn

import hvd_topk
from hvd_topk.cost import choose_exchange

STEPS = 120  # longer than the default warm-up (100 steps)
BOUND = 1.25


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 96), nn.LayerNorm(96))


def make_optimizer(kind, model):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                              {"params": rest, "weight_decay": 0.0}], lr=1e-3)


def held_per_step(kind, compression, steps):
    model = make_model()
    params = list(model.parameters())
    if compression is None:
        opt = hvd.DistributedOptimizer(make_optimizer(kind, model), named_parameters=model.named_parameters())
    else:
        opt = hvd_topk.DistributedOptimizer(make_optimizer(kind, model),
                                            named_parameters=model.named_parameters(),
                                            compression=compression)
    gen = torch.Generator().manual_seed(1 + hvd.rank())
    held = []
    for _ in range(steps):
        x = torch.randn(32, 96, generator=gen)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        grads = [p.grad for p in params if p.grad is not None]
        held.append(hvd_topk.held_bytes(opt, compression, exclude=params + grads))
    return held, sum(p.numel() * p.element_size() for p in params)


def first_all_sparse(comp) -> int:
    """The first step at which every parameter the compressor sends sparse after the warm-up
    is sent sparse (``cost.choose_exchange`` at each step's ratio)."""
    params = list(make_model().parameters())
    final = [p for p in params if choose_exchange(comp.settings, p, hvd.size(), comp.ratio) != "dense"]
    schedule = dataclasses.replace(comp.settings, warmup_steps=comp.warmup_steps)  # the length in force
    return next(t for t in range(STEPS)
                if all(choose_exchange(comp.settings, p, hvd.size(), schedule.ratio_at(t)) != "dense"
                       for p in final))


def check(kind, **topk):
    dense, param_bytes = held_per_step(kind, None, 3)
    comp = hvd_topk.TopKCompressor(**topk)
    assert comp.warmup_steps == 100 and comp.warmup_ratio == 0.25  # the defaults
    held, _ = held_per_step(kind, comp, STEPS)
    limit = dense[-1] + BOUND * param_bytes
    worst = max(range(STEPS), key=lambda t: held[t])
    assert held[worst] <= limit, (
        f"{kind} {topk}: after step {worst} the optimizer and compressor hold {held[worst]} bytes, "
        f"beyond dense {dense[-1]} + {BOUND} x {param_bytes} parameter bytes = {limit:.0f}")
    # What may change after step 1 is per-group tables (a layout gains its sample's per-segment
    # numbers once k is small enough to sample): a few words per tensor, never k-sized.
    # A tensor the exchange choice sends dense at the warm-up's first ratios (the sparse
    # allreduce's owner step would exceed its memory budget, exchange_core.fits_memory) gains
    # its residual at its first sparse step: the level held from the step where every tensor
    # the step sends sparse at the end is sparse.
    slack = 256 * len(list(make_model().parameters()))
    start = max(1, first_all_sparse(comp))
    grew = [t for t in range(start, STEPS) if held[t] > held[start] + slack]
    assert not grew, (f"{kind} {topk}: held bytes grew after step {start}, at steps {grew[:5]}: "
                      f"{held[start]} -> {[held[t] for t in grew[:5]]}")
    print(f"rank {hvd.rank()} {kind} {topk}: held {held[1] / param_bytes:.3f}x params (dense "
          f"{dense[-1] / param_bytes:.3f}x), at most {max(held) / param_bytes:.3f}x over {STEPS} steps",
          flush=True)


def step_holds_one_result(exchange, kind="sgd"):
    """In a step of a model whose groups hold several tensors, once every group's result has
    been scattered (when the step's check begins): the gradients and the groups' result
    buffers, each storage once, weigh the gradients' bytes, not twice that. Each group's
    result becomes its gradients' storage as soon as it is scattered, and the local
    gradients go group by group: a step never holds every group's result beside every local
    gradient (one more copy of the model)."""
    from hvd_topk.synchronize import StepExchange
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(128, 128) for _ in range(8)])
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    comp = hvd_topk.TopKCompressor(0.01, exchange=exchange, warmup_steps=0, min_numel=0,
                                   group_bytes=grad_bytes // 4)
    opt = hvd_topk.DistributedOptimizer(make_optimizer(kind, model), compression=comp, log_every=0,
                                        named_parameters=model.named_parameters())
    seen = []
    check = StepExchange.check

    def counting_check(self, groups, names):
        assert max(len(g.params) for g in groups) > 1, "no group of several tensors"
        tensors = [p.grad for g in groups for p in g.params] + [g.ctx.out for g in groups]
        seen.append(sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                         for t in tensors}.values()))
        return check(self, groups, names)

    StepExchange.check = counting_check
    try:
        gen = torch.Generator().manual_seed(1 + hvd.rank())
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(16, 128, generator=gen)).square().mean().backward()
            opt.step()
    finally:
        StepExchange.check = check
    assert len(seen) == 3 and max(seen) <= grad_bytes, (exchange, kind, [b / grad_bytes for b in seen])
    print(f"rank {hvd.rank()} {exchange} {kind}: gradients and results {max(seen) / grad_bytes:.3f}x "
          "the gradients' bytes", flush=True)


CHECKS = {
    "one_result_allgather": lambda: step_holds_one_result("allgather"),
    "one_result_sparse_allreduce": lambda: step_holds_one_result("sparse_allreduce"),
    "one_result_adamw": lambda: step_holds_one_result("sparse_allreduce", "adamw"),
    "sgd": lambda: check("sgd", ratio=0.01),
    "sgd_0.1%": lambda: check("sgd", ratio=0.001),
    "sgd_sparse_allreduce": lambda: check("sgd", ratio=0.01, exchange="sparse_allreduce"),
    "adamw": lambda: check("adamw", ratio=0.01),
    # Adam at 0.1% warms up over 316 steps by default: 100 here, so that the run sees its end.
    "adamw_sparse_allreduce": lambda: check("adamw", ratio=0.001, exchange="sparse_allreduce",
                                            warmup_steps=100),
}

if __name__ == "__main__":
    rank_checks.main(CHECKS)

"""Resume from a checkpoint mid-training == never stopping, bit for bit (2 ranks).

Run A trains 6 steps. Run B trains 3 steps, saves with hvd_topk.save_checkpoint, builds a new
model, optimizer and compressor, restores with hvd_topk.load_checkpoint, and trains 3 more.
Residuals, momentum-correction velocities, the warm-up position and SGD's momentum all live in
the checkpoint, so A and B must end with identical parameters. ``adamw`` as the second
argument: the same with AdamW and Adam correction (each rank's own Adam moments and step
counts are in the checkpoint too).
"""

import sys

import horovod.torch as hvd
import torch
import torch.nn as nn
from exchange_worker import batch, make_model

import hvd_topk


def build(kind="sgd", min_numel=0, **kw):
    """``min_numel=0``: every tensor sparse and corrected; 4096: the biases and the last layer
    dense (stepped by the wrapped optimizer). ``kw`` goes to the optimizer."""
    model = make_model()
    if kind == "adamw":
        inner = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
        comp = hvd_topk.TopKCompressor(0.01, min_numel=min_numel, warmup_steps=4, adam_variance_steps=2)
    else:
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        comp = hvd_topk.TopKCompressor(0.01, min_numel=min_numel, warmup_steps=4)
    return model, hvd_topk.DistributedOptimizer(inner, named_parameters=model.named_parameters(),
                                                compression=comp, **kw)


def train(model, opt, steps):
    for step in steps:
        opt.zero_grad()
        x, y = batch(step)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


if __name__ == "__main__":
    hvd.init()
    torch.set_num_threads(1)
    path, kind = sys.argv[1], (sys.argv[2:] or ["sgd"])[0]
    model_a, opt_a = build(kind)
    train(model_a, opt_a, range(6))

    model_b, opt_b = build(kind)
    train(model_b, opt_b, range(3))
    hvd_topk.save_checkpoint(path, model_b, opt_b, step=3)
    del model_b, opt_b
    model_c, opt_c = build(kind)
    extra = hvd_topk.load_checkpoint(path, model_c, opt_c)
    assert extra["step"] == 3, extra
    assert opt_c._compression.steps == 3
    torch.load(path, weights_only=True)  # no arbitrary pickle needed
    train(model_c, opt_c, range(3, 6))
    for (name, a), (_, c) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert torch.equal(a, c), f"{name}: resumed run differs from the uninterrupted one"
    # Without the residuals the result differs: the checkpoint is what makes it identical.
    model_d, opt_d = build(kind)
    train(model_d, opt_d, range(3))
    hvd.broadcast_parameters(model_d.state_dict(), root_rank=0)
    state = opt_d.topk_state_dict()
    if kind == "adamw":  # only the Adam moments dropped
        assert state["exp_avg_sq"] and state["adam_steps"]
        state["exp_avg"], state["exp_avg_sq"], state["adam_steps"] = {}, {}, {}
    else:
        state["residuals"], state["velocities"] = {}, {}
    opt_d.load_topk_state_dict(state)
    train(model_d, opt_d, range(3, 6))
    differs = any(not torch.equal(a, d) for (_, a), (_, d) in
                  zip(model_a.named_parameters(), model_d.named_parameters()))
    assert differs, "dropping the residuals (or the Adam moments) should change the result"
    print(f"rank {hvd.rank()}: checkpoint resume bit-identical OK ({kind})", flush=True)

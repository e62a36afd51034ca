"""Load a 2-rank checkpoint on another number of ranks (the documented policy, checkpoint.py):
every rank starts from the old ranks' mean residual, mean velocity and mean Adam moments,
then trains on."""

import sys

import horovod.torch as hvd
import torch
from checkpoint_worker import build, train

import hvd_topk

if __name__ == "__main__":
    hvd.init()
    torch.set_num_threads(1)
    path, kind = sys.argv[1], (sys.argv[2:] or ["sgd"])[0]
    saved = torch.load(path, weights_only=True)
    assert saved["world_size"] == 2 != hvd.size()
    model, opt = build(kind)
    hvd_topk.load_checkpoint(path, model, opt)
    comp = opt._compression
    assert comp.steps == saved["topk"][0]["steps"]
    memories = [("residuals", comp.state.residuals)]
    memories += [("velocities", comp.state.velocities)] if kind == "sgd" else [
        ("exp_avg", comp.state.exp_avg), ("exp_avg_sq", comp.state.exp_avg_sq)]
    if kind == "adamw":
        assert comp.state.adam_steps == saved["topk"][0]["adam_steps"] and comp.state.adam_steps
    for key, memory in memories:
        names = saved["topk"][0][key].keys()
        assert names and set(memory) == set(names), key
        for name in names:
            mean = (saved["topk"][0][key][name] + saved["topk"][1][key][name]) / 2
            assert torch.equal(memory.get(name), mean), f"{key} {name}"
    train(model, opt, range(3, 5))
    print(f"rank {hvd.rank()}/{hvd.size()}: checkpoint resize OK ({kind})", flush=True)

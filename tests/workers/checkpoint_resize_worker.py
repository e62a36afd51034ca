"""Load a 2-rank checkpoint on another number of ranks (the documented policy, checkpoint.py):
every rank starts from the old ranks' mean residual and mean velocity, then trains on."""

import sys

import horovod.torch as hvd
import torch
from checkpoint_worker import build, train

import hvd_topk

if __name__ == "__main__":
    hvd.init()
    torch.set_num_threads(1)
    path = sys.argv[1]
    saved = torch.load(path, weights_only=True)
    assert saved["world_size"] == 2 != hvd.size()
    model, opt = build()
    hvd_topk.load_checkpoint(path, model, opt)
    comp = opt._compression
    assert comp.steps == saved["topk"][0]["steps"]
    for key, memory in (("residuals", comp.memory), ("velocities", comp.velocity)):
        names = saved["topk"][0][key].keys()
        assert names and set(memory) == set(names), key
        for name in names:
            mean = (saved["topk"][0][key][name] + saved["topk"][1][key][name]) / 2
            assert torch.equal(memory.get(name), mean), f"{key} {name}"
    train(model, opt, range(3, 5))
    print(f"rank {hvd.rank()}/{hvd.size()}: checkpoint resize OK", flush=True)

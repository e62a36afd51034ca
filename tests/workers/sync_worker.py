"""One rank (HOROVOD_ELASTIC=1: hooks registered) counts the sync-forcing ops of training
steps on the generic torch path (HVD_TOPK_CPU_KERNEL=0). Prints ``SYNCS <where> ...`` per
step: at most the one allowed point (``check``) may appear."""

import os
import sys

import horovod.torch as hvd
import torch
import torch.nn as nn
from sync_ops import recording

import hvd_topk

assert os.environ.get("HVD_TOPK_CPU_KERNEL") == "0"
hvd.init()
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
momentum = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
group_bytes = int(sys.argv[2]) if len(sys.argv) > 2 else None
amp = len(sys.argv) > 3 and sys.argv[3] == "amp"
adamw = len(sys.argv) > 4 and sys.argv[4] == "adamw"  # Adam correction
comp = hvd_topk.TopKCompressor(0.01, warmup_steps=0, group_bytes=group_bytes)
scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if amp else None
inner = (torch.optim.AdamW(model.parameters(), lr=0.01, amsgrad=True) if adamw
         else torch.optim.SGD(model.parameters(), lr=0.01, momentum=momentum))
opt = hvd_topk.DistributedOptimizer(inner,
                                    named_parameters=model.named_parameters(), compression=comp,
                                    grad_scaler=scaler)
x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
for step in range(4):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    with recording() as rec:
        (scaler.scale(loss) if amp else loss).backward()  # the hooks: compress_group + allgather
    hooks = list(rec.syncs)
    with recording() as rec:
        if amp:  # Horovod's AMP recipe; the GradScaler's own syncs are not hvd_topk's
            opt.synchronize()
            scaler.unscale_(opt)
            with opt.skip_synchronize():
                scaler.step(opt)
            scaler.update()
        else:
            opt.step()
    ours = [s for s in rec.syncs if s[1] not in ("outside hvd_topk", "wrapped optimizer")]
    print(f"STEP {step}|{hooks}|{ours}", flush=True)
    print(f"SPARSE {opt.comm_stats.sparse_tensors} DENSE {opt.comm_stats.dense_tensors}", flush=True)

"""Elastic data-parallel training (Horovod Elastic) with hvd_topk's Top-K compression.

Workers may fail or join mid-training: ``hvd.elastic.TorchState`` commits the model, the
optimizer and -- once ``hvd_topk`` is imported -- every rank's residuals, momentum-correction
velocities and warm-up step. After a failure the survivors roll back to the last commit and
go on; after a membership change rank 0's state is broadcast and the ranks agree on ``k`` again.
A lost rank's residual (gradient it had not yet sent) is lost with it.

Launch (a discovery script prints one ``host:slots`` line per available host)::

    horovodrun -np 3 --min-np 2 --max-np 3 --host-discovery-script ./discover_hosts.sh \\
        python examples/train_elastic.py --topk 0.01

Same flags as ``examples/train.py`` (models, data, compression), plus ``--batches-per-commit``.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import horovod.torch as hvd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import load_dataset  # noqa: E402
from models import build_model  # noqa: E402
from train import evaluate, make_compression, parse_args, pick_device  # noqa: E402

import hvd_topk  # noqa: E402  (importing it registers the elastic state handler)


def main(args):
    hvd.init()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    data = load_dataset(args.dataset, args.data_dir, seed=0)
    train_sampler = hvd.elastic.ElasticSampler(data.train, shuffle=True, seed=args.seed)
    train_loader = DataLoader(data.train, batch_size=args.batch_size, sampler=train_sampler)

    device = pick_device(args.device)
    model = build_model(args.model, data.input_shape, data.num_classes).to(device)
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)
    compression = make_compression(args)
    optimizer = hvd_topk.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                              compression=compression, log_every=0)
    state = hvd.elastic.TorchState(model=model, optimizer=optimizer, train_sampler=train_sampler,
                                   epoch=0, batch=0, acc=float("nan"))

    def on_reset():
        if hvd.rank() == 0:
            print(f"reset: {hvd.size()} ranks now, resuming epoch {state.epoch + 1} "
                  f"batch {state.batch}", flush=True)

    state.register_reset_callbacks([on_reset])

    @hvd.elastic.run
    def train(state):
        t_start = time.time()
        while state.epoch < args.epochs:
            for x, y in train_loader:  # the sampler skips what this epoch already processed
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                state.batch += 1
                state.train_sampler.record_batch(state.batch - 1, args.batch_size)
                if state.batch % args.batches_per_commit == 0:
                    state.commit()
            test = DataLoader(data.test, batch_size=256, sampler=DistributedSampler(
                data.test, num_replicas=hvd.size(), rank=hvd.rank(), shuffle=False))
            state.acc, test_loss = evaluate(model, test)
            state.epoch += 1
            if hvd.rank() == 0:
                print(f"epoch {state.epoch:3d}  ranks {hvd.size()}  loss {loss.item():.4f}  "
                      f"test loss {test_loss:.4f}  test acc {100 * state.acc:.2f}%  "
                      f"{time.time() - t_start:.1f}s", flush=True)
            state.batch = 0
            state.train_sampler.set_epoch(state.epoch)  # at the end: clears what was processed
            state.commit()

    train(state)
    if hvd.rank() == 0:
        print(f"final test accuracy: {100 * state.acc:.2f}%", flush=True)
    return state.acc


if __name__ == "__main__":
    main(parse_args(extra=[(("--batches-per-commit",),
                            dict(type=int, default=10, help="commit the elastic state every N batches"))]))

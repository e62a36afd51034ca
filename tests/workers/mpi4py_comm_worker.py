"""Horovod initialised from an mpi4py communicator (run by tests/test_launch_paths.py).

Started with plain ``mpirun -np 2`` (no horovodrun): ``hvd.init(comm=MPI.COMM_WORLD)`` must give
Horovod the communicator's ranks, and a few hvd_topk.DistributedOptimizer steps with a different
batch per rank must leave the parameters bit-identical on every rank. The comparison goes
through mpi4py's own allgather, not Horovod's, so it does not trust the code under test.
"""

import numpy as np
import torch
import torch.nn as nn
from mpi4py import MPI

import horovod.torch as hvd
import hvd_topk


def main():
    comm = MPI.COMM_WORLD
    hvd.init(comm=comm)
    torch.set_num_threads(1)
    assert hvd.mpi_enabled(), "hvd.init(comm=...) must run on the MPI controller"
    assert (hvd.rank(), hvd.size()) == (comm.Get_rank(), comm.Get_size()), \
        f"horovod {hvd.rank()}/{hvd.size()} vs mpi4py {comm.Get_rank()}/{comm.Get_size()}"

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10))
    before = [p.detach().clone() for p in model.parameters()]
    opt = hvd_topk.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        named_parameters=model.named_parameters(),
        compression=hvd_topk.TopKCompressor(0.05, min_numel=0, density_aware=False))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for step in range(3):
        g = torch.Generator().manual_seed(100 * hvd.rank() + step)  # different data per rank
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    stats = opt.comm_stats
    assert stats.sparse_tensors > 0 and stats.bytes_sent < stats.dense_bytes, stats
    for (name, p), p0 in zip(model.named_parameters(), before):
        assert not torch.equal(p.detach(), p0), f"{name} did not change"
        mine = p.detach().numpy()
        for r, other in enumerate(comm.allgather(mine)):
            assert np.array_equal(other, mine), f"{name}: rank {r} differs from rank {hvd.rank()}"
    print(f"rank {hvd.rank()}/{hvd.size()} mpi4py comm: OK", flush=True)


if __name__ == "__main__":
    main()

"""``comm_stats`` against the wire (run by tests/test_bytes.py on 3 ranks).

Every sparse collective the optimizer starts is recorded as it is handed to Horovod (its
payload's bytes); ``comm_stats``, which counts the exchanges' byte model
(``SparseContext.traffic`` -> ``exchange.traffic``), must equal what was recorded, to the byte,
for both exchanges, one tensor or many per group, float32 and float16 values, through a
warm-up that changes ``k`` every step.
"""

import horovod.torch as hvd
import rank_checks
import torch
import torch.nn as nn
from horovod.torch import mpi_ops

import hvd_topk
from hvd_topk.exchange import traffic

WIRE = []  # (collective, bytes handed to Horovod) of this step's sparse collectives


def _recording(kind, start, name_at):
    def record(tensor, *args, **kwargs):
        name = kwargs.get("name", args[name_at] if len(args) > name_at else None)
        if name is not None and ".topk" in name:
            WIRE.append((kind, tensor.numel() * tensor.element_size()))
        return start(tensor, *args, **kwargs)
    return record


# allgather_async(tensor, name, ...), alltoall_async(tensor, splits, name, ...)
mpi_ops.allgather_async = _recording("allgather", mpi_ops.allgather_async, 0)
mpi_ops.alltoall_async = _recording("alltoall", mpi_ops.alltoall_async, 1)


def wire_bytes(world):
    """``(sent, received, link)`` of the recorded collectives, each counted as comm_stats
    defines it: an allgather sends its tensor and receives ``P`` of them; an alltoall sends
    and receives the ``P - 1`` rows that leave or reach this rank; the link carries what goes
    to the other ranks."""
    sent = received = link = 0
    for kind, nbytes in WIRE:
        if kind == "allgather":
            sent, received, link = sent + nbytes, received + world * nbytes, link + (world - 1) * nbytes
        else:
            row = nbytes // world
            sent, received, link = (sent + (world - 1) * row, received + (world - 1) * row,
                                    link + (world - 1) * row)
    return sent, received, link


def check_bytes(exchange, group_bytes, value_dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 300, bias=False), nn.Linear(300, 70, bias=False),
                          nn.Linear(70, 5, bias=False))
    comp = hvd_topk.TopKCompressor(0.02, exchange=exchange, group_bytes=group_bytes, min_numel=0,
                                   density_aware=False, value_dtype=value_dtype, warmup_steps=4,
                                   warmup_ratio=0.3, region_refresh=2)
    opt = hvd_topk.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                        named_parameters=model.named_parameters(), compression=comp)
    world = hvd.size()
    for step in range(6):
        g = torch.Generator().manual_seed(100 * hvd.rank() + step)
        WIRE.clear()
        opt.zero_grad()
        model(torch.randn(16, 40, generator=g)).square().mean().backward()
        opt.step()
        stats = opt.comm_stats
        assert stats.dense_tensors == 0 and stats.sparse_tensors == 3, stats
        assert WIRE and all(kind == ("alltoall" if exchange == "sparse_allreduce" else "allgather")
                            for kind, _ in WIRE[:1]), WIRE
        got = (stats.bytes_sent, stats.bytes_received, stats.link_bytes)
        assert got == wire_bytes(world), (step, got, wire_bytes(world), WIRE)
        # The model from host numbers alone (what "auto" and the benchmarks use) agrees too.
        ratio = comp.settings.ratio_at(step)
        ks = [hvd_topk.num_selected(p.numel(), ratio) for p in model.parameters()]
        vbytes = (value_dtype or torch.float32).itemsize
        groups = [ks] if group_bytes else [[k] for k in ks]
        model_bytes = [traffic(exchange, ks_, world, vbytes, 4, comp.region_capacity) for ks_ in groups]
        assert got == tuple(map(sum, zip(*model_bytes))), (step, got, model_bytes)


CHECKS = {f"{exchange}_{'grouped' if gb else 'per_tensor'}_{'fp16' if vdt else 'fp32'}":
          (lambda e=exchange, gb=gb, vdt=vdt: check_bytes(e, gb, vdt))
          for exchange in ("allgather", "sparse_allreduce") for gb in (0, 1 << 30)
          for vdt in (None, torch.float16)}

if __name__ == "__main__":
    rank_checks.main(CHECKS)

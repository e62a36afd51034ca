"""The Horovod collectives of the sparse exchanges: an allgather and an alltoall of packed
payloads, each started asynchronously and returned as a callable handle (what Horovod's own
sparse path returns and its ``DistributedOptimizer.synchronize()`` accepts).

The Horovod engine's only module-level use of ``horovod.torch.mpi_ops`` among the exchanges,
kept apart so that the byte model and the scatter (``exchange_core.py``) need no Horovod."""

from __future__ import annotations

from typing import Callable

import torch
from horovod.torch import mpi_ops

__all__ = ["sparse_allgather_async", "sparse_alltoall_async"]


def sparse_allgather_async(payload: torch.Tensor, name: str,
                           process_set=mpi_ops.global_process_set) -> Callable[[], torch.Tensor]:
    """Start an allgather of ``payload`` and return a callable that waits for the result.

    A callable handle is what Horovod's own sparse path returns and what its
    ``DistributedOptimizer.synchronize()`` accepts.
    """
    handle = mpi_ops.allgather_async(payload, name=name, process_set=process_set)

    def wait() -> torch.Tensor:
        return mpi_ops.synchronize(handle)  # (world * nbytes,) uint8

    return wait


def sparse_alltoall_async(payload: torch.Tensor, rows: int, name: str,
                          process_set=mpi_ops.global_process_set) -> Callable[[], torch.Tensor]:
    """Start an alltoall of ``payload``, ``rows`` equal rows (row j to rank j), and return a
    callable that waits for the ``(rows * row_bytes,)`` received rows (row r from rank r).

    The splits are explicit, so that a rank whose rows have another size is received (and
    detected by ``sparse_allreduce.reduce_region``) instead of failing in Horovod. They are
    host numbers known before the step: nothing is read from the device.
    """
    splits = torch.full((rows,), payload.numel() // max(rows, 1), dtype=torch.int32)
    handle = mpi_ops.alltoall_async(payload, splits=splits, name=name, process_set=process_set)

    def wait() -> torch.Tensor:
        output, _received_splits = mpi_ops.synchronize(handle)
        return output

    return wait

"""The sparse exchange: allgather the packed payloads, scatter-add them into a dense gradient.

::

    rank r:  grad_r ──compress──► payload_r = [vals_r | idx_r]   (k entries, ~2k*4 bytes)
                                        │  allgather (Horovod; fused with other tensors)
    every rank:  [payload_0 | payload_1 | ... | payload_{P-1}]    (P * nbytes)
                                        │  divide the P*k values by P, scatter-add into zeros(n)
                     grad = Σ_r  scatter(vals_r / P at idx_r)

Only the payloads cross the wire; nothing dense-sized does. Every rank sums the same gathered
buffer in the same order, so every rank ends with bit-identical gradients.
"""

from __future__ import annotations

from typing import Callable

import torch
from horovod.torch import mpi_ops

__all__ = ["sparse_allgather_async", "scatter_add_"]


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


def scatter_add_(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[indices[i]] += values[i]`` for all i, duplicates summed, deterministically.

    Arguments:
        out: ``(n,)`` dense buffer, modified in place.
        indices: ``(m,)`` int32/int64 indices (duplicates across ranks are expected).
        values: ``(m,)`` values, cast to ``out``'s dtype.
    """
    values = values.to(out.dtype)
    if out.device.type == "cpu":
        out.index_add_(0, indices, values)
    else:
        # CUDA index_add_ uses atomics (order varies between ranks); index_put_ with
        # accumulate=True sorts first, so every rank gets the same bits.
        out.index_put_((indices.long(),), values, accumulate=True)
    return out

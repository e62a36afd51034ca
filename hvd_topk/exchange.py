"""The sparse exchange: allgather the packed payloads, scatter-add them into a dense gradient.

::

    rank r:  grad_r ──compress──► payload_r = [vals_r | idx_r]   (k entries, ~2k*4 bytes)
                                        │  allgather (Horovod; fused with other tensors)
    every rank:  [payload_0 | payload_1 | ... | payload_{P-1}]    (P * nbytes)
                                        │  divide the P*k values by P, scatter-add into zeros(n)
                     grad = Σ_r  scatter(vals_r / P at idx_r)

Only the payloads cross the wire; nothing dense-sized does. Every rank sums the same gathered
buffer in the same order, so every rank ends with bit-identical gradients.

The allgather's bytes per rank grow with the world size, ``(P-1) * k`` entries; the sparse
allreduce (``sparse_allreduce.py``: an alltoall to region owners, then an allgather of what
they keep) stays near ``3 k (P-1)/P``. ``exchange_bytes`` is the one byte model behind
``TopKCompressor(exchange="auto")``'s choice among these two and a dense allreduce.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import torch
from horovod.torch import mpi_ops

__all__ = ["sparse_allgather_async", "sparse_alltoall_async", "scatter_add_", "exchange_bytes",
           "ring_allreduce_bytes", "region_sizes", "cheapest_exchange", "EXCHANGES", "QUANTILES"]

#: The exchanges a gradient can take, cheapest first when the model ties.
EXCHANGES = ("dense", "allgather", "sparse_allreduce")
#: The sparse allreduce's load statistics per (owner, tensor), in its allgather row: the
#: demand, then QUANTILES - 1 inner quantiles (``sparse_allreduce.refresh_bounds``).
QUANTILES = 8


def region_sizes(k: int, world: int, capacity: float) -> Tuple[int, int]:
    """The sparse allreduce's ``(c, R)`` for a tensor sending ``k`` entries over ``world``
    ranks: at most ``c`` entries per (sender, region), and ``R`` entries kept per region
    (``P * R >= k``)."""
    if k == 0:
        return 0, 0
    c = min(k, math.ceil(capacity * k / world))
    return c, math.ceil(k / world)


def ring_allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes a ring allreduce of ``nbytes`` carries on each rank's link, each way:
    ``2 (P-1)/P * nbytes`` (0 for one rank)."""
    return math.ceil(2 * (world - 1) * nbytes / world) if world > 1 else 0


def exchange_bytes(numel: int, k: int, world: int, grad_bytes: int, value_bytes: int,
                   index_bytes: int, capacity: float = 2.0) -> dict:
    """Bytes each rank's link carries in each direction to exchange one gradient of ``numel``
    entries, ``k`` of them selected, over ``world`` ranks -- the model behind
    ``exchange="auto"`` (``docs/performance/scaling.md`` measures it against real links):

    - ``dense``: a ring allreduce, ``2 (P-1)/P * n * b_grad``;
    - ``allgather``: every rank receives every other rank's payload (8-byte header and ``k``
      value + index pairs), ``(P-1) * (8 + k * b_entry)``;
    - ``sparse_allreduce``: an alltoall of rows of ``c = ceil(capacity k / P)`` entries plus an
      8-byte header, then an allgather of every owner's ``R = ceil(k / P)`` entries, 8-byte
      header and ``QUANTILES`` load statistics: ``(P-1) * (row1 + row2)``.

    With one rank nothing is sent; the model is then evaluated for two, so that a single-rank
    run compresses as a small job would.
    """
    p = max(world, 2)
    entry = value_bytes + index_bytes
    c, r = region_sizes(k, p, capacity)
    return {
        "dense": ring_allreduce_bytes(numel * grad_bytes, p),
        "allgather": (p - 1) * (8 + k * entry),
        "sparse_allreduce": (p - 1) * ((8 + c * entry) + (8 + r * entry + QUANTILES * index_bytes)),
    }


def cheapest_exchange(costs: dict, allowed) -> str:
    """The allowed exchange of fewest bytes in ``costs`` (ties: the earlier in ``EXCHANGES``)."""
    return min((e for e in EXCHANGES if e in allowed), key=lambda e: (costs[e], EXCHANGES.index(e)))


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

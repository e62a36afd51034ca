"""What every engine's sparse exchange shares, without Horovod: the byte model of the exchanges
(``traffic``, ``exchange_bytes``, ``ring_allreduce_bytes``, ``gradient_costs``,
``cheapest_exchange``), the deterministic scatter-add that sums the ranks' entries, and a
group's local indices.

The Horovod engine's exchanges (``exchange.AllgatherExchange``,
``sparse_allreduce.SparseAllreduceExchange``) and the DDP hook (``hvd_topk.ddp``) both build on
this module; the time model (``cost.py``) charges ``traffic``'s bytes to the link.

The allgather's bytes per rank grow with the world size, ``(P-1) * k`` entries; the sparse
allreduce (an alltoall to region owners, then an allgather of what they keep) stays near
``3 k (P-1)/P``. ``traffic`` is the one byte model: ``comm_stats`` counts by it.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from ._cpu_kernel import add_at
from .layout import GroupLayout, index_dtype, num_selected
from .settings import TopKSettings

__all__ = ["EXCHANGES", "QUANTILES", "MEMORY_BUDGET", "header_words", "region_sizes",
           "ring_allreduce_bytes", "traffic", "temporaries", "fits_memory", "exchange_bytes",
           "cheapest_exchange", "gradient_sizes", "gradient_costs", "scatter_add_", "local_indices",
           "SCATTER_ENTRIES"]

#: The exchanges a gradient can take, cheapest first when the model ties.
EXCHANGES = ("dense", "allgather", "sparse_allreduce")
#: The sparse allreduce's load statistics per (owner, tensor), in its allgather row: the
#: demand, then QUANTILES - 1 inner quantiles (``sparse_allreduce.refresh_bounds``).
QUANTILES = 8
#: Gathered entries a receive reads at once (the allgather's on both engines): its copies of
#: values and positions stay near this many entries whatever the world size and ``K``.
SCATTER_ENTRIES = 1 << 18


def header_words(segments: int) -> int:
    """int32 words of a payload's header for a group of ``segments`` tensors."""
    return 2 if segments == 1 else 2 + segments


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


def traffic(exchange: str, ks: Sequence[int], world: int, value_bytes: int, index_bytes: int,
            capacity: float = 2.0) -> Tuple[int, int, int]:
    """The byte model, the wire's own: ``(sent, received, link)`` bytes of one rank for one
    group of tensors sending ``ks`` entries each over ``world`` ranks, ``link`` being what its
    link carries to other ranks (each way, for the symmetric collectives used here).

    - ``allgather``: one payload, header (``2`` int32 words, ``2 + S`` for a group of ``S``
      tensors) plus ``K`` values and indices; every rank receives all ``P``;
    - ``sparse_allreduce``: ``P`` alltoall rows of ``1 + S`` header words and ``C`` entries,
      then an allgather of each owner's row: header, ``R`` entries, ``S * QUANTILES`` load
      statistics (``sparse_allreduce.RegionPlan``).
    """
    entry, segments = value_bytes + index_bytes, len(ks)
    head = 4 * header_words(segments)
    if exchange == "sparse_allreduce":
        sizes = [region_sizes(k, world, capacity) for k in ks]
        row1 = 4 * (1 + segments) + sum(c for c, _ in sizes) * entry
        row2 = head + sum(r for _, r in sizes) * entry + segments * QUANTILES * index_bytes
        return (world - 1) * row1 + row2, (world - 1) * row1 + world * row2, (world - 1) * (row1 + row2)
    if exchange != "allgather":
        raise ValueError(f"no byte model for exchange {exchange!r}")
    payload = head + sum(ks) * entry
    return payload, world * payload, (world - 1) * payload


#: Bytes of temporaries per alltoall slot the sparse allreduce's owner step handles (it sorts
#: the ``P * c`` entries it receives by int32 position and finds each segment's largest sums
#: by bisection on their bits, ``bit_topk.top_by_bits``): 41 measured on CPU by
#: ``scripts/bench_memory.py --owner-step``.
OWNER_SLOT_BYTES = 40
#: With ``density_aware``, a sparse exchange is a candidate for a gradient only while its
#: temporaries (``temporaries``) are at most this many times the gradient's own bytes; past
#: that the gradient is allreduced dense, which needs none. The allgather's gathered ``P * K``
#: entries are what its link carries (it fits up to ``1 / ratio`` ranks); the sparse
#: allreduce's owner step holds what its link does not, and is held to 5/16 of the gradient's
#: bytes: float32 densities up to 1/64 (the default warm-up's first ~87 steps to 1% go dense,
#: ~51 to 0.1%).
MEMORY_BUDGET = {"dense": 0.0, "allgather": 2.0, "sparse_allreduce": 0.3125}


def temporaries(exchange: str, ks: Sequence[int], world: int, value_bytes: int, index_bytes: int,
                capacity: float = 2.0) -> int:
    """Bytes an exchange's own step holds at once for a group sending ``ks`` entries over
    ``world`` ranks: none for ``dense`` (the allreduce works in place), the gathered ``P * K``
    entries for ``allgather``, the owner's ``OWNER_SLOT_BYTES`` per slot of the ``P * c`` it
    receives for ``sparse_allreduce``."""
    if exchange == "dense":
        return 0
    if exchange == "allgather":
        return world * sum(ks) * (value_bytes + index_bytes)
    if exchange == "sparse_allreduce":
        return world * sum(region_sizes(k, world, capacity)[0] for k in ks) * OWNER_SLOT_BYTES
    raise ValueError(f"no memory model for exchange {exchange!r}")


def fits_memory(exchange: str, numel: int, k: int, world: int, grad_bytes: int, value_bytes: int,
                index_bytes: int, capacity: float = 2.0) -> bool:
    """Whether ``exchange``'s ``temporaries`` for one gradient stay within its ``MEMORY_BUDGET``
    times its bytes (with one rank, evaluated for two, as ``exchange_bytes`` is)."""
    budget = MEMORY_BUDGET[exchange] * numel * grad_bytes
    return temporaries(exchange, (k,), max(world, 2), value_bytes, index_bytes, capacity) <= budget


def exchange_bytes(numel: int, k: int, world: int, grad_bytes: int, value_bytes: int,
                   index_bytes: int, capacity: float = 2.0) -> dict:
    """Bytes each rank's link carries to exchange one gradient of ``numel`` entries, ``k`` of
    them selected, over ``world`` ranks, by each exchange -- the model behind a named exchange
    with ``density_aware`` (``cost.choose_exchange``; ``docs/performance/scaling.md`` measures
    it against real links): a ring allreduce's ``2 (P-1)/P * n * b_grad`` for ``dense``,
    ``traffic``'s ``link`` for the sparse ones. With one rank nothing is sent; the model is
    then evaluated for two, so that a single-rank run compresses as a small job would.
    """
    p = max(world, 2)
    costs = {"dense": ring_allreduce_bytes(numel * grad_bytes, p)}
    for name in EXCHANGES[1:]:
        costs[name] = traffic(name, (k,), p, value_bytes, index_bytes, capacity)[2]
    return costs


def cheapest_exchange(costs: dict, allowed) -> str:
    """The allowed exchange of fewest bytes in ``costs`` (ties: the earlier in ``EXCHANGES``)."""
    return min((e for e in EXCHANGES if e in allowed), key=lambda e: (costs[e], EXCHANGES.index(e)))


def gradient_sizes(settings: TopKSettings, tensor: torch.Tensor,
                   ratio: float) -> Tuple[int, int, int, int, int]:
    """``(numel, k, grad_bytes, value_bytes, index_bytes)`` of one gradient at ``ratio`` under
    ``settings``: what every exchange model (bytes, time, memory) takes of it."""
    n = tensor.numel()
    vdt = settings.value_dtype or tensor.dtype
    return n, num_selected(n, ratio), tensor.element_size(), vdt.itemsize, index_dtype(n).itemsize


def gradient_costs(settings: TopKSettings, tensor: torch.Tensor, world: int, ratio: float) -> dict:
    """``exchange_bytes`` for one gradient at ``ratio`` under ``settings``."""
    n, k, grad_bytes, value_bytes, index_bytes = gradient_sizes(settings, tensor, ratio)
    return exchange_bytes(n, k, world, grad_bytes, value_bytes, index_bytes, settings.region_capacity)


def scatter_add_(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[indices[i]] += values[i]`` for all i, duplicates summed, deterministically.

    Arguments:
        out: ``(n,)`` dense buffer, modified in place.
        indices: ``(m,)`` int32/int64 indices (duplicates across ranks are expected).
        values: ``(m,)`` values, cast to ``out``'s dtype.
    """
    values = values.to(out.dtype)
    if out.device.type == "cpu":
        if not add_at(out, indices, values):  # the CPU kernel: the same adds, prefetched
            out.index_add_(0, indices, values)
    else:
        # CUDA index_add_ uses atomics (order varies between ranks); index_put_ with
        # accumulate=True sorts first, so every rank gets the same bits.
        out.index_put_((indices.long(),), values, accumulate=True)
    return out


def local_indices(sel: torch.Tensor, layout: GroupLayout, index_dtype: torch.dtype) -> torch.Tensor:
    """``(K,)`` each slot's index within its own tensor, in the wire's index dtype."""
    if layout.segments == 1:
        return sel.to(index_dtype)
    return (sel - layout.slot_tables(sel.device)["slot_start"]).to(index_dtype)

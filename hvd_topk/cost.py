"""The exchanges' time model: what ``TopKCompressor(exchange="auto")`` chooses by.

For one gradient of ``n`` entries, ``k`` of them selected, over ``P`` ranks, each exchange
predicts the seconds it adds to a step on one rank::

    dense allreduce:   bytes_dense / B
    allgather:         bytes_ag / B                    + select * n + scatter * P k
    sparse allreduce:  bytes_sar / B + (P-1) latency   + select * n + owner * k + scatter * P R

- ``bytes_*``: the wire's own byte model (``exchange_core.traffic``, ``ring_allreduce_bytes``), what
  the rank's link carries; ``B`` the link's bandwidth.
- Messages: Horovod fuses a step's allreduces and its allgathers into a few collectives
  (tensor fusion), so a gradient sent by either adds bytes to them, not messages. The sparse
  allreduce's alltoall is a collective of its own (Horovod does not fuse alltoalls): it adds
  its ``P - 1`` messages.
- Compute, per device type (``COMPUTE_NS``): ``select`` per gradient entry (compensate,
  select, write the residual), ``scatter`` per entry received and scatter-added, ``owner``
  per selected entry for the sparse allreduce's region work (bucketing, the owners' sorts and
  sums; ``R = ceil(k / P)`` entries kept per region).

One formula per exchange (``allgather_time``, ``sparse_allreduce_time``; the exchanges'
``time`` methods are these), and no Horovod: the DDP hook (``hvd_topk.ddp``) chooses between a
dense allreduce and its allgather by the same ``choose_exchange``.

Every term is computed from host numbers and settings, so every rank takes the same decision.
The link's figures are settings (``link_gbps``, ``link_latency_us``; environment
``HVD_TOPK_LINK_GBPS``, ``HVD_TOPK_LINK_LATENCY_US``); the compute figures can be replaced
through ``HVD_TOPK_COMPUTE_NS`` (for example ``"select=3,scatter=2,owner=300"``). Where they
come from and how well the model predicts measured steps: ``docs/performance.md``
(``scripts/scaling_model.py`` calibrates them from ``scripts/bench_network.py`` runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from .exchange_core import (EXCHANGES, cheapest_exchange, fits_memory, gradient_costs, gradient_sizes,
                            region_sizes, ring_allreduce_bytes, temporaries, traffic)
from .settings import (DEFAULT_LINK_GBPS, DEFAULT_LINK_LATENCY_US, IN_FLIGHT_FLOOR, TopKSettings,
                       in_flight_budget)

__all__ = ["CostModel", "COMPUTE_NS", "DEFAULT_LINK_GBPS", "DEFAULT_LINK_LATENCY_US", "cost_model",
           "parse_compute_ns", "allgather_time", "sparse_allreduce_time",
           "exchange_times", "gradient_times", "fastest_exchange", "choose_exchange"]

#: Compute per device type, nanoseconds. CPU: ``select`` from the CPU kernel's compress
#: (``docs/performance/compression.md``: 1.8-2.8 ns per entry, 1M-25M entries at 1%),
#: ``scatter`` from the scatter-add of gathered entries, ``owner`` from the sparse allreduce's
#: measured extra work on 3-4 emulated hosts (``scripts/scaling_model.py --measured-sar``:
#: 266-612 ns per selected entry; those hosts share two cores, so it errs towards the
#: allgather). CUDA: estimates from memory bandwidth, not measured.
COMPUTE_NS: Dict[str, Dict[str, float]] = {
    "cpu": {"select": 3.0, "scatter": 2.0, "owner": 300.0},
    "cuda": {"select": 0.05, "scatter": 0.1, "owner": 5.0},
}
_COMPUTE_KEYS = ("select", "scatter", "owner")


@dataclass(frozen=True)
class CostModel:
    """A link and a device's compute: the figures the time model needs (see the module)."""

    link_gbps: float = DEFAULT_LINK_GBPS
    latency_us: float = DEFAULT_LINK_LATENCY_US
    select_ns: float = COMPUTE_NS["cpu"]["select"]
    scatter_ns: float = COMPUTE_NS["cpu"]["scatter"]
    owner_ns: float = COMPUTE_NS["cpu"]["owner"]

    @property
    def bytes_per_s(self) -> float:
        """The link's bandwidth in bytes per second."""
        return self.link_gbps * 1e9 / 8

    @property
    def latency_s(self) -> float:
        """One message's latency in seconds."""
        return self.latency_us * 1e-6


def parse_compute_ns(text: str) -> Dict[str, float]:
    """``"select=3,scatter=2,owner=300"`` as a dict (any subset of the three keys), or a
    ``ValueError`` naming what is wrong."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _COMPUTE_KEYS:
            raise ValueError(f"HVD_TOPK_COMPUTE_NS: expected key=ns with keys {_COMPUTE_KEYS}, got {item!r}")
        try:
            out[key] = float(value)
        except ValueError:
            raise ValueError(f"HVD_TOPK_COMPUTE_NS: {key} needs a number of ns, got {value!r}") from None
        if not out[key] >= 0:
            raise ValueError(f"HVD_TOPK_COMPUTE_NS: {key} must be >= 0, got {value!r}")
    return out


def cost_model(settings: TopKSettings, device_type: str,
               compute: Optional[Mapping[str, float]] = None) -> CostModel:
    """The ``CostModel`` for gradients on ``device_type`` under ``settings``: its link, and the
    device type's ``COMPUTE_NS`` (CUDA's for any accelerator) updated with ``compute`` (default:
    ``HVD_TOPK_COMPUTE_NS``)."""
    ns = dict(COMPUTE_NS["cpu" if device_type == "cpu" else "cuda"])
    if compute is None:
        compute = parse_compute_ns(os.environ.get("HVD_TOPK_COMPUTE_NS", ""))
    ns.update(compute)
    return CostModel(settings.link_gbps, settings.link_latency_us, ns["select"], ns["scatter"], ns["owner"])


def allgather_time(numel: int, ks: Sequence[int], world: int, value_bytes: int, index_bytes: int,
                   capacity: float, model: CostModel) -> float:
    """Seconds the allgather adds for a group sending ``ks`` entries of ``numel``: its bytes
    over the link, fused with the step's other allgathers (no messages of its own), the
    selection, and the scatter-add of the ``P * K`` gathered entries."""
    link = traffic("allgather", ks, world, value_bytes, index_bytes, capacity)[2]
    return (link / model.bytes_per_s
            + 1e-9 * (model.select_ns * numel + model.scatter_ns * world * sum(ks)))


def sparse_allreduce_time(numel: int, ks: Sequence[int], world: int, value_bytes: int, index_bytes: int,
                          capacity: float, model: CostModel) -> float:
    """Seconds the sparse allreduce adds: its bytes over the link, its alltoall's ``P - 1``
    messages (Horovod does not fuse alltoalls), the selection, the owners' work per selected
    entry, and the scatter-add of the ``P * R`` entries the owners keep."""
    link = traffic("sparse_allreduce", ks, world, value_bytes, index_bytes, capacity)[2]
    kept = sum(region_sizes(k, world, capacity)[1] for k in ks)
    return (link / model.bytes_per_s + (world - 1) * model.latency_s
            + 1e-9 * (model.select_ns * numel + model.owner_ns * sum(ks)
                      + model.scatter_ns * world * kept))


def exchange_times(numel: int, k: int, world: int, grad_bytes: int, value_bytes: int, index_bytes: int,
                   capacity: float, model: CostModel) -> Dict[str, float]:
    """Seconds each exchange adds to a step for one gradient (the module's model; with one
    rank, evaluated for two, as ``exchange.exchange_bytes`` is)."""
    p = max(world, 2)
    ks: Tuple[int, ...] = (k,)
    return {
        "dense": ring_allreduce_bytes(numel * grad_bytes, p) / model.bytes_per_s,
        "allgather": allgather_time(numel, ks, p, value_bytes, index_bytes, capacity, model),
        "sparse_allreduce": sparse_allreduce_time(numel, ks, p, value_bytes, index_bytes, capacity, model),
    }


def gradient_times(settings: TopKSettings, tensor: torch.Tensor, world: int, ratio: float,
                   compute: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """``exchange_times`` for one gradient at ``ratio`` under ``settings``."""
    n, k, grad_bytes, value_bytes, index_bytes = gradient_sizes(settings, tensor, ratio)
    return exchange_times(n, k, world, grad_bytes, value_bytes, index_bytes, settings.region_capacity,
                          cost_model(settings, tensor.device.type, compute))


def fastest_exchange(times: Mapping[str, float], allowed) -> str:
    """The allowed exchange of least time in ``times`` (ties: the earlier in ``EXCHANGES``)."""
    return min((e for e in EXCHANGES if e in allowed), key=lambda e: (times[e], EXCHANGES.index(e)))


def choose_exchange(settings: TopKSettings, tensor: torch.Tensor, world: int, ratio: float,
                    trained_bytes: Optional[int] = None,
                    compute: Optional[Mapping[str, float]] = None,
                    sparse_exchanges: Sequence[str] = EXCHANGES[1:]) -> str:
    """``"dense"``, ``"allgather"`` or ``"sparse_allreduce"`` for one gradient over ``world``
    ranks at ``ratio``: dense below ``min_numel`` and for what is not a dense floating
    tensor; under ``"auto"`` the fastest by the time model (a dense allreduce among the
    candidates with ``density_aware``). A named exchange is taken as named; with
    ``density_aware``, wherever it moves no more bytes than a dense allreduce (the byte model:
    naming an exchange asks for it, the dense fallback only keeps it from costing more on the
    wire). With ``density_aware``, a sparse exchange whose temporaries exceed
    its ``exchange_core.MEMORY_BUDGET`` times the gradient's bytes is no candidate
    (``exchange_core.fits_memory``; float32 with int32 indices: the sparse allreduce above a
    density of 1/64, the allgather beyond ``1 / ratio`` ranks). ``sparse_exchanges``: those
    the engine has, what ``"auto"`` chooses among. ``trained_bytes``: the bytes of the
    parameters the step trains (both engines pass it; ``None``: unknown). With
    ``density_aware`` and during the warm-up, a sparse exchange whose temporaries at
    ``ratio`` exceed both a quarter of the step's in-flight budget
    (``settings.in_flight_budget``: a thirty-second of the model, at most 8 MiB), or 1 MiB if
    that is more (a small model's first steps are left sparse, as its bytes want), and its
    temporaries at ``settings.ratio`` is no candidate either: the warm-up's
    high ratios never make one gradient's exchange hold more than the larger of the two.
    Beside the allgather's gathered buffer come its payload, the selection's own buffers
    (the CPU kernel's candidates, 12 bytes each, about ``2 K`` of them) and, on Gloo, the
    collective's own copy of the gathered buffer: about four times the limit, the budget.
    Such a gradient is allreduced densely (no residual is owed while it is). Host numbers
    only: every rank takes the same decision."""
    if not tensor.dtype.is_floating_point or tensor.is_sparse:
        return "dense"
    n = tensor.numel()
    if n == 0 or n < settings.min_numel:
        return "dense"
    allowed = tuple(sparse_exchanges) if settings.exchange == "auto" else (settings.exchange,)
    if settings.density_aware:
        _, k, grad_bytes, value_bytes, index_bytes = gradient_sizes(settings, tensor, ratio)
        allowed = ("dense",) + tuple(e for e in allowed if fits_memory(
            e, n, k, world, grad_bytes, value_bytes, index_bytes, settings.region_capacity))
        if trained_bytes is not None and ratio > settings.ratio:
            memory_limit = max(IN_FLIGHT_FLOOR, in_flight_budget(trained_bytes) // 4)
            k_final = gradient_sizes(settings, tensor, settings.ratio)[1]

            def held(exchange: str, selected: int) -> int:
                return temporaries(exchange, (selected,), max(world, 2), value_bytes, index_bytes,
                                   settings.region_capacity)

            allowed = tuple(e for e in allowed
                            if e == "dense" or held(e, k) <= max(memory_limit, held(e, k_final)))
    if len(allowed) == 1:
        return allowed[0]
    if settings.exchange != "auto":
        return cheapest_exchange(gradient_costs(settings, tensor, world, ratio), allowed)
    return fastest_exchange(gradient_times(settings, tensor, world, ratio, compute), allowed)

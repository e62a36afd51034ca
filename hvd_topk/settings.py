"""``TopKSettings``: every setting of ``TopKCompressor``, validated once, frozen, and the
warm-up schedule (``ratio_at``). The measurements behind the defaults are in
``docs/design.md`` and ``docs/convergence.md``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["TopKSettings", "check_ratio", "EXCHANGE_CHOICES", "ADAM_SELECT_CHOICES", "DEFAULT_LINK_GBPS",
           "DEFAULT_LINK_LATENCY_US", "GROUP_BYTES", "GROUP_BYTES_FLOOR",
           "IN_FLIGHT_FLOOR", "in_flight_budget", "WARMUP_STEPS", "warmup_steps_for"]

# What ``exchange=`` accepts: a fixed exchange, or "auto" (chosen per tensor by cost).
EXCHANGE_CHOICES = ("auto", "allgather", "sparse_allreduce")
#: What ``adam_select=`` accepts (see ``TopKSettings``).
ADAM_SELECT_CHOICES = ("agreement", "signal", "momentum", "displacement")
#: The link the time model assumes when neither the settings nor the environment name one:
#: the ordinary network compression is for.
DEFAULT_LINK_GBPS = 1.0
DEFAULT_LINK_LATENCY_US = 50.0
#: ``group_bytes=None``: a group's bytes where it is not one tensor per group, at most an
#: eighth of the step's trained parameters' bytes and at least ``GROUP_BYTES_FLOOR``.
GROUP_BYTES = 32 << 20
GROUP_BYTES_FLOOR = 1 << 20
#: The in-flight budget of a step's payloads, sent and gathered (the Horovod path's
#: ``StepExchange`` and the DDP hook): an eighth of the trained parameters' bytes, at most
#: ``GROUP_BYTES`` (what a step holds beyond its gradients scales with a group, not with the
#: model) and at least this many bytes.
IN_FLIGHT_FLOOR = 1 << 20


#: ``warmup_steps=None``: the warm-up's length; under Adam correction, at ratios below
#: ``WARMUP_REFERENCE_RATIO`` it grows as ``sqrt(WARMUP_REFERENCE_RATIO / ratio)``.
WARMUP_STEPS = 100
WARMUP_REFERENCE_RATIO = 0.01


def warmup_steps_for(ratio: float, adam: bool = False) -> int:
    """The warm-up's length for ``warmup_steps=None``: ``WARMUP_STEPS`` (100), and under Adam
    correction at a ratio below 1% ``100 * sqrt(0.01 / ratio)`` (316 at 0.1%, 1000 at
    0.01%). Adam's step moves every entry by about the learning rate, so what Top-K leaves
    in the residual is about as large as what it sends, and at a ratio ``r`` an entry waits
    about ``1 / r`` steps: with a warm-up of 100 steps at 0.1%, validation losses ended
    14-20% above dense AdamW's at 800 steps on the LM benchmark
    (docs/convergence_lm_families.md, where this length is measured). Without Adam
    correction the warm-up keeps the 100 steps its tables were measured with."""
    ratio = float(ratio)
    if not adam or ratio >= WARMUP_REFERENCE_RATIO:
        return WARMUP_STEPS
    return int(round(WARMUP_STEPS * math.sqrt(WARMUP_REFERENCE_RATIO / ratio)))


def in_flight_budget(trained_bytes: int) -> int:
    """Bytes of a step's payloads, sent and gathered, past which the oldest are finished
    (waited for and scattered) before more are sent."""
    return max(IN_FLIGHT_FLOOR, min(GROUP_BYTES, int(trained_bytes) // 8))


@dataclass(frozen=True)
class TopKSettings:
    """The settings of Top-K compression (``TopKCompressor(**settings)`` takes the same
    keywords). Each is validated here; an error names the setting, what was given and what
    is allowed.

    Arguments:
        ratio: fraction of each tensor's entries to send, in (0, 1]. 0.01 sends 1%.
        value_dtype: dtype of the values on the wire (``torch.float16`` / ``torch.bfloat16``
            halve the value bytes; each rank's rounding error stays in its residual; the
            sparse allreduce's owner rounds the average it sends once more, at most half an
            ulp of it, and that rounding is not kept). ``None``: the gradient's dtype.
        min_numel: tensors with fewer entries (biases, norms) are allreduced densely.
        exchange: ``"allgather"`` (every rank receives every rank's ``k`` entries),
            ``"sparse_allreduce"`` (an alltoall to the owner of each region, which sums and
            keeps its region's largest sums, then an allgather of those; after Ok-Topk), or
            ``"auto"``: per tensor, the exchange the time model (``cost.py``) finds fastest.
            Every rank takes the same decision.
        density_aware: also consider a dense allreduce: under ``"auto"`` taken where the time
            model finds it no slower; with a named exchange, where it moves no more bytes.
        link_gbps: the link's bandwidth the time model assumes, Gbit/s. ``None``:
            ``HVD_TOPK_LINK_GBPS``, else 1.
        link_latency_us: one message's latency the time model assumes, microseconds.
            ``None``: ``HVD_TOPK_LINK_LATENCY_US``, else 50.
        region_capacity: sparse allreduce: a rank sends each owner at most
            ``ceil(region_capacity * k / P)`` entries (the largest); the rest stay owed.
        region_refresh: sparse allreduce: regions are rebalanced on the measured load every
            this many steps.
        warmup_steps: over the first ``warmup_steps`` steps the ratio decays exponentially
            from ``warmup_ratio`` to ``ratio`` (DGC's warm-up, made continuous); 0: none.
            ``None``: 100 steps, and under Adam correction below a ratio of 1%
            ``100 * sqrt(0.01 / ratio)`` (316 at 0.1%; ``warmup_steps_for``).
        warmup_ratio: the warm-up's starting ratio.
        momentum_correction: DGC's momentum correction (Lin et al. 2018, 3.2): each rank
            keeps its own velocity and Top-K sends from it. ``None``: on wherever the wrapped
            optimizer is SGD with momentum and ``ratio < 1``; ``True``: required; ``False``: off.
        momentum_masking: DGC's momentum factor masking (the velocity is zeroed where sent).
        adam_correction: each rank keeps its own Adam moments and Top-K sends from its Adam
            step (see ``docs/design.md``). ``None``: on for ``torch.optim.Adam``/``AdamW``
            and ``ratio < 1``; ``True``: required; ``False``: off.
        adam_variance_steps: local steps after which each rank's second moment is frozen
            (1-bit Adam, Tang et al. 2021); ``None``: never.
        adam_clip: each entry of a rank's Adam direction is clipped to ``[-adam_clip,
            adam_clip]`` (units of ``lr``); ``None``: off.
        adam_select: what Top-K ranks a tensor's entries by under Adam correction (the
            values sent are the owed displacements either way). ``"agreement"``: ``owed
            displacement * m / (sqrt(v) + eps)`` where positive, else 0: the displacement
            weighted by the signal-to-noise ratio of the rank's gradient there (its moments
            ``m``, ``v``; near 1 where the gradient keeps its sign, near 0 where it is noise),
            and only where the momentum still points the way the displacement owes: an entry
            whose step has faded or turned keeps its displacement owed (the later steps cancel
            it) instead of spending the budget on it. ``"signal"``: the same weight without
            the sign, ``|owed displacement| * |m| / (sqrt(v) + eps)``. ``"momentum"``:
            ``|owed displacement| * |m|`` (favours the entries with large gradients).
            ``"displacement"``: ``|owed displacement|`` alone.
        local_clip_norm: DGC's local gradient clipping (3.3): each rank's gradient clipped to
            ``local_clip_norm / sqrt(world)``; ``None``: off.
        group_bytes: gradients compressed together as one group (one selection, one payload,
            one collective), up to about this many bytes. ``None``: 32 MiB on accelerators
            and for the sparse allreduce on CPU, but at most an eighth of the step's trained
            parameters' bytes (at least 1 MiB: a group's buffer and its selection's
            temporaries scale with the group, and on a small model a 32 MiB group would weigh
            like a second residual); on CPU 0 for the allgather (a tensor per group).
    """

    ratio: float = 0.01
    value_dtype: Optional[torch.dtype] = None
    min_numel: int = 4096
    exchange: str = "auto"
    density_aware: bool = True
    link_gbps: Optional[float] = None
    link_latency_us: Optional[float] = None
    region_capacity: float = 2.0
    region_refresh: int = 10
    warmup_steps: Optional[int] = None
    warmup_ratio: float = 0.25
    momentum_correction: Optional[bool] = None
    momentum_masking: bool = True
    adam_correction: Optional[bool] = None
    adam_variance_steps: Optional[int] = 100
    adam_clip: Optional[float] = 10.0
    adam_select: str = "agreement"
    local_clip_norm: Optional[float] = None
    group_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        fix("ratio", check_ratio("ratio", self.ratio))
        if self.value_dtype is not None and not (isinstance(self.value_dtype, torch.dtype)
                                                 and self.value_dtype.is_floating_point):
            raise ValueError(f"value_dtype must be a floating torch.dtype or None, got {self.value_dtype!r}")
        fix("min_numel", _check_int("min_numel", self.min_numel, 0))
        if self.exchange not in EXCHANGE_CHOICES:
            raise ValueError("exchange must be 'auto', 'allgather' or 'sparse_allreduce', "
                             f"got {self.exchange!r}")
        fix("density_aware", bool(self.density_aware))
        fix("link_gbps", _link("link_gbps", self.link_gbps, "HVD_TOPK_LINK_GBPS", DEFAULT_LINK_GBPS,
                                     positive=True))
        fix("link_latency_us", _link("link_latency_us", self.link_latency_us, "HVD_TOPK_LINK_LATENCY_US",
                                           DEFAULT_LINK_LATENCY_US))
        if not (float(self.region_capacity) >= 1.0):
            raise ValueError("region_capacity must be >= 1 (entries a rank may send one region's owner, "
                             f"in units of k / world), got {self.region_capacity!r}")
        fix("region_capacity", float(self.region_capacity))
        fix("region_refresh", _check_int("region_refresh", self.region_refresh, 1, "(steps)"))
        if self.warmup_steps is not None:
            fix("warmup_steps", _check_int("warmup_steps", self.warmup_steps, 0, "or None (auto)"))
        fix("warmup_ratio", check_ratio("warmup_ratio", self.warmup_ratio))
        for name in ("momentum_correction", "adam_correction"):
            if getattr(self, name) not in (None, True, False):
                raise ValueError(f"{name} must be None (auto), True or False, got {getattr(self, name)!r}")
        fix("momentum_masking", bool(self.momentum_masking))
        if self.adam_variance_steps is not None:
            fix("adam_variance_steps", _check_int("adam_variance_steps", self.adam_variance_steps, 1,
                                                  "or None (never frozen)"))
        for name in ("adam_clip", "local_clip_norm"):
            value = getattr(self, name)
            if value is not None:
                if not (float(value) > 0):
                    raise ValueError(f"{name} must be > 0 or None, got {value!r}")
                fix(name, float(value))
        if self.adam_select not in ADAM_SELECT_CHOICES:
            raise ValueError(f"adam_select must be one of {ADAM_SELECT_CHOICES}, got {self.adam_select!r}")
        if self.group_bytes is not None:
            fix("group_bytes", _check_int("group_bytes", self.group_bytes, 0, "or None (auto)"))

    def warmup_length(self, adam: bool = False) -> int:
        """The warm-up's length in steps: ``warmup_steps``, or ``warmup_steps_for`` if ``None``
        (``adam``: Adam correction is on)."""
        return warmup_steps_for(self.ratio, adam) if self.warmup_steps is None else self.warmup_steps

    def ratio_at(self, step: int, adam: bool = False) -> float:
        """The ratio in force at optimizer step ``step`` (0-based): the warm-up's, then ``ratio``
        (``adam``: Adam correction is on, which may lengthen an automatic warm-up)."""
        warmup = self.warmup_length(adam)
        if step >= warmup or self.warmup_ratio <= self.ratio:
            return self.ratio
        return self.warmup_ratio * (self.ratio / self.warmup_ratio) ** (step / warmup)

    def group_bytes_for(self, device: torch.device, exchange: str = "allgather",
                        trained_bytes: Optional[int] = None) -> int:
        """``group_bytes`` resolved for gradients on ``device`` sent by ``exchange``, of a step
        that trains ``trained_bytes`` of parameters (``None``: unknown)."""
        if self.group_bytes is not None:
            return self.group_bytes
        if torch.device(device).type == "cpu" and exchange == "allgather":
            return 0  # the CPU kernel runs per tensor anyway; Horovod fuses the allgathers
        if trained_bytes is None:
            return GROUP_BYTES
        # A group's copy and its selection's temporaries scale with the group: on a small
        # model, a group of most of it would weigh like a second residual.
        return min(GROUP_BYTES, max(GROUP_BYTES_FLOOR, trained_bytes // 8))


def _link(name: str, value, env: str, default: float, positive: bool = False) -> float:
    """A link figure: ``value``, else the environment variable ``env``, else ``default``."""
    source = name
    if value is None:
        value, source = os.environ.get(env), env
        if value is None or value == "":
            return default
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be a number, got {value!r}") from None
    if not (v > 0 if positive else v >= 0) or math.isinf(v):
        raise ValueError(f"{source} must be {'> 0' if positive else '>= 0'} and finite, got {value!r}")
    return v


def check_ratio(name: str, value: float) -> float:
    """``value`` as a float in (0, 1], or a ``ValueError`` that names ``name``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise ValueError(f"{name} must be in (0, 1] (the fraction of entries sent, e.g. 0.01), got {value!r}")
    return v


def _check_int(name: str, value, lowest: int, also: str = "") -> int:
    if int(value) != value or value < lowest:
        raise ValueError(f"{name} must be an integer >= {lowest}{' ' + also if also else ''}, got {value!r}")
    return int(value)

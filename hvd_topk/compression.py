"""Top-K sparsification with error feedback, as a Horovod ``Compressor``."""

from __future__ import annotations

import abc
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from horovod.torch.compression import Compressor

from ._cpu_kernel import cpu_kernel
from . import sparse_allreduce as sar
from .exchange import EXCHANGES, cheapest_exchange, exchange_bytes, scatter_add_
from .memory import ResidualMemory
from .packing import FLAG_INEXACT, FLAG_MISMATCH, FLAG_NONFINITE, pack_header, payload_nbytes, unpack
from .selection import (AdamMoments, GroupLayout, PositionSet, exact_topk_fallback,
                        fused_update_and_select, index_dtype, num_selected, segment_views,
                        select_group, update_)

__all__ = ["TopKCompressor", "SparseCompressor", "SparseContext", "AdamSettings", "RankMismatchError"]

_ERROR_STOCK = (
    "TopKCompressor.compress() was called without a parameter name, which is what the stock "
    "hvd.DistributedOptimizer does. Its allreduce would sum the packed values *and indices* "
    "of all ranks and silently produce wrong gradients. Use hvd_topk.DistributedOptimizer "
    "(same arguments), which exchanges the sparse payload with allgather.")


class RankMismatchError(RuntimeError):
    """Ranks exchanged a tensor they do not agree on (different models, shapes, dtypes or
    compressor settings). Raised on every rank, by the same check on the same gathered data."""


def _crc(key: str) -> int:
    """A signed int32 digest (zlib.crc32, not ``hash()``: the same in every process)."""
    crc = zlib.crc32(key.encode())
    return crc - (1 << 32) if crc >= 1 << 31 else crc


@dataclass
class SparseContext:
    """What stays local between ``compress`` and ``decompress`` (never sent), for a group of
    one or more gradients exchanged as one payload.

    ``names`` / ``shapes``: the group's parameters, in buffer order; ``layout``: where each
    lives in the group's flat buffer and its ``k``; ``divisor``: what the sum over ranks is
    divided by (the world size for ``hvd.Average``); ``world``: the number of ranks whose
    payloads the gathered buffer holds (``None``: inferred from its size). ``header`` is this
    rank's header (device int32); after ``scatter``, ``headers`` holds every rank's and
    ``out`` the dense result, both still on the device.
    """

    names: Tuple[str, ...]
    shapes: Tuple[torch.Size, ...]
    dtype: torch.dtype
    layout: GroupLayout
    value_dtype: torch.dtype
    index_dtype: torch.dtype
    divisor: float = 1.0
    world: Optional[int] = None
    exchange: str = "allgather"  # or "sparse_allreduce" (then ``regions`` is its plan)
    regions: Optional[sar.RegionPlan] = field(default=None, repr=False)
    header: Optional[torch.Tensor] = field(default=None, repr=False)
    headers: Optional[torch.Tensor] = field(default=None, repr=False)
    out: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The parameter's name (a group: its first name and how many follow)."""
        if len(self.names) == 1:
            return self.names[0]
        return f"{self.names[0]}+{len(self.names) - 1}"

    @property
    def shape(self) -> torch.Size:
        return self.shapes[0] if len(self.shapes) == 1 else torch.Size([self.layout.numel])

    @property
    def k(self) -> int:
        return self.layout.k

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def header_words(self) -> int:
        """int32 words of the header: signature and flags, plus one flag word per tensor of a
        group (a single tensor's header is the two words alone)."""
        return 2 if len(self.names) == 1 else 2 + len(self.names)

    def segment_signature(self, i: int) -> int:
        return _crc(f"{tuple(self.shapes[i])}|{self.dtype}|{self.layout.ks[i]}|{self.value_dtype}"
                    f"|{self.index_dtype}")

    @property
    def signature(self) -> int:
        """A signed int32 digest of what is being exchanged (names' count, shapes, dtype, k's,
        wire dtypes); a single tensor's is its own segment signature."""
        if len(self.names) == 1:
            return self.segment_signature(0)
        return _crc("|".join(str(self.segment_signature(i)) for i in range(len(self.names))))

    def describe(self) -> str:
        if len(self.names) == 1:
            return (f"shape {tuple(self.shapes[0])}, {self.dtype}, k={self.k}, values {self.value_dtype}, "
                    f"indices {self.index_dtype}")
        return (f"a group of {len(self.names)} tensors ({', '.join(map(repr, self.names[:4]))}"
                f"{', ...' if len(self.names) > 4 else ''}), {self.dtype}, k={self.k}")

    @property
    def nbytes(self) -> int:
        """Bytes this rank sends for the group."""
        return payload_nbytes(self.k, self.value_dtype, self.index_dtype, self.header_words)

    @property
    def flags(self) -> int:
        """This rank's header flags (``FLAG_NONFINITE``, ``FLAG_INEXACT``). Reading it copies
        the header to the host: for tests and single-process use, not inside a step."""
        return int(self.header[1]) if self.header is not None else 0


@dataclass(frozen=True)
class AdamSettings:
    """The Adam hyperparameters of one group's step, passed by the optimizer to
    ``compress_group(adam=...)`` (Adam correction, see ``TopKCompressor``): those of the
    ``torch.optim.Adam``/``AdamW`` param group the group's tensors belong to, read at this step."""

    beta1: float
    beta2: float
    eps: float
    amsgrad: bool = False
    lr: object = 1.0  # a float or a 0-dim tensor: the residual owes lr * direction


class SparseCompressor(Compressor, abc.ABC):
    """The interface between ``hvd_topk.DistributedOptimizer`` and a sparse compressor.

    Per step, the optimizer:

    1. asks ``exchange_for(grad, world)`` for each gradient (``"dense"``: a dense allreduce;
       ``"allgather"`` or ``"sparse_allreduce"``) and ``group_bytes(device, exchange)`` for how many
       bytes of gradients to compress together (a group takes one exchange);
    2. calls ``compress_group(grads, names, ..., exchange=...)`` for each group once its
       gradients are ready (in the backward hooks: no host sync allowed), and allgathers the
       payload -- or, for the sparse allreduce, alltoalls its ``world`` rows, then allgathers
       ``reduce_regions(received, ctx)``;
    3. calls ``scatter(gathered, ctx)`` for each group (no host sync), then ``check(ctxs,
       extra)`` once: the step's one host sync, which raises ``RankMismatchError``, records
       non-finite gradients, and returns the groups to exchange again (``redo``);
    4. calls ``unsend()`` if the step will not be applied, then ``step_done()``.

    With Adam correction the optimizer also hands over, at a tensor's first sparse step, the
    moments its wrapped optimizer built while the tensor went dense (``adam_started`` /
    ``start_adam``), and passes ``compress_group(adam=AdamSettings(...))``.
    """

    @abc.abstractmethod
    def exchange_for(self, tensor: torch.Tensor, world: int) -> str:
        raise NotImplementedError

    def wants_sparse(self, tensor: torch.Tensor, world: int) -> bool:
        """Whether ``exchange_for`` sends this gradient sparsely."""
        return self.exchange_for(tensor, world) != "dense"

    @abc.abstractmethod
    def group_bytes(self, device: torch.device, exchange: str = "allgather") -> int:
        raise NotImplementedError

    @abc.abstractmethod
    def compress_group(self, tensors: Sequence[torch.Tensor], names: Sequence[str], *,
                       momentum: float = 0.0, nesterov: bool = False,
                       adam: Optional[AdamSettings] = None, scale: float = 1.0,
                       world: Optional[int] = None,
                       exchange: str = "allgather") -> Tuple[torch.Tensor, SparseContext]:
        raise NotImplementedError

    @abc.abstractmethod
    def reduce_regions(self, received: torch.Tensor, ctx: SparseContext) -> torch.Tensor:
        raise NotImplementedError

    @abc.abstractmethod
    def reset_regions(self) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def scatter(self, gathered: torch.Tensor, ctx: SparseContext,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        raise NotImplementedError

    @abc.abstractmethod
    def check(self, ctxs: Sequence[SparseContext], extra: Optional[torch.Tensor] = None):
        raise NotImplementedError

    @abc.abstractmethod
    def redo(self, ctx: SparseContext) -> torch.Tensor:
        raise NotImplementedError

    @abc.abstractmethod
    def unsend(self) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def step_done(self) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def pop_nonfinite(self) -> List[Tuple[str, List[int]]]:
        raise NotImplementedError

    @abc.abstractmethod
    def adam_started(self, name: str) -> bool:
        raise NotImplementedError

    @abc.abstractmethod
    def start_adam(self, name: str, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   max_exp_avg_sq: Optional[torch.Tensor] = None) -> None:
        raise NotImplementedError


class GroupCache:
    """A cache with one entry per group in use: ``get`` replaces an entry that no longer fits
    (a new ``k``), and ``prune`` (once per step) forgets the groups no step has used since the
    last prune. Its size is bounded by the groups of one step, however long training runs."""

    def __init__(self) -> None:
        self._entries: Dict[Any, Any] = {}
        self._used: set = set()

    def get(self, key, fits, build):
        """The entry for ``key`` if ``fits(entry)``, else a new one from ``build()``."""
        entry = self._entries.get(key)
        if entry is None or not fits(entry):
            entry = self._entries[key] = build()
        self._used.add(key)
        return entry

    def prune(self) -> None:
        for key in [k for k in self._entries if k not in self._used]:
            del self._entries[key]
        self._used = set()

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class _Pending:
    """One group's selection this step, kept until it is committed (``step_done``, or
    ``decompress`` outside the optimizer) or taken back (``unsend``). Until then the residual
    still holds the compensated ``c`` and the velocity is unmasked, so taking it back or
    selecting again restores nothing, and no copy of the sent values is kept."""

    v: torch.Tensor  # (n,) residual buffer, holding c until the commit
    u: Optional[torch.Tensor]  # (n,) velocity, or None
    sent: PositionSet  # the K positions selected
    bad: torch.Tensor  # (S,) bool: segments whose gradient held a NaN/Inf
    scale: object
    value_dtype: torch.dtype
    in_cap: Optional[PositionSet] = None  # sparse allreduce: those that fit an owner's row
    applied: Optional[PositionSet] = None  # sparse allreduce: those some owner kept (committed)


class TopKCompressor(SparseCompressor):
    """Top-K sparsification with error feedback (a Horovod ``Compressor``).

    For each gradient tensor ``g`` of a parameter ``name`` (tensors are compressed in groups,
    see ``group_bytes``, each with its own ``k``), every step:

    1. compensate: ``c = g + e[name]``, where ``e`` is the error-feedback residual (in place);
    2. select the ``k = max(1, ceil(ratio * numel))`` entries of largest ``|c|`` -- exactly
       the set ``torch.topk`` would pick, found with a sampled threshold (``selection.py``);
    3. send their values (optionally as fp16/bf16) and int32 indices (int64 when
       ``numel >= 2**31``); the payload is one uint8 buffer, allgathered by
       ``hvd_topk.DistributedOptimizer``;
    4. keep the rest: ``e[name] = c - sent``, so ``residual + sent == c`` exactly and no
       gradient is ever lost, only delayed (Lin et al. 2018, *Deep Gradient Compression*;
       Karimireddy et al. 2019, *Error Feedback Fixes SignSGD*). One exception: with a
       narrower ``value_dtype``, a value beyond its range is sent clamped and ``c - sent``
       rounds to ``c``'s dtype.

    ``decompress`` scatter-adds every rank's entries into a dense tensor.

    It follows Horovod's contract: ``compress(tensor, name) -> (payload, ctx)``, only
    ``payload`` travels, ``ctx`` stays local; ``decompress(payload, ctx) -> tensor``. Unlike
    Horovod's stateless compressors it needs the parameter's name (to find its residual), so
    it refuses to run inside the stock ``hvd.DistributedOptimizer``, whose allreduce would
    sum indices.

    Arguments:
        ratio: fraction of each tensor's entries to send, in (0, 1]. 0.01 sends 1%.
        value_dtype: dtype of the values on the wire (``torch.float16`` / ``torch.bfloat16``
            halve the value bytes; the rounding error goes into the residual). ``None`` keeps
            the gradient's dtype.
        min_numel: tensors with fewer elements (biases, norms) are allreduced densely by the
            optimizer: they cost little and their exact averages help accuracy.
        exchange: how the selected entries travel. ``"allgather"``: every rank receives
            every rank's ``k`` entries, ``(P-1) k`` per rank, growing with the world size.
            ``"sparse_allreduce"`` (``sparse_allreduce.py``, after Ok-Topk): an alltoall sends
            each entry to the owner of its region of the tensor, which sums them and keeps
            its region's ``ceil(k / P)`` largest sums; an allgather shares those: about
            ``(region_capacity + 1) k (P-1)/P`` entries per rank, whatever P. The sum is then
            the global selection of ``P ceil(k/P)`` entries over the summed gradient, not the
            average of every rank's own top-k; what a rank sent that no owner kept goes back
            into its residual. ``"auto"`` (default): per tensor, the exchange of fewest bytes
            under ``exchange.exchange_bytes`` (at 2 and 3 ranks the allgather, from about 4
            ranks the sparse allreduce; dense allreduce where it is cheaper still, see
            ``density_aware``). Every rank takes the same decision.
        density_aware: also consider a dense allreduce, and take it for tensors where it
            moves no more bytes than the sparse exchange (large worlds, high ratios): a
            sparse exchange never costs more bytes than dense training.
        region_capacity: sparse allreduce only: a rank sends each region's owner at most
            ``ceil(region_capacity * k / P)`` of its entries (the largest), so the alltoall has
            fixed sizes and needs nothing from the host; the rest wait in the residual.
        region_refresh: sparse allreduce only: the regions are rebalanced on the measured
            load every this many steps (from statistics every rank already received).
        warmup_steps: over the first ``warmup_steps`` optimizer steps the ratio decays
            exponentially from ``warmup_ratio`` to ``ratio`` (DGC's warm-up; its 25% -> 6.25%
            -> ... -> 0.1% schedule, made continuous). 0 disables. The default, 100 steps,
            costs little on long runs and measurably helps at 0.1% (README, Convergence);
            for runs of many epochs, DGC warms up over its first ~4 epochs.
        warmup_ratio: the starting ratio of the warm-up.
        momentum_correction: DGC's momentum correction (Lin et al. 2018, section 3.2). With SGD
            momentum, plain Top-K sparsifies the gradient and lets SGD apply momentum to the
            sparse average, which loses the momentum of everything delayed. With correction,
            each rank accumulates its *velocity* ``u = m u + g`` locally (Nesterov and weight
            decay as in ``torch.optim.SGD``), error feedback accumulates ``u`` and Top-K sends
            from that; ``hvd_topk.DistributedOptimizer`` then applies ``p -= lr * update``
            without applying momentum a second time. ``None`` (default): on wherever the
            wrapped optimizer is SGD with momentum > 0, no dampening, and ``ratio < 1``;
            ``True``: required (error otherwise); ``False``: off.
        momentum_masking: DGC's momentum factor masking: zero the local velocity where
            entries were sent, so stale momentum does not push them again.
        adam_correction: the Adam counterpart of momentum correction, for
            ``torch.optim.Adam`` / ``AdamW``. Plain Top-K hands Adam a sparse, bursty average
            (most entries 0 for many steps, then one accumulated spike), which its
            per-coordinate normalisation handles badly. With correction, each rank keeps its
            own Adam moments of its own gradient (``m = b1 m + (1 - b1) g``, ``s = b2 s +
            (1 - b2) g^2``, bias-corrected, AMSGrad's running max if asked), error feedback
            accumulates the rank's Adam *step* ``lr * m_hat / (sqrt(s_hat) + eps)`` and Top-K
            sends from that -- so entries are selected by preconditioned magnitude, the size
            of the step Adam would take, and the residual is the displacement still owed
            (a schedule's later, smaller lr does not shrink what earlier steps owe).
            ``hvd_topk.DistributedOptimizer`` then applies ``p -= update`` (AdamW's decoupled
            weight decay on every entry; Adam's coupled ``weight_decay`` and ``maximize`` as
            torch does). The second moment is
            frozen after ``adam_variance_steps`` local steps (1-bit Adam, Tang et al. 2021):
            measured on the LM benchmark, a variance that keeps moving costs more than it
            tracks (README, Convergence). ``None`` (default): on wherever the wrapped
            optimizer is Adam/AdamW and ``ratio < 1``; ``True``: required; ``False``: off
            (Top-K of the gradient, Adam on the sparse average).
        adam_variance_steps: the local steps over which each rank's second moment is
            estimated before it is frozen; ``None``: never frozen.
        adam_clip: each entry of a rank's Adam direction is clipped to ``[-adam_clip,
            adam_clip]`` (in units of Adam's step, ``lr``). Adam's own direction stays within
            about ``(1 - b1) / sqrt(1 - b2)``; a frozen variance has no such bound, and an entry
            whose gradient grows far beyond what the variance saw (a unit that wakes up late)
            would take huge steps: on the digits CNN, AdamW, Top-K 1%, the test accuracy fell
            from 97.2% to 93.3% without the clip (README, "Adam and AdamW"). ``None``: off.
        local_clip_norm: DGC's local gradient clipping (section 3.3): each rank's gradient
            is clipped to ``local_clip_norm / sqrt(world)`` before accumulation. ``None``: off.
        group_bytes: gradients compressed together as one group (one selection pipeline
            run, one payload, one allgather), up to about this many bytes: groups cut the
            per-tensor kernel launches that dominate small tensors on a GPU (Cupcake, MLSys'23,
            compresses fused buckets for the same reason). ``k`` stays per tensor (DGC's
            semantics). ``None`` (default): 32 MiB on accelerators; on CPU 0 for the
            allgather (each tensor on its own: the CPU kernel runs per tensor anyway, sends
            start sooner, and Horovod fuses the allgathers), 32 MiB for the sparse allreduce
            (Horovod does not fuse alltoalls, and each costs ``2 (P-1)`` message latencies).

    Step by step, for a group of gradients ``g_s``: ``selection.py``'s pipeline (update ->
    threshold -> candidates -> exact top-k) then the residual write below; nothing is read
    back to the host until the optimizer's one ``check`` per step.

    Example::

        import horovod.torch as hvd
        import hvd_topk

        compression = hvd_topk.TopKCompressor(ratio=0.01)
        optimizer = hvd_topk.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), compression=compression)
    """

    def __init__(self, ratio: float = 0.01, *, value_dtype: Optional[torch.dtype] = None,
                 min_numel: int = 4096, exchange: str = "auto", density_aware: bool = True,
                 region_capacity: float = 2.0, region_refresh: int = 10,
                 warmup_steps: int = 100, warmup_ratio: float = 0.25,
                 momentum_correction: Optional[bool] = None, momentum_masking: bool = True,
                 adam_correction: Optional[bool] = None, adam_variance_steps: Optional[int] = 100,
                 adam_clip: Optional[float] = 10.0,
                 local_clip_norm: Optional[float] = None, group_bytes: Optional[int] = None) -> None:
        self.ratio = _check_ratio("ratio", ratio)
        if value_dtype is not None and not (isinstance(value_dtype, torch.dtype)
                                            and value_dtype.is_floating_point):
            raise ValueError(f"value_dtype must be a floating torch.dtype or None, got {value_dtype!r}")
        self.value_dtype = value_dtype
        if int(min_numel) != min_numel or min_numel < 0:
            raise ValueError(f"min_numel must be an integer >= 0, got {min_numel!r}")
        self.min_numel = int(min_numel)
        if exchange not in ("auto",) + EXCHANGES[1:]:
            raise ValueError(f"exchange must be 'auto', 'allgather' or 'sparse_allreduce', got {exchange!r}")
        self.exchange = exchange
        self.density_aware = bool(density_aware)
        if not (float(region_capacity) >= 1.0):
            raise ValueError("region_capacity must be >= 1 (entries a rank may send one region's owner, "
                             f"in units of k / world), got {region_capacity!r}")
        self.region_capacity = float(region_capacity)
        if int(region_refresh) != region_refresh or region_refresh < 1:
            raise ValueError(f"region_refresh must be an integer >= 1 (steps), got {region_refresh!r}")
        self.region_refresh = int(region_refresh)
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_steps = int(warmup_steps)
        self.warmup_ratio = _check_ratio("warmup_ratio", warmup_ratio)
        if momentum_correction not in (None, True, False):
            raise ValueError("momentum_correction must be None (auto), True or False, "
                             f"got {momentum_correction!r}")
        self.momentum_correction = momentum_correction
        self.momentum_masking = bool(momentum_masking)
        if adam_correction not in (None, True, False):
            raise ValueError("adam_correction must be None (auto), True or False, "
                             f"got {adam_correction!r}")
        self.adam_correction = adam_correction
        if adam_variance_steps is not None and (int(adam_variance_steps) != adam_variance_steps
                                                or adam_variance_steps < 1):
            raise ValueError("adam_variance_steps must be an integer >= 1 or None (never frozen), "
                             f"got {adam_variance_steps!r}")
        self.adam_variance_steps = None if adam_variance_steps is None else int(adam_variance_steps)
        if adam_clip is not None and not (float(adam_clip) > 0):
            raise ValueError(f"adam_clip must be > 0 or None, got {adam_clip!r}")
        self.adam_clip = None if adam_clip is None else float(adam_clip)
        if local_clip_norm is not None and not (float(local_clip_norm) > 0):
            raise ValueError(f"local_clip_norm must be > 0 or None, got {local_clip_norm!r}")
        self.local_clip_norm = None if local_clip_norm is None else float(local_clip_norm)
        if group_bytes is not None and (int(group_bytes) != group_bytes or group_bytes < 0):
            raise ValueError(f"group_bytes must be an integer >= 0 or None (auto), got {group_bytes!r}")
        self._group_bytes = None if group_bytes is None else int(group_bytes)
        self.world_size = 1  # the default for compress_group(world=None); scales local clipping
        self.memory = ResidualMemory()  # error feedback: v (accumulated, not yet sent)
        self.velocity = ResidualMemory()  # momentum correction: u (local momentum)
        # Adam correction: this rank's moments of its own gradients, and its steps per name
        self.exp_avg = ResidualMemory()
        self.exp_avg_sq = ResidualMemory()
        self.max_exp_avg_sq = ResidualMemory()  # AMSGrad only
        self.adam_steps: Dict[str, int] = {}
        self.steps = 0  # optimizer steps completed; drives the warm-up
        # (name, ranks) of tensors some rank found non-finite since the optimizer last asked
        self.nonfinite: List[Tuple[str, List[int]]] = []
        self._pending: Dict[Tuple[str, ...], _Pending] = {}  # this step's selections, see unsend()
        # Per-group caches, one entry per group in use (pruned at every step_done): a new
        # ratio replaces a group's entry, it never adds one.
        self._layouts = GroupCache()  # sizes -> GroupLayout
        self._signatures = GroupCache()  # (names, device) -> (1,) int32 signature
        # Sparse allreduce: each group's region starts, (S, P + 1), keyed by (names, world)
        self.regions: Dict[Tuple[Tuple[str, ...], int], torch.Tensor] = {}
        self._region_plans = GroupCache()  # (sizes, world) -> sar.RegionPlan

    def __repr__(self) -> str:
        return (f"TopKCompressor(ratio={self.ratio}, value_dtype={self.value_dtype}, "
                f"min_numel={self.min_numel}, exchange={self.exchange!r}, "
                f"density_aware={self.density_aware}, region_capacity={self.region_capacity}, "
                f"region_refresh={self.region_refresh}, "
                f"warmup_steps={self.warmup_steps}, warmup_ratio={self.warmup_ratio}, "
                f"momentum_correction={self.momentum_correction}, "
                f"momentum_masking={self.momentum_masking}, adam_correction={self.adam_correction}, "
                f"adam_variance_steps={self.adam_variance_steps}, adam_clip={self.adam_clip}, "
                f"local_clip_norm={self.local_clip_norm}, "
                f"group_bytes={self._group_bytes})")

    # -- schedule -------------------------------------------------------------------------
    def current_ratio(self) -> float:
        """The ratio in force at this step (the warm-up's, then ``ratio``)."""
        if self.steps >= self.warmup_steps or self.warmup_ratio <= self.ratio:
            return self.ratio
        frac = self.steps / self.warmup_steps
        return self.warmup_ratio * (self.ratio / self.warmup_ratio) ** frac

    def step_done(self) -> None:
        """Called by the optimizer once per synchronized step."""
        self.steps += 1
        for names in list(self._pending):
            self._commit(names)
        for cache in (self._layouts, self._signatures, self._region_plans):
            cache.prune()

    def unsend(self) -> None:
        """Take back this step's selections: each residual becomes ``e + g`` again (what was
        about to be sent stays owed) and masked momentum returns. Called by the optimizer when
        a step will not be applied (a non-finite gradient on some rank), so nothing that was
        sent in it is lost. A velocity or residual entry that overflowed is reset to 0."""
        for pend in self._pending.values():  # not committed: v still holds e + g
            torch.nan_to_num_(pend.v, nan=0.0, posinf=0.0, neginf=0.0)
            if pend.u is not None:
                torch.nan_to_num_(pend.u, nan=0.0, posinf=0.0, neginf=0.0)
        self._pending.clear()

    def _commit(self, names: Tuple[str, ...]) -> None:
        """Step 5 for a group whose step is applied: the residual write ``v[sent] = c - sent``
        (0 when the wire carries the values exactly) and DGC's momentum factor masking
        ``u[sent] = 0`` -- where the sparse allreduce applied the entry, everywhere else."""
        pend = self._pending.pop(names, None)
        if pend is None or pend.sent.k == 0:
            return
        v, u = pend.v, pend.u
        masking = u is not None and self.momentum_masking  # no stale momentum on what was sent
        if pend.applied is not None:
            # Some slots are invalid (padding at n - 1, maybe a valid position too): add each
            # slot's change, -0.0 where invalid, so that duplicates leave the right bits
            # (c + -(wire) is c - wire exactly; u + -u is +0, as a fill).
            pos, ok = pend.applied.positions()
            c = v.index_select(0, pos)
            v.index_put_((pos,), torch.where(ok, -self._unscaled(self._wire(c, pend), pend), -0.0),
                         accumulate=True)
            if masking:
                u.index_put_((pos,), torch.where(ok, -u.index_select(0, pos), -0.0), accumulate=True)
            return
        sel, _ = pend.sent.positions()
        if pend.value_dtype == v.dtype and _is_one(pend.scale):
            v.index_fill_(0, sel, 0)
        else:
            c = v.index_select(0, sel)  # (K,)
            c = c.masked_fill(~torch.isfinite(c), 0)  # an overflow was sent as 0 (see _selected)
            # what the wire did not carry
            v.index_copy_(0, sel, c - self._unscaled(self._wire(c, pend), pend))
        if masking:
            u.index_fill_(0, sel, 0)

    # -- decisions ------------------------------------------------------------------------
    def exchange_costs(self, tensor: torch.Tensor, world: int) -> Dict[str, int]:
        """``exchange.exchange_bytes`` for this gradient at the ratio in force: the bytes per
        rank of each exchange."""
        n = tensor.numel()
        vdt = self.value_dtype or tensor.dtype
        return exchange_bytes(n, num_selected(n, self.current_ratio()), world, tensor.element_size(),
                              vdt.itemsize, index_dtype(n).itemsize, self.region_capacity)

    def exchange_for(self, tensor: torch.Tensor, world: int) -> str:
        """How the optimizer should exchange this gradient: ``"dense"``, ``"allgather"`` or
        ``"sparse_allreduce"`` (see ``exchange``). The same on every rank: it depends only on
        the tensor's size and dtype, the settings, the ratio in force and the world size."""
        if not tensor.dtype.is_floating_point or tensor.is_sparse:
            return "dense"
        n = tensor.numel()
        if n == 0 or n < self.min_numel:
            return "dense"
        allowed = EXCHANGES[1:] if self.exchange == "auto" else (self.exchange,)
        if self.density_aware:
            allowed = ("dense",) + allowed
        if len(allowed) == 1:
            return allowed[0]
        return cheapest_exchange(self.exchange_costs(tensor, world), allowed)

    def group_bytes(self, device: torch.device, exchange: str = "allgather") -> int:
        """Gradient bytes compressed together on ``device`` for ``exchange`` (``group_bytes``
        resolved)."""
        if self._group_bytes is not None:
            return self._group_bytes
        if torch.device(device).type == "cpu" and exchange == "allgather":
            return 0
        return 32 << 20

    def _layout(self, sizes: Tuple[int, ...]) -> GroupLayout:
        ks = tuple(num_selected(n, self.current_ratio()) for n in sizes)
        return self._layouts.get(sizes, lambda layout: layout.ks == ks, lambda: GroupLayout(sizes, ks))

    def _header_base(self, ctx: SparseContext, device: torch.device) -> torch.Tensor:
        """``(1,)`` int32 signature on ``device``, cached (no host-to-device copy per step)."""
        sig = ctx.signature
        return self._signatures.get((ctx.names, device), lambda entry: entry[0] == sig, lambda: (
            sig, torch.tensor([sig], dtype=torch.int32, device=device)))[1]

    # -- compress -------------------------------------------------------------------------
    def compress(self, tensor: torch.Tensor, name: Optional[str] = None, *,
                 momentum: float = 0.0, nesterov: bool = False,
                 scale: float = 1.0) -> Tuple[torch.Tensor, SparseContext]:
        """Horovod's ``Compressor.compress`` for one gradient, for use on its own: ``compress_group``
        of a group of one (see there), made exact at once when its sample was unlucky (reading
        that flag is a host sync; ``hvd_topk.DistributedOptimizer`` calls ``compress_group``,
        which never syncs, and redoes such groups after the step's one sync instead).
        ``payload`` is ``(nbytes,)`` uint8: header, values, indices -- the only thing that
        travels; ``ctx`` stays local."""
        if name is None:
            raise RuntimeError(_ERROR_STOCK)
        payload, ctx = self.compress_group([tensor], [name], momentum=momentum, nesterov=nesterov,
                                           scale=scale)
        if ctx.flags & FLAG_INEXACT:
            payload = self.redo(ctx)
        return payload, ctx

    def compress_group(self, tensors: Sequence[torch.Tensor], names: Sequence[str], *,
                       momentum: float = 0.0, nesterov: bool = False,
                       adam: Optional[AdamSettings] = None, scale: float = 1.0,
                       world: Optional[int] = None,
                       exchange: str = "allgather") -> Tuple[torch.Tensor, SparseContext]:
        """Compensate, select, pack a group of gradients as one payload; update their residuals.

        No value is read back to the host: the selection's flags (non-finite gradient, an
        inexact sample) travel in the payload's header, resolved by ``check`` after the
        exchange.

        Arguments:
            tensors: the gradients (any shapes; one floating dtype and device). Not modified.
            names: their parameters' names, the keys of their residuals.
            momentum: > 0 applies DGC's momentum correction (the optimizer passes SGD's
                momentum): ``u = m u + g``; ``v += u`` (Nesterov: ``v += g + m u``); select
                from ``v``; with ``momentum_masking`` also ``u[sent] = 0``. The sent values are
                then an *update* to apply without further momentum.
            nesterov: Nesterov momentum, as ``torch.optim.SGD(nesterov=True)``.
            adam: Adam correction (see the class docstring) with these hyperparameters: the
                rank's moments take in the gradient, ``v`` accumulates its Adam step
                ``lr * direction``, Top-K selects from ``v``; the sent values are a
                displacement to apply as ``p -= update``. Exclusive with ``momentum``.
            scale: the loss scale the gradients carry (mixed precision: ``GradScaler``'s
                scale). Residuals and velocities are kept in unscaled units (``g / scale``),
                so they stay right when the scale changes; the sent values are scaled back,
                for the ``GradScaler`` to unscale like any gradient. Use powers of two (as
                ``GradScaler`` does) and the scaling is exact. A float, or a 0-dim tensor on
                the device (the optimizer passes ``GradScaler``'s own, so that nothing is read
                back to the host).
            world: ranks exchanging (scales local clipping, and the sparse allreduce's regions);
                default ``self.world_size``.
            exchange: ``"allgather"``: the payload is this rank's entries, to allgather;
                ``"sparse_allreduce"``: ``world`` equal rows, row j for rank j, to alltoall
                (then ``reduce_regions``, an allgather, ``scatter``).

        If a gradient holds a NaN or Inf, those entries are added as 0 (residual and velocity
        stay finite) and the header flags it, so every rank learns of it after the exchange;
        the step is then not applied and the optimizer calls ``unsend()``.

        Returns:
            ``(payload, ctx)``: ``(nbytes,)`` uint8 and a ``SparseContext``.
        """
        if exchange not in EXCHANGES[1:]:
            raise ValueError(f"exchange must be 'allgather' or 'sparse_allreduce', got {exchange!r}")
        if not tensors or len(tensors) != len(names):
            raise ValueError(f"compress_group needs one name per tensor, got {len(tensors)} tensors "
                             f"and {len(names)} names")
        if any(n is None for n in names):
            raise RuntimeError(_ERROR_STOCK)
        if adam is not None and momentum > 0:
            raise ValueError("compress_group takes momentum correction or Adam correction, not both")
        dtype, device = tensors[0].dtype, tensors[0].device
        for t, n in zip(tensors, names):
            if not t.dtype.is_floating_point:
                raise TypeError(f"TopKCompressor compresses floating gradients; {n!r} is {t.dtype}")
            if t.dtype != dtype or t.device != device:
                raise ValueError(f"a group holds one dtype and device: {n!r} is {t.dtype} on {t.device}, "
                                 f"{names[0]!r} is {dtype} on {device}")
        self._commit(tuple(names))  # a selection of these names not yet committed (no step_done)
        layout = self._layout(tuple(t.numel() for t in tensors))
        vdt = self.value_dtype or dtype
        idt = index_dtype(max(layout.sizes))
        ctx = SparseContext(tuple(names), tuple(t.shape for t in tensors), dtype, layout, vdt, idt,
                            exchange=exchange)
        g = (tensors[0].detach().reshape(-1) if len(tensors) == 1
             else torch.cat([t.detach().reshape(-1) for t in tensors]))  # (n,)
        v = self.memory.group_buffer(names, layout.sizes, g)  # (n,) residual e
        u = self.velocity.group_buffer(names, layout.sizes, g) if momentum > 0 else None
        if isinstance(scale, torch.Tensor):  # GradScaler's scale, left on the device: no sync
            scale = scale.to(device=device, dtype=torch.float32)
            inv = scale.reciprocal()
        else:
            inv = 1.0 / scale
        if self.local_clip_norm is not None:
            g = self._clip(g, layout, inv, world)
        selected = None
        if self.local_clip_norm is None and not nesterov and adam is None:
            selected = self._kernel_update(v, u, g, layout, momentum, inv)
        if selected is None:
            moments = self._adam_moments(names, layout, g, adam) if adam is not None else None
            bad = update_(v, g, layout, alpha=inv, u=u, momentum=momentum, nesterov=nesterov,
                          adam=moments)  # 1.
            sel, inexact = select_group(v, layout)  # 2.-4.
            vals, bad = self._selected(v, sel, bad, layout)
        else:
            sel, vals, bad = selected
            inexact = None  # the kernel's selection is always exact
        pend = _Pending(v, u, PositionSet(sel, layout.numel), bad, scale, vdt)
        self._pending[ctx.names] = pend
        ctx.world = world
        if exchange == "sparse_allreduce":
            ctx.world = world if world is not None else self.world_size
            ctx.regions = self._region_plan(layout, ctx.world)
        return self._send(ctx, pend, sel, vals, inexact), ctx

    def _adam_moments(self, names: Sequence[str], layout: GroupLayout, like: torch.Tensor,
                      adam: AdamSettings) -> AdamMoments:
        """This step's Adam correction state for a group: its moment buffers and bias
        corrections, after counting the step for each name (a name's first step is 1)."""
        steps = [self.adam_steps.get(n, 0) + 1 for n in names]
        for n, t in zip(names, steps):
            self.adam_steps[n] = t
        frozen_at = self.adam_variance_steps
        # The variance stops at frozen_at steps, and so does its bias correction.
        var_steps = [t if frozen_at is None else min(t, frozen_at) for t in steps]
        moving = [frozen_at is None or t <= frozen_at for t in steps]  # variance still estimated
        if len(set(steps)) == 1:
            bias1 = 1 - adam.beta1 ** steps[0]
            bias2 = 1 - adam.beta2 ** var_steps[0]
            update_variance = moving[0]
        else:  # tensors trained for different numbers of steps (frozen, then unfrozen)
            def per_entry(values, dtype):  # (S,) host numbers -> (n,) on the device
                return torch.repeat_interleave(torch.tensor(values, dtype=dtype),
                                               torch.tensor(layout.sizes)).to(like.device)
            bias1 = per_entry([1 - adam.beta1 ** t for t in steps], like.dtype)
            bias2 = per_entry([1 - adam.beta2 ** t for t in var_steps], like.dtype)
            update_variance = all(moving) or (any(moving) and per_entry(moving, torch.bool))
        sq = self.exp_avg_sq.group_buffer(names, layout.sizes, like)
        moments = AdamMoments(
            exp_avg=self.exp_avg.group_buffer(names, layout.sizes, like), exp_avg_sq=sq,
            max_exp_avg_sq=(self.max_exp_avg_sq.group_buffer(names, layout.sizes, like)
                            if adam.amsgrad else None),
            beta1=adam.beta1, beta2=adam.beta2, eps=adam.eps, bias1=bias1, bias2=bias2,
            update_variance=update_variance, lr=adam.lr, clip=self.adam_clip)
        return moments

    def _send(self, ctx: SparseContext, pend: _Pending, sel: torch.Tensor, vals: torch.Tensor,
              inexact: Optional[torch.Tensor]) -> torch.Tensor:
        """The payload of the selected ``vals`` at ``sel``: the header with the flags, the values as they
        travel, the indices (the sparse allreduce: this rank's entries bucketed into one
        alltoall row per owner; its header travels later, in ``reduce_regions``' row). The
        residual write (step 5) waits for ``_commit``."""
        sent = self._wire(vals, pend)
        ctx.header = self._header(ctx, pend.bad, inexact)
        if ctx.exchange == "sparse_allreduce":
            ctx.header = ctx.header.to(sent.device)
            payload, in_cap = sar.to_regions(sel, sent, ctx.regions, self._bounds(ctx),
                                             self._header_base(ctx, sent.device), ctx.index_dtype)
            pend.in_cap = PositionSet(sel, ctx.numel, valid=in_cap)
            return payload
        indices = self._local_indices(sel, ctx.layout, ctx.index_dtype)
        return pack_header(ctx.header, sent, indices)  # not kept: redo() builds it again

    # -- the sparse allreduce (sparse_allreduce.py) ----------------------------------------
    def _region_plan(self, layout: GroupLayout, world: int) -> sar.RegionPlan:
        return self._region_plans.get((layout.sizes, world), lambda plan: plan.layout.ks == layout.ks,
                                      lambda: sar.RegionPlan(layout, world, self.region_capacity))

    def _bounds(self, ctx: SparseContext) -> torch.Tensor:
        """The group's region starts ``(S, P + 1)`` on its device (equal regions at first)."""
        key = (ctx.names, ctx.regions.world)
        bounds = self.regions.get(key)
        device = ctx.header.device
        if bounds is None:
            bounds = self.regions[key] = sar.uniform_bounds(ctx.layout, ctx.regions.world, device)
        elif bounds.device != device:
            bounds = self.regions[key] = bounds.to(device)
        return bounds

    def reset_regions(self) -> None:
        """Forget the sparse allreduce's regions: every group starts again from equal ones.
        Called on every rank after a membership change (the regions must agree everywhere)."""
        self.regions = {}

    def reduce_regions(self, received: torch.Tensor, ctx: SparseContext) -> torch.Tensor:
        """The sparse allreduce's middle step, at this rank as the owner of its regions: sum
        what every rank sent there (``received``, the alltoall's output), keep each tensor's
        ``ceil(k / P)`` largest sums, divided by ``ctx.divisor``. Returns this rank's row for
        the allgather, with its own header (its flags) -- no host sync."""
        return sar.reduce_region(received, ctx.regions, ctx.signature, ctx.header, ctx.divisor,
                                 ctx.dtype, ctx.value_dtype, ctx.index_dtype, _to_wire)

    def _finish_regions(self, gathered: torch.Tensor, ctx: SparseContext, out: torch.Tensor) -> None:
        """Scatter the owners' entries into ``out``; what this rank sent that no owner kept
        goes back into its residual (and masked momentum returns there); refresh the regions."""
        try:
            headers, kept, stats = sar.finish(gathered, ctx.regions, ctx.header_words, ctx.value_dtype,
                                              ctx.index_dtype, out)
        except ValueError as e:
            raise RankMismatchError(f"parameter {ctx.name!r} ({ctx.describe()} on this rank): {e}: ranks "
                                    "disagree on this tensor's size, ratio or wire dtypes. "
                                    + _SAME_MODEL) from None
        ctx.headers = headers
        pend = self._pending[ctx.names]
        pos, fits = pend.in_cap.positions()
        pend.applied = PositionSet(pos, ctx.numel, valid=sar.was_kept(pos, kept) & fits)  # committed
        if (self.steps + 1) % self.region_refresh == 0:
            key = (ctx.names, ctx.regions.world)
            self.regions[key] = sar.refresh_bounds(self._bounds(ctx), stats, ctx.layout)

    def _kernel_update(self, v, u, g, layout, momentum, inv):
        """Steps 1-4 through the fused CPU kernel, one call per segment: ``(sel, vals, bad)``,
        or ``None`` where it does not apply (then the torch steps run)."""
        if v.device.type != "cpu" or v.dtype != torch.float32 or cpu_kernel() is None:
            return None
        inv = float(inv)  # a CPU tensor scale: read on the host, no device involved
        parts = []
        for s, (vs, gs) in enumerate(zip(segment_views(v, layout), segment_views(g, layout))):
            if layout.ks[s] == 0:
                continue
            us = None if u is None else u[layout.offsets[s]:layout.offsets[s + 1]]
            out = fused_update_and_select(vs, us, gs, layout.ks[s], momentum, inv, zero_v=False,
                                          zero_u=False)
            if out is None:
                if parts:  # the kernel's conditions are the same for every segment of a group
                    raise AssertionError("CPU kernel declined a segment after accepting another")
                return None
            parts.append((s, out))
        if not parts:
            return None
        if len(parts) == 1 and layout.segments == 1:
            sel, vals, _, finite = parts[0][1]
            return sel, vals, torch.tensor([not finite])
        sel = torch.cat([idx + layout.offsets[s] for s, (idx, _, _, _) in parts])
        vals = torch.cat([p[1] for _, p in parts])
        flags = [False] * layout.segments
        for s, (_, _, _, finite) in parts:
            flags[s] = not finite
        return sel, vals, torch.tensor(flags)

    @staticmethod
    def _selected(v, sel, bad, layout: GroupLayout) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(vals, bad)``: the selected values; an entry of ``v`` that overflowed (e + g beyond
        the dtype) has the largest magnitude, so it is among them: send 0 there and flag it."""
        vals = v.index_select(0, sel)  # (K,)
        overflow = ~torch.isfinite(vals)
        vals.masked_fill_(overflow, 0)
        if layout.segments == 1:
            bad = bad | overflow.any()
        else:
            per_seg = torch.zeros(layout.segments, dtype=torch.int32, device=v.device)
            per_seg.index_add_(0, layout.slot_tables(v.device)["slot_seg"], overflow.to(torch.int32))
            bad = bad | (per_seg > 0)
        return vals, bad

    @staticmethod
    def _wire(vals: torch.Tensor, pend: _Pending) -> torch.Tensor:
        """``(K,)`` the values as they travel: loss-scaled back, in the wire dtype."""
        scale = pend.scale
        if not _is_one(scale) and vals.element_size() < 4:
            vals = vals.float() * scale  # a half-precision product could overflow
        elif not _is_one(scale):
            vals = vals * scale
        return _to_wire(vals, pend.value_dtype)

    @staticmethod
    def _unscaled(sent: torch.Tensor, pend: _Pending) -> torch.Tensor:
        """The wire's values back in the residual's dtype and unscaled units."""
        back = sent.to(pend.v.dtype)
        return back if _is_one(pend.scale) else back * (1.0 / pend.scale)

    @staticmethod
    def _local_indices(sel: torch.Tensor, layout: GroupLayout, idt: torch.dtype) -> torch.Tensor:
        """``(K,)`` each slot's index within its own tensor, in the wire's index dtype."""
        if layout.segments == 1:
            return sel.to(idt)
        return (sel - layout.slot_tables(sel.device)["slot_start"]).to(idt)

    def _header(self, ctx: SparseContext, bad: torch.Tensor, inexact: Optional[torch.Tensor]) -> torch.Tensor:
        """``(header_words,)`` int32 on the device: signature, flags (, per-tensor flags).
        ``inexact`` None: the CPU kernel's exact selection, whose flags are host values."""
        if inexact is None:  # CPU: one small tensor, no arithmetic on tensors
            seg = [FLAG_NONFINITE if b else 0 for b in bad.tolist()]
            words = [ctx.signature, FLAG_NONFINITE if any(seg) else 0]
            return torch.tensor(words + (seg if ctx.header_words > 2 else []), dtype=torch.int32)
        flags = (bad.any().to(torch.int32) * FLAG_NONFINITE
                 + inexact.to(torch.int32) * FLAG_INEXACT).reshape(1)  # bad, inexact: v's device
        parts = [self._header_base(ctx, inexact.device), flags]
        if ctx.header_words > 2:
            parts.append(bad.to(torch.int32) * FLAG_NONFINITE)
        return torch.cat(parts)

    def _clip(self, g: torch.Tensor, layout: GroupLayout, inv, world: Optional[int]) -> torch.Tensor:
        """DGC 3.3: each tensor's gradient clipped to ``local_clip_norm / sqrt(P)`` before
        accumulation (its norm taken of the unscaled, finite gradient)."""
        p = max(1, world if world is not None else self.world_size)
        limit = self.local_clip_norm / math.sqrt(p)
        clean = torch.nan_to_num(g.float(), nan=0.0, posinf=0.0, neginf=0.0)
        if layout.segments == 1:
            sq = clean.square().sum().reshape(1)
        else:
            sq = torch.segment_reduce(clean.square(), "sum", lengths=layout.tensors(g.device)["lengths"],
                                      unsafe=True)  # see selection.finite_probe
        factor = (limit / (sq.sqrt() * inv + 1e-6)).clamp(max=1.0).to(g.dtype)  # (S,)
        if layout.segments > 1:
            factor = torch.repeat_interleave(factor, layout.tensors(g.device)["lengths"],
                                             output_size=layout.numel)
        return g * factor

    # -- decompress -----------------------------------------------------------------------
    def scatter(self, gathered: torch.Tensor, ctx: SparseContext,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scatter-add every rank's (values, indices), each divided by ``ctx.divisor``, into a
        dense ``(n,)`` buffer (``ctx.out``): ``out`` when given (zeroed first; the optimizer
        passes a lone gradient's own storage), else a new one; every rank's header goes to
        ``ctx.headers``. Reads nothing back to the host; ``check`` then resolves the headers. For the sparse
        allreduce, ``gathered`` is the allgather of ``reduce_regions``' rows: the owners'
        entries, each position once and already divided; this rank's entries that no owner
        kept return to its residual."""
        if ctx.exchange == "sparse_allreduce":
            if out is None:
                out = torch.empty(ctx.numel, dtype=ctx.dtype, device=gathered.device)
            self._finish_regions(gathered, ctx, out)
            ctx.out = out
            return out
        try:
            headers, values, indices = unpack(gathered, ctx.k, ctx.value_dtype, ctx.index_dtype,
                                              ctx.world, ctx.header_words)  # (P, H), (P, K), (P, K)
        except ValueError as e:
            raise RankMismatchError(f"parameter {ctx.name!r} ({ctx.describe()} on this rank): {e}. "
                                    + _SAME_MODEL) from None
        ctx.headers = headers
        if out is None:
            out = torch.zeros(ctx.numel, dtype=ctx.dtype, device=gathered.device)
        else:
            out.zero_()
        if ctx.k:
            t = ctx.layout.slot_tables(gathered.device)
            # A rank that disagrees on the layout is caught by check(); clamp its indices
            # into each slot's own tensor so that the scatter never writes out of bounds.
            pos = indices.long().clamp_(min=0)  # (P, K), one buffer for the chain (in place)
            pos = torch.minimum(pos, t["slot_max"], out=pos).add_(t["slot_start"])
            vals = values.reshape(-1).to(ctx.dtype)  # (P * K,)
            if ctx.divisor != 1:
                # Divide the P * K gathered values, not the n-element result: every rank
                # still computes the same bits (same bytes, same order).
                vals = vals.div_(ctx.divisor)
            scatter_add_(out, pos.reshape(-1), vals)
        ctx.out = out
        return out

    def check(self, ctxs: Sequence[SparseContext], extra: Optional[torch.Tensor] = None):
        """Resolve the flags of every exchanged group at once -- the step's one host sync.

        Raises ``RankMismatchError`` (on every rank alike) if some rank sent a payload for
        another shape, dtype, ``k`` or wire dtype. A tensor some rank flagged non-finite
        becomes all NaN (so that a ``GradScaler`` skips the step, as it would in dense
        training) and ``(name, ranks)`` goes to ``self.nonfinite``.

        Arguments:
            ctxs: contexts after ``scatter``.
            extra: an optional 1-D int/bool device tensor read back in the same copy (the
                optimizer's probe of its dense tensors).

        Returns:
            ``(redo, extra)``: the contexts some rank selected inexactly (exchange them again
            with ``redo(ctx)``), and ``extra`` as a list.
        """
        parts = [c.headers.reshape(-1) for c in ctxs]
        if extra is not None:
            parts.append(extra.reshape(-1).to(torch.int32))
        if not parts:
            return [], []
        device = parts[0].device
        flat = torch.cat([p.to(device) for p in parts]).tolist()  # the one host sync
        redo, at = [], 0
        for ctx in ctxs:
            h = ctx.header_words
            rows = [flat[at + r * h: at + (r + 1) * h] for r in range(ctx.headers.shape[0])]
            at += h * len(rows)
            others = [r for r, row in enumerate(rows) if row[0] != ctx.signature]
            owners = [r for r, row in enumerate(rows) if row[1] & FLAG_MISMATCH]
            if owners and not others:
                raise RankMismatchError(
                    f"parameter {ctx.name!r}: the owners of regions {owners} received, in the sparse "
                    f"allreduce, rows for something other than this rank's {ctx.describe()}. "
                    + _SAME_MODEL)
            if others:
                raise RankMismatchError(
                    f"parameter {ctx.name!r}: rank(s) {others} sent a payload for something other than "
                    f"this rank's {ctx.describe()}. " + _SAME_MODEL)
            if any(row[1] & FLAG_INEXACT for row in rows):
                redo.append(ctx)
                continue
            if any(row[1] & FLAG_NONFINITE for row in rows):
                self._mark_nonfinite(ctx, rows)
        return redo, flat[at:]

    def _mark_nonfinite(self, ctx: SparseContext, rows: List[List[int]]) -> None:
        views = segment_views(ctx.out, ctx.layout)
        for s, name in enumerate(ctx.names):
            if len(ctx.names) == 1:
                ranks = [r for r, row in enumerate(rows) if row[1] & FLAG_NONFINITE]
            else:
                ranks = [r for r, row in enumerate(rows) if row[2 + s] & FLAG_NONFINITE]
            if ranks:
                self.nonfinite.append((name, ranks))
                views[s].fill_(float("nan"))

    def redo(self, ctx: SparseContext) -> torch.Tensor:
        """This rank's payload for a group ``check`` returned, built again from the residual
        (not yet committed: it still holds ``c``): the same bytes if this rank's own selection
        was exact, else its exact selection (``torch.topk`` per tensor) replaces the sampled
        one. Every rank then exchanges the group again."""
        own_inexact = bool(ctx.flags & FLAG_INEXACT)
        pend = self._pending[ctx.names]  # not committed: its residual still holds c
        sel = exact_topk_fallback(pend.v, ctx.layout) if own_inexact else pend.sent.positions()[0]
        vals, bad = self._selected(pend.v, sel, pend.bad, ctx.layout)
        fresh = self._pending[ctx.names] = _Pending(pend.v, pend.u, PositionSet(sel, ctx.numel), bad,
                                                    pend.scale, pend.value_dtype)
        return self._send(ctx, fresh, sel, vals, torch.zeros((), dtype=torch.bool, device=sel.device))

    def decompress(self, payload: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Horovod's ``Compressor.decompress``: ``scatter`` then ``check`` (one host sync) for
        one payload or the allgather of ``ctx.world`` of them. A ``ctx`` of ``None`` marks a
        tensor the optimizer exchanged densely; it is returned unchanged. A single tensor
        comes back in its shape, a group as its flat ``(n,)`` buffer."""
        if ctx is None:
            return payload
        if isinstance(ctx, ComplexContext):
            return torch.view_as_complex(payload)
        if ctx.exchange != "allgather":
            raise ValueError("decompress() takes an allgathered payload; a sparse allreduce goes "
                             "through reduce_regions() and scatter() (hvd_topk.DistributedOptimizer)")
        out = self.scatter(payload, ctx)
        self.check([ctx])  # an inexact selection is still a valid sparse update: kept here
        self._commit(ctx.names)
        return out.view(ctx.shapes[0]) if len(ctx.names) == 1 else out

    def adam_started(self, name: str) -> bool:
        """Whether ``name`` has Adam-correction moments on this rank (a step taken, or loaded)."""
        return name in self.adam_steps

    def start_adam(self, name: str, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   max_exp_avg_sq: Optional[torch.Tensor] = None) -> None:
        """Start ``name``'s Adam correction from moments the wrapped optimizer built while
        the tensor was exchanged densely (the same on every rank: moments of the average
        gradient), at its step count, instead of from zero. The optimizer calls it at a
        tensor's first sparse step (at large worlds the warm-up's first steps are dense)."""
        self.exp_avg.set(name, exp_avg)
        self.exp_avg_sq.set(name, exp_avg_sq)
        if max_exp_avg_sq is not None:
            self.max_exp_avg_sq.set(name, max_exp_avg_sq)
        self.adam_steps[name] = int(step)

    def pop_nonfinite(self) -> List[Tuple[str, List[int]]]:
        """The (name, ranks) recorded by ``check`` since the last call, and forget them."""
        found, self.nonfinite = self.nonfinite, []
        return found

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Residuals and the step counter (tensors and ints only: loads with weights_only=True)."""
        return {"steps": self.steps, "residuals": self.memory.state_dict(),
                "velocities": self.velocity.state_dict(), "exp_avg": self.exp_avg.state_dict(),
                "exp_avg_sq": self.exp_avg_sq.state_dict(),
                "max_exp_avg_sq": self.max_exp_avg_sq.state_dict(),
                "adam_steps": dict(self.adam_steps),
                "regions": {"\n".join(names) + f"@{world}": b.cpu()
                            for (names, world), b in self.regions.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self._pending.clear()
        self.memory.load_state_dict(state["residuals"])
        self.velocity.load_state_dict(state.get("velocities", {}))
        self.exp_avg.load_state_dict(state.get("exp_avg", {}))
        self.exp_avg_sq.load_state_dict(state.get("exp_avg_sq", {}))
        self.max_exp_avg_sq.load_state_dict(state.get("max_exp_avg_sq", {}))
        self.adam_steps = {str(n): int(t) for n, t in state.get("adam_steps", {}).items()}
        self.regions = {}
        for key, bounds in state.get("regions", {}).items():  # "name\nname...@world"
            names, _, world = key.rpartition("@")
            self.regions[(tuple(names.split("\n")), int(world))] = bounds.clone()


class ComplexContext:
    """Context of a complex gradient the optimizer allreduced as its real view (Horovod has
    no complex dtypes); ``decompress`` turns the result back into a complex tensor."""


_SAME_MODEL = ("Every rank must hold the same model (parameter names, shapes and dtypes) and "
               "the same TopKCompressor settings.")


def _is_one(scale) -> bool:
    """Whether a loss scale is the plain 1.0 (a device tensor scale never is: it is not read)."""
    return not isinstance(scale, torch.Tensor) and scale == 1.0


def _to_wire(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast values to the wire dtype, clamped to the largest magnitude that the wire dtype
    holds *and* that comes back finite in the values' dtype (fp16 <-> bf16 round past each
    other's maximum). The excess stays in the residual instead of becoming an Inf."""
    if values.dtype == dtype:
        return values
    limit = _wire_limit(values.dtype, dtype)
    wide = values if values.dtype == torch.float64 else values.float()  # holds `limit` exactly
    return wide.clamp(-limit, limit).to(dtype)


def _limit(src: torch.dtype, dst: torch.dtype) -> float:
    bound = min(torch.finfo(src).max, torch.finfo(dst).max)
    w = torch.tensor(bound, dtype=torch.float64).to(dst)
    if float(w) > bound:  # rounded up past what src holds: one step down in dst
        w = torch.nextafter(w, torch.zeros_like(w))
    return float(w)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Computed once at import: a step then reads no tensor value on the host.
_WIRE_LIMITS = {(s, d): _limit(s, d) for s in _FLOATS for d in _FLOATS}


def _wire_limit(src: torch.dtype, dst: torch.dtype) -> float:
    return _WIRE_LIMITS.get((src, dst)) or _limit(src, dst)


def _check_ratio(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < v <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1] (the fraction of entries sent, e.g. 0.01), got {value!r}")
    return v

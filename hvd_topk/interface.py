"""The engine-independent interfaces: what a compressor asks of an exchange (``Exchange``) and
the local context of one exchanged group (``SparseContext``, never sent), used by both engines.
What ``hvd_topk.DistributedOptimizer`` asks of a sparse compressor, a Horovod ``Compressor``,
is ``sparse_compressor.SparseCompressor``."""

from __future__ import annotations

import abc
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple

import torch

from .exchange_core import header_words, traffic
from .packing import payload_nbytes
from .selection import GroupLayout, PositionSet
from .update import AdamSettings

if TYPE_CHECKING:  # the sparse allreduce's plan type, for annotations only
    from .sparse_allreduce import RegionPlan

__all__ = ["RankMismatchError", "AdamSettings", "SparseContext", "DenseFormContext", "Exchange",
           "crc", "header_words", "SAME_MODEL"]

SAME_MODEL = ("Every rank must hold the same model (parameter names, shapes and dtypes) and "
              "the same TopKCompressor settings.")


class RankMismatchError(RuntimeError):
    """Ranks exchanged a tensor they do not agree on (different models, shapes, dtypes or
    compressor settings). Raised on every rank, by the same check on the same gathered data."""


def crc(key: str) -> int:
    """A signed int32 digest (zlib.crc32, not ``hash()``: the same in every process)."""
    value = zlib.crc32(key.encode())
    return value - (1 << 32) if value >= 1 << 31 else value


@dataclass
class SparseContext:
    """What stays local between ``compress`` and ``decompress`` (never sent), for a group of
    one or more gradients exchanged as one payload.

    ``names`` / ``shapes``: the group's parameters, in buffer order; ``layout``: where each
    lives in the group's flat buffer and its ``k``; ``divisor``: what the sum over ranks is
    divided by (the world size for ``hvd.Average``); ``world``: the ranks whose payloads the
    gathered buffer holds (``None``: inferred from its size); ``regions``: the sparse
    allreduce's plan. What the step adds, through the context's own methods: ``header``
    (``sending``: this rank's, device int32), then ``headers`` (every rank's) and ``out`` (the
    dense result) once received (``received``), and where a single tensor's result can be
    non-zero (``scattered_at``).
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
    regions: Optional[RegionPlan] = field(default=None, repr=False)
    header: Optional[torch.Tensor] = field(default=None, repr=False)
    headers: Optional[torch.Tensor] = field(default=None, repr=False)
    out: Optional[torch.Tensor] = field(default=None, repr=False)
    corrected: bool = False  # the result is a corrected update (momentum or Adam correction)
    touched: Optional[torch.Tensor] = field(default=None, repr=False)

    def sending(self, header: torch.Tensor) -> None:
        """This rank's header for the payload being sent (a redo sends a new one)."""
        self.header = header

    def received(self, headers: torch.Tensor, out: torch.Tensor) -> None:
        """Every rank's header, and the dense result the gathered payloads were scattered into."""
        self.headers, self.out = headers, out

    def scattered_at(self, positions: Optional[torch.Tensor]) -> None:
        """The positions (int64, duplicates possible) outside which the dense result of a
        single tensor is zero, where the exchange keeps them (``None``: not kept): what a
        corrected update's sparse apply reads (``CorrectionSet.scattered``)."""
        self.touched = positions

    @property
    def name(self) -> str:
        """The parameter's name (a group: its first name and how many follow)."""
        return self.names[0] if len(self.names) == 1 else f"{self.names[0]}+{len(self.names) - 1}"

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
        return header_words(len(self.names))

    def segment_signature(self, i: int) -> int:
        return crc(f"{tuple(self.shapes[i])}|{self.dtype}|{self.layout.ks[i]}|{self.value_dtype}"
                   f"|{self.index_dtype}")

    @property
    def signature(self) -> int:
        """A signed int32 digest of what is being exchanged (names' count, shapes, dtype, k's,
        wire dtypes); a single tensor's is its own segment signature."""
        if len(self.names) == 1:
            return self.segment_signature(0)
        return crc("|".join(str(self.segment_signature(i)) for i in range(len(self.names))))

    def describe(self) -> str:
        if len(self.names) == 1:
            return (f"shape {tuple(self.shapes[0])}, {self.dtype}, k={self.k}, values {self.value_dtype}, "
                    f"indices {self.index_dtype}")
        return (f"a group of {len(self.names)} tensors ({', '.join(map(repr, self.names[:4]))}"
                f"{', ...' if len(self.names) > 4 else ''}), {self.dtype}, k={self.k}")

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's allgather payload for the group."""
        return payload_nbytes(self.k, self.value_dtype, self.index_dtype, self.header_words)

    def traffic(self) -> Tuple[int, int, int]:
        """``(sent, received, link)``: the bytes this rank sends and receives for the group's
        exchange over ``world`` ranks, and those its link carries to other ranks (what
        ``comm_stats`` counts) -- the exchange's own byte model (``exchange_core.traffic``)."""
        capacity = self.regions.capacity if self.regions is not None else 2.0
        return traffic(self.exchange, self.layout.ks, self.world or 1, self.value_dtype.itemsize,
                       self.index_dtype.itemsize, capacity)

    @property
    def flags(self) -> int:
        """This rank's header flags (``FLAG_NONFINITE``, ``FLAG_INEXACT``). Reading it copies
        the header to the host: for tests and single-process use, not inside a step."""
        return int(self.header[1]) if self.header is not None else 0


class DenseFormContext:
    """Context of a gradient the optimizer allreduced in a form Horovod can reduce, Horovod
    reducing contiguous tensors of its real dtypes only: a complex gradient as its real view
    (the mean of the (re, im) view is the mean), a bfloat16 one as a float32 copy, a
    non-contiguous one (a ``channels_last`` conv weight's) as a contiguous copy.
    ``form`` makes that form, ``restore`` gives the average back in the gradient's dtype
    (rounded once)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    @staticmethod
    def needed(grad: torch.Tensor) -> bool:
        """Whether Horovod cannot reduce ``grad`` as it is."""
        return grad.is_complex() or grad.dtype == torch.bfloat16 or not grad.is_contiguous()

    @staticmethod
    def form(grad: torch.Tensor) -> torch.Tensor:
        if grad.is_complex():
            return torch.view_as_real(grad.contiguous())  # a view where it is contiguous
        wide = torch.float32 if grad.dtype == torch.bfloat16 else grad.dtype
        return grad.to(wide, memory_format=torch.contiguous_format, copy=True)

    def restore(self, reduced: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(reduced) if self.dtype.is_complex else reduced.to(self.dtype)


class Exchange(abc.ABC):
    """How one group's selected entries travel and come back as a dense sum: one object per
    kind of exchange, owning its wire format, its byte model and its own state."""

    #: the name ``exchange=`` and ``SparseContext.exchange`` use
    name: str = ""

    @abc.abstractmethod
    def payload(self, ctx: SparseContext, sel: torch.Tensor, sent: torch.Tensor,
                signature: torch.Tensor) -> Tuple[torch.Tensor, Optional[PositionSet]]:
        """This rank's payload for ``sent`` (``(K,)`` values as they travel) at ``sel``
        (``(K,)`` group positions), with ``ctx.header`` (and ``signature``, ``(1,)`` int32, on
        the device); and the positions that travel, when not all of them do (else None)."""
        raise NotImplementedError

    @staticmethod
    @abc.abstractmethod
    def time(numel: int, ks: Sequence[int], world: int, value_bytes: int, index_bytes: int,
             capacity: float, model) -> float:
        """Seconds this exchange adds to a step for a group of ``numel`` entries sending ``ks``
        entries per tensor over ``world`` ranks, under ``model`` (``cost.CostModel``: the
        link, and the device's compute per entry); what ``exchange="auto"`` compares."""
        raise NotImplementedError

    @abc.abstractmethod
    def receive(self, gathered: torch.Tensor, ctx: SparseContext, out: torch.Tensor,
                step: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scatter-add what ``gathered`` holds, divided by ``ctx.divisor``, into ``out``
        (zeroed here); ``(headers, kept)``: every rank's header ``(P, header_words)`` and the
        ascending group positions that were applied (None: every sent position)."""
        raise NotImplementedError

    @abc.abstractmethod
    def state_dict(self) -> Dict[str, Any]:
        """The exchange's own state (tensors and builtins only), as top-level keys of its
        compressor's ``state_dict()``."""
        raise NotImplementedError

    @abc.abstractmethod
    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore its keys of ``state`` (its compressor's whole state dict)."""
        raise NotImplementedError

    def prune(self) -> None:
        """Forget the per-group caches no step used since the last call (once per step)."""
        return None  # an exchange without per-group caches

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget the state that must agree on every rank (after a membership change)."""
        raise NotImplementedError

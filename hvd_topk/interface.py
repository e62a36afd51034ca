"""The interfaces between the layers: what ``hvd_topk.DistributedOptimizer`` asks of a sparse
compressor (``SparseCompressor``), what a compressor asks of an exchange (``Exchange``), and
the local context of one exchanged group (``SparseContext``, never sent)."""

from __future__ import annotations

import abc
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
from horovod.torch.compression import Compressor

from .exchange_core import header_words, traffic
from .packing import payload_nbytes
from .selection import GroupLayout, PositionSet
from .update import AdamSettings

if TYPE_CHECKING:  # the sparse allreduce's plan type, for annotations only
    from .sparse_allreduce import RegionPlan

__all__ = ["RankMismatchError", "AdamSettings", "SparseContext", "ComplexContext", "Exchange",
           "SparseCompressor", "crc", "header_words", "SAME_MODEL"]

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
    dense result) once received (``received``).
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

    def sending(self, header: torch.Tensor) -> None:
        """This rank's header for the payload being sent (a redo sends a new one)."""
        self.header = header

    def received(self, headers: torch.Tensor, out: torch.Tensor) -> None:
        """Every rank's header, and the dense result the gathered payloads were scattered into."""
        self.headers, self.out = headers, out

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


class ComplexContext:
    """Context of a complex gradient the optimizer allreduced as its real view (Horovod has
    no complex dtypes); ``decompress`` turns the result back into a complex tensor."""


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
        """``"dense"``, ``"allgather"`` or ``"sparse_allreduce"`` for this gradient over
        ``world`` ranks: the same on every rank (from sizes, dtypes, settings and the step)."""
        raise NotImplementedError

    def wants_sparse(self, tensor: torch.Tensor, world: int) -> bool:
        """Whether ``exchange_for`` sends this gradient sparsely."""
        return self.exchange_for(tensor, world) != "dense"

    @abc.abstractmethod
    def group_bytes(self, device: torch.device, exchange: str = "allgather") -> int:
        """Gradient bytes to compress together as one group on ``device`` for ``exchange``."""
        raise NotImplementedError

    @abc.abstractmethod
    def compress_group(self, tensors: Sequence[torch.Tensor], names: Sequence[str], *,
                       momentum: float = 0.0, nesterov: bool = False,
                       adam: Optional[AdamSettings] = None, scale: float = 1.0,
                       world: Optional[int] = None, exchange: str = "allgather",
                       divisor: float = 1.0) -> Tuple[torch.Tensor, SparseContext]:
        """Compensate, select and pack a group of gradients as one payload; update their
        residuals when the step is committed. No value is read back to the host: the
        flags (a non-finite gradient, an inexact sample) travel in the payload's header, and
        ``check`` resolves them after the exchange.

        Arguments:
            tensors: the gradients (any shapes; one floating dtype and device). Not modified.
            names: their parameters' names, the keys of their residuals.
            momentum: > 0 applies DGC's momentum correction (SGD's momentum): ``u = m u + g``;
                the residual accumulates ``u`` (Nesterov: ``g + m u``); the sent values are an
                update to apply without further momentum.
            nesterov: Nesterov momentum, as ``torch.optim.SGD(nesterov=True)``.
            adam: Adam correction with these hyperparameters: the residual accumulates the
                rank's local Adam step; the sent values are a displacement (``p -= update``).
                Exclusive with ``momentum``.
            scale: the loss scale the gradients carry (``GradScaler``'s, a float or a 0-dim
                device tensor, never read on the host). Residuals are kept unscaled; the sent
                values are scaled back.
            world: ranks exchanging (local clipping, the sparse allreduce's rows); default
                ``self.world_size``.
            exchange: ``"allgather"`` (the payload is this rank's entries) or
                ``"sparse_allreduce"`` (``world`` equal rows, row j for rank j, to alltoall;
                then ``reduce_regions``, an allgather, ``scatter``).
            divisor: what the sum over ranks is divided by (the world size for an average).

        Returns:
            ``(payload, ctx)``: ``(nbytes,)`` uint8 and a ``SparseContext``.
        """
        raise NotImplementedError

    @abc.abstractmethod
    def reduce_regions(self, received: torch.Tensor, ctx: SparseContext) -> torch.Tensor:
        """The sparse allreduce's owner step: this rank's allgather row from the alltoall's output."""
        raise NotImplementedError

    @abc.abstractmethod
    def resync(self, steps: int, world: int) -> None:
        """After a membership change (Horovod Elastic): take the step count every rank agreed
        on (it sets the warm-up's ratio, hence ``k``) and the new world size, and forget the
        exchanges' state that must agree on every rank (the sparse allreduce's regions)."""
        raise NotImplementedError

    @abc.abstractmethod
    def scatter(self, gathered: torch.Tensor, ctx: SparseContext,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every rank's entries, divided by ``ctx.divisor``, summed into a dense ``(n,)``
        buffer (``ctx.out``): ``out`` when given (the optimizer passes a lone gradient's own
        storage), else a new one; every rank's header goes to ``ctx.headers``, for ``check``.
        No host sync. For the sparse allreduce, this rank's entries that no owner kept stay
        owed: only the applied ones are committed."""
        raise NotImplementedError

    @abc.abstractmethod
    def check(self, ctxs: Sequence[SparseContext], extra: Optional[torch.Tensor] = None):
        """Resolve the headers of every exchanged group at once -- the step's one host sync
        (``headers.resolve``).

        Raises ``RankMismatchError`` (on every rank alike) if some rank sent a payload for
        another shape, dtype, ``k`` or wire dtype. A tensor some rank flagged non-finite
        becomes all NaN (so that a ``GradScaler`` skips the step, as in dense training) and
        ``(name, ranks)`` goes to ``self.nonfinite``.

        Arguments:
            ctxs: contexts after ``scatter``.
            extra: an optional 1-D int/bool device tensor read back in the same copy.

        Returns:
            ``(redo, extra)``: the contexts some rank selected inexactly (exchange them again
            with ``redo(ctx)``), and ``extra`` as a list.
        """
        raise NotImplementedError

    @abc.abstractmethod
    def redo(self, ctx: SparseContext) -> torch.Tensor:
        """This rank's payload for a group ``check`` returned, built again from the residual
        (not yet committed: it still holds ``c``): the same bytes if this rank's own selection
        was exact, else its exact selection (``torch.topk`` per tensor). Every rank then
        exchanges the group again."""
        raise NotImplementedError

    @abc.abstractmethod
    def unsend(self) -> None:
        """Take back this step's selections: each residual becomes ``e + g`` again (what was
        about to be sent stays owed) and masked momentum returns. Called by the optimizer when
        a step will not be applied (a non-finite gradient on some rank), so nothing that was
        sent in it is lost. A velocity or residual entry that overflowed is reset to 0."""
        raise NotImplementedError

    @abc.abstractmethod
    def step_done(self) -> None:
        """The step is applied: commit its selections, advance the schedule."""
        raise NotImplementedError

    @abc.abstractmethod
    def pop_nonfinite(self) -> List[Tuple[str, List[int]]]:
        """``(name, ranks)`` of tensors found non-finite since the last call."""
        raise NotImplementedError

    @abc.abstractmethod
    def adam_started(self, name: str) -> bool:
        """Whether ``name`` has Adam-correction moments on this rank."""
        raise NotImplementedError

    @abc.abstractmethod
    def start_adam(self, name: str, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   max_exp_avg_sq: Optional[torch.Tensor] = None) -> None:
        """Start ``name``'s Adam correction from the wrapped optimizer's moments."""
        raise NotImplementedError

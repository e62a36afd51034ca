"""What ``hvd_topk.DistributedOptimizer`` asks of a sparse compressor: ``SparseCompressor``,
a Horovod ``Compressor`` (the Horovod engine's only interface that needs Horovod; the
engine-independent ones are in ``interface.py``)."""

from __future__ import annotations

import abc
from typing import List, Optional, Sequence, Tuple

import torch
from horovod.torch.compression import Compressor

from .interface import AdamSettings, SparseContext

__all__ = ["SparseCompressor"]


class SparseCompressor(Compressor, abc.ABC):
    """The interface between ``hvd_topk.DistributedOptimizer`` and a sparse compressor.

    Per step, the optimizer:

    1. asks ``exchange_for(grad, world, trained_bytes)`` for each gradient (``"dense"``: a
       dense allreduce; ``"allgather"`` or ``"sparse_allreduce"``) and ``group_bytes(device,
       exchange, trained_bytes)`` for how many bytes of gradients to compress together (a
       group takes one exchange);
    2. calls ``compress_group(grads, names, ..., exchange=...)`` for each group once its
       gradients are ready (in the backward hooks: no host sync allowed), and allgathers the
       payload -- or, for the sparse allreduce, alltoalls its ``world`` rows, then allgathers
       ``reduce_regions(received, ctx)``;
    3. calls ``scatter(gathered, ctx)`` for each group (no host sync), then ``check(ctxs,
       extra)`` once: the step's one host sync, which raises ``RankMismatchError``, records
       non-finite gradients, and returns the groups to exchange again (``redo``);
    4. calls ``unsend()`` if the step will not be applied, then ``step_done()``.

    With Adam correction the optimizer says so once (``schedule_for_adam``) and hands over, at
    a tensor's first sparse step, the
    moments its wrapped optimizer built while the tensor went dense (``adam_started`` /
    ``start_adam``), and passes ``compress_group(adam=AdamSettings(...))``.
    """

    @abc.abstractmethod
    def exchange_for(self, tensor: torch.Tensor, world: int, trained_bytes: Optional[int] = None) -> str:
        """``"dense"``, ``"allgather"`` or ``"sparse_allreduce"`` for this gradient over
        ``world`` ranks in a step that trains ``trained_bytes`` of parameters (``None``:
        unknown): the same on every rank (from sizes, dtypes, settings and the step)."""
        raise NotImplementedError

    def wants_sparse(self, tensor: torch.Tensor, world: int, trained_bytes: Optional[int] = None) -> bool:
        """Whether ``exchange_for`` sends this gradient sparsely."""
        return self.exchange_for(tensor, world, trained_bytes) != "dense"

    @abc.abstractmethod
    def group_bytes(self, device: torch.device, exchange: str = "allgather",
                    trained_bytes: Optional[int] = None) -> int:
        """Gradient bytes to compress together as one group on ``device`` for ``exchange``, in
        a step that trains ``trained_bytes`` of parameters (``None``: unknown)."""
        raise NotImplementedError

    @abc.abstractmethod
    def compress_group(self, tensors: Sequence[torch.Tensor], names: Sequence[str], *,
                       momentum: float = 0.0, nesterov: bool = False,
                       adam: Optional[AdamSettings] = None, scale: float = 1.0,
                       world: Optional[int] = None, exchange: str = "allgather",
                       divisor: float = 1.0, consumed: bool = False) -> Tuple[torch.Tensor, SparseContext]:
        """Compensate, select and pack a group of gradients as one payload; update their
        residuals when the step is committed. No value is read back to the host: the
        flags (a non-finite gradient, an inexact sample) travel in the payload's header, and
        ``check`` resolves them after the exchange.

        Arguments:
            tensors: the gradients (any shapes; one floating dtype and device). Not modified,
                unless ``consumed``.
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
            consumed: the exchange's result overwrites the tensors: without Adam correction
                step 1 may clean them in place (NaN/Inf to 0, the loss scale's inverse) instead
                of in a copy of each, which would weigh like the group. (Adam correction's
                direction still goes to a copy: a gradient read between backward and the
                exchange keeps its values.)

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

    def schedule_for_adam(self) -> None:
        """Adam correction is on: called by the optimizer as it builds its corrections (a
        schedule that depends on the optimizer may change; by default nothing does)."""

    @abc.abstractmethod
    def adam_started(self, name: str) -> bool:
        """Whether ``name`` has Adam-correction moments on this rank."""
        raise NotImplementedError

    @abc.abstractmethod
    def start_adam(self, name: str, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   max_exp_avg_sq: Optional[torch.Tensor] = None) -> None:
        """Start ``name``'s Adam correction from the wrapped optimizer's moments."""
        raise NotImplementedError

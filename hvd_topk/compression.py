"""``TopKCompressor``: Top-K sparsification with error feedback, as a Horovod ``Compressor``.

It wires the layers together and holds no algorithm of its own: the settings
(``settings.py``), the per-rank state (``state.py``), the selection pipeline
(``selection.py``), the values as they travel (``wire.py``), the headers (``headers.py``) and
one object per exchange (``exchange.AllgatherExchange``,
``sparse_allreduce.SparseAllreduceExchange``), behind the interfaces of ``interface.py``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from . import sparse_allreduce as sar
from .cost import choose_exchange, gradient_times
from .exchange import EXCHANGES, AllgatherExchange, gradient_costs
from .headers import Signatures, build_header, mark_nonfinite, resolve
from .interface import AdamSettings, DenseFormContext, Exchange, RankMismatchError, SparseContext
from .layout import GroupLayout, index_dtype, num_selected
from .packing import FLAG_INEXACT
from .positions import PositionSet
from .selection import exact_topk_fallback, select, selected_values
from .settings import TopKSettings
from .sparse_compressor import SparseCompressor
from .state import CompressorState, GroupCache, Pending, StepSelections
from .update import clip_local
from .wire import scaled_wire

__all__ = ["TopKCompressor", "SparseCompressor", "SparseContext", "AdamSettings", "RankMismatchError",
           "DenseFormContext"]

_ERROR_STOCK = (
    "TopKCompressor.compress() was called without a parameter name, which is what the stock "
    "hvd.DistributedOptimizer does. Its allreduce would sum the packed values *and indices* "
    "of all ranks and silently produce wrong gradients. Use hvd_topk.DistributedOptimizer "
    "(same arguments), which exchanges the sparse payload with allgather.")


class TopKCompressor(SparseCompressor):
    """Top-K sparsification with error feedback (a Horovod ``Compressor``).

    For each gradient ``g`` of a parameter, every step: compensate ``c = g + e`` (``e``, the
    error-feedback residual), send the ``k = max(1, ceil(ratio * numel))`` entries of largest
    ``|c|`` -- exactly the set ``torch.topk`` picks -- as values and indices, and keep the
    rest, ``e = c - sent``: no gradient is lost, only delayed (Lin et al. 2018, *Deep Gradient
    Compression*; Karimireddy et al. 2019, *Error Feedback*). Tensors are compressed in groups
    (``group_bytes``), each tensor with its own ``k``.

    Horovod's contract: ``compress(tensor, name) -> (payload, ctx)``, only ``payload``
    travels; ``decompress(payload, ctx) -> tensor``. It needs the parameter's name (its
    residual's key), so it refuses to run inside the stock ``hvd.DistributedOptimizer``, whose
    allreduce would sum indices: use ``hvd_topk.DistributedOptimizer``.

    Arguments: ``ratio`` and the keywords of ``TopKSettings``, which documents each (read-only
    attributes here). The design and the measurements: ``docs/design.md``, ``docs/convergence.md``.

    Example::

        compression = hvd_topk.TopKCompressor(ratio=0.01)
        optimizer = hvd_topk.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), compression=compression)
    """

    def __init__(self, ratio: float = 0.01, **settings: Any) -> None:
        try:
            self.settings = TopKSettings(ratio, **settings)
        except TypeError as e:  # an unknown keyword: name the class the user called
            raise TypeError(str(e).replace("TopKSettings.__init__()", "TopKCompressor()")) from None
        self.state = CompressorState()
        self._adam = False  # Adam correction is on: see schedule_for_adam
        self.world_size = 1  # the default for compress_group(world=None); scales local clipping
        self.nonfinite: List[Tuple[str, List[int]]] = []  # (name, ranks) found, see pop_nonfinite
        self.exchanges: Dict[str, Exchange] = {
            "allgather": AllgatherExchange(),
            "sparse_allreduce": sar.SparseAllreduceExchange(self.settings.region_capacity,
                                                            self.settings.region_refresh)}
        self.selections = StepSelections(self.settings.momentum_masking)  # this step's, see unsend()
        # One entry per group in use, pruned at every step_done: a new k replaces an entry.
        self._layouts = GroupCache()  # sizes -> GroupLayout
        self._signatures = Signatures()

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self.settings, f)!r}" for f in TopKSettings.__dataclass_fields__)
        return f"TopKCompressor({fields})"

    steps = property(lambda self: self.state.steps, doc="Optimizer steps completed (they drive the warm-up).")

    # -- the schedule -----------------------------------------------------------------------
    def current_ratio(self) -> float:
        """The ratio in force at this step (the warm-up's, then ``ratio``)."""
        return self.settings.ratio_at(self.state.steps, self._adam)

    def schedule_for_adam(self) -> None:
        """Adam correction is on: an automatic warm-up takes Adam's length (``warmup_steps_for``)."""
        self._adam = True

    def step_done(self) -> None:
        """The step is applied (the optimizer calls it once per synchronized step): commit its
        selections, advance the schedule, prune the per-group caches."""
        self.state.steps += 1
        self.selections.commit_all()
        self._layouts.prune()
        self._signatures.prune()
        for exchange in self.exchanges.values():
            exchange.prune()

    def resync(self, steps: int, world: int) -> None:
        """After a membership change (``SparseCompressor.resync``)."""
        self.state.steps, self.world_size = int(steps), int(world)
        for exchange in self.exchanges.values():
            exchange.reset()

    def unsend(self) -> None:
        """Take back this step's selections (``SparseCompressor.unsend``)."""
        self.selections.take_back()

    # -- decisions --------------------------------------------------------------------------
    def exchange_costs(self, tensor: torch.Tensor, world: int) -> Dict[str, int]:
        """Bytes per rank of each exchange for this gradient (``exchange.gradient_costs``)."""
        return gradient_costs(self.settings, tensor, world, self.current_ratio())

    def exchange_times(self, tensor: torch.Tensor, world: int) -> Dict[str, float]:
        """Seconds each exchange adds to a step for this gradient (``cost.gradient_times``)."""
        return gradient_times(self.settings, tensor, world, self.current_ratio())

    def exchange_for(self, tensor: torch.Tensor, world: int, trained_bytes: Optional[int] = None) -> str:
        """This gradient's exchange, the same on every rank (``cost.choose_exchange``)."""
        return choose_exchange(self.settings, tensor, world, self.current_ratio(), trained_bytes)

    def group_bytes(self, device, exchange: str = "allgather", trained_bytes: Optional[int] = None) -> int:
        """Gradient bytes compressed together (``TopKSettings.group_bytes_for``)."""
        return self.settings.group_bytes_for(device, exchange, trained_bytes)

    def _layout(self, sizes: Tuple[int, ...]) -> GroupLayout:
        ks = tuple(num_selected(n, self.current_ratio()) for n in sizes)
        return self._layouts.get(sizes, lambda layout: layout.ks == ks, lambda: GroupLayout(sizes, ks))

    # -- compress ---------------------------------------------------------------------------
    def compress(self, tensor: torch.Tensor, name: Optional[str] = None, *,
                 momentum: float = 0.0, nesterov: bool = False,
                 scale: float = 1.0) -> Tuple[torch.Tensor, SparseContext]:
        """Horovod's ``Compressor.compress`` for one gradient, for use on its own:
        ``compress_group`` of a group of one, made exact at once when its sample was unlucky
        (reading that flag is a host sync; ``hvd_topk.DistributedOptimizer`` calls
        ``compress_group``, which never syncs, and redoes such groups after the step's one
        sync). ``payload`` is ``(nbytes,)`` uint8: header, values, indices."""
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
                       world: Optional[int] = None, exchange: str = "allgather",
                       divisor: float = 1.0, consumed: bool = False) -> Tuple[torch.Tensor, SparseContext]:
        """Steps 1-4 of the selection pipeline on a group, and its payload; the residual write
        (step 5) waits for the commit. See ``SparseCompressor.compress_group``."""
        _check_group(tensors, names, exchange, adam, momentum)
        names = tuple(names)
        self.selections.commit(names)  # a selection of these names not yet committed (no step_done)
        s, state = self.settings, self.state
        layout = self._layout(tuple(t.numel() for t in tensors))
        ranks = world if world is not None else self.world_size
        # The sparse allreduce's rows need the world and its plan (the allgather infers the world).
        regions = self.exchanges[exchange].plan(layout, ranks) if exchange == "sparse_allreduce" else None
        ctx = _group_context(names, tensors, layout, s.value_dtype, divisor, exchange, regions, ranks, world,
                             corrected=momentum > 0 or adam is not None)
        g = (tensors[0].detach().reshape(-1) if len(tensors) == 1
             else torch.cat([t.detach().reshape(-1) for t in tensors]))  # (n,)
        residual = state.residuals.group_buffer(names, layout.sizes, g)  # (n,)
        velocity = state.velocities.group_buffer(names, layout.sizes, g) if momentum > 0 else None
        if isinstance(scale, torch.Tensor):  # GradScaler's scale, left on the device: no sync
            scale = scale.to(device=g.device, dtype=torch.float32)
        inv = scale.reciprocal() if isinstance(scale, torch.Tensor) else 1.0 / scale
        if s.local_clip_norm is not None:  # DGC 3.3, to local_clip_norm / sqrt(P)
            g = clip_local(g, layout, inv, s.local_clip_norm / math.sqrt(max(1, ranks)))
        moments = (state.adam_moments(names, layout, g, adam, s.adam_variance_steps, s.adam_clip,
                                      s.adam_select) if adam is not None else None)
        chosen = select(residual, g, layout, alpha=inv, velocity=velocity, momentum=momentum,
                        nesterov=nesterov, adam=moments, fused=s.local_clip_norm is None,
                        owned=consumed and adam is None or len(tensors) > 1 or s.local_clip_norm is not None)
        sent = PositionSet(chosen.positions, layout.numel)
        pend = self.selections[names] = Pending(residual, velocity, sent, chosen.bad, scale, ctx.value_dtype,
                                                ranked=moments)
        return self._send(ctx, pend, chosen.positions, chosen.values, chosen.inexact), ctx

    def _send(self, ctx: SparseContext, pend: Pending, positions: torch.Tensor, values: torch.Tensor,
              inexact: Optional[torch.Tensor]) -> torch.Tensor:
        """The payload of ``values`` at ``positions`` (``pend.sent``): ``ctx.header`` built with
        the flags, the values as they travel, in the exchange's wire format."""
        sent = scaled_wire(values, pend.scale, pend.value_dtype)
        signature = self._signatures.get(ctx, sent.device)
        ctx.sending(build_header(ctx, signature, pend.bad, inexact).to(sent.device))
        payload, travels = self.exchanges[ctx.exchange].payload(ctx, positions, sent, signature)
        pend.sent_as(travels)
        return payload

    def reduce_regions(self, received: torch.Tensor, ctx: SparseContext) -> torch.Tensor:
        """The sparse allreduce's owner step (``SparseAllreduceExchange.reduce``), no sync."""
        return self.exchanges["sparse_allreduce"].reduce(received, ctx)

    # -- decompress -------------------------------------------------------------------------
    def scatter(self, gathered: torch.Tensor, ctx: SparseContext,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The dense sum of what ``gathered`` holds (``SparseCompressor.scatter``)."""
        out = torch.empty(ctx.numel, dtype=ctx.dtype, device=gathered.device) if out is None else out
        headers, kept = self.exchanges[ctx.exchange].receive(gathered, ctx, out, self.state.steps)
        if kept is not None:
            pend = self.selections[ctx.names]
            pos, fits = pend.travels.positions()
            pend.kept(PositionSet(pos, ctx.numel, valid=sar.was_kept(pos, kept) & fits))
        ctx.received(headers, out)
        return out

    def check(self, ctxs: Sequence[SparseContext], extra: Optional[torch.Tensor] = None):
        """The step's one host sync (``headers.resolve``); see ``SparseCompressor.check``. A
        tensor some rank flagged non-finite becomes all NaN (a ``GradScaler`` then skips the
        step, as in dense training) and ``(name, ranks)`` goes to ``self.nonfinite``."""
        redo, nonfinite, rest = resolve(ctxs, extra)
        for ctx, rows in nonfinite:
            self.nonfinite.extend(mark_nonfinite(ctx, rows))
        return redo, rest

    def redo(self, ctx: SparseContext) -> torch.Tensor:
        """A payload to exchange again (``SparseCompressor.redo``)."""
        pend = self.selections[ctx.names]
        positions = (exact_topk_fallback(pend.score(), ctx.layout) if ctx.flags & FLAG_INEXACT
                     else pend.sent.positions()[0])
        values, bad = selected_values(pend.residual, positions, pend.bad, ctx.layout)
        fresh = self.selections[ctx.names] = Pending(pend.residual, pend.velocity, PositionSet(
            positions, ctx.numel), bad, pend.scale, pend.value_dtype, ranked=pend.ranked)
        exact = torch.zeros((), dtype=torch.bool, device=positions.device)
        return self._send(ctx, fresh, positions, values, exact)

    def decompress(self, payload: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Horovod's ``Compressor.decompress``: ``scatter`` then ``check`` (one host sync) for
        one payload or the allgather of ``ctx.world`` of them. A ``ctx`` of ``None`` marks a
        tensor the optimizer exchanged densely; it is returned unchanged. A single tensor
        comes back in its shape, a group as its flat ``(n,)`` buffer."""
        if ctx is None:
            return payload
        if isinstance(ctx, DenseFormContext):
            return ctx.restore(payload)  # a dense gradient reduced in a form Horovod takes
        if ctx.exchange != "allgather":
            raise ValueError("decompress() takes an allgathered payload; a sparse allreduce goes "
                             "through reduce_regions() and scatter() (hvd_topk.DistributedOptimizer)")
        out = self.scatter(payload, ctx)
        self.check([ctx])  # an inexact selection is still a valid sparse update: kept here
        self.selections.commit(ctx.names)
        return out.view(ctx.shapes[0]) if len(ctx.names) == 1 else out

    def pop_nonfinite(self) -> List[Tuple[str, List[int]]]:
        """The (name, ranks) recorded by ``check`` since the last call, and forget them."""
        found, self.nonfinite = self.nonfinite, []
        return found

    # -- Adam correction's hand-over and the state -------------------------------------------
    def adam_started(self, name: str) -> bool:
        """Whether ``name`` has Adam-correction moments on this rank (a step taken, or loaded)."""
        return name in self.state.adam_steps

    def start_adam(self, name: str, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   max_exp_avg_sq: Optional[torch.Tensor] = None) -> None:
        """Start ``name``'s Adam correction from moments the wrapped optimizer built while the
        tensor was exchanged densely (the same on every rank), at its step count, instead of
        from zero: the optimizer calls it at a tensor's first sparse step."""
        self.state.start_adam(name, exp_avg, exp_avg_sq, step, max_exp_avg_sq)

    def state_dict(self) -> Dict[str, Any]:
        """The per-rank state and each exchange's (tensors and builtins only: loads with
        ``torch.load(weights_only=True)``)."""
        state = self.state.state_dict()
        for exchange in self.exchanges.values():
            state.update(exchange.state_dict())
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict()``'s state; this step's selections are forgotten."""
        self.selections.clear()
        self.state.load_state_dict(state)
        for exchange in self.exchanges.values():
            exchange.load_state_dict(state)


def _group_context(names: Tuple[str, ...], tensors: Sequence[torch.Tensor], layout: GroupLayout,
                   value_dtype: Optional[torch.dtype], divisor: float, exchange: str, regions,
                   ranks: int, world: Optional[int], *, corrected: bool) -> SparseContext:
    """The ``SparseContext`` of a group being compressed: the sparse allreduce's rows need
    the world (``ranks``) and its plan (``regions``), the allgather infers the world unless
    given; ``corrected``: momentum or Adam correction, so its result is a corrected update."""
    dtype = tensors[0].dtype
    return SparseContext(names, tuple(t.shape for t in tensors), dtype, layout, value_dtype or dtype,
                         index_dtype(max(layout.sizes)), divisor=divisor, exchange=exchange,
                         world=ranks if regions is not None else world, regions=regions, corrected=corrected)


def _check_group(tensors: Sequence[torch.Tensor], names: Sequence[str], exchange: str,
                 adam: Optional[AdamSettings], momentum: float) -> None:
    """The arguments of ``compress_group``, or the error that says what is wrong."""
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


def _setting(name: str) -> property:
    return property(lambda self: getattr(self.settings, name),
                    doc=f"``TopKSettings.{name}`` (read-only).")


# Every setting reads as an attribute (``compressor.ratio``); ``group_bytes`` is the method;
# ``warmup_steps`` reads as the warm-up's length in force (``TopKSettings.warmup_length``).
_WARMUP = property(lambda self: self.settings.warmup_length(self._adam),
                   doc="The warm-up's length in steps (``TopKSettings.warmup_length``, read-only).")
for _name in TopKSettings.__dataclass_fields__:
    if _name != "group_bytes":
        setattr(TopKCompressor, _name, _WARMUP if _name == "warmup_steps" else _setting(_name))
del _name
# The constructor's signature, for help() and editors: ``ratio`` and the settings' keywords.
TopKCompressor.__init__.__signature__ = inspect.Signature(
    [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    + [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD if p.name == "ratio"
                 else inspect.Parameter.KEYWORD_ONLY)
       for p in inspect.signature(TopKSettings).parameters.values()])

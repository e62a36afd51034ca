"""Top-K sparsification with error feedback, as a Horovod ``Compressor``."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from horovod.torch.compression import Compressor

from .exchange import scatter_add_
from .memory import ResidualMemory
from .packing import FLAG_NONFINITE, HEADER_BYTES, pack, payload_nbytes, unpack
from .selection import (_finite_or_zeroed, compensate_and_select, compensate_finite_and_select,
                        fused_update_and_select,
                        index_dtype, momentum_compensate_finite_and_select, num_selected,
                        select_topk)

__all__ = ["TopKCompressor", "SparseContext", "sparse_is_cheaper", "RankMismatchError"]

_ERROR_STOCK = (
    "TopKCompressor.compress() was called without a parameter name, which is what the stock "
    "hvd.DistributedOptimizer does. Its allreduce would sum the packed values *and indices* "
    "of all ranks and silently produce wrong gradients. Use hvd_topk.DistributedOptimizer "
    "(same arguments), which exchanges the sparse payload with allgather.")


class RankMismatchError(RuntimeError):
    """Ranks exchanged a tensor they do not agree on (different models, shapes, dtypes or
    compressor settings). Raised on every rank, by the same check on the same gathered data."""


@dataclass
class SparseContext:
    """What stays local between ``compress`` and ``decompress`` (never sent).

    ``out`` is an optional flat buffer to scatter into (the optimizer passes the gradient's
    own storage, so decompression allocates nothing); ``divisor`` is what the sum over ranks
    is divided by (the world size for ``hvd.Average``); ``world`` is the number of ranks
    whose payloads the gathered buffer holds (``None``: inferred from its size); ``flags`` are
    this rank's header flags (``FLAG_NONFINITE``).
    """

    name: str
    shape: torch.Size
    dtype: torch.dtype
    k: int
    value_dtype: torch.dtype
    index_dtype: torch.dtype
    out: Optional[torch.Tensor] = None
    divisor: float = 1.0
    world: Optional[int] = None
    flags: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def signature(self) -> int:
        """A signed int32 digest of what is being exchanged (shape, dtype, k, wire dtypes).

        zlib.crc32, not ``hash()``: it must be the same in every process.
        """
        key = f"{tuple(self.shape)}|{self.dtype}|{self.k}|{self.value_dtype}|{self.index_dtype}"
        crc = zlib.crc32(key.encode())
        return crc - (1 << 32) if crc >= 1 << 31 else crc

    def describe(self) -> str:
        return (f"shape {tuple(self.shape)}, {self.dtype}, k={self.k}, values {self.value_dtype}, "
                f"indices {self.index_dtype}")

    @property
    def nbytes(self) -> int:
        """Bytes this rank sends for the tensor."""
        return payload_nbytes(self.k, self.value_dtype, self.index_dtype)


def sparse_is_cheaper(numel: int, k: int, world: int, grad_bytes: int, payload_bytes: int) -> bool:
    """Whether an allgather of the Top-K payload moves fewer bytes than a dense allreduce.

    Per rank, a ring allgather sends ``(P-1) * k * b_payload`` bytes (b_payload = value +
    index bytes) and a ring allreduce sends ``2 (P-1)/P * n * b_value``. The sparse exchange
    wins iff ``P * k * b_payload < 2 * n * b_value``. With one rank nothing is sent either
    way; we then compare as for two ranks so that a single-rank run compresses the same way.
    """
    p = max(world, 2)
    return p * k * payload_bytes < 2 * numel * grad_bytes


class TopKCompressor(Compressor):
    """Top-K sparsification with error feedback (a Horovod ``Compressor``).

    For each gradient tensor ``g`` of a parameter ``name``, every step:

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
        density_aware: when the sparse allgather would move at least as many bytes as a
            dense ring allreduce (large worlds, high ratios; see ``sparse_is_cheaper``),
            the optimizer allreduces that tensor densely. Every rank takes the same decision.
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
        local_clip_norm: DGC's local gradient clipping (section 3.3): each rank's gradient
            is clipped to ``local_clip_norm / sqrt(world)`` before accumulation. ``None``: off.

    Example::

        import horovod.torch as hvd
        import hvd_topk

        compression = hvd_topk.TopKCompressor(ratio=0.01)
        optimizer = hvd_topk.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(), compression=compression)
    """

    #: Tells ``hvd_topk.DistributedOptimizer`` to exchange this compressor's payload by allgather.
    is_sparse = True

    def __init__(self, ratio: float = 0.01, *, value_dtype: Optional[torch.dtype] = None,
                 min_numel: int = 4096, density_aware: bool = True,
                 warmup_steps: int = 100, warmup_ratio: float = 0.25,
                 momentum_correction: Optional[bool] = None, momentum_masking: bool = True,
                 local_clip_norm: Optional[float] = None) -> None:
        self.ratio = _check_ratio("ratio", ratio)
        if value_dtype is not None and not (isinstance(value_dtype, torch.dtype)
                                            and value_dtype.is_floating_point):
            raise ValueError(f"value_dtype must be a floating torch.dtype or None, got {value_dtype!r}")
        self.value_dtype = value_dtype
        if int(min_numel) != min_numel or min_numel < 0:
            raise ValueError(f"min_numel must be an integer >= 0, got {min_numel!r}")
        self.min_numel = int(min_numel)
        self.density_aware = bool(density_aware)
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_steps = int(warmup_steps)
        self.warmup_ratio = _check_ratio("warmup_ratio", warmup_ratio)
        if momentum_correction not in (None, True, False):
            raise ValueError("momentum_correction must be None (auto), True or False, "
                             f"got {momentum_correction!r}")
        self.momentum_correction = momentum_correction
        self.momentum_masking = bool(momentum_masking)
        if local_clip_norm is not None and not (float(local_clip_norm) > 0):
            raise ValueError(f"local_clip_norm must be > 0 or None, got {local_clip_norm!r}")
        self.local_clip_norm = None if local_clip_norm is None else float(local_clip_norm)
        self.world_size = 1  # set by the optimizer; scales local clipping
        self.memory = ResidualMemory()  # error feedback: v (accumulated, not yet sent)
        self.velocity = ResidualMemory()  # momentum correction: u (local momentum)
        self.steps = 0  # optimizer steps completed; drives the warm-up
        # (name, ranks) of tensors some rank found non-finite since the optimizer last asked
        self.nonfinite: List[Tuple[str, List[int]]] = []
        self._pending: Dict[str, Tuple] = {}  # this step's selections, see unsend()

    def __repr__(self) -> str:
        return (f"TopKCompressor(ratio={self.ratio}, value_dtype={self.value_dtype}, "
                f"min_numel={self.min_numel}, density_aware={self.density_aware}, "
                f"warmup_steps={self.warmup_steps}, warmup_ratio={self.warmup_ratio}, "
                f"momentum_correction={self.momentum_correction}, "
                f"momentum_masking={self.momentum_masking}, local_clip_norm={self.local_clip_norm})")

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
        self._pending.clear()

    def unsend(self) -> None:
        """Take back this step's selections: each residual becomes ``e + g`` again (what was
        about to be sent stays owed) and masked momentum returns. Called by the optimizer when
        a step will not be applied (a non-finite gradient on some rank), so nothing that was
        sent in it is lost."""
        for buf, idx, vals, u, u_sent in self._pending.values():
            buf.index_copy_(0, idx, vals)
            if u_sent is not None:
                u.index_copy_(0, idx, u_sent)
        self._pending.clear()

    # -- decisions ------------------------------------------------------------------------
    def wants_sparse(self, tensor: torch.Tensor, world: int) -> bool:
        """Whether the optimizer should exchange this gradient sparsely (same on every rank:
        it depends only on the tensor's size and dtype, the ratio and the world size)."""
        if not tensor.dtype.is_floating_point or tensor.is_sparse:
            return False
        n = tensor.numel()
        if n == 0 or n < self.min_numel:
            return False
        k = num_selected(n, self.current_ratio())
        if self.density_aware:
            vdt = self.value_dtype or tensor.dtype
            pbytes = payload_nbytes(1, vdt, index_dtype(n)) - HEADER_BYTES  # per entry
            return sparse_is_cheaper(n, k, world, tensor.element_size(), pbytes)
        return True

    # -- Horovod's Compressor contract ----------------------------------------------------
    def compress(self, tensor: torch.Tensor, name: Optional[str] = None, *,
                 momentum: float = 0.0, nesterov: bool = False,
                 scale: float = 1.0) -> Tuple[torch.Tensor, SparseContext]:
        """Compensate, select, pack; update the residual of ``name``.

        Arguments:
            tensor: the gradient (any shape, floating dtype). Not modified.
            name: the parameter's name, the key of its residual.
            momentum: > 0 applies DGC's momentum correction (the optimizer passes SGD's
                momentum): ``u = m u + g``; ``v += u`` (Nesterov: ``v += g + m u``); select
                from ``v``; with ``momentum_masking`` also ``u[sent] = 0``. The sent values are
                then an *update* to apply without further momentum.
            nesterov: Nesterov momentum, as ``torch.optim.SGD(nesterov=True)``.
            scale: the loss scale ``tensor`` carries (mixed precision: ``GradScaler``'s scale).
                Residuals and velocities are kept in unscaled units (``g / scale``), so they
                stay right when the scale changes; the sent values are scaled back, for the
                ``GradScaler`` to unscale like any gradient. Use powers of two (as
                ``GradScaler`` does) and the scaling is exact.

        If ``tensor`` holds a NaN or Inf, those entries are dropped (added as 0: residual and
        velocity stay finite) and the payload's header carries ``FLAG_NONFINITE``, so that
        every rank learns of it in ``decompress``; the step is then not applied and the
        optimizer calls ``unsend()``.

        Returns:
            ``payload``: ``(nbytes,)`` uint8, header, values, indices -- the only thing that
            travels; ``ctx``: a ``SparseContext`` that stays local.
        """
        if name is None:
            raise RuntimeError(_ERROR_STOCK)
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"TopKCompressor compresses floating gradients; {name!r} is {tensor.dtype}")
        n = tensor.numel()
        k = num_selected(n, self.current_ratio())
        vdt = self.value_dtype or tensor.dtype
        idt = index_dtype(n)
        ctx = SparseContext(name, tensor.shape, tensor.dtype, k, vdt, idt)
        g = tensor.detach().reshape(-1)  # (n,)
        if n == 0:
            return pack(g.to(vdt), torch.empty(0, dtype=idt, device=g.device), ctx.signature), ctx
        inv = 1.0 / scale
        exact = vdt == tensor.dtype and scale == 1.0  # the wire carries the values unchanged
        # A NaN/Inf must never enter the residual (it would stay there and poison every later
        # step): non-finite entries are dropped on the way in and the payload is flagged.
        fused = self._fused_update(name, g, k, momentum, nesterov, inv, exact)
        if fused is not None:
            buf, u, idx, vals, u_sent, finite = fused  # with `exact`, buf is zeroed where sent
        else:
            buf, idx, u, finite = self._update_and_select(name, g, k, momentum, nesterov, inv)
            vals = buf.index_select(0, idx)  # (k,) unscaled
            u_sent = None
        if not finite:
            ctx.flags = FLAG_NONFINITE
        if exact:
            sent = vals
            if fused is None:
                # index_select / index_fill_ / index_copy_: ~4x faster than advanced indexing on CPU.
                buf.index_fill_(0, idx, 0)  # sent exactly
        else:
            if scale != 1.0 and vals.element_size() < 4:
                vals_scaled = vals.float() * scale  # a half-precision product could overflow
            else:
                vals_scaled = vals if scale == 1.0 else vals * scale
            sent = _to_wire(vals_scaled, vdt)  # (k,) in the gradient's (loss-scaled) units
            # e <- c - sent: keep what the narrower dtype (or its clamp) did not carry.
            back = sent.to(buf.dtype)
            buf.index_copy_(0, idx, vals - (back if scale == 1.0 else back * inv))
        if u is not None and self.momentum_masking and u_sent is None:
            u_sent = u.index_select(0, idx)
            u.index_fill_(0, idx, 0)  # DGC momentum factor masking: no stale momentum on what was sent
        self._pending[name] = (buf, idx, vals, u, u_sent)  # for unsend(), until step_done()
        return pack(sent, idx.to(idt), ctx.signature, ctx.flags), ctx

    def _fused_update(self, name: str, g: torch.Tensor, k: int, momentum: float, nesterov: bool,
                      inv: float, exact: bool):
        """The common case in one CPU kernel call (``selection.fused_update_and_select``):
        ``(buf, u, idx, vals, u_sent, finite)``, or None where it does not apply (the first
        step of a name, Nesterov, local clipping, not float32 on CPU). With ``exact`` the
        kernel also zeroes the sent entries of the residual (otherwise ``compress`` keeps what
        the wire did not carry there); with momentum masking it zeroes them in the velocity."""
        if self.local_clip_norm is not None or nesterov or g.device.type != "cpu":
            return None
        buf = self.memory.buffer(name, g)
        if buf is None:
            return None
        u = None
        if momentum > 0:
            u = self.velocity.buffer(name, g)
            if u is None:
                return None
        mask_u = u is not None and self.momentum_masking
        out = fused_update_and_select(buf, u, g.contiguous(), k, momentum, inv, zero_v=exact,
                                      zero_u=mask_u)
        if out is None:
            return None
        idx, vals, u_vals, finite = out
        if u is not None and not mask_u:
            u_vals = None
        return buf, u, idx, vals, u_vals, finite

    def _update_and_select(self, name: str, g: torch.Tensor, k: int, momentum: float,
                           nesterov: bool, inv: float):
        """Error feedback's update (and momentum correction's), then the exact top-k:
        ``(residual buffer, indices, velocity or None, g was finite)``. The common cases run as
        one walk over memory (``selection.py``); the first step of a name, Nesterov and local
        clipping take separate passes."""
        finite = True
        if self.local_clip_norm is not None:
            g, finite = _finite_or_zeroed(g, True)  # clipping reads g in full first
            # DGC 3.3: clip each rank's gradient to max_norm / sqrt(P), before accumulation.
            limit = self.local_clip_norm / math.sqrt(max(1, self.world_size))
            norm = torch.linalg.vector_norm(g.float()) * inv  # of the unscaled gradient
            g = g * (limit / (norm + 1e-6)).clamp(max=1.0).to(g.dtype)
        buf = self.memory.buffer(name, g)  # (n,) e, or None on the first step
        if momentum <= 0:
            if buf is None:
                g, ok = _finite_or_zeroed(g, True)
                buf = self.memory.compensate(name, g, alpha=inv)  # (n,) = g/s
                return buf, select_topk(buf, k), None, finite and ok
            # buf = e + g/s in place, finite check and candidate scan: one walk.
            idx, ok = compensate_finite_and_select(buf, g.contiguous(), k, inv)
            return buf, idx, None, finite and ok
        u = self.velocity.buffer(name, g)
        if u is not None and buf is not None and not nesterov:
            # u = m u + g/s; v += u; candidates of |v|: one walk (DGC momentum correction).
            idx, ok = momentum_compensate_finite_and_select(buf, u, g.contiguous(), k, momentum, inv)
            return buf, idx, u, finite and ok
        g, ok = _finite_or_zeroed(g, True)
        finite = finite and ok
        u = self.velocity.decay_add(name, g, momentum, alpha=inv)  # (n,) u = m u + g/s
        x = (g * inv + momentum * u) if nesterov else u  # what enters the residual
        if buf is None:
            buf = self.memory.compensate(name, x)
            return buf, select_topk(buf, k), u, finite
        return buf, compensate_and_select(buf, x.contiguous(), k), u, finite

    def decompress(self, payload: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Scatter-add every rank's (values, indices), each divided by ``ctx.divisor``, into a
        dense tensor.

        ``payload`` is one rank's payload or the allgather of ``world`` of them. A ``ctx`` of
        ``None`` marks a tensor the optimizer exchanged densely; it is returned unchanged.

        Every rank's header is checked against this rank's: a different signature (another
        shape, dtype, ``k`` or wire dtype) raises ``RankMismatchError``, on every rank alike.
        If any rank flagged its gradient non-finite, the result is all NaN (so that a
        ``GradScaler`` skips the step, as it would in dense training) and ``(name, ranks)``
        is appended to ``self.nonfinite``.
        """
        if ctx is None:
            return payload
        if isinstance(ctx, ComplexContext):
            return torch.view_as_complex(payload)
        try:
            headers, values, indices = unpack(payload, ctx.k, ctx.value_dtype, ctx.index_dtype,
                                              ctx.world)  # (world, 2), (world, k), (world, k)
        except ValueError as e:
            raise RankMismatchError(f"parameter {ctx.name!r} ({ctx.describe()} on this rank): {e}. "
                                    + _SAME_MODEL) from None
        headers = headers.tolist()
        others = [r for r, (sig, _) in enumerate(headers) if sig != ctx.signature]
        if others:
            raise RankMismatchError(
                f"parameter {ctx.name!r}: rank(s) {others} sent a payload for something other than "
                f"this rank's {ctx.describe()}. " + _SAME_MODEL)
        out = ctx.out
        if out is None:
            out = torch.zeros(ctx.numel, dtype=ctx.dtype, device=payload.device)
        bad = [r for r, (_, flags) in enumerate(headers) if flags & FLAG_NONFINITE]
        if bad:
            self.nonfinite.append((ctx.name, bad))
            return out.fill_(float("nan")).view(ctx.shape)
        values = values.reshape(-1).to(ctx.dtype)  # (world * k,)
        if ctx.divisor != 1:
            # Divide the world * k gathered values, not the n-element result: every rank
            # still computes the same bits (same bytes, same order).
            values = values.div_(ctx.divisor)
        out.zero_()
        scatter_add_(out, indices.reshape(-1), values)
        return out.view(ctx.shape)

    def pop_nonfinite(self) -> List[Tuple[str, List[int]]]:
        """The (name, ranks) recorded by ``decompress`` since the last call, and forget them."""
        found, self.nonfinite = self.nonfinite, []
        return found

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Residuals and the step counter (tensors and ints only: loads with weights_only=True)."""
        return {"steps": self.steps, "residuals": self.memory.state_dict(),
                "velocities": self.velocity.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self._pending.clear()
        self.memory.load_state_dict(state["residuals"])
        self.velocity.load_state_dict(state.get("velocities", {}))


class ComplexContext:
    """Context of a complex gradient the optimizer allreduced as its real view (Horovod has
    no complex dtypes); ``decompress`` turns the result back into a complex tensor."""


_SAME_MODEL = ("Every rank must hold the same model (parameter names, shapes and dtypes) and "
               "the same TopKCompressor settings.")


def _to_wire(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast values to the wire dtype, clamped to the largest magnitude that the wire dtype
    holds *and* that comes back finite in the values' dtype (fp16 <-> bf16 round past each
    other's maximum). The excess stays in the residual instead of becoming an Inf."""
    if values.dtype == dtype:
        return values
    limit = _wire_limit(values.dtype, dtype)
    wide = values if values.dtype == torch.float64 else values.float()  # holds `limit` exactly
    return wide.clamp(-limit, limit).to(dtype)


def _wire_limit(src: torch.dtype, dst: torch.dtype) -> float:
    bound = min(torch.finfo(src).max, torch.finfo(dst).max)
    w = torch.tensor(bound, dtype=torch.float64).to(dst)
    if float(w) > bound:  # rounded up past what src holds: one step down in dst
        w = torch.nextafter(w, torch.zeros_like(w))
    return float(w)


def _check_ratio(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < v <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1] (the fraction of entries sent, e.g. 0.01), got {value!r}")
    return v

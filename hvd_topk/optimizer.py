"""``hvd_topk.DistributedOptimizer``: Horovod's DistributedOptimizer with a sparse path.

Built the way Horovod builds its own: a class is created at run time that inherits from the
user's optimizer class and carries Horovod's ``_DistributedOptimizer`` methods (hooks that
overlap communication with backward, ``synchronize()``, ``skip_synchronize()``, gradient
accumulation). We override only how one gradient is sent: a sparse compressor's payload goes
through ``exchange.sparse_allgather_async`` and comes back through Horovod's own
``synchronize()`` as a callable handle -- the same shape Horovod uses for sparse gradients.
No Horovod file is copied or patched.
"""

from __future__ import annotations

import logging
import time
import warnings
import zlib
from dataclasses import asdict, dataclass

import torch
from horovod.torch import mpi_ops
from horovod.torch import optimizer as _hvd_optimizer
from horovod.torch.functions import allgather_object, broadcast_object
from horovod.torch.compression import Compression

from .compression import ComplexContext, RankMismatchError
from .selection import nonfinite_among
from .exchange import sparse_allgather_async

__all__ = ["DistributedOptimizer", "CommStats", "TopKDistributedOptimizer"]

logger = logging.getLogger(__name__)

_HorovodOptimizer = _hvd_optimizer._DistributedOptimizer


@dataclass
class CommStats:
    """Communication counters of one optimizer step (this rank), or totals over steps.

    ``bytes_sent``: what this rank contributed to collectives (sparse payloads, plus dense
    tensors at their size); ``bytes_received``: what the allgathers delivered to it (plus dense
    tensors); ``dense_bytes``: what a dense allreduce of the same gradients would contribute;
    ``compress_ms``: time in ``compress()``; ``wait_ms``: time blocked in ``synchronize()``
    (communication not hidden behind backward, plus decompression).
    """

    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    dense_bytes: int = 0
    sparse_tensors: int = 0
    dense_tensors: int = 0
    compress_ms: float = 0.0
    wait_ms: float = 0.0

    @property
    def density(self) -> float:
        """bytes_sent / dense_bytes (1.0 for uncompressed training)."""
        return self.bytes_sent / self.dense_bytes if self.dense_bytes else 1.0

    def add(self, other: CommStats) -> None:
        for field, value in asdict(other).items():
            setattr(self, field, getattr(self, field) + value)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["density"] = self.density
        return d


NONFINITE_POLICIES = ("raise", "skip")


class TopKDistributedOptimizer:
    """Marker base of every optimizer ``hvd_topk.DistributedOptimizer`` returns.

    ``isinstance(opt, hvd_topk.TopKDistributedOptimizer)`` tells them apart from Horovod's;
    ``hvd.elastic.TorchState`` uses it to commit and restore their hvd_topk state too
    (``hvd_topk/elastic.py``).
    """


class _TopKMethods:
    """Methods layered over Horovod's ``_DistributedOptimizer`` (see module docstring)."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step,
                 op, gradient_predivide_factor, process_set, log_every, grad_scaler, nonfinite):
        self._step_stats = CommStats()
        self.comm_stats = CommStats()  # the last completed step
        self.comm_totals = CommStats()  # since construction
        self._log_every = log_every
        self._grad_scaler = grad_scaler
        self._scale = None  # the loss scale of the step being exchanged (read once per step)
        self._nonfinite_policy = nonfinite
        self._nonfinite = []  # (name, ranks or None) found non-finite in the last exchange
        self._dense_checked = []  # params a sparse compressor left dense this step
        self.skipped_steps = 0  # steps skipped for non-finite gradients (nonfinite="skip")
        self._check_model = True  # compare the ranks' parameters at the next synchronize()
        _HorovodOptimizer.__init__(self, params, named_parameters, compression,
                                   backward_passes_per_step, op, gradient_predivide_factor,
                                   None, False, process_set)
        self._corrected = set()  # params whose synchronized grad is a momentum-corrected update
        self._momentum_group = {}  # param -> its param group, where momentum correction applies
        if getattr(compression, "is_sparse", False):
            compression.world_size = process_set.size()
            self._momentum_group = _momentum_correction_groups(self, compression)

    def _allreduce_grad_async(self, p):
        comp = self._compression
        if p.grad is None:
            # Unused on this rank (dynamic graph) but maybe used on others: send zeros so
            # every rank takes part in the same collectives.
            p.grad = torch.zeros_like(p)
        grad = p.grad
        stats = self._step_stats
        dense_bytes = grad.numel() * grad.element_size()
        stats.dense_bytes += dense_bytes
        sparse_comp = getattr(comp, "is_sparse", False)
        name = self._parameter_names.get(p)
        world = self.process_set.size()
        if not sparse_comp or grad.is_sparse or not comp.wants_sparse(grad, world):
            sent = dense_bytes
            if comp is Compression.fp16 and grad.dtype.is_floating_point:
                sent = grad.numel() * 2
            stats.dense_tensors += 1
            stats.bytes_sent += sent
            stats.bytes_received += sent
            if not sparse_comp or grad.is_sparse:
                # Horovod's own path: its compressors, or its allgather for sparse gradients
                # (which never calls compress()).
                return _HorovodOptimizer._allreduce_grad_async(self, p)
            self._dense_checked.append(p)
            if grad.is_complex():
                # Horovod has no complex dtypes; the mean of the (re, im) view is the mean.
                return self._dense_allreduce_async(torch.view_as_real(grad), name), ComplexContext()
            return self._dense_allreduce_async(grad, name), None

        t0 = time.perf_counter()
        comp.world_size = world  # may change under Horovod Elastic
        scale = self._loss_scale()
        group = self._momentum_group.get(p)
        if group is not None:
            # DGC momentum correction: momentum (and weight decay) applied locally before
            # sparsification; step() then applies the averaged update without momentum.
            wd = group["weight_decay"]
            g = grad if not wd else grad + (wd * scale) * p.detach()  # in the grad's scaled units
            payload, ctx = comp.compress(g, name=name, momentum=group["momentum"],
                                         nesterov=group["nesterov"], scale=scale)
            self._corrected.add(p)
        else:
            payload, ctx = comp.compress(grad, name=name, scale=scale)  # (nbytes,) uint8
        if grad.is_contiguous():
            ctx.out = grad.view(-1)  # scatter straight into the gradient's storage
        ctx.divisor = world if self.op == mpi_ops.Average else 1
        ctx.world = world
        handle = sparse_allgather_async(payload, name=f"{name}.topk", process_set=self.process_set)
        stats.compress_ms += (time.perf_counter() - t0) * 1e3
        stats.sparse_tensors += 1
        stats.bytes_sent += payload.numel()
        stats.bytes_received += payload.numel() * world
        return handle, ctx

    def _loss_scale(self):
        """The GradScaler's current scale (1.0 without one), read once per step."""
        if self._scale is None:
            scaler = self._grad_scaler
            self._scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        return self._scale

    def _dense_allreduce_async(self, tensor, name):
        # Horovod's dense path, with its pre/post-scaling for gradient_predivide_factor, for
        # tensors a sparse compressor leaves dense (Horovod's own would call compress()).
        if self.op == mpi_ops.Average:
            prescale, postscale = 1.0 / self.gradient_predivide_factor, self.gradient_predivide_factor
        else:
            prescale, postscale = 1.0, 1.0
        return mpi_ops.allreduce_async_(tensor, name=name, op=self.op, prescale_factor=prescale,
                                        postscale_factor=postscale, process_set=self.process_set)

    def synchronize(self):
        t0 = time.perf_counter()
        if self._check_model and getattr(self._compression, "is_sparse", False):
            self._check_same_model()
        try:
            _HorovodOptimizer.synchronize(self)
        except RankMismatchError:
            # Every rank finds the mismatch in the same gathered bytes, but not at the same
            # moment: wait for this step's other collectives first, so that no rank exits
            # while another still needs it and every rank reports the same error.
            self._drain_handles()
            raise
        self._scale = None
        self._nonfinite = self._find_nonfinite()
        if self._nonfinite and hasattr(self._compression, "unsend"):
            # The step will not be applied (step() raises or skips, a GradScaler skips it):
            # what the other tensors were about to send stays in their residuals.
            self._compression.unsend()
        stats = self._step_stats
        stats.wait_ms += (time.perf_counter() - t0) * 1e3
        stats.steps = 1
        self.comm_stats = stats
        self.comm_totals.add(stats)
        self._step_stats = CommStats()
        step_done = getattr(self._compression, "step_done", None)
        if step_done is not None:
            step_done()
        n = self.comm_totals.steps
        if self._log_every and n % self._log_every == 0 and logger.isEnabledFor(logging.INFO):
            logger.info("step %d: sent %.1f KB (%.2f%% of dense), %d sparse / %d dense tensors, "
                        "compress %.1f ms, wait %.1f ms", n, stats.bytes_sent / 1e3,
                        100 * stats.density, stats.sparse_tensors, stats.dense_tensors,
                        stats.compress_ms, stats.wait_ms)

    def _drain_handles(self):
        for handle, _ in list(self._handles.values()):
            try:
                handle() if callable(handle) else mpi_ops.synchronize(handle)
            except Exception:  # already consumed, or the collective itself failed
                pass
        self._handles.clear()

    def _check_same_model(self):
        """Raise ``RankMismatchError`` on every rank unless all ranks hold the same parameters
        (names, shapes, dtypes). Without it a parameter that exists on some ranks only would
        wait forever for the others' collective. One small allgather, at the first step (and
        after an elastic reset)."""
        self._check_model = False
        mine = sorted((str(n), tuple(p.shape), str(p.dtype))
                      for p, n in self._parameter_names.items() if p.requires_grad)
        digest = zlib.crc32(repr(mine).encode())
        if len(set(allgather_object(digest, name="hvd_topk.model_check"))) == 1:
            return
        every = allgather_object(mine, name="hvd_topk.model_check.full")
        ref = dict((n, (s, d)) for n, s, d in every[0])
        problems = []
        for r, params in enumerate(every[1:], start=1):
            have = dict((n, (s, d)) for n, s, d in params)
            for n in sorted(set(ref) | set(have)):
                if n not in have:
                    problems.append(f"{n!r} on rank 0 but not on rank {r}")
                elif n not in ref:
                    problems.append(f"{n!r} on rank {r} but not on rank 0")
                elif ref[n] != have[n]:
                    problems.append(f"{n!r} is {ref[n][0]} {ref[n][1]} on rank 0 but "
                                    f"{have[n][0]} {have[n][1]} on rank {r}")
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise RankMismatchError(
            f"hvd_topk: the ranks' models differ: {shown}. Every rank must build the same model "
            "and pass the same named_parameters (without names, Horovod names parameters by "
            "position, so the order must match too).")

    def _find_nonfinite(self):
        """(name, ranks) of this step's non-finite gradients: flagged by a rank's sparse payload
        (ranks known), or non-finite after a dense allreduce (ranks unknown: None)."""
        found = []
        pop = getattr(self._compression, "pop_nonfinite", None)
        if pop is not None:
            found = pop()
        dense, self._dense_checked = self._dense_checked, []
        for i in nonfinite_among([p.grad for p in dense]):  # one host sync per step
            found.append((self._parameter_names.get(dense[i]), None))
        return found

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "context after optimizer.synchronize(). This can cause training "
                              "slowdown. You may want to consider using "
                              "optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.", stacklevel=2)
            self.synchronize()
        self._synchronized = False
        if self._nonfinite:
            # Every rank saw the same flags in the same gathered buffers: all raise or all skip.
            found, self._nonfinite, self._corrected = self._nonfinite, [], set()
            where = ", ".join(f"{n!r} (rank {r})" if r else f"{n!r} (after allreduce)" for n, r in found)
            msg = (f"non-finite gradient for {where}. No residual took it in; the other "
                   "tensors keep this step's gradient in their residuals.")
            if self._nonfinite_policy == "raise":
                raise FloatingPointError(
                    f"hvd_topk: {msg} The step was not applied. Pass nonfinite='skip' to "
                    "hvd_topk.DistributedOptimizer to skip such steps, or use torch.amp.GradScaler "
                    "(Horovod's AMP recipe, see the README), which skips them itself.")
            self.skipped_steps += 1
            logger.warning("hvd_topk: %s Step skipped (nonfinite='skip').", msg)
            return None
        if not self._corrected:
            return super(self.__class__, self).step(closure)
        # Momentum-corrected tensors already carry momentum: hide them from the wrapped SGD
        # (it skips params without grad) and apply  p -= lr * update  ourselves.
        corrected, self._corrected = self._corrected, set()
        stash = {p: p.grad for p in corrected}
        for p in corrected:
            p.grad = None
        try:
            loss = super(self.__class__, self).step(closure)
        finally:
            for p, g in stash.items():
                p.grad = g
        with torch.no_grad():
            for p, g in stash.items():
                group = self._momentum_group[p]
                p.add_(g, alpha=group["lr"] if group.get("maximize") else -group["lr"])
        return loss

    def load_state_dict(self, *args, **kwargs):
        # Horovod's drops pending handles (e.g. after an elastic reset); drop our per-step
        # state with them.
        self._corrected = set()
        self._nonfinite = []
        self._dense_checked = []
        self._scale = None
        self._step_stats = CommStats()
        return _HorovodOptimizer.load_state_dict(self, *args, **kwargs)

    def topk_state_dict(self):
        """hvd_topk's own state on this rank (residuals, velocities, step count), or {} for
        dense training. Per rank: ``optimizer.state_dict()`` does not include it (rank 0's
        residuals loaded on every rank would be counted ``world`` times); use
        ``hvd_topk.save_checkpoint`` or ``hvd.elastic.TorchState``."""
        sd = getattr(self._compression, "state_dict", None)
        return sd() if sd is not None else {}

    def load_topk_state_dict(self, state):
        if state:
            self._compression.load_state_dict(state)

    def sync_topk_state(self, root_rank=0):
        """Make the ranks agree after a membership change (Horovod Elastic): the step count
        (it sets the warm-up ratio, hence ``k``) comes from ``root_rank``. Residuals stay per
        rank: a rank that joins starts with none, a rank that left takes its own with it."""
        comp = self._compression
        if getattr(comp, "is_sparse", False):
            comp.steps = broadcast_object(comp.steps, root_rank=root_rank, name="hvd_topk.sync.steps")
            comp.world_size = self.process_set.size()
            self._check_model = True  # a new rank may have joined: compare models again


def _momentum_correction_groups(opt, comp):
    """Param -> group for the params that get DGC momentum correction (see TopKCompressor)."""
    want = getattr(comp, "momentum_correction", False)
    if want is False or (want is None and comp.ratio >= 1.0):
        return {}  # auto: nothing to correct when everything is sent
    applicable = isinstance(opt, torch.optim.SGD)
    groups = {}
    for group in opt.param_groups:
        if not applicable or group.get("momentum", 0) <= 0:
            continue
        if group.get("dampening", 0) != 0:
            if want:
                raise ValueError("momentum_correction=True needs SGD without dampening "
                                 f"(got dampening={group['dampening']})")
            continue
        for p in group["params"]:
            groups[p] = group
    if want is True and not groups:
        raise ValueError("momentum_correction=True needs torch.optim.SGD with momentum > 0; "
                         f"got {type(opt).__mro__[1].__name__}. Use momentum_correction=None "
                         "(auto) to apply it only where it fits.")
    return groups


def DistributedOptimizer(optimizer, named_parameters=None, compression=Compression.none,
                         backward_passes_per_step=1, op=mpi_ops.Average,
                         gradient_predivide_factor=1.0, process_set=mpi_ops.global_process_set,
                         log_every=100, grad_scaler=None, nonfinite="raise"):
    """Wrap ``optimizer`` like ``hvd.DistributedOptimizer``, with a sparse path for Top-K.

    Same signature and behaviour as ``horovod.torch.DistributedOptimizer`` (hooks overlap
    communication with backward; ``synchronize()``, ``skip_synchronize()``,
    ``backward_passes_per_step`` accumulation). With a sparse ``compression`` such as
    ``hvd_topk.TopKCompressor``, each large gradient is compressed as soon as backward
    produces it, its (values, indices) payload is allgathered, and every rank scatter-adds all
    ranks' entries into the dense gradient and averages. Small tensors, and tensors for which
    the allgather would move more bytes than an allreduce, are allreduced densely. With
    ``hvd.Compression.none`` / ``fp16`` it behaves exactly like Horovod's optimizer.

    Arguments:
        optimizer: a ``torch.optim.Optimizer`` to wrap.
        named_parameters: ``model.named_parameters()``. The names key the error-feedback
            memory, so pass them: without them Horovod's positional names are used.
        compression: ``hvd_topk.TopKCompressor(...)``, or any Horovod compressor.
        backward_passes_per_step: backward passes accumulated locally before exchanging.
        op: ``hvd.Average`` or ``hvd.Sum`` (``hvd.Adasum`` works with dense compressors only).
        gradient_predivide_factor: as in Horovod; applies to densely reduced tensors (the
            sparse sum is exact, then divided once).
        process_set: Horovod process set to reduce over.
        log_every: log communication statistics every N steps (logger ``hvd_topk.optimizer``,
            level INFO); 0 disables. Counters: ``optimizer.comm_stats`` (last step),
            ``optimizer.comm_totals``.
        grad_scaler: the ``torch.amp.GradScaler`` of mixed-precision training. Gradients then
            arrive multiplied by its scale; with the scaler known, residuals and momentum
            velocities are kept unscaled, so they stay right when the scale changes (without
            it they are kept in the units of whatever scale was in force). Follow Horovod's
            recipe: ``optimizer.synchronize()``, ``scaler.unscale_(optimizer)``, then
            ``with optimizer.skip_synchronize(): scaler.step(optimizer)``.
        nonfinite: what ``step()`` does when a gradient holds a NaN/Inf on some rank:
            ``"raise"`` (default) a ``FloatingPointError`` naming the parameters and ranks,
            on every rank; ``"skip"`` the step on every rank (counted in
            ``optimizer.skipped_steps``). Either way no residual takes the bad values in.
            A ``GradScaler`` sees the NaN gradient first and skips the step itself.

    Returns:
        The wrapped optimizer, an instance of a subclass of ``optimizer.__class__``.

    Example::

        optimizer = hvd_topk.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            named_parameters=model.named_parameters(),
            compression=hvd_topk.TopKCompressor(ratio=0.01))
    """
    sparse = getattr(compression, "is_sparse", False)
    if gradient_predivide_factor != 1.0 and op != mpi_ops.Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if backward_passes_per_step <= 0:
        raise ValueError(f"backward_passes_per_step must be > 0, got {backward_passes_per_step}")
    if op == mpi_ops.Adasum:
        if sparse:
            raise ValueError("op=hvd.Adasum combines dense updates and cannot take a sparse "
                             "compressor; use op=hvd.Average (default) or hvd.Sum")
        return _hvd_optimizer.DistributedOptimizer(
            optimizer, named_parameters=named_parameters, compression=compression,
            backward_passes_per_step=backward_passes_per_step, op=op,
            gradient_predivide_factor=gradient_predivide_factor, process_set=process_set)
    if op not in (mpi_ops.Average, mpi_ops.Sum):
        raise ValueError(f"op must be hvd.Average, hvd.Sum or hvd.Adasum, got {op!r}")
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")

    attrs = dict(_HorovodOptimizer.__dict__)
    attrs.update({k: v for k, v in _TopKMethods.__dict__.items()
                  if k not in ("__dict__", "__weakref__", "__module__", "__qualname__")})
    attrs["__doc__"] = optimizer.__class__.__doc__
    cls = type(optimizer.__class__.__name__, (optimizer.__class__, TopKDistributedOptimizer), attrs)
    wrapped = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step,
                  op, gradient_predivide_factor, process_set, log_every, grad_scaler, nonfinite)
    if sparse and mpi_ops.rank() == 0:
        logger.info("hvd_topk: %r over %d ranks", compression, process_set.size())
    return wrapped

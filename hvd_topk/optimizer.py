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

from .compression import ComplexContext, RankMismatchError, SparseCompressor
from .exchange import sparse_allgather_async
from .selection import segment_views, stacked_probe

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


class _Group:
    """Gradients compressed and exchanged together in one step (see ``TopKCompressor``'s
    ``group_bytes``): the group is compressed in the backward hook of its last gradient."""

    def __init__(self, key):
        self.key = key  # (device, dtype, momentum, nesterov): one pipeline run needs one of each
        self.params = []
        self.names = []
        self.nbytes = 0
        self.ready = {}  # param -> the gradient to compress (this step)
        self.handle = None  # the allgather's wait(), once launched
        self.ctx = None

    def add(self, p, name):
        self.params.append(p)
        self.names.append(name)
        self.nbytes += p.numel() * p.element_size()

    def drop(self, p):
        i = self.params.index(p)
        del self.params[i], self.names[i]


class _InGroup:
    """The handle Horovod's hook stores for a gradient that travels in a group."""

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group


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
        self._sparse = isinstance(compression, SparseCompressor)
        self._plan = None  # param -> _Group for this step's sparse gradients
        self._plan_key = None
        _HorovodOptimizer.__init__(self, params, named_parameters, compression,
                                   backward_passes_per_step, op, gradient_predivide_factor,
                                   None, False, process_set)
        self._corrected = set()  # params whose synchronized grad is a momentum-corrected update
        self._momentum_group = {}  # param -> its param group, where momentum correction applies
        if self._sparse:
            self._momentum_group = _momentum_correction_groups(self, compression)

    def _groups_of_step(self):
        """Param -> ``_Group`` for the gradients sent sparsely this step. The same on every
        rank: it depends on the parameters, the ratio in force and the world size. Params are
        taken in reverse registration order (about the order backward produces them) and cut
        into groups of ``group_bytes`` of one device, dtype and momentum setting."""
        comp = self._compression
        world = self.process_set.size()
        key = (world, comp.current_ratio())
        if self._plan is not None and self._plan_key == key:
            return self._plan
        params = [p for g in self.param_groups for p in g["params"] if p in self._requires_update]
        groups, current = [], None
        for p in reversed(params):
            if p.is_complex() or not comp.wants_sparse(p, world):
                continue
            mg = self._momentum_group.get(p)
            gkey = (p.device, p.dtype, mg["momentum"] if mg else 0.0, bool(mg and mg["nesterov"]))
            nbytes = p.numel() * p.element_size()
            if (current is None or current.key != gkey
                    or current.nbytes + nbytes > comp.group_bytes(p.device)):
                current = _Group(gkey)
                groups.append(current)
            current.add(p, self._parameter_names.get(p))
        self._plan = {p: g for g in groups for p in g.params}
        self._plan_key = key
        return self._plan

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
        name = self._parameter_names.get(p)
        group = self._groups_of_step().get(p) if self._sparse else None
        if group is not None and (grad.is_sparse or grad.dtype != p.dtype):
            group.drop(p)  # a sparse (embedding) gradient takes Horovod's own path
            self._plan[p] = group = None
        if group is None:
            sent = dense_bytes
            if comp is Compression.fp16 and grad.dtype.is_floating_point:
                sent = grad.numel() * 2
            stats.dense_tensors += 1
            stats.bytes_sent += sent
            stats.bytes_received += sent
            if not self._sparse or grad.is_sparse:
                # Horovod's own path: its compressors, or its allgather for sparse gradients
                # (which never calls compress()).
                return _HorovodOptimizer._allreduce_grad_async(self, p)
            self._dense_checked.append(p)
            if grad.is_complex():
                # Horovod has no complex dtypes; the mean of the (re, im) view is the mean.
                return self._dense_allreduce_async(torch.view_as_real(grad), name), ComplexContext()
            return self._dense_allreduce_async(grad, name), None
        mg = self._momentum_group.get(p)
        if mg is not None and mg["weight_decay"]:
            # DGC momentum correction applies weight decay locally, in the grad's scaled units.
            grad = grad + (mg["weight_decay"] * self._loss_scale()) * p.detach()
        group.ready[p] = grad
        self._launch_if_complete(group)
        return _InGroup(group), None

    def _launch_if_complete(self, group):
        if group.handle is not None or len(group.ready) < len(group.params):
            return
        t0 = time.perf_counter()
        comp = self._compression
        world = self.process_set.size()
        _, _, momentum, nesterov = group.key
        payload, ctx = comp.compress_group([group.ready[p] for p in group.params], group.names,
                                           momentum=momentum, nesterov=nesterov,
                                           scale=self._loss_scale(), world=world)  # (nbytes,) uint8
        ctx.divisor = world if self.op == mpi_ops.Average else 1
        ctx.world = world
        group.ctx = ctx
        group.handle = sparse_allgather_async(payload, name=self._group_name(group),
                                              process_set=self.process_set)
        if momentum > 0:
            self._corrected.update(group.params)
        stats = self._step_stats
        stats.compress_ms += (time.perf_counter() - t0) * 1e3
        stats.sparse_tensors += len(group.params)
        stats.bytes_sent += payload.numel()
        stats.bytes_received += payload.numel() * world

    @staticmethod
    def _group_name(group, suffix=""):
        if len(group.names) == 1:
            return f"{group.names[0]}.topk{suffix}"
        return f"{group.names[0]}+{len(group.names) - 1}.topk{suffix}"

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
        if not self._sparse:
            t0 = time.perf_counter()
            _HorovodOptimizer.synchronize(self)
            return self._finish_step(time.perf_counter() - t0)
        if not self.process_set.included():
            self._synchronized = True
            return
        t0 = time.perf_counter()
        if self._check_model:
            self._check_same_model()
        try:
            self._exchange()
        except RankMismatchError:
            # Every rank finds the mismatch in the same gathered bytes, but not at the same
            # moment: wait for this step's other collectives first, so that no rank exits
            # while another still needs it and every rank reports the same error.
            self._drain_handles()
            raise
        finally:
            self._plan_reset()
        self._finish_step(time.perf_counter() - t0)

    def _plan_reset(self):
        for group in set(g for g in (self._plan or {}).values() if g is not None):
            group.ready.clear()
            group.handle = group.ctx = None

    def _exchange(self):
        """Horovod's synchronize() for a sparse compressor: start what backward did not, wait
        for every collective, scatter each group (no host sync), then one ``check`` of every
        flag of the step -- its one host sync -- and the rare redo of an inexact selection."""
        comp = self._compression
        handles = self._handles
        done = {p for p, (h, _) in handles.items() if h is not None}
        for p in [p for p in self._parameter_order() if p in self._requires_update and p not in done]:
            handles[p] = self._allreduce_grad_async(p)
        groups = []
        for p, (handle, ctx) in list(handles.items()):
            self._allreduce_delay[p] = self.backward_passes_per_step
            if isinstance(handle, _InGroup):
                if handle.group not in groups:
                    groups.append(handle.group)
                continue
            output = handle() if callable(handle) else mpi_ops.synchronize(handle)
            if p.grad.is_sparse:
                p.grad.zero_().add_(comp.decompress(output, ctx))
            else:
                p.grad.set_(comp.decompress(output, ctx))  # dense: no check, no sync
        for group in groups:
            comp.scatter(group.handle(), group.ctx)
        handles.clear()
        dense, self._dense_checked = self._dense_checked, []
        probe = stacked_probe([p.grad for p in dense])
        redo, dense_bad = comp.check([g.ctx for g in groups], probe)  # the step's one host sync
        while redo:  # an unlucky sample somewhere (rare): exchange those groups again, exactly
            by_ctx = {id(g.ctx): g for g in groups}
            for ctx in redo:
                gathered = mpi_ops.allgather(comp.redo(ctx), name=self._group_name(by_ctx[id(ctx)], ".redo"),
                                             process_set=self.process_set)
                comp.scatter(gathered, ctx)
            redo, _ = comp.check(redo)
        for group in groups:
            for p, view in zip(group.params, segment_views(group.ctx.out, group.ctx.layout)):
                p.grad.set_(view.view(p.grad.shape))
        self._nonfinite = comp.pop_nonfinite()
        self._nonfinite += [(self._parameter_names.get(p), None) for p, bad in zip(dense, dense_bad) if bad]
        self._synchronized = True

    def _parameter_order(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _finish_step(self, waited_s):
        self._scale = None
        if self._nonfinite and self._sparse:
            # The step will not be applied (step() raises or skips, a GradScaler skips it):
            # what the other tensors were about to send stays in their residuals.
            self._compression.unsend()
        stats = self._step_stats
        stats.wait_ms += waited_s * 1e3
        stats.steps = 1
        self.comm_stats = stats
        self.comm_totals.add(stats)
        self._step_stats = CommStats()
        if self._sparse:
            self._compression.step_done()
        n = self.comm_totals.steps
        if self._log_every and n % self._log_every == 0 and logger.isEnabledFor(logging.INFO):
            logger.info("step %d: sent %.1f KB (%.2f%% of dense), %d sparse / %d dense tensors, "
                        "compress %.1f ms, wait %.1f ms", n, stats.bytes_sent / 1e3,
                        100 * stats.density, stats.sparse_tensors, stats.dense_tensors,
                        stats.compress_ms, stats.wait_ms)

    def _drain_handles(self):
        waits = [h for h, _ in self._handles.values() if not isinstance(h, _InGroup)]
        groups = set(g for g in (self._plan or {}).values() if g is not None)
        waits += [g.handle for g in groups if g.handle is not None]
        for handle in waits:
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
        self._plan_reset()
        return _HorovodOptimizer.load_state_dict(self, *args, **kwargs)

    def topk_state_dict(self):
        """hvd_topk's own state on this rank (residuals, velocities, step count), or {} for
        dense training. Per rank: ``optimizer.state_dict()`` does not include it (rank 0's
        residuals loaded on every rank would be counted ``world`` times); use
        ``hvd_topk.save_checkpoint`` or ``hvd.elastic.TorchState``."""
        return self._compression.state_dict() if self._sparse else {}

    def load_topk_state_dict(self, state):
        if state:
            self._compression.load_state_dict(state)

    def sync_topk_state(self, root_rank=0):
        """Make the ranks agree after a membership change (Horovod Elastic): the step count
        (it sets the warm-up ratio, hence ``k``) comes from ``root_rank``. Residuals stay per
        rank: a rank that joins starts with none, a rank that left takes its own with it."""
        comp = self._compression
        if self._sparse:
            comp.steps = broadcast_object(comp.steps, root_rank=root_rank, name="hvd_topk.sync.steps")
            comp.world_size = self.process_set.size()
            self._check_model = True  # a new rank may have joined: compare models again


def _momentum_correction_groups(opt, comp):
    """Param -> group for the params that get DGC momentum correction (see TopKCompressor)."""
    want = comp.momentum_correction
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
    sparse = isinstance(compression, SparseCompressor)
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

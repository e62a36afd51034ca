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
from dataclasses import asdict, dataclass

import torch
from horovod.torch import mpi_ops
from horovod.torch import optimizer as _hvd_optimizer
from horovod.torch.compression import Compression

from .exchange import sparse_allgather_async

__all__ = ["DistributedOptimizer", "CommStats"]

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


class _TopKMethods:
    """Methods layered over Horovod's ``_DistributedOptimizer`` (see module docstring)."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step,
                 op, gradient_predivide_factor, process_set, log_every):
        self._step_stats = CommStats()
        self.comm_stats = CommStats()  # the last completed step
        self.comm_totals = CommStats()  # since construction
        self._log_every = log_every
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
            return self._dense_allreduce_async(grad, name), None

        t0 = time.perf_counter()
        group = self._momentum_group.get(p)
        if group is not None:
            # DGC momentum correction: momentum (and weight decay) applied locally before
            # sparsification; step() then applies the averaged update without momentum.
            g = grad if not group["weight_decay"] else grad + group["weight_decay"] * p.detach()
            payload, ctx = comp.compress(g, name=name, momentum=group["momentum"],
                                         nesterov=group["nesterov"])
            self._corrected.add(p)
        else:
            payload, ctx = comp.compress(grad, name=name)  # (nbytes,) uint8
        if grad.is_contiguous():
            ctx.out = grad.view(-1)  # scatter straight into the gradient's storage
        ctx.divisor = world if self.op == mpi_ops.Average else 1
        handle = sparse_allgather_async(payload, name=f"{name}.topk", process_set=self.process_set)
        stats.compress_ms += (time.perf_counter() - t0) * 1e3
        stats.sparse_tensors += 1
        stats.bytes_sent += payload.numel()
        stats.bytes_received += payload.numel() * world
        return handle, ctx

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
        _HorovodOptimizer.synchronize(self)
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

    def topk_state_dict(self):
        """hvd_topk's own state on this rank (residuals, step count), or {} for dense training."""
        sd = getattr(self._compression, "state_dict", None)
        return sd() if sd is not None else {}

    def load_topk_state_dict(self, state):
        if state:
            self._compression.load_state_dict(state)


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
                         log_every=100):
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

    attrs = dict(_HorovodOptimizer.__dict__)
    attrs.update({k: v for k, v in _TopKMethods.__dict__.items()
                  if k not in ("__dict__", "__weakref__", "__module__", "__qualname__")})
    attrs["__doc__"] = optimizer.__class__.__doc__
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), attrs)
    wrapped = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step,
                  op, gradient_predivide_factor, process_set, log_every)
    if sparse and mpi_ops.rank() == 0:
        logger.info("hvd_topk: %r over %d ranks", compression, process_set.size())
    return wrapped

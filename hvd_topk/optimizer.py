"""``hvd_topk.DistributedOptimizer``: Horovod's DistributedOptimizer with a sparse path.

Built the way Horovod builds its own: a class is created at run time that inherits from the
user's optimizer class and carries Horovod's ``_DistributedOptimizer`` methods (hooks that
overlap communication with backward, ``synchronize()``, ``skip_synchronize()``, gradient
accumulation). We override only how one gradient is sent: a sparse compressor's payload goes
through ``exchange.sparse_allgather_async`` and comes back through Horovod's own
``synchronize()`` as a callable handle -- the same shape Horovod uses for sparse gradients.
No Horovod file is copied or patched.

Here: the hook, ``synchronize()`` and ``step()``; their parts are in ``plan.py``, ``agreement.py``,
``synchronize.py``, ``stats.py``, ``scaling.py``, ``clipping.py``, ``nonfinite.py``, ``corrections.py``;
the state methods in ``optimizer_state.py``, those for params trained later in ``param_groups.py``.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from horovod.torch import mpi_ops
from horovod.torch import optimizer as _hvd_optimizer
from horovod.torch.compression import Compression

from .agreement import ModelAgreement
from .clipping import HELD, GradClipper, check_clip_grad_norm, warn_unclipped_updates
from .compression import RankMismatchError, SparseCompressor
from .corrections import CorrectionSet
from .nonfinite import NonfinitePolicy, check_policy
from .optimizer_state import RankState, StateMethods, TopKDistributedOptimizer, with_step_guard
from .param_groups import ParamGroupMethods
from .plan import InGroup, Planner, check_user_groups
from .scaling import LossScale, check_grad_scaler
from .stats import CommCounter, CommStats
from .synchronize import StepExchange

__all__ = ["DistributedOptimizer", "CommStats", "TopKDistributedOptimizer"]

logger = logging.getLogger(__name__)

_HorovodOptimizer = _hvd_optimizer._DistributedOptimizer


class _TopKMethods:
    """Methods layered over Horovod's ``_DistributedOptimizer`` (see module docstring)."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step,
                 op, gradient_predivide_factor, groups, sparse_as_dense, process_set, log_every,
                 grad_scaler, nonfinite, clip_grad_norm):
        self._sparse = isinstance(compression, SparseCompressor)
        # With a sparse compressor, the user groups (``groups``) cut the Top-K groups (plan.py)
        # and Horovod's grouped allreduce, which would call compress() without a name, is off.
        _HorovodOptimizer.__init__(self, params, named_parameters, compression,
                                   backward_passes_per_step, op, gradient_predivide_factor,
                                   None if self._sparse else groups, sparse_as_dense, process_set)
        names = self._parameter_names
        self._counter = CommCounter(log_every, fp16=compression is Compression.fp16)
        self.comm_stats = CommStats()  # the last completed step
        self.comm_totals = CommStats()  # since construction
        self.skipped_steps = 0  # steps skipped for non-finite gradients (nonfinite="skip")
        self._loss_scale = LossScale(grad_scaler)
        self._nonfinite = NonfinitePolicy(nonfinite)
        self._planner = Planner(compression, names, groups if self._sparse else None)
        self._agreement = ModelAgreement(process_set, names, self.param_groups)
        self._rank_state = RankState(compression, process_set, names)
        self._corrections = CorrectionSet()
        if self._sparse:
            self._corrections.rebuild(self, compression)
        self._step_exchange = StepExchange(compression, process_set, op, gradient_predivide_factor,
                                           self._counter, self._loss_scale, self._corrections)
        self._clipper = None if clip_grad_norm is None else GradClipper(clip_grad_norm, self._loss_scale)
        self._stepping = False  # inside step(): the wrapped optimizer's step is ours to call
        self._step_sync = False  # inside step()'s own synchronize()
        self._sync_warned = False

    def _groups_of_step(self):
        """Param -> ``Group`` for the gradients sent sparsely this step (``Planner.plan_step``),
        planned once per step; the step's allgather of the ranks' digests starts with it."""
        planner = self._planner
        if planner.planned:
            return planner.plan
        self._take_broadcast_state()
        self._hook_trained()  # params unfrozen or added since the optimizer was built
        plan = planner.plan_step(self.param_groups, self._requires_update, self.process_set.size(),
                                 self._corrections)
        self._agreement.launch(planner.trained_set, planner.groups_digest, self._compression.steps)
        return plan

    def _allreduce_grad_async(self, p):
        if self._clipper is not None and not self._clipper.released:
            return self._clip_and_release(p)
        plan = self._groups_of_step() if self._sparse else None
        if self._sparse and p not in self._planner.trained_set:
            return None, None  # frozen, or not updated by the optimizer: not exchanged
        if p.grad is None:
            # Trainable but unused on this rank (dynamic graph), maybe used on others: zeros, so
            # every rank takes part in the same collectives (its residual still sends what it owes).
            p.grad = torch.zeros_like(p)
        if self._sparse and self.sparse_as_dense and p.grad.is_sparse:
            # Horovod's sparse_as_dense: exchanged dense (through Top-K if planned so), made
            # sparse again at the end of the exchange.
            p.grad = p.grad.to_dense()
            self._step_exchange.densified(p)
        grad = p.grad
        self._counter.gradient(grad)
        group = plan.get(p) if self._sparse else None
        if group is not None and (grad.is_sparse or grad.dtype != p.dtype):
            # A sparse (embedding) gradient takes Horovod's path; the group's others may be ready.
            self._launch_if_complete(self._planner.drop(p))
            group = None
        if group is None:
            self._counter.dense(grad, self.process_set.size())
            if not self._sparse or grad.is_sparse:
                # Horovod's own path: its compressors, or its sparse allgather (no compress()).
                return _HorovodOptimizer._allreduce_grad_async(self, p)
            return self._step_exchange.send_dense(p, grad, self._parameter_names.get(p), self._planner)
        correction = self._corrections.get(p)
        if correction is not None:
            # A corrected update carries coupled weight decay: added locally, in the grad's units.
            grad = correction.local_grad(p, grad, self._loss_scale.get())
        group.take(p, grad)
        self._launch_if_complete(group)
        return InGroup(group), None

    def _launch_if_complete(self, group):
        self._step_exchange.launch_if_complete(group, self.state, self._planner.budget)

    def _grouped_allreduce_grad_async(self, ps):
        for p in ps:  # Horovod's grouped allreduce (``groups`` with its compressors), counted
            self._counter.gradient(p.grad)
            self._counter.dense(p.grad, self.process_set.size())
        return _HorovodOptimizer._grouped_allreduce_grad_async(self, ps)

    def _clip_and_release(self, p):
        """``clip_grad_norm``: hold each gradient of the step (sparse and dense alike) until the
        last trained one is in, then send them all, clipped (``GradClipper``): nothing is sent
        before backward ends (the cost in overlap: docs/performance.md, "Migrating")."""
        self._groups_of_step()
        if p not in self._planner.trained_set:
            return None, None  # frozen, or not updated by the optimizer: not exchanged
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # as _allreduce_grad_async does: every rank sends
        held = self._clipper.hold(p, self._planner.trained)
        if held is None:
            return HELD, None
        with self._clipper.releasing():
            for q in held[:-1]:
                self._handles[q] = self._allreduce_grad_async(q)
            return self._allreduce_grad_async(p)  # Horovod's hook stores this one

    def synchronize(self):
        """Horovod's ``synchronize()``: the averaged (``hvd.Sum``: summed) gradients in ``p.grad``. Sparse:
        the ranks first check that they train the same model (else ``RankMismatchError``); one host sync."""
        if not self._sparse:
            t0 = time.perf_counter()
            self._hook_trained()  # params unfrozen or added since the optimizer was built
            _HorovodOptimizer.synchronize(self)
            return self._finish_step(time.perf_counter() - t0)
        if not self.process_set.included():
            self._synchronized = True
            return
        if not self._step_sync and not self._sync_warned and self._corrections and self._clipper is None:
            self._sync_warned = True  # once: clipping p.grad now would clip corrected updates
            warn_unclipped_updates()
        t0 = time.perf_counter()
        try:
            self._groups_of_step()  # if no hook ran this step
            try:
                t_agree = time.perf_counter()
                self._agreement.check(self.param_groups, self._planner.trained_set, self._requires_update)
                self._counter.add_ms("agree_ms", t_agree)
            except RankMismatchError:
                # Raised before any wait, on every rank alike. Some collectives started in
                # backward have no partner on other ranks: waiting for them would hang.
                self._handles.clear()
                self.set_backward_passes_per_step(self.backward_passes_per_step)
                raise
            try:
                self._exchange()
            except RankMismatchError:
                # Every rank finds the mismatch in the same gathered bytes, but not at the
                # same moment: wait for this step's other collectives first, so that no rank
                # exits while another still needs it and every rank reports the same error.
                self._step_exchange.drain(self._handles.values(), self._planner.groups())
                self._handles.clear()
                raise
        finally:
            self._plan_reset()
        self._finish_step(time.perf_counter() - t0)

    def zero_grad(self, set_to_none=True):
        """Horovod's guard (not between ``backward()`` and the step), then the wrapped
        optimizer's ``zero_grad(set_to_none)``: ``False`` zeroes the gradients in place."""
        if self._handles:
            return _HorovodOptimizer.zero_grad(self)  # raises Horovod's AssertionError
        return super(self.__class__, self).zero_grad(set_to_none)

    def _plan_reset(self):
        for part in (self._planner, self._step_exchange, self._agreement, self._clipper):
            if part is not None:
                part.end_step()

    def _forget_plan(self):  # a state was loaded: the next step plans again
        self._plan_reset()
        self._planner.forget()

    def _discard_step(self):
        """A state is being loaded: drop the step in progress."""
        for part in (self._corrections, self._nonfinite, self._step_exchange, self._counter):
            part.discard()
        self._loss_scale.end_step()
        self._plan_reset()

    def _exchange(self):
        """synchronize() with a sparse compressor: start what backward did not, wait for every collective,
        scatter each group (no host sync), one ``check`` of the step's flags (its host sync), rare redos."""
        handles, exchange = self._handles, self._step_exchange
        done = {p for p, (h, _) in handles.items() if h is not None}
        for p in [p for p in self._planner.trained if p not in done]:
            handles[p] = self._allreduce_grad_async(p)
        groups = []
        for p, (handle, ctx) in list(handles.items()):
            self._allreduce_delay[p] = self.backward_passes_per_step
            group = exchange.receive(p, handle, ctx)  # a dense gradient: waited for, written
            if group is not None and group not in groups:
                groups.append(group)
        exchange.gather(groups)
        handles.clear()
        self._nonfinite.record(exchange.check(groups, self._parameter_names))
        self._synchronized = True

    def _finish_step(self, waited_s):
        self._loss_scale.end_step()
        if self._sparse:
            if self._nonfinite.pending:
                # Not applied (step() raises or skips, or a GradScaler does): what was to be sent stays owed.
                self._compression.unsend()
            self._compression.step_done()
        self.comm_stats = self._counter.finish(waited_s, self.comm_totals)

    def step(self, closure=None):
        """Synchronize (unless inside ``skip_synchronize()``), then apply the step: the wrapped
        optimizer's for the params exchanged as gradients, each correction's for the corrected
        updates. Where a gradient was non-finite on some rank, the ``nonfinite`` policy
        raises or skips the step, on every rank alike."""
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context "
                              "after optimizer.synchronize(). This can cause training slowdown. You may "
                              "want to consider using optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.", stacklevel=2)
            self._step_sync = True
            try:
                self.synchronize()
            finally:
                self._step_sync = False
        self._synchronized = False
        if self._nonfinite.pending:
            self._corrections.discard()
            self._nonfinite.enforce()  # raises, or logs a skipped step
            self.skipped_steps += 1
            return None
        return self._corrections.step(self._wrapped_step, closure)

    def _wrapped_step(self, closure):
        self._stepping = True
        try:
            return super(self.__class__, self).step(closure)
        finally:
            self._stepping = False


def DistributedOptimizer(optimizer, named_parameters=None, compression=Compression.none,
                         backward_passes_per_step=1, op=mpi_ops.Average,
                         gradient_predivide_factor=1.0, num_groups=0, groups=None,
                         sparse_as_dense=False, process_set=mpi_ops.global_process_set, *,
                         log_every=100, grad_scaler=None, nonfinite="raise", clip_grad_norm=None):
    """Wrap ``optimizer`` like ``hvd.DistributedOptimizer``, with a sparse path for Top-K.

    Same signature and behaviour as ``horovod.torch.DistributedOptimizer`` (hooks overlap
    communication with backward; ``synchronize()``, ``skip_synchronize()``,
    ``backward_passes_per_step`` accumulation). With a sparse ``compression`` such as
    ``hvd_topk.TopKCompressor``, each large gradient is compressed as soon as backward
    produces it, its (values, indices) payload is allgathered, and every rank scatter-adds all
    ranks' entries into the dense gradient and averages. Small tensors, and tensors for which
    the allgather would move more bytes than an allreduce, are allreduced densely. With
    ``hvd.Compression.none`` / ``fp16`` it behaves exactly like Horovod's optimizer.

    With ``torch.optim.SGD`` (momentum) or ``torch.optim.Adam`` / ``AdamW`` the optimizer's
    recurrence runs on each rank's own gradients before compression (``TopKCompressor``'s
    ``momentum_correction`` and ``adam_correction``, automatic; ``corrections.py``): what is
    sent is the update, which ``step()`` applies to the sparse params instead of the wrapped
    optimizer (learning rate, weight decay and ``maximize`` of each param group kept); the
    wrapped optimizer still steps the params exchanged densely.

    Arguments:
        optimizer: a ``torch.optim.Optimizer`` to wrap.
        named_parameters: ``model.named_parameters()``. The names key the error-feedback
            memory, so pass them: without them Horovod's positional names are used.
        compression: ``hvd_topk.TopKCompressor(...)``, or any Horovod compressor.
        backward_passes_per_step: backward passes accumulated locally before exchanging.
        op: ``hvd.Average`` or ``hvd.Sum`` (``hvd.Adasum`` works with dense compressors only).
        gradient_predivide_factor: as in Horovod; applies to densely reduced tensors (the
            sparse sum is exact, then divided once).
        num_groups: Horovod's deprecated spelling of an int ``groups`` (same warning).
        groups: as in Horovod, an int ``n`` (the trained parameters cut into ``n`` groups in
            registration order) or a list of lists of parameters (each list one group, every
            other parameter a group of its own). With Horovod's compressors: its grouped
            allreduce. With a sparse compressor: the groups of Top-K compression and exchange
            (one selection run, one payload, one allgather per group and device/dtype),
            replacing ``TopKCompressor(group_bytes=...)``; tensors left dense are allreduced
            one by one (Horovod's tensor fusion batches them).
        sparse_as_dense: as in Horovod: sparse gradients (``nn.Embedding(sparse=True)``) are
            made dense, exchanged -- through Top-K, like any other, when large enough -- and
            made sparse again before ``step()``. Without it they take Horovod's sparse
            allgather, uncompressed.
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
        clip_grad_norm: clip each rank's gradient to this total 2-norm (over the params it
            trains, as ``torch.nn.utils.clip_grad_norm_`` computes it, loss scale of
            ``grad_scaler`` accounted for) before it enters error feedback and the
            corrections; the average of such gradients is within the bound too. With
            momentum or Adam correction, ``p.grad`` after ``synchronize()`` is a corrected
            update, so clipping it there does not clip gradients: use this instead. The
            step's gradients are then compressed and sent after the last one is computed,
            not during backward. ``None`` (default): no clipping. Needs a sparse compressor.

    With a sparse compressor, a parameter that does not require grad (frozen), or that is no
    longer in ``optimizer.param_groups``, is not exchanged: its ``.grad`` is left as it is
    (``None`` after ``zero_grad()``, so the wrapped optimizer skips it), and its residual and
    velocity wait untouched until it is trained again. Every rank must freeze the same
    parameters at the same step; ranks that disagree get a ``RankMismatchError`` naming them.
    A parameter that is trained but got no gradient on some rank this step (a branch of a
    dynamic graph) is exchanged with a zero gradient there, as in Horovod: its residual
    still sends what it owes.

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
    if num_groups != 0:
        warnings.warn("Parameter `num_groups` has been replaced by `groups` and will be removed "
                      "in v0.23.0.", DeprecationWarning, stacklevel=2)
        if groups is None:
            groups = num_groups
    check_user_groups(groups)
    if op == mpi_ops.Adasum:
        if sparse:
            raise ValueError("op=hvd.Adasum combines dense updates and cannot take a sparse "
                             "compressor; use op=hvd.Average (default) or hvd.Sum")
        return _hvd_optimizer.DistributedOptimizer(
            optimizer, named_parameters=named_parameters, compression=compression,
            backward_passes_per_step=backward_passes_per_step, op=op,
            gradient_predivide_factor=gradient_predivide_factor, groups=groups,
            sparse_as_dense=sparse_as_dense, process_set=process_set)
    if op not in (mpi_ops.Average, mpi_ops.Sum):
        raise ValueError(f"op must be hvd.Average, hvd.Sum or hvd.Adasum, got {op!r}")
    check_policy(nonfinite)
    check_clip_grad_norm(clip_grad_norm, sparse)
    check_grad_scaler(grad_scaler)

    attrs = dict(_HorovodOptimizer.__dict__)
    for methods in (StateMethods, ParamGroupMethods, _TopKMethods):
        attrs.update({k: v for k, v in methods.__dict__.items()
                      if k not in ("__dict__", "__weakref__", "__module__", "__qualname__")})
    attrs["__doc__"] = optimizer.__class__.__doc__
    base = with_step_guard(optimizer.__class__) if sparse else optimizer.__class__
    cls = type(optimizer.__class__.__name__, (base, TopKDistributedOptimizer), attrs)
    wrapped = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step,
                  op, gradient_predivide_factor, groups, sparse_as_dense, process_set, log_every,
                  grad_scaler, nonfinite, None if clip_grad_norm is None else float(clip_grad_norm))
    if sparse and mpi_ops.rank() == 0:
        logger.info("hvd_topk: %r over %d ranks", compression, process_set.size())
    return wrapped

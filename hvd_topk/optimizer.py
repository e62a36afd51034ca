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
import pickle
import time
import warnings
import zlib
from dataclasses import asdict, dataclass

import torch
from horovod.common.util import split_list
from horovod.torch import mpi_ops
from horovod.torch import optimizer as _hvd_optimizer
from horovod.torch.functions import broadcast_object
from horovod.torch.compression import Compression

from . import checkpoint
from .compression import ComplexContext, RankMismatchError, SparseCompressor
from .corrections import AdamCorrection, correction_groups
from .exchange import EXCHANGES, ring_allreduce_bytes, sparse_allgather_async, sparse_alltoall_async
from .selection import segment_views, stacked_probe

__all__ = ["DistributedOptimizer", "CommStats", "TopKDistributedOptimizer"]

logger = logging.getLogger(__name__)

_HorovodOptimizer = _hvd_optimizer._DistributedOptimizer


@dataclass
class CommStats:
    """Communication counters of one optimizer step (this rank), or totals over steps.

    ``bytes_sent``: what this rank contributed to collectives (sparse payloads -- for the
    sparse allreduce its alltoall rows for other ranks and its allgather row --, plus dense
    tensors at their size); ``bytes_received``: what the collectives delivered to it (plus
    dense tensors); ``dense_bytes``: what a dense allreduce of the same gradients would
    contribute; ``link_bytes``: the bytes this rank's link carries each way under the model
    that chooses the exchanges (``exchange.exchange_bytes``: a ring allreduce's ``2 (P-1)/P``
    of each dense tensor, ``P-1`` payloads for an allgather, ``P-1`` rows of each phase for
    the sparse allreduce); ``allgather_tensors`` / ``sparse_allreduce_tensors``: how many
    of the ``sparse_tensors`` took each exchange; ``compress_ms``: time in ``compress()``;
    ``wait_ms``: time blocked in ``synchronize()`` (communication not hidden behind
    backward, plus decompression), of which ``agree_ms`` (the ranks' agreement on the model
    and the trained set), ``collective_ms`` (waiting for collectives), ``scatter_ms``
    (decompressing) and ``check_ms`` (resolving every flag: the step's one host sync).
    """

    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    dense_bytes: int = 0
    link_bytes: int = 0
    sparse_tensors: int = 0
    allgather_tensors: int = 0
    sparse_allreduce_tensors: int = 0
    dense_tensors: int = 0
    compress_ms: float = 0.0
    wait_ms: float = 0.0
    agree_ms: float = 0.0
    collective_ms: float = 0.0
    scatter_ms: float = 0.0
    check_ms: float = 0.0

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
        self.key = key  # (device, dtype, correction key, exchange): one pipeline run each
        self.exchange = key[3]  # "allgather" or "sparse_allreduce"
        self.correction = None  # its params' MomentumCorrection / AdamCorrection, or None
        self.params = []
        self.names = []
        self.nbytes = 0
        self.ready = {}  # param -> the gradient to compress (this step)
        self.handle = None  # the allgather's wait(), once launched
        self.ctx = None
        self.gathered = None  # its result, once waited for (see _bound_in_flight)
        self.scattered = False  # scattered during backward already (see _bound_in_flight)

    def add(self, p, name):
        self.params.append(p)
        self.names.append(name)
        self.nbytes += p.numel() * p.element_size()

    def drop(self, p):
        i = next(i for i, q in enumerate(self.params) if q is p)  # identity, not tensor ==
        del self.params[i], self.names[i]


class _InGroup:
    """The handle Horovod's hook stores for a gradient that travels in a group."""

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group


class _TopKMethods:
    """Methods layered over Horovod's ``_DistributedOptimizer`` (see module docstring)."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step,
                 op, gradient_predivide_factor, groups, sparse_as_dense, process_set, log_every,
                 grad_scaler, nonfinite, clip_grad_norm):
        self._step_stats = CommStats()
        self.comm_stats = CommStats()  # the last completed step
        self.comm_totals = CommStats()  # since construction
        self._log_every = log_every
        self._grad_scaler = grad_scaler
        self._scale = None  # the loss scale of the step being exchanged (read once per step)
        self._nonfinite_policy = nonfinite
        self._nonfinite = []  # (name, ranks or None) found non-finite in the last exchange
        self._dense_checked = []  # params a sparse compressor left dense this step
        self._resparsify = []  # params whose sparse grad was densified (sparse_as_dense)
        self.skipped_steps = 0  # steps skipped for non-finite gradients (nonfinite="skip")
        self._check_model = True  # compare the ranks' parameters at the next synchronize()
        self._sparse = isinstance(compression, SparseCompressor)
        # With a sparse compressor, ``groups`` groups the Top-K payloads (see _groups_of_step)
        # and Horovod's grouped allreduce, which would call compress() without a name, is off.
        self._user_groups = groups if self._sparse else None
        self._plan = None  # param -> _Group for this step's sparse gradients
        self._plan_key = None
        self._plan_logged = set()  # (world, exchange counts) already logged
        self._planned = False  # the plan of the step in progress is known
        self._trained = []  # this step's exchanged params: updated by the optimizer, requires_grad
        self._trained_set = frozenset()
        self._trained_digest = 0  # crc32 of their names: the ranks must agree on it
        self._groups_digest = 0  # crc32 of the plan's groups of several tensors (their names)
        self._trained_check = None  # handle of this step's allgather of the digests
        _HorovodOptimizer.__init__(self, params, named_parameters, compression,
                                   backward_passes_per_step, op, gradient_predivide_factor,
                                   None if self._sparse else groups, sparse_as_dense, process_set)
        self._corrected = set()  # params whose synchronized grad is a corrected update
        self._correction = {}  # param -> its correction (corrections.py), where one applies
        if self._sparse:
            self._correction = correction_groups(self, compression)
        self._clip_grad_norm = clip_grad_norm
        self._clip_held = []  # clip_grad_norm: this step's params whose gradient waits for the norm
        self._clip_released = False
        self._stepping = False  # inside step(): the wrapped optimizer's step is ours to call
        self._step_sync = False  # inside step()'s own synchronize()
        self._sync_warned = False
        self._resume_logged = False
        self._in_flight = []  # (group, gathered bytes) allgathered this step, not yet scattered
        self._in_flight_bytes = 0
        self._in_flight_budget = 0

    def _groups_of_step(self):
        """Param -> ``_Group`` for the gradients sent sparsely this step. The same on every
        rank: it depends on the parameters trained this step (see ``_trained_of_step``), the
        ratio in force and the world size. Params are taken in reverse registration order
        (about the order backward produces them) and cut into groups of one device, dtype and
        momentum setting: of ``group_bytes`` each, or as the ``groups`` argument says."""
        if self._planned:
            return self._plan
        self._take_broadcast_state()
        comp = self._compression
        world = self.process_set.size()
        trained = self._trained_of_step()
        key = (world, comp.current_ratio(), self._trained_set)
        self._planned = True
        if self._plan is not None and self._plan_key == key:
            self._launch_model_check()
            return self._plan
        user_group = self._user_group_index(trained)
        groups, current, by_user_group = [], None, {}
        kinds = {}
        for p in reversed(trained):
            kind = "dense" if p.is_complex() else comp.exchange_for(p, world)
            kinds[p] = kind
            if kind == "dense":
                continue
            correction = self._correction.get(p)
            gkey = (p.device, p.dtype, correction.key() if correction else None, kind)
            if user_group is not None:
                current = by_user_group.get((user_group[p], gkey))
                if current is None:
                    current = by_user_group[(user_group[p], gkey)] = _Group(gkey)
                    groups.append(current)
            else:
                nbytes = p.numel() * p.element_size()
                if (current is None or current.key != gkey
                        or current.nbytes + nbytes > comp.group_bytes(p.device, kind)):
                    current = _Group(gkey)
                    groups.append(current)
            current.add(p, self._parameter_names.get(p))
            current.correction = correction
        self._plan = {p: g for g in groups for p in g.params}
        self._plan_key = key
        self._in_flight_budget = max(1 << 20, sum(p.numel() * p.element_size() for p in trained) // 8)
        self._groups_digest = zlib.crc32("|".join("\n".join(g.names) for g in groups
                                                  if len(g.params) > 1).encode()) & 0x7FFFFFFF
        self._launch_model_check()
        self._log_plan(kinds, world)
        return self._plan

    def _log_plan(self, kinds, world):
        """Log, once per (world size, choice), which exchange each tensor takes and the bytes
        the model predicts for the step (rank 0, INFO)."""
        count = {e: sum(1 for k in kinds.values() if k == e) for e in EXCHANGES}
        key = (world, tuple(count.values()))
        if key in self._plan_logged or mpi_ops.rank() != 0 or not logger.isEnabledFor(logging.INFO):
            return
        self._plan_logged.add(key)
        comp = self._compression
        model = {e: 0 for e in count}
        dense_all = 0
        for p, kind in kinds.items():
            dense = ring_allreduce_bytes(p.numel() * p.element_size(), world)
            dense_all += dense
            model[kind] += dense if kind == "dense" else comp.exchange_costs(p, world)[kind]
        logger.info("hvd_topk: exchange plan at %d ranks, ratio %.4g: %s; the model's bytes per rank "
                    "and step: %s (dense training: %.1f KB)", world, comp.current_ratio(),
                    ", ".join(f"{count[e]} {e}" for e in count),
                    ", ".join(f"{e} {model[e] / 1e3:.1f} KB" for e in count), dense_all / 1e3)

    def _trained_of_step(self):
        """The params exchanged this step: those the wrapped optimizer updates (in its
        ``param_groups``) that Horovod hooked and that still require grad. A frozen param
        (``requires_grad=False``) or one removed from the param groups takes no part: its
        ``.grad`` is left alone and its residual and velocity are kept for later.

        Which params these are decides which collectives a rank joins, so every rank must
        agree: the crc32 of their names is allgathered (with the plan's, see
        ``_launch_model_check``) and compared by ``_check_same_model`` before synchronize()
        waits on anything else."""
        update = self._requires_update
        trained = [p for g in self.param_groups for p in g["params"] if p in update and p.requires_grad]
        trained_set = frozenset(trained)
        if trained_set != self._trained_set or not self._trained:
            names = sorted(self._parameter_names.get(p) for p in trained)
            self._trained_digest = zlib.crc32("\n".join(names).encode()) & 0x7FFFFFFF
        self._trained, self._trained_set = trained, trained_set
        return trained

    def _launch_model_check(self):
        """Start this step's allgather of ``[trained-set digest, groups digest, step count]`` (a
        CPU tensor, in the step's first hook, so that it travels during backward). The groups
        digest, the crc32 of the names of every group of several tensors, in order, catches
        ranks that list the same params in another order and so would cut other groups; the
        step count (it sets the warm-up's ratio, hence ``k``) ranks that resumed from
        different states."""
        if self.process_set.size() > 1:
            steps = self._compression.steps & 0x7FFFFFFF
            self._trained_check = mpi_ops.allgather_async(
                torch.tensor([self._trained_digest, self._groups_digest, steps], dtype=torch.int32),
                name="hvd_topk.trained_set", process_set=self.process_set)

    def _user_group_index(self, trained):
        """Param -> the index of its group in the ``groups`` argument (a param in no list is
        a group of its own, as in Horovod; an int ``n`` cuts the trained params, in
        registration order, into ``n`` runs as Horovod's ``split_list`` does), or None."""
        groups = self._user_groups
        if groups is None:
            return None
        if not isinstance(groups, list):
            return {p: i for i, run in enumerate(split_list(trained, groups)) for p in run}
        index = {p: i for i, members in enumerate(groups) for p in members}
        n = len(groups)
        for p in trained:
            if p not in index:
                index[p], n = n, n + 1
        return index

    def _allreduce_grad_async(self, p):
        if self._clip_grad_norm is not None and not self._clip_released:
            return self._clip_and_release(p)
        plan = self._groups_of_step() if self._sparse else None
        if self._sparse and p not in self._trained_set:
            return None, None  # frozen, or not updated by the optimizer: not exchanged
        if p.grad is None:
            # Trainable but unused on this rank (dynamic graph), maybe used on others: send
            # zeros so every rank takes part in the same collectives. Its residual then sends
            # what it still owes, as for any trained parameter.
            p.grad = torch.zeros_like(p)
        if self._sparse and self.sparse_as_dense and p.grad.is_sparse:
            # Horovod's sparse_as_dense: exchanged dense (through Top-K if planned so), made
            # sparse again at the end of the exchange.
            p.grad = p.grad.to_dense()
            self._resparsify.append(p)
        grad = p.grad
        self._step_stats.dense_bytes += grad.numel() * grad.element_size()
        name = self._parameter_names.get(p)
        group = plan.get(p) if self._sparse else None
        if group is not None and (grad.is_sparse or grad.dtype != p.dtype):
            group.drop(p)  # a sparse (embedding) gradient takes Horovod's own path
            self._launch_if_complete(group)  # the group's other gradients may all be ready
            self._plan[p] = group = None
        if group is None:
            self._count_dense(grad)
            if not self._sparse or grad.is_sparse:
                # Horovod's own path: its compressors, or its allgather for sparse gradients
                # (which never calls compress()).
                return _HorovodOptimizer._allreduce_grad_async(self, p)
            self._dense_checked.append(p)
            if grad.is_complex():
                # Horovod has no complex dtypes; the mean of the (re, im) view is the mean.
                return self._dense_allreduce_async(torch.view_as_real(grad), name), ComplexContext()
            return self._dense_allreduce_async(grad, name), None
        correction = self._correction.get(p)
        if correction is not None:
            # A corrected update carries coupled weight decay: added locally, in the grad's units.
            grad = correction.local_grad(p, grad, self._loss_scale())
        group.ready[p] = grad
        self._launch_if_complete(group)
        return _InGroup(group), None

    def _launch_if_complete(self, group):
        if group.handle is not None or not group.params or len(group.ready) < len(group.params):
            return
        t0 = time.perf_counter()
        comp = self._compression
        world = self.process_set.size()
        kwargs = {}
        if group.correction is not None:
            for p, name in zip(group.params, group.names):
                group.correction.start(name, self.state.get(p, {}), comp)
            kwargs = group.correction.compress_kwargs()
        payload, ctx = comp.compress_group([group.ready[p] for p in group.params], group.names,
                                           scale=self._loss_scale(), world=world,
                                           exchange=group.exchange,
                                           divisor=world if self.op == mpi_ops.Average else 1,
                                           **kwargs)  # (nbytes,) uint8
        group.ctx = ctx
        stats = self._step_stats
        sent, received, link = ctx.traffic()
        stats.bytes_sent += sent
        stats.bytes_received += received
        stats.link_bytes += link
        if group.exchange == "sparse_allreduce":
            # Phase 1 now (it overlaps the rest of backward); phase 2 in synchronize().
            group.handle = sparse_alltoall_async(payload, world, name=self._group_name(group),
                                                 process_set=self.process_set)
            stats.sparse_allreduce_tensors += len(group.params)
        else:
            group.handle = sparse_allgather_async(payload, name=self._group_name(group),
                                                  process_set=self.process_set)
            stats.allgather_tensors += len(group.params)
        if group.correction is not None:
            self._corrected.update(group.params)
        stats.compress_ms += (time.perf_counter() - t0) * 1e3
        stats.sparse_tensors += len(group.params)
        if group.exchange == "allgather":
            self._bound_in_flight(group, (world + 1) * payload.numel())  # gathered + sent

    def _bound_in_flight(self, group, gathered_bytes):
        """Keep the payloads of a step, sent and gathered, within a budget (an eighth of the
        trained parameters' bytes, at least 1 MiB): past it, wait for the oldest groups'
        allgathers and scatter them now, so that Horovod lets their buffers go during backward
        instead of all waiting for synchronize(). At the warm-up's high ratios they would
        otherwise weigh about ``(world + 1) * ratio * 2`` times the model; at 1% the budget is
        rarely reached. Every rank takes the same decisions (from the same byte counts)."""
        self._in_flight.append((group, gathered_bytes))
        self._in_flight_bytes += gathered_bytes
        while len(self._in_flight) > 1 and self._in_flight_bytes > self._in_flight_budget:
            oldest, nbytes = self._in_flight.pop(0)
            self._in_flight_bytes -= nbytes
            oldest.gathered = oldest.handle()
            try:
                self._compression.scatter(oldest.gathered, oldest.ctx, self._own_storage(oldest))
            except RankMismatchError:
                continue  # raised again by synchronize(), where every rank handles it alike
            oldest.gathered, oldest.scattered = None, True

    def _grouped_allreduce_grad_async(self, ps):
        # Horovod's grouped allreduce (``groups`` with its compressors), counted in comm_stats.
        for p in ps:
            self._step_stats.dense_bytes += p.grad.numel() * p.grad.element_size()
            self._count_dense(p.grad)
        return _HorovodOptimizer._grouped_allreduce_grad_async(self, ps)

    def _count_dense(self, grad):
        """comm_stats of a gradient allreduced densely (Horovod's fp16 halves a float's bytes)."""
        if self._compression is Compression.fp16 and grad.dtype.is_floating_point:
            sent = grad.numel() * 2
        else:
            sent = grad.numel() * grad.element_size()
        stats = self._step_stats
        stats.dense_tensors += 1
        stats.bytes_sent += sent
        stats.bytes_received += sent
        stats.link_bytes += ring_allreduce_bytes(sent, self.process_set.size())

    @staticmethod
    def _group_name(group, suffix=""):
        if len(group.names) == 1:
            return f"{group.names[0]}.topk{suffix}"
        return f"{group.names[0]}+{len(group.names) - 1}.topk{suffix}"

    def _loss_scale(self):
        """The GradScaler's current scale (1.0 without one), once per step: its own 0-dim
        tensor, left on the device (``get_scale()`` would read it back, a host sync in the
        backward hook); a float for a scaler that has not made its tensor yet."""
        if self._scale is None:
            scaler = self._grad_scaler
            if scaler is None or not scaler.is_enabled():
                self._scale = 1.0
            elif getattr(scaler, "_scale", None) is not None:
                self._scale = scaler._scale.detach().clone()  # its value for this step
            else:
                self._scale = float(scaler.get_scale())  # before the first scale(): no tensor
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
        if not self._step_sync:
            self._warn_explicit_synchronize()
        t0 = time.perf_counter()
        try:
            self._groups_of_step()  # if no hook ran this step
            try:
                t_agree = time.perf_counter()
                self._check_same_model()
                self._step_stats.agree_ms += (time.perf_counter() - t_agree) * 1e3
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
                self._drain_handles()
                raise
        finally:
            self._plan_reset()
        self._finish_step(time.perf_counter() - t0)

    def _warn_explicit_synchronize(self):
        """Once: clipping ``p.grad`` after an explicit synchronize() clips corrected updates."""
        if self._sync_warned or not self._correction or self._clip_grad_norm is not None:
            return
        self._sync_warned = True
        warnings.warn(
            "hvd_topk: with momentum or Adam correction, p.grad after optimizer.synchronize() holds "
            "the corrected update (a velocity, or an Adam displacement in units of the learning "
            "rate) for the sparsely sent parameters, not the averaged gradient: clipping it there "
            "(torch.nn.utils.clip_grad_norm_) does not clip gradients. Pass clip_grad_norm=max_norm "
            "to hvd_topk.DistributedOptimizer instead: each rank's gradient is then clipped before "
            "it enters error feedback.", stacklevel=3)

    def _clip_and_release(self, p):
        """``clip_grad_norm``: hold each gradient of the step (sparse and dense alike) until
        the last trained one is in -- the total norm needs all of them --, then multiply them
        all by torch's ``clip_grad_norm_`` factor (a device tensor, no host sync) and send them
        all. So nothing is compressed or sent before backward ends: the cost in overlap is in
        the README ("Migrating")."""
        self._groups_of_step()
        if p not in self._trained_set:
            return None, None  # frozen, or not updated by the optimizer: not exchanged
        if p.grad is None:
            p.grad = torch.zeros_like(p)  # as _allreduce_grad_async does: every rank sends
        held = self._clip_held
        held.append(p)
        if len(held) < len(self._trained):
            return _HELD, None
        self._clip_held = []
        # In the param groups' order, as clip_grad_norm_(model.parameters()) sums them.
        grads = [q.grad for q in self._trained]
        factor = clip_factor(grads, self._clip_grad_norm, self._loss_scale())
        for g in grads:
            g.mul_(factor.to(g.device))
        self._clip_released = True
        try:
            for q in held[:-1]:
                self._handles[q] = self._allreduce_grad_async(q)
            return self._allreduce_grad_async(p)  # Horovod's hook stores this one
        finally:
            self._clip_released = False

    def _planned_groups(self):
        """The groups of the current plan (a param dropped from its group maps to None)."""
        return set(g for g in (self._plan or {}).values() if g is not None)

    def _plan_reset(self):
        for group in self._planned_groups():
            group.ready.clear()
            group.handle = group.ctx = group.gathered = None
            group.scattered = False
        self._in_flight, self._in_flight_bytes = [], 0
        self._planned = False
        self._trained_check = None
        self._resparsify = []
        self._clip_held = []

    def _exchange(self):
        """Horovod's synchronize() for a sparse compressor: start what backward did not, wait
        for every collective, scatter each group (no host sync), then one ``check`` of every
        flag of the step -- its one host sync -- and the rare redo of an inexact selection."""
        comp = self._compression
        handles = self._handles
        done = {p for p, (h, _) in handles.items() if h is not None}
        for p in [p for p in self._trained if p not in done]:
            handles[p] = self._allreduce_grad_async(p)
        groups = []
        for p, (handle, ctx) in list(handles.items()):
            self._allreduce_delay[p] = self.backward_passes_per_step
            if handle is None:
                continue  # its hook ran, but it is not trained this step: not exchanged
            if isinstance(handle, _InGroup):
                if handle.group not in groups:
                    groups.append(handle.group)
                continue
            output = self._wait(handle)
            if p.grad.is_sparse:
                p.grad.zero_().add_(comp.decompress(output, ctx))
            else:
                p.grad.set_(comp.decompress(output, ctx))  # dense: no check, no sync
        for group in groups:  # the sparse allreduce's phase 2: sum at the owners, allgather
            if group.exchange == "sparse_allreduce":
                row = comp.reduce_regions(self._wait(group.handle), group.ctx)
                group.handle = sparse_allgather_async(row, name=self._group_name(group, ".sar"),
                                                      process_set=self.process_set)
        for group in groups:
            if not group.scattered:
                gathered = group.gathered if group.gathered is not None else self._wait(group.handle)
                t_scatter = time.perf_counter()
                comp.scatter(gathered, group.ctx, self._own_storage(group))
                self._step_stats.scatter_ms += (time.perf_counter() - t_scatter) * 1e3
        handles.clear()
        t_check = time.perf_counter()
        dense, self._dense_checked = self._dense_checked, []
        probe = stacked_probe([p.grad for p in dense])
        redo, dense_bad = comp.check([g.ctx for g in groups], probe)  # the step's one host sync
        self._step_stats.check_ms += (time.perf_counter() - t_check) * 1e3
        by_ctx = {id(g.ctx): g for g in groups}
        while redo:  # an unlucky sample somewhere (rare): exchange those groups again, exactly
            for ctx in redo:
                name = self._group_name(by_ctx[id(ctx)], ".redo")
                payload = comp.redo(ctx)
                if ctx.exchange == "sparse_allreduce":
                    received = sparse_alltoall_async(payload, ctx.regions.world, name=name,
                                                     process_set=self.process_set)()
                    payload, name = comp.reduce_regions(received, ctx), name + ".sar"
                gathered = mpi_ops.allgather(payload, name=name, process_set=self.process_set)
                comp.scatter(gathered, ctx, ctx.out)
            redo, _ = comp.check(redo)
        for group in groups:
            for p, view in zip(group.params, segment_views(group.ctx.out, group.ctx.layout)):
                if view.data_ptr() != p.grad.data_ptr():  # else it is the gradient's own storage
                    p.grad.set_(view.view(p.grad.shape))
        for p in self._resparsify:
            p.grad = p.grad.to_sparse()  # sparse_as_dense: back to sparse, as Horovod does
        self._nonfinite = comp.pop_nonfinite()
        self._nonfinite += [(self._parameter_names.get(p), None) for p, bad in zip(dense, dense_bad) if bad]
        self._synchronized = True

    def _wait(self, handle):
        """Wait for a collective (a callable handle or Horovod's), counted in ``collective_ms``."""
        t0 = time.perf_counter()
        output = handle() if callable(handle) else mpi_ops.synchronize(handle)
        self._step_stats.collective_ms += (time.perf_counter() - t0) * 1e3
        return output

    @staticmethod
    def _own_storage(group):
        """A lone gradient's own storage, flat, to scatter into (no allocation: on CPU a fresh
        buffer of a large gradient costs more in page faults than the scatter); None for a
        group of several (one new buffer, whose views become the gradients)."""
        if len(group.params) != 1:
            return None
        grad = group.params[0].grad
        if grad.is_sparse or not grad.is_contiguous() or grad.dtype != group.ctx.dtype:
            return None
        return grad.view(-1)

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
        waits += [g.handle for g in self._planned_groups() if g.handle is not None]
        for handle in waits:
            try:
                handle() if callable(handle) else mpi_ops.synchronize(handle)
            except Exception:  # already consumed, or the collective itself failed
                pass
        self._handles.clear()

    def _check_same_model(self):
        """Raise ``RankMismatchError`` on every rank unless all ranks hold the same parameters
        (names, shapes, dtypes) and train the same ones this step. Without it a parameter
        that some ranks exchange and others do not would wait forever for the others'
        collective. Host data only (CPU tensors whatever the model's device): the digests of
        the trained params, allgathered during backward, every step; a small allgather of
        the whole model at the first step (and after an elastic reset)."""
        if self.process_set.size() == 1:
            self._check_model = False
            return
        if self._check_model:
            self._check_model = False
            self._compare_models()
        handle, self._trained_check = self._trained_check, None
        digests = mpi_ops.synchronize(handle).view(-1, 3).tolist()  # (world, 3) int32 on the CPU
        if any(d[0] != digests[0][0] for d in digests):
            self._compare_trained()
        steps = [d[2] for d in digests]
        if any(n != steps[0] for n in steps):
            raise RankMismatchError(
                f"hvd_topk: the ranks are at different hvd_topk steps ({steps}, by rank): their "
                "states come from different places. After a resume load the same state on every "
                "rank (README, Checkpoints): each rank its own optimizer.state_dict(), or rank 0's "
                "on every rank, or rank 0's followed by hvd.broadcast_optimizer_state (this needs "
                "an optimizer with state, e.g. SGD with momentum or Adam).")
        others = [r for r, d in enumerate(digests) if d[1] != digests[0][1]]
        if others:
            raise RankMismatchError(
                f"hvd_topk: rank(s) {others} list the trained parameters in another order than rank 0 "
                "(named_parameters or the optimizer's param_groups), and this step exchanges several "
                "tensors together (group_bytes: by default on accelerators, and on CPU for the sparse "
                "allreduce; or groups=): the ranks would cut them into different groups. Pass the "
                "parameters in the same order on every rank, or group_bytes=0.")

    def _compare_models(self):
        mine = sorted((str(n), tuple(p.shape), str(p.dtype)) for p, n in self._parameter_names.items())
        digest = zlib.crc32(repr(mine).encode())
        if len(set(_gather_objects(digest, "hvd_topk.model_check", self.process_set))) == 1:
            return
        every = _gather_objects(mine, "hvd_topk.model_check.full", self.process_set)
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
        raise RankMismatchError(
            f"hvd_topk: the ranks' models differ: {_first(problems)}. Every rank must build the "
            "same model and pass the same named_parameters (without names, Horovod names "
            "parameters by position, so the order must match too).")

    def _compare_trained(self):
        """The ranks' digests of the trained params differ: find which params, and why."""
        mine = {}  # name -> why this rank does not exchange it
        for group in self.param_groups:
            for p in group["params"]:
                if p not in self._trained_set:
                    mine[self._parameter_names.get(p)] = (
                        "frozen (requires_grad=False)" if not p.requires_grad
                        else "frozen when the optimizer was built (Horovod hooks no such param)")
        in_groups = set(p for g in self.param_groups for p in g["params"])
        for p in self._requires_update - in_groups:
            mine[self._parameter_names.get(p)] = "not in the optimizer's param_groups"
        every = _gather_objects(mine, "hvd_topk.trained_set.full", self.process_set)
        problems = []
        for n in sorted(set().union(*every)):
            out = [r for r, e in enumerate(every) if n in e]
            trained = [r for r, e in enumerate(every) if n not in e]
            if trained:
                why = " / ".join(sorted({every[r][n] for r in out}))
                problems.append(f"{n!r} is {why} on rank(s) {out} but trained on rank(s) {trained}")
        raise RankMismatchError(
            f"hvd_topk: the ranks disagree about which parameters are trained: {_first(problems)}. "
            "Freeze (requires_grad_(False)) and unfreeze the same parameters on every rank, at "
            "the same step, and give every rank the same param_groups.")

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "context after optimizer.synchronize(). This can cause training "
                              "slowdown. You may want to consider using "
                              "optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.", stacklevel=2)
            self._step_sync = True
            try:
                self.synchronize()
            finally:
                self._step_sync = False
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
            return self._wrapped_step(closure)
        # Corrected tensors already carry the optimizer's recurrence (momentum, Adam): hide
        # them from the wrapped optimizer (it skips params without grad), apply them ourselves.
        corrected, self._corrected = self._corrected, set()
        stash = {p: p.grad for p in corrected}
        for p in corrected:
            p.grad = None
        try:
            loss = self._wrapped_step(closure)
        finally:
            for p, g in stash.items():
                p.grad = g
        with torch.no_grad():
            for p, g in stash.items():
                self._correction[p].apply(p, g)
        return loss

    def _wrapped_step(self, closure):
        self._stepping = True
        try:
            return super(self.__class__, self).step(closure)
        finally:
            self._stepping = False

    def state_dict(self):
        """The wrapped optimizer's ``state_dict()`` plus this rank's hvd_topk state.

        With a sparse compressor, ``state_dict()["hvd_topk"]`` (also referenced from the first
        param group, see ``checkpoint.py``) holds this rank's residuals, momentum-correction
        velocities, Adam-correction moments and step counts, warm-up step and sparse-allreduce
        regions, with the world size, ratio and parameters it belongs to: tensors, numbers
        and strings only (``torch.load(weights_only=True)`` reads it). ``load_state_dict``
        takes it back; each rank saving and loading its own file resumes bit-identically.
        The rank-0 recipes (rank 0's file loaded on every rank, or loaded on rank 0 and sent
        with ``hvd.broadcast_optimizer_state``) start every rank from rank 0's hvd_topk state
        (README, "Checkpoints")."""
        if self._sparse:
            self._take_broadcast_state()
        state = super(self.__class__, self).state_dict()
        if not self._sparse:
            return state
        topk = self._compression.state_dict()
        # Show corrected params' state as the wrapped optimizer's entries once it has state
        # on this rank: a fresh rank shows none, so broadcast_optimizer_state initialises it.
        show = bool(state["state"]) or topk["steps"] > 0 or bool(topk["residuals"])
        corrected = []
        for index, p in enumerate(p for g in self.param_groups for p in g["params"]):
            correction = self._correction.get(p)
            if correction is not None and p.requires_grad:
                corrected.append((index, self._parameter_names.get(p), _state_kind(correction), p, show))
        checkpoint.pack_topk_state(state, topk, self._state_meta(), corrected)
        return state

    def load_state_dict(self, state_dict):
        """The wrapped optimizer's state and, if ``state_dict`` holds one, hvd_topk's (see
        ``state_dict``); a state saved at another world size or ratio, or for other
        parameters, raises ``ValueError`` naming what differs, before anything is loaded."""
        wrapped, blob = checkpoint.split_topk_state(state_dict) if self._sparse else (state_dict, None)
        topk = checkpoint.unpack_topk_state(blob, self._state_meta()) if blob is not None else None
        # Horovod's drops pending handles (e.g. after an elastic reset); drop our per-step
        # state with them.
        self._corrected = set()
        self._nonfinite = []
        self._dense_checked = []
        self._scale = None
        self._step_stats = CommStats()
        self._plan_reset()
        self._take_broadcast_state(discard=True)
        _HorovodOptimizer.load_state_dict(self, wrapped)
        if self._sparse:
            # torch's load_state_dict makes new param-group dicts: the corrections must read
            # lr, momentum, betas... from those (the ones schedulers now change).
            self._correction = correction_groups(self, self._compression)
        if topk is not None:
            self._load_blob(blob, topk)

    def _state_meta(self):
        return {"world_size": self.process_set.size(), "rank": self.process_set.rank(),
                "ratio": self._compression.ratio,
                "params": checkpoint.param_shapes((n, p) for p, n in self._parameter_names.items())}

    def _load_blob(self, blob, topk):
        """Load a rank's hvd_topk state; the wrapped optimizer's entries for the params it
        showed (``checkpoint.pack_topk_state``) are dropped: hvd_topk's state is the one used."""
        self._drop_shown(blob)
        self._compression.load_state_dict(topk)
        self._plan_reset()
        self._plan = None
        fresh = not topk["steps"] and not topk["residuals"]  # e.g. broadcast at the start of training
        if self.process_set.rank() == 0 and not self._resume_logged and not fresh:
            self._resume_logged = True
            logger.info("hvd_topk: loaded the hvd_topk state of rank %d of %d (step %d, %d residuals). "
                        "Every rank that loads this state (rank 0's file on every rank, or "
                        "hvd.broadcast_optimizer_state) starts from these residuals, velocities "
                        "and Adam moments: the average owed update is then rank %d's residual, "
                        "not the mean of the ranks' (README, Checkpoints).", blob["rank"],
                        blob["world_size"], topk["steps"], len(topk["residuals"]), blob["rank"])

    def _take_broadcast_state(self, discard=False):
        """Load (or, with ``discard``, drop) the hvd_topk state that ``hvd.broadcast_optimizer_state``
        set as an option of the param groups (``checkpoint.pack_topk_state``): the same on every
        rank, so every rank loads the same, locally, before the step's first exchange."""
        blob = None
        for g in self.param_groups:
            blob = g.pop(checkpoint.STATE_KEY, blob)
        if blob is None:
            return
        if discard:
            self._drop_shown(blob)
            return
        self._load_blob(blob, checkpoint.unpack_topk_state(blob, self._state_meta()))

    def _drop_shown(self, blob):
        """Forget the wrapped optimizer's entries of the params whose state ``blob`` showed in
        their place (a broadcast wrote rank 0's hvd_topk state into them)."""
        params = [p for g in self.param_groups for p in g["params"]]
        for index in blob.get("shown", []):
            self.state.pop(params[index], None)

    def topk_state_dict(self):
        """hvd_topk's own state on this rank (residuals, velocities, Adam moments, step
        counts), or {} for dense training: ``state_dict()["hvd_topk"]["state"]``, without
        the wrapped optimizer's. ``hvd_topk.save_checkpoint`` gathers every rank's;
        ``hvd.elastic.TorchState`` keeps it per rank."""
        return self._compression.state_dict() if self._sparse else {}

    def load_topk_state_dict(self, state):
        if state:
            self._compression.load_state_dict(state)

    def sync_topk_state(self, root_rank=0):
        """Make the ranks agree after a membership change (Horovod Elastic): the step count
        (it sets the warm-up ratio, hence ``k``) comes from ``root_rank``; the sparse
        allreduce's regions restart equal. Residuals stay per rank: a rank that joins starts
        with none, a rank that left takes its own with it."""
        comp = self._compression
        if self._sparse:
            # Horovod's sync broadcast rank 0's hvd_topk state too: residuals stay per rank.
            self._take_broadcast_state(discard=True)
            comp.resync(broadcast_object(comp.steps, root_rank=root_rank, name="hvd_topk.sync.steps"),
                        self.process_set.size())
            self._check_model = True  # a new rank may have joined: compare models again


_HELD = object()  # the handle of a gradient that clip_grad_norm holds until the step's last one


def clip_factor(grads, max_norm, scale=1.0):
    """``torch.nn.utils.clip_grad_norm_``'s factor ``min(1, max_norm / (norm + 1e-6))`` for the
    total 2-norm of the unscaled gradients ``grads / scale`` (``scale``: the loss scale, a
    float or a 0-dim device tensor), as a 0-dim tensor on the device: nothing is read back.
    Where the norm is not finite the factor is 1, so that the non-finite check still finds
    (and names) the tensor that holds the NaN/Inf."""
    flat = [g.coalesce().values() if g.is_sparse else g for g in grads]
    flat = [torch.view_as_real(g) if g.is_complex() else g for g in flat]
    total = torch.nn.utils.get_total_norm(flat)  # (,) on the first gradient's device
    if isinstance(scale, torch.Tensor):
        total = total / scale.to(total.device)
    elif scale != 1.0:
        total = total / scale
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    return torch.where(torch.isfinite(total), coef, torch.ones_like(coef))


def _state_kind(correction):
    """Which wrapped-optimizer state a correction's hvd_topk state stands for."""
    if isinstance(correction, AdamCorrection):
        return ("adam", bool(correction.group.get("amsgrad", False)))
    return ("momentum", False)


def _with_step_guard(base):
    """``base`` (the wrapped optimizer's class) with a ``step`` that, called from outside
    ``hvd_topk``'s own ``step()``, leaves the parameters as they were.

    ``hvd.broadcast_optimizer_state`` does that call: on a rank whose optimizer has no state
    yet it sets zero gradients and calls the wrapped class's ``step`` to create the state.
    With weight decay that step would move the parameters of those ranks only (AdamW's
    ``p *= 1 - lr * wd``), and after a resume the ranks would differ."""
    def step(self, closure=None):
        inner = super(guarded, self).step
        if self._stepping:
            return inner(closure)
        with torch.no_grad():
            saved = [(p, p.detach().clone()) for g in self.param_groups for p in g["params"]]
            try:
                return inner(closure)
            finally:
                for p, value in saved:
                    p.copy_(value)
    guarded = type(base.__name__, (base,), {"step": step, "__doc__": base.__doc__})
    return guarded


def _check_groups(groups):
    """Horovod's checks of ``groups``, with the offending value named."""
    if groups is None:
        return
    if isinstance(groups, bool) or not (isinstance(groups, list) or (isinstance(groups, int) and groups > 0)):
        raise ValueError(f"groups should be a positive integer or a list of lists of torch.Tensor, "
                         f"got {groups!r}")
    if isinstance(groups, list):
        seen = set()
        for members in groups:
            for p in members:
                if not isinstance(p, torch.Tensor):
                    raise ValueError(f"groups must consist of torch.Tensor, got {type(p).__name__}")
                if id(p) in seen:
                    raise ValueError("A parameter can only appear once in groups (a tensor of "
                                     f"shape {tuple(p.shape)} appears twice).")
                seen.add(id(p))


def _first(problems, n=8):
    return "; ".join(problems[:n]) + (f"; and {len(problems) - n} more" if len(problems) > n else "")


def _gather_objects(obj, name, process_set):
    """Horovod's ``allgather_object`` over ``process_set``: every member's picklable ``obj``."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = mpi_ops.allgather(torch.tensor([data.numel()]), name=f"{name}.sz",
                              process_set=process_set).tolist()
    gathered = mpi_ops.allgather(data, name=f"{name}.t", process_set=process_set).numpy().tobytes()
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [pickle.loads(gathered[a:b]) for a, b in zip(offsets, offsets[1:])]


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
    _check_groups(groups)
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
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if clip_grad_norm is not None and not (sparse and float(clip_grad_norm) > 0):
        raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}" if sparse else
                         "clip_grad_norm needs a sparse compressor (hvd_topk.TopKCompressor); with "
                         "Horovod's compressors p.grad after synchronize() is the averaged gradient: "
                         "clip it there")
    if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")

    attrs = dict(_HorovodOptimizer.__dict__)
    attrs.update({k: v for k, v in _TopKMethods.__dict__.items()
                  if k not in ("__dict__", "__weakref__", "__module__", "__qualname__")})
    attrs["__doc__"] = optimizer.__class__.__doc__
    base = _with_step_guard(optimizer.__class__) if sparse else optimizer.__class__
    cls = type(optimizer.__class__.__name__, (base, TopKDistributedOptimizer), attrs)
    wrapped = cls(optimizer.param_groups, named_parameters, compression, backward_passes_per_step,
                  op, gradient_predivide_factor, groups, sparse_as_dense, process_set, log_every,
                  grad_scaler, nonfinite, None if clip_grad_norm is None else float(clip_grad_norm))
    if sparse and mpi_ops.rank() == 0:
        logger.info("hvd_topk: %r over %d ranks", compression, process_set.size())
    return wrapped

"""The collectives of a sparse step: launching each group's compress and send during
backward, bounding the payloads in flight, and ``synchronize()``'s protocol -- wait, scatter,
one check of every flag (the step's one host sync), the rare redo, and the write-back of
the averaged gradients."""

from __future__ import annotations

import time

from horovod.torch import mpi_ops

from .compression import DenseFormContext, RankMismatchError
from .dense_batch import DenseBatch, InDenseBatch
from .exchange import sparse_allgather_async, sparse_alltoall_async
from .plan import InGroup
from .selection import segment_views, stacked_probe

__all__ = ["StepExchange"]


class StepExchange:
    """Owns a sparse step's exchange state: the groups in flight (and their bytes), the
    params left dense whose gradients the check probes, and those whose sparse gradient was
    densified (``sparse_as_dense``). It talks to the compressor through ``SparseCompressor``.

    Per step: ``send_dense`` for each gradient left dense and ``densified`` for a sparse one
    made dense, ``launch_if_complete`` for a group once its gradients are ready (the
    backward hooks); in synchronize(), ``receive`` each of Horovod's handles, ``gather`` the groups,
    then ``check`` (returns the non-finite gradients found), or ``drain`` after a
    ``RankMismatchError``; ``end_step()``.
    """

    def __init__(self, compressor, process_set, op, gradient_predivide_factor, counter,
                 loss_scale, corrections):
        self._comp = compressor
        self._process_set = process_set
        self._op = op
        self._predivide = gradient_predivide_factor
        self._counter = counter  # CommCounter
        self._loss_scale = loss_scale  # LossScale
        self._corrections = corrections  # CorrectionSet
        self._dense_checked = []  # params a sparse compressor left dense this step
        self._resparsify = []  # params whose sparse grad was densified (sparse_as_dense)
        self._in_flight = []  # (group, gathered bytes) allgathered this step, not yet scattered
        self._in_flight_bytes = 0
        self._owners = []  # (group, rows' bytes): sparse allreduces before their phase 2
        self._owners_bytes = 0
        self._batch = DenseBatch(self._grouped_allreduce_async)  # the small dense gradients

    def densified(self, p):
        """``p``'s sparse gradient was made dense: made sparse again at the end of the step."""
        self._resparsify.append(p)

    def send_dense(self, p, grad, name, planner=None):
        """Horovod's dense path, with its pre/post-scaling for ``gradient_predivide_factor``,
        for a gradient a sparse compressor leaves dense (Horovod's own would call compress());
        ``(handle, ctx)``. Its values are checked with the step's flags. The plan's small
        dense params (``planner.small_dense``) are sent as one batch (``dense_batch.py``)."""
        self._dense_checked.append(p)
        # complex, bfloat16 or not contiguous: sent in a form Horovod takes
        ctx = DenseFormContext(grad.dtype) if DenseFormContext.needed(grad) else None
        tensor = DenseFormContext.form(grad) if ctx is not None else grad
        if planner is not None and self._op in (mpi_ops.Average, mpi_ops.Sum):
            self._batch.plan(planner.small_dense)
            if self._batch.holds(p):
                return self._batch.take(p, tensor, name), ctx
        return self._allreduce_async(tensor, name), ctx

    def _scaling(self):
        if self._op == mpi_ops.Average:
            return {"prescale_factor": 1.0 / self._predivide, "postscale_factor": self._predivide}
        return {"prescale_factor": 1.0, "postscale_factor": 1.0}

    def _allreduce_async(self, tensor, name):
        return mpi_ops.allreduce_async_(tensor, name=name, op=self._op, process_set=self._process_set,
                                        **self._scaling())

    def _grouped_allreduce_async(self, tensors, name):
        return mpi_ops.grouped_allreduce_async_(tensors, name=name, op=self._op,
                                                process_set=self._process_set, **self._scaling())

    def launch_if_complete(self, group, optimizer_state, budget):
        """Compress ``group`` and start its exchange once all its gradients are ready
        (``optimizer_state``: the wrapped optimizer's, for the corrections' start; ``budget``:
        the plan's in-flight budget)."""
        if not group.complete:
            return
        t0 = time.perf_counter()
        comp = self._comp
        world = self._process_set.size()
        kwargs = {}
        if group.correction is not None:
            for p, name in zip(group.params, group.names):
                group.correction.start(name, optimizer_state.get(p, {}), comp)
            kwargs = group.correction.compress_kwargs()
        # consumed: the result overwrites the gradients (their own storage, or views of a new
        # buffer), so step 1 may clean them in place instead of in a copy of each.
        payload, ctx = comp.compress_group([group.ready[p] for p in group.params], group.names,
                                           scale=self._loss_scale.get(), world=world,
                                           exchange=group.exchange,
                                           divisor=world if self._op == mpi_ops.Average else 1,
                                           consumed=True, **kwargs)  # (nbytes,) uint8
        if group.exchange == "sparse_allreduce":
            # Phase 1 now (it overlaps the rest of backward); phase 2 in synchronize().
            group.launched(ctx, alltoall=sparse_alltoall_async(payload, world, name=group.name(),
                                                               process_set=self._process_set))
        else:
            group.launched(ctx, allgather=sparse_allgather_async(payload, name=group.name(),
                                                                 process_set=self._process_set))
        self._counter.sparse(ctx.traffic(), group.exchange, len(group.params))
        if group.correction is not None:
            self._corrections.sent(group.params)
        self._counter.add_ms("compress_ms", t0)
        if group.exchange == "allgather":
            self._bound_in_flight(group, (world + 1) * payload.numel(), budget)  # gathered + sent
        else:
            self._owners.append((group, 2 * payload.numel()))  # sent + received
            self._owners_bytes += 2 * payload.numel()
            self._advance(budget)

    def _advance(self, budget):
        """The in-flight bound of the sparse allreduce: while the rows of the groups before
        their phase 2 (sent and received, ``2 P`` rows each) exceed the budget, wait for the
        oldest group's alltoall and run its phase 2 now, so that its rows leave during backward.
        Every rank takes the same decisions (from the same byte counts). Deciding on what one
        rank has received (``poll``) would let the ranks start a step's collectives in
        different orders; with a blocking collective of the user's between backward and
        ``synchronize()``, Horovod then hangs."""
        while len(self._owners) > 1 and self._owners_bytes > budget:
            group, nbytes = self._owners.pop(0)
            self._owners_bytes -= nbytes
            self._phase_two(group)

    def _phase_two(self, group):
        """Wait for ``group``'s alltoall, sum this rank's region (the owner step) and start the
        allgather of the owners' rows."""
        row = self._comp.reduce_regions(self.wait(group.alltoall), group.ctx)
        group.phase_two(sparse_allgather_async(row, name=group.name(".sar"), process_set=self._process_set))

    def _bound_in_flight(self, group, gathered_bytes, budget):
        """Keep the payloads of a step, sent and gathered, within a budget (an eighth of the
        trained parameters' bytes, at most 32 MiB, at least 1 MiB): past it, wait for the oldest groups'
        allgathers and scatter them now, so that Horovod lets their buffers go during backward
        instead of all waiting for synchronize(). At the warm-up's high ratios they would
        otherwise weigh about ``(world + 1) * ratio * 2`` times the model; at 1% the budget is
        rarely reached. Every rank takes the same decisions (from the same byte counts)."""
        self._in_flight.append((group, gathered_bytes))
        self._in_flight_bytes += gathered_bytes
        while len(self._in_flight) > 1 and self._in_flight_bytes > budget:
            oldest, nbytes = self._in_flight.pop(0)
            self._in_flight_bytes -= nbytes
            gathered = oldest.allgather()
            oldest.hold(gathered)
            try:
                self._comp.scatter(gathered, oldest.ctx, _own_storage(oldest))
            except RankMismatchError:
                continue  # raised again by synchronize(), where every rank handles it alike
            self._written(oldest)
            oldest.mark_scattered()

    def wait(self, handle):
        """Wait for a collective (a callable handle or Horovod's), counted in ``collective_ms``."""
        t0 = time.perf_counter()
        output = handle() if callable(handle) else mpi_ops.synchronize(handle)
        self._counter.add_ms("collective_ms", t0)
        return output

    def receive(self, p, handle, ctx):
        """``p``'s entry in Horovod's handles: a dense allreduce is waited for and its result
        written to ``p.grad`` (no check, no sync); a gradient in a group returns the group."""
        if handle is None:
            return None  # its hook ran, but it is not trained this step: not exchanged
        if isinstance(handle, InGroup):
            return handle.group
        output = handle.batch.output(p, self.wait) if isinstance(handle, InDenseBatch) else self.wait(handle)
        if p.grad.is_sparse:
            p.grad.zero_().add_(self._comp.decompress(output, ctx))
        else:
            p.grad.set_(self._comp.decompress(output, ctx))  # dense: no check, no sync
        return None

    def gather(self, groups):
        """Finish every group's exchange: the sparse allreduce's phase 2 (sum at the owners,
        allgather) where backward has not started it, then wait and scatter each group (no
        host sync)."""
        comp = self._comp
        for group in groups:
            if group.exchange == "sparse_allreduce" and group.allgather is None:
                self._phase_two(group)
        self._owners, self._owners_bytes = [], 0
        for group in groups:
            if not group.scattered:
                gathered = group.gathered if group.gathered is not None else self.wait(group.allgather)
                t_scatter = time.perf_counter()
                comp.scatter(gathered, group.ctx, _own_storage(group))
                self._written(group)
                self._counter.add_ms("scatter_ms", t_scatter)

    def _written(self, group):
        """``group``'s result is scattered: its gradients become views of it, and a lone
        corrected gradient's written positions go to the corrections (its sparse apply)."""
        _write_back(group)
        if len(group.params) == 1:
            self._corrections.scattered(group.params[0], group.ctx.touched)

    def check(self, groups, names):
        """One ``check`` of every flag of the step -- its one host sync -- and the rare redo
        of an inexact selection (into the buffer the gradients already view). Returns the
        non-finite gradients found: ``(name, ranks or None)`` (``names``: param -> name)."""
        comp = self._comp
        t_check = time.perf_counter()
        dense, self._dense_checked = self._dense_checked, []
        probe = stacked_probe([p.grad for p in dense])
        redo, dense_bad = comp.check([g.ctx for g in groups], probe)  # the step's one host sync
        self._counter.add_ms("check_ms", t_check)
        by_ctx = {id(g.ctx): g for g in groups}
        while redo:  # an unlucky sample somewhere (rare): exchange those groups again, exactly
            for ctx in redo:
                name = by_ctx[id(ctx)].name(".redo")
                payload = comp.redo(ctx)
                if ctx.exchange == "sparse_allreduce":
                    received = sparse_alltoall_async(payload, ctx.regions.world, name=name,
                                                     process_set=self._process_set)()
                    payload, name = comp.reduce_regions(received, ctx), name + ".sar"
                gathered = mpi_ops.allgather(payload, name=name, process_set=self._process_set)
                comp.scatter(gathered, ctx, ctx.out)
            redo, _ = comp.check(redo)
        for p in self._resparsify:
            p.grad = p.grad.to_sparse()  # sparse_as_dense: back to sparse, as Horovod does
        found = comp.pop_nonfinite()
        return found + [(names.get(p), None) for p, bad in zip(dense, dense_bad) if bad]

    def drain(self, handles, groups):
        """After a ``RankMismatchError`` in the exchange: wait for the step's other
        collectives (``handles``: the ``(handle, ctx)`` pairs Horovod's hooks stored;
        ``groups``: the plan's), failures ignored, so that no rank leaves while another still
        needs it and every rank reports the same error."""
        waits = [h for h, _ in handles if not isinstance(h, (InGroup, InDenseBatch))]
        waits += self._batch.pending()
        waits += [g.pending for g in groups if g.pending is not None]
        for handle in waits:
            try:
                handle() if callable(handle) else mpi_ops.synchronize(handle)
            except Exception:  # already consumed, or the collective itself failed
                pass

    def end_step(self):
        """The step is over (or abandoned): nothing in flight, nothing to make sparse again."""
        self._in_flight, self._in_flight_bytes = [], 0
        self._owners, self._owners_bytes = [], 0
        self._resparsify = []
        self._batch.reset()

    def discard(self):
        """A state was loaded mid-step: forget the dense params to check too."""
        self._dense_checked = []


def _write_back(group):
    """Make a group's gradients views of the buffer its result was scattered into, right after
    the scatter: the gradients' former storage is let go group by group, so that a step never
    holds every group's result beside every local gradient (one more copy of the model)."""
    for p, view in zip(group.params, segment_views(group.ctx.out, group.ctx.layout)):
        if view.data_ptr() != p.grad.data_ptr():  # else it is the gradient's own storage
            p.grad.set_(view.view(p.grad.shape))


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

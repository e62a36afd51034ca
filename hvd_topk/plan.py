"""Group planning: which trained parameters a step sends sparsely, and in which groups.

The plan is the same on every rank: it depends on the parameters trained this step, the
ratio in force and the world size, and is rebuilt only when one of them changes. Params are
taken in reverse registration order (about the order backward produces them) and cut into
groups of one device, dtype, correction and exchange: of the compressor's ``group_bytes``
each, or as the optimizer's ``groups`` argument says.
"""

from __future__ import annotations

import logging
import zlib

import torch
from horovod.common.util import split_list
from horovod.torch import mpi_ops

from .dense_batch import SMALL_DENSE_BYTES
from .exchange import EXCHANGES, ring_allreduce_bytes
from .layout import group_runs
from .settings import in_flight_budget

__all__ = ["Group", "InGroup", "Planner", "check_user_groups"]

# The optimizer's logger: the plan's line keeps the name users configure.
logger = logging.getLogger("hvd_topk.optimizer")


class Group:
    """Gradients compressed and exchanged together in one step (see ``TopKCompressor``'s
    ``group_bytes``): the group is compressed in the backward hook of its last gradient.

    Its members (``params``, ``names``), ``exchange`` and ``correction`` come from the plan.
    Per step it holds the gradients ready to compress (``take``), then, once ``launched``, the
    compressor's ``ctx`` and the handles of its collectives: ``alltoall`` (the sparse
    allreduce's phase 1, waiting for the rows received) and ``allgather`` (waiting for the
    gathered payloads: the allgather exchange, or the sparse allreduce's phase 2, set by
    ``phase_two``); where the in-flight bound waited for it during backward, its ``gathered``
    payload (``hold``) or that it is ``scattered`` already. ``reset`` at the step's end.
    """

    def __init__(self, key):
        self.key = key  # (device, dtype, correction key, exchange): one pipeline run each
        self.exchange = key[3]  # "allgather" or "sparse_allreduce"
        self.correction = None  # its params' MomentumCorrection / AdamCorrection, or None
        self.params = []
        self.names = []
        self.ready = {}  # param -> the gradient to compress (this step)
        self.ctx = None  # the compressor's SparseContext, once compressed
        self.alltoall = None  # the sparse allreduce's phase 1: wait() -> the received rows
        self.allgather = None  # wait() -> the gathered payloads, once launched
        self.gathered = None  # its result, once waited for (see StepExchange's in-flight bound)
        self.scattered = False  # scattered during backward already (see the in-flight bound)

    def add(self, p, name, correction):
        """Plan ``p`` (named ``name``, with its ``correction`` or None) into the group."""
        self.params.append(p)
        self.names.append(name)
        self.correction = correction

    def drop(self, p):
        """Take ``p`` out of the group (its gradient goes another way this step)."""
        i = next(i for i, q in enumerate(self.params) if q is p)  # identity, not tensor ==
        del self.params[i], self.names[i]

    def name(self, suffix=""):
        """The name of the group's collectives."""
        if len(self.names) == 1:
            return f"{self.names[0]}.topk{suffix}"
        return f"{self.names[0]}+{len(self.names) - 1}.topk{suffix}"

    def take(self, p, grad):
        """``grad``, this step's gradient of ``p``, is ready to compress."""
        self.ready[p] = grad

    @property
    def complete(self):
        """Every gradient is ready and the group is not sent yet."""
        return (self.alltoall is None and self.allgather is None and bool(self.params)
                and len(self.ready) >= len(self.params))

    def launched(self, ctx, *, alltoall=None, allgather=None):
        """Compressed (``ctx``) and sent: the handle of its first collective."""
        self.ctx, self.alltoall, self.allgather = ctx, alltoall, allgather

    def phase_two(self, allgather):
        """The sparse allreduce's phase 2 is sent: the allgather of the owners' rows."""
        self.allgather = allgather

    @property
    def pending(self):
        """The handle of its latest collective (None if not sent): what a step abandoned
        after an error still waits for, so that every rank leaves the same collectives."""
        return self.allgather if self.allgather is not None else self.alltoall

    def hold(self, gathered):
        """Its gathered payloads, waited for during backward (the in-flight bound)."""
        self.gathered = gathered

    def mark_scattered(self):
        """Scattered during backward: synchronize() has nothing left to do for it."""
        self.gathered, self.scattered = None, True

    def reset(self):
        """The step is over: forget its gradients, context and handles."""
        self.ready.clear()
        self.ctx = self.alltoall = self.allgather = self.gathered = None
        self.scattered = False


class InGroup:
    """The handle Horovod's hook stores for a gradient that travels in a group."""

    __slots__ = ("group",)

    def __init__(self, group):
        self.group = group


class Planner:
    """Owns the plan of the sparse exchange: the params trained this step (``trained``,
    ``trained_set``), param -> ``Group`` for those sent sparsely (``plan``), the digest of its
    groups that the ranks compare (``groups_digest``) and the in-flight budget (``budget``).

    Per step: ``plan_step`` once (the step's first hook, or synchronize()), ``drop(p)`` for a
    gradient that cannot go sparse after all, ``end_step()``; ``forget()`` after a state is
    loaded (the next step plans again).
    """

    def __init__(self, compressor, names, user_groups):
        self._comp = compressor
        self._names = names  # param -> name (Horovod's)
        self._user_groups = user_groups  # the ``groups`` argument, or None
        self.plan = None  # param -> Group for this step's sparse gradients
        self._key = None
        self._logged = set()  # (world, exchange counts) already logged
        self.planned = False  # the plan of the step in progress is known
        self.trained = []  # this step's exchanged params: updated by the optimizer, requires_grad
        self.trained_set = frozenset()
        self.groups_digest = 0  # crc32 of the plan's groups of several tensors (their names)
        self.budget = 0  # the in-flight budget (see StepExchange)
        self.small_dense = ()  # the params left dense sent as one batch (dense_batch.py), by name

    def plan_step(self, param_groups, requires_update, world, corrections):
        """Param -> ``Group`` for the gradients sent sparsely this step, the same on every
        rank. Params are taken in reverse registration order (about the order backward
        produces them) and cut into groups of one device, dtype, correction and exchange: of
        ``group_bytes`` each, or as the user groups say.

        Arguments:
            param_groups: the wrapped optimizer's param groups (the params it updates).
            requires_update: the params Horovod hooked.
            world: the world size.
            corrections: the optimizer's ``CorrectionSet`` (``get(p)``: ``p``'s correction or None).
        """
        comp = self._comp
        trained = self._trained_of_step(param_groups, requires_update)
        key = (world, comp.current_ratio(), self.trained_set)
        self.planned = True
        if self.plan is not None and self._key == key:
            return self.plan
        user_group = self._user_group_index(trained)
        trained_bytes = sum(p.numel() * p.element_size() for p in trained)
        kinds = {p: "dense" if p.is_complex() else comp.exchange_for(p, world, trained_bytes)
                 for p in trained}
        sparse = [p for p in reversed(trained) if kinds[p] != "dense"]
        # In name order: names, not the order of registration, pair the ranks' tensors.
        self.small_dense = tuple(sorted((p for p in trained if kinds[p] == "dense"
                                         and p.numel() * p.element_size() <= SMALL_DENSE_BYTES),
                                        key=lambda p: self._names.get(p) or ""))

        def gkey(p):
            correction = corrections.get(p)
            return (p.device, p.dtype, correction.key() if correction else None, kinds[p])

        if user_group is not None:
            by_user_group = {}
            for p in sparse:
                by_user_group.setdefault((user_group[p], gkey(p)), []).append(p)
            runs = list(by_user_group.values())
        else:
            runs = group_runs(sparse, lambda p: p.numel() * p.element_size(), gkey,
                              lambda p: comp.group_bytes(p.device, kinds[p], trained_bytes))
        groups = []
        for run in runs:
            groups.append(Group(gkey(run[0])))
            for p in run:
                groups[-1].add(p, self._names.get(p), corrections.get(p))
        self.plan = {p: g for g in groups for p in g.params}
        self._key = key
        self.budget = in_flight_budget(trained_bytes)
        self.groups_digest = zlib.crc32("|".join("\n".join(g.names) for g in groups
                                                 if len(g.params) > 1).encode()) & 0x7FFFFFFF
        self._log(kinds, world)
        return self.plan

    def _trained_of_step(self, param_groups, requires_update):
        """The params exchanged this step: those the wrapped optimizer updates (in its
        ``param_groups``) that Horovod hooked (``requires_update``) and that still require
        grad. A frozen param (``requires_grad=False``) or one removed from the param groups
        takes no part: its ``.grad`` is left alone and its residual and velocity are kept for
        later. Which params these are decides which collectives a rank joins, so every rank
        must agree (``ModelAgreement``)."""
        trained = [p for g in param_groups for p in g["params"] if p in requires_update and p.requires_grad]
        self.trained, self.trained_set = trained, frozenset(trained)
        return trained

    def _user_group_index(self, trained):
        """Param -> the index of its user group (the optimizer's ``groups`` argument; a param
        in no list is a user group of its own, as in Horovod; an int ``n`` cuts the trained
        params, in registration order, into ``n`` runs as Horovod's ``split_list`` does), or
        None without user groups."""
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

    def _log(self, kinds, world):
        """Log, once per (world size, choice), which exchange each tensor takes and the bytes
        the model predicts for the step (rank 0, INFO)."""
        count = {e: sum(1 for k in kinds.values() if k == e) for e in EXCHANGES}
        key = (world, tuple(count.values()))
        if key in self._logged or mpi_ops.rank() != 0 or not logger.isEnabledFor(logging.INFO):
            return
        self._logged.add(key)
        comp = self._comp
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

    def drop(self, p):
        """``p``'s gradient cannot go sparse this step (a sparse or mixed-dtype gradient):
        out of its group, which is returned (its other gradients may all be ready)."""
        group = self.plan[p]
        group.drop(p)
        self.plan[p] = None
        return group

    def groups(self):
        """The groups of the current plan (a param dropped from its group maps to None)."""
        return set(g for g in (self.plan or {}).values() if g is not None)

    def end_step(self):
        """The step is over: its groups forget their gradients; the next step plans again
        (``plan_step`` keeps the plan where nothing it depends on changed)."""
        for group in self.groups():
            group.reset()
        self.planned = False

    def forget(self):
        """A state was loaded: the next step makes a new plan."""
        self.plan = None


def check_user_groups(groups):
    """Horovod's checks of its ``groups=`` argument (the user groups), with the offending
    value named."""
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

"""The optimizer's state: ``state_dict()`` and ``load_state_dict()`` with this rank's hvd_topk
state in them, the copy of rank 0's that ``hvd.broadcast_optimizer_state`` brings, and the
ranks' agreement after a membership change (Horovod Elastic).

``RankState`` owns the hvd_topk state's way into and out of the wrapped optimizer's
(``checkpoint.pack_topk_state`` / ``unpack_topk_state``). ``StateMethods`` are the optimizer's
state methods: ``hvd_topk.DistributedOptimizer`` composes the class it returns from them,
Horovod's ``_DistributedOptimizer`` and ``optimizer.py``'s hook, ``synchronize()`` and ``step()``.
``with_step_guard`` keeps ``hvd.broadcast_optimizer_state``'s state-creating step from moving
the parameters.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import torch
from horovod.torch import optimizer as _hvd_optimizer
from horovod.torch.functions import broadcast_object

from .checkpoint import STATE_KEY, param_shapes, pack_topk_state, split_topk_state, unpack_topk_state

__all__ = ["TopKDistributedOptimizer", "RankState", "StateMethods", "with_step_guard"]

# The optimizer's logger: the resume line keeps the name users configure.
logger = logging.getLogger("hvd_topk.optimizer")


class TopKDistributedOptimizer:
    """Marker base of every optimizer ``hvd_topk.DistributedOptimizer`` returns.

    ``isinstance(opt, hvd_topk.TopKDistributedOptimizer)`` tells them apart from Horovod's;
    ``hvd.elastic.TorchState`` uses it to commit and restore their hvd_topk state too
    (``hvd_topk/elastic.py``).
    """


class RankState:
    """Owns how this rank's hvd_topk state (the compressor's ``state_dict()``) travels with
    the wrapped optimizer's state: into ``optimizer.state_dict()`` (``pack``), out of a state
    being loaded (``split``, checked before anything is loaded; ``load``), and out of the
    param groups, where ``hvd.broadcast_optimizer_state`` puts rank 0's (``take_broadcast``).

    Arguments:
        compressor: the optimizer's ``SparseCompressor``.
        process_set: the optimizer's Horovod process set (the world size and rank saved).
        names: param -> name (Horovod's ``named_parameters``).
    """

    def __init__(self, compressor, process_set, names) -> None:
        self._comp = compressor
        self._process_set = process_set
        self._names = names
        self._resume_logged = False  # the resume line is logged once

    def meta(self) -> Dict[str, Any]:
        """What a state belongs to: world size, rank, ratio and ``param_shapes``."""
        return {"world_size": self._process_set.size(), "rank": self._process_set.rank(),
                "ratio": self._comp.ratio,
                "params": param_shapes((n, p) for p, n in self._names.items())}

    def pack(self, state: Dict[str, Any], param_groups, corrections) -> Dict[str, Any]:
        """``state`` (the wrapped optimizer's ``state_dict()``) with this rank's hvd_topk state
        added (``pack_topk_state``); ``corrections``: the optimizer's ``CorrectionSet``."""
        topk = self._comp.state_dict()
        # Show corrected params' state as the wrapped optimizer's entries once it has state
        # on this rank: a fresh rank shows none, so broadcast_optimizer_state initialises it.
        show = bool(state["state"]) or topk["steps"] > 0 or bool(topk["residuals"])
        corrected = []
        for index, p in enumerate(p for g in param_groups for p in g["params"]):
            correction = corrections.get(p)
            if correction is not None and p.requires_grad:
                corrected.append((index, self._names.get(p), correction.state_kind(), p, show))
        pack_topk_state(state, topk, self.meta(), corrected)
        return state

    def split(self, state_dict: Dict[str, Any]):
        """``(the wrapped optimizer's state, hvd_topk's blob or None, its compressor state or
        None)`` of a state being loaded; a state saved at another world size or ratio, or for
        other parameters, raises ``ValueError`` naming what differs."""
        wrapped, blob = split_topk_state(state_dict)
        return wrapped, blob, self.unpack(blob) if blob is not None else None

    def unpack(self, blob: Dict[str, Any]) -> Dict[str, Any]:
        """The compressor state in ``blob``, checked against this run (``unpack_topk_state``)."""
        return unpack_topk_state(blob, self.meta())

    @staticmethod
    def take_broadcast(param_groups) -> Optional[Dict[str, Any]]:
        """Remove and return the blob ``hvd.broadcast_optimizer_state`` set as an option of
        the param groups (``pack_topk_state``), or None: the same on every rank."""
        blob = None
        for g in param_groups:
            blob = g.pop(STATE_KEY, blob)
        return blob

    def load(self, blob: Dict[str, Any], topk: Optional[Dict[str, Any]], param_groups,
             optimizer_state) -> None:
        """Forget the wrapped optimizer's entries (in ``optimizer_state``) of the params whose
        state ``blob`` showed in their place, then load ``topk``, the compressor state of
        ``blob`` (None: drop only): hvd_topk's state is the one used."""
        params = [p for g in param_groups for p in g["params"]]
        for index in blob.get("shown", []):
            optimizer_state.pop(params[index], None)
        if topk is None:
            return
        self._comp.load_state_dict(topk)
        fresh = not topk["steps"] and not topk["residuals"]  # e.g. broadcast at the start of training
        if self._process_set.rank() == 0 and not self._resume_logged and not fresh:
            self._resume_logged = True
            logger.info(
                "hvd_topk: loaded the hvd_topk state of rank %d of %d (step %d, %d residuals). "
                "Every rank that loads this state (rank 0's file on every rank, or "
                "hvd.broadcast_optimizer_state) starts from these residuals, velocities "
                "and Adam moments: the average owed update is then rank %d's residual, "
                "not the mean of the ranks' (docs/checkpoints.md).", blob["rank"],
                blob["world_size"], topk["steps"], len(topk["residuals"]), blob["rank"])


class StateMethods:
    """The state methods of the optimizers ``hvd_topk.DistributedOptimizer`` returns (merged
    into their class as Horovod's ``_DistributedOptimizer`` methods are).

    They are methods of the same object as ``optimizer.py``'s and use its parts: ``_sparse``
    (a sparse compressor), ``_compression``, ``_rank_state`` (``RankState``), ``_corrections``
    (``CorrectionSet``), ``_agreement`` (``ModelAgreement``), and to drop the step in progress
    when a state is loaded, ``_discard_step()`` and ``_forget_plan()``.
    """

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
        (docs/checkpoints.md)."""
        if self._sparse:
            self._take_broadcast_state()
        state = super(self.__class__, self).state_dict()
        if not self._sparse:
            return state
        return self._rank_state.pack(state, self.param_groups, self._corrections)

    def load_state_dict(self, state_dict):
        """The wrapped optimizer's state and, if ``state_dict`` holds one, hvd_topk's (see
        ``state_dict``); a state saved at another world size or ratio, or for other
        parameters, raises ``ValueError`` naming what differs, before anything is loaded."""
        wrapped, blob, topk = (self._rank_state.split(state_dict) if self._sparse
                               else (state_dict, None, None))
        # Horovod's drops pending handles (e.g. after an elastic reset); drop our per-step
        # state with them.
        self._discard_step()
        self._take_broadcast_state(discard=True)
        _hvd_optimizer._DistributedOptimizer.load_state_dict(self, wrapped)
        if self._sparse:
            # torch's load_state_dict makes new param-group dicts: the corrections must read
            # lr, momentum, betas... from those (the ones schedulers now change).
            self._corrections.rebuild(self, self._compression)
        if topk is not None:
            self._load_blob(blob, topk)

    def _take_broadcast_state(self, discard=False):
        """Load (or, with ``discard``, drop) the hvd_topk state that ``hvd.broadcast_optimizer_state``
        set as an option of the param groups (``checkpoint.pack_topk_state``): the same on every
        rank, so every rank loads the same, locally, before the step's first exchange."""
        blob = self._rank_state.take_broadcast(self.param_groups)
        if blob is not None:
            self._load_blob(blob, None if discard else self._rank_state.unpack(blob))

    def _load_blob(self, blob, topk):
        """Load a rank's hvd_topk state ``topk`` (None: none); the wrapped optimizer's entries
        for the params it showed (``checkpoint.pack_topk_state``) are dropped either way."""
        self._rank_state.load(blob, topk, self.param_groups, self.state)
        if topk is not None:
            self._forget_plan()

    def topk_state_dict(self):
        """hvd_topk's own state on this rank (residuals, velocities, Adam moments, step
        counts), or {} for dense training: ``state_dict()["hvd_topk"]["state"]``, without
        the wrapped optimizer's. ``hvd_topk.save_checkpoint`` gathers every rank's;
        ``hvd.elastic.TorchState`` keeps it per rank."""
        return self._compression.state_dict() if self._sparse else {}

    def load_topk_state_dict(self, state):
        """Load what ``topk_state_dict()`` returned (nothing for an empty ``state``)."""
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
            self._agreement.recheck()  # a new rank may have joined: compare models again


def with_step_guard(base):
    """``base`` (the wrapped optimizer's class) with a ``step`` that, called from outside
    ``hvd_topk``'s own ``step()``, leaves the parameters as they were.

    ``hvd.broadcast_optimizer_state`` does that call: on a rank whose optimizer has no state
    yet it sets zero gradients and calls the wrapped class's ``step`` to create the state.
    With weight decay that step would move the parameters of those ranks only (AdamW's
    ``p *= 1 - lr * wd``), and after a resume the ranks would differ."""
    def step(self, closure=None):
        """The wrapped optimizer's step; from outside hvd_topk's ``step()``, undone."""
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

"""The ranks' agreement on the model and on the parameters trained this step.

A parameter that some ranks exchange and others do not would wait forever for the others'
collective, so before ``synchronize()`` waits on anything every rank learns whether all hold
the same model and train the same parameters, and all raise the same ``RankMismatchError``
if not.
"""

from __future__ import annotations

import pickle
import zlib

import torch
from horovod.torch import mpi_ops

from .compression import RankMismatchError

__all__ = ["ModelAgreement", "gather_objects"]


class ModelAgreement:
    """Owns the check that every rank holds the same parameters (names, shapes, dtypes) and
    trains the same ones this step: the trained-set digest, the step's allgather handle, and
    whether the whole model is compared again (the first step, and after an elastic reset).

    Per step: ``launch`` in the step's first hook (the allgather travels during backward),
    ``check`` at the start of synchronize(), ``end_step``; ``recheck()`` after a membership
    change. Host data only (CPU tensors whatever the model's device).
    """

    def __init__(self, process_set, names, param_groups):
        self._process_set = process_set
        self._names = names  # param -> name (Horovod's)
        # The step's allgather is in flight during backward: its name must differ between the
        # optimizers of one process (a GAN's two, even when both were given every name of the
        # model), and be the same on every rank: the names of the params this one updates.
        mine = sorted(str(names.get(p)) for g in param_groups for p in g["params"])
        own = zlib.crc32("\n".join(mine).encode())
        self._collective = f"hvd_topk.trained_set.{own:08x}"
        self._check_model = True  # compare the ranks' parameters at the next check()
        self._handle = None  # handle of this step's allgather of the digests
        self._digest_of = None  # the trained set whose digest is _trained_digest
        self._trained_digest = 0  # crc32 of the trained params' names

    def recheck(self):
        """A rank may have joined: compare the whole models again at the next check()."""
        self._check_model = True

    def _digest(self, trained_set):
        if trained_set != self._digest_of:
            names = sorted(self._names.get(p) for p in trained_set)
            self._trained_digest = zlib.crc32("\n".join(names).encode()) & 0x7FFFFFFF
            self._digest_of = trained_set
        return self._trained_digest

    def launch(self, trained_set, groups_digest, steps):
        """Start this step's allgather of ``[trained-set digest, groups digest, step count]``
        (a CPU tensor). The groups digest, the crc32 of the names of every group of several
        tensors, in order, catches ranks that list the same params in another order and so
        would cut other groups; the step count (it sets the warm-up's ratio, hence ``k``)
        ranks that resumed from different states."""
        if self._process_set.size() > 1:
            self._handle = mpi_ops.allgather_async(
                torch.tensor([self._digest(trained_set), groups_digest, steps & 0x7FFFFFFF],
                             dtype=torch.int32),
                name=self._collective, process_set=self._process_set)

    def end_step(self):
        """The step is over (or abandoned): forget its allgather's handle."""
        self._handle = None

    def check(self, param_groups, trained_set, requires_update):
        """Raise ``RankMismatchError`` on every rank unless all ranks hold the same parameters
        and train the same ones this step: the digests allgathered during backward, every
        step; a small allgather of the whole model at the first step (and after ``recheck``)."""
        if self._process_set.size() == 1:
            self._check_model = False
            return
        if self._check_model:
            self._check_model = False
            self._compare_models()
        handle, self._handle = self._handle, None
        digests = mpi_ops.synchronize(handle).view(-1, 3).tolist()  # (world, 3) int32 on the CPU
        if any(d[0] != digests[0][0] for d in digests):
            self._compare_trained(param_groups, trained_set, requires_update)
        steps = [d[2] for d in digests]
        if any(n != steps[0] for n in steps):
            raise RankMismatchError(
                f"hvd_topk: the ranks are at different hvd_topk steps ({steps}, by rank): their "
                "states come from different places. After a resume load the same state on every "
                "rank (docs/checkpoints.md): each rank its own optimizer.state_dict(), or rank 0's "
                "on every rank, or rank 0's followed by hvd.broadcast_optimizer_state (this needs "
                "an optimizer with state, e.g. SGD with momentum or Adam).")
        others = [r for r, d in enumerate(digests) if d[1] != digests[0][1]]
        if others:
            raise RankMismatchError(
                f"hvd_topk: rank(s) {others} cut this step's tensors into other groups than rank 0: "
                "they list the trained parameters in another order (named_parameters or the "
                "optimizer's param_groups), or their TopKCompressor settings differ (ratio, exchange, "
                "value_dtype... decide which tensors go sparse), and this step exchanges several "
                "tensors together (group_bytes: by default on accelerators, and on CPU for the sparse "
                "allreduce; or groups=). Pass the parameters in the same order and the same settings "
                "on every rank.")

    def _compare_models(self):
        mine = sorted((str(n), tuple(p.shape), str(p.dtype)) for p, n in self._names.items())
        digest = zlib.crc32(repr(mine).encode())
        if len(set(gather_objects(digest, "hvd_topk.model_check", self._process_set))) == 1:
            return
        every = gather_objects(mine, "hvd_topk.model_check.full", self._process_set)
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

    def _compare_trained(self, param_groups, trained_set, requires_update):
        """The ranks' digests of the trained params differ: find which params, and why."""
        mine = {}  # name -> why this rank does not exchange it
        for param_group in param_groups:
            for p in param_group["params"]:
                if p not in trained_set:
                    mine[self._names.get(p)] = (
                        "frozen (requires_grad=False)" if not p.requires_grad
                        else "unfrozen after this step's backward began")
        in_groups = set(p for g in param_groups for p in g["params"])
        for p in requires_update - in_groups:
            mine[self._names.get(p)] = "not in the optimizer's param_groups"
        every = gather_objects(mine, "hvd_topk.trained_set.full", self._process_set)
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


def _first(problems, n=8):
    return "; ".join(problems[:n]) + (f"; and {len(problems) - n} more" if len(problems) > n else "")


def gather_objects(obj, name, process_set):
    """Horovod's ``allgather_object`` over ``process_set``: every member's picklable ``obj``."""
    data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    sizes = mpi_ops.allgather(torch.tensor([data.numel()]), name=f"{name}.sz",
                              process_set=process_set).tolist()
    gathered = mpi_ops.allgather(data, name=f"{name}.t", process_set=process_set).numpy().tobytes()
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [pickle.loads(gathered[a:b]) for a, b in zip(offsets, offsets[1:])]

"""``TopKState``: the state of the DDP Top-K hook (``hook.topk_hook``), in the shape of
PyTorch's ``PowerSGDState``: validated once, its fields grouped by role, one ``state_dict``."""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from ..headers import Signatures
from ..settings import TopKSettings, in_flight_budget
from ..sparse_allreduce import SparseAllreduceExchange
from ..state import CompressorState, GroupCache
from ..stats import CommCounter, CommStats
from .adam import AdamPairing
from .guard import NonfiniteGuard
from .commits import DeferredCommits
from .in_flight import InFlight
from .plan import BucketPlan, build_plan

__all__ = ["TopKState", "HOOK_SETTINGS"]

logger = logging.getLogger(__name__)

#: The ``TopKSettings`` keywords the hook takes. The other one, ``group_bytes``, belongs to the
#: Horovod engine (DDP's ``bucket_cap_mb`` makes the groups).
HOOK_SETTINGS = ("value_dtype", "min_numel", "exchange", "density_aware", "warmup_steps", "warmup_ratio",
                 "momentum_masking", "local_clip_norm", "adam_correction", "adam_variance_steps", "adam_clip",
                 "adam_select", "link_gbps", "link_latency_us", "region_capacity", "region_refresh")
_FORMAT = 1  # state_dict()'s layout


class TopKState:
    """State of ``hvd_topk.ddp.topk_hook``: Top-K sparsification with error feedback for
    ``DistributedDataParallel`` (Lin et al. 2018, *Deep Gradient Compression*,
    https://arxiv.org/abs/1712.01887; Karimireddy et al. 2019, *Error Feedback Fixes SignSGD*,
    https://arxiv.org/abs/1901.09847), on the selection pipeline of the Horovod engine.

    Per bucket, every step (one bucket = one group of ``hvd_topk.selection``):

    1. split the bucket: floating gradients of at least ``min_numel`` entries are sent sparse,
       by the allgather or the sparse allreduce (``cost.choose_exchange``, the Horovod path's
       rule; with ``density_aware``, only where that beats a dense allreduce), the rest are
       allreduced densely; one group per exchange;
    2. compensate ``c = residual + g`` (with ``momentum``, DGC's momentum correction: the
       rank's velocity ``u = m u + g``, ``c = residual + u``), NaN/Inf entries added as 0 and
       the tensor flagged;
    3. select per tensor its ``k = max(1, ceil(ratio * n))`` largest ``|c|`` (the set
       ``torch.topk`` picks), ``ratio`` being the warm-up's at this step;
    4. allgather every rank's payload ``[header | K values | K indices]`` per group (the
       Horovod path's header: a signature of shapes, dtype, ``k``'s and wire dtypes, and the
       flags): every rank knows every ``k``, so payloads have a fixed size and nothing waits
       for a count.
       Or the sparse allreduce (``hvd_topk.sparse_allreduce``, after Ok-Topk): each rank's
       entries go by ``all_to_all_single`` to the owner of their region, which sums them and
       keeps its region's largest sums; an allgather of the owners' rows follows;
    5. every rank scatter-adds (``exchange_core.scatter_add_``) the ``P * K`` values divided by
       ``P``, in rank order (the sparse allreduce: each owner's kept sums): the same bits
       everywhere; a tensor some rank flagged becomes NaN (as dense DDP would give), and so
       does every tensor of a group some rank sent with another signature (ranks that
       disagree on the step, the ratio or the wire dtypes);
    6. once the step is over (at the next step's first bucket, or ``state_dict()``): the sent
       entries (the sparse allreduce: those some owner kept) leave the residual
       (``residual = c - sent``) -- unless some gradient of the
       step was non-finite, when everything stays owed (a ``GradScaler`` skips that step).

    No step reads a value back to the host. ``state.comm_stats`` (the last step's) and
    ``state.comm_totals`` count this rank's bytes as the Horovod engine's ``comm_stats`` does
    (``stats.CommStats``: sent, received, what dense DDP would send, the link's bytes; the
    tensors by exchange; ``compress_ms``, the hooks' time in selection), host numbers only.
    With ``momentum``, pair the hook with a momentum-free ``torch.optim.SGD``
    (``momentum=0``): the hook's output already is the momentum step (densely allreduced
    tensors get plain heavy-ball momentum of the average).

    Arguments:
        model: the module (before or after wrapping in DDP; its parameter names key the
            residuals and ``state_dict()``), or its ``named_parameters()``.
        ratio: fraction of each tensor's entries sent, in (0, 1].
        process_group: the group DDP reduces over (``None``: the default group). Every rank
            of it constructs its ``TopKState`` together: they compare their settings (one
            ``all_gather_object``) and all raise ``ValueError`` if they differ.
        momentum: DGC's momentum correction (0: off), in [0, 1).
        nesterov: Nesterov's form of it (needs ``momentum > 0``).
        optimizer: the training loop's ``torch.optim.Adam`` / ``AdamW``, for Adam correction
            (``ddp.adam.AdamPairing``; on by default with one, as ``adam_correction=None``
            means on the Horovod engine): each rank sends its own Adam step, and the optimizer
            applies the averaged step to the sparse tensors instead of running Adam on it.
            Not with a ``GradScaler`` (it would unscale the step); bf16 autocast needs none.
        nonfinite: ``None`` (default): a tensor some rank's gradient left with a NaN/Inf
            reaches the optimizer as NaN, as with dense DDP; ``"raise"`` / ``"skip"``: the
            Horovod engine's policy, at ``optimizer``'s step (needs ``optimizer``, any
            ``torch.optim`` optimizer; ``ddp.guard.NonfiniteGuard``; ``skipped_steps``).
        **settings: the ``TopKSettings`` keywords in ``HOOK_SETTINGS`` (``warmup_steps``,
            ``min_numel``, ``value_dtype``, ``exchange``, ...), with the same meaning and
            defaults.

    Tuning: ``ratio=0.01`` with the default warm-up (100 steps from 25%) trains like dense on
    the project's benchmarks (``docs/convergence.md``); ``value_dtype=torch.float16`` halves
    the value bytes. Larger ``bucket_cap_mb`` means fewer, larger groups.

    Example::

        state = hvd_topk.ddp.TopKState(model, ratio=0.01)
        ddp_model = DistributedDataParallel(model, device_ids=[local_rank])
        ddp_model.register_comm_hook(state, hvd_topk.ddp.topk_hook)
        ...
        torch.save(state.state_dict(), f"topk_rank{rank}.pt")  # per rank: residuals differ
    """

    __slots__ = (
        # what it is: the settings and the group it reduces over
        "settings", "momentum", "nesterov", "process_group", "world_size",
        # Adam correction's pairing with the training loop's optimizer, or None; the
        # nonfinite policy at its step, or None
        "adam", "guard",
        # the model: parameter -> name, in this process only
        "_names",
        # per-rank state: residuals, velocities, steps (one state_dict)
        "rank_state",
        # this step: the selections waiting for their residual write; whether a step is open
        "commits", "_in_step",
        # this step's buckets whose collectives may still run, held to a budget; the bytes of
        # the parameters that take gradients (the budget's and the groups' sizes)
        "in_flight", "trained_bytes",
        # caches bounded by the buckets in use
        "_plans",
        # the sparse allreduce's plans and regions (its regions are in state_dict()), the
        # groups' signatures on the device
        "sparse_allreduce", "signatures",
        # byte counters: this step's (counter), the last step's and the totals (CommStats)
        "counter", "comm_stats", "comm_totals",
    )

    def __init__(self, model: Union[torch.nn.Module, Iterable[Tuple[str, torch.Tensor]]], ratio: float = 0.01,
                 *, process_group: Optional[dist.ProcessGroup] = None, momentum: float = 0.0,
                 nesterov: bool = False, optimizer: Optional[torch.optim.Optimizer] = None,
                 nonfinite: Optional[str] = None, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(HOOK_SETTINGS))
        if unknown:
            raise TypeError(f"TopKState() got settings the DDP hook does not take: {unknown}; it takes "
                            f"ratio, momentum, nesterov, process_group and {list(HOOK_SETTINGS)}")
        self.settings = TopKSettings(ratio, **settings)
        if not (0.0 <= float(momentum) < 1.0):
            raise ValueError(f"momentum must be in [0, 1) (0: no momentum correction), got {momentum!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        if self.settings.adam_correction and optimizer is None:
            raise ValueError("adam_correction=True needs optimizer=, the torch.optim.Adam or AdamW "
                             "the loop steps")
        if nonfinite is not None and optimizer is None:
            raise ValueError(f"nonfinite={nonfinite!r} needs optimizer=, the optimizer the loop steps")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        _agree(f"{self.settings}, momentum={self.momentum}, nesterov={self.nesterov}, nonfinite={nonfinite}",
               process_group)
        self._names, self.trained_bytes = _parameter_names(model)
        self.in_flight = InFlight(in_flight_budget(self.trained_bytes))
        self.rank_state = CompressorState()
        self.commits = DeferredCommits(self.settings.momentum_masking)
        # before the Adam pairing's hooks: a skipped step hides every gradient from both
        self.guard = NonfiniteGuard(optimizer, self.commits.flagged, nonfinite) if nonfinite else None
        self.adam = None
        if optimizer is not None and self.settings.adam_correction is not False:
            self.adam = AdamPairing(optimizer, self._names, self.settings, self.rank_state) or None
        if self.adam is not None and self.momentum:
            raise ValueError("momentum correction is for SGD, Adam correction for Adam/AdamW: not both")
        self._in_step = False
        self._plans = GroupCache()  # bucket's names -> BucketPlan at the step's ratio
        self.sparse_allreduce = SparseAllreduceExchange(self.settings.region_capacity,
                                                        self.settings.region_refresh)
        self.signatures = Signatures()
        self.counter, self.comm_stats, self.comm_totals = CommCounter(log_every=0), CommStats(), CommStats()
        logger.info("hvd_topk.ddp: Top-K %s over %d ranks, momentum %s, %d parameters", self.settings,
                    self.world_size, self.momentum, len(self._names))

    @property
    def skipped_steps(self) -> int:
        """Steps the ``nonfinite="skip"`` policy skipped."""
        return self.guard.skipped_steps if self.guard is not None else 0

    @property
    def steps(self) -> int:
        """Iterations completed (they drive the warm-up)."""
        return self.rank_state.steps

    def current_ratio(self) -> float:
        """The ratio in force at this step (the warm-up's, then ``ratio``)."""
        return self.settings.ratio_at(self.rank_state.steps, self.adam is not None)

    # -- what the hook calls ------------------------------------------------------------------
    def begin_bucket(self, bucket: dist.GradBucket) -> BucketPlan:
        """The bucket's plan at this step's ratio; a step's first bucket first commits the
        previous step's selections (step 6)."""
        if not self._in_step:
            self.commits.commit()
            self._plans.prune()
            self.sparse_allreduce.prune()
            self.signatures.prune()
            self._in_step = True
            if self.adam is not None:
                self.adam.backward_started()
        params, grads = bucket.parameters(), bucket.gradients()
        names = tuple(self._name(p) for p in params)
        ratio = self.current_ratio()
        return self._plans.get(names, lambda plan: plan.ratio == ratio, lambda: build_plan(
            names, grads, self.settings, ratio, self.world_size, self.trained_bytes))

    def end_bucket(self, bucket: dist.GradBucket) -> None:
        """After the step's last bucket the step counts as done (DDP hands the buckets over in
        index order, once per backward pass)."""
        if bucket.is_last():
            self.in_flight.clear()  # DDP waits for the rest
            self.rank_state.steps += 1
            self._in_step = False
            self.comm_stats = self.counter.finish(0.0, self.comm_totals)

    def buffers(self, names: Sequence[str], sizes: Sequence[int], like: torch.Tensor,
                residual: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(residual, velocity)``: the flat buffers of ``names`` (``None`` where not kept:
        no residual for dense tensors, no velocity without momentum)."""
        res = self.rank_state.residuals.group_buffer(names, sizes, like) if residual else None
        vel = self.rank_state.velocities.group_buffer(names, sizes, like) if self.momentum else None
        return res, vel

    def _name(self, param: torch.Tensor) -> str:
        name = self._names.get(id(param))
        if name is None:
            raise KeyError(f"a DDP bucket holds a parameter of shape {tuple(param.shape)} that is not in "
                           "the model given to TopKState (pass the module DDP wraps, or its "
                           "named_parameters())")
        return name

    # -- checkpoints ---------------------------------------------------------------------------
    def residual(self, name: str) -> Optional[torch.Tensor]:
        """``name``'s residual (flat, a copy) after the last step's write, or ``None``."""
        self.commits.commit()
        r = self.rank_state.residuals.get(name)
        return None if r is None else r.detach().clone()

    def state_dict(self) -> Dict[str, Any]:
        """This rank's state between steps: residuals and velocities by parameter name, the
        step count (the warm-up's position), the sparse allreduce's regions. Tensors and
        builtins only (loads with ``torch.load(weights_only=True)``). Residuals differ between
        ranks: save one per rank."""
        self.commits.commit()
        state = self.rank_state.state_dict()
        state.update(format=_FORMAT, ratio=self.settings.ratio, world_size=self.world_size,
                     sparse_allreduce=self.sparse_allreduce.state_dict())  # the same on every rank
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore ``state_dict()``'s state (this step's selections are forgotten). Raises
        ``ValueError`` if it names parameters this model does not have, or came from another
        world size."""
        if state.get("format") != _FORMAT:
            raise ValueError(f"not a TopKState state_dict (format {state.get('format')!r}, "
                             f"expected {_FORMAT})")
        if state["world_size"] != self.world_size:
            raise ValueError(f"the state was saved by {state['world_size']} ranks, this run has "
                             f"{self.world_size}: residuals are per rank")
        known = set(self._names.values())
        strange = sorted(n for key in ("residuals", "velocities") for n in state[key] if n not in known)
        if strange:
            raise ValueError(f"the state holds parameters this model does not have: {strange[:5]}"
                             + (f" and {len(strange) - 5} more" if len(strange) > 5 else ""))
        self.commits.clear()
        self.rank_state.load_state_dict(state)
        self.sparse_allreduce.load_state_dict(state.get("sparse_allreduce", {}))
        self._in_step = False


def _parameter_names(model) -> Tuple[Dict[int, str], int]:
    """``(id(parameter) -> name, bytes of the parameters that take gradients)``: the names
    find a bucket's parameters in this process (the names, never the ids, key the state).
    The bytes are counted once, like DDP's buckets, which DDP builds at construction from
    the parameters that require grad then; they size the groups and the in-flight budget."""
    pairs = model.named_parameters() if isinstance(model, torch.nn.Module) else model
    names: Dict[int, str] = {}
    seen: Dict[str, int] = {}
    nbytes = 0
    for name, p in pairs:
        if not isinstance(name, str) or not isinstance(p, torch.Tensor):
            raise TypeError("TopKState takes a module or its named_parameters() ((name, tensor) pairs), "
                            f"got a pair {(type(name).__name__, type(p).__name__)}")
        seen[name] = seen.get(name, 0) + 1
        names[id(p)] = name
        nbytes += p.numel() * p.element_size() if p.requires_grad else 0
    dup = sorted(n for n, c in seen.items() if c > 1)
    if dup:
        raise ValueError(f"parameter names must be unique, repeated: {dup}")
    if not names:
        raise ValueError("TopKState needs the model's parameters; got none")
    return names, nbytes


def _agree(settings: str, group: Optional[dist.ProcessGroup]) -> None:
    """Raise ``ValueError`` on every rank unless every rank of ``group`` has these settings
    (different ratios would make payloads of different sizes: a failed or hung allgather)."""
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, settings, group=group)
    mine = every[dist.get_rank(group)]
    others = [r for r, text in enumerate(every) if text != mine]
    if others:
        raise ValueError(f"TopKState: rank(s) {others} have other settings than this rank's "
                         f"{mine}; theirs: {every[others[0]]}")

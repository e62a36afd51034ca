"""Every per-rank buffer of Top-K compression, in one object with one ``state_dict``: the
error-feedback residuals, the momentum-correction velocities, the Adam-correction moments and
their step counts, and the optimizer steps taken (they drive the warm-up). Also the
selections of the current step until they are committed (``Pending``) and the per-group
caches (``GroupCache``), bounded by the groups of one step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from .memory import ResidualMemory
from .selection import AdamMoments, GroupLayout, PositionSet, residual_write_

__all__ = ["CompressorState", "Pending", "StepSelections", "GroupCache"]


class GroupCache:
    """A cache with one entry per group in use: ``get`` replaces an entry that no longer fits
    (a new ``k``), and ``prune`` (once per step) forgets the groups no step has used since the
    last prune. Its size is bounded by the groups of one step, however long training runs."""

    def __init__(self) -> None:
        self._entries: Dict[Any, Any] = {}
        self._used: set = set()

    def get(self, key, fits: Callable[[Any], bool], build: Callable[[], Any]):
        """The entry for ``key`` if ``fits(entry)``, else a new one from ``build()``."""
        entry = self._entries.get(key)
        if entry is None or not fits(entry):
            entry = self._entries[key] = build()
        self._used.add(key)
        return entry

    def prune(self) -> None:
        """Forget the entries not used since the last prune; the others' ``end_step()`` (where
        they have one) drops what they kept for the step."""
        for key in [k for k in self._entries if k not in self._used]:
            del self._entries[key]
        for entry in self._entries.values():
            end_step = getattr(entry, "end_step", None)
            if end_step is not None:
                end_step()
        self._used = set()

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class Pending:
    """One group's selection this step, kept until it is committed (the step is applied) or
    taken back (``unsend``). Until then the residual still holds the compensated ``c`` and the
    velocity is unmasked, so taking it back or selecting again restores nothing, and no copy
    of the sent values is kept."""

    residual: torch.Tensor  # (n,) the group's residual buffer, holding c until the commit
    velocity: Optional[torch.Tensor]  # (n,) momentum correction's velocity, or None
    sent: PositionSet  # the K positions selected
    bad: torch.Tensor  # (S,) bool: segments whose gradient held a NaN/Inf
    scale: object  # the loss scale the step's gradients carried
    value_dtype: torch.dtype  # the wire's
    travels: Optional[PositionSet] = None  # sparse allreduce: those that fit an owner's row
    applied: Optional[PositionSet] = None  # sparse allreduce: those some owner kept (committed)
    ranked: Optional[AdamMoments] = None  # Adam correction: the moments the selection ranked by

    def score(self) -> torch.Tensor:
        """What the selection ranked the residual's entries by (``AdamMoments.score``)."""
        return self.residual if self.ranked is None else self.ranked.score(self.residual)

    def sent_as(self, travels: Optional[PositionSet]) -> None:
        """The positions that travel, when not all of them do (the sparse allreduce's rows)."""
        self.travels = travels

    def kept(self, applied: PositionSet) -> None:
        """The positions some owner kept: the only ones the commit writes (sparse allreduce)."""
        self.applied = applied


class StepSelections:
    """This step's selection of each group (``Pending``, keyed by the group's names) until the
    step is committed (step 5, ``selection.residual_write_``) or taken back. It holds at most
    the groups of one step: every step ends with ``commit_all`` or ``take_back``."""

    def __init__(self, masking: bool) -> None:
        self.masking = masking  # DGC's momentum factor masking at the commit
        self._groups: Dict[Tuple[str, ...], Pending] = {}

    def __getitem__(self, names: Tuple[str, ...]) -> Pending:
        return self._groups[names]

    def __setitem__(self, names: Tuple[str, ...], pending: Pending) -> None:
        self._groups[names] = pending

    def __len__(self) -> int:
        return len(self._groups)

    def commit(self, names: Tuple[str, ...]) -> None:
        """Step 5 for a group whose step is applied (nothing if it has no selection)."""
        pend = self._groups.pop(names, None)
        if pend is not None:
            residual_write_(pend.residual, pend.velocity, pend.sent, pend.applied, pend.scale,
                            pend.value_dtype, masking=self.masking)

    def commit_all(self) -> None:
        """Step 5 for every group of the step."""
        for names in list(self._groups):
            self.commit(names)

    def clear(self) -> None:
        """Forget every selection (the state is being replaced)."""
        self._groups.clear()

    def take_back(self) -> None:
        """Forget every selection uncommitted: each residual still holds ``e + g`` (what was
        about to be sent stays owed) and the velocity is unmasked. An entry of either that
        overflowed is reset to 0."""
        for pend in self._groups.values():
            torch.nan_to_num_(pend.residual, nan=0.0, posinf=0.0, neginf=0.0)
            if pend.velocity is not None:
                torch.nan_to_num_(pend.velocity, nan=0.0, posinf=0.0, neginf=0.0)
        self._groups.clear()


class CompressorState:
    """The per-rank state of a ``TopKCompressor``, keyed by parameter name (never ``id()``).

    ``residuals``: error feedback, what was not sent yet; ``velocities``: momentum
    correction's local velocity; ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq``: Adam
    correction's local moments, with ``adam_steps`` per name; ``steps``: optimizer steps
    completed. Every buffer is a view of its group's flat buffer (``ResidualMemory``).
    """

    def __init__(self) -> None:
        self.residuals = ResidualMemory()
        self.velocities = ResidualMemory()
        self.exp_avg = ResidualMemory()
        self.exp_avg_sq = ResidualMemory()
        self.max_exp_avg_sq = ResidualMemory()  # AMSGrad only
        self.adam_steps: Dict[str, int] = {}
        self.steps = 0

    def adam_moments(self, names: Sequence[str], layout: GroupLayout, like: torch.Tensor, adam,
                     variance_steps: Optional[int], clip: Optional[float], select: str) -> AdamMoments:
        """This step's Adam correction state for a group (``adam``: its ``AdamSettings``): its
        moment buffers and bias corrections, after counting the step for each name (a name's
        first step is 1). The variance and its bias correction stop at ``variance_steps``;
        ``select``: what Top-K ranks by (``AdamMoments.score``)."""
        steps = [self.adam_steps.get(n, 0) + 1 for n in names]
        for n, t in zip(names, steps):
            self.adam_steps[n] = t
        var_steps = [t if variance_steps is None else min(t, variance_steps) for t in steps]
        moving = [variance_steps is None or t <= variance_steps for t in steps]  # still estimated
        if len(set(steps)) == 1:
            bias1 = 1 - adam.beta1 ** steps[0]
            bias2 = 1 - adam.beta2 ** var_steps[0]
            update_variance = moving[0]
        else:  # tensors trained for different numbers of steps (frozen, then unfrozen)
            def per_entry(values, dtype):  # (S,) host numbers -> (n,) on the device
                return torch.repeat_interleave(torch.tensor(values, dtype=dtype),
                                               torch.tensor(layout.sizes)).to(like.device)
            bias1 = per_entry([1 - adam.beta1 ** t for t in steps], like.dtype)
            bias2 = per_entry([1 - adam.beta2 ** t for t in var_steps], like.dtype)
            update_variance = all(moving) or (any(moving) and per_entry(moving, torch.bool))
        return AdamMoments(
            exp_avg=self.exp_avg.group_buffer(names, layout.sizes, like),
            exp_avg_sq=self.exp_avg_sq.group_buffer(names, layout.sizes, like),
            max_exp_avg_sq=(self.max_exp_avg_sq.group_buffer(names, layout.sizes, like)
                            if adam.amsgrad else None),
            beta1=adam.beta1, beta2=adam.beta2, eps=adam.eps, bias1=bias1, bias2=bias2,
            update_variance=update_variance, lr=adam.lr, clip=clip, select=select)

    def start_adam(self, name: str, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                   max_exp_avg_sq: Optional[torch.Tensor] = None) -> None:
        """Take over moments built elsewhere (the wrapped optimizer's) at their step count."""
        self.exp_avg.set(name, exp_avg)
        self.exp_avg_sq.set(name, exp_avg_sq)
        if max_exp_avg_sq is not None:
            self.max_exp_avg_sq.set(name, max_exp_avg_sq)
        self.adam_steps[name] = int(step)

    def state_dict(self) -> Dict[str, Any]:
        """Tensors and builtins only: loads with ``torch.load(weights_only=True)``."""
        return {"steps": self.steps, "residuals": self.residuals.state_dict(),
                "velocities": self.velocities.state_dict(), "exp_avg": self.exp_avg.state_dict(),
                "exp_avg_sq": self.exp_avg_sq.state_dict(),
                "max_exp_avg_sq": self.max_exp_avg_sq.state_dict(),
                "adam_steps": dict(self.adam_steps)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.residuals.load_state_dict(state["residuals"])
        self.velocities.load_state_dict(state.get("velocities", {}))
        self.exp_avg.load_state_dict(state.get("exp_avg", {}))
        self.exp_avg_sq.load_state_dict(state.get("exp_avg_sq", {}))
        self.max_exp_avg_sq.load_state_dict(state.get("max_exp_avg_sq", {}))
        self.adam_steps = {str(n): int(t) for n, t in state.get("adam_steps", {}).items()}

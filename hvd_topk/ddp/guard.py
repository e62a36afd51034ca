"""``NonfiniteGuard``: the Horovod engine's ``nonfinite`` policy for the DDP hook, enforced at
the training loop's optimizer step.

The hook decides on the device, without reading a value: a tensor some rank's gradient left
with a NaN/Inf is NaN on every rank and nothing of the step leaves the residuals
(``commits.DeferredCommits``). By default that NaN reaches the optimizer, as with dense DDP (a
``GradScaler`` then skips the step). With ``TopKState(..., optimizer=opt, nonfinite=...)`` the
guard's step pre-hook reads the step's flag -- one host sync per step, in the optimizer's
step, never in the hook -- and, where some rank's gradient was not finite, on every rank
alike (the flag is the same everywhere):

- ``"raise"``: ``FloatingPointError`` from ``optimizer.step()``;
- ``"skip"``: the optimizer sees no gradient this step (every ``p.grad`` of its param groups
  is set to ``None``: torch's optimizers skip such params, and Adam correction's pairing
  applies nothing), and ``skipped_steps`` counts it.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from ..nonfinite import check_policy

__all__ = ["NonfiniteGuard"]

logger = logging.getLogger(__name__)


class NonfiniteGuard:
    """The ``nonfinite`` policy at ``optimizer``'s step.

    Arguments:
        optimizer: the optimizer the training loop steps (its step pre-hook is registered
            here: register the guard before any other pre-hook that reads gradients).
        flagged: the step's non-finite flag, a 0-dim device bool, or None when nothing was
            exchanged (``DeferredCommits.flagged``).
        policy: ``"raise"`` or ``"skip"`` (``nonfinite.NONFINITE_POLICIES``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, flagged: Callable[[], Optional[torch.Tensor]],
                 policy: str) -> None:
        check_policy(policy)
        self.policy = policy
        self.skipped_steps = 0
        self._flagged = flagged
        optimizer.register_step_pre_hook(self._check)

    def _check(self, optimizer, args, kwargs) -> None:
        flag = self._flagged()
        if flag is None or not bool(flag):  # the step's one host sync
            return
        if self.policy == "raise":
            raise FloatingPointError(
                "hvd_topk.ddp: some rank's gradient held a NaN/Inf at this step; nothing of it entered the "
                "residuals (TopKState(nonfinite='raise'); 'skip' skips such steps instead)")
        self.skipped_steps += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        logger.warning("hvd_topk.ddp: step skipped, some rank's gradient held a NaN/Inf (%d skipped so far)",
                       self.skipped_steps)

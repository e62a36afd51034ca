"""What ``step()`` does when an exchange found a NaN/Inf gradient on some rank."""

from __future__ import annotations

import logging

__all__ = ["NONFINITE_POLICIES", "NonfinitePolicy", "check_policy"]

# The optimizer's logger: the skipped step's line keeps the name users configure.
logger = logging.getLogger("hvd_topk.optimizer")

NONFINITE_POLICIES = ("raise", "skip")


def check_policy(nonfinite):
    """The optimizer's ``nonfinite`` argument: one of ``NONFINITE_POLICIES``, else a ``ValueError``."""
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")


class NonfinitePolicy:
    """Owns the non-finite gradients found by the last exchange and the ``nonfinite``
    policy applied to them: ``"raise"`` a ``FloatingPointError`` naming them, or ``"skip"``
    the step (the optimizer counts it in ``skipped_steps``). Every rank saw the same flags in the same
    gathered buffers: all raise or all skip.

    Per step: ``record(found)`` after the exchange's check; ``pending`` before the step is
    applied, then ``enforce()``; ``discard()`` when a state is loaded.
    """

    def __init__(self, policy):
        self.policy = policy
        self._found = []  # (name, ranks or None) found non-finite in the last exchange

    def record(self, found):
        """The exchange's finds: ``(name, ranks or None)`` for each non-finite gradient
        (``None``: found after a dense allreduce, whose ranks are unknown)."""
        self._found = found

    @property
    def pending(self):
        """The last exchange found a non-finite gradient: the step must not be applied."""
        return bool(self._found)

    def discard(self):
        """Forget the finds (a state was loaded)."""
        self._found = []

    def enforce(self):
        """Raise ``FloatingPointError`` (policy ``"raise"``), or log the step skipped."""
        found, self._found = self._found, []
        where = ", ".join(f"{n!r} (rank {r})" if r else f"{n!r} (after allreduce)" for n, r in found)
        msg = (f"non-finite gradient for {where}. No residual took it in; the other "
               "tensors keep this step's gradient in their residuals.")
        if self.policy == "raise":
            raise FloatingPointError(
                f"hvd_topk: {msg} The step was not applied. Pass nonfinite='skip' to "
                "hvd_topk.DistributedOptimizer to skip such steps, or use torch.amp.GradScaler "
                "(Horovod's AMP recipe, docs/reliability.md), which skips them itself.")
        logger.warning("hvd_topk: %s Step skipped (nonfinite='skip').", msg)

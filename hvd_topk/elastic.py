"""Horovod Elastic: ``hvd.elastic.TorchState`` commits and restores hvd_topk's state too.

``TorchState(model=model, optimizer=optimizer)`` picks a handler per attribute from Horovod's
handler registry (``horovod.torch.elastic.state``). Importing ``hvd_topk`` registers, ahead of
Horovod's optimizer handler, one for the optimizers ``hvd_topk.DistributedOptimizer`` returns:

1. ``commit()`` / ``save()``: the optimizer's state as Horovod saves it, plus this rank's
   residuals, momentum-correction velocities, Adam-correction moments and step counts, and
   warm-up step (``topk_state_dict()``);
2. ``restore()`` (after a rank failed mid-step): all of it rolls back to the last commit, so
   the residual updates of the failed step are undone along with its parameter updates;
3. ``sync()`` (after the membership changed): Horovod broadcasts the optimizer state from
   rank 0, and the step count follows, so every rank computes the same ``k`` again; the copy
   of rank 0's hvd_topk state that the broadcast brings along is dropped (see below).

Residuals (and Adam-correction moments) are per rank and stay so: a rank that joins starts
with an empty residual and fresh moments (bias-corrected from its first step), and the
residual of a rank that is lost is lost with it -- at most the gradient it had accumulated
but not yet sent since its last selection of each entry (see docs/reliability.md).
"""

from __future__ import annotations

from .checkpoint import split_topk_state
from .optimizer import TopKDistributedOptimizer

__all__ = ["TopKOptimizerStateHandler", "register_elastic_handler"]

try:
    from horovod.torch.elastic import state as _state
except ImportError:  # pragma: no cover - Horovod built without its elastic module
    _state = None

if _state is not None:
    class TopKOptimizerStateHandler(_state.OptimizerStateHandler):
        """Horovod's optimizer state handler, plus the hvd_topk state of this rank."""

        def __init__(self, optimizer):
            super().__init__(optimizer)
            self._saved_optimizer_state, _ = split_topk_state(self._saved_optimizer_state)
            self._saved_topk = optimizer.topk_state_dict()

        def save(self):
            super().save()
            # This rank's own hvd_topk state is kept apart (restore() loads it whatever the
            # world size is by then), not in the optimizer state Horovod keeps.
            self._saved_optimizer_state, _ = split_topk_state(self._saved_optimizer_state)
            self._saved_topk = self.value.topk_state_dict()  # CPU copies

        def restore(self):
            super().restore()
            self.value.load_topk_state_dict(self._saved_topk)

        def sync(self):
            super().sync()
            self.value.sync_topk_state(root_rank=0)
else:  # pragma: no cover
    TopKOptimizerStateHandler = None


def register_elastic_handler() -> bool:
    """Put the handler first in Horovod's registry (idempotent); False without elastic."""
    if _state is None:
        return False
    registry = _state.get_handler_registry()
    if not any(h is TopKOptimizerStateHandler for _, h in registry):
        _state.set_handler_registry([(TopKDistributedOptimizer, TopKOptimizerStateHandler)]
                                    + list(registry))
    return True

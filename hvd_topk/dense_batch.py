"""The step's small dense gradients (biases, norms: the tensors Top-K leaves dense) sent
together: one Horovod grouped allreduce per dtype once the last of them is ready, instead of
one allreduce each.

Each collective costs Horovod a negotiation round in its background thread (a request to the
coordinator, its response), whatever its size; a model with dozens of biases and norms pays
dozens of rounds a step for a few kilobytes. The plan names the members, the same on every
rank (``Planner.small_dense``): params left dense of at most ``SMALL_DENSE_BYTES`` each. A
member's gradient is held when its hook runs; the last one launches the group, so the bytes
still leave during backward. A member that never comes (its gradient went another way on
every rank, e.g. a sparse embedding gradient) is flushed in ``synchronize()``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch

__all__ = ["SMALL_DENSE_BYTES", "DenseBatch", "InDenseBatch"]

#: A gradient left dense joins the step's grouped allreduce if it has at most this many bytes;
#: a larger one is sent at once, for its bytes to overlap the rest of backward.
SMALL_DENSE_BYTES = 64 * 1024


class InDenseBatch:
    """The handle Horovod's hook stores for a gradient that travels in the dense batch."""

    __slots__ = ("batch",)

    def __init__(self, batch):
        self.batch = batch


class DenseBatch:
    """One step's batch of small dense gradients.

    Per step: ``plan(members)`` (the plan's ``small_dense``, a tuple in name order), ``take`` each
    member's tensor as its hook runs (the last launches), ``output(p, wait)`` in
    ``synchronize()`` (launching what is held if some member never came), ``pending()`` after
    an error, ``reset()`` at the end.
    """

    def __init__(self, launch: Callable[[List[torch.Tensor], str], object]) -> None:
        self._launch = launch  # (tensors, name) -> Horovod handle of their grouped allreduce
        self._members: Sequence[torch.Tensor] = ()
        self._member_set = frozenset()
        self._held: Dict[torch.Tensor, tuple] = {}  # p -> (the tensor to allreduce, its name)
        self._handles: List[tuple] = []  # (handle, params) per grouped allreduce launched
        self._outputs: Optional[Dict[torch.Tensor, torch.Tensor]] = None

    def plan(self, members: Sequence[torch.Tensor]) -> None:
        """This step's members: the same params, in the same (name) order, on every rank."""
        if members is not self._members:  # the plan's own tuple, replaced when it changes
            self._members, self._member_set = members, frozenset(members)

    def holds(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s gradient travels in the batch this step."""
        return p in self._member_set and not self._handles

    def take(self, p: torch.Tensor, tensor: torch.Tensor, name: str) -> InDenseBatch:
        """Hold ``tensor`` (``p``'s gradient, in the form to allreduce, named ``name``); the
        last member launches the batch."""
        self._held[p] = (tensor, name)
        if len(self._held) == len(self._members):
            self.flush()
        return InDenseBatch(self)

    def flush(self) -> None:
        """Launch what is held, one grouped allreduce per dtype and device, in name order."""
        if self._handles or not self._held:
            return
        by_kind: Dict[tuple, List[torch.Tensor]] = {}
        for p in self._members:
            if p in self._held:
                t = self._held[p][0]
                by_kind.setdefault((t.device, t.dtype), []).append(p)
        for params in by_kind.values():
            name = f"{self._held[params[0]][1]}+{len(params) - 1}.dense"
            self._handles.append((self._launch([self._held[p][0] for p in params], name), params))

    def output(self, p: torch.Tensor, wait: Callable[[object], List[torch.Tensor]]) -> torch.Tensor:
        """``p``'s allreduced tensor; the first call waits for every grouped allreduce."""
        if self._outputs is None:
            self.flush()
            self._outputs = {}
            for handle, params in self._handles:
                self._outputs.update(zip(params, wait(handle)))
        return self._outputs[p]

    def pending(self) -> List[object]:
        """The handles not yet waited for (what a step abandoned after an error waits for)."""
        return [] if self._outputs is not None else [h for h, _ in self._handles]

    def reset(self) -> None:
        """The step is over: forget its tensors and handles (the members stay planned)."""
        self._held.clear()
        self._handles = []
        self._outputs = None

"""The DDP hook's step 5: the residual write of a step's selections, decided on the device.

A DDP hook cannot know whether the optimizer step that follows is applied (a
``torch.amp.GradScaler`` skips a step whose gradients hold an Inf or NaN), and it may not
read a device value to find out (no host sync). So, as on the Horovod path, the residual
keeps the compensated gradient ``c`` until the step is over, and every selection of the step
waits here; at the next step's first bucket (or at ``state_dict()``) they are written:
``residual[sent] = c - wire(c)`` (``selection.residual_write_``) where the step was finite on
every rank, and left as ``c`` -- nothing sent is lost -- where some rank flagged a gradient
non-finite (its tensor reached the optimizer as NaN). The choice is a ``torch.where`` on a
device flag: no host sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..positions import PositionSet
from ..selection import residual_write_

__all__ = ["DeferredCommits"]


@dataclass
class _Selection:
    residual: torch.Tensor  # (n,) the group's residual buffer, holding c until the commit
    velocity: Optional[torch.Tensor]  # (n,) momentum correction's velocity, or None
    sent: PositionSet  # the K positions selected
    value_dtype: torch.dtype  # the wire's
    applied: Optional[PositionSet] = None  # the sparse allreduce: the positions some owner kept

    def only(self, applied: PositionSet) -> None:
        """Of the positions sent, only ``applied`` leave the residual at the commit (the sparse
        allreduce: those some owner kept; the rest stay owed)."""
        self.applied = applied


class DeferredCommits:
    """A step's selections and non-finite flags until the step is over.

    ``add`` each selection when its payload is built; ``flag`` each bucket's 0-dim device
    bool (True: some rank's gradient held a NaN/Inf); ``commit`` once the step is over. Both
    ``add`` and ``flag`` are list appends, safe from the collectives' callback threads.
    It holds at most the selections of one step.

    Arguments:
        masking: DGC's momentum factor masking at the write (``velocity[sent] = 0``).
    """

    def __init__(self, masking: bool) -> None:
        self.masking = masking
        self._selections: List[_Selection] = []
        self._flags: List[torch.Tensor] = []

    def add(self, residual: torch.Tensor, velocity: Optional[torch.Tensor], positions: torch.Tensor,
            value_dtype: torch.dtype) -> _Selection:
        """A group's selection: ``positions`` ``(K,)`` int64 in ``residual``. Returned, for the
        sparse allreduce to set ``applied`` once it knows what the owners kept (only those
        leave the residual)."""
        selection = _Selection(residual, velocity, PositionSet(positions, residual.numel()), value_dtype)
        self._selections.append(selection)
        return selection

    def flag(self, nonfinite: torch.Tensor) -> None:
        """A 0-dim bool on the device: True when some rank's gradient was not finite."""
        self._flags.append(nonfinite)

    def __len__(self) -> int:
        return len(self._selections)

    def flagged(self) -> Optional[torch.Tensor]:
        """0-dim device bool: whether some flag of the step so far is set; None if none came."""
        return torch.stack(self._flags).any() if self._flags else None

    def commit(self) -> None:
        """Write every selection of the step: sent entries leave the residual (and, with
        masking, the velocity) where every flag is False, else everything stays owed."""
        selections, self._selections = self._selections, []
        bad = self.flagged()  # 0-dim, on the gradients' device
        self._flags = []
        for sel in selections:
            pos, _ = sel.sent.positions()  # (K,)
            bufs = [b for b in (sel.residual, sel.velocity) if b is not None]
            kept = [b.index_select(0, pos) for b in bufs] if bad is not None else []  # c, u
            residual_write_(sel.residual, sel.velocity, sel.sent, sel.applied, 1.0, sel.value_dtype,
                            masking=self.masking)  # step 5
            for buf, old in zip(bufs, kept):  # a step not finite somewhere: everything stays owed
                buf.index_copy_(0, pos, torch.where(bad, old, buf.index_select(0, pos)))

    def clear(self) -> None:
        """Forget the step's selections uncommitted: each residual keeps ``c``."""
        self._selections.clear()
        self._flags.clear()


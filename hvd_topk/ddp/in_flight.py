"""The DDP hook's bound on a step's payloads in flight, as on the Horovod path
(``synchronize.StepExchange``): DDP waits for every bucket's future only once backward is
over, so without a bound each bucket's payload and gathered buffer would stay alive until
then -- at the warm-up's first ratios, more than the model's own bytes. Past the budget
(``settings.in_flight_budget``: an eighth of the model's bytes, at least 1 MiB) a bucket's
hook first finishes the oldest buckets still in flight: waits for their collectives,
scatters them into their gradients and lets their gathered buffers go. Every rank takes the
same decisions (from the same byte counts), and waiting for a collective every rank has
already started cannot deadlock.
"""

from __future__ import annotations

import threading
from typing import Callable, List, Sequence

import torch

__all__ = ["BucketWork", "InFlight"]


class BucketWork:
    """One bucket's collectives, its gathered buffers (``buffers``, over ``world`` ranks) and its
    step 5 (``finish``), run once: by DDP's callback when
    the collectives complete, or earlier by a later bucket's hook (``InFlight``). Then the
    gathered buffers are emptied (``Tensor.set_()``): the futures keep a reference to them
    until DDP lets the futures go, after backward."""

    def __init__(self, futures: Sequence[torch.futures.Future], finish: Sequence[Callable[[], None]],
                 buffers: Sequence[torch.Tensor], world: int) -> None:
        self._futures = list(futures)
        self._finish = list(finish)
        self._buffers = list(buffers)
        # what it holds while in flight: the gathered buffers and the payloads sent (1/world of them)
        self.nbytes = sum(b.numel() * b.element_size() for b in buffers) * (world + 1) // world
        self._lock = threading.Lock()  # DDP's callback may run on a collective's thread
        self._done = False

    def complete(self) -> None:
        """Wait for the collectives (their errors surface here), run step 5, let go of the
        gathered buffers. A second call does nothing."""
        with self._lock:
            if self._done:
                return
            for f in self._futures:
                f.wait()
                f.value()
            for part in self._finish:
                part()
            for buf in self._buffers:
                buf.set_()
            self._done = True
            self._futures, self._finish, self._buffers = [], [], []


class InFlight:
    """A step's buckets whose collectives may still be running, oldest first, and their bytes
    (payloads sent and gathered) against ``budget``."""

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._works: List[BucketWork] = []
        self._bytes = 0

    def make_room(self) -> None:
        """Before a bucket's selection: past the budget, finish the oldest buckets, so that
        its temporaries do not come on top of their buffers."""
        self._finish_oldest(keep=0)

    def add(self, work: BucketWork) -> None:
        """A bucket's work, just started: past the budget, finish the oldest others first."""
        self._works.append(work)
        self._bytes += work.nbytes
        self._finish_oldest(keep=1)

    def _finish_oldest(self, keep: int) -> None:
        while len(self._works) > keep and self._bytes > self.budget:
            oldest = self._works.pop(0)
            self._bytes -= oldest.nbytes
            oldest.complete()

    def clear(self) -> None:
        """The step is over (its last bucket): DDP waits for what is left."""
        self._works, self._bytes = [], 0

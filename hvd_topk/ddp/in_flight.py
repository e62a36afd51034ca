"""The DDP hook's bound on a step's payloads in flight, group by group as on the Horovod path
(``synchronize.StepExchange``): DDP waits for every bucket's future only once backward is
over, so without a bound each group's payload and gathered buffer would stay alive until
then -- at the warm-up's first ratios, more than the model's own bytes. Past the budget
(``settings.in_flight_budget``: an eighth of the model's bytes, at most 32 MiB, at least
1 MiB), before a group's selection and after its send, the hook first finishes the oldest
exchanges still in flight, a bucket's own earlier groups included (DDP's first iteration
puts the whole model in one bucket): waits for their collectives, scatters them into their
gradients and lets their buffers go. Every rank takes the same decisions (from the same byte counts),
and waiting for a collective every rank has already started cannot deadlock.
"""

from __future__ import annotations

import threading
from typing import Callable, List, Sequence

import torch

__all__ = ["ExchangeWork", "InFlight"]


class ExchangeWork:
    """One exchange of a bucket (a group's, or its dense allreduce): its collectives, the
    buffers they fill (``received``: the gathered buffer) and send (``sent``: the payload) and
    its step 5 (``finish``), run once: by DDP's callback when the bucket's collectives
    complete, or earlier by the hook, for a later group (``InFlight``). The buffers sent are
    emptied (``Tensor.set_()``) as soon as the collectives are done, before step 5 makes its
    own temporaries; the received ones after it, and so are the collectives' own results
    (Gloo's allgather returns views of the gathered buffer, and keeps the payload): DDP keeps
    the futures until backward is over, and with them every buffer they reach."""

    def __init__(self, futures: Sequence[torch.futures.Future], finish: Sequence[Callable[[], None]],
                 received: Sequence[torch.Tensor], sent: Sequence[torch.Tensor] = ()) -> None:
        self._futures = list(futures)
        self._finish = list(finish)
        self._received, self._sent = list(received), list(sent)
        self.nbytes = sum(b.numel() * b.element_size() for b in self._received + self._sent)  # held in flight
        self._lock = threading.Lock()  # DDP's callback may run on a collective's thread
        self._done = False

    def complete(self) -> None:
        """Wait for the collectives (their errors surface here), run step 5, let go of the
        buffers. A second call does nothing."""
        with self._lock:
            if self._done:
                return
            results = []
            for f in self._futures:
                value = f.wait()
                results += value if isinstance(value, (list, tuple)) else [value]
            for buf in self._sent:
                buf.set_()
            for part in self._finish:
                part()
            for buf in self._received + [t for t in results if isinstance(t, torch.Tensor)]:
                buf.set_()
            self._done = True
            self._futures, self._finish, self._received, self._sent = [], [], [], []


class InFlight:
    """A step's exchanges whose collectives may still be running, oldest first, and their bytes
    (payloads sent and gathered) against ``budget``."""

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self._works: List[ExchangeWork] = []
        self._bytes = 0

    def make_room(self) -> None:
        """Before a group's selection: past the budget, finish the oldest exchanges, so that
        its temporaries do not come on top of their buffers."""
        self._finish_oldest(keep=0)

    def add(self, work: ExchangeWork) -> None:
        """An exchange, just started: past the budget, finish the oldest others first."""
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

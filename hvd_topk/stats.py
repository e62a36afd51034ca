"""Communication statistics: ``CommStats`` (the counters of a step, or totals over steps:
``optimizer.comm_stats``, ``optimizer.comm_totals``; the DDP hook's ``state.comm_stats``,
``state.comm_totals``) and ``CommCounter``, which counts them during a step. Engine-independent:
no Horovod here."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from .exchange_core import ring_allreduce_bytes

__all__ = ["CommStats", "CommCounter"]

# The optimizer's logger: ``log_every``'s lines keep the name users configure.
logger = logging.getLogger("hvd_topk.optimizer")


@dataclass
class CommStats:
    """Communication counters of one optimizer step (this rank), or totals over steps.

    ``bytes_sent``: what this rank contributed to collectives (sparse payloads -- for the
    sparse allreduce its alltoall rows for other ranks and its allgather row --, plus dense
    tensors at their size); ``bytes_received``: what the collectives delivered to it (plus
    dense tensors); ``dense_bytes``: what a dense allreduce of the same gradients would
    contribute; ``link_bytes``: the bytes this rank's link carries each way under the model
    that chooses the exchanges (``exchange.exchange_bytes``: a ring allreduce's ``2 (P-1)/P``
    of each dense tensor, ``P-1`` payloads for an allgather, ``P-1`` rows of each phase for
    the sparse allreduce); ``allgather_tensors`` / ``sparse_allreduce_tensors``: how many
    of the ``sparse_tensors`` took each exchange; ``compress_ms``: time in ``compress()``;
    ``wait_ms``: time blocked in ``synchronize()`` (communication not hidden behind
    backward, plus decompression), of which ``agree_ms`` (the ranks' agreement on the model
    and the trained set), ``collective_ms`` (waiting for collectives), ``scatter_ms``
    (decompressing) and ``check_ms`` (resolving every flag: the step's one host sync).
    """

    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    dense_bytes: int = 0
    link_bytes: int = 0
    sparse_tensors: int = 0
    allgather_tensors: int = 0
    sparse_allreduce_tensors: int = 0
    dense_tensors: int = 0
    compress_ms: float = 0.0
    wait_ms: float = 0.0
    agree_ms: float = 0.0
    collective_ms: float = 0.0
    scatter_ms: float = 0.0
    check_ms: float = 0.0

    @property
    def density(self) -> float:
        """bytes_sent / dense_bytes (1.0 for uncompressed training)."""
        return self.bytes_sent / self.dense_bytes if self.dense_bytes else 1.0

    def add(self, other: CommStats) -> None:
        """Add ``other``'s counters to these (totals over steps)."""
        for field, value in asdict(other).items():
            setattr(self, field, getattr(self, field) + value)

    def as_dict(self) -> dict:
        """Every counter by name, and ``density``."""
        d = asdict(self)
        d["density"] = self.density
        return d


class CommCounter:
    """Counts this rank's ``CommStats`` during a step.

    Per step: ``gradient`` for every gradient exchanged (what a dense allreduce would move),
    ``dense`` for one allreduced densely, ``sparse`` for a group once its payload is sent,
    ``add_ms(field, t0)`` for the milliseconds since ``t0`` spent in ``field``; then ``finish``
    closes the step (and logs every ``log_every`` steps), or ``discard`` drops it.
    """

    def __init__(self, log_every: int, fp16: bool = False) -> None:
        self._step = CommStats()
        self._log_every = log_every
        self._fp16 = fp16  # Horovod's Compression.fp16: dense floats travel as 2 bytes

    def gradient(self, grad) -> None:
        """A gradient of the step: the bytes a dense allreduce of it would contribute."""
        self._step.dense_bytes += grad.numel() * grad.element_size()

    def dense(self, grad, world: int) -> None:
        """A gradient allreduced densely over ``world`` ranks (Horovod's fp16 halves a
        float's bytes)."""
        if self._fp16 and grad.dtype.is_floating_point:
            sent = grad.numel() * 2
        else:
            sent = grad.numel() * grad.element_size()
        stats = self._step
        stats.dense_tensors += 1
        stats.bytes_sent += sent
        stats.bytes_received += sent
        stats.link_bytes += ring_allreduce_bytes(sent, world)

    def sparse(self, traffic, exchange: str, tensors: int) -> None:
        """A group of ``tensors`` sent by ``exchange``; ``traffic``: its context's
        ``(sent, received, link)`` bytes."""
        stats = self._step
        sent, received, link = traffic
        stats.bytes_sent += sent
        stats.bytes_received += received
        stats.link_bytes += link
        if exchange == "sparse_allreduce":
            stats.sparse_allreduce_tensors += tensors
        else:
            stats.allgather_tensors += tensors
        stats.sparse_tensors += tensors

    def add_ms(self, field: str, t0: float) -> None:
        """Add the milliseconds since ``t0`` (``time.perf_counter()``) to ``field``."""
        setattr(self._step, field, getattr(self._step, field) + (time.perf_counter() - t0) * 1e3)

    def finish(self, waited_s: float, totals: CommStats) -> CommStats:
        """Close the step (``waited_s``: seconds blocked in synchronize()), add it to ``totals``
        and return it; every ``log_every`` steps of ``totals``, log it."""
        stats = self._step
        stats.wait_ms += waited_s * 1e3
        stats.steps = 1
        totals.add(stats)
        self._step = CommStats()
        n = totals.steps
        if self._log_every and n % self._log_every == 0 and logger.isEnabledFor(logging.INFO):
            logger.info("step %d: sent %.1f KB (%.2f%% of dense), %d sparse / %d dense tensors, "
                        "compress %.1f ms, wait %.1f ms", n, stats.bytes_sent / 1e3,
                        100 * stats.density, stats.sparse_tensors, stats.dense_tensors,
                        stats.compress_ms, stats.wait_ms)
        return stats

    def discard(self) -> None:
        """Drop the step in progress (a state was loaded mid-step)."""
        self._step = CommStats()

"""Where each tensor lives in a group's flat buffer, its ``k``, and the per-step plan of the
selection (samples, candidate capacity): ``GroupLayout``, built on the host, its small tables
cached per device. Also ``num_selected`` (the ``k`` of a tensor) and ``index_dtype``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["num_selected", "index_dtype", "GroupLayout", "StepTables", "expand_counts", "segment_views",
           "sample_plan", "SAMPLED_MIN_NUMEL", "group_runs"]

# Below this many elements a segment has no sample: all its entries are candidates (small
# tensors cost little either way).
SAMPLED_MIN_NUMEL = 1 << 12
# Expected number of sampled entries above the true threshold (at most; see sample_plan):
# more samples make the safe threshold tighter (fewer candidates) for a longer strided read.
# The cap matters only where k is a large share of n (the warm-up's first ratios), where the
# candidates' buffers, not the samples, dominate a step's memory.
_SAMPLE_HITS = 4096
_MIN_SAMPLE_HITS = 16
_MIN_SAMPLES = 512
# Standard deviations of margin below the sampled estimate (an inexact segment costs a redo).
_MARGIN_SIGMAS = 4.0
# On CPU, a group of several tensors of at least this many entries compares its entries with
# their tensor's threshold in THRESHOLD_CHUNKS chunks (``threshold_chunks``).
CHUNKED_MIN_NUMEL = 1 << 20
THRESHOLD_CHUNKS = 8


def num_selected(numel: int, ratio: float) -> int:
    """Number of entries Top-K sends for a tensor: ``k = max(1, ceil(ratio * numel))``.

    Zero-element tensors select nothing (``k = 0``).
    """
    if numel <= 0:
        return 0
    # The small epsilon guards float rounding (0.01 * 300 = 3.0000000000000004 -> 3, not 4).
    return min(numel, max(1, math.ceil(ratio * numel - 1e-9)))


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices while every index fits (numel < 2**31), int64 beyond."""
    return torch.int32 if numel < 2**31 else torch.int64


def group_runs(items: Sequence[Any], nbytes: Callable[[Any], int], key: Callable[[Any], Any],
               cap: Callable[[Any], int]) -> List[List[Any]]:
    """``items`` in order, cut into the runs that form groups: a run ends where the next item
    has another ``key`` (one pipeline run per key), or where it would take the run past
    ``cap(item)`` bytes (an item larger than that is a run alone). Both engines group by it:
    the Horovod planner over a step's gradients, the DDP hook over a bucket's."""
    runs: List[List[Any]] = []
    total, last = 0, None
    for item in items:
        b, k = nbytes(item), key(item)
        if not runs or k != last or total + b > cap(item):
            runs.append([])
            total, last = 0, k
        runs[-1].append(item)
        total += b
    return runs


def sample_plan(n: int, k: int) -> Optional[Tuple[int, int]]:
    """``(stride, m)``: sample ``x[::stride]`` and threshold at its m-th largest magnitude;
    ``None`` when every entry should be a candidate (small tensors, ``k > n / 2``)."""
    if n < SAMPLED_MIN_NUMEL or k > n // 2 or k <= 0:
        return None
    # s samples, expected hits = s*k/n of them above the true threshold. The margin adds
    # ~4 k / sqrt(hits) candidates; balancing sample and candidate costs gives
    # hits ~ (k^2 / n)^(2/3): 256 at 1% of 25M, 16 (the floor) at 0.1% of small tensors.
    hits = min(_SAMPLE_HITS, max(_MIN_SAMPLE_HITS, round((k * k / n) ** (2 / 3))))
    s = min(n, max(_MIN_SAMPLES, math.ceil(hits * n / k)))
    stride = _coprime_stride(max(1, n // s), n)
    s = -(-n // stride)  # len(x[::stride])
    mu = s * k / n
    # Rank in the sample of a threshold safely below the k-th largest.
    m = min(s, math.ceil(mu + _MARGIN_SIGMAS * math.sqrt(mu) + 4))
    return None if m >= s else (stride, m)


def _coprime_stride(stride: int, n: int) -> int:
    """The smallest stride ``>= stride`` that shares no factor with ``n``: a strided sample of a
    matrix then visits every column alike (a stride sharing a factor with the row length
    would see only some columns; gradients like ``delta x^T`` differ by column, and a sample
    of a few columns misjudges the threshold, which costs a redo). ``n``'s factors divide
    every dimension's, so this holds whatever the tensor's shape."""
    while stride > 1 and math.gcd(stride, n) != 1:
        stride += 1
    return stride


def _capacity(stride: int, m: int) -> int:
    """Candidate slots for a segment sampled at ``stride`` and thresholded at the sample's
    ``m``-th largest: ~ ``m * stride`` candidates are expected, with a standard deviation of
    ~ ``sqrt(m) * stride``; room for 8 of those (at least a quarter more, at most twice the
    expectation) plus slack. A fuller buffer only costs a redo (``exact_topk``)."""
    expected = m * stride
    return expected + min(expected, max(expected // 4, math.ceil(8 * math.sqrt(m) * stride))) + 64


class StepTables:
    """``k``-sized index tables kept for the rest of one step, when they are small.

    A step asks for a group's slot tables several times (selection, values, scatter, sparse
    allreduce rows); on a GPU every rebuild is a dozen kernel launches. They are kept until
    ``end_step`` only while they weigh at most ``1/8`` of the group's fp32 bytes (at most
    ``k <= n / 64`` for the slot tables): the warm-up's ratios rebuild them per call, as their
    size would be a share of the group. Nothing is kept from one step to the next.
    """

    def __init__(self, numel: int) -> None:
        self.budget = numel * 4 // 8
        self._tables: Dict[Any, Dict[str, torch.Tensor]] = {}

    def get(self, key, nbytes: int, build: Callable[[], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """The tables under ``key`` built this step, else ``build()`` (kept when ``nbytes`` fits)."""
        tables = self._tables.get(key)
        if tables is None:
            tables = build()
            if nbytes <= self.budget:
                self._tables[key] = tables
        return tables

    def end_step(self) -> None:
        """Forget this step's tables."""
        self._tables.clear()


@dataclass
class GroupLayout:
    """Where each segment lives in the group's flat buffer, its ``k``, and the per-step plan
    (samples, candidate capacity). Built on the host once per (sizes, ks); its per-segment
    index tensors are cached per device, so a step copies nothing from the host.

    Arguments:
        sizes: entries of each segment, in buffer order.
        ks: entries each segment sends, ``0 <= k_s <= n_s``.
    """

    sizes: Tuple[int, ...]
    ks: Tuple[int, ...]
    offsets: Tuple[int, ...] = field(init=False)  # (S + 1,) segment starts, then the total
    numel: int = field(init=False)
    k: int = field(init=False)  # sum of ks: the group's payload entries
    capacity: int = field(init=False)  # candidate slots
    plans: Tuple[Optional[Tuple[int, int]], ...] = field(init=False)
    _device: Dict[torch.device, Dict[str, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)
    _chunks: Dict[torch.device, list] = field(default_factory=dict, init=False, repr=False)
    _samples: int = field(default=0, init=False, repr=False)
    step_tables: StepTables = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.ks) or not self.sizes:
            raise ValueError(f"GroupLayout needs one k per segment, got sizes {self.sizes}, ks {self.ks}")
        offs = [0]
        for n in self.sizes:
            offs.append(offs[-1] + n)
        self.offsets = tuple(offs)
        self.numel = offs[-1]
        self.k = sum(self.ks)
        self.plans = tuple(sample_plan(n, k) if 0 < k < n else None for n, k in zip(self.sizes, self.ks))
        cap = 0
        for n, plan in zip(self.sizes, self.plans):
            cap += n if plan is None else min(n, _capacity(*plan))
        self.capacity = max(1, min(cap, self.numel))
        self.step_tables = StepTables(self.numel)

    @property
    def segments(self) -> int:
        return len(self.sizes)

    def tensors(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """The layout's per-segment and sample index tensors on ``device``, built once per
        device *on* the device from per-segment numbers (a few hundred bytes cross from the
        host). Their size depends on the segments and the sample plan, never on ``k``: the
        ``(K,)`` tables are ``slot_tables()``, built per call, so that a layout kept for the whole run
        holds no memory that grows with the ratio."""
        device = torch.device(device)
        cached = self._device.get(device)
        if cached is not None:
            return cached
        S = self.segments
        sampled = [s for s, plan in enumerate(self.plans) if plan is not None]
        counts = [-(-self.sizes[s] // self.plans[s][0]) for s in sampled]  # len(x[::stride])
        m_pos, taken = [-1] * S, 0  # -1: no sample, threshold -1, every entry is a candidate
        for s, c in zip(sampled, counts):
            m_pos[s] = taken + self.plans[s][1] - 1  # the m-th largest of its samples, once sorted
            taken += c

        def host(values):  # small per-segment numbers, one copy each
            return torch.tensor(values, dtype=torch.long).to(device)

        ks, lengths, offsets = host(self.ks), host(self.sizes), host(self.offsets)
        t = {
            "offsets": offsets,  # (S + 1,)
            "ends": offsets[1:],  # (S,)
            "lengths": lengths,  # (S,)
            "ks": ks,  # (S,)
            "segs": torch.arange(S + 1, device=device),  # (S + 1,)
            "m_pos": host(m_pos),  # (S,)
        }
        self._samples = taken
        if sampled:  # (sampled segments,) tables of the strided samples
            t["sampled"], t["sample_count"] = host(sampled), host(counts)
            t["sample_stride"] = host([self.plans[s][0] for s in sampled])
        self._device[device] = t
        return t

    def sample_tables(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(sample_pos, sample_seg)``, both ``(samples,)`` int64: where step 2 samples and the
        segment of each sample (sample ``j`` of segment ``s`` sits at ``offset_s + j *
        stride_s``). Built per call from the cached per-segment tables: the sample's size
        grows as ``k`` shrinks, and a kept copy would weigh up to the segment's own size."""
        t = self.tensors(device)
        if "sampled" not in t:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return empty, empty
        taken, cnt = self._samples, t["sample_count"]
        if len(cnt) == 1:  # host numbers only: indexing by a device tensor could sync
            s = next(s for s, plan in enumerate(self.plans) if plan is not None)
            pos = torch.arange(taken, device=device) * self.plans[s][0] + self.offsets[s]
            return pos, torch.full((taken,), s, dtype=torch.long, device=device)
        which, j = expand_counts(cnt, taken)  # (samples,) which sampled segment, sample index in it
        sample_seg = t["sampled"][which]
        return t["offsets"][sample_seg] + j * t["sample_stride"][which], sample_seg

    def threshold_chunks(self, device: torch.device) -> list:
        """``[(a, b, segs, lengths)]``: the group cut into the ranges its entries are compared
        with their tensor's threshold in (step 3): entries ``a:b`` take the thresholds
        ``thr[segs]`` (``segs`` None: every segment), each repeated by its ``lengths`` (None:
        one segment, one threshold). One range, unless several tensors on the CPU hold at
        least ``CHUNKED_MIN_NUMEL`` entries: then ``THRESHOLD_CHUNKS``, so that the expanded
        thresholds (12 bytes an entry while ``repeat_interleave`` builds them) weigh an eighth
        of the group. On an accelerator, where each op is a launch, the group takes one range
        (its groups are of at most an eighth of the model: ``TopKSettings.group_bytes``)."""
        device = torch.device(device)
        cached = self._chunks.get(device)
        if cached is not None:
            return cached
        if self.segments == 1:
            chunks = [(0, self.numel, None, None)]
        elif self.numel < CHUNKED_MIN_NUMEL or device.type != "cpu":
            chunks = [(0, self.numel, None, self.tensors(device)["lengths"])]
        else:
            step, chunks = -(-self.numel // THRESHOLD_CHUNKS), []
            for a in range(0, self.numel, step):
                b = min(self.numel, a + step)
                segs = [s for s in range(self.segments) if self.offsets[s] < b and self.offsets[s + 1] > a]
                lens = [min(b, self.offsets[s + 1]) - max(a, self.offsets[s]) for s in segs]
                chunks.append((a, b, torch.tensor(segs).to(device), torch.tensor(lens).to(device)))
        self._chunks[device] = chunks
        return chunks

    def segment_of(self, pos: torch.Tensor) -> torch.Tensor:
        """``(m,)`` int32: the segment of each group position in ``pos`` (int32 or int64; a
        position past the group's end counts in the last segment)."""
        ends = self.tensors(pos.device)["ends"].to(pos.dtype)
        return torch.searchsorted(ends, pos, right=True, out_int32=True).clamp_(max=self.segments - 1)

    def slot_tables(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """The ``(K,)`` tables of the payload's slots, built on ``device`` (a few kernels) and
        kept for the rest of the step when small (``StepTables``; never across steps: at the
        warm-up's ratios they would weigh a quarter of the group). A single tensor's tables
        broadcast from 0-dim tensors where they are constant."""
        device = torch.device(device)
        return self.step_tables.get(("slots", device), 32 * self.k, lambda: self._slot_tables(device))

    def end_step(self) -> None:
        """The step is over: drop its ``StepTables``."""
        self.step_tables.end_step()

    def _slot_tables(self, device: torch.device) -> Dict[str, torch.Tensor]:
        t = self.tensors(device)
        if self.segments == 1:  # no (K,) memory: a slot's rank in its segment is the slot itself
            zero = t["offsets"][0]
            return {"slot_seg": zero.expand(self.k),  # (K,) view of one 0
                    "slot_start": zero, "slot_max": t["lengths"][0] - 1}  # 0-dim
        slot_seg, slot_rank = expand_counts(t["ks"], self.k)
        return {
            "slot_seg": slot_seg,  # (K,) segment of each slot
            "slot_rank": slot_rank,  # (K,) rank in its segment (several segments only)
            "slot_start": t["offsets"][slot_seg],  # (K,) offset of its segment in the group
            "slot_max": t["lengths"][slot_seg] - 1,  # (K,) its segment's last local index
        }


def expand_counts(counts: torch.Tensor, total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(owner, rank)``, both ``(total,)`` int64, for ``counts`` ``(S,)`` summing to ``total``:
    item ``i`` belongs to ``owner[i]`` (``counts[s]`` items each, in order) and is the
    ``rank[i]``-th of its owner's. ``output_size`` keeps ``repeat_interleave`` from reading
    the sum back to the host."""
    owners = torch.arange(counts.numel(), device=counts.device)
    owner = torch.repeat_interleave(owners, counts, output_size=total)
    return owner, torch.arange(total, device=counts.device) - (torch.cumsum(counts, 0) - counts)[owner]


# -- the pipeline's steps -------------------------------------------------------------------------


def segment_views(flat: torch.Tensor, layout: GroupLayout) -> List[torch.Tensor]:
    """The segments of a group buffer, as 1-D views."""
    return [flat[o:o + n] for o, n in zip(layout.offsets, layout.sizes)]



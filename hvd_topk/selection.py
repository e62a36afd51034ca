"""Exact Top-K with error feedback over a *group* of tensors: the one selection pipeline.

A group is a flat buffer that holds several tensors (its *segments*) back to back; each
segment ``s`` of ``n_s`` entries sends its own ``k_s`` entries (DGC's per-tensor ``k``). The
pipeline has five named steps, each a function below, and every step works on the whole
group at once, so a group costs a fixed number of kernel launches however many tensors it
holds, and no step reads a value back to the host (no host-device synchronisation):

1. ``update_``: error feedback ``v += alpha * g`` (DGC momentum correction: ``u = m u +
   alpha g; v += u``; Nesterov ``v += alpha g + m u``; Adam correction: ``v +=`` the rank's
   local Adam step ``lr * m_hat / (sqrt(s_hat) + eps)``). NaN/Inf entries of ``g`` are added
   as 0, and the segment is flagged (``finite_probe``: a per-segment sum of ``g * 0``).
2. ``thresholds``: per segment, from a strided sample of ``|v|`` (deterministic: no RNG), a
   threshold a few standard deviations *below* the sample's estimate of the ``k_s``-th
   largest magnitude (Lin et al. 2018 sample the same way, but keep the estimate); the
   samples of all segments are ranked by one sort of ``(segment, magnitude)`` keys.
3. ``candidates``: the positions with ``|v| > t_s``, compacted into a buffer of fixed
   capacity (``torch.nonzero_static``: a static shape, so nothing waits for a count).
4. ``exact_topk``: a stable sort of the candidates by ``(segment, -|v|)``; slot ``j`` of
   segment ``s`` takes the ``j``-th candidate of ``s``. The candidates of a segment are closed
   upwards in ``|v|``, so when a segment has at least ``k_s`` of them and none were cut off by
   the capacity, this is exactly the set ``torch.topk`` picks (ties: the lower index). When
   not -- an unlucky sample, about once in 10^4 segments -- the group is *flagged inexact*
   on the device; ``TopKCompressor`` redoes it exactly after the step's one host sync
   (``exact_topk_fallback``), so the answer stays exact.
5. the residual write ``v[sent] = 0`` (or ``v - wire(v)`` for narrower wire dtypes) is done by
   ``TopKCompressor.compress_group``, which owns the wire format.

That torch implementation serves every device and dtype. On CPU, float32, the same steps run
fused per segment in one C++ call (``csrc/compensate_cpu.cpp``, ``fused_update_and_select``):
same bits in the residual and velocity, same index set; the tests compare the two.

``select_topk(x, k)`` is the pipeline's steps 2-4 on one tensor (plus the fallback), for
callers that want the indices of a plain tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._cpu_kernel import cpu_kernel

__all__ = ["num_selected", "index_dtype", "select_topk", "GroupLayout", "AdamMoments",
           "adam_direction_", "update_", "thresholds",
           "candidates", "exact_topk", "exact_topk_fallback", "select_group", "fused_update_and_select",
           "finite_probe", "PositionSet", "expand_counts", "SAMPLED_MIN_NUMEL"]

# Below this many elements a segment has no sample: all its entries are candidates (small
# tensors cost little either way).
SAMPLED_MIN_NUMEL = 1 << 12
# Expected number of sampled entries above the true threshold (at most; see _sample_plan):
# more samples make the safe threshold tighter (fewer candidates) for a longer strided read.
_SAMPLE_HITS = 256
_MIN_SAMPLE_HITS = 16
_MIN_SAMPLES = 512
# Standard deviations of margin below the sampled estimate (an inexact segment costs a redo).
_MARGIN_SIGMAS = 4.0
_INT31 = (1 << 31) - 1


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


def _sample_plan(n: int, k: int) -> Optional[Tuple[int, int]]:
    """``(stride, m)``: sample ``x[::stride]`` and threshold at its m-th largest magnitude;
    ``None`` when every entry should be a candidate (small tensors, ``k > n / 2``)."""
    if n < SAMPLED_MIN_NUMEL or k > n // 2 or k <= 0:
        return None
    # s samples, expected hits = s*k/n of them above the true threshold. The margin adds
    # ~4 k / sqrt(hits) candidates; balancing sample and candidate costs gives
    # hits ~ (k^2 / n)^(2/3): 256 at 1% of 25M, 16 (the floor) at 0.1% of small tensors.
    hits = min(_SAMPLE_HITS, max(_MIN_SAMPLE_HITS, round((k * k / n) ** (2 / 3))))
    s = min(n, max(_MIN_SAMPLES, math.ceil(hits * n / k)))
    stride = max(1, n // s)
    s = -(-n // stride)  # len(x[::stride])
    mu = s * k / n
    # Rank in the sample of a threshold safely below the k-th largest.
    m = min(s, math.ceil(mu + _MARGIN_SIGMAS * math.sqrt(mu) + 4))
    return None if m >= s else (stride, m)


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
    _samples: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.ks) or not self.sizes:
            raise ValueError(f"GroupLayout needs one k per segment, got sizes {self.sizes}, ks {self.ks}")
        offs = [0]
        for n in self.sizes:
            offs.append(offs[-1] + n)
        self.offsets = tuple(offs)
        self.numel = offs[-1]
        self.k = sum(self.ks)
        self.plans = tuple(_sample_plan(n, k) if 0 < k < n else None for n, k in zip(self.sizes, self.ks))
        cap = 0
        for n, plan in zip(self.sizes, self.plans):
            # ~ m * stride candidates are expected (the threshold is the sample's m-th
            # largest); twice that plus slack is room enough. Unsampled: all of them.
            cap += n if plan is None else min(n, 2 * plan[0] * plan[1] + 64)
        self.capacity = max(1, min(cap, self.numel))

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

    def slot_tables(self, device: torch.device) -> Dict[str, torch.Tensor]:
        """The ``(K,)`` tables of the payload's slots, built on ``device`` at each call (a few
        kernels; not cached: at the warm-up's ratios they would weigh a quarter of the group).
        A single tensor's tables broadcast from 0-dim tensors where they are constant."""
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

def finite_probe(g: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """``(S,)`` bool, True where a segment of ``g`` holds a NaN/Inf. One pass: the sum of
    ``g * 0`` per segment is 0 exactly, unless some entry was NaN/Inf (``Inf * 0`` is NaN);
    unlike a plain sum it cannot overflow."""
    zeros = g * 0
    if layout.segments == 1:
        sums = zeros.sum().reshape(1)
    else:
        # unsafe=True skips torch's check that the lengths sum to the data's size, which reads
        # them back to the host (a sync); the layout built them so.
        sums = torch.segment_reduce(zeros, "sum", lengths=layout.tensors(g.device)["lengths"], unsafe=True)
    return torch.isnan(sums)


@dataclass
class AdamMoments:
    """Step 1's Adam correction for one group: this rank's *local* Adam moments (flat
    ``(n,)`` buffers in the group's layout, like the residual) and this step's constants.

    ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq`` as in ``torch.optim.Adam``, but of this
    rank's own gradients; ``bias1 = 1 - beta1^t``, ``bias2 = 1 - beta2^t`` (floats, or ``(n,)``
    tensors when the group's tensors have taken different numbers of steps).
    ``update_variance``: False once the variance is frozen (only the first moment moves); an
    ``(n,)`` bool tensor when it is frozen for some of the group's tensors only. ``lr``: the
    step's learning rate (a float or 0-dim tensor), which scales what ``v`` accumulates.
    ``clip``: the direction is clipped to ``[-clip, clip]`` (None: not clipped).
    """

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    max_exp_avg_sq: Optional[torch.Tensor]
    beta1: float
    beta2: float
    eps: float
    bias1: object
    bias2: object
    update_variance: object = True
    lr: object = 1.0
    clip: Optional[float] = None


def adam_direction_(m: AdamMoments, g: torch.Tensor) -> torch.Tensor:
    """The rank's Adam update direction ``(m / bias1) / (sqrt(s / bias2) + eps)`` after
    taking in ``g`` (finite, unscaled), with torch.optim.Adam's arithmetic: ``m = b1 m +
    (1 - b1) g``; unless frozen ``s = b2 s + (1 - b2) g^2`` (AMSGrad: the running max of
    ``s`` is the denominator's); then clipped to ``[-clip, clip]``."""
    m.exp_avg.lerp_(g, 1 - m.beta1)
    if isinstance(m.update_variance, torch.Tensor):  # (n,) bool: some tensors' is frozen
        moved = (m.exp_avg_sq * m.beta2).addcmul_(g, g, value=1 - m.beta2)
        m.exp_avg_sq.copy_(torch.where(m.update_variance, moved, m.exp_avg_sq))
    elif m.update_variance:
        m.exp_avg_sq.mul_(m.beta2).addcmul_(g, g, value=1 - m.beta2)
    if m.update_variance is not False and m.max_exp_avg_sq is not None:
        torch.maximum(m.max_exp_avg_sq, m.exp_avg_sq, out=m.max_exp_avg_sq)
    s = m.exp_avg_sq if m.max_exp_avg_sq is None else m.max_exp_avg_sq
    bias2 = m.bias2 ** 0.5 if not isinstance(m.bias2, torch.Tensor) else m.bias2.sqrt()
    denom = (s.sqrt() / bias2).add_(m.eps)
    d = (m.exp_avg / m.bias1).div_(denom)
    return d if m.clip is None else d.clamp_(-m.clip, m.clip)


def update_(v: torch.Tensor, g: torch.Tensor, layout: GroupLayout, *, alpha=1.0,
            u: Optional[torch.Tensor] = None, momentum: float = 0.0,
            nesterov: bool = False, adam: Optional[AdamMoments] = None) -> torch.Tensor:
    """Step 1, in place: ``v += alpha g`` -- or, with a velocity ``u``, DGC momentum
    correction ``u = m u + alpha g; v += u`` (Nesterov: ``v += alpha g + m u``) -- or, with
    ``adam``, Adam correction: the local moments take in ``alpha g`` and ``v`` accumulates
    the rank's Adam step, ``lr`` times its direction (``adam_direction_``). NaN/Inf entries
    of ``g`` are added as 0.

    Returns:
        ``(S,)`` bool: the segments whose ``g`` held a NaN/Inf.
    """
    bad = finite_probe(g, layout)
    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    if isinstance(alpha, torch.Tensor):  # a loss scale's inverse on the device (not read)
        g, alpha = g.mul_(alpha), 1.0
    if adam is not None:
        if alpha != 1.0:
            g = g * alpha
        d = adam_direction_(adam, g)
        if isinstance(adam.lr, torch.Tensor):
            v.add_(d.mul_(adam.lr.to(d.device)))
        else:
            v.add_(d, alpha=adam.lr)
        return bad
    if u is None:
        v.add_(g, alpha=alpha)
        return bad
    u.mul_(momentum).add_(g, alpha=alpha)
    if nesterov:
        v.add_(g * alpha + momentum * u)
    else:
        v.add_(u)
    return bad


def _magnitude(v: torch.Tensor) -> torch.Tensor:
    """``|v|`` as float32 (exact for every narrower dtype; its bits order like the values),
    or float64 for float64."""
    mag = v.abs()
    return mag if mag.dtype in (torch.float32, torch.float64) else mag.float()


def _order(seg: Optional[torch.Tensor], mag: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts by segment, then magnitude descending, then position.
    ``seg=None``: one segment. For float32 one stable sort of ``2^31 - 1 - bits(|v|)`` keys
    (int32), with the segment in the high word (``seg * 2^32 + ...``, int64) when there are
    several; for float64 (63 bits of magnitude) two stable sorts. ``mag`` is consumed: its
    buffer becomes the keys (a sort of a quarter of a group's entries must not take many
    copies of them)."""
    if mag.dtype == torch.float32:
        keys = mag.view(torch.int32)
        keys.neg_().add_(_INT31)  # in place: larger magnitude, smaller key
        if seg is not None:
            keys = keys.long().add_(seg, alpha=1 << 32)  # the low word is < 2^31: this is an OR
        return torch.sort(keys, stable=True).indices
    by_mag = torch.sort(mag, descending=True, stable=True).indices
    if seg is None:
        return by_mag
    return by_mag.index_select(0, torch.sort(seg.index_select(0, by_mag), stable=True).indices)


def thresholds(mag: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Step 2: ``(S,)`` per-segment thresholds (``mag``'s dtype) from strided samples of
    ``mag = |v|`` (-1 for unsampled segments: every entry passes). One sort ranks every
    segment's samples at once (``_order``)."""
    t = layout.tensors(mag.device)
    sample_pos, sample_seg = layout.sample_tables(mag.device)
    if sample_pos.numel() == 0:
        return torch.full((layout.segments,), -1.0, dtype=mag.dtype, device=mag.device)
    sampled = mag.index_select(0, sample_pos)  # (samples,)
    order = _order(sample_seg, sampled.clone())  # by segment, largest magnitude first
    thr = sampled.index_select(0, order.index_select(0, t["m_pos"].clamp(min=0)))  # (S,)
    return torch.where(t["m_pos"] >= 0, thr, torch.full_like(thr, -1.0))


def candidates(mag: torch.Tensor, thr: torch.Tensor,
               layout: GroupLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 3: ascending positions with ``|v| > t_s``, in a ``(capacity,)`` buffer padded with
    ``numel``, and a 0-dim bool: True when the buffer is full, so some may have been cut (no
    count is taken: a full last slot says as much, and costs nothing)."""
    t = layout.tensors(mag.device)
    if layout.segments == 1:
        passed = mag > thr
    else:
        passed = mag > torch.repeat_interleave(thr, t["lengths"], output_size=layout.numel)  # (n,)
    cand = torch.nonzero_static(passed, size=layout.capacity, fill_value=layout.numel).squeeze(1)
    if layout.capacity >= layout.numel:  # room for every entry: nothing can be cut
        return cand, torch.zeros((), dtype=torch.bool, device=mag.device)
    return cand, cand[-1] < layout.numel


def exact_topk(mag: torch.Tensor, cand: torch.Tensor, full: torch.Tensor,
               layout: GroupLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 4: the ``k_s`` largest of each segment among the candidates.

    Returns:
        ``(sel, inexact)``: ``(K,)`` int64 positions in the group, segment by segment, largest
        first (ties: the lower position); and a 0-dim bool, True when some segment had fewer
        than ``k_s`` candidates or the candidate buffer was full (``full``) -- then ``sel`` is a
        valid but maybe not the exact selection, and ``exact_topk_fallback`` must replace it.
    """
    t = layout.tensors(mag.device)
    n = layout.numel
    valid = cand < n  # (cap,)
    pos = cand.clamp_(max=n - 1)  # in place: the candidates are this step's own
    cmag = mag.index_select(0, pos)  # (cap,), consumed by _order
    if layout.segments == 1:
        # Padding sorts last: the largest key, after the real zeros (stable: they come first).
        cmag.masked_fill_(~valid, _PAD_MAG[cmag.dtype])
        order = _order(None, cmag)
        del cmag
        have = valid.sum().reshape(1)  # (1,)
        take = order[:layout.k]  # k <= capacity (the layout makes room for at least k)
    else:
        slots = layout.slot_tables(mag.device)
        seg = torch.searchsorted(t["ends"], pos, right=True)  # (cap,) segment of each candidate
        seg.masked_fill_(~valid, layout.segments)  # padding sorts last
        order = _order(seg, cmag)  # stable: ties keep ascending positions
        del cmag
        first = torch.searchsorted(seg.index_select(0, order), t["segs"])  # (S + 1,) first ranks
        del seg
        have = first[1:] - first[:-1]  # (S,) candidates per segment
        take = order.index_select(0, (first.index_select(0, slots["slot_seg"]) + slots["slot_rank"])
                                  .clamp(max=layout.capacity - 1))
    sel = pos.index_select(0, take)  # (K,)
    inexact = (have < t["ks"]).any() | full
    return sel, inexact


# A magnitude whose _order key is the largest (float32: +0.0 gives 2^31 - 1, the largest int32
# key; float64 sorts by value, descending: -1 is below every magnitude).
_PAD_MAG = {torch.float32: 0.0, torch.float64: -1.0}


def exact_topk_fallback(v: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """The exact selection without a sample: ``torch.topk`` per segment (one call per
    segment; used only for groups ``exact_topk`` flagged, after the step's host sync)."""
    parts = []
    for off, n, k in zip(layout.offsets, layout.sizes, layout.ks):
        if k:
            mag = _magnitude(v[off:off + n])
            parts.append(torch.topk(mag, k, sorted=True).indices + off)
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=v.device)
    return torch.cat(parts)


def select_group(v: torch.Tensor, layout: GroupLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4 on an updated group buffer ``v``: ``(sel (K,), inexact (0-dim bool))``."""
    if layout.k == 0:
        none = torch.zeros(0, dtype=torch.long, device=v.device)
        return none, torch.zeros((), dtype=torch.bool, device=v.device)
    mag = _magnitude(v)  # (n,)
    thr = thresholds(mag, layout)
    cand, full = candidates(mag, thr, layout)
    return exact_topk(mag, cand, full, layout)


def select_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64) of the ``k`` largest-magnitude entries of a 1-D tensor.

    Arguments:
        x: 1-D tensor, any floating dtype, any device, finite. Not modified.
        k: how many to select, ``0 <= k <= x.numel()``.

    Returns:
        ``(k,)`` int64 tensor of distinct indices, the set ``torch.topk(x.abs(), k)`` picks
        (ties: the lower index), largest first. Reads the inexact flag back (a host sync).
    """
    n = x.numel()
    if k >= n:
        return torch.arange(n, device=x.device)
    layout = GroupLayout((n,), (k,))
    sel, inexact = select_group(x, layout)
    return exact_topk_fallback(x, layout) if bool(inexact) else sel


def fused_update_and_select(v: torch.Tensor, u: Optional[torch.Tensor], g: torch.Tensor, k: int,
                            momentum: float = 0.0, alpha: float = 1.0, zero_v: bool = True,
                            zero_u: bool = True):
    """Steps 1-4 and the zeroing of step 5 for one segment in a single CPU kernel call, or
    ``None`` where the kernel does not apply (not float32 on CPU, ``alpha`` not a power of two,
    no kernel): then the torch steps above run.

    ``u is None``: ``v += alpha * g``; else ``u = momentum * u + alpha * g``, ``v += u``.
    NaN/Inf entries of ``g`` are added as 0; an entry of ``u`` or ``v`` that overflows is reset
    to 0 (and reported). Then the exact top-k of ``|v|`` (ties: the lower index) and, with
    ``zero_v`` / ``zero_u``, ``v[idx] = 0`` / ``u[idx] = 0``. The same bits in ``v`` and ``u``
    and the same index set as the torch steps.

    Returns:
        ``(idx, vals, u_vals, finite)``: ``(k,)`` ascending int64 indices, ``v`` there (before
        zeroing), ``u`` there (before masking; ``None`` without ``u``), and whether ``g`` and
        the updated ``v`` were finite.
    """
    n = v.numel()
    if n == 0 or not 0 < k <= n or any(t is not None and (t.dtype != torch.float32 or t.shape != v.shape
                                                          or t.device.type != "cpu")
                                       for t in (v, g, u)):
        return None
    if math.frexp(alpha)[0] != 0.5:
        return None  # the kernel multiplies and adds separately: bitwise torch's only when exact
    kernel = cpu_kernel()
    if kernel is None:
        return None
    plan = _sample_plan(n, k)
    stride, m = plan if plan is not None else (0, 0)  # stride 0: every entry is a candidate
    idx, vals, u_vals, g_ok, v_ok = kernel.topk_update(v, _EMPTY if u is None else u, g.contiguous(),
                                                       float(momentum), float(alpha), k, stride,
                                                       m, zero_v, zero_u)
    return idx, vals, (u_vals if u is not None else None), g_ok and v_ok


_EMPTY = torch.empty(0)


def segment_views(flat: torch.Tensor, layout: GroupLayout) -> List[torch.Tensor]:
    """The segments of a group buffer, as 1-D views."""
    return [flat[o:o + n] for o, n in zip(layout.offsets, layout.sizes)]


def stacked_probe(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """``(len(tensors),)`` bool on the first tensor's device, True where a tensor holds a
    NaN/Inf. Their max-abs norms in one multi-tensor kernel (``torch._foreach_norm``, as
    ``clip_grad_norm_`` uses; a max cannot overflow), stacked: no host sync, and a handful of
    kernels for the hundred small tensors (norms, biases) a model leaves dense."""
    if not tensors:
        return None
    device = tensors[0].device
    real = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
    # An empty tensor has no max-abs norm; it is finite: probe one zero in its place.
    real = [t if t.numel() else t.new_zeros(1) for t in real]
    norms = torch._foreach_norm(real, float("inf"))
    return ~torch.isfinite(torch.stack([n.to(device=device, dtype=torch.float32) for n in norms]))


class PositionSet:
    """``k`` distinct positions of a group of ``n`` entries, some maybe marked invalid, kept
    compactly from the selection until step 5 (``TopKCompressor``'s commit): as int32
    positions, or -- when that is smaller, at ratios above 1/32 such as the warm-up's -- as a
    bitmask of ``n`` bits. Whatever the ratio it weighs at most ``min(4 k, n / 8)`` bytes,
    against ``8 k`` for the selection's own int64 positions. Encoding and decoding run on
    the device and read nothing back to the host.

    Arguments:
        positions: ``(k,)`` int64, distinct, in ``[0, n)``, any order.
        n: the group's entries.
        valid: ``(k,)`` bool, or None (all valid): positions to leave out.
    """

    def __init__(self, positions: torch.Tensor, n: int, valid: Optional[torch.Tensor] = None) -> None:
        self.n, self.k = n, positions.numel()
        self.device = positions.device
        self.bits = self.positions32 = None
        self.partial = valid is not None
        if valid is None and 4 * self.k <= (n + 7) // 8 and n < 2**31:
            self.positions32 = positions.to(torch.int32)
            return
        mask = torch.zeros(-(-n // 8) * 8, dtype=torch.bool, device=self.device)
        if valid is None:
            mask.index_fill_(0, positions, True)
        else:
            mask.index_put_((positions,), valid)
        self.bits = (mask.view(torch.uint8).view(-1, 8) * _bit_weights(self.device)).sum(1, dtype=torch.uint8)

    def positions(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(positions, valid)``: ``(k,)`` int64 positions (ascending from a bitmask) and
        ``(k,)`` bool, or None when every position is valid. Invalid slots hold ``n - 1``."""
        if self.positions32 is not None:
            return self.positions32.long(), None
        mask = (self.bits.unsqueeze(1) & _bit_weights(self.device)).ne(0).reshape(-1)[:self.n]
        pos = torch.nonzero_static(mask, size=self.k, fill_value=self.n).squeeze(1)  # (k,)
        if not self.partial:
            return pos, None  # exactly k bits are set
        return pos.clamp(max=self.n - 1), pos < self.n


def _bit_weights(device: torch.device) -> torch.Tensor:
    """``(8,)`` uint8 1, 2, 4, ..., 128, made on the device (no copy from the host)."""
    return torch.bitwise_left_shift(torch.ones(8, dtype=torch.uint8, device=device),
                                    torch.arange(8, dtype=torch.uint8, device=device))

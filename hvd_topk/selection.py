"""Exact Top-K with error feedback over a *group* of tensors: the one selection pipeline.

A group is a flat buffer that holds several tensors (its *segments*) back to back; each
segment ``s`` of ``n_s`` entries sends its own ``k_s`` entries (DGC's per-tensor ``k``). The
pipeline has five named steps, each a function below, and every step works on the whole
group at once, so a group costs a fixed number of kernel launches however many tensors it
holds, and no step reads a value back to the host (no host-device synchronisation):

1. ``update_``: error feedback ``v += alpha * g`` (DGC momentum correction: ``u = m u +
   alpha g; v += u``; Nesterov ``v += alpha g + m u``); ``adam_update_``, Adam correction:
   ``v +=`` the rank's local Adam step ``lr * m_hat / (sqrt(s_hat) + eps)``, and steps 2-4
   rank by ``AdamMoments.score``. NaN/Inf entries of ``g`` are added
   as 0, and the segment is flagged (``finite_probe``: per-segment max-abs norms).
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
5. ``residual_write_``, once the step is applied (the commit): ``v[sent] = 0``, or what the
   wire did not carry for a narrower wire dtype or a loss scale; DGC's momentum masking.

That torch implementation serves every device and dtype. On CPU, float32, the same steps run
fused per segment in one C++ call (``csrc/compensate_cpu.cpp``, ``fused_update_and_select``):
same bits in the residual and velocity, same index set; the tests compare the two.

``select_topk(x, k)`` is the pipeline's steps 2-4 on one tensor (plus the fallback), for
callers that want the indices of a plain tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ._cpu_kernel import cpu_kernel, zero_at
from .layout import (SAMPLED_MIN_NUMEL, GroupLayout, expand_counts, index_dtype, num_selected,
                     sample_plan, segment_views)
from .positions import PositionSet
from .bit_topk import exact_topk_by_bits
from .wire import carried, is_one
from .update import AdamMoments, adam_direction_, adam_update_, finite_probe, stacked_probe, update_

__all__ = ["num_selected", "index_dtype", "select_topk", "GroupLayout", "AdamMoments",
           "adam_direction_", "adam_update_", "update_", "thresholds", "candidates", "exact_topk",
           "exact_topk_fallback", "select_group", "fused_update_and_select", "select", "Selection",
           "selected_values", "residual_write_",
           "finite_probe", "stacked_probe", "PositionSet", "expand_counts", "segment_views",
           "magnitude", "segment_order", "SAMPLED_MIN_NUMEL"]

_INT31 = (1 << 31) - 1


def magnitude(v: torch.Tensor) -> torch.Tensor:
    """``|v|`` as float32 (exact for every narrower dtype; its bits order like the values),
    or float64 for float64."""
    mag = v.abs()
    return mag if mag.dtype in (torch.float32, torch.float64) else mag.float()


def segment_order(seg: Optional[torch.Tensor], mag: torch.Tensor) -> torch.Tensor:
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


def thresholds(v: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """Step 2: ``(S,)`` per-segment thresholds (``magnitude``'s dtype) from strided samples
    of ``|v|`` (-1 for unsampled segments: every entry passes). One sort ranks every
    segment's samples at once (``segment_order``)."""
    t = layout.tensors(v.device)
    sample_pos, sample_seg = layout.sample_tables(v.device)
    if sample_pos.numel() == 0:
        dtype = torch.float64 if v.dtype == torch.float64 else torch.float32  # magnitude's
        return torch.full((layout.segments,), -1.0, dtype=dtype, device=v.device)
    sampled = magnitude(v.index_select(0, sample_pos))  # (samples,)
    order = segment_order(sample_seg, sampled.clone())  # by segment, largest magnitude first
    thr = sampled.index_select(0, order.index_select(0, t["m_pos"].clamp(min=0)))  # (S,)
    return torch.where(t["m_pos"] >= 0, thr, torch.full_like(thr, -1.0))


def candidates(v: torch.Tensor, thr: torch.Tensor,
               layout: GroupLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 3: ascending positions with ``|v| > t_s`` (int32 when the buffer holds more than
    an eighth of the group), in a ``(capacity,)`` buffer padded with ``numel``, and a 0-dim
    bool: True when the buffer is full, so some may have been cut (no count is taken: a full
    last slot says as much, and costs nothing). No ``(n,)`` buffer of ``|v|`` is made, and a
    large group's thresholds are expanded a chunk at a time (``threshold_chunks``)."""
    chunks = layout.threshold_chunks(v.device)
    passed = None if len(chunks) == 1 else torch.empty(layout.numel, dtype=torch.bool, device=v.device)
    for a, b, segs, lengths in chunks:
        x = v[a:b]
        tc = thr if lengths is None else torch.repeat_interleave(
            thr if segs is None else thr.index_select(0, segs), lengths, output_size=b - a)
        # |v| > t as v > t or v < -t, compared in thr's dtype (magnitude's: exact for every
        # narrower dtype of v): two bytes per entry instead of an (n,) |v| (NaN: neither).
        out = torch.gt(x, tc) if passed is None else torch.gt(x, tc, out=passed[a:b])
        out.logical_or_(torch.lt(x, tc.neg_()))  # thr, or its expansion: this call's own
        passed = out if passed is None else passed
    del thr
    cand = torch.nonzero_static(passed, size=layout.capacity, fill_value=layout.numel).squeeze(1)
    del passed
    if layout.capacity * 8 >= layout.numel and layout.numel < 2**31:
        # A large share of the group (the warm-up's ratios): int32 positions halve what the
        # next steps keep alive; at small ratios the buffer is small and one op fewer counts.
        cand = cand.to(torch.int32)
    if layout.capacity >= layout.numel:  # room for every entry: nothing can be cut
        return cand, torch.zeros((), dtype=torch.bool, device=v.device)
    return cand, cand[-1] < layout.numel


def exact_topk(v: torch.Tensor, cand: torch.Tensor, full: torch.Tensor,
               layout: GroupLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 4: the ``k_s`` largest of each segment among the candidates.

    Returns:
        ``(sel, inexact)``: ``(K,)`` int64 positions in the group, in ascending order (so
        segment by segment; ties at a segment's ``k_s``-th magnitude: the lower positions),
        the CPU kernel's order: the same payload bytes; and a 0-dim bool, True when some segment had fewer
        than ``k_s`` candidates or the candidate buffer was full (``full``) -- then ``sel`` is a
        valid but maybe not the exact selection, and ``exact_topk_fallback`` must replace it.
    """
    t = layout.tensors(v.device)
    n = layout.numel
    valid = cand < n  # (cap,)
    pos = cand.clamp_(max=n - 1)  # in place: the candidates are this step's own
    cmag = magnitude(v.index_select(0, pos))  # (cap,), consumed by segment_order
    if cand.dtype == torch.int32 and cmag.dtype == torch.float32:
        # A large share of the group (the warm-up's ratios): a sort of the candidates would
        # hold some 18 bytes per candidate; counting by bits holds under 4.
        return exact_topk_by_bits(cmag, pos, valid, full, layout)
    if layout.segments == 1:
        # Padding sorts last: the largest key, after the real zeros (stable: they come first).
        cmag.masked_fill_(~valid, _PAD_MAG[cmag.dtype])
        order = segment_order(None, cmag)
        del cmag
        have = valid.sum().reshape(1)  # (1,)
        take = order[:layout.k]  # k <= capacity (the layout makes room for at least k)
    else:
        slots = layout.slot_tables(v.device)
        seg = torch.searchsorted(t["ends"], pos, right=True)  # (cap,) segment of each candidate
        seg.masked_fill_(~valid, layout.segments)  # padding sorts last
        order = segment_order(seg, cmag)  # stable: ties keep ascending positions
        del cmag
        first = torch.searchsorted(seg.index_select(0, order), t["segs"])  # (S + 1,) first ranks
        del seg
        have = first[1:] - first[:-1]  # (S,) candidates per segment
        take = order.index_select(0, (first.index_select(0, slots["slot_seg"]) + slots["slot_rank"])
                                  .clamp(max=layout.capacity - 1))
    inexact = (have < t["ks"]).any() | full
    return _ascending(take, pos), inexact


def _ascending(take: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``(K,)`` int64: the positions ``pos[take]`` in ascending order (the candidates are
    ascending: sorting the ``K`` candidate ranks sorts the positions)."""
    sel = pos.index_select(0, take.sort().values)
    return sel if sel.dtype == torch.int64 else sel.long()


# A magnitude whose segment_order key is the largest (float32: +0.0 gives 2^31 - 1, the largest int32
# key; float64 sorts by value, descending: -1 is below every magnitude).
_PAD_MAG = {torch.float32: 0.0, torch.float64: -1.0}


def exact_topk_fallback(v: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
    """The exact selection without a sample: ``torch.topk`` per segment, in ascending position
    order (one call per segment; used only for groups ``exact_topk`` flagged, after the step's host sync)."""
    parts = []
    for off, n, k in zip(layout.offsets, layout.sizes, layout.ks):
        if k:
            mag = magnitude(v[off:off + n])
            parts.append(torch.topk(mag, k, sorted=False).indices.sort().values + off)  # ascending
    if not parts:
        return torch.zeros(0, dtype=torch.long, device=v.device)
    return torch.cat(parts)


def select_group(v: torch.Tensor, layout: GroupLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """Steps 2-4 on an updated group buffer ``v``: ``(sel (K,), inexact (0-dim bool))``."""
    if layout.k == 0:
        none = torch.zeros(0, dtype=torch.long, device=v.device)
        return none, torch.zeros((), dtype=torch.bool, device=v.device)
    # No (n,) magnitude buffer outlives a step: each step takes |v| of what it reads.
    thr = thresholds(v, layout)
    cand, full = candidates(v, thr, layout)
    return exact_topk(v, cand, full, layout)


def select_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64) of the ``k`` largest-magnitude entries of a 1-D tensor.

    Arguments:
        x: 1-D tensor, any floating dtype, any device, finite. Not modified.
        k: how many to select, ``0 <= k <= x.numel()``.

    Returns:
        ``(k,)`` int64 tensor of distinct indices, the set ``torch.topk(x.abs(), k)`` picks
        (ties: the lower index), in ascending order. Reads the inexact flag back (a host sync).
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
    plan = sample_plan(n, k)
    stride, m = plan if plan is not None else (0, 0)  # stride 0: every entry is a candidate
    idx, vals, u_vals, g_ok, v_ok = kernel.topk_update(v, _EMPTY if u is None else u, g.contiguous(),
                                                       float(momentum), float(alpha), k, stride,
                                                       m, zero_v, zero_u)
    return idx, vals, (u_vals if u is not None else None), g_ok and v_ok


_EMPTY = torch.empty(0)


@dataclass
class Selection:
    """One group's selection (steps 1-4 done; step 5, the residual write, waits for the
    commit): ``positions`` ``(K,)`` int64 group positions; ``values`` ``(K,)`` the residual
    there (an entry that overflowed is sent as 0, and flagged); ``bad`` ``(S,)`` bool, the
    segments whose gradient held a NaN/Inf; ``inexact`` a 0-dim device bool (True: redo it
    exactly after the step's host sync), or ``None`` for the CPU kernel's always exact
    selection, whose ``bad`` is a host tensor."""

    positions: torch.Tensor
    values: torch.Tensor
    bad: torch.Tensor
    inexact: Optional[torch.Tensor]


def select(residual: torch.Tensor, g: torch.Tensor, layout: GroupLayout, *, alpha=1.0,
           velocity: Optional[torch.Tensor] = None, momentum: float = 0.0, nesterov: bool = False,
           adam: Optional[AdamMoments] = None, fused: bool = True, owned: bool = False) -> Selection:
    """Steps 1-4 on a group: the update of ``residual`` (and ``velocity``) in place, then the
    exact top-k of each segment -- by the fused CPU kernel where it applies (float32 on CPU,
    no Nesterov or Adam, ``fused``; the same bits), else by the torch steps above. Under Adam
    correction the top-k is of ``adam.score(residual)`` (``AdamMoments.score``); the values
    are the residual's. ``owned``: ``g`` is this step's own buffer, which step 1 may
    overwrite (``update_``, ``adam_update_``)."""
    if fused and not nesterov and adam is None:
        done = _fused(residual, velocity, g, layout, momentum, alpha)
        if done is not None:
            return done
    if adam is None:
        bad = update_(residual, g, layout, alpha=alpha, u=velocity, momentum=momentum,
                      nesterov=nesterov, owned=owned)  # 1.
        score = residual
    else:
        bad, spent = adam_update_(residual, g, layout, adam, alpha=alpha, owned=owned)  # 1.
        score = adam.score(residual, out=spent)
        del spent
    sel, inexact = select_group(score, layout)  # 2.-4.
    del score
    vals, bad = selected_values(residual, sel, bad, layout)
    return Selection(sel, vals, bad, inexact)


def selected_values(residual: torch.Tensor, sel: torch.Tensor, bad: torch.Tensor,
                    layout: GroupLayout) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(values, bad)``: the residual at ``sel``; an entry that overflowed (e + g beyond the
    dtype) has the largest magnitude, so it is among them: send 0 there and flag it."""
    vals = residual.index_select(0, sel)  # (K,)
    overflow = ~torch.isfinite(vals)
    vals.masked_fill_(overflow, 0)
    if layout.segments == 1:
        return vals, bad | overflow.any()
    per_seg = torch.zeros(layout.segments, dtype=torch.int32, device=residual.device)
    per_seg.index_add_(0, layout.slot_tables(residual.device)["slot_seg"], overflow.to(torch.int32))
    return vals, bad | (per_seg > 0)


def _fused(residual, velocity, g, layout: GroupLayout, momentum, alpha) -> Optional[Selection]:
    """Steps 1-4 through the fused CPU kernel, one call per segment, or ``None`` where it does
    not apply (then the torch steps run)."""
    if residual.device.type != "cpu" or residual.dtype != torch.float32 or cpu_kernel() is None:
        return None
    alpha = float(alpha)  # a CPU tensor scale: read on the host, no device involved
    parts = []
    for s, (vs, gs) in enumerate(zip(segment_views(residual, layout), segment_views(g, layout))):
        if layout.ks[s] == 0:
            continue
        us = None if velocity is None else velocity[layout.offsets[s]:layout.offsets[s + 1]]
        out = fused_update_and_select(vs, us, gs, layout.ks[s], momentum, alpha, zero_v=False, zero_u=False)
        if out is None:
            if parts:  # the kernel's conditions are the same for every segment of a group
                raise AssertionError("CPU kernel declined a segment after accepting another")
            return None
        parts.append((s, out))
    if not parts:
        return None
    if len(parts) == 1 and layout.segments == 1:
        sel, vals, _, finite = parts[0][1]
        return Selection(sel, vals, torch.tensor([not finite]), None)
    sel = torch.cat([idx + layout.offsets[s] for s, (idx, _, _, _) in parts])
    vals = torch.cat([p[1] for _, p in parts])
    flags = [False] * layout.segments
    for s, (_, _, _, finite) in parts:
        flags[s] = not finite
    return Selection(sel, vals, torch.tensor(flags), None)


def residual_write_(residual: torch.Tensor, velocity: Optional[torch.Tensor], sent: PositionSet,
                    applied: Optional[PositionSet], scale, value_dtype: torch.dtype, *,
                    masking: bool = True) -> None:
    """Step 5, for a group whose step is applied: ``residual[sent] = c - wire(c)`` (0 when the
    wire carries the values exactly) and, with ``masking`` and a ``velocity``, DGC's momentum
    factor masking ``velocity[sent] = 0``. ``applied`` (the sparse allreduce): only the
    positions some owner kept are written; the rest stay owed."""
    if sent.k == 0:
        return
    masking = masking and velocity is not None  # no stale momentum on what was sent
    if applied is not None:
        # Some slots are invalid (padding at n - 1, maybe a valid position too): add each
        # slot's change, -0.0 where invalid, so that duplicates leave the right bits
        # (c + -(wire) is c - wire exactly; u + -u is +0, as a fill).
        pos, ok = applied.positions()
        c = residual.index_select(0, pos)
        residual.index_put_((pos,), torch.where(ok, -carried(c, scale, value_dtype), -0.0), accumulate=True)
        if masking:
            velocity.index_put_((pos,), torch.where(ok, -velocity.index_select(0, pos), -0.0),
                                accumulate=True)
        return
    sel, _ = sent.positions()
    if value_dtype == residual.dtype and is_one(scale):
        # Both zeroings in one pass of prefetched writes (the CPU kernel), else scatter_ of a
        # value, not index_fill_: the same bits, and on CPU some 40% less time for these
        # scattered writes, most of which miss the cache.
        if zero_at(residual, velocity if masking else None, sel):
            return
        residual.scatter_(0, sel, 0.0)
    else:
        c = residual.index_select(0, sel)  # (K,)
        c = c.masked_fill(~torch.isfinite(c), 0)  # an overflow was sent as 0 (selected_values)
        residual.index_copy_(0, sel, c - carried(c, scale, value_dtype))
    if masking:
        velocity.scatter_(0, sel, 0.0)

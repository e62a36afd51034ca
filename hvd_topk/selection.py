"""Exact Top-K selection by magnitude: stateless functions.

``select_topk(x, k)`` returns the indices of the ``k`` entries of ``x`` with the largest
``|x|`` -- the same set ``torch.topk(x.abs(), k)`` picks, up to ties.
``compensate_and_select(buf, g, k)`` does ``buf += g`` in place and selects from the result
in the same pass over memory (error feedback's compensate + select);
``compensate_finite_and_select`` also keeps NaN/Inf out of ``buf``, and
``momentum_compensate_finite_and_select`` adds DGC's momentum correction to the same walk.

For large tensors both avoid a full ``torch.topk`` (~30-70x slower than a copy on CPU) with
the sampled threshold of Deep Gradient Compression (Lin et al., 2018), made exact:

1. read a strided sample of ``|x|`` (deterministic: no RNG state is touched);
2. take a threshold ``t`` a few standard deviations *below* the sample's estimate of the
   k-th largest magnitude, so that, with high probability, more than ``k`` entries pass;
3. find the candidates ``|x| > t`` in one pass (typically ~1.3 k of them);
4. if at least ``k`` passed, run an exact ``topk`` over the candidates only -- the passing
   set is closed upwards in ``|x|``, so it holds a true top-k; otherwise fall back to the
   full ``torch.topk``. Either way the answer is exact.

Step 3 on CPU walks ``x`` in cache-sized chunks and avoids torch's scalar loops: per chunk,
``hardshrink(x, t)`` (``x`` where ``|x| > t``, else 0: abs and compare in one vectorised
kernel; ``ge`` into a bool tensor is a scalar loop, ~3x slower), a vectorised copy to bool,
then NumPy's ``flatnonzero`` of the bool mask (it skips zero 8-byte words; ``torch.nonzero``
is ~4x slower on CPU). With ``compensate_and_select`` the chunk's ``add_`` runs first, while
the chunk is in cache, so the buffer and the gradient are read once. Step 4 uses a
histogram of the candidates' magnitudes (``_top_mask``) instead of a ``topk`` over all of
them. On accelerators one pass over the whole tensor is best (kernel launches, not cache
misses, are what a loop adds). For float32 on CPU the compensate / finite check / candidate
walk runs in a small C++ kernel when it is available (``_cpu_kernel.py``,
``csrc/compensate_cpu.cpp``): the same bits, about twice as fast; the torch/NumPy path above
is its fallback and its reference in the tests. ``fused_update_and_select`` goes further and
runs steps 1-4 and the zeroing of the sent entries in one kernel call, with the candidates'
values kept by the scan (what ``TopKCompressor.compress`` uses on CPU).

``scripts/bench_compression.py`` measures it against ``torch.topk`` and one copy.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Tuple

import numpy as np
import torch

from ._cpu_kernel import cpu_kernel

__all__ = ["num_selected", "index_dtype", "select_topk", "compensate_and_select",
           "compensate_finite_and_select", "momentum_compensate_finite_and_select", "all_finite",
           "nonfinite_among", "fused_update_and_select",
           "SAMPLED_MIN_NUMEL", "CPU_CHUNK"]

# Below this many elements a full torch.topk is already cheap; the sampled path only pays
# for itself on large tensors.
SAMPLED_MIN_NUMEL = 1 << 16
# The same for fused_update_and_select, whose sample is a cheap loop inside the kernel (and
# whose candidates cost more than its samples: keep the sample of a small tensor small).
_FUSED_SAMPLED_MIN_NUMEL = 1 << 12
_FUSED_MIN_SAMPLES = 512
# Expected number of sampled entries above the true threshold (at most; see _sample_plan):
# more samples make the safe threshold tighter (fewer candidates) for a longer strided read.
_SAMPLE_HITS = 256
_MIN_SAMPLE_HITS = 16
# Standard deviations of margin below the sampled estimate (a fallback costs one full topk).
_MARGIN_SIGMAS = 4.0
# Elements per thread and step of the candidate pass on CPU (a multiple of 8): 1 MiB of fp32
# per thread, so the chunk, its hardshrink and its mask stay in cache between the small ops.
CPU_CHUNK = 1 << 18


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


def select_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64) of the ``k`` largest-magnitude entries of a 1-D tensor.

    Arguments:
        x: 1-D tensor, any floating dtype, any device. Not modified.
        k: how many to select, ``0 <= k <= x.numel()``.

    Returns:
        ``(k,)`` int64 tensor of distinct indices, the set ``torch.topk(x.abs(), k)`` picks
        (up to ties); ascending on the sampled path, in ``torch.topk``'s order otherwise.
    """
    n = x.numel()
    if k >= n:
        return torch.arange(n, device=x.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    plan = _sample_plan(n, k)
    if plan is None:
        return _full_topk(x, k)
    stride, m = plan
    threshold = _threshold(x[::stride], m)
    return _select_among(x, _candidates(x, threshold), k)


def compensate_and_select(buf: torch.Tensor, g: torch.Tensor, k: int,
                          alpha: float = 1.0) -> torch.Tensor:
    """``buf += alpha * g`` in place, then the indices of the ``k`` largest ``|buf|``.

    The same result as ``buf.add_(g, alpha=alpha); select_topk(buf, k)`` -- bitwise the same
    ``buf`` and the same index set -- but on the sampled path the add and the candidate pass
    share one walk over memory: the threshold comes from a strided sample of
    ``buf + alpha * g`` taken *before* the update, then each cache-sized chunk is added,
    thresholded and scanned while it is in cache.

    Arguments:
        buf: 1-D floating tensor, updated in place (the error-feedback buffer).
        g: 1-D tensor of ``buf``'s shape, dtype and device (the gradient). Not modified.
        k: how many to select, ``0 <= k <= buf.numel()``.
        alpha: scale of ``g``. ``1.0`` runs a plain ``add_`` (no multiply).

    Returns:
        ``(k,)`` int64 tensor of distinct indices into ``buf``, the set
        ``torch.topk(buf.abs(), k)`` picks after the update (up to ties); ascending on the
        sampled path, in ``torch.topk``'s order otherwise.
    """
    return _compensate_and_select(buf, g, k, alpha, check=False)[0]


def compensate_finite_and_select(buf: torch.Tensor, g: torch.Tensor, k: int,
                                 alpha: float = 1.0) -> Tuple[torch.Tensor, bool]:
    """``compensate_and_select`` that never lets a NaN/Inf of ``g`` into ``buf``.

    NaN/Inf entries of ``g`` are added as 0 (so ``buf`` stays finite if it was); the check
    rides on the same walk over memory (a sum of each chunk of ``g`` before it is added,
    exact-checked only when that sum is not finite).

    Returns:
        ``(indices, finite)``: the indices as ``compensate_and_select`` returns them, and
        whether every entry of ``g`` was finite.
    """
    return _compensate_and_select(buf, g, k, alpha, check=True)


def momentum_compensate_finite_and_select(v: torch.Tensor, u: torch.Tensor, g: torch.Tensor, k: int,
                                          momentum: float, alpha: float = 1.0) -> Tuple[torch.Tensor, bool]:
    """DGC momentum correction's update and the selection, in one walk over memory:
    ``u = momentum * u + alpha * g``; ``v += u``; the top-k of ``|v|`` (NaN/Inf entries of
    ``g`` added as 0; an entry of ``u`` or ``v`` that overflows is reset to 0, and reported).

    The same bits as ``u.mul_(momentum).add_(g, alpha=alpha)`` followed by
    ``compensate_finite_and_select(v, u, k)`` (which is what runs without the CPU kernel).

    Returns:
        ``(indices, finite)`` as ``compensate_finite_and_select``.
    """
    n = v.numel()
    plan = _sample_plan(n, k) if 0 < k < n else None
    kernel = _kernel_for(v, alpha) if plan is not None else None
    if kernel is None:
        g, finite = _finite_or_zeroed(g, True)
        _add_(u.mul_(momentum), g, alpha)
        if not all_finite(u):  # an overflowing velocity entry is reset to 0, and reported
            torch.nan_to_num_(u, nan=0.0, posinf=0.0, neginf=0.0)
            finite = False
        idx, ok = _compensate_and_select(v, u, k, 1.0, check=True)
        return idx, finite and ok
    stride, m = plan
    u_s = _add_(u[::stride] * momentum, torch.nan_to_num(g[::stride], nan=0.0, posinf=0.0,
                                                           neginf=0.0), alpha)
    threshold = _threshold(torch.nan_to_num(v[::stride] + u_s, nan=0.0, posinf=0.0, neginf=0.0), m)
    cap = _kernel_cap(plan)
    result = kernel.momentum_candidates(v, u, g, float(momentum), float(alpha), threshold, cap)
    cand, finite = _kernel_candidates(v, threshold, cap, result)
    return _select_checked(v, cand, k, finite, True)


def fused_update_and_select(v: torch.Tensor, u: Optional[torch.Tensor], g: torch.Tensor, k: int,
                            momentum: float = 0.0, alpha: float = 1.0, zero_v: bool = True,
                            zero_u: bool = True):
    """Error feedback's whole step for one tensor in a single CPU kernel call, or ``None`` where
    the kernel does not apply (not float32 on CPU, ``alpha`` not a power of two, no kernel, or
    a large tensor with ``k > n / 8``): then use the functions above.

    ``u is None``: ``v += alpha * g``; else DGC momentum correction ``u = momentum * u + alpha
    * g``, ``v += u``. NaN/Inf entries of ``g`` are added as 0; an entry of ``u`` or ``v`` that
    overflows is reset to 0 (and reported). Then the exact top-k of ``|v|``
    (ties: the lower index) and, with ``zero_v`` / ``zero_u``, ``v[idx] = 0`` / ``u[idx] = 0``.
    The same bits in ``v`` and ``u`` and the same index set (up to ties) as
    ``momentum_compensate_finite_and_select`` / ``compensate_finite_and_select`` followed by
    ``index_select`` and ``index_fill_``, without their ~40 small torch operations per tensor:
    the candidates' values come out of the scan, the selection among them is an
    ``nth_element``, the sample and the zeroing run in the same call.

    Returns:
        ``(idx, vals, u_vals, finite)``: ``(k,)`` ascending int64 indices, ``v`` there (before
        zeroing), ``u`` there (before masking; ``None`` without ``u``), and whether ``g`` and
        the updated ``v`` were finite (a non-finite ``v``, an overflow, is set to 0).
    """
    n = v.numel()
    if n == 0 or not 0 < k <= n or any(t is not None and (t.dtype != torch.float32 or t.shape != v.shape)
                                       for t in (g, u)):
        return None
    # The kernel's sample costs little, so it pays from a few thousand entries on.
    plan = _sample_plan(n, k, min_numel=_FUSED_SAMPLED_MIN_NUMEL, min_samples=_FUSED_MIN_SAMPLES)
    if plan is None and n >= SAMPLED_MIN_NUMEL:
        return None  # k > n / 8 of a large tensor: every entry would be a candidate
    kernel = _kernel_for(v, alpha)
    if kernel is None:
        return None
    stride, m = plan if plan is not None else (0, 0)  # stride 0: every entry is a candidate
    idx, vals, u_vals, g_ok, v_ok = kernel.topk_update(v, _EMPTY if u is None else u, g,
                                                       float(momentum), float(alpha), k, stride,
                                                       m, zero_v, zero_u)
    return idx, vals, (u_vals if u is not None else None), g_ok and v_ok


_EMPTY = torch.empty(0)


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` has no NaN/Inf: one cheap read (a sum), checked exactly only when the
    sum is not finite (a NaN/Inf, or a finite overflow of the sum)."""
    if math.isfinite(_sum_probe(x).item()):
        return True
    x = torch.view_as_real(x) if x.is_complex() else x
    return bool(torch.isfinite(x).all())


def nonfinite_among(tensors) -> list:
    """The positions of the tensors holding a NaN/Inf. One host sync for all of them (their
    sums, stacked), and ``all_finite`` on each only when some sum is not finite."""
    if not tensors:
        return []
    device = tensors[0].device
    sums = torch.stack([_sum_probe(t).double().to(device) for t in tensors])  # (len(tensors),)
    if bool(torch.isfinite(sums).all()):
        return []
    return [i for i, t in enumerate(tensors) if not all_finite(t)]


def _sum_probe(x: torch.Tensor) -> torch.Tensor:
    """0-dim sum of ``x``: finite unless ``x`` holds a NaN/Inf (or the sum overflows)."""
    if x.is_complex():
        x = torch.view_as_real(x)
    # sum() in the tensor's own dtype takes the fast reduction (dtype= costs ~1.6x on CPU);
    # half types accumulate in float32 so that large finite gradients do not overflow it.
    return x.sum() if x.element_size() >= 4 else x.sum(dtype=torch.float32)


def _finite_or_zeroed(g: torch.Tensor, check: bool) -> Tuple[torch.Tensor, bool]:
    if not check or all_finite(g):
        return g, True
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0), False


def _compensate_and_select(buf, g, k, alpha, check):
    if buf.dim() != 1 or g.shape != buf.shape or g.dtype != buf.dtype or g.device != buf.device:
        raise ValueError("compensate_and_select needs 1-D buf and g of one shape, dtype and device; "
                         f"got buf {tuple(buf.shape)} {buf.dtype} {buf.device}, "
                         f"g {tuple(g.shape)} {g.dtype} {g.device}")
    n = buf.numel()
    plan = _sample_plan(n, k) if 0 < k < n else None
    whole = (plan is None or buf.device.type != "cpu"
             # fp16/bf16 add with a scale rounds differently in the vectorised body and the
             # scalar tail of torch's kernel, so only one whole-tensor add_ is bitwise
             # buf.add_(g, alpha).
             or (alpha != 1.0 and buf.dtype not in (torch.float32, torch.float64)))
    if whole:
        g, finite = _finite_or_zeroed(g, check)
        if plan is None:
            idx = select_topk(_add_(buf, g, alpha), k)
            if check and not bool(torch.isfinite(buf.index_select(0, idx)).all()):
                # e + g overflowed: a non-finite entry has the largest magnitude, so it is
                # among the picked. Zero every one and pick again.
                torch.nan_to_num_(buf, nan=0.0, posinf=0.0, neginf=0.0)
                idx, finite = select_topk(buf, k), False
            return idx, finite
    sample = torch.add(buf[::plan[0]], g[::plan[0]], alpha=alpha)  # (s,)
    if check:
        sample = torch.nan_to_num(sample, nan=0.0, posinf=0.0, neginf=0.0)
    threshold = _threshold(sample, plan[1])  # from (buf + alpha g)[::stride], before the update
    if whole:
        return _select_checked(buf, _candidates(_add_(buf, g, alpha), threshold), k, finite, check)
    kernel = _kernel_for(buf, alpha)
    if kernel is not None:
        cap = _kernel_cap(plan)
        result = kernel.compensate_candidates(buf, g, float(alpha), threshold, cap)
        cand, finite = _kernel_candidates(buf, threshold, cap, result)
    else:
        box = [True]
        cand = _candidates(buf, threshold, g, alpha, box if check else None)
        finite = box[0]
    return _select_checked(buf, cand, k, finite, check)


def _kernel_for(x: torch.Tensor, alpha: float):
    """The CPU kernel when it applies to ``x``, else None. The kernel multiplies and adds
    separately; torch may fuse them (FMA). They agree bit for bit when alpha * g is exact:
    alpha == 1 or a power of two (GradScaler's 1 / scale)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or math.frexp(alpha)[0] != 0.5:
        return None
    return cpu_kernel()


def _kernel_cap(plan: Tuple[int, int]) -> int:
    """Candidates the kernel stores: ~ m * stride are expected (the threshold is the sample's
    m-th largest), twice that plus slack is room enough."""
    stride, m = plan
    return 2 * m * stride + 4096


def _kernel_candidates(x: torch.Tensor, threshold: float, cap: int, result) -> Tuple[torch.Tensor, bool]:
    """The kernel's (candidates, count, finite); beyond ``cap`` (a very flat tensor) the
    candidates are found again by scanning the updated ``x``."""
    cand, count, finite = result
    if count > cap:
        cand = _candidates(x, threshold)
    return cand, finite


def _select_checked(x: torch.Tensor, cand: torch.Tensor, k: int, finite: bool,
                    check: bool) -> Tuple[torch.Tensor, bool]:
    """``_select_among`` the candidates; with ``check``, non-finite entries of ``x`` among them
    (e + g overflowed) are zeroed first and reported."""
    vals = x.index_select(0, cand)  # (c,)
    if check and not _finite_at(x, cand, vals):
        finite = False
    return _select_among(x, cand, k, vals), finite


def _finite_at(buf: torch.Tensor, cand: torch.Tensor, vals: torch.Tensor) -> bool:
    """Whether ``buf`` is finite at the candidates (``vals = buf[cand]``) -- every non-finite
    entry is one: ``!(|x| <= t)`` holds for NaN and Inf -- zeroing those that are not, in
    ``buf`` and ``vals`` (a sum of finite values can overflow)."""
    bad = ~torch.isfinite(vals)
    if not bool(bad.any()):
        return True
    buf.index_fill_(0, cand[bad], 0)
    vals.masked_fill_(bad, 0)
    return False


def _sample_plan(n: int, k: int, min_numel: int = SAMPLED_MIN_NUMEL,
                 min_samples: int = 4096) -> Optional[Tuple[int, int]]:
    """``(stride, m)``: sample ``x[::stride]`` and threshold at its m-th largest magnitude;
    ``None`` when a full ``torch.topk`` is the better (or only safe) choice."""
    if n < min_numel or k > n // 8:
        return None
    # s samples, expected hits = s*k/n of them above the true threshold. A sample costs ~2x
    # a candidate (a cache miss, then topk) and the margin adds ~4 k / sqrt(hits) candidates;
    # balancing the two gives hits ~ (k^2 / n)^(2/3): 256 at 1% of 25M, 16 (the floor) at 0.1%.
    hits = min(_SAMPLE_HITS, max(_MIN_SAMPLE_HITS, round((k * k / n) ** (2 / 3))))
    s = min(n, max(min_samples, math.ceil(hits * n / k)))
    stride = max(1, n // s)
    s = -(-n // stride)  # len(x[::stride])
    mu = s * k / n
    # Rank in the sample of a threshold safely below the k-th largest.
    m = min(s, math.ceil(mu + _MARGIN_SIGMAS * math.sqrt(mu) + 4))
    return None if m >= s else (stride, m)


def _threshold(sample: torch.Tensor, m: int) -> float:
    """The m-th largest ``|sample|``, a value ``sample``'s dtype represents exactly (so every
    kernel compares against the same number)."""
    mag = sample.abs()  # (s,)
    if mag.dtype in (torch.float16, torch.bfloat16):
        mag = mag.float()  # exact; CPU topk on half types is slow or missing on older torch
    return torch.topk(mag, m, sorted=False).values.min().item()


def _candidates(x: torch.Tensor, threshold: float, g: Optional[torch.Tensor] = None,
                alpha: float = 1.0, finite: Optional[list] = None) -> torch.Tensor:
    """Ascending int64 indices of the entries with ``|x| > threshold``; with ``g``, each chunk
    of ``x`` first gets ``x += alpha * g`` (in place), so ``x`` is the updated tensor. With a
    ``finite`` list (CPU), NaN/Inf chunks of ``g`` are added with those entries as 0 and
    ``finite[0]`` is set to False."""
    n = x.numel()
    if x.device.type != "cpu":
        if g is not None:
            _add_(x, g, alpha)
        return torch.nonzero(torch.hardshrink(x, threshold)).squeeze(1)
    chunk = min(n, max(1, CPU_CHUNK * max(1, torch.get_num_threads())))
    shrunk = torch.empty(chunk, dtype=x.dtype)  # x where |x| > threshold, else 0
    mask = torch.empty(chunk, dtype=torch.bool)
    mask_np = mask.numpy()
    parts = []
    g_chunks = g.split(chunk) if g is not None else itertools.repeat(None)
    for i, (xc, gc) in enumerate(zip(x.split(chunk), g_chunks)):
        length = xc.numel()
        if gc is not None:
            if finite is not None:
                gc, ok = _finite_or_zeroed(gc, True)  # the chunk's sum, then the add: one read
                finite[0] = finite[0] and ok
            _add_(xc, gc, alpha)
        mask[:length].copy_(torch.hardshrink(xc, threshold, out=shrunk[:length]))
        hit = np.flatnonzero(mask_np[:length])  # (c_chunk,) positions within the chunk
        hit += i * chunk
        parts.append(hit)
    return torch.from_numpy(np.concatenate(parts)).long()  # (c,) ascending


def _flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """``torch.nonzero(mask).squeeze(1)`` for a 1-D bool tensor. On CPU through NumPy, whose
    bool nonzero skips zero words and is ~4x faster than torch's element-by-element loop."""
    if mask.device.type != "cpu":
        return torch.nonzero(mask).squeeze(1)
    return torch.from_numpy(np.flatnonzero(mask.numpy())).long()


def _select_among(x: torch.Tensor, cand: torch.Tensor, k: int,
                  vals: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The exact top-k of ``x`` given ascending candidates that include one (or fewer than
    ``k`` candidates, then a full topk); ascending. ``vals``: ``x[cand]`` if already read."""
    c = cand.numel()
    if c < k:
        return _full_topk(x, k)  # the sample was unlucky: stay exact
    if c == k:
        return cand
    mag = (x.index_select(0, cand) if vals is None else vals).abs()  # (c,)
    if mag.dtype in (torch.float16, torch.bfloat16):
        mag = mag.float()  # exact; CPU topk on half types is slow or missing on older torch
    # Keep the candidates' ascending order (a mask, not cand[pick]): the gather and zeroing in
    # compress and the receivers' scatter-add then walk memory forwards instead of at random.
    return cand.index_select(0, _flatnonzero(_top_mask(mag, k)))  # (k,) ascending


def _top_mask(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask with exactly ``k`` entries set: the ``k`` largest of ``mag`` (>= 0), in O(c).

    A histogram of the top bits of ``mag`` (non-negative floats order like their bit
    patterns read as integers) finds the band of values holding the k-th largest; everything
    above the band is kept and only the band -- a few hundredths of ``mag`` -- goes through
    ``topk``. A full ``topk`` over ``mag`` costs ~4x more (~13 ns per element on CPU).
    """
    bits = mag.view(torch.int32 if mag.element_size() == 4 else torch.int64)  # (c,) monotone in mag
    # Keep the exponent and 7 mantissa bits: bins 1/128 of an octave wide.
    band_key = bits >> (16 if mag.element_size() == 4 else 45)  # (c,)
    lo, hi = (int(v) for v in torch.aminmax(band_key))
    counts = torch.bincount(band_key - lo, minlength=hi - lo + 1)  # (bins,)
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # (bins,) entries in this bin or higher
    b = int((at_or_above >= k).sum()) - 1  # the bin holding the k-th largest
    above = int(at_or_above[b + 1]) if b + 1 < at_or_above.numel() else 0
    keep = band_key > b + lo  # (c,) `above` entries, all in the top k
    band = _flatnonzero(band_key == b + lo)  # (cb,) candidates for the rest
    if band.numel() > k - above:
        band = band[torch.topk(mag[band], k - above, sorted=False).indices]  # (k - above,)
    keep[band] = True
    return keep


def _add_(x: torch.Tensor, g: torch.Tensor, alpha: float) -> torch.Tensor:
    return x.add_(g) if alpha == 1.0 else x.add_(g, alpha=alpha)


def _full_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    mag = x.abs()
    if mag.dtype in (torch.float16, torch.bfloat16) and mag.device.type == "cpu":
        mag = mag.float()  # CPU topk on half types is slow or missing on older torch
    return torch.topk(mag, k, sorted=False).indices

"""The values as they travel: the wire dtype (clamped to what it holds) and the loss scale.

Pure functions: the compressor's residual write and every exchange use the same ones, so
what a rank keeps owed is exactly what the wire did not carry.
"""

from __future__ import annotations

import torch

__all__ = ["is_one", "to_wire", "wire_limit", "scaled_wire", "unscaled", "carried"]


def is_one(scale) -> bool:
    """Whether a loss scale is the plain 1.0 (a device tensor scale never is: it is not read)."""
    return not isinstance(scale, torch.Tensor) and scale == 1.0


def to_wire(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cast values to the wire dtype, clamped to the largest magnitude that the wire dtype
    holds *and* that comes back finite in the values' dtype (fp16 <-> bf16 round past each
    other's maximum). The excess stays in the residual instead of becoming an Inf."""
    if values.dtype == dtype:
        return values
    limit = wire_limit(values.dtype, dtype)
    wide = values if values.dtype == torch.float64 else values.float()  # holds `limit` exactly
    return wide.clamp(-limit, limit).to(dtype)


def scaled_wire(values: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """``(K,)`` unscaled values as they travel: multiplied by the loss ``scale``, in ``dtype``."""
    if not is_one(scale) and values.element_size() < 4:
        values = values.float() * scale  # a half-precision product could overflow
    elif not is_one(scale):
        values = values * scale
    return to_wire(values, dtype)


def unscaled(sent: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """The wire's values back in ``dtype`` (the residual's) and unscaled units."""
    back = sent.to(dtype)
    return back if is_one(scale) else back * (1.0 / scale)


def carried(values: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """What the wire (``dtype``, loss ``scale``) carries of ``values``, back in their dtype and
    units: ``values - carried(values)`` is what stays owed."""
    return unscaled(scaled_wire(values, scale, dtype), scale, values.dtype)


def _limit(src: torch.dtype, dst: torch.dtype) -> float:
    bound = min(torch.finfo(src).max, torch.finfo(dst).max)
    w = torch.tensor(bound, dtype=torch.float64).to(dst)
    if float(w) > bound:  # rounded up past what src holds: one step down in dst
        w = torch.nextafter(w, torch.zeros_like(w))
    return float(w)


_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Computed once at import: a step then reads no tensor value on the host.
_WIRE_LIMITS = {(s, d): _limit(s, d) for s in _FLOATS for d in _FLOATS}


def wire_limit(src: torch.dtype, dst: torch.dtype) -> float:
    """The largest magnitude ``dst`` holds that also comes back finite in ``src``."""
    return _WIRE_LIMITS.get((src, dst)) or _limit(src, dst)

"""Packing a sparse payload (header, values, indices) into one byte buffer, and back.

One buffer per tensor means one allgather per tensor instead of two, and Horovod's tensor
fusion can batch the buffers of many tensors into a single collective. Layout of one rank's
payload, ``k`` entries::

    [ header: 8 bytes | values: k * value_bytes | indices: k * index_bytes ]      dtype uint8

The header is two int32: a *signature* of what the rank believes it is sending (parameter
shape, dtype, ``k``, wire dtypes -- see ``TopKCompressor.signature``) and *flags* (bit 0: this
rank's gradient was not finite, nothing was selected). Every receiver compares every rank's
signature with its own, so ranks whose models or settings differ get a clear error instead of
silently scattering one tensor's entries into another (see ``decompress``).

Allgather concatenates the ranks' payloads, so the gathered buffer is ``(world * nbytes,)``
and each rank's part starts at a multiple of ``nbytes`` -- every rank sends the same ``k``
because ``k`` depends only on the tensor's size, the ratio and the step, known everywhere.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["payload_nbytes", "pack", "unpack", "HEADER_BYTES", "FLAG_NONFINITE"]

#: Bytes of the per-rank header: int32 signature, int32 flags.
HEADER_BYTES = 8
#: Header flag: the sender's gradient had a NaN/Inf; its values carry nothing.
FLAG_NONFINITE = 1


def payload_nbytes(k: int, value_dtype: torch.dtype, index_dtype: torch.dtype) -> int:
    """Bytes one rank sends for ``k`` entries (header included)."""
    return HEADER_BYTES + k * (_itemsize(value_dtype) + _itemsize(index_dtype))


def pack(values: torch.Tensor, indices: torch.Tensor, signature: int = 0, flags: int = 0) -> torch.Tensor:
    """Concatenate the header, ``values`` (k,) and ``indices`` (k,) as raw bytes: ``(nbytes,)`` uint8."""
    header = torch.tensor([signature, flags], dtype=torch.int32).to(values.device)  # (2,)
    return torch.cat([_as_bytes(header), _as_bytes(values), _as_bytes(indices)])


def unpack(buf: torch.Tensor, k: int, value_dtype: torch.dtype, index_dtype: torch.dtype,
           world: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a gathered buffer into ``headers`` ``(world, 2)`` int32, ``values`` and ``indices``,
    both ``(world, k)``.

    ``buf`` is ``(world * nbytes,)`` uint8. Raises ``ValueError`` when its size is not
    ``world * nbytes`` (with ``world=None``: not a multiple of ``nbytes``) -- the ranks then
    disagree on the tensor's size, ``k`` or wire dtypes.
    """
    vbytes = k * _itemsize(value_dtype)
    nbytes = payload_nbytes(k, value_dtype, index_dtype)
    if world is None:
        world = buf.numel() // nbytes
    if buf.numel() != world * nbytes:
        raise ValueError(
            f"gathered payload of {buf.numel()} bytes is not {world} rank payloads of {nbytes} "
            "bytes: ranks disagree on this tensor's size, ratio or wire dtypes")
    rows = buf.view(world, nbytes)  # (world, nbytes)
    # clone(): a fresh, aligned buffer (a slice's storage offset may not fit the wider dtype).
    headers = rows[:, :HEADER_BYTES].reshape(-1).clone().view(torch.int32).view(world, 2)
    body = rows[:, HEADER_BYTES:]
    values = body[:, :vbytes].reshape(-1).clone().view(value_dtype).view(world, k)  # (world, k)
    indices = body[:, vbytes:].reshape(-1).clone().view(index_dtype).view(world, k)  # (world, k)
    return headers, values, indices


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

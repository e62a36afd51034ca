"""Packing a sparse payload (values, indices) into one byte buffer, and back.

One buffer per tensor means one allgather per tensor instead of two, and Horovod's tensor
fusion can batch the buffers of many tensors into a single collective. Layout of one rank's
payload, ``k`` entries::

    [ values: k * value_bytes | indices: k * index_bytes ]      dtype uint8

Allgather concatenates the ranks' payloads, so the gathered buffer is ``(world * nbytes,)``
and each rank's part starts at a multiple of ``nbytes`` -- every rank sends the same ``k``
because ``k`` depends only on the tensor's size and the ratio, known everywhere.
"""

from __future__ import annotations

from typing import Tuple

import torch

__all__ = ["payload_nbytes", "pack", "unpack"]


def payload_nbytes(k: int, value_dtype: torch.dtype, index_dtype: torch.dtype) -> int:
    """Bytes one rank sends for ``k`` entries."""
    return k * (_itemsize(value_dtype) + _itemsize(index_dtype))


def pack(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Concatenate ``values`` (k,) and ``indices`` (k,) as raw bytes: ``(nbytes,)`` uint8."""
    return torch.cat([_as_bytes(values), _as_bytes(indices)])


def unpack(buf: torch.Tensor, k: int, value_dtype: torch.dtype,
           index_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a gathered buffer into ``values`` and ``indices``, both ``(world, k)``.

    ``buf`` is ``(world * nbytes,)`` uint8, world = ``buf.numel() // nbytes``.
    """
    vbytes = k * _itemsize(value_dtype)
    nbytes = vbytes + k * _itemsize(index_dtype)
    if nbytes == 0:
        empty = torch.empty(0, 0, device=buf.device)
        return empty.to(value_dtype), empty.to(index_dtype)
    if buf.numel() % nbytes:
        raise ValueError(
            f"gathered payload of {buf.numel()} bytes is not a whole number of {nbytes}-byte "
            "rank payloads: ranks disagree on this tensor's size or ratio")
    rows = buf.view(-1, nbytes)  # (world, nbytes)
    # clone(): a fresh, aligned buffer (a slice's storage offset may not fit the wider dtype).
    world = rows.shape[0]
    values = rows[:, :vbytes].reshape(-1).clone().view(value_dtype).view(world, k)  # (world, k)
    indices = rows[:, vbytes:].reshape(-1).clone().view(index_dtype).view(world, k)  # (world, k)
    return values, indices


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

"""Packing a sparse payload (header, values, indices) into one byte buffer, and back.

One buffer per group of tensors (one tensor, or several compressed together) means one
allgather per group, and Horovod's tensor fusion can batch the buffers of many groups into a
single collective. Layout of one rank's payload, ``k`` entries::

    [ header: 4 * header_words bytes | values: k * value_bytes | indices: k * index_bytes ]  uint8

The header is int32: a *signature* of what the rank believes it is sending (shapes, dtype, each
tensor's ``k``, wire dtypes -- see ``SparseContext.signature``), *flags* (``FLAG_NONFINITE``:
this rank's gradient held a NaN/Inf; ``FLAG_INEXACT``: its sampled selection must be redone),
and for a group of S > 1 tensors one flag word per tensor (``header_words = 2 + S``; a single
tensor's header is the two words, 8 bytes). The flags are computed on the device and only read
after the exchange, at the optimizer's one host sync per step. Every receiver compares every
rank's signature with its own, so ranks whose models or settings differ get a clear error
instead of silently scattering one tensor's entries into another (see ``check``). A group's
values and indices are its tensors' in order, ``k_s`` each; indices count within each tensor.

Allgather concatenates the ranks' payloads, so the gathered buffer is ``(world * nbytes,)``
and each rank's part starts at a multiple of ``nbytes`` -- every rank sends the same ``k``
because ``k`` depends only on the tensor's size, the ratio and the step, known everywhere.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["payload_nbytes", "pack", "pack_header", "unpack", "HEADER_BYTES", "FLAG_NONFINITE",
           "FLAG_INEXACT"]

#: Bytes of the per-rank header: int32 signature, int32 flags.
HEADER_BYTES = 8
#: Header flag: the sender's gradient had a NaN/Inf; its values carry nothing.
FLAG_NONFINITE = 1
#: Header flag: the sender's sampled selection was not provably exact (an unlucky sample);
#: every rank then redoes this exchange with the sender's exact selection.
FLAG_INEXACT = 2


def payload_nbytes(k: int, value_dtype: torch.dtype, index_dtype: torch.dtype, header_words: int = 2) -> int:
    """Bytes one rank sends for ``k`` entries (header included; a group of several tensors
    adds one int32 of flags per tensor to the header: ``header_words = 2 + segments``)."""
    return 4 * header_words + k * (_itemsize(value_dtype) + _itemsize(index_dtype))


def pack(values: torch.Tensor, indices: torch.Tensor, signature: int = 0, flags: int = 0) -> torch.Tensor:
    """Concatenate the header, ``values`` (k,) and ``indices`` (k,) as raw bytes: ``(nbytes,)`` uint8."""
    header = torch.tensor([signature, flags], dtype=torch.int32).to(values.device)  # (2,)
    return pack_header(header, values, indices)


def pack_header(header: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``pack`` with the header already an int32 tensor on the values' device (the flags
    computed there: nothing is read back to the host)."""
    return torch.cat([_as_bytes(header), _as_bytes(values), _as_bytes(indices)])


def unpack(buf: torch.Tensor, k: int, value_dtype: torch.dtype, index_dtype: torch.dtype,
           world: Optional[int] = None,
           header_words: int = 2) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a gathered buffer into ``headers`` ``(world, header_words)`` int32, ``values`` and
    ``indices``, both ``(world, k)``.

    ``buf`` is ``(world * nbytes,)`` uint8. Raises ``ValueError`` when its size is not
    ``world * nbytes`` (with ``world=None``: not a multiple of ``nbytes``) -- the ranks then
    disagree on the tensor's size, ``k`` or wire dtypes.
    """
    vbytes = k * _itemsize(value_dtype)
    hbytes = 4 * header_words
    nbytes = payload_nbytes(k, value_dtype, index_dtype, header_words)
    if world is None:
        world = buf.numel() // nbytes
    if buf.numel() != world * nbytes:
        raise ValueError(
            f"gathered payload of {buf.numel()} bytes is not {world} rank payloads of {nbytes} "
            "bytes: ranks disagree on this tensor's size, ratio or wire dtypes")
    rows = buf.view(world, nbytes)  # (world, nbytes)
    # clone(): a fresh, aligned buffer (a slice's storage offset may not fit the wider dtype).
    headers = rows[:, :hbytes].reshape(-1).clone().view(torch.int32).view(world, header_words)
    body = rows[:, hbytes:]
    values = body[:, :vbytes].reshape(-1).clone().view(value_dtype).view(world, k)  # (world, k)
    indices = body[:, vbytes:].reshape(-1).clone().view(index_dtype).view(world, k)  # (world, k)
    return headers, values, indices


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

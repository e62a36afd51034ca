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

from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["payload_nbytes", "pack", "pack_header", "unpack", "payload_rows", "payload_spec", "pack_rows",
           "unpack_rows", "Rows", "row_nbytes", "FLAG_INEXACT", "FLAG_NONFINITE", "FLAG_MISMATCH"]

#: Bytes of the per-rank header: int32 signature, int32 flags.
HEADER_BYTES = 8
#: Header flag: the sender's gradient had a NaN/Inf; its values carry nothing.
FLAG_NONFINITE = 1
#: Header flag: the sender's sampled selection was not provably exact (an unlucky sample);
#: every rank then redoes this exchange with the sender's exact selection.
FLAG_INEXACT = 2
#: Header flag (sparse allreduce): a region's owner received a row from a rank that sent a
#: payload for something else; every rank raises ``RankMismatchError`` after the exchange.
FLAG_MISMATCH = 4


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
    ``indices``, both ``(world, k)`` (``payload_rows``, every part, every row)."""
    rows = payload_rows(buf, k, value_dtype, index_dtype, world, header_words)
    return rows.part(0), rows.part(1), rows.part(2)  # (world, header_words), (world, k), (world, k)


def payload_rows(buf: torch.Tensor, k: int, value_dtype: torch.dtype, index_dtype: torch.dtype,
                 world: Optional[int] = None, header_words: int = 2) -> Rows:
    """A gathered buffer as ``Rows`` of payloads (parts: header, values, indices).

    ``buf`` is ``(world * nbytes,)`` uint8. Raises ``ValueError`` when its size is not
    ``world * nbytes`` (with ``world=None``: not a multiple of ``nbytes``) -- the ranks then
    disagree on the tensor's size, ``k`` or wire dtypes.
    """
    nbytes = payload_nbytes(k, value_dtype, index_dtype, header_words)
    if world is None:
        world = buf.numel() // nbytes
    if buf.numel() != world * nbytes:
        raise ValueError(
            f"gathered payload of {buf.numel()} bytes is not {world} rank payloads of {nbytes} "
            "bytes: ranks disagree on this tensor's size, ratio or wire dtypes")
    return Rows(buf, world, payload_spec(k, value_dtype, index_dtype, header_words))


def payload_spec(k: int, value_dtype: torch.dtype, index_dtype: torch.dtype,
                 header_words: int = 2) -> List[Tuple[int, torch.dtype]]:
    """One allgathered payload as ``unpack_rows`` parts: header, values, indices."""
    return [(header_words, torch.int32), (k, value_dtype), (k, index_dtype)]


def row_nbytes(spec: Sequence[Tuple[int, torch.dtype]]) -> int:
    """Bytes of one row of ``(count, dtype)`` parts (see ``unpack_rows``)."""
    return sum(count * _itemsize(dtype) for count, dtype in spec)


def pack_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(rows, count_i)`` tensors of any dtypes -> ``(rows * row_bytes,)`` uint8, row by row:
    row j is ``[parts[0][j] | parts[1][j] | ...]`` as raw bytes (one rank's part of an alltoall
    or an allgather)."""
    rows = parts[0].shape[0]
    return torch.cat([p.contiguous().view(torch.uint8).reshape(rows, -1) for p in parts], dim=1).reshape(-1)


def unpack_rows(buf: torch.Tensor, rows: int,
                spec: Sequence[Tuple[int, torch.dtype]]) -> List[torch.Tensor]:
    """Split ``(rows * row_bytes,)`` uint8 into one ``(rows, count)`` tensor per ``(count, dtype)``
    of ``spec`` (the inverse of ``pack_rows``). Raises ``ValueError`` on a size mismatch."""
    table = Rows(buf, rows, spec)
    return [table.part(i) for i in range(len(spec))]


class Rows:
    """A ``(rows * row_bytes,)`` uint8 buffer of ``pack_rows`` rows, read part by part and a
    few rows at a time (``part``), so that a reader of many rows need not copy them all at once.
    Raises ``ValueError`` when the buffer is not ``rows`` rows of ``spec``."""

    def __init__(self, buf: torch.Tensor, rows: int, spec: Sequence[Tuple[int, torch.dtype]]) -> None:
        nbytes = row_nbytes(spec)
        if buf.numel() != rows * nbytes:
            raise ValueError(f"{buf.numel()} bytes are not {rows} rows of {nbytes} bytes")
        self.rows, self.spec = rows, list(spec)
        self._view = buf.view(rows, nbytes)
        self._starts = [0]
        for count, dtype in self.spec:
            self._starts.append(self._starts[-1] + count * _itemsize(dtype))

    def part(self, i: int, first: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Part ``i`` of rows ``first .. stop - 1`` (default: all) as a fresh ``(rows, count)``
        tensor of its dtype."""
        count, dtype = self.spec[i]
        rows = self._view[first:stop, self._starts[i]:self._starts[i + 1]]
        # clone(): a fresh, aligned buffer (a slice's storage offset may not fit the wider dtype).
        return rows.reshape(-1).clone().view(dtype).view(rows.shape[0], count)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize

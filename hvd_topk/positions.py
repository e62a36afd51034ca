"""``PositionSet``: a selection's positions kept compactly until its residual write."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .exchange_core import scatter_add_

__all__ = ["PositionSet", "bitmask", "bits_at"]


class PositionSet:
    """``k`` distinct positions of a group of ``n`` entries, some maybe marked invalid, kept
    compactly from the selection until step 5 (``TopKCompressor``'s commit): as int32
    positions (and, with ``valid``, ``k`` bools), or -- when that is smaller, at ratios above
    1/32 such as the warm-up's -- as a bitmask of ``n`` bits. Whatever the ratio it weighs at
    most ``min(5 k, n / 8)`` bytes, against ``8 k`` for the selection's own int64 positions.
    Encoding and decoding run on the device and read nothing back to the host.

    Arguments:
        positions: ``(k,)`` int64, distinct, in ``[0, n)``, any order.
        n: the group's entries.
        valid: ``(k,)`` bool, or None (all valid): positions to leave out.
    """

    def __init__(self, positions: torch.Tensor, n: int, valid: Optional[torch.Tensor] = None) -> None:
        self.n, self.k = n, positions.numel()
        self.device = positions.device
        self.bits = self.positions32 = self.valid = None
        self.partial = valid is not None
        if (5 if self.partial else 4) * self.k <= (n + 7) // 8 and n < 2**31:
            self.positions32 = positions.to(torch.int32)
            if self.partial:  # int32 positions and k bools: invalid slots hold n - 1
                self.valid = valid.clone()
                self.positions32.masked_fill_(~valid, n - 1)
            return
        self.bits = bitmask(positions, n, valid)

    def positions(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(positions, valid)``: ``(k,)`` int64 positions (ascending from a bitmask) and
        ``(k,)`` bool, or None when every position is valid. Invalid slots hold ``n - 1``."""
        if self.positions32 is not None:
            return self.positions32.long(), self.valid
        shifts = _bit_shifts(self.device)
        bit = self.bits.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1)  # (n / 8, 8) 0/1
        mask = bit.view(torch.bool).reshape(-1)[:self.n]
        pos = torch.nonzero_static(mask, size=self.k, fill_value=self.n).squeeze(1)  # (k,)
        if not self.partial:
            return pos, None  # exactly k bits are set
        return pos.clamp(max=self.n - 1), pos < self.n


def bitmask(positions: torch.Tensor, n: int, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(ceil(n / 8),)`` uint8 with bit ``p % 8`` of byte ``p // 8`` set for each of
    ``positions`` (``(k,)`` int32/int64, distinct among the valid ones, in ``[0, n)``; with
    ``valid``, ``(k,)`` bool, only those). The bits are added as distinct weights (an OR,
    exactly, in any order), so it takes ``n / 8`` bytes and ``O(k)`` temporaries: never
    the ``n`` bytes of a bool mask."""
    pos = positions.long()
    weights = _bit_weights(pos.device).index_select(0, pos.bitwise_and(7))  # (k,) uint8
    if valid is not None:
        weights.masked_fill_(~valid, 0)
    bits = torch.zeros((n + 7) // 8, dtype=torch.uint8, device=pos.device)
    return scatter_add_(bits, pos.bitwise_right_shift_(3) if pos is not positions else pos >> 3, weights)


def bits_at(bits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``(k,)`` bool: whether ``bits`` (a ``bitmask``) holds each of ``positions``."""
    pos = positions.long()
    shift = pos.bitwise_and(7).to(torch.uint8)
    byte = bits.index_select(0, pos.bitwise_right_shift_(3) if pos is not positions else pos >> 3)
    return byte.bitwise_right_shift_(shift).bitwise_and_(1).bool()


def _bit_shifts(device: torch.device) -> torch.Tensor:
    """``(8,)`` uint8 0, 1, ..., 7, made on the device."""
    return torch.arange(8, dtype=torch.uint8, device=device)


def _bit_weights(device: torch.device) -> torch.Tensor:
    """``(8,)`` uint8 1, 2, 4, ..., 128, made on the device (no copy from the host)."""
    return torch.bitwise_left_shift(torch.ones(8, dtype=torch.uint8, device=device), _bit_shifts(device))

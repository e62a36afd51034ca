"""A payload's header -- its signature and flags -- and resolving every header of a step in one
copy to the host (the step's one host sync).

A header is ``header_words`` int32: the signature (a digest of what the rank believes it
sends: shapes, dtype, ``k``'s, wire dtypes), the flags (``FLAG_NONFINITE``, ``FLAG_INEXACT``;
``FLAG_MISMATCH`` from a sparse allreduce owner), and for a group one flag word per tensor.
Built on the device from device flags, so a backward hook never waits for a value.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .interface import SAME_MODEL, RankMismatchError, SparseContext
from .packing import FLAG_INEXACT, FLAG_MISMATCH, FLAG_NONFINITE
from .selection import segment_views
from .state import GroupCache

__all__ = ["Signatures", "build_header", "resolve", "mark_nonfinite", "flagged_segments"]


class Signatures:
    """Each group's signature as a ``(1,)`` int32 device tensor, cached per (group, device): a
    header then needs no host-to-device copy per step. One entry per group in use."""

    def __init__(self) -> None:
        self._cache = GroupCache()  # (names, device) -> (signature, (1,) int32 on device)

    def get(self, ctx: SparseContext, device: torch.device) -> torch.Tensor:
        """``ctx``'s signature on ``device``."""
        sig = ctx.signature
        return self._cache.get((ctx.names, device), lambda entry: entry[0] == sig, lambda: (
            sig, torch.tensor([sig], dtype=torch.int32, device=device)))[1]

    def prune(self) -> None:
        """Forget the groups no step used since the last call (once per step)."""
        self._cache.prune()


def build_header(ctx: SparseContext, signature: torch.Tensor, bad: torch.Tensor,
                 inexact: Optional[torch.Tensor]) -> torch.Tensor:
    """``(header_words,)`` int32: ``signature`` (``(1,)`` int32 on the flags' device), the
    flags from ``bad`` (``(S,)`` bool, a segment's gradient held a NaN/Inf) and ``inexact``
    (0-dim bool; ``None``: the CPU kernel's exact selection, whose flags are host values)."""
    if inexact is None:  # CPU: one small tensor, no arithmetic on tensors
        seg = [FLAG_NONFINITE if b else 0 for b in bad.tolist()]
        words = [ctx.signature, FLAG_NONFINITE if any(seg) else 0]
        return torch.tensor(words + (seg if ctx.header_words > 2 else []), dtype=torch.int32)
    flags = (bad.any().to(torch.int32) * FLAG_NONFINITE
             + inexact.to(torch.int32) * FLAG_INEXACT).reshape(1)  # bad, inexact: v's device
    parts = [signature, flags]
    if ctx.header_words > 2:
        parts.append(bad.to(torch.int32) * FLAG_NONFINITE)
    return torch.cat(parts)


def resolve(ctxs: Sequence[SparseContext], extra: Optional[torch.Tensor] = None
            ) -> Tuple[List[SparseContext], List[Tuple[SparseContext, List[List[int]]]], list]:
    """Read every rank's headers of ``ctxs`` (after the scatter) and ``extra`` in one copy.

    Raises ``RankMismatchError`` (on every rank alike) if some rank sent a payload for
    another shape, dtype, ``k`` or wire dtype.

    Returns:
        ``(redo, nonfinite, extra)``: the contexts some rank selected inexactly; the contexts
        some rank flagged non-finite, with every rank's header rows; ``extra`` as a list.
    """
    parts = [c.headers.reshape(-1) for c in ctxs]
    if extra is not None:
        parts.append(extra.reshape(-1).to(torch.int32))
    if not parts:
        return [], [], []
    device = parts[0].device
    flat = torch.cat([p.to(device) for p in parts]).tolist()  # the one host sync
    redo, nonfinite, at = [], [], 0
    for ctx in ctxs:
        h = ctx.header_words
        rows = [flat[at + r * h: at + (r + 1) * h] for r in range(ctx.headers.shape[0])]
        at += h * len(rows)
        others = [r for r, row in enumerate(rows) if row[0] != ctx.signature]
        owners = [r for r, row in enumerate(rows) if row[1] & FLAG_MISMATCH]
        if owners and not others:
            raise RankMismatchError(
                f"parameter {ctx.name!r}: the owners of regions {owners} received, in the sparse "
                f"allreduce, rows for something other than this rank's {ctx.describe()}. " + SAME_MODEL)
        if others:
            raise RankMismatchError(
                f"parameter {ctx.name!r}: rank(s) {others} sent a payload for something other than "
                f"this rank's {ctx.describe()}. " + SAME_MODEL)
        if any(row[1] & FLAG_INEXACT for row in rows):
            redo.append(ctx)
        elif any(row[1] & FLAG_NONFINITE for row in rows):
            nonfinite.append((ctx, rows))
    return redo, nonfinite, flat[at:]


def flagged_segments(ctx: SparseContext, headers: torch.Tensor,
                     signature: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(S,)`` bool on the headers' device: the tensors of ``ctx`` some rank flagged non-finite,
    or all of them where some sparse allreduce owner flagged a mismatch or, with
    ``signature`` (this rank's: an int or a ``(1,)`` int32 tensor), some rank's signature
    differs from it. ``headers``: every rank's ``(P, header_words)``. ``resolve``'s reading on
    the device, for an engine that may not read back (the DDP hook)."""
    flags = headers[:, 2:] if ctx.header_words > 2 else headers[:, 1:2]  # (P, S)
    mismatch = (headers[:, 1] & FLAG_MISMATCH).ne(0).any()
    if signature is not None:
        mismatch = mismatch | headers[:, 0].ne(signature).any()
    return (flags & FLAG_NONFINITE).ne(0).any(0) | mismatch


def mark_nonfinite(ctx: SparseContext, rows: List[List[int]]) -> List[Tuple[str, List[int]]]:
    """Fill each tensor of ``ctx.out`` some rank flagged non-finite with NaN (so that a
    ``GradScaler`` skips the step, as in dense training); returns ``(name, ranks)`` of each."""
    found = []
    views = segment_views(ctx.out, ctx.layout)
    for s, name in enumerate(ctx.names):
        word = 1 if len(ctx.names) == 1 else 2 + s
        ranks = [r for r, row in enumerate(rows) if row[word] & FLAG_NONFINITE]
        if ranks:
            found.append((name, ranks))
            views[s].fill_(float("nan"))
    return found

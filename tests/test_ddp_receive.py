"""The DDP hook's allgather receive (``hvd_topk.ddp.hook.scatter_gathered``), in one process:
three ranks' payloads, packed as the hook packs them, summed into a group's tensors.

The reference adds each rank's values divided by P into each tensor, rank after rank, one
``+=`` per rank (a rank sends a position once): the bits the hook must give, for every read
limit -- whole payloads at once, a few ranks at once, or one rank's values cut into slices.
A tensor some rank flagged is NaN. A buffer of the wrong size raises ``ValueError``.
"""

import pytest
import torch

from hvd_topk.ddp.hook import scatter_gathered
from hvd_topk.exchange_core import SCATTER_ENTRIES
from hvd_topk.ddp.plan import SparseGroup
from hvd_topk.layout import GroupLayout
from hvd_topk.packing import pack_header

WORLD = 3
SIZES, KS = (50, 7, 120), (20, 3, 41)  # three tensors of one group, K = 64


def payloads(value_dtype: torch.dtype, flagged: int = -1):
    """Each rank's ``(header (S,), values (K,), group positions (K,))``; rank ``WORLD - 1``
    flags tensor ``flagged``."""
    layout = GroupLayout(SIZES, KS)
    gen = torch.Generator().manual_seed(7)
    out = []
    for r in range(WORLD):
        pos = torch.cat([torch.randperm(n, generator=gen)[:k] + offset
                         for n, k, offset in zip(SIZES, KS, layout.offsets)])  # (K,) distinct per tensor
        values = torch.randn(layout.k, generator=gen).to(value_dtype)  # (K,)
        header = torch.zeros(layout.segments, dtype=torch.int32)
        if r == WORLD - 1 and flagged >= 0:
            header[flagged] = 1
        out.append((header, values, pos.to(torch.int32)))
    return layout, out


def reference(layout: GroupLayout, sent, flagged: int = -1):
    """Each tensor: 0 (NaN where flagged), then ``+= values / P`` at its positions, rank by rank."""
    outs = [torch.zeros(n) for n in SIZES]
    if flagged >= 0:
        outs[flagged].fill_(float("nan"))
    for _, values, pos in sent:  # rank order
        vals = values.float() / WORLD
        for s, out in enumerate(outs):
            a, b = sum(KS[:s]), sum(KS[:s + 1])
            local = pos[a:b].long() - layout.offsets[s]
            out[local] += vals[a:b]
    return outs


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("limit", [SCATTER_ENTRIES, 128, 64, 63, 5, 1])
@pytest.mark.parametrize("flagged", [-1, 1])
def test_every_read_limit_gives_the_reference_bits(value_dtype, limit, flagged):
    layout, sent = payloads(value_dtype, flagged)
    group = SparseGroup("allgather", (0, 1, 2), ("a", "b", "c"), layout, value_dtype, torch.int32)
    gathered = torch.cat([pack_header(*p) for p in sent])  # (WORLD * nbytes,) as the allgather leaves it
    outs = [torch.full((n,), 5.0) for n in SIZES]  # stale gradients: every entry is written
    bad = scatter_gathered(gathered, group, outs, WORLD, limit=limit)
    assert bad.tolist() == [s == flagged for s in range(len(SIZES))]
    for got, want in zip(outs, reference(layout, sent, flagged)):
        assert torch.equal(got, want) or (got.isnan().all() and want.isnan().all())


def test_a_buffer_of_other_ranks_size_raises():
    layout, sent = payloads(torch.float32)
    group = SparseGroup("allgather", (0, 1, 2), ("a", "b", "c"), layout, torch.float32, torch.int32)
    gathered = torch.cat([pack_header(*p) for p in sent])[:-4]
    with pytest.raises(ValueError, match="rows"):
        scatter_gathered(gathered, group, [torch.zeros(n) for n in SIZES], WORLD)

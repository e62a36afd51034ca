"""The DDP hook's allgather receive (``hvd_topk.ddp.hook.scatter_gathered``), in one process:
three ranks' payloads, packed as the hook packs them, summed into a group's tensors.

The reference adds each rank's values divided by P into each tensor, rank after rank, one
``+=`` per rank (a rank sends a position once): the bits the hook must give, for every read
limit -- whole payloads at once, a few ranks at once, or one rank's values cut into slices.
A tensor some rank flagged is NaN; every tensor of the group is NaN where some rank's
header carries another signature. A buffer of the wrong size raises ``ValueError``.
"""

import pytest
import torch

from hvd_topk.ddp.hook import scatter_gathered
from hvd_topk.exchange_core import SCATTER_ENTRIES
from hvd_topk.headers import build_header
from hvd_topk.interface import SparseContext
from hvd_topk.layout import GroupLayout
from hvd_topk.packing import pack_header

WORLD = 3
SIZES, KS = (50, 7, 120), (20, 3, 41)  # three tensors of one group, K = 64


def context(layout: GroupLayout, value_dtype: torch.dtype) -> SparseContext:
    return SparseContext(("a", "b", "c"), tuple(torch.Size([n]) for n in SIZES), torch.float32, layout,
                         value_dtype, torch.int32, divisor=WORLD, world=WORLD)


def payloads(value_dtype: torch.dtype, flagged: int = -1, foreign: bool = False):
    """Each rank's ``(header, values (K,), group positions (K,))``, the header as the hook
    builds it (``build_header``); rank ``WORLD - 1`` flags tensor ``flagged``, and with
    ``foreign`` sends another signature."""
    layout = GroupLayout(SIZES, KS)
    ctx = context(layout, value_dtype)
    gen = torch.Generator().manual_seed(7)
    out = []
    for r in range(WORLD):
        pos = torch.cat([torch.randperm(n, generator=gen)[:k] + offset
                         for n, k, offset in zip(SIZES, KS, layout.offsets)])  # (K,) distinct per tensor
        values = torch.randn(layout.k, generator=gen).to(value_dtype)  # (K,)
        bad = torch.tensor([r == WORLD - 1 and s == flagged for s in range(len(SIZES))])
        signature = ctx.signature ^ (1 if foreign and r == WORLD - 1 else 0)
        header = build_header(ctx, torch.tensor([signature], dtype=torch.int32), bad, None)
        header[0] = signature
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
    gathered = torch.cat([pack_header(*p) for p in sent])  # (WORLD * nbytes,) as the allgather leaves it
    outs = [torch.full((n,), 5.0) for n in SIZES]  # stale gradients: every entry is written
    ctx = context(layout, value_dtype)
    bad = scatter_gathered(gathered, ctx, outs, WORLD, torch.tensor([ctx.signature], dtype=torch.int32),
                           limit=limit)
    assert bad.tolist() == [s == flagged for s in range(len(SIZES))]
    for got, want in zip(outs, reference(layout, sent, flagged)):
        assert torch.equal(got, want) or (got.isnan().all() and want.isnan().all())


def test_a_buffer_of_other_ranks_size_raises():
    layout, sent = payloads(torch.float32)
    gathered = torch.cat([pack_header(*p) for p in sent])[:-4]
    with pytest.raises(ValueError, match="rows"):
        scatter_gathered(gathered, context(layout, torch.float32), [torch.zeros(n) for n in SIZES], WORLD)


@pytest.mark.parametrize("limit", [SCATTER_ENTRIES, 5])
def test_another_ranks_signature_makes_every_tensor_of_the_group_nan(limit):
    layout, sent = payloads(torch.float32, foreign=True)
    ctx = context(layout, torch.float32)
    gathered = torch.cat([pack_header(*p) for p in sent])
    outs = [torch.zeros(n) for n in SIZES]
    bad = scatter_gathered(gathered, ctx, outs, WORLD, torch.tensor([ctx.signature], dtype=torch.int32),
                           limit=limit)
    assert bad.tolist() == [True] * len(SIZES)
    assert all(o.isnan().all() for o in outs)
    # Not compared without a signature: the sums as from matching ranks.
    outs = [torch.zeros(n) for n in SIZES]
    assert not scatter_gathered(gathered, ctx, outs, WORLD, limit=limit).any()
    for got, want in zip(outs, reference(layout, sent)):
        assert torch.equal(got, want)

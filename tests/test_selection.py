"""Exact selection: the set torch.topk picks, on every path (full, sampled, fallback)."""

import pytest
import torch

from hvd_topk import index_dtype, num_selected, select_topk
from hvd_topk import selection
from hvd_topk.selection import SAMPLED_MIN_NUMEL


def reference(x, k):
    return set(torch.topk(x.abs().double(), k).indices.tolist())


@pytest.mark.parametrize("n,ratio", [(1, 0.01), (7, 0.5), (1000, 0.01), (SAMPLED_MIN_NUMEL, 0.01),
                                     (300_000, 0.01), (300_000, 0.001), (1_000_000, 0.0001)])
def test_select_matches_torch_topk(n, ratio):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    k = num_selected(n, ratio)
    idx = select_topk(x, k)
    assert idx.numel() == k
    assert idx.unique().numel() == k
    assert set(idx.tolist()) == reference(x, k)


@pytest.mark.parametrize("make", [
    lambda n: torch.arange(n, dtype=torch.float32),  # sorted: a strided sample is biased
    lambda n: torch.cat([torch.zeros(n - 50), torch.full((50,), 3.0)]),  # k > nonzeros
    lambda n: torch.randn(n) * (torch.arange(n) % 1000 == 0),  # mostly zeros
    lambda n: torch.randn(n).pow(9),  # heavy tails
])
def test_adversarial_inputs_stay_exact(make):
    x = make(400_000)
    k = num_selected(x.numel(), 0.001)
    got = select_topk(x, k)
    # Compare magnitudes (ties make index sets ambiguous): the k-th largest must agree.
    want = torch.topk(x.abs(), k).values
    assert torch.equal(x[got].abs().sort().values, want.sort().values)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_select_dtypes(dtype):
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(1)).to(dtype)
    k = num_selected(x.numel(), 0.01)
    got = select_topk(x, k)
    want = torch.topk(x.abs().float(), k).values
    assert torch.equal(x[got].abs().float().sort().values, want.sort().values)


def test_num_selected():
    assert num_selected(0, 0.01) == 0
    assert num_selected(1, 0.01) == 1
    assert num_selected(50, 0.01) == 1  # numel < 1/ratio still sends one entry
    assert num_selected(300, 0.01) == 3  # no float-rounding overshoot
    assert num_selected(1001, 0.01) == 11
    assert num_selected(10, 1.0) == 10


def test_index_dtype():
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64


def test_select_does_not_touch_rng_or_input():
    x = torch.randn(500_000)
    before = x.clone()
    state = torch.get_rng_state()
    select_topk(x, 500)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(x, before)


def test_chunked_candidate_pass_is_exact_across_chunk_boundaries(monkeypatch):
    # A chunk much smaller than the tensor, not dividing it: candidates straddle boundaries.
    monkeypatch.setattr(selection, "CPU_CHUNK", 1000)
    monkeypatch.setattr(selection.torch, "get_num_threads", lambda: 1)
    x = torch.randn(300_007, generator=torch.Generator().manual_seed(3))
    for ratio in (0.01, 0.001):
        k = num_selected(x.numel(), ratio)
        assert set(select_topk(x, k).tolist()) == reference(x, k)


def test_unlucky_sample_falls_back_to_full_topk_and_stays_exact(monkeypatch):
    # Every sampled position is large, everything else small: the sampled threshold lets
    # fewer than k entries through, so the fallback must run -- and still be exact.
    calls = []
    full = selection._full_topk
    monkeypatch.setattr(selection, "_full_topk", lambda x, k: calls.append(k) or full(x, k))
    n, ratio = 1 << 20, 0.1
    k = num_selected(n, ratio)
    s = max(4096, -(-selection._SAMPLE_HITS * n // k))
    x = torch.rand(n, generator=torch.Generator().manual_seed(4))
    x[:: n // s] = 5.0
    got = select_topk(x, k)
    assert calls == [k]
    assert torch.equal(x[got].sort().values, torch.topk(x, k).values.sort().values)


def test_sampled_path_does_not_fall_back_on_gaussian_input(monkeypatch):
    calls = []
    monkeypatch.setattr(selection, "_full_topk", lambda x, k: calls.append(k))
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(5))
    for ratio in (0.01, 0.001):
        select_topk(x, num_selected(x.numel(), ratio))
    assert calls == []


def test_sampled_path_returns_ascending_indices():
    x = torch.randn(500_000, generator=torch.Generator().manual_seed(6))
    idx = select_topk(x, num_selected(x.numel(), 0.01))
    assert torch.equal(idx, idx.sort().values)

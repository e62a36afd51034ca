"""The time model behind ``exchange="auto"`` (``hvd_topk/cost.py``): its formulas, its
settings, that it keeps the byte model's choices at two ranks, and that it picks the faster
exchange on the emulated 3- and 4-host clusters whose measurements are in docs/."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import hvd_topk
from hvd_topk import CostModel, TopKCompressor, exchange_times
from hvd_topk.cost import COMPUTE_NS, choose_exchange, cost_model, parse_compute_ns
from hvd_topk.exchange import EXCHANGES, cheapest_exchange, gradient_costs
from hvd_topk.exchange_core import MEMORY_BUDGET, fits_memory, temporaries
from hvd_topk.layout import num_selected

REPO = Path(__file__).resolve().parent.parent


def test_times_are_the_formulas():
    """Each exchange's time written out from the module's docstring, its bytes from the byte
    model's own description (float32 values, int32 indices, capacity 2, 8 int32 statistics)."""
    n, k, p = 1_000_000, 10_000, 8
    m = CostModel(link_gbps=10.0, latency_us=20.0, select_ns=1.0, scatter_ns=2.0, owner_ns=100.0)
    beta = 10e9 / 8
    c, r = min(k, math.ceil(2 * k / p)), math.ceil(k / p)
    got = exchange_times(n, k, p, 4, 4, 4, 2.0, m)
    assert got["dense"] == pytest.approx(math.ceil(2 * (p - 1) * 4 * n / p) / beta, rel=1e-12)
    assert got["allgather"] == pytest.approx((p - 1) * (8 + 8 * k) / beta + 1e-9 * (n + 2 * p * k), rel=1e-12)
    sar_bytes = (p - 1) * ((8 + 8 * c) + (8 + 8 * r + 4 * 8))
    assert got["sparse_allreduce"] == pytest.approx(
        sar_bytes / beta + (p - 1) * 20e-6 + 1e-9 * (n + 100 * k + 2 * p * r), rel=1e-12)
    # One rank is modelled as two, as the byte model does.
    assert exchange_times(n, k, 1, 4, 4, 4, 2.0, m) == exchange_times(n, k, 2, 4, 4, 4, 2.0, m)


def test_link_settings_and_environment(monkeypatch):
    monkeypatch.delenv("HVD_TOPK_LINK_GBPS", raising=False)
    monkeypatch.delenv("HVD_TOPK_LINK_LATENCY_US", raising=False)
    s = TopKCompressor().settings
    assert (s.link_gbps, s.link_latency_us) == (1.0, 50.0)
    monkeypatch.setenv("HVD_TOPK_LINK_GBPS", "25")
    monkeypatch.setenv("HVD_TOPK_LINK_LATENCY_US", "5")
    s = TopKCompressor().settings
    assert (s.link_gbps, s.link_latency_us) == (25.0, 5.0)
    assert TopKCompressor(link_gbps=2, link_latency_us=0).settings.link_gbps == 2.0  # the argument wins
    monkeypatch.setenv("HVD_TOPK_LINK_GBPS", "fast")
    with pytest.raises(ValueError, match="HVD_TOPK_LINK_GBPS must be a number"):
        TopKCompressor()
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="link_gbps"):
            TopKCompressor(link_gbps=bad)
    with pytest.raises(ValueError, match="link_latency_us"):
        TopKCompressor(link_gbps=1, link_latency_us=-1)


def test_compute_figures(monkeypatch):
    assert parse_compute_ns("select=1, owner=7") == {"select": 1.0, "owner": 7.0}
    assert parse_compute_ns("") == {}
    for bad in ("sort=1", "select", "select=x", "select=-1"):
        with pytest.raises(ValueError, match="HVD_TOPK_COMPUTE_NS"):
            parse_compute_ns(bad)
    s = TopKCompressor(link_gbps=1).settings
    monkeypatch.delenv("HVD_TOPK_COMPUTE_NS", raising=False)
    assert cost_model(s, "cpu").owner_ns == COMPUTE_NS["cpu"]["owner"]
    assert cost_model(s, "cuda").select_ns == COMPUTE_NS["cuda"]["select"]
    monkeypatch.setenv("HVD_TOPK_COMPUTE_NS", "owner=1")
    m = cost_model(s, "cpu")
    assert (m.owner_ns, m.select_ns) == (1.0, COMPUTE_NS["cpu"]["select"])


def _sizes():
    """Tensor sizes from min_numel to 50M, and those of the examples' models."""
    return sorted({4096, 5000, 10_000, 65_536, 100_000, 262_144, 590_000, 1_000_000, 2_359_296,
                   4_194_304, 10_000_000, 50_000_000})


@pytest.mark.parametrize("value_dtype", [None, torch.float16, torch.bfloat16])
def test_two_ranks_choose_as_the_byte_model(value_dtype, monkeypatch):
    """At two ranks, on the default link, the time model takes the byte model's decision for
    float32 gradients at every ratio of the default warm-up (for 1% and 0.1%) and at fixed
    ratios up to 1, for ``"auto"`` and either named exchange, among the exchanges whose
    temporaries fit (``fits_memory``): the convergence tables, all at two ranks, do not move."""
    for var in ("HVD_TOPK_LINK_GBPS", "HVD_TOPK_LINK_LATENCY_US", "HVD_TOPK_COMPUTE_NS"):
        monkeypatch.delenv(var, raising=False)
    checked = 0
    for ratio, exchange in [(r, e) for r in (0.001, 0.01, 0.05, 0.25, 0.5, 1.0)
                            for e in ("auto", "allgather", "sparse_allreduce")]:
        settings = TopKCompressor(ratio, value_dtype=value_dtype, exchange=exchange).settings
        allowed = ("dense",) + (EXCHANGES[1:] if exchange == "auto" else (exchange,))
        ratios = {settings.ratio_at(step, adam) for adam in (False, True)
                  for step in range(settings.warmup_length(adam) + 1)}  # SGD's and Adam's warm-ups
        for r in sorted(ratios):
            for n in _sizes():
                t = torch.empty(n)
                k, vb = num_selected(n, r), (value_dtype or torch.float32).itemsize
                fit = tuple(e for e in allowed if fits_memory(e, n, k, 2, 4, vb, 4, settings.region_capacity))
                want = cheapest_exchange(gradient_costs(settings, t, 2, r), fit)
                assert choose_exchange(settings, t, 2, r) == want, (ratio, exchange, r, n)
                checked += 1
    assert checked > 3000


def test_large_worlds_and_fast_links():
    """Where the time model departs from bytes: the sparse allreduce only once its saved bytes
    pay for its owners' work and its alltoall's messages; on a fast link a CPU's selection
    costs more than the bytes it saves."""
    t = torch.zeros(1_000_000)
    one = TopKCompressor(0.01, warmup_steps=0, link_gbps=1, link_latency_us=50)
    assert [one.exchange_for(t, p) for p in (2, 4, 8, 16, 1024)] == \
        ["allgather", "allgather", "allgather", "sparse_allreduce", "sparse_allreduce"]
    assert hvd_topk.exchange_bytes(1_000_000, 10_000, 8, 4, 4, 4)["sparse_allreduce"] < \
        hvd_topk.exchange_bytes(1_000_000, 10_000, 8, 4, 4, 4)["allgather"]  # fewer bytes, slower
    fast = TopKCompressor(0.01, warmup_steps=0, link_gbps=100)
    assert fast.exchange_for(t, 2) == "dense"
    forced = TopKCompressor(0.01, warmup_steps=0, link_gbps=100, density_aware=False)
    assert forced.exchange_for(t, 2) == "allgather"
    gpu = exchange_times(1_000_000, 10_000, 2, 4, 4, 4, 2.0,
                         cost_model(fast.settings, "cuda", compute={}))
    assert gpu["allgather"] < gpu["dense"]  # a GPU's selection is cheap enough


def _load_bench_network():
    spec = importlib.util.spec_from_file_location("bench_network", REPO / "scripts" / "bench_network.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_auto_picks_the_faster_exchange_on_the_emulated_hosts(monkeypatch):
    """``docs/performance/sparse_allreduce/hosts{3,4}/network.json``: both sparse exchanges
    measured on 3 and 4 emulated hosts (1 and 10 Gbit/s, Top-K 1% and 0.1%, two MLPs). The
    byte model picked the sparse allreduce at 4 hosts, slower in all 8 pairs there. The time
    model (the link's rate, the default latency and compute figures) must pick the faster in
    every pair where the two differ by more than 5%, and in at least 14 of the 16."""
    monkeypatch.delenv("HVD_TOPK_COMPUTE_NS", raising=False)
    bench = _load_bench_network()
    right, pairs, misses = 0, 0, []
    for hosts in (3, 4):
        data = json.loads((REPO / f"docs/performance/sparse_allreduce/hosts{hosts}/network.json").read_text())
        step = {(r["model"], r["rate"], r["method"]): r["step_ms"] for r in data["results"]}
        for (model, rate, method), ag_ms in step.items():
            if not method.endswith("ag") or (model, rate, method[:-2] + "sar") not in step:
                continue
            sar_ms = step[(model, rate, method[:-2] + "sar")]
            ratio = {"topk1ag": 0.01, "topk0.1ag": 0.001}[method]
            comp = TopKCompressor(ratio, warmup_steps=0, link_gbps=float(rate.removesuffix("gbit")))
            kinds = [comp.exchange_for(p, hosts) for p in bench.build_model(model).parameters()]
            sparse = [k for k in kinds if k != "dense"]
            assert sparse and len(set(sparse)) == 1, kinds
            faster = "allgather" if ag_ms <= sar_ms else "sparse_allreduce"
            pairs += 1
            if sparse[0] == faster:
                right += 1
            else:
                misses.append((hosts, model, rate, method, ag_ms, sar_ms))
                assert abs(ag_ms - sar_ms) <= 0.05 * min(ag_ms, sar_ms), misses[-1]
    assert pairs == 16 and right >= 14, misses


def test_exchanges_whose_temporaries_exceed_the_budget_are_no_candidates():
    """With ``density_aware``, memory is a third figure beside bytes and time: the sparse
    allreduce's owner step above a density of 1/64 (the warm-up's first ratios) and the
    allgather's gathered buffer beyond ``1 / ratio`` ranks would hold more than their
    ``MEMORY_BUDGET`` times the gradient; the gradient then goes dense, as it does with
    ``density_aware=False`` only when named so."""
    n, t = 2304 * 2304, torch.empty(2304 * 2304)
    sar = TopKCompressor(0.01, exchange="sparse_allreduce").settings
    assert choose_exchange(sar, t, 2, 0.25) == "dense"
    assert choose_exchange(sar, t, 8, 0.25) == "dense"
    assert choose_exchange(sar, t, 2, 1 / 8) == "dense"
    assert choose_exchange(sar, t, 2, 1 / 16) == "dense"
    assert choose_exchange(sar, t, 2, 1 / 64) == "sparse_allreduce"
    assert choose_exchange(sar, t, 8, 0.01) == "sparse_allreduce"
    assert choose_exchange(sar, t, 1024, 0.01) == "sparse_allreduce"
    ag = TopKCompressor(0.01, exchange="allgather").settings
    assert choose_exchange(ag, t, 64, 0.01) == "allgather"
    assert choose_exchange(ag, t, 128, 0.01) == "dense"
    named = TopKCompressor(0.01, exchange="sparse_allreduce", density_aware=False).settings
    assert choose_exchange(named, t, 2, 0.25) == "sparse_allreduce"  # as named, no fallback
    for e, world, r in [("sparse_allreduce", 2, 1 / 64), ("sparse_allreduce", 64, 0.05),
                        ("allgather", 100, 0.01)]:
        k = num_selected(n, r)
        fits = temporaries(e, (k,), world, 4, 4, 2.0) <= MEMORY_BUDGET[e] * n * 4
        assert fits_memory(e, n, k, world, 4, 4, 4, 2.0) == fits
    assert temporaries("dense", (n,), 8, 4, 4) == 0

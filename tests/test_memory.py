"""Memory: what hvd_topk keeps alive is bounded by the model, not by the number of steps;
and the memory layout of the compressor leaves every payload and residual as it was."""

import json
from pathlib import Path

import pytest
import torch
from launch import run_ranks

import hvd_topk
from payload_trace import all_traces

CHECKS = ["sgd", "sgd_0.1%", "sgd_sparse_allreduce", "adamw", "adamw_sparse_allreduce"]


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["cpu_kernel", "generic"])
def test_held_memory_is_bounded_through_the_warmup(kernel):
    out = run_ranks("memory_worker.py", *CHECKS, backend="gloo", np=2, timeout=300,
                    env={"HVD_TOPK_CPU_KERNEL": kernel})
    for check in CHECKS:
        for rank in range(2):
            assert f"rank {rank}/2 {check}: OK" in out, out


def test_payloads_and_residuals_are_unchanged():
    """The same inputs give the same bytes on the wire and the same residuals as recorded in
    tests/data/payload_trace.json (see tests/payload_trace.py)."""
    recorded = json.loads((Path(__file__).parent / "data" / "payload_trace.json").read_text())
    got = all_traces()
    assert set(got) == set(recorded)
    for key, steps in recorded.items():
        first = next((i for i, (a, b) in enumerate(zip(got[key], steps)) if a != b), None)
        assert got[key] == steps, f"{key}: differs from step {first} on"


def test_the_torch_steps_send_the_cpu_kernels_bytes():
    """Both implementations of the selection send the same payload, byte for byte (the same
    set, in ascending position order), and leave the same residuals."""
    recorded = json.loads((Path(__file__).parent / "data" / "payload_trace.json").read_text())
    for key, steps in recorded.items():
        if key.endswith("/torch"):
            assert steps == recorded[key[:-len("torch")] + "kernel"], key


def test_held_bytes_counts_each_storage_once():
    base = torch.zeros(1000)
    views = {"a": base[:10], "b": [base[500:], (base,)], "c": torch.ones(3, dtype=torch.float64)}
    assert hvd_topk.held_bytes(views) == 4000 + 24
    assert hvd_topk.held_bytes(views, exclude=[base]) == 24


def test_layout_caches_hold_one_entry_per_group_through_the_warmup():
    comp = hvd_topk.TopKCompressor(0.01, warmup_steps=50, min_numel=0)
    for _ in range(60):
        for name in ("a", "b"):
            payload, ctx = comp.compress(torch.randn(5000 if name == "a" else 3000), name=name)
            comp.decompress(payload, ctx)
        comp.step_done()
    held = hvd_topk.held_bytes(comp)
    assert held <= 2 * (5000 + 3000) * 4 + 4096, held  # residuals, plus per-segment tables

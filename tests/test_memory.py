"""Memory: what hvd_topk keeps alive is bounded by the model, not by the number of steps;
and the memory layout of the compressor leaves every payload and residual as it was."""


import pytest
import torch
from launch import run_ranks

import hvd_topk
from payload_trace import all_traces, recorded_traces

CHECKS = ["sgd", "sgd_0.1%", "sgd_sparse_allreduce", "adamw", "adamw_sparse_allreduce",
          "one_result_allgather", "one_result_sparse_allreduce", "one_result_adamw"]


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["cpu_kernel", "generic"])
def test_held_memory_is_bounded_through_the_warmup(kernel):
    out = run_ranks("memory_worker.py", *CHECKS, backend="gloo", np=2, timeout=300,
                    env={"HVD_TOPK_CPU_KERNEL": kernel})
    for check in CHECKS:
        for rank in range(2):
            assert f"rank {rank}/2 {check}: OK" in out, out


def test_payloads_and_residuals_are_unchanged():
    """The same inputs give the same bytes on the wire and the same residuals as recorded in
    tests/data (see tests/payload_trace.py: this processor's file, else payload_trace.json)."""
    recorded = recorded_traces()
    got = all_traces()
    assert set(got) == set(recorded)
    for key, steps in recorded.items():
        first = next((i for i, (a, b) in enumerate(zip(got[key], steps)) if a != b), None)
        assert got[key] == steps, f"{key}: differs from step {first} on"


def test_the_torch_steps_send_the_cpu_kernels_bytes():
    """Both implementations of the selection send the same payload, byte for byte (the same
    set, in ascending position order), and leave the same residuals."""
    recorded = recorded_traces()
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


def _largest_allocation(fn) -> int:
    """The largest block of host memory any one op inside ``fn()`` allocated (the profiler's
    per-op accounting: no allocator habits, no timing)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("owned", [True, False], ids=["owned", "copied"])
@pytest.mark.parametrize("select_by", ["agreement", "signal", "momentum", "displacement"])
def test_an_adam_step_makes_no_temporary_of_the_groups_size(select_by, owned):
    """Adam correction's step 1 writes the direction, then the ranking's score, into the
    step's own gradient buffer: where that buffer is the group's (``owned``), no op allocates
    as much as half the group (the candidates' masks are a quarter of it each); where the
    gradient is the caller's, one cleaned copy of it is the only one."""
    from hvd_topk.selection import GroupLayout, select
    from hvd_topk.update import AdamMoments
    n = 1 << 16
    group = n * 4
    v, m, s = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    gen = torch.Generator().manual_seed(0)
    for t in (1, 2):
        g = torch.randn(n, generator=gen)
        adam = AdamMoments(m, s, None, 0.9, 0.999, 1e-8, 1 - 0.9 ** t, 1 - 0.999 ** t, lr=1e-3,
                           clip=10.0, select=select_by)
        largest = _largest_allocation(
            lambda g=g, adam=adam: select(v, g, GroupLayout((n,), (n // 100,)), adam=adam, owned=owned))
        assert largest <= (group // 4 if owned else group), (t, largest / group)

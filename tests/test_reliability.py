"""Hostile inputs on 2 ranks (Gloo): NaN/Inf policy, AMP with GradScaler, dynamic graphs,
zero-element / complex / sparse parameters, registration order, and models that differ.

Each case must end the same way on every rank -- a consistent result or the same clear
error -- never a hang (the launcher's timeout turns one into a failure) or a NaN residual.
"""

import pytest
from launch import run_ranks

RUNS_THROUGH = ["nonfinite_raise", "nonfinite_skip", "nonfinite_dense_tensor",
                "amp_overflow_skipped", "amp_scale_changes_exact", "dynamic_graph",
                "zero_element_and_complex", "sparse_embedding", "registration_order", "elastic_state"]
MISMATCHES = {
    "mismatch_shape": "'big.weight' is (64, 32) torch.float32 on rank 0 but (65, 32)",
    "mismatch_extra_param": "'extra' on rank 1 but not on rank 0",
    "mismatch_ratio": "ranks disagree on this tensor's size, ratio or wire dtypes",
    "mismatch_value_dtype": "sent a payload for something other than this rank's",
    "mismatch_order_grouped": "cut this step's tensors into other groups than rank 0",
}


def test_hostile_inputs_have_consistent_outcomes():
    out = run_ranks("hostile_worker.py", *RUNS_THROUGH, backend="gloo", np=2, timeout=300)
    for check in RUNS_THROUGH:
        for rank in range(2):
            assert f"rank {rank}/2 {check}: OK" in out, out


@pytest.mark.parametrize("check", sorted(MISMATCHES))
def test_models_that_differ_fail_clearly_on_every_rank(check):
    out = run_ranks("hostile_worker.py", check, backend="gloo", np=2, timeout=120)
    for rank in range(2):
        assert f"rank {rank}/2 {check}: OK" in out, out
    assert out.count(MISMATCHES[check]) >= 2, out  # the same message on both ranks


def test_hostile_inputs_on_the_sparse_allreduce():
    """The same cases on ``exchange="sparse_allreduce"``: the same outcomes."""
    env = {"HVD_TOPK_TEST_EXCHANGE": "sparse_allreduce"}
    out = run_ranks("hostile_worker.py", *RUNS_THROUGH, backend="gloo", np=2, timeout=300, env=env)
    for check in RUNS_THROUGH:
        for rank in range(2):
            assert f"rank {rank}/2 {check}: OK" in out, out


@pytest.mark.parametrize("check", sorted(MISMATCHES))
def test_models_that_differ_fail_clearly_on_the_sparse_allreduce(check):
    """Rows of another size or signature reach the region owners: the same messages."""
    env = {"HVD_TOPK_TEST_EXCHANGE": "sparse_allreduce"}
    out = run_ranks("hostile_worker.py", check, backend="gloo", np=2, timeout=120, env=env)
    for rank in range(2):
        assert f"rank {rank}/2 {check}: OK" in out, out
    assert out.count(MISMATCHES[check]) >= 2, out

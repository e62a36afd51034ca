"""Frozen layers stay frozen, and layers unfrozen or added after the optimizer was built are
exchanged like the others (2 ranks, Gloo): see tests/workers/frozen_worker.py."""

import pytest
from launch import run_ranks

RUNS_THROUGH = ["frozen", "frozen_momentum", "stock_reference", "lr_zero", "removed",
                "unused_on_one_rank", "frozen_when_built", "add_param_group"]
DISAGREE = "'0.weight' is frozen (requires_grad=False) on rank(s) [0] but trained on rank(s) [1]"


def test_frozen_removed_and_unused_parameters():
    out = run_ranks("frozen_worker.py", *RUNS_THROUGH, backend="gloo", np=2, timeout=300)
    for check in RUNS_THROUGH:
        for rank in range(2):
            assert f"rank {rank}/2 {check}: OK" in out, out


@pytest.mark.parametrize("check", ["disagree", "disagree_grouped"])
def test_ranks_that_disagree_about_freezing_fail_clearly(check):
    out = run_ranks("frozen_worker.py", check, backend="gloo", np=2, timeout=120)
    for rank in range(2):
        assert f"rank {rank}/2 {check}: OK" in out, out
    assert out.count(DISAGREE) >= 2, out  # the same message on both ranks

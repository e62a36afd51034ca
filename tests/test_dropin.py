"""hvd_topk.DistributedOptimizer as a drop-in for hvd.DistributedOptimizer."""

import inspect

import horovod.torch as hvd
from launch import run_ranks

import hvd_topk

HOROVOD_CASES = ["sparse_embeddings", "clipping_after_synchronize", "groups",
                 "broadcast_optimizer_state", "duplicate_names", "dynamic_requires_grad"]


def test_every_horovod_argument_is_accepted_with_its_default_and_position():
    """A future Horovod that adds an argument fails here until hvd_topk takes it too."""
    stock = list(inspect.signature(hvd.DistributedOptimizer).parameters.values())
    ours = inspect.signature(hvd_topk.DistributedOptimizer).parameters
    assert list(ours)[:len(stock)] == [p.name for p in stock]  # same positions
    for p in stock:
        assert ours[p.name].default == p.default, p.name
        assert ours[p.name].kind == p.kind, p.name
    extra = [p for name, p in ours.items() if name not in {s.name for s in stock}]
    assert extra and all(p.kind == p.KEYWORD_ONLY for p in extra), extra


def test_horovods_own_optimizer_tests_pass():
    out = run_ranks("dropin_worker.py", *HOROVOD_CASES, backend="gloo", np=2, timeout=300)
    for case in HOROVOD_CASES:
        for rank in range(2):
            assert f"rank {rank}/2 {case}: OK" in out, out


def test_process_set_of_two_ranks_out_of_three():
    out = run_ranks("dropin_worker.py", "process_set", backend="gloo", np=3, timeout=300,
                    env={"HOROVOD_DYNAMIC_PROCESS_SETS": "1"})
    for rank in range(3):
        assert f"rank {rank}/3 process_set: OK" in out, out

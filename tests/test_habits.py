"""The loops users already write (tests/workers/habits_worker.py), 2 ranks, Gloo and MPI:
optimizer.state_dict() checkpoints (each rank its own file: bit-identical resume, with an LR
scheduler too; rank 0's
file on every rank; rank 0's state sent by hvd.broadcast_optimizer_state), states that do not
fit, clip_grad_norm=, the warning for clipping after synchronize(), backward_passes_per_step,
OneCycleLR's momentum cycle, torch.compile, zero_grad(set_to_none=False), a channels_last
CNN, bfloat16 parameters and a GAN's two optimizers. One run of the worker per backend."""

import pytest
from launch import run_ranks

CHECKS = ["own_files", "own_files_scheduler", "rank0_file", "rank0_broadcast", "mismatch", "clip_grad_norm",
          "synchronize_warning", "backward_passes_per_step", "one_cycle_momentum", "torch_compile",
          "zero_grad_in_place", "channels_last", "bfloat16_params"]


@pytest.mark.parametrize("backend", ["gloo", "mpi"])
def test_user_habits(tmp_path, backend):
    out = run_ranks("habits_worker.py", *CHECKS, backend=backend, np=2, timeout=300,
                    env={"HVD_TOPK_HABITS_DIR": str(tmp_path)})
    for check in CHECKS:
        for rank in range(2):
            assert f"rank {rank}/2 {check}: OK" in out, out


def test_two_optimizers_in_one_backward():
    """A GAN's two hvd_topk optimizers start their steps' collectives in the same backward;
    Horovod's cycle at 50 ms keeps the first in flight while the second starts, so names
    that collide fail every time instead of by chance."""
    out = run_ranks("habits_worker.py", "two_optimizers", backend="gloo", np=2, timeout=300,
                    env={"HOROVOD_CYCLE_TIME": "50"})
    for rank in range(2):
        assert f"rank {rank}/2 two_optimizers: OK" in out, out

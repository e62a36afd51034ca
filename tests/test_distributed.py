"""2-rank tests, started by the test itself under both Gloo (horovodrun) and MPI (mpirun)."""

import pytest
from launch import run_ranks

BACKENDS = ["gloo", "mpi"]
CHECKS = ["exact", "exact_fp16_values", "exact_grouped", "unlucky_sample_redone",
          "ratio_one", "dense_compressors", "defaults",
          "stock_refuses", "accumulation", "dgc_all_options", "momentum_correction_linear",
          "dense_batch", "sparse_apply"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exchange_is_exact(backend):
    out = run_ranks("exchange_worker.py", *CHECKS, backend=backend, np=2, timeout=300)
    for check in CHECKS:
        for rank in range(2):
            assert f"rank {rank}/2 [{backend}] {check}: OK" in out, out

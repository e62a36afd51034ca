"""The byte model is the wire: ``comm_stats`` equals the bytes of the collectives, on 3 ranks."""

from launch import run_ranks

CHECKS = [f"{e}_{g}_{v}" for e in ("allgather", "sparse_allreduce") for g in ("per_tensor", "grouped")
          for v in ("fp32", "fp16")]


def test_comm_stats_are_the_bytes_on_the_wire():
    out = run_ranks("bytes_worker.py", *CHECKS, np=3, timeout=300)
    for check in CHECKS:
        for rank in range(3):
            assert f"rank {rank}/3 {check}: OK" in out, out

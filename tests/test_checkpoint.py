"""Checkpoints keep every rank's residuals: a resumed run is bit-identical (2 ranks, Gloo)."""

from launch import run_ranks


def test_resume_is_bit_identical(tmp_path):
    out = run_ranks("checkpoint_worker.py", tmp_path / "ckpt.pt", backend="gloo", np=2, timeout=240)
    assert out.count("checkpoint resume bit-identical OK") == 2, out

"""Checkpoints keep every rank's residuals: a resumed run is bit-identical (2 ranks, Gloo);
on another number of ranks, each starts from the old ranks' mean residual."""

from launch import run_ranks


def test_resume_is_bit_identical(tmp_path):
    out = run_ranks("checkpoint_worker.py", tmp_path / "ckpt.pt", backend="gloo", np=2, timeout=240)
    assert out.count("checkpoint resume bit-identical OK") == 2, out


def test_resume_on_other_world_sizes(tmp_path):
    path = tmp_path / "ckpt.pt"
    run_ranks("checkpoint_worker.py", path, backend="gloo", np=2, timeout=240)
    for np in (1, 3):
        out = run_ranks("checkpoint_resize_worker.py", path, backend="gloo", np=np, timeout=240)
        assert out.count(f"/{np}: checkpoint resize OK") == np, out

"""Checkpoints keep every rank's residuals: a resumed run is bit-identical (2 ranks, Gloo);
on another number of ranks, each starts from the old ranks' mean residual."""

import pytest
from launch import run_ranks


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_resume_is_bit_identical(tmp_path, kind):
    out = run_ranks("checkpoint_worker.py", tmp_path / "ckpt.pt", kind, backend="gloo", np=2, timeout=240)
    assert out.count(f"checkpoint resume bit-identical OK ({kind})") == 2, out


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_resume_on_other_world_sizes(tmp_path, kind):
    path = tmp_path / "ckpt.pt"
    run_ranks("checkpoint_worker.py", path, kind, backend="gloo", np=2, timeout=240)
    for np in (1, 3):
        out = run_ranks("checkpoint_resize_worker.py", path, kind, backend="gloo", np=np, timeout=240)
        assert out.count(f"/{np}: checkpoint resize OK ({kind})") == np, out

"""Checkpoints keep every rank's residuals: a resumed run is bit-identical (2 ranks, Gloo);
on another number of ranks, each starts from the old ranks' mean residual."""

import pytest
from launch import run_ranks


@pytest.fixture(scope="module", params=["sgd", "adamw"])
def saved(request, tmp_path_factory):
    """(kind, checkpoint path, output) of a 2-rank run that saves a checkpoint and resumes from it."""
    kind = request.param
    path = tmp_path_factory.mktemp(f"ckpt_{kind}") / "ckpt.pt"
    out = run_ranks("checkpoint_worker.py", path, kind, backend="gloo", np=2, timeout=240)
    return kind, path, out


def test_resume_is_bit_identical(saved):
    kind, _, out = saved
    assert out.count(f"checkpoint resume bit-identical OK ({kind})") == 2, out


def test_resume_on_other_world_sizes(saved):
    kind, path, _ = saved
    for np in (1, 3):
        out = run_ranks("checkpoint_resize_worker.py", path, kind, backend="gloo", np=np, timeout=240)
        assert out.count(f"/{np}: checkpoint resize OK ({kind})") == np, out

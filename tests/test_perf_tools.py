"""Pure logic of the performance scripts: the alpha-beta cost model, and netem.sh's syntax."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import hvd_topk

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ring_formulas():
    m = load("scaling_model")
    # P=2, no latency: a ring allreduce sends n bytes once each way, an allgather k bytes.
    assert m.ring_allreduce_s(2, 1e6, 0.0, 1e6) == pytest.approx(1.0)
    assert m.ring_allgather_s(2, 1e3, 0.0, 1e6) == pytest.approx(1e-3)
    assert m.ring_allreduce_s(4, 0.0, 1e-3, 1.0) == pytest.approx(6e-3)  # 2 (P-1) messages
    assert m.ring_allgather_s(4, 0.0, 1e-3, 1.0) == pytest.approx(3e-3)  # (P-1) messages
    assert m.ring_allreduce_s(1, 1e9, 1.0, 1.0) == 0.0


@pytest.mark.parametrize("ratio", [0.01, 0.001])
def test_model_picks_what_the_compressor_picks(ratio):
    """scaling_model.py's "auto" is the compressor's own choice, and its times add up."""
    m = load("scaling_model")
    n = 1_000_000
    comp = hvd_topk.TopKCompressor(ratio, warmup_steps=0)
    for p in (2, 3, 4, 8, 64, 99, 100, 101, 256, 999, 1000, 1024):
        r = m.predict(p, n, ratio, floor_s=0.1, compress_s=0.01, alpha=0.0, beta=1e8, scatter_s=0.0)
        assert r["chosen"] == comp.exchange_for(torch.zeros(n), p), p
        assert r["auto"] == r[r["chosen"]]
    # With no latency or overheads the time is the bytes over beta, and the bytes are the library's.
    r = m.predict(64, n, ratio, 0.0, 0.0, 0.0, 1e8, 0.0)
    k = hvd_topk.num_selected(n, ratio)
    costs = hvd_topk.exchange_bytes(n, k, 64, 4, 4, 4)
    for e in ("dense", "allgather", "sparse_allreduce"):
        assert r[e] == pytest.approx(costs[e] / 1e8)
    # The sparse allreduce's bytes stay flat in P; the allgather's grow past dense.
    big = m.predict(1024, n, ratio, 0.0, 0.0, 0.0, 1e8, 0.0)
    assert big["sparse_allreduce"] < big["dense"] < big["allgather"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_netem_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPTS / "netem.sh")], check=True)
    out = subprocess.run(["bash", str(SCRIPTS / "netem.sh"), "mpirun-args", "2"], check=True,
                         capture_output=True, text=True).stdout.split("\n")
    assert "10.77.0.1,10.77.0.2" in out and "tcp,self" in out
    # Each host is pinned to its own core by the rsh agent; Open MPI must not re-bind every
    # host's first rank to core 0.
    assert "--bind-to" in out and out[out.index("--bind-to") + 1] == "none"

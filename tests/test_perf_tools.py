"""Pure logic of the performance scripts: the alpha-beta cost model, and netem.sh's syntax."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

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
def test_density_aware_switch_matches_the_optimizer_rule(ratio):
    m = load("scaling_model")
    n = 1_000_000
    k = hvd_topk.num_selected(n, ratio)
    for p in (2, 8, 64, 99, 100, 101, 256, 999, 1000, 1001):
        r = m.predict(p, n, ratio, floor_s=0.1, compress_s=0.01, alpha=0.0, beta=1e8, scatter_s=0.0)
        assert bool(r["sparse_chosen"]) == hvd_topk.sparse_is_cheaper(n, k, p, 4, 8)
        assert r["aware"] == (r["topk"] if r["sparse_chosen"] else r["dense"])
    # With no latency or overheads the byte rule is the time rule: P k 8 < 2 n 4  <=>  P < 1/ratio.
    below = m.predict(int(0.9 / ratio), n, ratio, 0.0, 0.0, 0.0, 1e8, 0.0)
    above = m.predict(int(1.1 / ratio), n, ratio, 0.0, 0.0, 0.0, 1e8, 0.0)
    assert below["topk"] < below["dense"] and above["topk"] > above["dense"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_netem_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPTS / "netem.sh")], check=True)
    out = subprocess.run(["bash", str(SCRIPTS / "netem.sh"), "mpirun-args", "2"], check=True,
                         capture_output=True, text=True).stdout.split("\n")
    assert "10.77.0.1,10.77.0.2" in out and "tcp,self" in out
    # Each host is pinned to its own core by the rsh agent; Open MPI must not re-bind every
    # host's first rank to core 0.
    assert "--bind-to" in out and out[out.index("--bind-to") + 1] == "none"

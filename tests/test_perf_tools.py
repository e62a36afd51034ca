"""Pure logic of the performance scripts: the alpha-beta cost model, and netem.sh's syntax."""

import importlib.util
import math
import os
import shutil
import subprocess
import sys
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


def model_bytes(p, n, k):
    """The byte model written out from its description (``hvd_topk.exchange_bytes``'s
    docstring), float32 values, int32 indices, capacity 2: per rank and direction, a ring
    allreduce's ``2 (P-1)/P * 4 n``; the allgather's ``(P-1) (8 + 8 k)``; the sparse
    allreduce's ``(P-1)`` rows of ``8 + 8 c`` (``c = min(k, ceil(2 k / P))``) and of
    ``8 + 8 R + 4 * 8`` (``R = ceil(k / P)``, 8 int32 load statistics)."""
    c, r = min(k, math.ceil(2 * k / p)), math.ceil(k / p)
    return {"dense": math.ceil(2 * (p - 1) * 4 * n / p), "allgather": (p - 1) * (8 + 8 * k),
            "sparse_allreduce": (p - 1) * ((8 + 8 * c) + (8 + 8 * r + 4 * 8))}


@pytest.mark.parametrize("ratio", [0.01, 0.001])
def test_model_picks_what_the_compressor_picks(ratio, monkeypatch):
    """scaling_model.py against the byte model and the time model written out here (no
    latency, no scatter cost: floor, + compress for Top-K, + bytes / beta): its "chosen" is
    the fastest (ties: dense, allgather, sparse allreduce), which is also the compressor's own
    choice under the same link and compute figures. Relative tolerance 1e-12 on times."""
    m = load("scaling_model")
    n = 1_000_000
    k = max(1, math.ceil(ratio * n))
    floor, compress, beta = 0.1, 0.01, 1e8
    monkeypatch.setenv("HVD_TOPK_COMPUTE_NS", f"select={1e9 * compress / n},scatter=0,owner=0")
    comp = hvd_topk.TopKCompressor(ratio, warmup_steps=0, link_gbps=8 * beta / 1e9, link_latency_us=0)
    for p in (2, 3, 4, 8, 64, 99, 100, 101, 256, 999, 1000, 1024):
        costs = model_bytes(p, n, k)
        times = {e: costs[e] / beta + (compress if e != "dense" else 0.0) for e in costs}
        want = min(("dense", "allgather", "sparse_allreduce"), key=lambda e: times[e])  # first of ties
        r = m.predict(p, n, ratio, floor_s=floor, compress_s=compress, alpha=0.0, beta=beta, scatter_s=0.0)
        assert r["chosen"] == want == comp.exchange_for(torch.zeros(n), p), (p, costs, r["chosen"])
        assert r["auto"] == r[want]
        assert {e: r[f"bytes_{e}"] for e in costs} == costs
        for e in costs:
            assert r[e] == pytest.approx(floor + times[e], rel=1e-12), (p, e)
    # The sparse allreduce's bytes stay flat in P; the allgather's grow past dense.
    big = m.predict(1024, n, ratio, 0.0, 0.0, 0.0, beta, 0.0)
    assert big["sparse_allreduce"] < big["dense"] < big["allgather"]
    # Latency: the sparse allreduce's alltoall adds its P - 1 messages; the fused collectives none.
    fast, slow = (m.predict(8, n, ratio, 0.0, 0.0, alpha, beta, 0.0) for alpha in (0.0, 1e-3))
    assert slow["sparse_allreduce"] - fast["sparse_allreduce"] == pytest.approx(7e-3)
    assert slow["allgather"] == fast["allgather"] and slow["dense"] == fast["dense"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_netem_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPTS / "netem.sh")], check=True)
    out = subprocess.run(["bash", str(SCRIPTS / "netem.sh"), "mpirun-args", "2"], check=True,
                         capture_output=True, text=True).stdout.split("\n")
    assert "10.77.0.1,10.77.0.2" in out and "tcp,self" in out
    # Each host is pinned to its own core by the rsh agent; Open MPI must not re-bind every
    # host's first rank to core 0.
    assert "--bind-to" in out and out[out.index("--bind-to") + 1] == "none"


def test_bench_lm_merges_an_earlier_runs_seeds(tmp_path, monkeypatch):
    """``bench_lm.py --merge``: an earlier JSON's seeds join this run's means for the same
    configuration and flags (found anywhere in the document), and a seed found there is not
    run again; other flags are not taken from it."""
    bench_lm = load("bench_lm")
    args = bench_lm.parse_args(["--families", "transformer", "--corpora", "pydoc", "--lrs", "3e-3",
                                "--seeds", "1", "--methods", "dense", "topk1", "--cache", str(tmp_path)])
    flags = {m: ["--model", "transformer", "--corpus", "pydoc", "--lr", "0.003", *bench_lm.HF_ADAMW,
                 *bench_lm.METHODS[m]] for m in ("dense", "topk1")}
    record = lambda method, seeds, last, extra=(): {  # noqa: E731
        "family": "transformer", "corpus": "pydoc", "lr": 0.003, "steps": 800, "method": method,
        "flags": flags[method] + list(extra), "seeds": seeds, "last": last, "best": last}
    earlier = tmp_path / "earlier.json"
    earlier.write_text(bench_lm.json.dumps({"a section": [{"argv": [], "records": [
        record("dense", [0, 1], [1.0, 9.0]), record("topk1", [0], [1.2]),
        record("topk1", [2], [5.0], ["--warmup-steps", "300"])]}]}))
    args.merge = [str(earlier)]

    ran = []

    def run_lm(flags, args, seed, steps):  # this run's seed 1: Top-K 1% 2.1
        ran.append((flags[-1], seed))
        final = 2.1 if flags[-1] == "0.01" else 2.0
        return [(steps, final)], final

    monkeypatch.setattr(bench_lm, "run_lm", run_lm)
    records = {r["method"]: r for r in bench_lm.run_grid(args)}
    assert ran == [("0.01", 1)]  # dense's seed 1 is the earlier JSON's
    assert records["dense"]["seeds"] == [1, 0] and records["dense"]["last"] == [9.0, 1.0]
    assert records["topk1"]["seeds"] == [1, 0] and records["topk1"]["last"] == [2.1, 1.2]
    table = bench_lm.table(list(records.values()), args)
    assert "5.0000 / 5.0000" in table and "1.6500 (-67.00%)" in table
    assert "Mean of seeds 0 1" in table


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_malloc_counter_counts_what_is_allocated_and_freed(tmp_path):
    """bench_memory.py's CPU counterpart of torch.cuda.memory_allocated (malloc_count.c,
    preloaded): a tensor's bytes are counted while it lives, on any thread, and the peak
    holds the most since the last reset."""
    lib = tmp_path / "malloc_count.so"
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(SCRIPTS / "malloc_count.c")],
                   check=True)
    code = """
import sys, threading
sys.path.insert(0, sys.argv[1])
import torch
from bench_memory import AllocCounter
assert AllocCounter.loaded()
c = AllocCounter()
start = c.reset()
t = torch.empty(10_000_000)  # 40 MB
held = c.now() - start
del t
freed = c.now() - start
out = []
th = threading.Thread(target=lambda: out.append(torch.ones(5_000_000)))  # 20 MB, another thread
th.start(); th.join()
other = c.now() - start
out.clear()
print(held, freed, other, c.peak() - start)
"""
    env = dict(os.environ, LD_PRELOAD=str(lib))
    res = subprocess.run([sys.executable, "-c", code, str(SCRIPTS)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    held, freed, other, peak = map(int, res.stdout.split()[-4:])
    assert 40_000_000 <= held <= 40_000_000 + (1 << 20), held
    assert abs(freed) <= 1 << 20, freed
    assert 20_000_000 <= other <= 20_000_000 + (1 << 20), other
    assert 40_000_000 <= peak <= 40_000_000 + (1 << 20), peak

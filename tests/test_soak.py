"""scripts/soak.py: a short soak passes, a rank that diverges fails it, a hang is killed."""

import re
import sys
import time
from pathlib import Path

from launch import REPO, launch

SOAK = REPO / "scripts" / "soak.py"


def soak(*args, timeout=180):
    """Run the soak (it launches its own ranks); return (exit code, output). Past ``timeout``
    the soak and its ranks are killed and the test fails with their output."""
    return launch([sys.executable, SOAK, *args], timeout, check=False)


def test_short_soak_passes_on_4_ranks():
    rc, out = soak("--np", 4, "--steps", 200, "--timeout", 150)
    assert rc == 0, out
    assert "soak: PASS 200 steps on 4 ranks" in out, out
    assert re.search(r"max residual L2 .*Q1 [\d.e+-]+ +Q2 .*Q3 .*Q4 [\d.e+-]+", out), out
    assert re.search(r"bytes sent +[\d.]+% of dense", out), out
    assert "ranks identical  True" in out, out


def test_a_diverging_rank_fails_the_soak():
    # The last rank nudges one parameter by 1e-6 after step 10: the hash compared at step 20
    # must differ, and every rank must exit non-zero.
    rc, out = soak("--np", 2, "--steps", 40, "--check-every", 20, "--diverge-at", 10, "--timeout", 120)
    assert rc != 0, out
    assert "soak: FAIL: ranks disagree (first hash mismatch at step 20" in out, out


def test_a_hang_is_killed_with_every_rank():
    seed = 918273645  # marks this run's processes
    t0 = time.time()
    rc, out = soak("--np", 2, "--steps", 10**7, "--timeout", 10, "--seed", seed, timeout=60)
    assert rc == 124, out
    assert "soak: FAIL (hung: killed after 10s)" in out, out
    assert time.time() - t0 < 40, out
    time.sleep(1)
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # exited while we looked
        if b"soak.py" in b" ".join(args) and str(seed).encode() in args:
            left.append(cmdline.parent.name)
    assert not left, f"processes left running: {left}"

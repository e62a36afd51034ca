"""Start a worker script on several ranks (horovodrun --gloo or mpirun) with a timeout.

A hang becomes a failure that shows every rank's output, instead of a stuck test suite.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"
BIN = Path(sys.executable).parent


def mpirun_prefix(np: int) -> list:
    cmd = [shutil.which("mpirun") or "mpirun", "-np", str(np), "--oversubscribe",
           "--bind-to", "none", "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


def launcher(backend: str, np: int) -> list:
    if backend == "gloo":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", "--gloo"]
    if backend == "mpi":
        return mpirun_prefix(np)
    raise ValueError(f"backend must be 'gloo' or 'mpi', got {backend!r}")


def run_ranks(script, *args, backend: str = "gloo", np: int = 2, timeout: float = 240,
              env: dict | None = None) -> str:
    """Run ``python script args`` on ``np`` ranks; return the combined output.

    Raises AssertionError with all ranks' output on a non-zero exit or a timeout.
    """
    script = Path(script)
    if not script.is_absolute():
        script = WORKERS / script
    full_env = dict(os.environ)
    full_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                     "PYTHONPATH": os.pathsep.join([str(REPO), str(WORKERS.parent)])})
    full_env.update(env or {})
    cmd = launcher(backend, np) + [sys.executable, str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} hung for {timeout}s; output:\n{out}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}; output:\n{out}")
    return out

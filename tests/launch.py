"""Start ranks (horovodrun --gloo, mpirun, or a launcher under test) with a timeout.

``launch`` is the one way the tests start processes that start ranks: a hang becomes a failure
that shows every rank's output (the launcher and every process it started are killed),
instead of a stuck test suite. ``run_ranks`` builds on it for a worker script on ``np`` ranks.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

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


def launch(cmd: Sequence, timeout: float, *, env: Optional[dict] = None, cwd=REPO,
           on_line: Optional[Callable[[str], None]] = None, check: bool = True) -> Tuple[int, str]:
    """Run ``cmd`` in its own session, stdout and stderr combined; return (exit code, output).

    Arguments:
        timeout: seconds; past it the whole session (the launcher and its ranks) is killed
            and AssertionError raised with the output so far.
        env: the complete environment (default: this process's).
        on_line: called with each line of output as it arrives (e.g. to act mid-run).
        check: raise AssertionError with the output on a non-zero exit.
    """
    cmd = [str(c) for c in cmd]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    hung = threading.Event()

    def kill():
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        except ProcessLookupError:  # every one of them had already exited
            return
        hung.set()

    timer = threading.Timer(timeout, kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line is not None:
                on_line(line)
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:  # on_line raised: leave nothing running
            kill()
            proc.wait()
        proc.stdout.close()
    out = "".join(lines)
    if hung.is_set():
        raise AssertionError(f"{' '.join(cmd)} hung for {timeout}s; output:\n{out}")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}; output:\n{out}")
    return proc.returncode, out


def worker_env(extra: Optional[dict] = None) -> dict:
    """This process's environment for ranks: unbuffered, one OpenMP thread, the checkout and
    tests/ importable, then ``extra``."""
    env = dict(os.environ)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO), str(WORKERS.parent)])})
    env.update(extra or {})
    return env


def run_ranks(script, *args, backend: str = "gloo", np: int = 2, timeout: float = 240,
              env: dict | None = None) -> str:
    """Run ``python script args`` on ``np`` ranks; return the combined output.

    Raises AssertionError with all ranks' output on a non-zero exit or a timeout.
    """
    script = Path(script)
    if not script.is_absolute():
        script = WORKERS / script
    cmd = launcher(backend, np) + [sys.executable, str(script), *map(str, args)]
    return launch(cmd, timeout, env=worker_env(env))[1]

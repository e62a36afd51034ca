"""Horovod Elastic on localhost: a worker is killed mid-training; the survivors finish.

Hosts ``localhost:2`` and ``127.0.0.1:1`` (one machine, two host names, as Horovod's own
elastic tests do): the worker on 127.0.0.1 is SIGKILLed during epoch 3, its host is
blacklisted, and the two survivors roll back to the last commit (model, optimizer, residuals)
and train to the end. Checked: no hang (timeout), the reset happened, accuracy holds.
"""

import os
import re
import signal
import sys
from pathlib import Path

from launch import BIN, launch, worker_env

TIMEOUT = 300


def workers_on(host: str, script: str):
    """PIDs of Horovod workers launched for ``host`` running ``script``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmd = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"HOROVOD_HOSTNAME={host}".encode() in env and script.encode() in cmd \
                and b"python" in cmd.split(b"\0")[0]:
            pids.append(int(entry.name))
    return pids


def test_killed_worker_training_completes(tmp_path):
    discover = tmp_path / "discover_hosts.sh"
    discover.write_text("#!/bin/bash\necho localhost:2\necho 127.0.0.1:1\n")
    discover.chmod(0o755)
    cmd = [str(BIN / "horovodrun"), "-np", "3", "--min-np", "2", "--max-np", "3",
           "--host-discovery-script", str(discover),
           sys.executable, "examples/train_elastic.py", "--topk", "0.01", "--epochs", "8",
           "--batches-per-commit", "5", "--no-progress"]
    killed = []

    def kill_the_127_worker(line):
        if not killed and re.search(r"\[0\]<stdout>:epoch +2 +ranks 3", line):
            killed.extend(workers_on("127.0.0.1", "train_elastic.py"))
            for pid in killed:
                os.kill(pid, signal.SIGKILL)

    rc, out = launch(cmd, TIMEOUT, env=worker_env(), on_line=kill_the_127_worker, check=False)
    assert killed, f"no worker on 127.0.0.1 to kill:\n{out}"
    assert rc == 0, f"exit {rc}:\n{out}"
    assert re.search(r"reset: 2 ranks now", out), out
    assert re.search(r"epoch +8 +ranks 2", out), out
    acc = float(re.search(r"final test accuracy: ([\d.]+)%", out).group(1))
    print(f"elastic: final test accuracy {acc:.2f}% after losing a worker")

    assert acc >= 90.0, out

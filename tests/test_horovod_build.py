"""The Horovod build of scripts/install.sh, checked without a GPU.

scripts/patch_horovod_sdist.sh patches a private copy of Horovod's sdist (C++17, CUDA C++17,
GCC 13's missing includes). These tests run it on the real sdist -- the one install.sh cached
(~/.cache/hvd-topk/sdist), the carried one (.carry/) or $HOROVOD_SDIST -- and skip when none
is on this machine. The include fix is also compiled: a file that uses std::string, uint32_t
and std::runtime_error without including anything must build with the patched CMake line.
The rest of the build (CMake 4, NCCL from the wheel, GPU architectures) is what install.sh
exports; those lines are checked as text here and were run on the GPU machine.
"""

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from launch import REPO

VERSION = "0.28.1"
PATCH = REPO / "scripts" / "patch_horovod_sdist.sh"
INSTALL = REPO / "scripts" / "install.sh"


def find_sdist():
    cache = Path(os.environ.get("HVD_TOPK_CACHE", Path.home() / ".cache" / "hvd-topk"))
    candidates = [os.environ.get("HOROVOD_SDIST", ""), cache / "sdist" / f"horovod-{VERSION}.tar.gz",
                  REPO / ".carry" / f"horovod-{VERSION}.tar.gz"]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


SDIST = find_sdist()
needs_sdist = pytest.mark.skipif(
    SDIST is None, reason=f"no horovod-{VERSION}.tar.gz here: scripts/install.sh caches it in "
    "~/.cache/hvd-topk/sdist (or set HOROVOD_SDIST)")


def patch(src):
    return subprocess.run([str(PATCH), str(src)], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    """(pristine tree, patched tree) of the sdist."""
    root = tmp_path_factory.mktemp("sdist")
    with tarfile.open(SDIST) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.11.4
        tar.extractall(root / "pristine", **safe)
    shutil.copytree(root / "pristine", root / "patched")
    src = root / "patched" / f"horovod-{VERSION}"
    proc = patch(src)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root / "pristine" / f"horovod-{VERSION}", src


@needs_sdist
def test_patched_copy_carries_every_fix(patched):
    pristine, src = patched
    top = (src / "CMakeLists.txt").read_text()
    torch = (src / "horovod" / "torch" / "CMakeLists.txt").read_text()
    cuda = (src / "horovod" / "common" / "ops" / "cuda" / "CMakeLists.txt").read_text()
    # The fixes are needed: the pristine sdist has none of them.
    assert "set(CMAKE_CXX_STANDARD 14)" in (pristine / "CMakeLists.txt").read_text()
    assert "set(CMAKE_CUDA_STANDARD 11)" in (pristine / "horovod/common/ops/cuda/CMakeLists.txt").read_text()
    # 1. C++17 (PyTorch >= 2.1), top level and the torch extension.
    assert "set(CMAKE_CXX_STANDARD 17)" in top and "CMAKE_CXX_STANDARD 14" not in top
    assert "set(CMAKE_CXX_STANDARD 17)" in torch and "CMAKE_CXX_STANDARD 14" not in torch
    # 2. C++17 for nvcc (CUDA 13).
    assert "set(CMAKE_CUDA_STANDARD 17)" in cuda
    # 3. GCC 13: <cstdint>, <string>, <stdexcept> forced into every C++ file, before any target
    # (gloo and the torch extension are subdirectories added later) and not for nvcc.
    line = ('add_compile_options("$<$<COMPILE_LANGUAGE:CXX>:'
            'SHELL:-include cstdint -include string -include stdexcept>")')
    assert top.count(line) == 1
    assert top.index(line) < top.index("add_subdirectory(") and top.index(line) > top.index("project(")
    # Nothing else changed: exactly these three files differ from the pristine sdist.
    changed = sorted(str(p.relative_to(src)) for p in src.rglob("*")
                     if p.is_file() and p.read_bytes() != (pristine / p.relative_to(src)).read_bytes())
    assert changed == ["CMakeLists.txt", "horovod/common/ops/cuda/CMakeLists.txt",
                       "horovod/torch/CMakeLists.txt"]


@needs_sdist
def test_patch_is_idempotent(patched):
    _, src = patched
    files = sorted(p for p in src.rglob("CMakeLists.txt"))
    before = [p.read_bytes() for p in files]
    proc = patch(src)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [p.read_bytes() for p in files] == before


def test_patch_refuses_a_tree_that_is_not_horovod(tmp_path):
    proc = patch(tmp_path)
    assert proc.returncode != 0 and "not an unpacked Horovod sdist" in proc.stderr


@needs_sdist
@pytest.mark.skipif(not (shutil.which("cmake") and shutil.which("c++") and shutil.which("make")),
                    reason="cmake, c++ and make are needed to compile")
def test_include_fix_reaches_the_compiler(patched, tmp_path):
    """The patched CMake line, in a project of its own: a file that includes nothing compiles
    only if <cstdint>, <string> and <stdexcept> arrive through it (GCC 13 or not)."""
    _, src = patched
    line = next(ln for ln in (src / "CMakeLists.txt").read_text().splitlines()
                if ln.startswith("add_compile_options(") and "-include cstdint" in ln)
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.13)\nproject(probe CXX)\nset(CMAKE_CXX_STANDARD 17)\n"
        f"{line}\nadd_executable(probe probe.cc)\n")
    (tmp_path / "probe.cc").write_text(
        "int main() { std::string s = \"ok\"; uint32_t n = 0;\n"
        "  try { throw std::runtime_error(s); } catch (const std::runtime_error &e) { n = 1; }\n"
        "  return n == 1 ? 0 : 1; }\n")
    env = {**os.environ, "CMAKE_POLICY_VERSION_MINIMUM": "3.5"}
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", tmp_path, "-B", build], ["cmake", "--build", build]):
        proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert subprocess.run([str(build / "probe")], timeout=10).returncode == 0


def test_install_script_builds_with_the_toolchain_fixes():
    """What install.sh does around the patched sdist (run for real on the GPU machine)."""
    text = INSTALL.read_text()
    build = text[text.index("# 4. Horovod"):text.index("# 5. Verify")]
    # apt only for commands that are missing, never because dpkg does not know a package
    assert "dpkg" not in text and re.search(r'command -v "\$tool"', text)
    # cffi and pycparser (setup_requires) installed before the build; no build isolation
    assert build.index("cffi pycparser") < build.index("pip wheel")
    assert "--no-build-isolation" in build[build.index("pip wheel"):]
    assert build.index("patch_horovod_sdist.sh") < build.index("pip wheel")
    assert "export CMAKE_POLICY_VERSION_MINIMUM=3.5" in build
    # NCCL from the wheel: include, a libnccl.so link, shared linking, an rpath
    for needle in ("HOROVOD_NCCL_INCLUDE=", "HOROVOD_NCCL_LINK=SHARED", "libnccl.so",
                   "-Wl,-rpath,", "nvidia/nccl/include/nccl.h"):
        assert needle in build, needle
    # the cached wheel's key names the CUDA toolkit and the GPU architectures
    key = re.search(r'KEY="(\$PYVER-torch\$TORCH_FULL[^"]*)"', build).group(1)
    assert "cuda$CUDA_RELEASE" in key and "sm${HOROVOD_BUILD_CUDA_CC_LIST" in key
    assert "get_device_capability" in build and "HOROVOD_BUILD_CUDA_CC_LIST" in build
    # a prebuilt wheel is tried first, and verified
    assert "HOROVOD_WHEEL" in build and "horovod_ok verbose" in build


def test_gpu_check_runs_every_step():
    text = (REPO / "scripts" / "gpu_check.sh").read_text()
    for needle in ("./scripts/install.sh", "hvd.nccl_built()", "hvd.mpi_built()", "hvd.gloo_built()",
                   "exchange_worker sparse_allreduce_worker", "scripts/bench_compression.py --device cuda",
                   "--sizes 1M,4M,25M,100M", "scripts/bench_step.py --models resnet50,resnet18,vit_b_16",
                   "scripts/bench_memory.py --device cuda", "examples/train.py --device cuda",
                   "--allow-run-as-root", "HOROVOD_ELASTIC=1", 'tee -a "$OUT/gpu_check.log"',
                   "16 * 1024 * 1024", "HVD_TOPK_VENV", "HOROVOD_WHEEL"):
        assert needle in text, needle


def test_install_builds_on_every_core_whatever_omp_num_threads():
    """``nproc`` honours OMP_NUM_THREADS, which the launch scripts set to 1: the build's
    ``-j`` must not (one core turned a 2-minute Horovod build into a 7-minute timeout)."""
    line = next(ln for ln in (REPO / "scripts" / "install.sh").read_text().splitlines()
                if ln.startswith("export MAKEFLAGS="))
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "OMP_THREAD_LIMIT")}
    env["OMP_NUM_THREADS"] = "1"
    got = subprocess.run(["bash", "-c", f'{line}; echo "$MAKEFLAGS"'], env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert got == f"-j{len(os.sched_getaffinity(0))}"

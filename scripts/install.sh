#!/usr/bin/env bash
# Install everything hvd_topk needs: a fresh Debian machine (Python 3.11, CPU), or a CUDA machine
# with or without internet (tried: CUDA 13.0, GCC 13, CMake 4, NCCL from the nvidia-nccl-cu13
# wheel; README "GPU machines").
#
# Idempotent: each step checks first and does nothing when already done, so a second run
# takes seconds. Steps:
#   1. system tools (mpicxx + mpirun, cmake, g++, make) via apt, only for commands missing
#      from PATH (an offline machine with them installed never calls apt);
#   2. a virtual environment (.venv, or $HVD_TOPK_VENV);
#   3. PyTorch: reuse one already importable, else torch==$TORCH_VERSION (pinned, so pip
#      never pulls a multi-GB CUDA build by accident);
#   4. Horovod $HOROVOD_VERSION built from its PyPI sdist, patched by
#      scripts/patch_horovod_sdist.sh (C++17, GCC 13 includes), with PyTorch + MPI + Gloo
#      (+ NCCL when CUDA is present: a system NCCL, or the nvidia-nccl-cu* wheel torch loads).
#      cffi and pycparser (Horovod's setup_requires) are installed first, so setuptools never
#      downloads them; CMAKE_POLICY_VERSION_MINIMUM=3.5 lets CMake 4 configure gloo. The wheel
#      is cached in $HVD_TOPK_CACHE/wheels/<key>, the key naming Python, torch, Horovod and
#      cpu, or the CUDA toolkit and GPU architectures (cuda13.0-sm90);
#   5. `horovodrun --check-build`;
#   6. `pip install -e .` with the project's dependencies;
#   7. the optional CPU kernel (hvd_topk/csrc), compiled once, then only loaded.
#
# Environment knobs:
#   HVD_TOPK_VENV     venv path (default: <repo>/.venv); "none" installs into $HVD_TOPK_PYTHON
#                     itself (Docker images, a system-wide venv: its torch is used as it is)
#   HVD_TOPK_PYTHON   interpreter used to create the venv (default: python3)
#   HVD_TOPK_DEVICE   cpu or cuda: which Horovod to build (default: cuda when torch has CUDA and
#                     a GPU or nvcc is present; set it in a `docker build`, which sees no GPU)
#   HVD_TOPK_CACHE    wheel and sdist cache (default: ~/.cache/hvd-topk)
#   HVD_TOPK_EXTRAS   extras of `pip install -e .` (default: test; "" for the runtime only;
#                     "test,bench" adds transformers for scripts/bench_lm.py)
#   HOROVOD_SDIST     path to a horovod-X.tar.gz to build from (offline machines)
#   HOROVOD_WHEEL     a prebuilt Horovod wheel to try first (built by this script elsewhere);
#                     used when it imports with this torch (and has NCCL for cuda), else built
#   HOROVOD_BUILD_CUDA_CC_LIST  GPU architectures to compile for (default: the visible GPUs',
#                     else torch's own list, e.g. "90" for an H100/H200)
#   HOROVOD_NCCL_HOME / HOROVOD_NCCL_INCLUDE / HOROVOD_NCCL_LIB  a NCCL to use instead
#   TORCH_VERSION     default 2.13.0;  HOROVOD_VERSION  default 0.28.1
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
CACHE="${HVD_TOPK_CACHE:-$HOME/.cache/hvd-topk}"
VENV="${HVD_TOPK_VENV:-$REPO/.venv}"
PYTHON_BOOT="${HVD_TOPK_PYTHON:-python3}"
# nproc alone would honour OMP_NUM_THREADS (1 in the launch scripts) and build on one core.
export MAKEFLAGS="${MAKEFLAGS:--j$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[install] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# 1. System tools ------------------------------------------------------------------------
# By command, not by package: an offline machine with Open MPI, CMake (from pip, say) and GCC
# installed some other way must never reach for apt.
declare -A APT_PACKAGE=([mpicxx]=libopenmpi-dev [mpirun]=openmpi-bin [cmake]=cmake [g++]=g++ [make]=make)
need_apt=()
for tool in mpicxx mpirun cmake g++ make; do
    command -v "$tool" >/dev/null 2>&1 || need_apt+=("${APT_PACKAGE[$tool]}")
done
if ((${#need_apt[@]})); then
    command -v apt-get >/dev/null 2>&1 \
        || die "missing tools (packages ${need_apt[*]}) and no apt-get: install them first"
    log "apt-get install ${need_apt[*]}"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# 2. Virtual environment -----------------------------------------------------------------
if [[ "$VENV" == "none" ]]; then
    PY="$(command -v "$PYTHON_BOOT")" || die "no $PYTHON_BOOT on PATH (HVD_TOPK_PYTHON)"
else
    if [[ ! -x "$VENV/bin/python" ]]; then
        # Reuse a system-wide PyTorch (e.g. a CUDA base image) instead of downloading another.
        # (Not one inside another venv: a venv made from it sees its base Python's packages,
        # not the venv's; use HVD_TOPK_VENV=none with that venv's python.)
        site=()
        if "$PYTHON_BOOT" -c "import torch" >/dev/null 2>&1; then site=(--system-site-packages); fi
        log "creating venv $VENV ${site[*]:-}"
        "$PYTHON_BOOT" -m venv "${site[@]}" "$VENV"
    fi
    PY="$VENV/bin/python"
fi
BIN="$(dirname "$PY")"
pip_install() { "$PY" -m pip install -q "$@"; }
"$PY" -c "import setuptools, wheel, packaging, numpy" >/dev/null 2>&1 \
    || pip_install setuptools wheel packaging numpy

# 3. PyTorch -----------------------------------------------------------------------------
# One interpreter start (importing torch takes seconds): version, device, Python.
torch_facts() {
    "$PY" -c '
import shutil, sys, torch
cuda = torch.cuda.is_available() or torch.version.cuda and shutil.which("nvcc")
print(torch.__version__.split("+")[0], "cuda" if cuda else "cpu", f"py{sys.version_info[0]}{sys.version_info[1]}")'
}
if ! facts="$(torch_facts 2>/dev/null)"; then
    log "pip install torch==$TORCH_VERSION"
    pip_install "torch==$TORCH_VERSION"
    facts="$(torch_facts)"
fi
read -r TORCH_HAVE CUDA_DETECTED PYVER <<<"$facts"
CUDA_HAVE="${HVD_TOPK_DEVICE:-$CUDA_DETECTED}"
[[ "$CUDA_HAVE" == cpu || "$CUDA_HAVE" == cuda ]] \
    || die "HVD_TOPK_DEVICE must be cpu or cuda, got '$CUDA_HAVE'"
log "python $PYVER, torch $TORCH_HAVE ($CUDA_HAVE)"

# 4. Horovod -----------------------------------------------------------------------------
# Prints what the installed Horovod was built with; fails (and says why when asked) unless it
# imports with this torch and has MPI, Gloo and, for cuda, NCCL (a CPU-only one gets rebuilt).
horovod_ok() {
    local out
    out="$(NEED_NCCL="$CUDA_HAVE" "$PY" - <<'PY' 2>&1
import os
import horovod
import horovod.torch as hvd
assert hvd.mpi_built() and hvd.gloo_built(), "Horovod without MPI or Gloo"
assert os.environ["NEED_NCCL"] != "cuda" or hvd.nccl_built(), "Horovod without NCCL"
built = [name for name, yes in (("MPI", hvd.mpi_built()), ("Gloo", hvd.gloo_built()),
                                ("NCCL", hvd.nccl_built())) if yes]
print(f"horovod {horovod.__version__} with PyTorch, {', '.join(built)}")
PY
)" && { HOROVOD_SUMMARY="$out"; return 0; }
    [[ "${1:-}" == verbose ]] && log "horovod does not work here: $(tail -n1 <<<"$out")"
    return 1
}
install_horovod_wheel() {
    # Horovod's runtime deps first (no-ops when present, so offline is fine), then the wheel
    # itself, replacing any installed Horovod of the same version (a CPU-only one, say).
    pip_install cloudpickle psutil pyyaml packaging cffi pycparser
    pip_install --no-deps --force-reinstall "$1"
}

# CUDA facts: the toolkit that compiles Horovod's kernels, the architectures to compile for.
cuda_facts() {
    local nvcc
    nvcc="$(command -v nvcc || true)"
    if [[ -z "$nvcc" ]]; then
        nvcc="${HOROVOD_CUDA_HOME:-${CUDA_HOME:-/usr/local/cuda}}/bin/nvcc"
        [[ -x "$nvcc" ]] || die "HVD_TOPK_DEVICE=cuda needs nvcc: not on PATH, nor in \$CUDA_HOME/bin or /usr/local/cuda/bin"
        PATH="$(dirname "$nvcc"):$PATH"  # for CMake's CUDA detection too
        export PATH
    fi
    CUDA_RELEASE="$("$nvcc" --version | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p')"
    [[ -n "$CUDA_RELEASE" ]] || die "could not read the CUDA release from '$nvcc --version'"
    if [[ -z "${HOROVOD_BUILD_CUDA_CC_LIST:-}" ]]; then
        # The visible GPUs' capabilities; without a GPU (docker build) torch's own list, less
        # what this nvcc cannot compile. Otherwise nvcc would build for every architecture.
        HOROVOD_BUILD_CUDA_CC_LIST="$(NVCC_CODES="$("$nvcc" --list-gpu-code 2>/dev/null | tr '\n' ' ')" "$PY" -c '
import os, re, torch
if torch.cuda.is_available():
    cc = {"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
else:
    cc = {m.group(1) for a in torch.cuda.get_arch_list() if (m := re.fullmatch(r"sm_(\d+)", a))}
    nvcc = set(re.findall(r"sm_(\d+)\b", os.environ["NVCC_CODES"]))
    cc = cc & nvcc if nvcc else cc
print(",".join(sorted(cc, key=int)))')"
    fi
    [[ "$HOROVOD_BUILD_CUDA_CC_LIST" =~ ^[0-9]+(,[0-9]+)*$ ]] || {
        log "no GPU architecture found (HOROVOD_BUILD_CUDA_CC_LIST='$HOROVOD_BUILD_CUDA_CC_LIST'): nvcc's full list"
        unset HOROVOD_BUILD_CUDA_CC_LIST
    }
}

# NCCL for the build: a user's HOROVOD_NCCL_*, else the nvidia-nccl-cu* wheel that torch itself
# loads (one NCCL in the process), else Horovod's own search (CUDA toolkit, system paths).
# The wheel has libnccl.so.2 but no libnccl.so for the linker: a link to it goes in $1. Its
# directory is baked in as an rpath, so nothing needs LD_LIBRARY_PATH at run time.
nccl_for_build() {
    local linkdir="$1" found inc lib
    if [[ -n "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_INCLUDE:-}${HOROVOD_NCCL_LIB:-}" ]]; then
        log "NCCL: HOROVOD_NCCL_HOME/INCLUDE/LIB as given"
        return
    fi
    found="$("$PY" -c '
import glob, os, sys
for path in sys.path:
    for pattern in ("nvidia/nccl/include/nccl.h", "nvidia/*/include/nccl.h", "nvidia/*/nccl/include/nccl.h"):
        for header in sorted(glob.glob(os.path.join(path, pattern))):
            lib = os.path.join(os.path.dirname(os.path.dirname(header)), "lib")
            if glob.glob(os.path.join(lib, "libnccl.so*")):
                print(os.path.dirname(header), lib)
                sys.exit()')"
    if [[ -z "$found" ]]; then
        log "NCCL: no nvidia-nccl wheel next to torch; Horovod looks for a system NCCL"
        return
    fi
    read -r inc lib <<<"$found"
    if [[ ! -e "$lib/libnccl.so" ]]; then
        mkdir -p "$linkdir"
        ln -sf "$(ls "$lib"/libnccl.so.* | head -n1)" "$linkdir/libnccl.so"
        export HOROVOD_NCCL_LIB="$linkdir"
    else
        export HOROVOD_NCCL_LIB="$lib"
    fi
    export HOROVOD_NCCL_INCLUDE="$inc" HOROVOD_NCCL_LINK=SHARED
    export LDFLAGS="${LDFLAGS:+$LDFLAGS }-Wl,-rpath,$lib"
    log "NCCL: the wheel's, $inc and $lib (linked through $HOROVOD_NCCL_LIB)"
}

HOROVOD_NEW=0
if ! horovod_ok && [[ -n "${HOROVOD_WHEEL:-}" ]]; then
    [[ -f "$HOROVOD_WHEEL" ]] || die "HOROVOD_WHEEL=$HOROVOD_WHEEL: no such file"
    log "trying the prebuilt $HOROVOD_WHEEL"
    install_horovod_wheel "$HOROVOD_WHEEL"
    HOROVOD_NEW=1
    if horovod_ok verbose; then log "using $HOROVOD_WHEEL"; else log "building instead"; fi
fi
if [[ -z "${HOROVOD_SUMMARY:-}" ]]; then
    KEY="$PYVER-torch$TORCH_HAVE-horovod$HOROVOD_VERSION-cpu"
    if [[ "$CUDA_HAVE" == "cuda" ]]; then
        cuda_facts
        TORCH_FULL="$("$PY" -c 'import torch; print(torch.__version__)')"
        KEY="$PYVER-torch$TORCH_FULL-horovod$HOROVOD_VERSION-cuda$CUDA_RELEASE-sm${HOROVOD_BUILD_CUDA_CC_LIST:-all}"
        KEY="${KEY//,/_}"
    fi
    WHEEL_DIR="$CACHE/wheels/$KEY"
    mkdir -p "$WHEEL_DIR"
    wheel="$(ls "$WHEEL_DIR"/horovod-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$wheel" ]]; then
        # Horovod's runtime deps, and its build deps: cffi/pycparser are its setup_requires,
        # which setuptools would otherwise try to download. No build isolation, so it compiles
        # against the torch installed here.
        pip_install cloudpickle psutil pyyaml packaging cffi pycparser
        "$PY" -c "import cffi, pycparser" || die "cffi and pycparser must be installed before Horovod's build"
        build="$(mktemp -d)"
        trap 'rm -rf "$build"' EXIT
        sdist="${HOROVOD_SDIST:-}"
        if [[ -z "$sdist" ]]; then
            sdist="$(ls "$CACHE"/sdist/horovod-"$HOROVOD_VERSION".tar.gz 2>/dev/null || true)"
        fi
        if [[ -z "$sdist" ]]; then
            mkdir -p "$CACHE/sdist"
            log "downloading horovod==$HOROVOD_VERSION sdist"
            "$PY" -m pip download -q --no-deps --no-binary :all: -d "$CACHE/sdist" "horovod==$HOROVOD_VERSION"
            sdist="$CACHE/sdist/horovod-$HOROVOD_VERSION.tar.gz"
        fi
        [[ -f "$sdist" ]] || die "no Horovod sdist at $sdist"
        tar -xzf "$sdist" -C "$build"
        src="$build/horovod-$HOROVOD_VERSION"
        # Our private copy only: C++17, the GCC 13 includes (scripts/patch_horovod_sdist.sh).
        "$REPO/scripts/patch_horovod_sdist.sh" "$src"
        export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
        export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
        # CMake 4 refuses gloo's cmake_minimum_required(VERSION 2.8.12) without it; older
        # CMake ignores it.
        export CMAKE_POLICY_VERSION_MINIMUM=3.5
        # RelWithDebInfo's debug sections are left out at link time: the wheel is a few MB
        # instead of tens (and can be carried to an offline machine).
        export LDFLAGS="${LDFLAGS:+$LDFLAGS }-Wl,--strip-debug"
        if [[ "$CUDA_HAVE" == "cuda" ]]; then
            export HOROVOD_GPU_OPERATIONS="${HOROVOD_GPU_OPERATIONS:-NCCL}"
            [[ -n "${HOROVOD_BUILD_CUDA_CC_LIST:-}" ]] && export HOROVOD_BUILD_CUDA_CC_LIST
            nccl_for_build "$build/nccl-lib"
        fi
        log "building horovod $HOROVOD_VERSION wheel ($KEY, MAKEFLAGS=$MAKEFLAGS), a few minutes"
        t0=$SECONDS
        "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEEL_DIR" "$src"
        log "horovod wheel built in $((SECONDS - t0)) s -> $WHEEL_DIR"
        wheel="$(ls "$WHEEL_DIR"/horovod-*.whl | head -n1)"
    else
        log "using cached $wheel"
    fi
    install_horovod_wheel "$wheel"
    HOROVOD_NEW=1
    horovod_ok verbose || die "the Horovod just installed ($wheel) does not work"
fi

# 5. Verify the build --------------------------------------------------------------------
# `horovodrun --check-build` after an install (it starts a Python per line: 20 s here);
# a run that installed nothing prints horovod_ok's one line instead.
if ((HOROVOD_NEW)); then
    horovodrun="$BIN/horovodrun"
    [[ -x "$horovodrun" ]] || horovodrun="$(command -v horovodrun)"
    "$horovodrun" --check-build >&2
fi
log "$HOROVOD_SUMMARY"

# 6. This project -----------------------------------------------------------------------
EXTRAS="${HVD_TOPK_EXTRAS-test}"
modules="hvd_topk mpi4py ninja sklearn tensorboard tqdm yaml"
spec="$REPO"
if [[ -n "$EXTRAS" ]]; then
    modules+=" pytest pytest_timeout ruff hypothesis matplotlib"
    spec="${REPO}[$EXTRAS]"
fi
[[ ",$EXTRAS," == *,bench,* ]] && modules+=" transformers"
# Installed or not, found without importing them (tensorboard, sklearn and matplotlib take
# seconds to import); from / so that a checkout in the current directory does not count.
# shellcheck disable=SC2086  # $modules: one argument per module
if ! (cd / && "$PY" -c "import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, sys.argv[1:])))" \
        $modules) >/dev/null 2>&1; then
    # No build isolation: setuptools is here already (step 2), and offline there is no index
    # to fetch a private copy from.
    log "pip install -e $spec"
    pip_install --no-build-isolation -e "$spec"
fi

# 7. The CPU kernel (compensate + candidate scan), built now rather than at the first step ----
# In ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR), keyed by what its compile command is
# made of; once built it is only loaded (hvd_topk/_cpu_kernel.py). $BIN first on PATH: the
# same ninja as the ranks, which run inside the venv.
if PATH="$BIN:$PATH" "$PY" -c "import sys; from hvd_topk._cpu_kernel import cpu_kernel; sys.exit(cpu_kernel() is None)"; then
    log "CPU kernel ready"
else
    log "WARNING: the CPU kernel did not build; hvd_topk falls back to its slower torch path"
fi
log "ready: $PY"

#!/usr/bin/env bash
# Install everything hvd_topk needs on a fresh Debian machine (Python 3.11, CPU or CUDA).
#
# Idempotent: each step checks first and does nothing when already done, so a second run
# takes seconds. Steps:
#   1. system packages (Open MPI dev + runtime, cmake, g++) via apt, only when missing;
#   2. a virtual environment (.venv, or $HVD_TOPK_VENV);
#   3. PyTorch: reuse one already importable, else torch==$TORCH_VERSION (pinned, so pip
#      never pulls a multi-GB CUDA build by accident);
#   4. Horovod $HOROVOD_VERSION built from its PyPI sdist with CMAKE_CXX_STANDARD raised
#      14 -> 17 (PyTorch >= 2.1 needs C++17: Horovod #3996/#4014, fixed upstream by PR #3998
#      after the last release), with PyTorch + MPI + Gloo (+ NCCL when CUDA is present).
#      The wheel is cached in $HVD_TOPK_CACHE keyed by Python/Torch/Horovod/device;
#   5. `horovodrun --check-build`;
#   6. `pip install -e .` with the project's dependencies;
#   7. the optional CPU kernel (hvd_topk/csrc), compiled once and cached by torch.
#
# Environment knobs:
#   HVD_TOPK_VENV     venv path (default: <repo>/.venv); "none" installs into $HVD_TOPK_PYTHON
#                     itself (Docker images: no venv, the base image's torch is used as it is)
#   HVD_TOPK_PYTHON   interpreter used to create the venv (default: python3)
#   HVD_TOPK_DEVICE   cpu or cuda: which Horovod to build (default: cuda when torch has CUDA and
#                     a GPU or nvcc is present; set it in a `docker build`, which sees no GPU)
#   HVD_TOPK_CACHE    wheel cache (default: ~/.cache/hvd-topk)
#   HOROVOD_SDIST     path to a horovod-X.tar.gz to build from (offline machines)
#   TORCH_VERSION     default 2.13.0;  HOROVOD_VERSION  default 0.28.1
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
CACHE="${HVD_TOPK_CACHE:-$HOME/.cache/hvd-topk}"
VENV="${HVD_TOPK_VENV:-$REPO/.venv}"
PYTHON_BOOT="${HVD_TOPK_PYTHON:-python3}"
export MAKEFLAGS="${MAKEFLAGS:--j$(nproc)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[install] %s\n' "$*" >&2; }

# 1. System packages ---------------------------------------------------------------------
need_apt=()
for pkg in libopenmpi-dev openmpi-bin cmake g++ make; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
    log "apt-get install ${need_apt[*]}"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

# 2. Virtual environment -----------------------------------------------------------------
if [[ "$VENV" == "none" ]]; then
    PY="$(command -v "$PYTHON_BOOT")"
else
    if [[ ! -x "$VENV/bin/python" ]]; then
        # Reuse a system-wide PyTorch (e.g. a CUDA base image) instead of downloading another.
        site=()
        if "$PYTHON_BOOT" -c "import torch" >/dev/null 2>&1; then site=(--system-site-packages); fi
        log "creating venv $VENV ${site[*]:-}"
        "$PYTHON_BOOT" -m venv "${site[@]}" "$VENV"
    fi
    PY="$VENV/bin/python"
fi
pip_install() { "$PY" -m pip install -q "$@"; }
"$PY" -c "import setuptools, wheel, packaging, numpy" >/dev/null 2>&1 \
    || pip_install setuptools wheel packaging numpy

# 3. PyTorch -----------------------------------------------------------------------------
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    log "pip install torch==$TORCH_VERSION"
    pip_install "torch==$TORCH_VERSION"
fi
TORCH_HAVE="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
CUDA_HAVE="${HVD_TOPK_DEVICE:-$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() or torch.version.cuda and __import__("shutil").which("nvcc") else "cpu")')}"
PYVER="$("$PY" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')"
[[ "$CUDA_HAVE" == cpu || "$CUDA_HAVE" == cuda ]] \
    || { log "HVD_TOPK_DEVICE must be cpu or cuda, got '$CUDA_HAVE'"; exit 2; }
log "python $PYVER, torch $TORCH_HAVE ($CUDA_HAVE)"

# 4. Horovod -----------------------------------------------------------------------------
horovod_ok() {  # a CUDA install also needs NCCL: a CPU-only Horovod there gets rebuilt
    NEED_NCCL="$CUDA_HAVE" "$PY" - <<'PY' >/dev/null 2>&1
import os
import horovod.torch as hvd
assert hvd.mpi_built() and hvd.gloo_built()
assert os.environ["NEED_NCCL"] != "cuda" or hvd.nccl_built()
PY
}
if ! horovod_ok; then
    WHEEL_DIR="$CACHE/wheels/$PYVER-torch$TORCH_HAVE-horovod$HOROVOD_VERSION-$CUDA_HAVE"
    mkdir -p "$WHEEL_DIR"
    wheel="$(ls "$WHEEL_DIR"/horovod-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$wheel" ]]; then
        # Horovod's own runtime deps, and its build deps (we build without isolation so it
        # compiles against the torch installed here).
        pip_install cloudpickle psutil pyyaml cffi
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
        tar -xzf "$sdist" -C "$build"
        src="$build/horovod-$HOROVOD_VERSION"
        # The C++17 fix (Horovod PR #3998), applied to our private copy of the sdist.
        sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' \
            "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
        grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt"
        export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
        export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
        if [[ "$CUDA_HAVE" == "cuda" ]]; then
            export HOROVOD_GPU_OPERATIONS="${HOROVOD_GPU_OPERATIONS:-NCCL}"
        fi
        log "building horovod $HOROVOD_VERSION wheel (MAKEFLAGS=$MAKEFLAGS), a few minutes"
        t0=$SECONDS
        "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WHEEL_DIR" "$src"
        log "horovod wheel built in $((SECONDS - t0)) s -> $WHEEL_DIR"
        wheel="$(ls "$WHEEL_DIR"/horovod-*.whl | head -n1)"
    else
        log "using cached $wheel"
    fi
    pip_install "$wheel"
fi

# 5. Verify the build --------------------------------------------------------------------
BIN="$(dirname "$PY")"
"$BIN/horovodrun" --check-build >&2

# 6. This project -----------------------------------------------------------------------
if ! "$PY" -c "import hvd_topk, mpi4py, ninja, sklearn, tensorboard, tqdm, pytest, pytest_timeout, ruff, hypothesis, yaml, matplotlib" >/dev/null 2>&1; then
    log "pip install -e ${REPO}[test]"
    pip_install -e "${REPO}[test]"
fi

# 7. The CPU kernel (compensate + candidate scan), built now rather than at the first step ----
# Cached by torch in ~/.cache/torch_extensions (TORCH_EXTENSIONS_DIR); a no-op once built.
if "$PY" -c "import sys; from hvd_topk._cpu_kernel import cpu_kernel; sys.exit(cpu_kernel() is None)"; then
    log "CPU kernel ready"
else
    log "WARNING: the CPU kernel did not build; hvd_topk falls back to its slower torch path"
fi
log "ready: $PY"

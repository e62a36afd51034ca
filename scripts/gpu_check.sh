#!/usr/bin/env bash
# One prepared GPU check for a CUDA machine without internet (run from the repository root).
# Stops at the first of steps 0-3 that fails, saying which; every step has a time limit.
#   1. install: Horovod with NCCL built by scripts/install.sh from the carried sdist (or a
#      carried prebuilt wheel), into the Python that has the system's CUDA torch;
#   2. the installed Horovod must have NCCL, MPI and Gloo built;
#   3. the exchange checks of tests/workers/exchange_worker.py and sparse_allreduce_worker.py
#      (sparse result against the dense reference) on CUDA tensors, one rank per GPU (NCCL refuses two ranks on one GPU; on a
#      1-GPU machine HOROVOD_ELASTIC=1 makes the one rank go through the whole exchange, under
#      MPI only, since Gloo reads that variable as elastic rendezvous);
#   4. a few training steps of examples/train.py on CUDA;
#   5.-7. the benchmarks, each run even when the one before failed: scripts/bench_step.py
#      (ResNet-50, ResNet-18, ViT-B/16; host syncs per step), scripts/bench_memory.py --device
#      cuda, scripts/bench_compression.py --device cuda.
#
#   OUT=/tmp/out CARRY=.carry scripts/gpu_check.sh
#   HVD_TOPK_PYTHON=/opt/torch/.venv/bin/python3 NP=2 scripts/gpu_check.sh
#
# Carried ($CARRY, default .carry/; README "GPU machines"): horovod-$HOROVOD_VERSION.tar.gz,
# wheels/ with cffi and pycparser for the target Python (pip then installs with --no-index
# from there), optionally a horovod-*.whl built by an earlier run (tried first, rebuilt when it
# does not import with this torch). Needs Open MPI, cmake, g++, nvcc and an importable CUDA
# torch with the project's runtime dependencies (numpy, mpi4py, ninja, ...).
#
# Python: $HVD_TOPK_PYTHON, else python3, else /opt/*/.venv/bin/python3 -- the first that
# imports torch with CUDA. Inside a venv, everything is installed into that venv
# (HVD_TOPK_VENV=none); a system Python gets a venv with --system-site-packages (.venv-gpu).
#
# With OUT set, everything printed also goes to $OUT/gpu_check.log, the benchmark tables to
# $OUT/bench_compression.md, $OUT/bench_step.md and $OUT/bench_memory.md, and a Horovod wheel built here (when under
# 16 MiB) to $OUT/, to be carried next time.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
CARRY="$(cd "${CARRY:-$REPO/.carry}" 2>/dev/null && pwd || echo "${CARRY:-$REPO/.carry}")"
export HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
export HOROVOD_SDIST="${HOROVOD_SDIST:-$CARRY/horovod-$HOROVOD_VERSION.tar.gz}"
export HVD_TOPK_CACHE="${HVD_TOPK_CACHE:-$HOME/.cache/hvd-topk}"
export HVD_TOPK_DEVICE=cuda HOROVOD_GPU_OPERATIONS=NCCL HVD_TOPK_EXTRAS=""
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PYTHONUNBUFFERED=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
STEP="start"
step() { STEP="$*"; printf '\n=== gpu_check: %s (%ds)\n' "$STEP" "$SECONDS"; }
on_exit() {
    local rc=$?
    ((rc == 0)) || printf '\n=== gpu_check: FAILED at step "%s" (exit %d, %ds)\n' "$STEP" "$rc" "$SECONDS"
}
trap on_exit EXIT
die() { echo "gpu_check: $*" >&2; exit 2; }
# limit SECONDS CMD...: the command, killed (and failing) after SECONDS, or sooner when the
# whole check would pass its deadline (GPU_CHECK_DEADLINE, 570 s: inside a 10-minute slot,
# with the log up to the failure already in $OUT).
DEADLINE="${GPU_CHECK_DEADLINE:-570}"
limit() {
    local s="$1" left=$((DEADLINE - SECONDS))
    shift
    ((left > 15)) || die "out of time: ${SECONDS}s of GPU_CHECK_DEADLINE=${DEADLINE}s used"
    ((s < left)) || s="$left"
    timeout --kill-after=10 "$s" "$@"
}

step "0. environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
NGPU="$(nvidia-smi -L | grep -c '^GPU')"
((NGPU >= 1)) || die "no GPU visible"
NP="${NP:-$NGPU}"
((NP <= NGPU)) || NP="$NGPU"
has_cuda_torch() { "$1" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1; }
PYTHON=""
for candidate in ${HVD_TOPK_PYTHON:-} python3 /opt/*/.venv/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 && has_cuda_torch "$candidate"; then
        PYTHON="$(command -v "$candidate")"; break
    fi
done
[[ -n "$PYTHON" ]] || die "no Python with a CUDA torch (tried ${HVD_TOPK_PYTHON:-} python3 /opt/*/.venv/bin/python3): set HVD_TOPK_PYTHON"
export HVD_TOPK_PYTHON="$PYTHON"
if "$PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
    export HVD_TOPK_VENV="${HVD_TOPK_VENV:-none}"  # a venv made from it would not see its torch
else
    export HVD_TOPK_VENV="${HVD_TOPK_VENV:-$REPO/.venv-gpu}"
fi
echo "python $PYTHON (HVD_TOPK_VENV=$HVD_TOPK_VENV), $NGPU GPU(s), $NP rank(s), carry $CARRY"
for tool in mpirun mpicxx cmake g++ nvcc; do
    printf '%-7s %s\n' "$tool" "$(command -v "$tool" || echo 'not on PATH')"
done
[[ -f "$HOROVOD_SDIST" ]] || die "missing Horovod sdist: $HOROVOD_SDIST"
if [[ -d "$CARRY/wheels" ]]; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$CARRY/wheels"
fi
if [[ -z "${HOROVOD_WHEEL:-}" ]]; then
    HOROVOD_WHEEL="$(ls -t "$CARRY"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
    [[ -n "$HOROVOD_WHEEL" ]] && export HOROVOD_WHEEL
fi

step "1. install (Horovod with NCCL from ${HOROVOD_WHEEL:-$HOROVOD_SDIST})"
# The CPU kernel serves CPU tensors only: not built here (HVD_TOPK_CPU_KERNEL=0 at install).
HVD_TOPK_CPU_KERNEL=0 limit 420 ./scripts/install.sh
if [[ "$HVD_TOPK_VENV" == none ]]; then
    PATH="$(dirname "$PYTHON"):$PATH"
else
    PATH="$HVD_TOPK_VENV/bin:$PATH"
fi
export PATH
python -c 'import torch; assert torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.device_count(), "GPU(s)")'
if [[ -n "${OUT:-}" && -z "${HOROVOD_WHEEL:-}" ]]; then
    wheel="$(ls -t "$HVD_TOPK_CACHE"/wheels/*/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -n "$wheel" ]] && (($(stat -c %s "$wheel") < 16 * 1024 * 1024)); then
        cp "$wheel" "$OUT/" && echo "copied $wheel ($(du -h "$wheel" | cut -f1)) to \$OUT: carry it as $CARRY/$(basename "$wheel")"
    elif [[ -n "$wheel" ]]; then
        echo "not copied to \$OUT: $wheel is $(du -h "$wheel" | cut -f1) (16 MiB at most)"
    fi
fi

step "2. the build has NCCL, MPI, Gloo and PyTorch"
# install.sh ran `horovodrun --check-build` after building; this asks the module itself.
limit 60 python - <<'PY'
import horovod.torch as hvd
built = {"NCCL": hvd.nccl_built(), "MPI": hvd.mpi_built(), "Gloo": hvd.gloo_built()}
print(" ".join(f"[{'X' if v else ' '}] {k}" for k, v in built.items()), "[X] PyTorch")
missing = [k for k, v in built.items() if not v]
assert not missing, f"Horovod built without {missing}"
PY

# Horovod registers its gradient hooks only when size() > 1 or HOROVOD_ELASTIC=1.
backends=(gloo mpi)
if ((NP == 1)); then export HOROVOD_ELASTIC=1; backends=(mpi); fi

step "3. sparse exchange on CUDA tensors ($NP rank(s): ${backends[*]}) against the dense reference"
for backend in "${backends[@]}"; do
  for worker in exchange_worker sparse_allreduce_worker; do
    HVD_TOPK_TEST_DEVICE=cuda PYTHONPATH="$REPO/tests:$REPO/tests/workers" \
        limit 300 python - "$backend" "$NP" "$worker" <<'PY'
import importlib
import sys
from launch import run_ranks
backend, np, worker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
CHECKS = importlib.import_module(worker).CHECKS
out = run_ranks(f"{worker}.py", backend=backend, np=np, timeout=240)
print(out)
missing = [f"rank {r}/{np} [{backend}] {c}: OK" for c in CHECKS for r in range(np)
           if f"rank {r}/{np} [{backend}] {c}: OK" not in out]
assert not missing, f"checks that did not pass: {missing}"
print(f"{worker} [{backend}]: all {len(CHECKS)} checks OK on {np} rank(s)")
PY
  done
done

# From here on a failing step is reported and the next one still runs (each is a measurement
# of its own); the check fails at the end if any did.
FAILED=()
try() {  # try NAME SECONDS CMD...
    local name="$1"
    shift
    limit "$@" || { echo "gpu_check: step \"$name\" FAILED (exit $?)"; FAILED+=("$name"); }
}
OUTDIR="${OUT:-$(mktemp -d)}"  # the benchmark tables
MPIRUN=(mpirun --allow-run-as-root -np "$NP" --bind-to none)

step "4. examples/train.py on CUDA, $NP rank(s), 20 steps"
try train 150 "${MPIRUN[@]}" python examples/train.py --device cuda --topk 0.01 --epochs 1 \
    --max-steps 20 --no-progress

step "5. step time on the GPU ($NP rank(s)): ResNet-50, ResNet-18, ViT-B/16, batch 64"
try bench_step 240 "${MPIRUN[@]}" python scripts/bench_step.py --models resnet50,resnet18,vit_b_16 \
    --steps 20 --warmup 6 --loop 10 --out "$OUTDIR/bench_step.md"

step "6. memory on the GPU (torch.cuda.max_memory_allocated against dense)"
try bench_memory 200 python scripts/bench_memory.py --device cuda --np "$NP" --steps 110 \
    --methods dense,topk0.01,topk0.001,topk0.01sar --out "$OUTDIR/bench_memory.md"
try owner_step 60 python scripts/bench_memory.py --device cuda --owner-step --width 8192 \
    --out "$OUTDIR/owner_step.md"

step "7. compression time on the GPU"
try bench_compression 120 python scripts/bench_compression.py --device cuda --repeats 11 \
    --sizes 1M,4M,25M,100M --out "$OUTDIR/bench_compression.md"

((${#FAILED[@]} == 0)) || die "steps that failed: ${FAILED[*]}"
step "all GPU checks passed"

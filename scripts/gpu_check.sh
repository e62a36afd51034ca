#!/usr/bin/env bash
# One prepared GPU check for a CUDA machine without internet (run from the repository root).
# Stops at the first step that fails, saying which; every step has a time limit.
#   1. install: Horovod with NCCL built by scripts/install.sh from the carried sdist (or a
#      carried prebuilt wheel), into the Python that has the system's CUDA torch;
#   2. `horovodrun --check-build` must list [X] NCCL, MPI, Gloo and PyTorch;
#   3. the exchange checks of tests/workers/exchange_worker.py and sparse_allreduce_worker.py
#      (sparse result against the dense reference) on CUDA tensors, one rank per GPU (NCCL refuses two ranks on one GPU; on a
#      1-GPU machine HOROVOD_ELASTIC=1 makes the one rank go through the whole exchange, under
#      MPI only, since Gloo reads that variable as elastic rendezvous);
#   4. scripts/bench_compression.py on the GPU; 5. scripts/bench_step.py (when present);
#   6. a few training steps of examples/train.py on CUDA.
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
limit 420 ./scripts/install.sh
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

step "2. check-build lists NCCL, MPI, Gloo, PyTorch"
limit 120 horovodrun --check-build | tee /tmp/hvd_topk_check_build.txt
for what in NCCL MPI Gloo PyTorch; do
    grep -Eq "^\s*\[X\] $what" /tmp/hvd_topk_check_build.txt || die "Horovod built without $what"
done

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

OUTDIR="${OUT:-$(mktemp -d)}"  # the benchmark tables
step "4. compression time on the GPU"
limit 240 python scripts/bench_compression.py --device cuda --repeats 11 --sizes 1M,4M,25M,100M \
    --out "$OUTDIR/bench_compression.md"

step "5. step time on the GPU ($NP rank(s))"
if [[ -f scripts/bench_step.py ]]; then
    limit 300 mpirun --allow-run-as-root -np "$NP" --bind-to none \
        python scripts/bench_step.py --out "$OUTDIR/bench_step.md"
else
    echo "skipped: scripts/bench_step.py does not exist in this checkout"
fi

step "5b. memory on the GPU (torch.cuda.max_memory_allocated against dense)"
limit 300 python scripts/bench_memory.py --device cuda --np "$NP" --steps 110 \
    --methods dense,fp16,topk0.01,topk0.001,topk0.01sar --out "$OUTDIR/bench_memory.md"

step "6. examples/train.py on CUDA, $NP rank(s), 20 steps"
limit 180 mpirun --allow-run-as-root -np "$NP" --bind-to none \
    python examples/train.py --device cuda --topk 0.01 --epochs 1 --max-steps 20 --no-progress

step "all GPU checks passed"

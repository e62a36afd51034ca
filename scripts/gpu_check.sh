#!/usr/bin/env bash
# One prepared GPU check for a CUDA machine without internet (run from the repository root):
#   1. build Horovod with NCCL through scripts/install.sh from a carried sdist;
#   2. `horovodrun --check-build` must list [X] NCCL;
#   3. the exchange checks of tests/workers/exchange_worker.py (sparse result against the dense
#      reference) on CUDA tensors, under Gloo and MPI, one rank per GPU (NCCL refuses two ranks
#      on one GPU, so a 1-GPU machine runs them on 1 rank);
#   4. compression timed on the GPU; 5. a few training steps of examples/train.py on CUDA.
#
#   scripts/gpu_check.sh                      # .carry/horovod-0.28.1.tar.gz, .carry/wheels/
#   CARRY=/mnt/carry NP=2 scripts/gpu_check.sh
#
# Needs: an importable CUDA torch (system or venv), Open MPI + cmake + g++ installed (apt is
# not reachable offline), the Horovod sdist at $CARRY/horovod-$HOROVOD_VERSION.tar.gz, and
# the project's Python dependencies already installed or carried as wheels in $CARRY/wheels
# (pip then installs with --no-index from there). Everything goes to stdout; exit status 0
# only when every step passed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
CARRY="${CARRY:-$REPO/.carry}"
NGPU="$(nvidia-smi -L | grep -c '^GPU')"
NP="${NP:-2}"
((NP <= NGPU)) || NP="$NGPU"
export HOROVOD_VERSION="${HOROVOD_VERSION:-0.28.1}"
export HOROVOD_SDIST="${HOROVOD_SDIST:-$CARRY/horovod-$HOROVOD_VERSION.tar.gz}"
export HVD_TOPK_VENV="${HVD_TOPK_VENV:-$REPO/.venv-gpu}"
export HVD_TOPK_DEVICE=cuda HOROVOD_GPU_OPERATIONS=NCCL OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
step() { printf '\n=== gpu_check: %s (%ds)\n' "$*" "$SECONDS"; }

step "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
[[ -f "$HOROVOD_SDIST" ]] || { echo "missing Horovod sdist: $HOROVOD_SDIST" >&2; exit 2; }
if [[ -d "$CARRY/wheels" ]]; then
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$CARRY/wheels"
fi

step "1. install (Horovod with NCCL from $HOROVOD_SDIST)"
./scripts/install.sh
if [[ "$HVD_TOPK_VENV" != none ]]; then
    # shellcheck disable=SC1091
    source "$HVD_TOPK_VENV/bin/activate"
fi
python -c 'import torch; assert torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.device_count(), "GPU(s)")'

step "2. check-build lists NCCL"
horovodrun --check-build | tee /tmp/hvd_topk_check_build.txt
grep -Eq '^\s*\[X\] NCCL' /tmp/hvd_topk_check_build.txt || { echo "Horovod built without NCCL" >&2; exit 1; }

# Horovod registers its gradient hooks only when size() > 1 or HOROVOD_ELASTIC=1: the second
# makes a 1-rank run (1 GPU) go through the whole exchange too. Gloo reads HOROVOD_ELASTIC as
# "elastic rendezvous", so a single rank uses the MPI controller only.
backends=(gloo mpi)
if ((NP == 1)); then export HOROVOD_ELASTIC=1; backends=(mpi); fi
failed=()

step "3. sparse exchange on CUDA tensors ($NP rank(s): ${backends[*]}) against the dense reference"
for backend in "${backends[@]}"; do
    HVD_TOPK_TEST_DEVICE=cuda PYTHONPATH="$REPO/tests:$REPO/tests/workers" \
        python - "$backend" "$NP" <<'PY' || failed+=("exchange/$backend")
import sys
from exchange_worker import CHECKS
from launch import run_ranks
backend, np = sys.argv[1], int(sys.argv[2])
out = run_ranks("exchange_worker.py", backend=backend, np=np, timeout=400)
print(out)
missing = [f"rank {r}/{np} [{backend}] {c}: OK" for c in CHECKS for r in range(np)
           if f"rank {r}/{np} [{backend}] {c}: OK" not in out]
assert not missing, f"checks that did not pass: {missing}"
PY
done

step "4. compression time on the GPU"
if [[ -f scripts/bench_compression.py ]] && python scripts/bench_compression.py --help 2>/dev/null | grep -q -- '--device'; then
    python scripts/bench_compression.py --device cuda || failed+=(bench)
else
    python - <<'PY' || failed+=(bench)
import time, torch, hvd_topk
dev = torch.device("cuda")
for n in (1 << 20, 1 << 24):
    for ratio in (0.01, 0.001):
        comp = hvd_topk.TopKCompressor(ratio, warmup_steps=0)
        g = torch.randn(n, device=dev)
        for _ in range(3):
            comp.compress(g.clone(), name="g")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            comp.compress(g.clone(), name="g")
        torch.cuda.synchronize()
        print(f"compress n={n:>9,} ratio={ratio}: {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms")
PY
fi

step "5. examples/train.py on CUDA, $NP rank(s), 20 steps"
horovodrun --mpi -np "$NP" -H "localhost:$NP" python examples/train.py --device cuda --topk 0.01 \
    --epochs 1 --max-steps 20 --no-progress || failed+=(train)

if ((${#failed[@]})); then
    step "FAILED: ${failed[*]}"
    exit 1
fi
step "all GPU checks passed"

#!/usr/bin/env bash
# Train with Top-K 1% on 2 ranks (offline digits data); installs what is missing first.
#
#   ./horovodrun.sh                                   # horovodrun -np 2 ... --topk 0.01
#   ./horovodrun.sh -np 4 --topk 0.001 --epochs 5     # -np N goes to horovodrun, the rest to train.py
#   ./horovodrun.sh --topk 0                          # dense baseline
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${HVD_TOPK_VENV:-$REPO/.venv}"

"$REPO/scripts/install.sh"
# shellcheck disable=SC1091
source "$VENV/bin/activate"

np=2
train_args=()
while (($#)); do
    case "$1" in
        -np|--num-proc) np="$2"; shift 2 ;;
        -np=*|--num-proc=*) np="${1#*=}"; shift ;;
        *) train_args+=("$1"); shift ;;
    esac
done
# Default to Top-K 1% unless the caller chose a compression.
case " ${train_args[*]:-} " in
    *" --topk"*|*" --fp16 "*) ;;
    *) train_args=(--topk 0.01 "${train_args[@]}") ;;
esac

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$REPO"
exec horovodrun -np "$np" -H "localhost:$np" --gloo \
    python examples/train.py "${train_args[@]}"

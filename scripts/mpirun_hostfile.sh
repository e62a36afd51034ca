#!/usr/bin/env bash
# Launch examples/train.py (or another script) with plain Open MPI on the hosts of a hostfile.
#
#   scripts/mpirun_hostfile.sh HOSTFILE [SCRIPT.py] [ARGS...]
#   scripts/mpirun_hostfile.sh hosts.txt --config configs/cifar10_resnet18.yaml
#   NP=4 SSH_PORT=12345 scripts/mpirun_hostfile.sh hosts.txt examples/train.py --topk 0.001
#
# HOSTFILE has Open MPI's format, one line per host, slots = GPUs (ranks) on that host:
#   node1 slots=4
#   node2 slots=4
# Every host needs passwordless ssh from this one and the same repository path and Python
# environment (a shared filesystem, or the Docker image: docker/README.md). The first argument
# after HOSTFILE is the script when it ends in .py, else examples/train.py gets all arguments.
#
# Environment knobs:
#   NP                 number of ranks (default: the sum of slots in HOSTFILE)
#   IFACE              network interface for MPI's TCP and NCCL sockets (e.g. eth0, ib0)
#   SSH_PORT           sshd port on the hosts (Docker image: 12345)
#   HVD_TOPK_VENV      venv to activate (default <repo>/.venv; "none": use the current python)
#   MPIRUN_ARGS        extra mpirun arguments, split on spaces
# Forwarded to every rank with -x: PATH, LD_LIBRARY_PATH, PYTHONPATH, OMP_NUM_THREADS and every
# NCCL_* / HOROVOD_* variable that is set here (NCCL_DEBUG=INFO, NCCL_IB_DISABLE=1, ...).
set -euo pipefail

if (($# < 1)) || [[ ! -f "$1" ]]; then
    sed -n '2,12p' "${BASH_SOURCE[0]}" >&2
    echo "error: the first argument must be a hostfile, got: ${1:-nothing}" >&2
    exit 2
fi
HOSTFILE="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
shift
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVD_TOPK_VENV:-$REPO/.venv}"
if [[ "$VENV" != none ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi
cd "$REPO"

script=examples/train.py
if (($#)) && [[ "$1" == *.py ]]; then
    script="$1"
    shift
fi
slots="$(awk '!/^[[:space:]]*(#|$)/ { n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) { sub(/^slots=/, "", $i); n = $i } s += n } END { print s + 0 }' "$HOSTFILE")"
NP="${NP:-$slots}"
((NP > 0)) || { echo "error: no slots in $HOSTFILE" >&2; exit 2; }

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fwd=()
for v in PATH LD_LIBRARY_PATH PYTHONPATH OMP_NUM_THREADS ${!NCCL_@} ${!HOROVOD_@}; do
    [[ -n "${!v+set}" ]] && fwd+=(-x "$v")
done
net=()
if [[ -n "${IFACE:-}" ]]; then
    export NCCL_SOCKET_IFNAME="$IFACE"
    fwd+=(-x NCCL_SOCKET_IFNAME)
    net=(-mca btl_tcp_if_include "$IFACE" -mca oob_tcp_if_include "$IFACE")
fi
[[ -n "${SSH_PORT:-}" ]] && net+=(-mca plm_rsh_args "-p $SSH_PORT")
root=()
[[ $(id -u) -eq 0 ]] && root=(--allow-run-as-root)
read -r -a extra <<<"${MPIRUN_ARGS:-}"

# One rank per slot, no core binding (each rank picks its GPU by local rank), TCP between hosts.
cmd=(mpirun -np "$NP" --hostfile "$HOSTFILE" --map-by slot --bind-to none "${root[@]}"
     -mca pml ob1 -mca btl "^openib" "${net[@]}" "${fwd[@]}" "${extra[@]}"
     python "$script" "$@")
echo "${cmd[*]}" >&2
exec "${cmd[@]}"

#!/usr/bin/env bash
# An emulated cluster on one machine: N network namespaces ("hosts") on a bridge, each host's
# link shaped with tc (tbf rate, optional netem delay) in both directions, and an rsh agent
# so that Open MPI launches ranks inside them. Needs root, iproute2 and tc.
#
#   scripts/netem.sh up 2 1gbit [DELAY]     hosts 10.77.0.1..N (namespaces hvdn-h1..hN)
#   scripts/netem.sh down                   remove everything this script created
#   scripts/netem.sh run 2 1gbit [DELAY] -- -np 2 -x OMP_NUM_THREADS=1 python train.py
#                                           up, mpirun over the hosts (args after --), down on exit
#   scripts/netem.sh mpirun-args 2          the mpirun options that target the hosts (for scripts)
#   scripts/netem.sh bytes                  bytes sent/received by each host since `up`
#
# Inside every host the link is called hvd0 and has address 10.77.0.<i>/24; the bridge
# (root namespace) is 10.77.0.254. Bytes on the wire of host i: /sys/class/net/hvd0/statistics/
# {tx,rx}_bytes read inside the host (a process started by mpirun sees its own), or
# `scripts/netem.sh bytes` from outside. DELAY (e.g. 100us, 1ms) is one-way, per link.
#
# Ranks on different hosts share the machine's hostname, so Open MPI is told to use TCP only
# (--mca btl tcp,self): shared memory would bypass the shaped links. The hosts also share the
# machine's cores, so MPI yields instead of busy-polling (--mca mpi_yield_when_idle 1): a
# spinning wait would steal the core of the rank's own compute (measured: Top-K 1% MLP step
# 198 -> 80 ms at 1 Gbit/s on 2 cores).
#
# Each host gets its own core, as a real host would: the rsh agent pins host i to core
# (i-1) mod <cores> (taskset) and Open MPI is told not to bind (--bind-to none). Without this,
# Open MPI sees every "host" as a fresh node and binds each one's first rank to core 0, so
# all hosts would share one core (measured: MLP floor 31 ms instead of 22 ms on 2 cores).
# --mca rtc_hwloc_vmhole none: the orted of an emulated host otherwise shares its hwloc
# topology through a shared-memory segment mapped at a guessed address, and segfaulted there
# in 2-4 of 20 launches (hwloc_shmem_topology_write); without the segment, 0 of 20.
set -euo pipefail

PREFIX="${HVD_NETEM_PREFIX:-hvdn}"
SUBNET="${HVD_NETEM_SUBNET:-10.77.0}"
BRIDGE="${PREFIX}br"
STATE="/run/${PREFIX}"
AGENT="$STATE/rsh-agent"
IFACE="hvd0"

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

die() { echo "netem.sh: $*" >&2; exit 1; }

check_count() {
    [[ "$1" =~ ^[0-9]+$ ]] && (( $1 >= 1 && $1 <= 250 )) || die "host count must be 1..250, got '$1'"
}

# tbf needs a bucket of at least one packet; ~1 ms of traffic keeps the rate smooth.
burst_for() {
    local rate="$1" bits
    bits="$(tc_bits "$rate")"
    local burst=$(( bits / 8 / 1000 ))
    (( burst < 65536 )) && burst=65536
    echo "$burst"
}

tc_bits() {  # 1gbit / 10gbit / 500mbit / 100kbit -> bits per second
    local r="${1,,}"
    case "$r" in
        *gbit) echo $(( ${r%gbit} * 1000000000 )) ;;
        *mbit) echo $(( ${r%mbit} * 1000000 )) ;;
        *kbit) echo $(( ${r%kbit} * 1000 )) ;;
        *bit) echo "${r%bit}" ;;
        *) die "rate must look like 1gbit, 10gbit, 500mbit; got '$1'" ;;
    esac
}

shape() {  # shape <netns or ""> <dev> <rate> <delay or "">
    local ns="$1" dev="$2" rate="$3" delay="$4" burst
    burst="$(burst_for "$rate")"
    local run=()
    [[ -n "$ns" ]] && run=(ip netns exec "$ns")
    if [[ -n "$delay" ]]; then
        "${run[@]}" tc qdisc add dev "$dev" root handle 1: netem delay "$delay" limit 100000
        "${run[@]}" tc qdisc add dev "$dev" parent 1: handle 2: tbf rate "$rate" burst "$burst" latency 100ms
    else
        "${run[@]}" tc qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 100ms
    fi
}

write_agent() {
    mkdir -p "$STATE"
    # Open MPI calls: <agent> [options] <host> <command...>, like ssh. The host is 10.77.0.<i> or h<i>.
    cat > "$AGENT" <<EOF
#!/usr/bin/env bash
set -euo pipefail
while [[ \$# -gt 0 && "\$1" == -* ]]; do shift; done
host="\$1"; shift
case "\$host" in
    ${SUBNET}.*) ns="${PREFIX}-h\${host##*.}" ;;
    h[0-9]*) ns="${PREFIX}-\$host" ;;
    *) echo "rsh-agent: unknown host \$host" >&2; exit 1 ;;
esac
cores="\$(nproc --all)"
host_no="\${ns##*-h}"
exec ip netns exec "\$ns" taskset -c "\$(( (host_no - 1) % cores ))" /bin/sh -c "\$*"
EOF
    chmod +x "$AGENT"
}

cmd_up() {
    local n="$1" rate="$2" delay="${3:-}"
    check_count "$n"
    tc_bits "$rate" > /dev/null
    [[ $EUID -eq 0 ]] || die "needs root (network namespaces and tc)"
    cmd_down
    ip link add "$BRIDGE" type bridge
    ip addr add "$SUBNET.254/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local i ns host_end
    for (( i = 1; i <= n; i++ )); do
        ns="${PREFIX}-h$i"
        host_end="${PREFIX}v$i"
        ip netns add "$ns"
        ip link add "$host_end" type veth peer name "$IFACE" netns "$ns"
        ip link set "$host_end" master "$BRIDGE" up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip addr add "$SUBNET.$i/24" dev "$IFACE"
        ip netns exec "$ns" ip link set "$IFACE" up
        shape "$ns" "$IFACE" "$rate" "$delay"   # host -> bridge (upload)
        shape "" "$host_end" "$rate" "$delay"   # bridge -> host (download)
    done
    write_agent
    echo "$n" > "$STATE/hosts"
    echo "netem.sh: $n hosts at $rate${delay:+, delay $delay}: $(hosts_csv "$n")" >&2
}

cmd_down() {
    local ns link
    # Delete the veth pairs from the root side first: a deleted namespace frees its end (and
    # so the pair) asynchronously, and an `up` right after a `down` then found the old link.
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 \
                  | grep "^${PREFIX}v[0-9]*$" || true); do
        ip link del "$link" 2>/dev/null || true
    done
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${PREFIX}-h[0-9]*$" || true); do
        ip netns del "$ns"
    done
    if ip link show "$BRIDGE" > /dev/null 2>&1; then
        ip link del "$BRIDGE"
    fi
    rm -rf "$STATE"
}

hosts_csv() {
    local n="$1" i out=""
    for (( i = 1; i <= n; i++ )); do out+="${out:+,}$SUBNET.$i"; done
    echo "$out"
}

mpirun_args() {  # one option per line
    local n="$1"
    printf '%s\n' --allow-run-as-root --mca plm_rsh_agent "$AGENT" -H "$(hosts_csv "$n")" \
        --mca btl tcp,self --mca btl_tcp_if_include "$SUBNET.0/24" --mca mpi_yield_when_idle 1 \
        --bind-to none --mca rtc_hwloc_vmhole none \
        --mca oob_tcp_if_include "$SUBNET.0/24" -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH
}

cmd_bytes() {
    local n i
    n="$(cat "$STATE/hosts" 2>/dev/null)" || die "no hosts are up"
    for (( i = 1; i <= n; i++ )); do
        # Root-side end of host i's link: what it received is what host i sent.
        echo "h$i sent=$(cat "/sys/class/net/${PREFIX}v$i/statistics/rx_bytes")" \
             "received=$(cat "/sys/class/net/${PREFIX}v$i/statistics/tx_bytes")"
    done
}

main() {
    [[ $# -ge 1 ]] || usage
    local sub="$1"; shift
    case "$sub" in
        up)
            [[ $# -ge 2 && $# -le 3 ]] || usage
            cmd_up "$@" ;;
        down) cmd_down ;;
        run)
            local args=()
            while [[ $# -gt 0 && "$1" != "--" ]]; do args+=("$1"); shift; done
            [[ $# -ge 1 ]] || usage
            shift
            [[ ${#args[@]} -ge 2 && ${#args[@]} -le 3 ]] || usage
            trap cmd_down EXIT
            cmd_up "${args[@]}"
            local opts
            mapfile -t opts < <(mpirun_args "${args[0]}")
            PYTHONPATH="${PYTHONPATH:-}" LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}" \
                mpirun "${opts[@]}" "$@" ;;
        mpirun-args)
            [[ $# -eq 1 ]] || usage
            check_count "$1"
            mpirun_args "$1" ;;
        bytes) cmd_bytes ;;
        -h|--help|help) usage ;;
        *) usage ;;
    esac
}

main "$@"

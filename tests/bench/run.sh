#!/usr/bin/env bash
# Data-plane benchmark: overlay beside the raw link, wireguard-go and gotatun, in a
# two-host network-namespace lab. Run as root from anywhere in the workspace.
#
#   host a (10.99.0.1) ══ veth ══ host b (10.99.0.2)
#     iperf3 -c / ping              iperf3 -s (both families)
#     overlay-coord :8080
#
# overlay is measured twice in one run: to b's mesh IPv4 address (column
# "overlay") and to its mesh IPv6 address (ping -6, iperf3 -6: "overlay IPv6").
#
# Environment:
#   BENCH_SECS=10        seconds per iperf3 run
#   BENCH_PINGS=200      pings per RTT measurement (10 ms apart)
#   BENCH_SMOKE=1        1-second iperf3 runs and 20 pings
#   BENCH_ONLY=raw,wg,gota,overlay,relay   which systems to measure (relay: the
#                        coordination relay, UDP between the hosts blocked)
#   OVERLAY_BIN_DIR=DIR  use the overlay binaries in DIR instead of building release
#   BENCH_KEEP=1         keep the work directory (logs) after the run
#   BENCH_V6_FIRST=1     measure the overlay IPv6 column before the IPv4 one (to
#                        see how much of v6/v4 is the order of the phases)
# See tests/bench/README.md for what each figure means.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PY="python3 $HERE/bench.py"

if [[ ${BENCH_SMOKE:-0} == 1 ]]; then
    SECS=${BENCH_SECS:-1}
    PINGS=${BENCH_PINGS:-20}
    MODE=smoke
else
    SECS=${BENCH_SECS:-10}
    PINGS=${BENCH_PINGS:-200}
    MODE=full
fi
ONLY=${BENCH_ONLY:-raw,wg,gota,overlay,relay}
# How long overlay gets to come up before its figures are given up.
START_TIMEOUT=${BENCH_START_TIMEOUT:-60}

[[ $(id -u) == 0 ]] || { echo "run.sh: must run as root (network namespaces)" >&2; exit 1; }
for tool in ip iperf3 ping python3; do
    command -v "$tool" >/dev/null || { echo "run.sh: $tool is missing" >&2; exit 1; }
done

# Unique names per run so concurrent runs and other labs never collide.
ID=$(printf %04x $((RANDOM ^ ($$ & 0xffff))))
NS_A=bn$ID-a
NS_B=bn$ID-b
IP_A=10.99.0.1
IP_B=10.99.0.2
WG_A=bwg${ID}a      # wireguard-go's UAPI socket lives in the shared /var/run/wireguard
WG_B=bwg${ID}b
GT_A=bgt${ID}a      # gotatun's, likewise
GT_B=bgt${ID}b
WG_IP_A=10.99.1.1
WG_IP_B=10.99.1.2
WG_PORT=51820
COORD_PORT=8080
WORK=$(mktemp -d "/tmp/overlay-bench.$ID.XXXX")
RESULTS=$WORK/results
: >"$RESULTS"
mkdir -p "$WORK/logs"

log() { printf '[bench %s] %s\n' "$(date +%T)" "$*" >&2; }
put() { echo "$1 $2 $3" >>"$RESULTS"; }        # system key value
note() { put "$1" note "$2"; log "$1: $2"; }
# Background daemons are started with a bare `ip netns exec` (which execs), never
# through these functions, so that $! is the daemon itself and not a subshell.
in_a() { ip netns exec "$NS_A" "$@"; }
in_b() { ip netns exec "$NS_B" "$@"; }
now() { echo "$EPOCHREALTIME"; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$(now)"; }

# shellcheck source=procs.sh
source "$HERE/procs.sh"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local f ns pid
    for f in "$WORK"/pids.*; do [[ -e $f ]] && stop_pids "${f##*/pids.}"; done
    for ns in "$NS_A" "$NS_B"; do
        if ip netns list | grep -qw "$ns"; then
            # Anything still inside our own namespaces was started by this run.
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    rm -f "/var/run/wireguard/$WG_A.sock" "/var/run/wireguard/$WG_B.sock"
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- lab --------------------------------------------------------------------

make_lab() {
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    # IPv6 on (the mesh IPv6 row), usable at once: no duplicate address
    # detection, no router solicitations.
    for ns in "$NS_A" "$NS_B"; do
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0 \
            net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 \
            net.ipv6.conf.default.router_solicitations=0
    done
    ip link add eth0 netns "$NS_A" type veth peer name eth0 netns "$NS_B"
    ip -n "$NS_A" addr add "$IP_A/24" dev eth0
    ip -n "$NS_B" addr add "$IP_B/24" dev eth0
    for ns in "$NS_A" "$NS_B"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
    done
    in_a ping -c 1 -W 2 "$IP_B" >/dev/null
    # One iperf3 server for every system: it listens on all of b's addresses.
    ip netns exec "$NS_B" iperf3 -s >"$WORK/logs/iperf3-server.log" 2>&1 &
    track lab $!
    sleep 0.3
}

# --- measurements -----------------------------------------------------------

# rss_sampler OUT PID...: appends VmRSS (kB) of each PID every 0.2 s.
rss_sampler() {
    local out=$1 pid
    shift
    while :; do
        for pid in "$@"; do
            awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true
        done
        sleep 0.2
    done >>"$out"
}

rss_max() { # PID...: the largest VmRSS (kB) among them now
    local pid
    for pid in "$@"; do awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || true; done |
        sort -n | tail -1
}

# field KEY: the value of `KEY value` among bench.py's output lines on stdin.
field() { awk -v k="$1" '$1 == k {print $2}'; }

# measure SYSTEM TARGET_IP MTU DAEMON_PID...: every figure for one system. An
# IPv6 TARGET_IP is measured with ping -6 and iperf3 -6.
measure() {
    local sys=$1 target=$2 mtu=$3
    shift 3
    local pids=("$@") family=()
    [[ $target == *:* ]] && family=(-6)
    put "$sys" mtu "$mtu"

    log "$sys: ping ${family[*]} x$PINGS"
    in_a ping "${family[@]}" -n -i 0.01 -c "$PINGS" -W 1 "$target" >"$WORK/logs/$sys-ping.txt" 2>&1 || true
    local stats
    if stats=$($PY ping "$WORK/logs/$sys-ping.txt" 2>/dev/null); then
        put "$sys" rtt_p50 "$(field p50 <<<"$stats")"
        put "$sys" rtt_p99 "$(field p99 <<<"$stats")"
        put "$sys" ping_replies "$(field replies <<<"$stats")/$PINGS"
    else
        note "$sys" "ping got no replies"
    fi

    if ((${#pids[@]})); then
        sleep 1
        put "$sys" rss_idle_kb "$(rss_max "${pids[@]}")"
        rss_sampler "$WORK/$sys-rss.txt" "${pids[@]}" &
        track "$sys" $!
    fi

    local du=0 ds=0 kt=0 total=0 name args u0 s0 k0 u1 s1 k1 bytes
    for spec in "tcp1_fwd:-P 1" "tcp1_rev:-P 1 -R" "tcp4_fwd:-P 4" "tcp4_rev:-P 4 -R"; do
        name=${spec%%:*}
        args=${spec#*:}
        log "$sys: iperf3 ${family[*]} $args, $SECS s"
        read -r u0 s0 k0 < <($PY cpu "${pids[@]}")
        # shellcheck disable=SC2086  # $args is a list of flags
        if ! in_a timeout $((SECS + 30)) iperf3 "${family[@]}" -c "$target" -t "$SECS" $args --connect-timeout 5000 --json \
            >"$WORK/logs/$sys-$name.json" 2>"$WORK/logs/$sys-$name.err"; then
            note "$sys" "iperf3 $args failed: $(head -c 300 "$WORK/logs/$sys-$name.err" "$WORK/logs/$sys-$name.json" | tr '\n' ' ')"
            continue
        fi
        read -r u1 s1 k1 < <($PY cpu "${pids[@]}")
        stats=$($PY iperf "$WORK/logs/$sys-$name.json")
        bytes=$(field bytes <<<"$stats")
        put "$sys" "${name}_bps" "$(field bps <<<"$stats")"
        du=$((du + u1 - u0))
        ds=$((ds + s1 - s0))
        kt=$((kt + k1 - k0))
        total=$((total + bytes))
    done
    put "$sys" bytes_total "$total"
    put "$sys" kernel_ticks "$kt"
    if ((${#pids[@]})); then
        put "$sys" daemon_user_ticks "$du"
        put "$sys" daemon_sys_ticks "$ds"
        stop_pids "$sys" # the sampler; daemons are tracked under their own phase
        put "$sys" rss_load_kb "$(sort -n "$WORK/$sys-rss.txt" | tail -1)"
    fi
}

# measure_loaded_rtt SYS TARGET_IP: ping every 10 ms while one TCP stream a->b
# fills the path (TCP over TCP for the relay: how much the queues add).
measure_loaded_rtt() {
    local sys=$1 target=$2 stats
    log "$sys: ping x$((SECS * 100)) during iperf3 -P 1, $SECS s"
    in_a timeout $((SECS + 30)) iperf3 -c "$target" -t "$SECS" -P 1 --connect-timeout 5000 --json \
        >"$WORK/logs/$sys-loaded.json" 2>&1 &
    local iperf=$!
    sleep 0.5
    in_a ping -n -i 0.01 -c $(((SECS - 1) * 100)) -W 1 "$target" >"$WORK/logs/$sys-loaded-ping.txt" 2>&1 || true
    wait "$iperf" || true
    if stats=$($PY ping "$WORK/logs/$sys-loaded-ping.txt" 2>/dev/null); then
        put "$sys" rtt_load_p50 "$(field p50 <<<"$stats")"
        put "$sys" rtt_load_p99 "$(field p99 <<<"$stats")"
        put "$sys" ping_load_replies "$(field replies <<<"$stats")/$(((SECS - 1) * 100))"
    else
        note "$sys" "no ping answered under load"
    fi
    stats=$($PY iperf "$WORK/logs/$sys-loaded.json" 2>/dev/null) &&
        put "$sys" tcp1_loaded_bps "$(field bps <<<"$stats")"
}

# --- systems ----------------------------------------------------------------

phase_raw() {
    measure raw "$IP_B" "$(in_a cat /sys/class/net/eth0/mtu)"
}

# userspace_wg SYS IFACE_A IFACE_B DAEMON...: a WireGuard pair run by a userspace
# implementation that wg(8) configures over its UAPI socket (wireguard-go,
# gotatun). DAEMON... runs in the foreground with the interface name appended,
# so $! is the daemon itself.
userspace_wg() {
    local sys=$1 if_a=$2 if_b=$3
    shift 3
    command -v wg >/dev/null || { note "$sys" "wg missing: apt-get install -y wireguard-tools"; return 1; }
    local keys=$WORK/$sys
    mkdir -p "$keys"
    (umask 077; wg genkey >"$keys/a.key"; wg genkey >"$keys/b.key")
    wg pubkey <"$keys/a.key" >"$keys/a.pub"
    wg pubkey <"$keys/b.key" >"$keys/b.pub"

    ip netns exec "$NS_A" env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 "$@" "$if_a" >"$WORK/logs/$sys-a.log" 2>&1 &
    local pid_a=$!
    track "${sys}d" "$pid_a"
    ip netns exec "$NS_B" env WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 "$@" "$if_b" >"$WORK/logs/$sys-b.log" 2>&1 &
    local pid_b=$!
    track "${sys}d" "$pid_b"
    for _ in $(seq 50); do
        [[ -S /var/run/wireguard/$if_a.sock && -S /var/run/wireguard/$if_b.sock ]] && break
        sleep 0.1
    done
    in_a wg set "$if_a" private-key "$keys/a.key" listen-port "$WG_PORT" \
        peer "$(cat "$keys/b.pub")" endpoint "$IP_B:$WG_PORT" allowed-ips "$WG_IP_B/32"
    in_b wg set "$if_b" private-key "$keys/b.key" listen-port "$WG_PORT" \
        peer "$(cat "$keys/a.pub")" endpoint "$IP_A:$WG_PORT" allowed-ips "$WG_IP_A/32"
    in_a ip addr add "$WG_IP_A/24" dev "$if_a"
    in_b ip addr add "$WG_IP_B/24" dev "$if_b"
    in_a ip link set "$if_a" up
    in_b ip link set "$if_b" up
    in_a ping -c 1 -W 5 "$WG_IP_B" >/dev/null || { note "$sys" "no ping through $1"; return 1; }
    sleep 1 # let the handshake traffic settle before the idle RSS sample
    measure "$sys" "$WG_IP_B" "$(in_a cat "/sys/class/net/$if_a/mtu")" "$pid_a" "$pid_b"
    stop_pids "${sys}d"
}

phase_wg() {
    command -v wireguard-go >/dev/null ||
        { note wg "wireguard-go missing: apt-get install -y wireguard-go wireguard-tools"; return 1; }
    userspace_wg wg "$WG_A" "$WG_B" wireguard-go -f
}

# gotatun: Mullvad's successor of boringtun (cargo install gotatun-cli).
phase_gota() {
    command -v gotatun >/dev/null ||
        { note gota "gotatun missing: cargo install gotatun-cli"; return 1; }
    userspace_wg gota "$GT_A" "$GT_B" gotatun --disable-drop-privileges -f --log "$WORK/logs/gotatun.log"
}

overlay_bins() {
    if [[ -n ${OVERLAY_BIN_DIR:-} ]]; then
        BIN=$OVERLAY_BIN_DIR
    else
        log "building overlay (release)"
        (cd "$ROOT" && cargo build --release -j2 -p overlayd -p overlay-coord -p overlayctl &&
            cargo build --release -j2 -p overlay-tests --bin dns_load) \
            >"$WORK/logs/cargo.log" 2>&1 ||
            { note overlay "release build failed: $(grep -m1 -E '^error' "$WORK/logs/cargo.log")"; return 1; }
        BIN=$ROOT/target/release
    fi
    local b
    for b in overlay-coord overlayd overlayctl; do
        [[ -x $BIN/$b ]] || { note overlay "$BIN/$b missing"; return 1; }
    done
}

# mesh_ip NS SOCKET [FIELD]: the node's mesh address (FIELD mesh_ip6: its mesh
# IPv6 address), empty until it has one.
mesh_ip() {
    ip netns exec "$1" "$BIN/overlayctl" --socket "$2" status --json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin).get(sys.argv[1]) or "")' "${3:-mesh_ip}" 2>/dev/null || true
}

# all_on NS SOCKET KIND: true when every peer's path_kind is KIND (direct, coord_relay).
all_on() {
    ip netns exec "$1" "$BIN/overlayctl" --socket "$2" peers --json 2>/dev/null | python3 -c '
import json, sys
peers = json.load(sys.stdin)
sys.exit(0 if peers and all(p.get("path_kind") == sys.argv[1] for p in peers) else 1)' "$3" 2>/dev/null
}

# peer_paths NS SOCKET: the human path of every peer (`direct (host) via …`).
peer_paths() {
    ip netns exec "$1" "$BIN/overlayctl" --socket "$2" peers --json 2>/dev/null | python3 -c '
import json, sys
print("; ".join("%s (%s)" % (p["path"], p.get("endpoint") or "-") for p in json.load(sys.stdin)))' 2>/dev/null || echo "?"
}

# overlay_up SYS KIND: the coordinator in a, overlayd in a and b (fresh state),
# until a's first ping to b is answered and both sides are on path KIND
# (`direct`, `coord_relay`). Sets DIR, SOCK_A, PID_A, PID_B, COORD_PID, MESH_B
# and MESH_B6 (empty when b has no mesh IPv6 address); the daemons are tracked
# under phase `ovld`.
overlay_up() {
    local sys=$1 kind=$2
    overlay_bins
    DIR=$WORK/$sys
    local dir=$DIR
    mkdir -p "$dir/coord" "$dir/a" "$dir/b"
    chmod 700 "$dir/a" "$dir/b"
    if ! "$BIN/overlay-coord" serve --help 2>/dev/null | grep -q -- --listen; then
        note "$sys" "overlay-coord has no 'serve --listen' yet"
        return 1
    fi

    ip netns exec "$NS_A" "$BIN/overlay-coord" serve --listen "$IP_A:$COORD_PORT" --state-dir "$dir/coord" \
        --public-addr "$IP_A" --allow-http >"$WORK/logs/$sys-coord.log" 2>&1 &
    COORD_PID=$!
    local coord_pid=$COORD_PID key=""
    track ovld "$coord_pid"
    # The key is created only once the server listens: both open the store, and
    # the server must be the one that creates it.
    for _ in $(seq 100); do
        in_b bash -c "exec 3<>/dev/tcp/$IP_A/$COORD_PORT" 2>/dev/null && break
        kill -0 "$coord_pid" 2>/dev/null || { note "$sys" "coordinator exited: $(tail -1 "$WORK/logs/$sys-coord.log")"; return 1; }
        sleep 0.1
    done
    key=$("$BIN/overlay-coord" keys create --reusable --state-dir "$dir/coord" 2>>"$WORK/logs/coord-keys.log") ||
        { note "$sys" "could not create an auth key: $(tail -1 "$WORK/logs/coord-keys.log")"; return 1; }

    local sock_a=$dir/a/sock sock_b=$dir/b/sock t0
    SOCK_A=$sock_a
    t0=$(now)
    ip netns exec "$NS_A" "$BIN/overlayd" up --coordinator "http://$IP_A:$COORD_PORT" --auth-key "$key" --hostname h1 \
        --state-dir "$dir/a" --interface ovl0 --socket "$sock_a" >"$WORK/logs/$sys-overlayd-a.log" 2>&1 &
    PID_A=$!
    track ovld "$PID_A"
    ip netns exec "$NS_B" "$BIN/overlayd" up --coordinator "http://$IP_A:$COORD_PORT" --auth-key "$key" --hostname h2 \
        --state-dir "$dir/b" --interface ovl0 --socket "$sock_b" >"$WORK/logs/$sys-overlayd-b.log" 2>&1 &
    PID_B=$!
    track ovld "$PID_B"
    local pid_a=$PID_A pid_b=$PID_B

    # Two watchers race: the first answered ping a -> b, and both sides on KIND.
    (
        local ip=""
        while [[ -z $ip ]]; do ip=$(mesh_ip "$NS_B" "$sock_b"); [[ -n $ip ]] || sleep 0.02; done
        echo "$ip" >"$dir/mesh_b"
        # -c 1 -w: keep sending every 10 ms until one answer arrives.
        until in_a ping -n -c 1 -i 0.01 -w "$START_TIMEOUT" "$ip" >/dev/null 2>&1; do sleep 0.01; done
        since "$t0" >"$dir/t_ping"
    ) &
    local w1=$!
    track ovlw "$w1"
    (
        until all_on "$NS_A" "$sock_a" "$kind" && all_on "$NS_B" "$sock_b" "$kind"; do sleep 0.05; done
        since "$t0" >"$dir/t_path"
    ) &
    local w2=$!
    track ovlw "$w2"
    local deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)) && [[ ! -s $dir/t_ping || ! -s $dir/t_path ]]; do
        kill -0 "$pid_a" 2>/dev/null && kill -0 "$pid_b" 2>/dev/null || break
        sleep 0.1
    done
    stop_pids ovlw
    [[ -s $dir/t_ping ]] && put "$sys" start_ping_s "$(cat "$dir/t_ping")" ||
        note "$sys" "no answered ping within ${START_TIMEOUT}s"
    if [[ $kind == direct ]]; then
        [[ -s $dir/t_path ]] && put "$sys" start_direct_s "$(cat "$dir/t_path")" ||
            note "$sys" "path never direct within ${START_TIMEOUT}s"
    else
        [[ -s $dir/t_path ]] || note "$sys" "path never $kind within ${START_TIMEOUT}s"
    fi
    kill -0 "$pid_a" 2>/dev/null && kill -0 "$pid_b" 2>/dev/null ||
        { note "$sys" "a daemon exited: $(tail -2 "$WORK/logs/$sys-overlayd-a.log" "$WORK/logs/$sys-overlayd-b.log" | tr '\n' ' ')"; return 1; }
    [[ -s $dir/mesh_b ]] || { note "$sys" "b never got a mesh IP"; return 1; }
    [[ -s $dir/t_ping ]] || return 1
    MESH_B=$(cat "$dir/mesh_b")
    MESH_B6=$(mesh_ip "$NS_B" "$sock_b" mesh_ip6)
    if [[ ! -s $dir/t_path ]]; then
        in_a "$BIN/overlayctl" --socket "$sock_a" peers >"$WORK/logs/$sys-peers.txt" 2>&1 || true
        note "$sys" "measured on path: $(tail -1 "$WORK/logs/$sys-peers.txt")"
    fi
    sleep 1
}

# measure_path SYS TARGET PID...: measure over the mesh to b's mesh address
# TARGET, noting a's path to b before and after.
measure_path() {
    local sys=$1 target=$2 before after
    shift 2
    before=$(peer_paths "$NS_A" "$SOCK_A")
    measure "$sys" "$target" "$(in_a cat /sys/class/net/ovl0/mtu)" "$@"
    after=$(peer_paths "$NS_A" "$SOCK_A")
    if [[ $before == "$after" ]]; then
        note "$sys" "a's path to b throughout: $before"
    else
        note "$sys" "a's path to b changed during the measurement: $before -> $after"
    fi
}

phase_overlay() {
    overlay_up overlay direct
    if [[ -z $MESH_B6 ]]; then
        note overlay6 "b reports no mesh IPv6 address (mesh_ip6 in overlayctl status --json)"
    elif [[ ${BENCH_V6_FIRST:-0} == 1 ]]; then
        note overlay6 "measured before the IPv4 column (BENCH_V6_FIRST=1)"
        measure_path overlay6 "$MESH_B6" "$PID_A" "$PID_B"
    fi
    measure_path overlay "$MESH_B" "$PID_A" "$PID_B"
    if [[ -n $MESH_B6 && ${BENCH_V6_FIRST:-0} != 1 ]]; then
        measure_path overlay6 "$MESH_B6" "$PID_A" "$PID_B"
    fi
    measure_dns "$SOCK_A"
    measure_policy "$DIR" "$SOCK_A" "$PID_A" "$PID_B"
    stop_pids ovld
}

# The coordination relay: UDP on b's link dropped both ways (nftables in b),
# so no ICE pair (host, reflexive or TURN: all UDP) can work and both nodes
# stay on the relay over their control WebSockets (TCP to a:$COORD_PORT).
# Its "daemons" CPU counts both overlayd and the coordinator.
phase_relay() {
    command -v nft >/dev/null || { note relay "nft missing: apt-get install -y nftables"; return 1; }
    in_b nft -f - <<EOF
table inet ovl_bench_relay {
    chain input { type filter hook input priority filter; policy accept; iifname "eth0" meta l4proto udp drop; }
    chain output { type filter hook output priority filter; policy accept; oifname "eth0" meta l4proto udp drop; }
}
EOF
    overlay_up relay coord_relay
    measure_path relay "$MESH_B" "$PID_A" "$PID_B" "$COORD_PID"
    measure_loaded_rtt relay "$MESH_B"
    stop_pids ovld
    in_b nft delete table inet ovl_bench_relay
}

# measure_dns SOCK_A: 10,000 queries from node a to its mesh resolver for b's name.
measure_dns() {
    local sock_a=$1 resolver out
    [[ -x $BIN/dns_load ]] || { note dns "dns_load missing in $BIN"; return 0; }
    resolver=$(in_a "$BIN/overlayctl" --socket "$sock_a" status --json 2>/dev/null |
        python3 -c 'import json,sys; print((json.load(sys.stdin).get("dns") or {}).get("resolver") or "")')
    [[ -n $resolver ]] || { note dns "the coordinator sent no DNS settings"; return 0; }
    log "dns: 10000 queries to $resolver"
    out=$(in_a "$BIN/dns_load" "$resolver:53" h2.overlay.internal 10000 32) ||
        { note dns "dns_load failed"; return 0; }
    local k
    for k in sent answered errors qps p50_ms p99_ms max_ms; do
        put dns "$k" "$(field "$k" <<<"$out")"
    done
}

# policy_100: an access policy of 100 rules, all naming h1 and h2 (so all of
# them are in force on both nodes): iperf3 and ping a->b, 98 more TCP ports.
policy_100() {
    printf '[[allow]]\nsrc = ["h1"]\ndst = ["h2"]\nproto = "tcp"\nports = ["5201"]\n\n'
    printf '[[allow]]\nsrc = ["h1"]\ndst = ["h2"]\nproto = "icmp"\n\n'
    local i
    for i in $(seq 1 98); do
        printf '[[allow]]\nsrc = ["h%d"]\ndst = ["h%d"]\nproto = "tcp"\nports = ["%d"]\n\n' \
            $((1 + i % 2)) $((2 - i % 2)) $((20000 + 7 * i))
    done
}

# measure_policy DIR SOCK_A PID...: the same figures with policy_100 in force,
# in the same run (the "overlay+policy" column).
measure_policy() {
    local dir=$1 sock_a=$2
    shift 2
    if ! "$BIN/overlay-coord" policy --help >/dev/null 2>&1; then
        note overlay_policy "overlay-coord has no 'policy' command yet"
        return 0
    fi
    policy_100 >"$dir/policy.toml"
    "$BIN/overlay-coord" policy set "$dir/policy.toml" --state-dir "$dir/coord" \
        >"$WORK/logs/policy-set.log" 2>&1 ||
        { note overlay_policy "policy set failed: $(tail -1 "$WORK/logs/policy-set.log")"; return 0; }
    local deadline=$((SECONDS + 10))
    until in_a "$BIN/overlayctl" --socket "$sock_a" policy 2>/dev/null | grep -q 'tcp 5201'; do
        ((SECONDS < deadline)) || { note overlay_policy "the policy never reached node a"; return 0; }
        sleep 0.1
    done
    note overlay_policy "100 rules in force: $(in_a "$BIN/overlayctl" --socket "$sock_a" policy | grep -m1 '^h2')"
    measure overlay_policy "$(cat "$dir/mesh_b")" "$(in_a cat /sys/class/net/ovl0/mtu)" "$@"
}

# phase_exit NAME RC: the end of a phase's subshell, however it ended.
phase_exit() {
    local f
    [[ $2 == 0 ]] || note "$1" "phase stopped early (exit $2); logs: BENCH_KEEP=1 keeps $WORK/logs"
    for f in "$WORK"/pids.*; do
        [[ -e $f && $f != "$WORK/pids.lab" ]] && stop_pids "${f##*/pids.}"
    done
    return 0
}

# run_phase NAME: one system in a subshell, so a failure there leaves a note in
# the table instead of ending the run; its processes are stopped either way.
run_phase() {
    local name=$1 rc
    [[ ,$ONLY, == *,$name,* ]] || return 0
    log "--- $name"
    set +e
    (
        set -e
        trap 'phase_exit '"$name"' $?' EXIT
        "phase_$name"
    )
    rc=$?
    set -e
    return 0
}

put meta mode "$MODE"
put meta secs "$SECS"
put meta pings "$PINGS"
put meta cores "$(nproc)"
put meta kernel "$(uname -r)"
log "lab $NS_A <-> $NS_B, work dir $WORK"
make_lab
run_phase raw
run_phase wg
run_phase gota
run_phase overlay
run_phase relay
$PY report "$RESULTS"

#!/usr/bin/env bash
# Path benchmark: overlay's four kinds of path measured in one run, in a NAT lab
# like the lab tests' (tests/src/lab.rs): TCP throughput (iperf3) and RTT (ping).
#
#   coord 203.0.113.1 (HTTP :8080, embedded STUN/TURN udp :3478)
#   turn  203.0.113.2 (coturn udp :3478, in the coturn phase)
#     │
#   ──┴─────── public 203.0.113.0/24 (a bridge) ──┬──────────────────┬──
#                                             agw .10 (NAT)       bgw .11 (NAT)
#                                                  │                  │
#                                          a1 10.77.1.2         b1 10.77.2.2
#                                        iperf3 -c, ping          iperf3 -s
#
# Phases, each with a fresh coordinator and fresh daemons:
#   direct   cone/cone NATs: a direct (srflx/prflx) ICE pair
#   turn     symmetric/symmetric: the coordinator's embedded TURN server
#   coturn   symmetric/symmetric: coturn on its own host, embedded TURN off
#   relay    a's site blocks UDP, b's is cone: the coordination relay
#
# Environment:
#   BENCH_SECS=8         seconds per iperf3 run
#   BENCH_PINGS=200      pings per RTT measurement (10 ms apart)
#   BENCH_SMOKE=1        1-second iperf3 runs and 20 pings
#   BENCH_ONLY=direct,turn,coturn,relay   which paths to measure
#   BENCH_PERF=1         record `perf record -g` of overlayd a and the TURN
#                        server during the turn/coturn phases' a->b run
#   OVERLAY_BIN_DIR=DIR  use the overlay binaries in DIR instead of building release
#   BENCH_KEEP=1         keep the work directory (logs) after the run
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
    SECS=${BENCH_SECS:-8}
    PINGS=${BENCH_PINGS:-200}
    MODE=full
fi
ONLY=${BENCH_ONLY:-direct,turn,coturn,relay}
START_TIMEOUT=${BENCH_START_TIMEOUT:-90}

[[ $(id -u) == 0 ]] || { echo "paths.sh: must run as root (network namespaces)" >&2; exit 1; }
for tool in ip iperf3 ping python3 nft; do
    command -v "$tool" >/dev/null || { echo "paths.sh: $tool is missing" >&2; exit 1; }
done

ID=$(printf %04x $((RANDOM ^ ($$ & 0xffff))))
P=bp$ID
NS_PUB=$P-pub
NS_COORD=$P-coord
NS_TURN=$P-turn
NS_AGW=$P-agw
NS_BGW=$P-bgw
NS_A=$P-a1
NS_B=$P-b1
ALL_NS=("$NS_PUB" "$NS_COORD" "$NS_TURN" "$NS_AGW" "$NS_BGW" "$NS_A" "$NS_B")
COORD_IP=203.0.113.1
TURN_IP=203.0.113.2
AGW_IP=203.0.113.10
BGW_IP=203.0.113.11
A_IP=10.77.1.2
B_IP=10.77.2.2
COORD_PORT=8080
COTURN_SECRET=overlay-bench-coturn-secret
WORK=$(mktemp -d "/tmp/overlay-paths.$ID.XXXX")
RESULTS=$WORK/results
: >"$RESULTS"
mkdir -p "$WORK/logs"

log() { printf '[paths %s] %s\n' "$(date +%T)" "$*" >&2; }
put() { echo "$1 $2 $3" >>"$RESULTS"; }
note() { put "$1" note "$2"; log "$1: $2"; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
field() { awk -v k="$1" '$1 == k {print $2}'; }

# shellcheck source=procs.sh
source "$HERE/procs.sh"

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local f ns pid
    for f in "$WORK"/pids.*; do [[ -e $f ]] && stop_pids "${f##*/pids.}"; done
    for ns in "${ALL_NS[@]}"; do
        if ip netns list | grep -qw "$ns"; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- lab --------------------------------------------------------------------

# attach NS IFACE IP/PREFIX: a veth from NS into the public bridge.
PORT_N=0
attach_pub() {
    local ns=$1 dev=$2 addr=$3
    PORT_N=$((PORT_N + 1))
    ip link add "$dev" netns "$ns" type veth peer name "p$PORT_N" netns "$NS_PUB"
    ip -n "$NS_PUB" link set "p$PORT_N" master br0 up
    ip -n "$ns" addr add "$addr" dev "$dev"
    ip -n "$ns" link set "$dev" up
}

# nat_rules KIND: the router ruleset of tests/src/lab.rs nat_ruleset (wan eth0, lan eth1).
nat_rules() {
    local masq=masquerade out='iifname "eth1" oifname "eth0" accept'
    case $1 in
        sym) masq="masquerade fully-random" ;;
        udp_blocked) out='iifname "eth1" oifname "eth0" meta l4proto tcp accept' ;;
    esac
    cat <<EOF
table ip ovl_nat {
    chain postrouting { type nat hook postrouting priority srcnat; policy accept; oifname "eth0" $masq; }
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        $out
    }
    chain input { type filter hook input priority filter; policy accept; iifname "eth0" ct state new drop; }
}
EOF
}

# set_nat NS KIND: replace the router's ruleset, and forget its old mappings.
set_nat() {
    in_ns "$1" nft delete table ip ovl_nat 2>/dev/null || true
    nat_rules "$2" | in_ns "$1" nft -f -
    in_ns "$1" conntrack -F >/dev/null 2>&1 || true
}

make_lab() {
    local ns
    for ns in "${ALL_NS[@]}"; do
        ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    ip -n "$NS_PUB" link add br0 type bridge
    ip -n "$NS_PUB" link set br0 up
    attach_pub "$NS_COORD" eth0 "$COORD_IP/24"
    attach_pub "$NS_TURN" eth0 "$TURN_IP/24"
    attach_pub "$NS_AGW" eth0 "$AGW_IP/24"
    attach_pub "$NS_BGW" eth0 "$BGW_IP/24"
    ip link add eth1 netns "$NS_AGW" type veth peer name eth0 netns "$NS_A"
    ip link add eth1 netns "$NS_BGW" type veth peer name eth0 netns "$NS_B"
    ip -n "$NS_AGW" addr add 10.77.1.1/24 dev eth1
    ip -n "$NS_BGW" addr add 10.77.2.1/24 dev eth1
    ip -n "$NS_A" addr add "$A_IP/24" dev eth0
    ip -n "$NS_B" addr add "$B_IP/24" dev eth0
    for ns in "$NS_AGW" "$NS_BGW" "$NS_A" "$NS_B"; do ip -n "$ns" link set eth0 up; done
    # The public hosts reach everything public on-link (as through an upstream router).
    for ns in "$NS_COORD" "$NS_TURN" "$NS_AGW" "$NS_BGW"; do ip -n "$ns" route add default dev eth0; done
    ip -n "$NS_AGW" link set eth1 up
    ip -n "$NS_BGW" link set eth1 up
    ip -n "$NS_A" route add default via 10.77.1.1
    ip -n "$NS_B" route add default via 10.77.2.1
    in_ns "$NS_AGW" sysctl -qw net.ipv4.ip_forward=1
    in_ns "$NS_BGW" sysctl -qw net.ipv4.ip_forward=1
    set_nat "$NS_AGW" cone
    set_nat "$NS_BGW" cone
    in_ns "$NS_A" ping -c 1 -W 2 "$COORD_IP" >/dev/null || { log "lab: a1 cannot reach the coordinator"; exit 1; }
    in_ns "$NS_B" ping -c 1 -W 2 "$COORD_IP" >/dev/null || { log "lab: b1 cannot reach the coordinator"; exit 1; }
    ip netns exec "$NS_B" iperf3 -s >"$WORK/logs/iperf3-server.log" 2>&1 &
    track lab $!
}

# --- overlay ----------------------------------------------------------------

overlay_bins() {
    if [[ -n ${OVERLAY_BIN_DIR:-} ]]; then
        BIN=$OVERLAY_BIN_DIR
    else
        log "building overlay (release)"
        (cd "$ROOT" && cargo build --release -j2 -p overlayd -p overlay-coord -p overlayctl) \
            >"$WORK/logs/cargo.log" 2>&1 ||
            { log "release build failed: $(grep -m1 -E '^error' "$WORK/logs/cargo.log")"; exit 1; }
        BIN=$ROOT/target/release
    fi
}

ctl() { local ns=$1 sock=$2; shift 2; ip netns exec "$ns" "$BIN/overlayctl" --socket "$sock" "$@"; }

mesh_ip() {
    ctl "$1" "$2" status --json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin).get("mesh_ip") or "")' 2>/dev/null || true
}

all_on() {
    ctl "$1" "$2" peers --json 2>/dev/null | python3 -c '
import json, sys
peers = json.load(sys.stdin)
sys.exit(0 if peers and all(p.get("path_kind") == sys.argv[1] for p in peers) else 1)' "$3" 2>/dev/null
}

peer_paths() {
    ctl "$1" "$2" peers --json 2>/dev/null | python3 -c '
import json, sys
print("; ".join(p["path"] for p in json.load(sys.stdin)))' 2>/dev/null || echo "?"
}

# overlay_up SYS KIND [coord args...]: coordinator, then a1 and b1, until both
# report every peer on KIND (direct, turn, coord_relay) and a ping is answered.
overlay_up() {
    local sys=$1 kind=$2
    shift 2
    DIR=$WORK/$sys
    mkdir -p "$DIR/coord" "$DIR/a" "$DIR/b"
    chmod 700 "$DIR/a" "$DIR/b"
    ip netns exec "$NS_COORD" "$BIN/overlay-coord" serve --listen "$COORD_IP:$COORD_PORT" --state-dir "$DIR/coord" \
        --public-addr "$COORD_IP" --allow-http --turn-allow-private "$@" >"$WORK/logs/$sys-coord.log" 2>&1 &
    COORD_PID=$!
    track ovld "$COORD_PID"
    for _ in $(seq 100); do
        in_ns "$NS_A" bash -c "exec 3<>/dev/tcp/$COORD_IP/$COORD_PORT" 2>/dev/null && break
        kill -0 "$COORD_PID" 2>/dev/null || { note "$sys" "coordinator exited: $(tail -1 "$WORK/logs/$sys-coord.log")"; return 1; }
        sleep 0.1
    done
    local key
    key=$("$BIN/overlay-coord" keys create --reusable --state-dir "$DIR/coord" 2>>"$WORK/logs/coord-keys.log") ||
        { note "$sys" "could not create an auth key"; return 1; }
    SOCK_A=$DIR/a/sock
    SOCK_B=$DIR/b/sock
    local n
    for n in a b; do
        local ns=$NS_A sock=$SOCK_A
        [[ $n == b ]] && { ns=$NS_B; sock=$SOCK_B; }
        ip netns exec "$ns" "$BIN/overlayd" up --coordinator "http://$COORD_IP:$COORD_PORT" --auth-key "$key" \
            --hostname "h$n" --state-dir "$DIR/$n" --interface ovl0 --socket "$sock" --dns off \
            >"$WORK/logs/$sys-overlayd-$n.log" 2>&1 &
        track ovld $!
        [[ $n == a ]] && PID_A=$! || PID_B=$!
    done
    local deadline=$((SECONDS + START_TIMEOUT)) t0=$EPOCHREALTIME
    MESH_B=""
    while ((SECONDS < deadline)); do
        kill -0 "$PID_A" 2>/dev/null && kill -0 "$PID_B" 2>/dev/null ||
            { note "$sys" "a daemon exited: $(tail -1 "$WORK/logs/$sys-overlayd-a.log" "$WORK/logs/$sys-overlayd-b.log" | tr '\n' ' ')"; return 1; }
        [[ -n $MESH_B ]] || MESH_B=$(mesh_ip "$NS_B" "$SOCK_B")
        if [[ -n $MESH_B ]] && all_on "$NS_A" "$SOCK_A" "$kind" && all_on "$NS_B" "$SOCK_B" "$kind"; then
            break
        fi
        # Traffic, as a user's would be: a quiet peer may go idle before ICE settles.
        [[ -z $MESH_B ]] || in_ns "$NS_A" ping -n -c 1 -W 0.2 "$MESH_B" >/dev/null 2>&1 || true
        sleep 0.1
    done
    [[ -n $MESH_B ]] || { note "$sys" "b never got a mesh IP"; return 1; }
    if ! all_on "$NS_A" "$SOCK_A" "$kind"; then
        note "$sys" "never on $kind within ${START_TIMEOUT}s: $(peer_paths "$NS_A" "$SOCK_A")"
        return 1
    fi
    put "$sys" settle_s "$(python3 -c "print(f'{$EPOCHREALTIME - $t0:.2f}')")"
    in_ns "$NS_A" ping -n -c 1 -W 5 "$MESH_B" >/dev/null || { note "$sys" "no ping answered on $kind"; return 1; }
    sleep 1
}

# perf_start SYS NAME PID: a call-graph profile of PID while the next run lasts.
perf_start() {
    [[ ${BENCH_PERF:-0} == 1 ]] && command -v perf >/dev/null || return 0
    perf record -g -F 499 -p "$3" -o "$WORK/perf-$1-$2.data" -- sleep "$SECS" >/dev/null 2>&1 &
    track perf $!
}

perf_report() {
    [[ ${BENCH_PERF:-0} == 1 ]] || return 0
    local f
    for f in "$WORK"/perf-"$1"-*.data; do
        [[ -e $f ]] || continue
        perf report -i "$f" --no-children --sort comm,dso,sym -g none --percent-limit 1 --stdio 2>/dev/null |
            grep -E '^ +[0-9]' | head -25 >"${f%.data}.txt" || true
        log "perf $(basename "$f"): top entries in ${f%.data}.txt"
        sed 's/^/    /' "${f%.data}.txt" >&2
    done
}

# measure SYS SERVER_PID: pings, then iperf3 a->b, b->a and 4 streams a->b.
measure() {
    local sys=$1 server=${2:-}
    local pids=("$PID_A" "$PID_B")
    local before stats
    before=$(peer_paths "$NS_A" "$SOCK_A")
    note "$sys" "a's path to b: $before"
    in_ns "$NS_A" ping -n -i 0.01 -c "$PINGS" -W 1 "$MESH_B" >"$WORK/logs/$sys-ping.txt" 2>&1 || true
    if stats=$($PY ping "$WORK/logs/$sys-ping.txt" 2>/dev/null); then
        put "$sys" rtt_p50 "$(field p50 <<<"$stats")"
        put "$sys" rtt_p99 "$(field p99 <<<"$stats")"
        put "$sys" ping_replies "$(field replies <<<"$stats")/$PINGS"
    else
        put "$sys" ping_replies "0/$PINGS"
    fi
    local spec name args u0 s0 k0 u1 s1 k1 v0 w0 v1 w1 du=0 dv=0 total=0
    for spec in "tcp1_fwd:-P 1" "tcp1_rev:-P 1 -R" "tcp4_fwd:-P 4"; do
        name=${spec%%:*}
        args=${spec#*:}
        log "$sys: iperf3 $args, $SECS s"
        read -r u0 s0 k0 < <($PY cpu "${pids[@]}")
        read -r v0 w0 k0 < <($PY cpu $server)
        if [[ $name == tcp1_fwd ]]; then
            perf_start "$sys" overlayd "$PID_A"
            [[ -n $server ]] && perf_start "$sys" server "$server"
        fi
        # shellcheck disable=SC2086
        if ! in_ns "$NS_A" timeout $((SECS + 30)) iperf3 -c "$MESH_B" -t "$SECS" $args --connect-timeout 5000 --json \
            >"$WORK/logs/$sys-$name.json" 2>&1; then
            note "$sys" "iperf3 $args failed: $(head -c 200 "$WORK/logs/$sys-$name.json" | tr '\n' ' ')"
            continue
        fi
        read -r u1 s1 k1 < <($PY cpu "${pids[@]}")
        read -r v1 w1 k1 < <($PY cpu $server)
        stats=$($PY iperf "$WORK/logs/$sys-$name.json")
        put "$sys" "${name}_bps" "$(field bps <<<"$stats")"
        total=$((total + $(field bytes <<<"$stats")))
        du=$((du + u1 - u0 + s1 - s0))
        dv=$((dv + v1 - v0 + w1 - w0))
    done
    stop_pids perf
    put "$sys" bytes_total "$total"
    put "$sys" daemon_ticks "$du"
    [[ -n $server ]] && put "$sys" server_ticks "$dv"
    local after
    after=$(peer_paths "$NS_A" "$SOCK_A")
    [[ $before == "$after" ]] || note "$sys" "path changed during the measurement: $before -> $after"
    perf_report "$sys"
}

# --- phases -----------------------------------------------------------------

phase_direct() {
    set_nat "$NS_AGW" cone
    set_nat "$NS_BGW" cone
    overlay_up direct direct
    measure direct
    stop_pids ovld
}

phase_turn() {
    set_nat "$NS_AGW" sym
    set_nat "$NS_BGW" sym
    overlay_up turn turn
    measure turn "$COORD_PID"
    stop_pids ovld
}

phase_coturn() {
    command -v turnserver >/dev/null || { note coturn "turnserver missing: apt-get install -y coturn"; return 1; }
    set_nat "$NS_AGW" sym
    set_nat "$NS_BGW" sym
    mkdir -p "$WORK/coturn"
    ip netns exec "$NS_TURN" turnserver -n --listening-ip "$TURN_IP" --relay-ip "$TURN_IP" \
        --listening-port 3478 --realm overlay --use-auth-secret --static-auth-secret "$COTURN_SECRET" \
        --no-tls --no-dtls --no-cli --fingerprint --log-file stdout --simple-log --verbose \
        --pidfile "$WORK/coturn/turnserver.pid" --userdb "$WORK/coturn/turndb" \
        >"$WORK/logs/coturn.log" 2>&1 &
    local coturn=$!
    track coturn "$coturn"
    for _ in $(seq 100); do
        grep -q "UDP listener opened on.*$TURN_IP:3478" "$WORK/logs/coturn.log" && break
        sleep 0.1
    done
    cat >"$WORK/coord-coturn.toml" <<EOF
[turn]
embedded = false
secret = "$COTURN_SECRET"

[[turn.external]]
urls = ["stun:$TURN_IP:3478", "turn:$TURN_IP:3478?transport=udp"]
EOF
    overlay_up coturn turn --config "$WORK/coord-coturn.toml"
    measure coturn "$coturn"
    stop_pids ovld
    stop_pids coturn
}

phase_relay() {
    set_nat "$NS_AGW" udp_blocked
    set_nat "$NS_BGW" cone
    overlay_up relay coord_relay
    measure relay "$COORD_PID"
    stop_pids ovld
}

phase_exit() {
    local f
    [[ $2 == 0 ]] || note "$1" "phase stopped early (exit $2); logs: BENCH_KEEP=1 keeps $WORK/logs"
    for f in "$WORK"/pids.*; do
        [[ -e $f && $f != "$WORK/pids.lab" ]] && stop_pids "${f##*/pids.}"
    done
    return 0
}

run_phase() {
    local name=$1
    [[ ,$ONLY, == *,$name,* ]] || return 0
    log "--- $name"
    set +e
    (
        set -e
        trap 'phase_exit '"$name"' $?' EXIT
        "phase_$name"
    )
    set -e
    return 0
}

put meta mode "$MODE"
put meta secs "$SECS"
put meta pings "$PINGS"
put meta cores "$(nproc)"
put meta kernel "$(uname -r)"
overlay_bins
log "lab $P-*, work dir $WORK"
make_lab
run_phase direct
run_phase turn
run_phase coturn
run_phase relay
$PY paths-report "$RESULTS"

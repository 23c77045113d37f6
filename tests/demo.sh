#!/usr/bin/env bash
# A three-node overlay mesh in network namespaces on this machine.
#
#   sudo tests/demo.sh
#
#   <prefix>-coord (10.77.1.1)  <prefix>-n1 (.11)  <prefix>-n2 (.12)  <prefix>-n3 (.13)
#          └──────────────── bridge in <prefix>-sw ─────────────────┘   10.77.1.0/24
#
# Builds the binaries (unless OVERLAY_BIN_DIR points at built ones), starts
# overlay-coord and three overlayd, waits until every node reaches the others on a
# direct path, shows `overlayctl peers` on node 1 and pings the other nodes' mesh
# addresses. Everything (namespaces, processes, files) is removed on exit, also on
# Ctrl-C. Set OVERLAY_DEMO_KEEP=1 to keep the mesh running until Enter is pressed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "demo.sh: needs root to create network namespaces; run: sudo tests/demo.sh" >&2
    exit 1
fi
for tool in ip ss ping; do
    command -v "$tool" >/dev/null 2>&1 || { echo "demo.sh: '$tool' is missing (apt-get install iproute2 iputils-ping)" >&2; exit 1; }
done

# --- binaries ---------------------------------------------------------------
if [ -n "${OVERLAY_BIN_DIR:-}" ]; then
    BIN=$OVERLAY_BIN_DIR
else
    if ! command -v cargo >/dev/null 2>&1 && [ -n "${SUDO_USER:-}" ]; then
        user_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
        export CARGO_HOME="${CARGO_HOME:-$user_home/.cargo}"
        export RUSTUP_HOME="${RUSTUP_HOME:-$user_home/.rustup}"
        export PATH="$CARGO_HOME/bin:$PATH"
    fi
    echo "== building (cargo build --workspace --bins)"
    cargo build -j2 --workspace --bins
    BIN="${CARGO_TARGET_DIR:-target}/debug"
fi
BIN=$(cd "$BIN" && pwd)
for b in overlay-coord overlayd overlayctl; do
    [ -x "$BIN/$b" ] || { echo "demo.sh: $BIN/$b not found; run cargo build --workspace first" >&2; exit 1; }
done

# --- names and cleanup ------------------------------------------------------
PREFIX="ovl$(od -An -N2 -tx1 /dev/urandom | tr -d ' \n')"
WORK=$(mktemp -d "/tmp/$PREFIX.XXXXXX")
NAMESPACES=()
PIDS=()
NODES=(n1 n2 n3)

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    echo "== tearing down $PREFIX"
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    for ns in "${NAMESPACES[@]}"; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    if [ "$status" -ne 0 ]; then
        echo "== demo failed; last lines of each log:" >&2
        for log in "$WORK"/*.log; do
            [ -e "$log" ] || continue
            echo "--- $log" >&2
            tail -n 20 "$log" >&2
        done
    fi
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ns_add() {
    ip netns add "$PREFIX-$1"
    NAMESPACES+=("$PREFIX-$1")
    ip -n "$PREFIX-$1" link set lo up
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "demo.sh: timed out after ${secs}s waiting for $what" >&2
            return 1
        fi
        sleep 0.2
    done
}

# --- topology ---------------------------------------------------------------
echo "== creating namespaces $PREFIX-sw, $PREFIX-coord and $PREFIX-n1..n3"
ns_add sw
ip -n "$PREFIX-sw" link add br0 type bridge
ip -n "$PREFIX-sw" link set br0 up
port=0
attach() { # attach HOST IP
    ip link add eth0 netns "$PREFIX-$1" type veth peer name "p$port" netns "$PREFIX-sw"
    ip -n "$PREFIX-sw" link set "p$port" master br0 up
    ip -n "$PREFIX-$1" addr add "$2/24" dev eth0
    ip -n "$PREFIX-$1" link set eth0 up
    port=$((port + 1))
}
ns_add coord
attach coord 10.77.1.1
i=11
for n in "${NODES[@]}"; do
    ns_add "$n"
    attach "$n" "10.77.1.$i"
    i=$((i + 1))
done

# --- coordinator ------------------------------------------------------------
echo "== starting overlay-coord on 10.77.1.1:8080"
mkdir -p "$WORK/coord"
ip netns exec "$PREFIX-coord" "$BIN/overlay-coord" serve --listen 10.77.1.1:8080 \
    --state-dir "$WORK/coord" --public-addr 10.77.1.1 --allow-http >"$WORK/coord.log" 2>&1 &
PIDS+=($!)
listening() { [ -n "$(ip netns exec "$PREFIX-coord" ss -Hltn 'sport = :8080')" ]; }
wait_for 20 "overlay-coord to listen" listening
KEY=$("$BIN/overlay-coord" keys create --reusable --state-dir "$WORK/coord" 2>"$WORK/keys.log")

# --- nodes ------------------------------------------------------------------
for n in "${NODES[@]}"; do
    echo "== starting overlayd $n"
    mkdir -p "$WORK/$n"
    ip netns exec "$PREFIX-$n" "$BIN/overlayd" up --coordinator http://10.77.1.1:8080 \
        --auth-key "$KEY" --hostname "$n" --state-dir "$WORK/$n/state" --interface ovl0 \
        --socket "$WORK/$n/overlayd.sock" >"$WORK/$n.log" 2>&1 &
    PIDS+=($!)
done
ctl() { local node=$1; shift; "$BIN/overlayctl" --socket "$WORK/$node/overlayd.sock" "$@"; }

# Peers start idle (no ICE until traffic, like Tailscale's and NetBird's lazy
# connections): a node that does not yet reach all the others directly pings
# them once, which wakes them, as any traffic would.
all_direct() {
    local n m count
    for n in "${NODES[@]}"; do
        count=$(ctl "$n" peers --json | grep -o '"path_kind":"direct"' | wc -l)
        if [ "$count" -ne $((${#NODES[@]} - 1)) ]; then
            for m in "${NODES[@]}"; do
                [ "$m" = "$n" ] || ctl "$n" ping "$m" -c 1 -W 1 >/dev/null 2>&1 || true
            done
            return 1
        fi
    done
}
echo "== waiting until every node reaches the others directly (the first packets wake them)"
wait_for 60 "all peers to be direct" all_direct

echo
echo "\$ overlayctl status        # on n1"
ctl n1 status
echo
echo "\$ overlayctl peers         # on n1"
ctl n1 peers
for n in "${NODES[@]:1}"; do
    ip=$(ctl "$n" status --json | grep -o '"mesh_ip":"[^"]*"' | cut -d'"' -f4)
    echo
    echo "\$ ping -c 3 $ip     # $n, from n1"
    ip netns exec "$PREFIX-n1" ping -c 3 -i 0.2 -W 2 "$ip"
done
echo
echo "\$ overlayctl ping n2 -c 3  # on n1"
ctl n1 ping n2 -c 3 -i 0.2

if [ -n "${OVERLAY_DEMO_KEEP:-}" ]; then
    echo
    echo "The mesh is running. Try: ip netns exec $PREFIX-n1 ping <mesh ip>"
    echo "  or: $BIN/overlayctl --socket $WORK/n1/overlayd.sock peers"
    read -r -p "Press Enter to tear it down. "
fi
echo
echo "== demo finished"

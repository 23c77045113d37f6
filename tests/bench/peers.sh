#!/usr/bin/env bash
# Memory of overlayd with many peers: a coordinator and N+1 nodes on one LAN
# (network namespaces), and the resident memory of node 0's overlayd once it
# reaches all N peers directly, then after pinging every one of them.
#
#   sudo tests/bench/peers.sh             # N=10
#   sudo BENCH_PEERS=20 tests/bench/peers.sh
#
# Binaries from $OVERLAY_BIN_DIR, else target/release (built with cargo).
# Everything it creates is removed on exit, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/../.."

PEERS=${BENCH_PEERS:-10}
TIMEOUT=${BENCH_START_TIMEOUT:-120}
if [[ -z ${OVERLAY_BIN_DIR:-} ]]; then
    cargo build --release -j2 -p overlayd -p overlay-coord -p overlayctl >&2
    OVERLAY_BIN_DIR=target/release
fi
BIN=$(cd "$OVERLAY_BIN_DIR" && pwd)
P=bp$(printf '%04x' $((RANDOM % 65536)))
WORK=$(mktemp -d /tmp/overlay-peers.XXXX)
NODES=$((PEERS + 1))

cleanup() {
    for pid in $(jobs -p); do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do ip netns del "$ns"; done
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

log() { printf '[peers %s] %s\n' "$(date +%T)" "$*" >&2; }

ip netns add "$P-sw"
ip -n "$P-sw" link add br0 type bridge
ip -n "$P-sw" link set br0 up
attach() { # name index
    ip netns add "$P-$1"
    ip -n "$P-$1" link set lo up
    ip link add "$P$2" type veth peer name eth0 netns "$P-$1"
    ip link set "$P$2" netns "$P-sw"
    ip -n "$P-sw" link set "$P$2" master br0 up
    ip -n "$P-$1" addr add "10.98.$(($2 / 250)).$(($2 % 250 + 1))/16" dev eth0
    ip -n "$P-$1" link set eth0 up
}
attach c 0
COORD=10.98.0.1
ip netns exec "$P-c" "$BIN/overlay-coord" serve --listen $COORD:8080 --state-dir "$WORK/coord" \
    --public-addr $COORD --allow-http >"$WORK/coord.log" 2>&1 &
for _ in $(seq 100); do
    ip netns exec "$P-c" bash -c "echo > /dev/tcp/$COORD/8080" 2>/dev/null && break
    sleep 0.1
done
KEY=$("$BIN/overlay-coord" keys create --reusable --state-dir "$WORK/coord" 2>/dev/null)

log "starting $NODES nodes"
# The memory of every path up: laziness off (with it, new peers start idle
# and hold no ICE session until traffic; tests/bench/idle.sh measures that).
for i in $(seq 0 $PEERS); do
    attach "n$i" $((i + 1))
    ip netns exec "$P-n$i" "$BIN/overlayd" up --coordinator "http://$COORD:8080" --auth-key "$KEY" \
        --hostname "n$i" --state-dir "$WORK/n$i" --interface ovl0 --socket "$WORK/n$i.sock" \
        --idle-timeout 0 >"$WORK/n$i.log" 2>&1 &
done

ctl() { "$BIN/overlayctl" --socket "$WORK/n0.sock" "$@"; }
direct_count() {
    ctl peers --json 2>/dev/null |
        python3 -c 'import json,sys; print(sum(p["path_kind"]=="direct" for p in json.load(sys.stdin)))' 2>/dev/null ||
        echo 0
}
deadline=$((SECONDS + TIMEOUT))
until [[ $(direct_count) -eq $PEERS ]]; do
    if ((SECONDS > deadline)); then
        log "only $(direct_count) of $PEERS peers direct after ${TIMEOUT}s"
        exit 1
    fi
    sleep 0.5
done
pid=$(pgrep -f -- "--socket $WORK/n0.sock")
rss() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$pid/status"; }
idle=$(rss)
for ip in $(ctl peers --json | python3 -c 'import json,sys; print(" ".join(p["mesh_ip"] for p in json.load(sys.stdin)))'); do
    ip netns exec "$P-n0" ping -q -c 20 -i 0.01 "$ip" >/dev/null
done
after=$(rss)
printf 'overlayd with %d peers, all direct: VmRSS %s MiB idle, %s MiB after pinging each (target: under 30 MB)\n' \
    "$PEERS" "$idle" "$after"

#!/usr/bin/env bash
# Coordination-server benchmark: overlay-coord on loopback with N control
# sessions held open by coord-load, for N = 1000 then 10000 (COORD_NODES).
#
# Environment:
#   COORD_NODES="1000 10000"   session counts, one server per count; empty
#                              skips the single-server case
#   OVERLAY_BIN_DIR=DIR        overlay-coord and coord-load from DIR instead of
#                              building them (release)
#   COORD_MAX_RSS_MIB=4096     stop a run once the server's VmRSS passes this
#   COORD_MAX_VM_MIB=8192      address-space cap (ulimit -v) of the server
#   COORD_LOAD_ARGS="..."      more coord-load flags, e.g. "--batch 10000
#                              --concurrency 256" for a reconnect storm
#   BENCH_KEEP=1               keep the work directory (server logs)
#   COORD_POLICY_NODES=10000   nodes of the access-policy case (policy-bench:
#                              100 rules over 20 tags; set, change, retag, clear
#                              must each take <= 1 s); 0 skips it
#   COORD_REPLICA_NODES=20000  the replica case (issue #14): two overlay-coord
#                              replicas on one throwaway PostgreSQL and one
#                              nats-server, half the sessions on each; the join
#                              seen by all, each replica's memory, then SIGKILL
#                              of the second and the time until its sessions
#                              have their netmap from the first (resumed, as
#                              overlayd does, when it is current); capped at
#                              what fits one process's open-file limit (the
#                              survivor holds every session); 0 skips it

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
NODES=${COORD_NODES-1000 10000}
COORD_MAX_RSS_MIB=${COORD_MAX_RSS_MIB:-4096}
COORD_MAX_VM_MIB=${COORD_MAX_VM_MIB:-8192}
WORK=$(mktemp -d /tmp/overlay-coord-bench.XXXX)
SERVER_PID=""
REPLICA_PIDS=()
NATS_PID=""
PG_DIR=""
PG_BIN=""

log() { printf '[coord-bench %s] %s\n' "$(date +%T)" "$*" >&2; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_server
    stop_replicas
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}

stop_replicas() {
    local pid
    for pid in "${REPLICA_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${REPLICA_PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    REPLICA_PIDS=()
    if [[ -n $NATS_PID ]]; then
        kill -TERM "$NATS_PID" 2>/dev/null || true
        wait "$NATS_PID" 2>/dev/null || true
        NATS_PID=""
    fi
    if [[ -n $PG_DIR && -d $PG_DIR/data ]]; then
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
    fi
}

stop_server() {
    [[ -n $SERVER_PID ]] || return 0
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 10 000 sessions are 10 000 sockets on each side, plus the registrations.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log "open-file limit $(ulimit -n)"

if [[ -n ${OVERLAY_BIN_DIR:-} ]]; then
    BIN=$OVERLAY_BIN_DIR
else
    log "building overlay-coord and coord-load (release)"
    (cd "$ROOT" && cargo build --release -j2 -p overlay-coord -p overlay-coord-load) >"$WORK/cargo.log" 2>&1 ||
        { tail -20 "$WORK/cargo.log" >&2; exit 1; }
    BIN=$ROOT/target/release
fi

# A free loopback port: bind to port 0 and read what the kernel chose.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

summary=()
for n in $NODES; do
    state=$WORK/state-$n
    mkdir -p "$state"
    port=$(free_port)
    stun_port=$(free_port)
    # The server logs every registration and session at info; at 10 000 nodes
    # that is the benchmark measuring its logger, so warn and above only.
    # Two guards against a server that grows without bound on this shared
    # machine: coord-load stops at --max-server-rss-mib (COORD_MAX_RSS_MIB), and
    # the server's address space is capped well below the machine's memory.
    (ulimit -v $((COORD_MAX_VM_MIB * 1024)) &&
        RUST_LOG=${RUST_LOG:-warn} exec "$BIN/overlay-coord" serve --listen "127.0.0.1:$port" --allow-http \
        --public-addr 127.0.0.1 --stun-port "$stun_port" --max-sessions 20000 --state-dir "$state" \
        >"$WORK/server-$n.log" 2>&1) &
    SERVER_PID=$!
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        kill -0 "$SERVER_PID" 2>/dev/null || { tail -5 "$WORK/server-$n.log" >&2; exit 1; }
        sleep 0.1
    done
    key=$("$BIN/overlay-coord" keys create --reusable --state-dir "$state")
    log "N=$n: server pid $SERVER_PID on 127.0.0.1:$port"
    # --sources: the server takes at most 4,096 connections from one address
    # (conns_per_ip), so the sessions come from 127.0.0.1 to 127.0.0.16.
    if COORD_LOAD_AUTH_KEY=$key "$BIN/coord-load" --server "127.0.0.1:$port" --nodes "$n" --sources 16 \
        --server-pid "$SERVER_PID" --max-server-rss-mib "$COORD_MAX_RSS_MIB" ${COORD_LOAD_ARGS:-} | tee "$WORK/load-$n.txt"; then
        :
    else
        log "N=$n: coord-load failed; server log tail:"
        tail -5 "$WORK/server-$n.log" >&2
    fi
    summary+=("$(grep '^RESULT' "$WORK/load-$n.txt" || echo "RESULT nodes=$n failed=1")")
    stop_server
done

if ((${#summary[@]})); then
    echo
    printf '%s\n' "${summary[@]}" | python3 "$HERE/bench.py" coord-report
fi

# Replicas (issue #14): two overlay-coord on one PostgreSQL and one NATS.
replica_nodes=${COORD_REPLICA_NODES:-20000}
# After the kill one replica holds every session, and coord-load holds them
# all throughout: each needs a descriptor per session and a few hundred of
# its own, within one process's open-file limit. Where the hard limit is
# below that (20,000 on the machine the README's figures come from, not
# raisable without CAP_SYS_RESOURCE), run the largest even count that fits
# and say so; splitting coord-load into several processes would not help,
# since the surviving replica is one process.
fd_room=$(( ($(ulimit -n) - 200) / 2 * 2 ))
if (( replica_nodes > fd_room )); then
    log "replicas: $replica_nodes sessions do not fit one process's open-file limit ($(ulimit -n)); running $fd_room"
    replica_nodes=$fd_room
fi
if [[ $replica_nodes != 0 ]]; then
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    if [[ -z $PG_BIN ]] || ! command -v nats-server >/dev/null; then
        log "replicas: skipped (needs Debian's postgresql and nats-server packages)"
    else
        PG_DIR=$WORK/pg
        # PostgreSQL runs as its own user, which must reach its directory.
        chmod 711 "$WORK"
        mkdir -p "$PG_DIR" && chown postgres: "$PG_DIR"
        runuser -u postgres -- "$PG_BIN/initdb" -D "$PG_DIR/data" --auth=trust -U postgres -E UTF8 \
            --locale=C --no-sync --no-instructions >"$WORK/initdb.log" 2>&1 ||
            { tail -5 "$WORK/initdb.log" >&2; exit 1; }
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
            -o "-k $PG_DIR -c listen_addresses='' -c fsync=off -c synchronous_commit=off -c max_connections=200" \
            start >/dev/null || { tail -5 "$PG_DIR/server.log" >&2; exit 1; }
        "$PG_BIN/createdb" -h "$PG_DIR" -U postgres overlay
        database="host=$PG_DIR user=postgres dbname=overlay"
        nats_port=$(free_port)
        nats-server --addr 127.0.0.1 --port "$nats_port" >"$WORK/nats.log" 2>&1 &
        NATS_PID=$!
        servers=() pids=()
        for r in 0 1; do
            port=$(free_port)
            stun_port=$(free_port)
            mkdir -p "$WORK/replica-$r"
            (ulimit -v $((COORD_MAX_VM_MIB * 1024)) &&
                RUST_LOG=${RUST_LOG:-warn} exec "$BIN/overlay-coord" serve --listen "127.0.0.1:$port" --allow-http \
                --public-addr 127.0.0.1 --stun-port "$stun_port" --max-sessions 30000 \
                --state-dir "$WORK/replica-$r" --database "$database" --bus "nats://127.0.0.1:$nats_port" \
                >"$WORK/replica-$r.log" 2>&1) &
            REPLICA_PIDS+=($!)
            pids+=($!)
            servers+=("127.0.0.1:$port")
            for _ in $(seq 100); do
                (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
                kill -0 "${pids[$r]}" 2>/dev/null || { tail -5 "$WORK/replica-$r.log" >&2; exit 1; }
                sleep 0.1
            done
        done
        key=$("$BIN/overlay-coord" keys create --reusable --database "$database")
        log "replicas: ${servers[*]} (pids ${pids[*]}) on PostgreSQL $PG_DIR and NATS :$nats_port"
        if COORD_LOAD_AUTH_KEY=$key "$BIN/coord-load" --server "$(IFS=,; echo "${servers[*]}")" \
            --nodes "$replica_nodes" --sources 16 --server-pid "$(IFS=,; echo "${pids[*]}")" \
            --max-server-rss-mib "$COORD_MAX_RSS_MIB" --kill-replica 1 ${COORD_LOAD_ARGS:-} |
            tee "$WORK/load-replicas.txt"; then
            :
        else
            log "replicas: coord-load failed; replica log tails:"
            tail -n 3 "$WORK"/replica-*.log >&2
        fi
        echo
        grep '^RESULT' "$WORK/load-replicas.txt" | python3 "$HERE/bench.py" replica-report ||
            log "replicas: no result"
        stop_replicas
    fi
fi

# Access policy (issue #10): recompute and per-node deltas after a change.
policy_nodes=${COORD_POLICY_NODES:-10000}
if [[ $policy_nodes != 0 ]]; then
    log "access policy: $policy_nodes nodes, 100 rules, 20 tags"
    "$BIN/policy-bench" --nodes "$policy_nodes" --rules 100 --tags 20 | tee "$WORK/policy.txt"
    grep -q 'ok=true' "$WORK/policy.txt" || { log "policy recompute over budget"; exit 1; }
fi

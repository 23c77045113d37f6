#!/usr/bin/env bash
# Idle cost of overlayd (issue #13): what a node burns when nobody sends.
#
# 1. For each N in BENCH_IDLE_NODES: a coordinator and N nodes on one LAN
#    (network namespaces on one bridge), `overlayd up --idle-timeout 10`. Every
#    node pings every other node once (`overlayctl ping -c 1`), then the script
#    waits until every node shows every peer `idle` and measures each overlayd
#    over 30 s: utime+stime from /proc/PID/stat (% of one core) and VmRSS.
#    The same with `--idle-timeout 0` (laziness off, every path kept up) for
#    each N in BENCH_IDLE_EAGER_NODES, after every node has every peer direct.
# 2. One real overlayd (`--idle-timeout 10`) whose netmap holds
#    BENCH_IDLE_SIM_PEERS online peers that never send: `coord-load --hold`
#    keeps that many simulated control sessions open. The script follows what
#    overlayd does with them (paths, ICE sessions started, signals the
#    simulated peers receive) until every peer is idle, then measures it the
#    same way.
#
#   sudo tests/bench/idle.sh
#   sudo BENCH_IDLE_NODES="10 25 40" BENCH_IDLE_SIM_PEERS=0 tests/bench/idle.sh
#
# Binaries from $OVERLAY_BIN_DIR, else a release build. Everything it creates
# is removed on exit, also on failure or Ctrl-C (BENCH_KEEP=1 keeps the logs).
set -euo pipefail
cd "$(dirname "$0")/../.."

NODES_LIST=${BENCH_IDLE_NODES-10 25}
EAGER_LIST=${BENCH_IDLE_EAGER_NODES-10}
SIM_PEERS=${BENCH_IDLE_SIM_PEERS:-1000}
SIM_EAGER=${BENCH_IDLE_SIM_EAGER:-0}
IDLE_TIMEOUT=${BENCH_IDLE_TIMEOUT:-10}
SECS=${BENCH_IDLE_SECS:-30}
TIMEOUT=${BENCH_START_TIMEOUT:-180}
if [[ -z ${OVERLAY_BIN_DIR:-} ]]; then
    cargo build --release -j2 -p overlayd -p overlay-coord -p overlayctl -p overlay-coord-load >&2
    OVERLAY_BIN_DIR=target/release
fi
BIN=$(cd "$OVERLAY_BIN_DIR" && pwd)
for b in overlayd overlay-coord overlayctl coord-load; do
    [[ -x $BIN/$b ]] || { echo "idle.sh: $BIN/$b missing" >&2; exit 1; }
done
P=bi$(printf '%04x' $((RANDOM % 65536)))
WORK=$(mktemp -d /tmp/overlay-idle.XXXX)
COORD=10.98.0.1
PIDS=()

log() { printf '[idle %s] %s\n' "$(date +%T)" "$*" >&2; }

stop_all() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_all
    for pid in $(jobs -p); do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in $(ip netns list | awk '{print $1}' | grep "^$P-" || true); do ip netns del "$ns"; done
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1,000 control sessions need more than the default 1,024 descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cat >"$WORK/helper.py" <<'PY'
import json, os, subprocess, sys, threading, time

BIN = os.environ["BIN"]
TCK = os.sysconf("SC_CLK_TCK")


def peers(sock):
    out = subprocess.run([f"{BIN}/overlayctl", "--socket", sock, "peers", "--json"],
                         capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout) if out.returncode == 0 else []


def kinds(sock):
    counts = {}
    for p in peers(sock):
        counts[p["path_kind"]] = counts.get(p["path_kind"], 0) + 1
    return counts


def metric(sock, name):
    out = subprocess.run([f"{BIN}/overlayctl", "--socket", sock, "metrics"],
                         capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return -1


def wait(kind, need, deadline, socks):
    """Until every node has `need` peers of `kind` ("any": in its netmap)."""
    start = time.monotonic()
    last_log = start
    while True:
        counts = [kinds(s) for s in socks]
        have = [sum(c.values()) if kind == "any" else c.get(kind, 0) for c in counts]
        if min(have) >= need:
            print(f"{time.monotonic() - start:.1f}")
            return 0
        now = time.monotonic()
        if now - start > deadline:
            print(f"timeout: nodes with {need} peers {kind}: {sum(h >= need for h in have)}/{len(socks)};"
                  f" worst {min(have)}; paths {counts[have.index(min(have))]}", file=sys.stderr)
            return 1
        if now - last_log > 10:
            print(f"  waiting for {kind}: {sum(h >= need for h in have)}/{len(socks)} nodes done,"
                  f" worst {min(have)}/{need}", file=sys.stderr)
            last_log = now
        time.sleep(1)


def pingall(socks):
    """Every node pings every peer in its netmap once; nodes in parallel."""
    sent, failed = [0], []
    lock = threading.Lock()

    def node(sock):
        for p in peers(sock):
            r = subprocess.run([f"{BIN}/overlayctl", "--socket", sock, "ping", "-c", "1", "-W", "3",
                                p["mesh_ip"]], capture_output=True, text=True)
            with lock:
                sent[0] += 1
                if r.returncode != 0:
                    failed.append(f"{os.path.basename(sock)}->{p['name']}")
    threads = [threading.Thread(target=node, args=(s,)) for s in socks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{sent[0] - len(failed)}/{sent[0]}")
    if failed:
        print("  pings without a reply: " + " ".join(failed[:20]), file=sys.stderr)


def cpu(pid):
    """(utime+stime ticks, summed per-thread run time in ns) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                ns += int(f.read().split()[0])
        except OSError:
            pass
    return ticks, ns


def status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure(secs, pids):
    """% of one core per process over `secs` (stat ticks and schedstat), VmRSS."""
    t0, c0 = time.monotonic(), {p: cpu(p) for p in pids}
    time.sleep(secs)
    t1, c1 = time.monotonic(), {p: cpu(p) for p in pids}
    wall = t1 - t0
    pct = [100 * (c1[p][0] - c0[p][0]) / TCK / wall for p in pids]
    sched = [100 * (c1[p][1] - c0[p][1]) / 1e9 / wall for p in pids]
    rss = [status(p, "VmRSS") / 1024 for p in pids]
    hwm = [status(p, "VmHWM") / 1024 for p in pids]
    threads = [status(p, "Threads") for p in pids]
    fds = [len(os.listdir(f"/proc/{p}/fd")) for p in pids]
    n = len(pids)
    print(f"secs={wall:.1f} cpu_mean={sum(pct) / n:.3f} cpu_max={max(pct):.3f} "
          f"sched_mean={sum(sched) / n:.3f} sched_max={max(sched):.3f} "
          f"rss_mean={sum(rss) / n:.1f} rss_max={max(rss):.1f} hwm_max={max(hwm):.1f} "
          f"threads_max={max(threads)} fds_max={max(fds)} tick_pct={100 / TCK / wall:.3f}")


def follow(sock, need, deadline, out):
    """One node's paths and ICE attempts every second until `need` peers are idle."""
    start = time.monotonic()
    last = None
    with open(out, "w") as f:
        while True:
            t = time.monotonic() - start
            c = kinds(sock)
            row = (sorted(c.items()), metric(sock, "overlay_ice_attempts_total"),
                   metric(sock, "overlay_ice_failures_total"))
            if row != last:
                line = (f"t={t:5.1f}s peers={sum(c.values())} "
                        + " ".join(f"{k}={v}" for k, v in row[0])
                        + f" ice_attempts={row[1]} ice_failures={row[2]}")
                print(line, file=f, flush=True)
                print("  " + line, file=sys.stderr)
                last = row
            if sum(c.values()) >= need and c.get("idle", 0) >= need:
                print(f"{t:.1f}")
                return 0
            if t > deadline:
                print(f"timeout after {t:.0f} s", file=sys.stderr)
                return 1
            time.sleep(1)


def report(path):
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(dict(kv.split("=", 1) for kv in line.split()[1:]))
    print(f"\nidle cost: overlayd CPU over each node's measurement, utime+stime from /proc/PID/stat,"
          f" in % of one core (one clock tick = {rows[0].get('tick_pct', '?') if rows else '?'} %)")
    head = ("case", "N", "idle s", "pings ok", "settle s", "CPU mean %", "CPU max %",
            "sched mean %", "RSS mean MiB", "RSS max MiB", "peak MiB", "threads", "fds", "end paths")
    table = [head]
    for r in rows:
        table.append((r["case"], r["n"], r["timeout"], r.get("pings", "-"), r.get("settle", "-"),
                      r.get("cpu_mean", "-"), r.get("cpu_max", "-"), r.get("sched_mean", "-"),
                      r.get("rss_mean", "-"), r.get("rss_max", "-"), r.get("hwm_max", "-"),
                      r.get("threads_max", "-"), r.get("fds_max", "-"), r.get("end", "-")))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for r in rows:
        if "sim" in r["case"]:
            when = "by the time all were idle" if r["case"] == "sim-lazy" else f"in the first {r.get('settle', '-')} s"
            print(f"{r['case']} ({r['n']} simulated peers): ICE sessions started {r.get('ice_attempts', '-')}"
                  f" ({r.get('ice_failures', '-')} failed) {when},"
                  f" {r.get('ice_attempts_end', '-')} at the end; signals the simulated peers read:"
                  f" {r.get('signals', '-')} to {r.get('signaled', '-')} peers")


cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "wait":
    sys.exit(wait(args[0], int(args[1]), float(args[2]), args[3:]))
elif cmd == "pingall":
    pingall(args)
elif cmd == "measure":
    measure(float(args[0]), [int(p) for p in args[1:]])
elif cmd == "follow":
    sys.exit(follow(args[0], int(args[1]), float(args[2]), args[3]))
elif cmd == "kinds":
    c = kinds(args[0])
    print(",".join(f"{k}:{v}" for k, v in sorted(c.items())) or "none")
elif cmd == "metric":
    print(metric(args[0], args[1]))
elif cmd == "report":
    report(args[0])
PY
helper() { BIN=$BIN python3 "$WORK/helper.py" "$@"; }

ip netns add "$P-sw"
ip -n "$P-sw" link set lo up
ip -n "$P-sw" link add br0 type bridge
ip -n "$P-sw" link set br0 up
ATTACHED=0
attach() { # name index
    ip netns add "$P-$1"
    ip -n "$P-$1" link set lo up
    ip link add "$P$2" type veth peer name eth0 netns "$P-$1"
    ip link set "$P$2" netns "$P-sw"
    ip -n "$P-sw" link set "$P$2" master br0 up
    ip -n "$P-$1" addr add "10.98.$(($2 / 250)).$(($2 % 250 + 1))/16" dev eth0
    ip -n "$P-$1" link set eth0 up
}
attach_nodes() { # count: namespaces n0..n(count-1), created once
    while ((ATTACHED < $1)); do
        attach "n$ATTACHED" $((ATTACHED + 1))
        ATTACHED=$((ATTACHED + 1))
    done
}
attach c 0

CASE=0
start_coord() { # fresh state per case; sets KEY and COORD_PID
    CASE=$((CASE + 1))
    CDIR=$WORK/case$CASE
    mkdir -p "$CDIR"
    RUST_LOG=${COORD_LOG:-warn} ip netns exec "$P-c" "$BIN/overlay-coord" serve --listen $COORD:8080 \
        --state-dir "$CDIR/coord" --public-addr $COORD --allow-http >"$CDIR/coord.log" 2>&1 &
    COORD_PID=$!
    PIDS+=("$COORD_PID")
    for _ in $(seq 100); do
        ip netns exec "$P-c" bash -c "echo > /dev/tcp/$COORD/8080" 2>/dev/null && break
        kill -0 "$COORD_PID" 2>/dev/null || { tail -5 "$CDIR/coord.log" >&2; exit 1; }
        sleep 0.1
    done
    KEY=$("$BIN/overlay-coord" keys create --reusable --state-dir "$CDIR/coord" 2>/dev/null)
}

start_nodes() { # count idle_timeout; sets NODE_PIDS and SOCKS
    NODE_PIDS=()
    SOCKS=()
    local i
    for i in $(seq 0 $(($1 - 1))); do
        RUST_LOG=${NODE_LOG:-info} ip netns exec "$P-n$i" "$BIN/overlayd" up --coordinator "http://$COORD:8080" \
            --auth-key "$KEY" --hostname "n$i" --state-dir "$CDIR/n$i" --interface ovl0 \
            --socket "$CDIR/n$i.sock" --idle-timeout "$2" >"$CDIR/n$i.log" 2>&1 &
        NODE_PIDS+=("$!")
        PIDS+=("$!")
        SOCKS+=("$CDIR/n$i.sock")
    done
}

RESULTS=$WORK/results.txt
: >"$RESULTS"

# A mesh of N real nodes; lazy (idle timeout) or eager (--idle-timeout 0).
mesh_case() { # n mode
    local n=$1 mode=$2 timeout=0 settle pings res end
    [[ $mode == lazy ]] && timeout=$IDLE_TIMEOUT
    log "$mode N=$n: starting a coordinator and $n nodes (--idle-timeout $timeout)"
    attach_nodes "$n"
    start_coord
    start_nodes "$n" "$timeout"
    helper wait any $((n - 1)) "$TIMEOUT" "${SOCKS[@]}" >/dev/null ||
        { log "$mode N=$n: netmaps incomplete"; stop_all; echo "RESULT case=$mode n=$n timeout=$timeout end=netmap_timeout" >>"$RESULTS"; return; }
    if [[ $mode == eager ]]; then
        settle=$(helper wait direct $((n - 1)) "$TIMEOUT" "${SOCKS[@]}") ||
            { log "$mode N=$n: not all direct"; settle=timeout; }
        log "$mode N=$n: every pair direct after ${settle}s (from the netmaps)"
    fi
    log "$mode N=$n: every node pings every peer once"
    pings=$(helper pingall "${SOCKS[@]}")
    log "$mode N=$n: $pings pings answered"
    if [[ $mode == lazy ]]; then
        settle=$(helper wait idle $((n - 1)) "$TIMEOUT" "${SOCKS[@]}") ||
            { log "$mode N=$n: not all idle within ${TIMEOUT}s"; settle=timeout; }
        log "$mode N=$n: every node has every peer idle ${settle}s after the last ping"
    else
        sleep 5
    fi
    log "$mode N=$n: measuring ${SECS}s"
    res=$(helper measure "$SECS" "${NODE_PIDS[@]}")
    # Paths after the measurement: did anything wake up (lazy) or drop (eager)?
    end=$(for s in "${SOCKS[@]}"; do helper kinds "$s"; done | sort | uniq -c | awk '{printf "%s%sx%s", sep, $1, $2; sep="/"}')
    echo "RESULT case=$mode n=$n timeout=$timeout pings=$pings settle=$settle $res end=$end" | tee -a "$RESULTS" >&2
    stop_all
}

# One real overlayd and SIM_PEERS simulated peers that never send.
sim_case() { # peers mode
    local n=$1 mode=$2 timeout=0 hold settle res end load_pid node_pid sock
    [[ $mode == sim-lazy ]] && timeout=$IDLE_TIMEOUT
    attach_nodes 1
    start_coord
    hold=$((TIMEOUT + SECS + 120))
    log "$mode: coord-load connects $n simulated peers and holds them ${hold}s at most"
    COORD_LOAD_AUTH_KEY=$KEY ip netns exec "$P-c" "$BIN/coord-load" --server $COORD:8080 --nodes "$n" \
        --server-pid "$COORD_PID" --hostname-prefix sim --hold "$hold" >"$CDIR/load.log" 2>&1 &
    load_pid=$!
    PIDS+=("$load_pid")
    local deadline=$((SECONDS + TIMEOUT))
    until grep -q '^HOLDING' "$CDIR/load.log"; do
        if ! kill -0 "$load_pid" 2>/dev/null || ((SECONDS > deadline)); then
            log "$mode: coord-load did not get its sessions up"; tail -5 "$CDIR/load.log" >&2
            stop_all; echo "RESULT case=$mode n=$n timeout=$timeout end=coord_load_failed" >>"$RESULTS"; return
        fi
        sleep 0.5
    done
    grep -E 'register|connect' "$CDIR/load.log" | sed 's/^/  /' >&2
    log "$mode: starting overlayd (--idle-timeout $timeout) into a mesh of $n online peers"
    start_nodes 1 "$timeout"
    node_pid=${NODE_PIDS[0]}
    sock=${SOCKS[0]}
    helper wait any "$n" "$TIMEOUT" "$sock" >/dev/null || log "$mode: netmap incomplete"
    if [[ $mode == sim-lazy ]]; then
        settle=$(helper follow "$sock" "$n" "$TIMEOUT" "$CDIR/follow.txt") ||
            { log "$mode: not all idle within ${TIMEOUT}s"; settle=timeout; }
    else
        # No laziness: ICE keeps retrying; give it a minute to reach its backoff.
        helper follow "$sock" "$((n + 1))" 60 "$CDIR/follow.txt" >/dev/null || true
        settle=60
    fi
    local attempts failures signals signaled
    attempts=$(helper metric "$sock" overlay_ice_attempts_total)
    failures=$(helper metric "$sock" overlay_ice_failures_total)
    log "$mode: settled after ${settle}s; $attempts ICE sessions started, $failures failed; measuring ${SECS}s"
    res=$(helper measure "$SECS" "$node_pid")
    end=$(helper kinds "$sock")
    local attempts_end
    attempts_end=$(helper metric "$sock" overlay_ice_attempts_total)
    sleep 1.5 # one more coord-load line
    read -r signals signaled < <(grep '^hold' "$CDIR/load.log" | tail -1 |
        sed -E 's/.*signals=([0-9]+) signaled_sessions=([0-9]+).*/\1 \2/') || true
    echo "RESULT case=$mode n=$n timeout=$timeout settle=$settle $res end=$end ice_attempts=$attempts ice_failures=$failures ice_attempts_end=$attempts_end signals=${signals:--} signaled=${signaled:--}" |
        tee -a "$RESULTS" >&2
    log "$mode: overlayd's log: $(grep -c . "$CDIR/n0.log") lines, $(grep -ci 'warn' "$CDIR/n0.log" || true) warnings"
    grep -i warn "$CDIR/n0.log" | sed -E 's/^[^ ]+ +//' | sort | uniq -c | sort -rn | head -5 | sed 's/^/  /' >&2 || true
    stop_all
}

for n in $NODES_LIST; do mesh_case "$n" lazy; done
for n in $EAGER_LIST; do mesh_case "$n" eager; done
if ((SIM_PEERS > 0)); then
    sim_case "$SIM_PEERS" sim-lazy
    [[ $SIM_EAGER == 1 ]] && sim_case "$SIM_PEERS" sim-eager
fi
helper report "$RESULTS"

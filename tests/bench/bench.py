#!/usr/bin/env python3
"""Helpers for tests/bench/run.sh: parse iperf3 and ping output, snapshot CPU
counters, and print the comparison table.

Every subcommand prints plain `key value` lines (or the table) on stdout so the
shell script never has to parse JSON itself.
"""

import json
import os
import re
import sys

CLK_TCK = os.sysconf("SC_CLK_TCK")


def iperf(path):
    """`bps <receiver bits/s> bytes <bytes received>` from `iperf3 --json`."""
    with open(path) as f:
        doc = json.load(f)
    if "error" in doc:
        sys.exit(f"iperf3: {doc['error']}")
    received = doc["end"]["sum_received"]
    print(f"bps {received['bits_per_second']:.0f}")
    print(f"bytes {received['bytes']}")


def percentile(sorted_values, q):
    """Nearest-rank percentile: the smallest value with at least q% at or below it."""
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def ping(path):
    """Median and p99 of the per-reply `time=` fields of iputils ping output."""
    times = []
    with open(path) as f:
        for line in f:
            m = re.search(r"time=([0-9.]+) ms", line)
            if m:
                times.append(float(m.group(1)))
    if not times:
        sys.exit("ping: no replies")
    times.sort()
    print(f"p50 {percentile(times, 50):.3f}")
    print(f"p99 {percentile(times, 99):.3f}")
    print(f"replies {len(times)}")


def proc_ticks(pid):
    """(utime, stime) of a process in clock ticks; fields 14 and 15 of
    /proc/PID/stat, counted after the `)` that ends the command name."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0, 0
    return int(fields[11]), int(fields[12])


def cpu(pids):
    """One snapshot: daemon user and system ticks (summed over `pids`) and the
    whole machine's kernel ticks (system + irq + softirq over all CPUs)."""
    user = system = 0
    for pid in pids:
        u, s = proc_ticks(pid)
        user += u
        system += s
    with open("/proc/stat") as f:
        fields = f.readline().split()
    # cpu user nice system idle iowait irq softirq steal ...
    kernel = int(fields[3]) + int(fields[6]) + int(fields[7])
    print(f"{user} {system} {kernel}")


def load(path):
    results, notes = {}, []
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            system, key, value = line.split(" ", 2)
            if key == "note":
                notes.append((system, value))
            else:
                results.setdefault(system, {})[key] = value
    return results, notes


def fnum(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def derived(r):
    """Adds the per-GB CPU figures and MiB figures computed from raw counters."""
    out = dict(r)
    gb = fnum(r.get("bytes_total"))
    if gb:
        gb /= 1e9
        for key, ticks in (
            ("cpu_daemon", fnum(r.get("daemon_user_ticks", 0)) + fnum(r.get("daemon_sys_ticks", 0))),
            ("cpu_kernel", fnum(r.get("kernel_ticks"))),
            ("cpu_total", fnum(r.get("daemon_user_ticks", 0)) + fnum(r.get("kernel_ticks"))),
        ):
            if ticks is not None:
                out[key] = ticks / CLK_TCK / gb
        if "daemon_user_ticks" not in r:
            out.pop("cpu_daemon", None)
    for key in ("rss_idle_kb", "rss_load_kb"):
        if fnum(r.get(key)) is not None:
            out[key.replace("_kb", "_mib")] = fnum(r[key]) / 1024
    for key in ("tcp1_fwd", "tcp1_rev", "tcp4_fwd", "tcp4_rev"):
        if fnum(r.get(key + "_bps")) is not None:
            out[key] = fnum(r[key + "_bps"]) / 1e6
    return out


ROWS = [
    # key, label, format
    ("tcp1_fwd", "TCP 1 stream  a->b   Mbit/s", "{:.0f}"),
    ("tcp1_rev", "TCP 1 stream  b->a   Mbit/s", "{:.0f}"),
    ("tcp4_fwd", "TCP 4 streams a->b   Mbit/s", "{:.0f}"),
    ("tcp4_rev", "TCP 4 streams b->a   Mbit/s", "{:.0f}"),
    ("rtt_p50", "ping RTT median      ms", "{:.3f}"),
    ("rtt_p99", "ping RTT p99         ms", "{:.3f}"),
    ("ping_replies", "ping replies / sent", None),
    ("rtt_load_p50", "ping RTT under load median ms", "{:.3f}"),
    ("rtt_load_p99", "ping RTT under load p99    ms", "{:.3f}"),
    ("ping_load_replies", "ping under load replies / sent", None),
    ("cpu_daemon", "CPU s/GB daemons (u+s)", "{:.2f}"),
    ("cpu_kernel", "CPU s/GB kernel (machine)", "{:.2f}"),
    ("cpu_total", "CPU s/GB total", "{:.2f}"),
    ("rss_idle_mib", "daemon VmRSS idle   MiB", "{:.1f}"),
    ("rss_load_mib", "daemon VmRSS load   MiB", "{:.1f}"),
    ("start_ping_s", "start -> first ping   s", "{:.2f}"),
    ("start_direct_s", "start -> direct path  s", "{:.2f}"),
    ("mtu", "tunnel MTU", None),
]

SYSTEMS = [("raw", "raw veth"), ("wg", "wireguard-go"), ("gota", "gotatun"), ("overlay", "overlay"),
           ("overlay6", "overlay IPv6"), ("overlay_policy", "overlay+policy"), ("relay", "overlay relay")]


def cell(r, key, fmt):
    value = r.get(key)
    if value is None:
        return "-"
    if fmt is None:
        return str(value)
    v = fnum(value)
    return fmt.format(v) if v is not None else str(value)


def ratio(a, b):
    a, b = fnum(a), fnum(b)
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def report(path):
    results, notes = load(path)
    d = {name: derived(results.get(name, {})) for name, _ in SYSTEMS}
    meta = results.get("meta", {})
    head = ["", *[label for _, label in SYSTEMS], "ovl/raw", "ovl/wg", "ovl/gota", "pol/ovl", "v6/v4"]
    lines = []
    for key, label, fmt in ROWS:
        row = [label, *[cell(d[name], key, fmt) for name, _ in SYSTEMS]]
        if fmt is not None:
            row += [ratio(d["overlay"].get(key), d["raw"].get(key)),
                    ratio(d["overlay"].get(key), d["wg"].get(key)),
                    ratio(d["overlay"].get(key), d["gota"].get(key)),
                    ratio(d["overlay_policy"].get(key), d["overlay"].get(key)),
                    ratio(d["overlay6"].get(key), d["overlay"].get(key))]
        else:
            row += ["", "", "", "", ""]
        lines.append(row)
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]

    def fmt_row(row):
        first = str(row[0]).ljust(widths[0])
        rest = [str(c).rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join([first, *rest])

    rule = "-" * len(fmt_row(head))
    print(rule)
    print(f"overlay benchmark: {meta.get('mode', '?')}, iperf3 {meta.get('secs', '?')} s per run, "
          f"{meta.get('pings', '?')} pings at 10 ms, {meta.get('cores', '?')} cores, "
          f"kernel {meta.get('kernel', '?')}")
    print(rule)
    print(fmt_row(head))
    print(rule)
    for row in lines:
        print(fmt_row(row))
    print(rule)
    print(
        "a->b: iperf3 client in host a sends to the server in host b; b->a: the same with -R.\n"
        "Mbit/s: receiver side, iperf3 --json end.sum_received. Ratios are overlay / other\n"
        "(above 1 is better for throughput, worse for RTT, CPU, memory and start times).\n"
        "overlay+policy: the same two daemons right after, with a 100-rule access policy in\n"
        "force (every rule names both nodes; tests/bench/run.sh policy_100); pol/ovl is its\n"
        "ratio to the overlay column of the same run.\n"
        "overlay IPv6: the same two daemons, to b's mesh IPv6 address (ping -6, iperf3 -6; the\n"
        "underlay is the same IPv4 veth); v6/v4 is its ratio to the overlay column of the run.\n"
        "overlay relay: the same two nodes with UDP between the hosts dropped (nftables in b),\n"
        "so every packet crosses the coordinator's relay over both control WebSockets (TCP);\n"
        "its daemons' CPU includes the coordinator's. Under load: pings every 10 ms while one\n"
        "TCP stream a->b runs (the queues TCP over TCP fills).\n"
        "CPU s/GB over all four iperf3 runs, divided by the bytes they moved (1 GB = 1e9 B):\n"
        "  daemons (u+s) = utime+stime of the tunnel daemons (/proc/PID/stat; both hosts'\n"
        "                  wireguard-go, gotatun or overlayd; the coordinator is not counted);\n"
        "  kernel        = system+irq+softirq of the whole machine (/proc/stat, all CPUs),\n"
        "                  so it includes iperf3's TCP stack work and any other load on the box;\n"
        "  total         = daemons' utime + kernel (the daemons' stime is already in kernel).\n"
        "VmRSS: the larger of the two daemons; idle = tunnel up, no traffic; load = peak\n"
        "sampled every 0.2 s during the iperf3 runs.\n"
        "start -> first ping: from launching both overlayd (fresh state: enrolment included;\n"
        "coordinator already up) to the first ICMP echo a->b answered across the mesh (pings\n"
        "every 10 ms); start -> direct path: until both daemons report path_kind == \"direct\"\n"
        "in `overlayctl peers --json` (polled every 50 ms)."
    )
    dns = results.get("dns", {})
    if dns.get("answered"):
        print(f"mesh resolver: {dns.get('sent')} A queries from node a (32 in flight, UDP): "
              f"{dns.get('answered')} answered ({dns.get('errors')} errors), {dns.get('qps')} queries/s, "
              f"latency p50 {dns.get('p50_ms')} ms, p99 {dns.get('p99_ms')} ms, max {dns.get('max_ms')} ms")
    for system, note in notes:
        print(f"note [{system}]: {note}")


def coord_report():
    """The table of tests/bench/coord.sh from coord-load's RESULT lines on stdin."""
    rows = [dict(kv.split("=", 1) for kv in line.split()[1:]) for line in sys.stdin if line.strip()]

    def mib(kb):
        return f"{int(kb) / 1024:.1f}" if kb not in (None, "-") else "-"

    cols = [
        ("sessions", lambda r: r["nodes"]),
        ("register/s", lambda r: f"{int(r['nodes']) / max(float(r['register_s']), 1e-9):.0f}"),
        ("connect s", lambda r: r["connect_s"]),
        ("upsert p50 ms", lambda r: r["online_p50_ms"]),
        ("p99 ms", lambda r: r["online_p99_ms"]),
        ("max ms", lambda r: r["online_max_ms"]),
        ("reached", lambda r: f"{r['online_n']}/{r['nodes']}"),
        ("reg->upsert p50/p99 ms", lambda r: f"{r['reg_p50_ms']}/{r['reg_p99_ms']}"),
        ("RSS MiB", lambda r: mib(r.get("rss_loaded_kb"))),
        ("peak MiB", lambda r: mib(r.get("hwm_kb"))),
        ("Welcome B", lambda r: r["welcome_bytes"]),
    ]
    table = [[name for name, _ in cols]]
    for r in rows:
        if "failed" in r:
            detail = r["failed"]
            if "connected" in r:
                detail += f" with {r['connected']} sessions connected"
            if "rss_kb" in r:
                detail += f", server VmRSS {int(r['rss_kb']) / 1024:.0f} MiB"
            table.append([r.get("nodes", "?"), "FAILED: " + detail] + [""] * (len(cols) - 2))
        else:
            table.append([get(r) for _, get in cols])
    widths = [max(len(str(row[i])) for row in table if not str(row[1]).startswith("FAILED"))
              for i in range(len(cols))]
    for i, row in enumerate(table):
        if str(row[1]).startswith("FAILED"):
            print(str(row[0]).rjust(widths[0]) + "  " + row[1])
            continue
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    print(
        "upsert: from the newcomer opening its session to its peer_upsert(online) being read\n"
        "by each of the N sessions (client-side read time, so an upper bound for the server);\n"
        "reg->upsert: from its POST /v1/register to the first peer_upsert about it.\n"
        "RSS: server VmRSS with the N sessions connected and idle; peak: VmHWM at the end.\n"
        f"overlayd refuses control frames above 65536 B; a larger Welcome cannot reach a daemon."
    )


PATHS = [("direct", "direct (cone/cone)"), ("turn", "TURN, embedded (sym/sym)"),
         ("coturn", "TURN, coturn (sym/sym)"), ("relay", "coordination relay (UDP blocked/cone)")]


def paths_report(path):
    """The table of tests/bench/paths.sh: one row per path."""
    results, notes = load(path)
    meta = results.get("meta", {})

    def mbit(r, key):
        v = fnum(r.get(key + "_bps"))
        return f"{v / 1e6:.0f}" if v is not None else "-"

    def per_gb(r, key):
        ticks, total = fnum(r.get(key)), fnum(r.get("bytes_total"))
        if ticks is None or not total:
            return "-"
        return f"{ticks / CLK_TCK / (total / 1e9):.2f}"

    head = ["path", "TCP a->b", "TCP b->a", "TCP 4x a->b", "RTT p50 ms", "RTT p99 ms", "pings",
            "nodes CPU s/GB", "server CPU s/GB", "settle s"]
    table = [head]
    for name, label in PATHS:
        r = results.get(name)
        if r is None:
            continue
        table.append([label, mbit(r, "tcp1_fwd"), mbit(r, "tcp1_rev"), mbit(r, "tcp4_fwd"),
                      r.get("rtt_p50", "-"), r.get("rtt_p99", "-"), r.get("ping_replies", "-"),
                      per_gb(r, "daemon_ticks"), per_gb(r, "server_ticks"), r.get("settle_s", "-")])
    print(f"overlay paths: {meta.get('mode', '?')}, iperf3 {meta.get('secs', '?')} s per run, "
          f"{meta.get('pings', '?')} pings at 10 ms, {meta.get('cores', '?')} cores, "
          f"kernel {meta.get('kernel', '?')}")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in table[1:]:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print("TCP in Mbit/s (iperf3 receiver side); a1 and b1 sit behind their own NAT routers.\n"
          "nodes CPU: utime+stime of both overlayd over the three iperf3 runs per GB received;\n"
          "server CPU: the same for the TURN server (embedded: overlay-coord; coturn) or, for\n"
          "the relay row, the coordinator. settle: from starting both daemons to both on the path.")
    for system, note in notes:
        print(f"note [{system}]: {note}")


def replica_report():
    """The replica table of tests/bench/coord.sh from coord-load's RESULT line on stdin."""
    for line in sys.stdin:
        if not line.strip():
            continue
        r = dict(kv.split("=", 1) for kv in line.split()[1:])
        if "failed" in r:
            print(f"replicas: FAILED: {r['failed']}")
            continue
        mib = lambda kb: f"{int(kb) / 1024:.0f}" if kb not in (None, "-") else "-"
        rows = [
            ("replicas / sessions", f"{r.get('replicas', '?')} / {r['nodes']}"),
            ("register, connect s", f"{r['register_s']}, {r['connect_s']}"),
            ("join seen by all p50 / p99 / max ms",
             f"{r['online_p50_ms']} / {r['online_p99_ms']} / {r['online_max_ms']} ({r['online_n']}/{r['nodes']})"),
            ("largest replica RSS MiB (loaded / peak)", f"{mib(r.get('rss_loaded_kb'))} / {mib(r.get('hwm_kb'))}"),
        ]
        if "moved_expected" in r:
            rows.append(("replica 2 killed: its sessions back p50 / p99 / max ms",
                         f"{r['moved_p50_ms']} / {r['moved_p99_ms']} / {r['moved_max_ms']} "
                         f"({r['moved_n']}/{r['moved_expected']}"
                         + (f", {r['moved_resumed']} resumed" if "moved_resumed" in r else "") + ")"))
            if "moved_rss_kb" in r:
                rows.append(("the other replica after the move: RSS MiB (now / peak)",
                             f"{mib(r['moved_rss_kb'])} / {mib(r.get('moved_hwm_kb'))}"))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k.ljust(width)}  {v}")
    print("join: from the newcomer opening its session on replica 1 to its peer_upsert(online)\n"
          "being read by every session on both replicas; back: from the SIGKILL to each moved\n"
          "session's netmap from the other replica (first retry spread over 2 s, as overlayd).")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "iperf":
        iperf(args[0])
    elif cmd == "ping":
        ping(args[0])
    elif cmd == "cpu":
        cpu(args)
    elif cmd == "report":
        report(args[0])
    elif cmd == "paths-report":
        paths_report(args[0])
    elif cmd == "replica-report":
        replica_report()
    elif cmd == "coord-report":
        coord_report()
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()

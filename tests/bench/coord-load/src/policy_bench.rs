//! `policy-bench`: what an access-policy change costs the coordinator at
//! 10,000 nodes, in process (no sockets, so the figure is the server's own
//! work): N nodes tagged across `--tags` tags, each with a session attached
//! to the hub; a policy of `--rules` rules is set, changed by one rule, and
//! one node's tags change. For each step it times
//!
//! ```text
//!   recompute   Hub::apply_policy: compile, classify every node, diff by
//!               (old class, new class) group, build each node's messages
//!   push        every session takes the change off its queue and writes
//!               its messages (here: sums their bytes instead of a socket)
//! ```
//!
//! and prints `RESULT policy …` lines; the total must stay under 1 s in a
//! release build (issue #10).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use overlay_coord::config::Limits;
use overlay_coord::hub::{Attached, Delta, Hub};
use overlay_coord::metrics::Metrics;
use overlay_coord::policy::{self, Policy};
use overlay_proto::coord::PeerInfo;
use overlay_proto::NodeId;

#[derive(Parser, Debug)]
#[command(about = "Access-policy recompute and push cost at N nodes")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    #[arg(long, default_value_t = 20)]
    tags: usize,
    #[arg(long, default_value_t = 100)]
    rules: usize,
}

fn tag(i: usize) -> String {
    format!("t{i}")
}

/// `rules` rules between tags: most one tag to another on a port, some
/// icmp, a few naming groups of nodes; one test. `variant` changes rule 0.
fn policy_text(args: &Args, variant: usize) -> String {
    let mut s = String::from(
        "[groups]\nops = [\"n1\", \"n2\", \"tag:t0\"]\n\n[hosts]\nlab = \"100.64.0.0/24\"\n",
    );
    for r in 0..args.rules {
        let src = if r % 10 == 9 {
            "group:ops".to_string()
        } else {
            format!("tag:{}", tag(r % args.tags))
        };
        let dst = tag((r * 7 + 3 + variant * (r == 0) as usize) % args.tags);
        let _ = write!(s, "\n[[allow]]\nsrc = [\"{src}\"]\ndst = [\"tag:{dst}\"]\n");
        if r % 5 == 4 {
            s.push_str("proto = \"icmp\"\n");
        } else {
            let _ = writeln!(
                s,
                "proto = \"tcp\"\nports = [\"{}\", \"8000-8100\"]",
                1000 + r
            );
        }
    }
    s
}

fn peers(args: &Args) -> Vec<PeerInfo> {
    (1..=args.nodes as NodeId)
        .map(|id| {
            let i = id as usize;
            let mut tags = vec![tag(i % args.tags)];
            if i % 3 == 0 {
                tags.push(tag((i / 3) % args.tags));
            }
            tags.sort();
            tags.dedup();
            PeerInfo {
                id,
                name: format!("n{id}"),
                mesh_ip: std::net::Ipv4Addr::from(
                    u32::from(std::net::Ipv4Addr::new(100, 64, 0, 0)) + id as u32,
                ),
                mesh_ip6: None,
                public_key: format!("{id:0>43}="),
                online: false,
                tags,
            }
        })
        .collect()
}

/// Every session drains its queue as the session loop does; returns bytes written.
fn push(sessions: &mut [(NodeId, Attached)]) -> (usize, usize) {
    let (mut bytes, mut msgs) = (0, 0);
    for (me, a) in sessions.iter_mut() {
        while let Ok(d) = a.deltas.try_recv() {
            match d {
                Delta::Peer { about, view, text } => {
                    if about != *me && policy::may_see(&a.view, &view) {
                        bytes += text.len();
                        msgs += 1;
                    }
                }
                Delta::Reclass(r) => {
                    if let Some(u) = r.nodes.get(me) {
                        a.view = u.view.clone();
                        if let Some(f) = &u.filter {
                            bytes += f.len();
                            msgs += 1;
                        }
                        for (about, text) in u.msgs.iter() {
                            if about != me {
                                bytes += text.len();
                                msgs += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    (bytes, msgs)
}

fn step(
    name: &str,
    hub: &Hub,
    sessions: &mut [(NodeId, Attached)],
    change: impl FnOnce(&Hub) -> overlay_coord::hub::ApplyStats,
) -> Duration {
    let t0 = Instant::now();
    let stats = change(hub);
    let recompute = t0.elapsed();
    let t1 = Instant::now();
    let (bytes, msgs) = push(sessions);
    let pushed = t1.elapsed();
    let total = t0.elapsed();
    println!(
        "RESULT policy step={name} nodes={} classes={} groups={} nodes_told={} msgs={msgs} bytes={bytes} recompute_ms={:.1} push_ms={:.1} total_ms={:.1}",
        stats.nodes,
        stats.classes,
        stats.groups,
        stats.nodes_told,
        recompute.as_secs_f64() * 1e3,
        pushed.as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3,
    );
    total
}

fn parse(text: &str) -> Arc<Policy> {
    Arc::new(policy::parse("bench.toml", text).expect("the bench policy parses"))
}

fn main() {
    let args = Args::parse();
    let limits = Limits {
        max_sessions: args.nodes + 1,
        ..Limits::default()
    };
    let hub = Hub::new(peers(&args), Arc::new(Metrics::default()), limits);
    let mut sessions: Vec<(NodeId, Attached)> = (1..=args.nodes as NodeId)
        .map(|id| (id, hub.attach(id).expect("attach")))
        .collect();
    // The online deltas of the attaches are not what is measured.
    for (_, a) in sessions.iter_mut() {
        a.deltas = a.deltas.resubscribe();
    }

    let first = parse(&policy_text(&args, 0));
    let changed = parse(&policy_text(&args, 1));
    let mut worst = Duration::ZERO;
    worst = worst.max(step("set", &hub, &mut sessions, |h| {
        h.apply_policy(Some(Arc::clone(&first)), None)
    }));
    worst = worst.max(step("change-one-rule", &hub, &mut sessions, |h| {
        h.apply_policy(Some(Arc::clone(&changed)), None)
    }));
    let mut tags: HashMap<NodeId, Vec<String>> =
        peers(&args).into_iter().map(|p| (p.id, p.tags)).collect();
    tags.insert(1, vec![tag(5), tag(6)]);
    worst = worst.max(step("retag-one-node", &hub, &mut sessions, |h| {
        h.apply_policy(Some(Arc::clone(&changed)), Some(&tags))
    }));
    worst = worst.max(step("clear", &hub, &mut sessions, |h| {
        h.apply_policy(None, Some(&tags))
    }));
    println!(
        "RESULT policy worst_ms={:.1} budget_ms=1000 ok={}",
        worst.as_secs_f64() * 1e3,
        worst <= Duration::from_secs(1)
    );
}

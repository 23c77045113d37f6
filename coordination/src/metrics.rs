//! Counters, and their rendering in the Prometheus text format.
//! Gauges (nodes, online sessions) and per-node relay counters live in the
//! hub and are passed in at render time.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use overlay_proto::NodeId;

/// Why an input from a remote was refused (label of `rejected_inputs_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// A text frame that is not a `ClientMsg`.
    Malformed,
    /// A frame larger than `MAX_FRAME_BYTES`.
    Oversized,
    /// A text message dropped: more than the session's token bucket allows.
    RateLimited,
    /// A session closed for sending text messages far above its rate
    /// (`session::FLOOD_FACTOR` times the limit).
    Flood,
    /// A binary frame too short to carry a node id.
    BadRelayFrame,
    /// A wrong or missing credential on `/v1/connect`.
    Unauthorized,
    /// A `POST /v1/register` that failed validation or parsing.
    BadRegister,
    /// An auth key that was unknown, expired, revoked or spent.
    BadAuthKey,
    /// A connection refused because `max_sessions` are online.
    TooManySessions,
    /// A session that could not keep up with its deltas.
    SlowConsumer,
    /// A WebSocket protocol error (bad framing, etc.).
    Protocol,
    /// A registration whose challenge was unknown, expired or used, or whose
    /// proof of the private key did not verify.
    BadProof,
    /// A registration of an enrolled public key without its credential.
    AlreadyEnrolled,
    /// A registration refused because the set of challenges used within
    /// their lifetime is full (`challenge::MAX_USED`).
    ChallengesFull,
}

impl Rejected {
    const ALL: [Rejected; 14] = [
        Rejected::Malformed,
        Rejected::Oversized,
        Rejected::RateLimited,
        Rejected::Flood,
        Rejected::BadRelayFrame,
        Rejected::Unauthorized,
        Rejected::BadRegister,
        Rejected::BadAuthKey,
        Rejected::TooManySessions,
        Rejected::SlowConsumer,
        Rejected::Protocol,
        Rejected::BadProof,
        Rejected::AlreadyEnrolled,
        Rejected::ChallengesFull,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejected::Malformed => "malformed",
            Rejected::Oversized => "oversized",
            Rejected::RateLimited => "rate_limited",
            Rejected::BadRelayFrame => "bad_relay_frame",
            Rejected::Unauthorized => "unauthorized",
            Rejected::BadRegister => "bad_register",
            Rejected::BadAuthKey => "bad_auth_key",
            Rejected::TooManySessions => "too_many_sessions",
            Rejected::SlowConsumer => "slow_consumer",
            Rejected::Protocol => "protocol",
            Rejected::Flood => "flood",
            Rejected::BadProof => "bad_proof",
            Rejected::AlreadyEnrolled => "already_enrolled",
            Rejected::ChallengesFull => "challenges_full",
        }
    }
}

/// Why a relay frame was dropped (label of `relay_dropped_frames_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayDrop {
    UnknownPeer,
    PeerOffline,
    QueueFull,
    RateLimited,
    /// For a node on another replica, and the bus is slow or down.
    Bus,
}

impl RelayDrop {
    const ALL: [RelayDrop; 5] = [
        RelayDrop::UnknownPeer,
        RelayDrop::PeerOffline,
        RelayDrop::QueueFull,
        RelayDrop::RateLimited,
        RelayDrop::Bus,
    ];

    fn label(self) -> &'static str {
        match self {
            RelayDrop::UnknownPeer => "unknown_peer",
            RelayDrop::PeerOffline => "peer_offline",
            RelayDrop::QueueFull => "queue_full",
            RelayDrop::RateLimited => "rate_limited",
            RelayDrop::Bus => "bus",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub registrations: AtomicU64,
    pub sessions_opened: AtomicU64,
    /// Sessions whose node held the current netmap, so it was not sent again.
    pub netmap_resumed: AtomicU64,
    pub signaling_messages: AtomicU64,
    /// Signals refused (unknown/offline target) or dropped (target queue full).
    pub signaling_refused: AtomicU64,
    /// Signals and relay frames refused because the policy keeps the two
    /// nodes apart (also counted as refused signals / unknown-peer drops).
    pub policy_refused: AtomicU64,
    /// Policy or tag changes applied to the sessions.
    pub policy_changes: AtomicU64,
    pub relay_frames: AtomicU64,
    pub relay_bytes: AtomicU64,
    /// Batch messages queued towards sessions (each holds one or more of
    /// `relay_frames`).
    pub relay_batches: AtomicU64,
    pub deltas: AtomicU64,
    /// Datagrams the embedded TURN server refused to relay to a denied peer.
    pub turn_denied_peer: AtomicU64,
    /// TURN Allocate requests refused by a quota (per user or total).
    pub turn_quota_refused: AtomicU64,
    /// TURN allocations held now (a gauge).
    pub turn_allocations: AtomicU64,
    /// TURN requests with the credential of a node that no longer exists.
    pub turn_removed_node: AtomicU64,
    /// Connections refused at accept by a per-source bound.
    pub conn_refused_per_ip: AtomicU64,
    /// Connections closed by the TLS handshake, header-read or idle deadline.
    pub conn_timeouts: AtomicU64,
    /// Challenges remembered as used (a gauge): the only server memory
    /// enrolment challenges take.
    challenges_used: AtomicU64,
    rejected: [AtomicU64; Rejected::ALL.len()],
    relay_dropped: [AtomicU64; RelayDrop::ALL.len()],
}

/// Point-in-time values the hub provides.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    pub nodes: usize,
    pub sessions_online: usize,
    /// `(node, relay bytes from it, relay bytes to it)` since start.
    pub per_node_relay: Vec<(NodeId, u64, u64)>,
    /// The replicas' bus, when there is one.
    pub bus: Option<BusSnapshot>,
}

/// The bus's counters at render time (`replica::BusCounters`).
#[derive(Debug, Default, Clone)]
pub struct BusSnapshot {
    pub replica: u64,
    pub connected: bool,
    /// Other replicas heard within the timeout.
    pub replicas: u64,
    /// Nodes online on other replicas.
    pub remote_online: u64,
    pub published: u64,
    pub received: u64,
    pub dropped_out: u64,
    pub publish_failed: u64,
    pub malformed_in: u64,
    pub relay_frames_out: u64,
    pub relay_frames_in: u64,
    pub signals_out: u64,
    pub signals_in: u64,
    pub reconnects: u64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn reject(&self, reason: Rejected) {
        if let Some(i) = Rejected::ALL.iter().position(|r| *r == reason) {
            inc(&self.rejected[i]);
        }
    }

    pub fn rejected(&self, reason: Rejected) -> u64 {
        Rejected::ALL
            .iter()
            .position(|r| *r == reason)
            .map(|i| self.rejected[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    pub fn set_challenges_used(&self, n: usize) {
        self.challenges_used
            .store(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn relay_drop(&self, reason: RelayDrop) {
        self.relay_drops(reason, 1);
    }

    /// `n` datagrams dropped for one reason (a batch's share).
    pub fn relay_drops(&self, reason: RelayDrop, n: u64) {
        if let Some(i) = RelayDrop::ALL.iter().position(|r| *r == reason) {
            self.relay_dropped[i].fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn relay_dropped(&self, reason: RelayDrop) -> u64 {
        RelayDrop::ALL
            .iter()
            .position(|r| *r == reason)
            .map(|i| self.relay_dropped[i].load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut out = String::with_capacity(4096 + snap.per_node_relay.len() * 120);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        metric(
            "overlay_coord_nodes",
            "gauge",
            "Enrolled nodes.",
            snap.nodes as u64,
        );
        metric(
            "overlay_coord_sessions_online",
            "gauge",
            "Nodes with an open control session.",
            snap.sessions_online as u64,
        );
        metric(
            "overlay_coord_registrations_total",
            "counter",
            "Successful registrations.",
            load(&self.registrations),
        );
        metric(
            "overlay_coord_challenges_used",
            "gauge",
            "Registration challenges remembered as used until they expire.",
            load(&self.challenges_used),
        );
        metric(
            "overlay_coord_sessions_opened_total",
            "counter",
            "Control sessions opened.",
            load(&self.sessions_opened),
        );
        metric(
            "overlay_coord_netmap_resumed_total",
            "counter",
            "Sessions whose node already held the current netmap (a Welcome without peers).",
            load(&self.netmap_resumed),
        );
        metric(
            "overlay_coord_signaling_messages_total",
            "counter",
            "Signaling messages forwarded.",
            load(&self.signaling_messages),
        );
        metric(
            "overlay_coord_signaling_refused_total",
            "counter",
            "Signaling messages refused or dropped.",
            load(&self.signaling_refused),
        );
        metric(
            "overlay_coord_policy_refused_total",
            "counter",
            "Signals and relay frames between nodes the access policy keeps apart.",
            load(&self.policy_refused),
        );
        metric(
            "overlay_coord_policy_changes_total",
            "counter",
            "Policy and tag changes pushed to the sessions.",
            load(&self.policy_changes),
        );
        metric(
            "overlay_coord_relayed_frames_total",
            "counter",
            "Relay frames forwarded.",
            load(&self.relay_frames),
        );
        metric(
            "overlay_coord_relayed_bytes_total",
            "counter",
            "Relay payload bytes forwarded.",
            load(&self.relay_bytes),
        );
        metric(
            "overlay_coord_relayed_batches_total",
            "counter",
            "Relay batch messages queued towards sessions (several frames each).",
            load(&self.relay_batches),
        );
        metric(
            "overlay_coord_deltas_total",
            "counter",
            "Netmap deltas broadcast.",
            load(&self.deltas),
        );
        metric(
            "overlay_coord_turn_denied_peer_total",
            "counter",
            "Datagrams the embedded TURN server refused to relay to a denied address.",
            load(&self.turn_denied_peer),
        );
        metric(
            "overlay_coord_turn_allocations",
            "gauge",
            "Allocations the embedded TURN server holds.",
            load(&self.turn_allocations),
        );
        metric(
            "overlay_coord_turn_quota_refused_total",
            "counter",
            "TURN allocations refused by the per-user or total quota.",
            load(&self.turn_quota_refused),
        );
        metric(
            "overlay_coord_turn_removed_node_total",
            "counter",
            "TURN requests refused because the credential's node was removed.",
            load(&self.turn_removed_node),
        );
        metric(
            "overlay_coord_conn_refused_per_ip_total",
            "counter",
            "Connections refused at accept by a per-source bound.",
            load(&self.conn_refused_per_ip),
        );
        metric(
            "overlay_coord_conn_timeouts_total",
            "counter",
            "Connections closed by the TLS handshake, header-read or idle deadline.",
            load(&self.conn_timeouts),
        );

        if let Some(bus) = &snap.bus {
            render_bus(&mut out, bus);
        }
        let _ = writeln!(out, "# HELP overlay_coord_relay_dropped_frames_total Relay frames dropped.\n# TYPE overlay_coord_relay_dropped_frames_total counter");
        for (i, r) in RelayDrop::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "overlay_coord_relay_dropped_frames_total{{reason=\"{}\"}} {}",
                r.label(),
                load(&self.relay_dropped[i])
            );
        }
        let _ = writeln!(out, "# HELP overlay_coord_rejected_inputs_total Inputs refused from remotes.\n# TYPE overlay_coord_rejected_inputs_total counter");
        for (i, r) in Rejected::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "overlay_coord_rejected_inputs_total{{reason=\"{}\"}} {}",
                r.label(),
                load(&self.rejected[i])
            );
        }
        let _ = writeln!(out, "# HELP overlay_coord_node_relay_bytes_total Relay payload bytes per node since start.\n# TYPE overlay_coord_node_relay_bytes_total counter");
        for (node, bytes_in, bytes_out) in &snap.per_node_relay {
            let _ = writeln!(
                out,
                "overlay_coord_node_relay_bytes_total{{node=\"{node}\",direction=\"in\"}} {bytes_in}\noverlay_coord_node_relay_bytes_total{{node=\"{node}\",direction=\"out\"}} {bytes_out}"
            );
        }
        out
    }
}

/// The bus's lines: a replica's own view, each replica serves its own.
fn render_bus(out: &mut String, bus: &BusSnapshot) {
    let _ = writeln!(
        out,
        "# HELP overlay_coord_replica_info This replica's id on the bus.\n# TYPE overlay_coord_replica_info gauge\noverlay_coord_replica_info{{replica=\"{:016x}\"}} 1",
        bus.replica
    );
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    metric(
        "overlay_coord_bus_connected",
        "gauge",
        "1 while the replicas' bus (NATS) is connected.",
        u64::from(bus.connected),
    );
    metric(
        "overlay_coord_bus_replicas",
        "gauge",
        "Other replicas heard on the bus within the timeout.",
        bus.replicas,
    );
    metric(
        "overlay_coord_bus_remote_online",
        "gauge",
        "Nodes online on other replicas.",
        bus.remote_online,
    );
    for (name, help, value) in [
        ("published", "Messages published on the bus.", bus.published),
        ("received", "Messages received from the bus.", bus.received),
        (
            "dropped",
            "Messages dropped before the bus: its queue was full or it was down.",
            bus.dropped_out,
        ),
        (
            "publish_failed",
            "Messages the NATS client refused.",
            bus.publish_failed,
        ),
        (
            "malformed",
            "Messages from the bus that did not parse.",
            bus.malformed_in,
        ),
        (
            "relay_frames_out",
            "Relay datagrams sent to nodes on other replicas.",
            bus.relay_frames_out,
        ),
        (
            "relay_frames_in",
            "Relay datagrams received for nodes here.",
            bus.relay_frames_in,
        ),
        (
            "signals_out",
            "Signals sent to nodes on other replicas.",
            bus.signals_out,
        ),
        (
            "signals_in",
            "Signals received for nodes here.",
            bus.signals_in,
        ),
        (
            "reconnects",
            "Times the bus connection came back.",
            bus.reconnects,
        ),
    ] {
        metric(
            &format!("overlay_coord_bus_{name}_total"),
            "counter",
            help,
            value,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_labelled_counters_and_gauges() {
        let m = Metrics::default();
        m.reject(Rejected::Oversized);
        m.reject(Rejected::Oversized);
        m.relay_drop(RelayDrop::PeerOffline);
        let text = m.render(&Snapshot {
            nodes: 3,
            sessions_online: 2,
            per_node_relay: vec![(7, 10, 20)],
            bus: None,
        });
        assert!(!text.contains("overlay_coord_bus_"), "no bus, no bus lines");
        assert!(text.contains("overlay_coord_nodes 3\n"));
        assert!(text.contains("overlay_coord_sessions_online 2\n"));
        assert!(text.contains("overlay_coord_rejected_inputs_total{reason=\"oversized\"} 2\n"));
        assert!(
            text.contains("overlay_coord_relay_dropped_frames_total{reason=\"peer_offline\"} 1\n")
        );
        assert!(text
            .contains("overlay_coord_node_relay_bytes_total{node=\"7\",direction=\"out\"} 20\n"));
        assert_eq!(m.rejected(Rejected::Oversized), 2);
        let text = m.render(&Snapshot {
            bus: Some(BusSnapshot {
                replica: 0xab,
                connected: true,
                relay_frames_out: 5,
                ..BusSnapshot::default()
            }),
            ..Snapshot::default()
        });
        assert!(text.contains("overlay_coord_replica_info{replica=\"00000000000000ab\"} 1\n"));
        assert!(text.contains("overlay_coord_bus_connected 1\n"));
        assert!(text.contains("overlay_coord_bus_relay_frames_out_total 5\n"));
    }
}

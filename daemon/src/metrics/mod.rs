//! The node's metrics in the Prometheus text format (version 0.0.4): what
//! `overlayctl metrics` prints and `overlayd up --metrics-listen ADDR` serves.
//!
//! ```text
//!  Peer counters, DropCounters,   ──snapshot──▶ Snapshot ──render()──▶ text
//!  Counters (ICE, coordinator)                  (plain data)
//! ```
//!
//! [`render`] is a pure function of a [`Snapshot`], so every name, label and
//! escaping rule is tested here without a daemon. [`serve`] is the HTTP edge.

pub mod batches;

use std::net::SocketAddr;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use overlay_proto::api::{Dropped, PathKind, PeerStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Longest HTTP request head read from a scraper; a GET line and a few headers.
const MAX_REQUEST_HEAD: usize = 8192;
/// How long a scraper may take to send its request before it is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Node-wide event counters, bumped where the events happen.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames per TUN read batch, datagrams per UDP (GRO) read, datagrams
    /// per UDP (GSO) send.
    pub tun_reads: batches::Batches,
    pub udp_reads: batches::Batches,
    pub udp_sends: batches::Batches,
    /// ICE sessions started (offers we made and offers we answered).
    pub ice_attempts: AtomicU64,
    /// ICE sessions that ended failed.
    pub ice_failures: AtomicU64,
    /// Control connections to the coordinator that came up.
    pub coordinator_connects: AtomicU64,
}

/// Everything one scrape shows, copied out of the daemon's state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: String,
    pub uptime_secs: u64,
    pub coordinator_connected: bool,
    pub coordinator_connects: u64,
    pub ice_attempts: u64,
    pub ice_failures: u64,
    pub dropped: Dropped,
    pub peers: Vec<PeerStatus>,
    pub tun_reads: batches::BatchSnapshot,
    pub udp_reads: batches::BatchSnapshot,
    pub udp_sends: batches::BatchSnapshot,
}

impl Counters {
    pub fn fill(&self, snapshot: &mut Snapshot) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        snapshot.ice_attempts = get(&self.ice_attempts);
        snapshot.ice_failures = get(&self.ice_failures);
        snapshot.coordinator_connects = get(&self.coordinator_connects);
        snapshot.tun_reads = self.tun_reads.snapshot();
        snapshot.udp_reads = self.udp_reads.snapshot();
        snapshot.udp_sends = self.udp_sends.snapshot();
    }
}

/// Every path kind, so a peer's gauge reads 1 for its kind and 0 for the others
/// (queries then need no `absent()`).
const PATH_KINDS: [(PathKind, &str); 5] = [
    (PathKind::Direct, "direct"),
    (PathKind::Turn, "turn"),
    (PathKind::CoordRelay, "coord_relay"),
    (PathKind::Connecting, "connecting"),
    (PathKind::Idle, "idle"),
];

/// The Prometheus text for `snapshot`.
pub fn render(s: &Snapshot) -> String {
    let mut text = String::new();
    let mut emit = |header: String, samples: String| {
        text.push_str(&header);
        text.push_str(&samples);
    };
    let header = |name: &str, kind: &str, help: &str| {
        format!("# HELP {name} {help}\n# TYPE {name} {kind}\n")
    };

    emit(
        header(
            "overlay_build_info",
            "gauge",
            "overlayd's version, as a label.",
        ),
        format!(
            "overlay_build_info{{version=\"{}\"}} 1\n",
            escape(&s.version)
        ),
    );
    emit(
        header(
            "overlay_uptime_seconds",
            "gauge",
            "Seconds since overlayd started.",
        ),
        format!("overlay_uptime_seconds {}\n", s.uptime_secs),
    );
    emit(
        header(
            "overlay_coordinator_connected",
            "gauge",
            "1 while the control connection to the coordinator is up.",
        ),
        format!(
            "overlay_coordinator_connected {}\n",
            u8::from(s.coordinator_connected)
        ),
    );
    emit(
        header(
            "overlay_coordinator_reconnects_total",
            "counter",
            "Control connections to the coordinator after the first.",
        ),
        format!(
            "overlay_coordinator_reconnects_total {}\n",
            s.coordinator_connects.saturating_sub(1)
        ),
    );
    emit(
        header(
            "overlay_ice_attempts_total",
            "counter",
            "ICE sessions started with peers.",
        ),
        format!("overlay_ice_attempts_total {}\n", s.ice_attempts),
    );
    emit(
        header(
            "overlay_ice_failures_total",
            "counter",
            "ICE sessions with peers that failed.",
        ),
        format!("overlay_ice_failures_total {}\n", s.ice_failures),
    );
    let d = &s.dropped;
    let drops = [
        ("no_route", d.no_route),
        ("spoofed_source", d.spoofed_source),
        ("bad_datagram", d.bad_datagram),
        ("relay_queue_full", d.relay_queue_full),
        ("wrong_destination", d.wrong_destination),
        ("bad_signal", d.bad_signal),
        ("replayed_signal", d.replayed_signal),
        ("misdirected_signal", d.misdirected_signal),
        ("excess_offer", d.excess_offer),
        ("signal_budget", d.signal_budget),
        ("policy", d.policy),
        ("policy_out", d.policy_out),
        ("flow_table_full", d.flow_table_full),
    ];
    emit(
        header(
            "overlay_drops_total",
            "counter",
            "Packets and signals refused or not delivered, by reason.",
        ),
        drops
            .iter()
            .map(|(reason, n)| format!("overlay_drops_total{{reason=\"{reason}\"}} {n}\n"))
            .collect(),
    );

    let per_peer = |f: &dyn Fn(&PeerStatus, &str) -> String| -> String {
        s.peers
            .iter()
            .map(|p| f(p, &peer_labels(p)))
            .collect::<String>()
    };
    for (name, help, value) in [
        (
            "overlay_peer_rx_bytes_total",
            "WireGuard payload bytes received from the peer.",
            (|p: &PeerStatus| p.rx_bytes) as fn(&PeerStatus) -> u64,
        ),
        (
            "overlay_peer_tx_bytes_total",
            "WireGuard payload bytes sent to the peer.",
            |p: &PeerStatus| p.tx_bytes,
        ),
        (
            "overlay_peer_rx_packets_total",
            "Packets received from the peer.",
            |p: &PeerStatus| p.rx_packets,
        ),
        (
            "overlay_peer_tx_packets_total",
            "Packets sent to the peer.",
            |p: &PeerStatus| p.tx_packets,
        ),
    ] {
        emit(
            header(name, "counter", help),
            per_peer(&|p, labels| format!("{name}{{{labels}}} {}\n", value(p))),
        );
    }
    emit(
        header(
            "overlay_peer_online",
            "gauge",
            "1 while the coordinator reports the peer online.",
        ),
        per_peer(&|p, labels| format!("overlay_peer_online{{{labels}}} {}\n", u8::from(p.online))),
    );
    emit(
        header(
            "overlay_peer_path",
            "gauge",
            "1 for the kind of path packets to the peer take now, 0 for the others.",
        ),
        per_peer(&|p, labels| {
            PATH_KINDS
                .iter()
                .map(|(kind, label)| {
                    format!(
                        "overlay_peer_path{{{labels},kind=\"{label}\"}} {}\n",
                        u8::from(p.path_kind == *kind)
                    )
                })
                .collect()
        }),
    );
    emit(
        header(
            "overlay_peer_last_handshake_age_seconds",
            "gauge",
            "Seconds since the last WireGuard handshake with the peer (absent before the first).",
        ),
        per_peer(&|p, labels| match p.last_handshake_secs {
            Some(age) => format!("overlay_peer_last_handshake_age_seconds{{{labels}}} {age}\n"),
            None => String::new(),
        }),
    );
    for (name, help, snap) in [
        (
            "overlay_tun_read_batch_frames",
            "Frames read from the TUN together (one batch of reads).",
            &s.tun_reads,
        ),
        (
            "overlay_udp_read_batch_datagrams",
            "Datagrams from one UDP read (GRO).",
            &s.udp_reads,
        ),
        (
            "overlay_udp_send_batch_datagrams",
            "Datagrams in one UDP send (GSO).",
            &s.udp_sends,
        ),
    ] {
        text.push_str(&batches::render(name, help, snap));
    }
    text
}

fn peer_labels(p: &PeerStatus) -> String {
    format!("peer=\"{}\",mesh_ip=\"{}\"", escape(&p.name), p.mesh_ip)
}

/// Label values escape backslash, double quote and newline; peer names come from
/// other nodes and must not break the format.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Serves `GET /metrics` (and `/`) on `addr` until `shutdown` turns true. Each
/// scrape calls `scrape` for fresh text.
pub async fn serve(
    listener: TcpListener,
    scrape: Arc<dyn Fn() -> String + Send + Sync>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let scrape = scrape.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &*scrape)).await;
                    });
                }
                Err(e) => tracing::warn!("metrics listener accept: {e}"),
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// Binds the metrics listener; a wrong address fails the start, not a scrape.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn answer(mut stream: TcpStream, scrape: &(dyn Fn() -> String + Send + Sync)) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > MAX_REQUEST_HEAD {
            return;
        }
    }
    let response = match route(&head) {
        Route::Metrics => http_response("200 OK", &scrape()),
        Route::NotFound => http_response("404 Not Found", "try /metrics\n"),
        Route::BadMethod => http_response("405 Method Not Allowed", "GET only\n"),
    };
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadMethod,
}

fn route(head: &[u8]) -> Route {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if method != b"GET" {
        return Route::BadMethod;
    }
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    match path {
        b"/metrics" | b"/" => Route::Metrics,
        _ => Route::NotFound,
    }
}

fn http_response(status: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, kind: PathKind) -> PeerStatus {
        PeerStatus {
            id: 7,
            name: name.into(),
            mesh_ip6: None,
            mesh_ip: "100.64.0.7".parse().expect("ip"),
            public_key: String::new(),
            online: true,
            path_kind: kind,
            path: String::new(),
            endpoint: None,
            local_endpoint: None,
            last_handshake_secs: Some(12),
            rx_bytes: 1000,
            tx_bytes: 2000,
            rx_packets: 10,
            tx_packets: 20,
            access: None,
            dropped_policy: 0,
            dropped_policy_out: 0,
            flows: 0,
            dns_name: None,
        }
    }

    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ').map(str::to_owned))
    }

    #[test]
    fn per_peer_counters_carry_name_and_mesh_ip() {
        let text = render(&Snapshot {
            peers: vec![peer("n2", PathKind::Direct)],
            ..Snapshot::default()
        });
        let labels = "{peer=\"n2\",mesh_ip=\"100.64.0.7\"}";
        for (name, value) in [
            ("overlay_peer_rx_bytes_total", "1000"),
            ("overlay_peer_tx_bytes_total", "2000"),
            ("overlay_peer_rx_packets_total", "10"),
            ("overlay_peer_tx_packets_total", "20"),
            ("overlay_peer_last_handshake_age_seconds", "12"),
            ("overlay_peer_online", "1"),
        ] {
            assert_eq!(
                sample(&text, &format!("{name}{labels}")).as_deref(),
                Some(value),
                "{name} in\n{text}"
            );
        }
    }

    #[test]
    fn path_gauge_is_one_for_the_current_kind_only() {
        let text = render(&Snapshot {
            peers: vec![peer("n2", PathKind::Turn)],
            ..Snapshot::default()
        });
        let series = |kind: &str| {
            format!("overlay_peer_path{{peer=\"n2\",mesh_ip=\"100.64.0.7\",kind=\"{kind}\"}}")
        };
        assert_eq!(sample(&text, &series("turn")).as_deref(), Some("1"));
        for other in ["direct", "coord_relay", "connecting", "idle"] {
            assert_eq!(
                sample(&text, &series(other)).as_deref(),
                Some("0"),
                "{other}"
            );
        }
    }

    #[test]
    fn drops_are_one_counter_labelled_by_reason() {
        let text = render(&Snapshot {
            dropped: Dropped {
                no_route: 3,
                excess_offer: 5,
                ..Dropped::default()
            },
            ..Snapshot::default()
        });
        assert_eq!(
            sample(&text, "overlay_drops_total{reason=\"no_route\"}").as_deref(),
            Some("3")
        );
        assert_eq!(
            sample(&text, "overlay_drops_total{reason=\"excess_offer\"}").as_deref(),
            Some("5")
        );
        assert!(text.contains("# TYPE overlay_drops_total counter"));
    }

    #[test]
    fn reconnects_do_not_count_the_first_connection() {
        let text = |connects| {
            render(&Snapshot {
                coordinator_connects: connects,
                coordinator_connected: true,
                ..Snapshot::default()
            })
        };
        assert_eq!(
            sample(&text(0), "overlay_coordinator_reconnects_total").as_deref(),
            Some("0")
        );
        assert_eq!(
            sample(&text(3), "overlay_coordinator_reconnects_total").as_deref(),
            Some("2")
        );
        assert_eq!(
            sample(&text(1), "overlay_coordinator_connected").as_deref(),
            Some("1")
        );
    }

    #[test]
    fn hostile_peer_names_cannot_break_the_format() {
        let text = render(&Snapshot {
            peers: vec![peer("a\"b\\c\nd", PathKind::Direct)],
            ..Snapshot::default()
        });
        assert!(text.contains(r#"peer="a\"b\\c\nd""#), "{text}");
        // Every line is a comment or `name{labels} value`: no injected line.
        for line in text.lines() {
            assert!(
                line.starts_with("# ") || line.starts_with("overlay_"),
                "stray line {line:?}"
            );
        }
    }

    #[test]
    fn every_family_has_help_and_type_and_counters_end_in_total() {
        let text = render(&Snapshot {
            peers: vec![peer("n2", PathKind::Direct)],
            ..Snapshot::default()
        });
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut words = line.split(' ').skip(2);
            let (name, kind) = (words.next().expect("name"), words.next().expect("kind"));
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} lacks HELP"
            );
            assert_eq!(
                kind == "counter",
                name.ends_with("_total"),
                "{name} is a {kind}"
            );
        }
    }

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /other HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1\r\n\r\n"), Route::BadMethod);
        assert_eq!(route(b""), Route::BadMethod);
    }
}

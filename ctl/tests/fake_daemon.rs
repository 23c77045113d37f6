//! `overlayctl` against a fake daemon: a Unix listener in a thread that records the
//! request and answers with canned responses, exactly as the protocol says.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread::JoinHandle;

use overlay_proto::api::{PathKind, PeerStatus, PingReply, PingSummary, Request, Response, Status};

/// A fresh directory per test (removed on drop) for the fake daemon's socket.
struct TempDir(tempfile::TempDir);

impl TempDir {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("overlayctl-test-")
            .tempdir()
            .expect("create temp dir");
        TempDir(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.path().join("overlayd.sock")
    }
}

/// Serves one connection on `socket`: reads the request line, writes `responses`,
/// closes. The thread's result is the request it received.
fn fake_daemon(socket: &Path, responses: Vec<Response>) -> JoinHandle<Request> {
    let listener = UnixListener::bind(socket).expect("bind fake daemon socket");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(&stream);
        let mut line = String::new();
        reader.read_line(&mut line).expect("read request");
        let request: Request = serde_json::from_str(&line).expect("request is valid JSON");
        let mut writer = &stream;
        for response in responses {
            let mut text = serde_json::to_string(&response).expect("encode");
            text.push('\n');
            writer.write_all(text.as_bytes()).expect("write response");
        }
        request
    })
}

fn overlayctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_overlayctl"))
        .args(args)
        .env_remove("OVERLAY_SOCKET")
        .output()
        .expect("run overlayctl")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn sample_status() -> Status {
    Status {
        name: "alice".to_string(),
        node_id: 3,
        mesh_ip: Ipv4Addr::new(100, 64, 0, 2),
        network: "100.64.0.0/10".parse().expect("net"),
        mesh_ip6: None,
        network6: None,
        interface: "ovl0".to_string(),
        public_key: "PUBKEY".to_string(),
        coordinator: "http://10.77.0.1:8080".to_string(),
        coordinator_connected: true,
        uptime_secs: 42,
        version: "0.1.0".to_string(),
        dropped: Default::default(),
        dns: None,
    }
}

fn sample_peer(name: &str, last: u8, online: bool) -> PeerStatus {
    PeerStatus {
        id: u64::from(last),
        name: name.to_string(),
        mesh_ip: Ipv4Addr::new(100, 64, 0, last),
        mesh_ip6: None,
        public_key: format!("KEY{last}"),
        online,
        path_kind: if online {
            PathKind::Direct
        } else {
            PathKind::Connecting
        },
        path: if online {
            "direct (host)"
        } else {
            "connecting"
        }
        .to_string(),
        endpoint: online.then(|| format!("10.77.0.{last}:5000")),
        local_endpoint: None,
        last_handshake_secs: online.then_some(5),
        rx_bytes: 2048,
        tx_bytes: 10,
        rx_packets: 0,
        tx_packets: 0,
        access: None,
        dropped_policy: 0,
        dropped_policy_out: 0,
        flows: 0,
        dns_name: None,
    }
}

fn reply(seq: u16) -> Response {
    Response::PingReply(PingReply {
        seq,
        from: Ipv4Addr::new(100, 64, 0, 3).into(),
        rtt_ms: 1.5,
        path: "direct (host)".to_string(),
    })
}

#[test]
fn status_prints_the_daemons_status() {
    let dir = TempDir::new();
    let daemon = fake_daemon(
        &dir.socket(),
        vec![Response::Status(Box::new(sample_status()))],
    );
    let out = overlayctl(&["--socket", dir.socket().to_str().expect("utf8"), "status"]);
    assert_eq!(daemon.join().expect("daemon thread"), Request::Status);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("alice (node 3)"), "{text}");
    assert!(text.contains("100.64.0.2/10"), "{text}");
    assert!(text.contains("http://10.77.0.1:8080 (connected)"), "{text}");
}

#[test]
fn status_json_is_the_status_object() {
    let dir = TempDir::new();
    let daemon = fake_daemon(
        &dir.socket(),
        vec![Response::Status(Box::new(sample_status()))],
    );
    let out = overlayctl(&[
        "status",
        "--json",
        "--socket",
        dir.socket().to_str().expect("utf8"),
    ]);
    daemon.join().expect("daemon thread");
    assert!(out.status.success(), "{}", stderr(&out));
    let parsed: Status = serde_json::from_str(&stdout(&out)).expect("stdout is a Status");
    assert_eq!(parsed, sample_status());
}

#[test]
fn socket_comes_from_the_environment_when_no_flag() {
    let dir = TempDir::new();
    let peers = vec![sample_peer("bob", 3, true), sample_peer("carol", 4, false)];
    let daemon = fake_daemon(
        &dir.socket(),
        vec![Response::Peers {
            peers: peers.clone(),
        }],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_overlayctl"))
        .args(["peers", "--json"])
        .env("OVERLAY_SOCKET", dir.socket())
        .output()
        .expect("run overlayctl");
    assert_eq!(daemon.join().expect("daemon thread"), Request::Peers);
    assert!(out.status.success(), "{}", stderr(&out));
    let parsed: Vec<PeerStatus> =
        serde_json::from_str(&stdout(&out)).expect("stdout is a PeerStatus array");
    assert_eq!(parsed, peers);
}

#[test]
fn peers_table_shows_paths_and_offline_peers() {
    let dir = TempDir::new();
    let peers = vec![sample_peer("carol", 4, false), sample_peer("bob", 3, true)];
    let daemon = fake_daemon(&dir.socket(), vec![Response::Peers { peers }]);
    let out = overlayctl(&["--socket", dir.socket().to_str().expect("utf8"), "peers"]);
    daemon.join().expect("daemon thread");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("NAME"), "{text}");
    assert!(
        lines[1].starts_with("bob ") && lines[1].contains("direct (host)"),
        "{text}"
    );
    assert!(
        lines[1].contains("5s ago") && lines[1].contains("2.0 KiB"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("carol (offline)") && lines[2].contains("never"),
        "{text}"
    );
}

#[test]
fn ping_sends_the_parameters_and_streams_replies() {
    let dir = TempDir::new();
    let summary = PingSummary {
        target: Ipv4Addr::new(100, 64, 0, 3).into(),
        sent: 3,
        received: 2,
    };
    let daemon = fake_daemon(
        &dir.socket(),
        vec![reply(1), reply(3), Response::PingDone(summary)],
    );
    let sock = dir.socket();
    let out = overlayctl(&[
        "--socket",
        sock.to_str().expect("utf8"),
        "ping",
        "bob",
        "-c",
        "3",
        "-i",
        "0.2",
        "-W",
        "1.5",
    ]);
    assert_eq!(
        daemon.join().expect("daemon thread"),
        Request::Ping {
            target: "bob".to_string(),
            count: 3,
            interval_ms: 200,
            timeout_ms: 1500,
        }
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("reply from 100.64.0.3: seq=1 time=1.50 ms via direct (host)\n"),
        "{text}"
    );
    assert!(
        text.contains("reply from 100.64.0.3: seq=3 time=1.50 ms via direct (host)\n"),
        "{text}"
    );
    assert!(
        text.contains("3 packets transmitted, 2 received, 33% packet loss"),
        "{text}"
    );
}

#[test]
fn ping_json_prints_one_object_per_line() {
    let dir = TempDir::new();
    let summary = PingSummary {
        target: Ipv4Addr::new(100, 64, 0, 3).into(),
        sent: 1,
        received: 1,
    };
    let responses = vec![reply(1), Response::PingDone(summary)];
    let daemon = fake_daemon(&dir.socket(), responses.clone());
    let out = overlayctl(&[
        "--socket",
        dir.socket().to_str().expect("utf8"),
        "--json",
        "ping",
        "100.64.0.3",
        "-c",
        "1",
    ]);
    daemon.join().expect("daemon thread");
    assert!(out.status.success(), "{}", stderr(&out));
    let parsed: Vec<Response> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is a Response"))
        .collect();
    assert_eq!(parsed, responses);
}

#[test]
fn ping_without_replies_exits_1() {
    let dir = TempDir::new();
    let summary = PingSummary {
        target: Ipv4Addr::new(100, 64, 0, 3).into(),
        sent: 2,
        received: 0,
    };
    let daemon = fake_daemon(&dir.socket(), vec![Response::PingDone(summary)]);
    let out = overlayctl(&[
        "--socket",
        dir.socket().to_str().expect("utf8"),
        "ping",
        "bob",
        "-c",
        "2",
    ]);
    daemon.join().expect("daemon thread");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("100% packet loss"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn daemon_error_is_one_line_and_exit_1() {
    let dir = TempDir::new();
    let daemon = fake_daemon(
        &dir.socket(),
        vec![Response::Error {
            message: "no peer named 'zed'".to_string(),
        }],
    );
    let out = overlayctl(&[
        "--socket",
        dir.socket().to_str().expect("utf8"),
        "ping",
        "zed",
    ]);
    daemon.join().expect("daemon thread");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr(&out), "overlayctl: no peer named 'zed'\n");
}

#[test]
fn down_asks_the_daemon_to_stop() {
    let dir = TempDir::new();
    let daemon = fake_daemon(&dir.socket(), vec![Response::Ok]);
    let out = overlayctl(&["--socket", dir.socket().to_str().expect("utf8"), "down"]);
    assert_eq!(daemon.join().expect("daemon thread"), Request::Down);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn daemon_hanging_up_without_answer_is_a_clear_error() {
    let dir = TempDir::new();
    let daemon = fake_daemon(&dir.socket(), vec![]);
    let out = overlayctl(&["--socket", dir.socket().to_str().expect("utf8"), "peers"]);
    daemon.join().expect("daemon thread");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr(&out),
        "overlayctl: overlayd closed the connection without answering\n"
    );
}

#[test]
fn missing_socket_says_the_daemon_is_not_running() {
    let dir = TempDir::new();
    let sock = dir.socket();
    for command in ["status", "peers", "down"] {
        let out = overlayctl(&["--socket", sock.to_str().expect("utf8"), command]);
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            stderr(&out),
            format!(
                "overlayctl: overlayd is not running (no socket at {}); start it with 'sudo overlayd up'\n",
                sock.display()
            )
        );
        assert!(stdout(&out).is_empty());
    }
}

#[test]
fn stale_socket_without_listener_says_the_daemon_is_not_running() {
    let dir = TempDir::new();
    let sock = dir.socket();
    drop(UnixListener::bind(&sock).expect("bind"));
    assert!(
        sock.exists(),
        "the socket file stays after the listener closes"
    );
    let out = overlayctl(&["--socket", sock.to_str().expect("utf8"), "status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("overlayd is not running"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1);
}

#[test]
fn permission_denied_says_to_run_as_root_or_join_the_group() {
    use std::os::unix::fs::PermissionsExt;
    // Needs root to switch to an unprivileged user; root itself is never denied.
    let is_root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    let has_setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !is_root || !has_setpriv {
        eprintln!("skipped: needs root and setpriv(1)");
        return;
    }
    let dir = TempDir::new();
    let sock = dir.socket();
    let _listener = UnixListener::bind(&sock).expect("bind");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660)).expect("chmod");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_overlayctl"))
        .arg("--socket")
        .arg(&sock)
        .arg("status")
        .output()
        .expect("run setpriv");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        format!(
            "overlayctl: permission denied on {}; run as root or join the 'root' group\n",
            sock.display()
        )
    );
}

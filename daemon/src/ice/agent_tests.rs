//! An agent's session: which signalled candidates it takes, and two agents
//! on one host finding each other over IPv6 alone.

use std::net::SocketAddr;
use std::time::Duration;

use super::*;
use crate::ice::mux::Mux;

#[tokio::test]
async fn session_refuses_hostile_candidates_and_takes_ordinary_ones() {
    let settings = IceSettings {
        urls: Vec::new(),
        turn: Vec::new(),
        mux: Mux::bind().await.expect("UDP socket"),
        tun_name: "ovl-test".into(),
        mesh: "100.64.0.0/10".parse().unwrap(),
        mesh6: "fd7a:115c:a1e0::/48".parse().ok(),
    };
    assert!(settings.mux.ipv6(), "the test host has IPv6");
    let (events, _rx) = mpsc::unbounded_channel();
    let mut session = IceSession::new(&settings, FULL, 2, 1, events)
        .await
        .expect("agent");
    let line =
        |addr: &str, port: u16| format!("candidate:1 1 udp 2130706431 {addr} {port} typ host");
    for (addr, port) in [
        ("127.0.0.1", 5000),
        ("0.0.0.0", 5000),
        ("224.0.0.1", 5000),
        ("169.254.1.1", 5000),
        ("100.64.0.7", 5000),
        ("10.1.2.3", 0),
        ("evil\u{1b}[2J.local", 5000),
        ("fe80::1", 5000),
        ("::1", 5000),
        ("::ffff:127.0.0.1", 5000),
        ("2001:DB8::1", 5000),
        ("2001:db8:0:0::1", 5000),
        ("fd7a:115c:a1e0::6440:7", 5000),
    ] {
        assert!(
            session.add_remote_candidate(&line(addr, port)).is_err(),
            "{addr}:{port} accepted"
        );
    }
    assert!(session.signalled.is_empty());
    let (addr, kind) = session
        .add_remote_candidate(&line("10.1.2.3", 5000))
        .expect("an ordinary LAN candidate");
    assert_eq!(
        (addr.as_str(), kind),
        ("10.1.2.3:5000", CandidateKind::Host)
    );
    let (addr, _) = session
        .add_remote_candidate(&line("2001:db8:2::7", 5000))
        .expect("a global IPv6 candidate");
    assert_eq!(addr, "[2001:db8:2::7]:5000");
    session.close();
}

/// Where the host has no IPv6 the mux is IPv4 (the fallback of
/// `Mux::bind`): agents gather IPv4 only and take no IPv6 candidate, and
/// IPv6 servers are left out of their settings.
#[tokio::test]
async fn without_ipv6_agents_stay_ipv4_only() {
    let mux = Mux::bind_ipv4().await.expect("UDP socket");
    assert!(!mux.ipv6());
    let ice = IceConfig {
        stun: vec![
            "stun:203.0.113.1:3478".into(),
            "stun:[2001:db8::1]:3478".into(),
        ],
        ..IceConfig::default()
    };
    let settings = IceSettings::from_config(
        &ice,
        "ovl-test",
        "100.64.0.0/10".parse().unwrap(),
        None,
        mux,
    );
    let hosts: Vec<&str> = settings.urls.iter().map(|u| u.host.as_str()).collect();
    assert_eq!(hosts, ["203.0.113.1"]);
    assert_eq!(
        agent_config(&settings, FULL).network_types,
        [NetworkType::Udp4]
    );
    let (events, _rx) = mpsc::unbounded_channel();
    let mut session = IceSession::new(&settings, FULL, 2, 1, events)
        .await
        .expect("agent");
    let v6 = "candidate:1 1 udp 2130706431 2001:db8:2::7 5000 typ host";
    assert!(session.add_remote_candidate(v6).is_err());
    let v4 = "candidate:1 1 udp 2130706431 10.1.2.3 5000 typ host";
    assert!(session.add_remote_candidate(v4).is_ok());
    session.close();
}

#[test]
fn servers_named_by_ipv6_addresses_are_skipped_without_ipv6() {
    assert!(reachable("2001:db8::1", true));
    assert!(!reachable("2001:db8::1", false));
    assert!(reachable("203.0.113.1", false));
    assert!(reachable("stun.example.com", false));
}

/// Two agents, each on its own dual-stack mux, with only IPv6 candidates:
/// they must pair over IPv6, and the pair must read as such (`[::1]:port`,
/// labelled `direct (host, v6)`). The agents may gather only `::1` (the
/// daemon never offers loopback; a test host need have no other IPv6
/// address), so the usual filter is swapped for that one.
#[tokio::test]
async fn two_agents_pair_over_ipv6_alone() {
    let loopback6 = |ip: IpAddr| ip == IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);
    let (pair, a_port, b_port) = pair_up(loopback6).await;
    let b_addr: SocketAddr = format!("[::1]:{b_port}").parse().unwrap();
    assert_eq!(pair.remote_addr, b_addr.to_string());
    assert_eq!(pair.remote_addr.parse::<SocketAddr>().unwrap(), b_addr);
    assert_eq!(pair.label(), "direct (host, v6)");
    assert_eq!(pair.local_addr, format!("[::1]:{a_port}"));
}

/// Both families on offer (`127.0.0.1` and `::1` on each side, one shared
/// dual-stack socket each): the agents connect, on whichever pair answers
/// first. webrtc-ice hands every host candidate of an agent the same conn, so
/// a check's answer may be read by the candidate of the other family; this
/// shows that costs retries, not the connection.
#[tokio::test]
async fn two_agents_with_both_families_connect() {
    for _ in 0..ROUNDS {
        let (pair, _, b_port) = pair_up(|ip: IpAddr| ip.is_loopback()).await;
        let remote: SocketAddr = pair.remote_addr.parse().unwrap();
        assert_eq!(remote.port(), b_port);
        assert!(remote.ip().is_loopback());
    }
}

const ROUNDS: usize = 20;

/// Two agents on their own dual-stack muxes, gathering the addresses
/// `gather` allows (loopback included), told each other's candidates as the
/// node would signal them; returns the controlling side's selected pair and
/// both muxes' ports once both sides are ready.
async fn pair_up(
    gather: impl Fn(IpAddr) -> bool + Clone + Send + Sync + 'static,
) -> (SelectedPair, u16, u16) {
    let side = |controlling: bool| {
        let gather = gather.clone();
        async move {
            let mux = Mux::bind().await.expect("UDP socket");
            assert!(mux.ipv6(), "the test host has IPv6");
            let reader = tokio::spawn(Arc::clone(&mux).serve_stun());
            let settings = IceSettings {
                urls: Vec::new(),
                turn: Vec::new(),
                mux,
                tun_name: "ovl-test".into(),
                mesh: "100.64.0.0/10".parse().unwrap(),
                mesh6: "fd7a:115c:a1e0::/48".parse().ok(),
            };
            let role = Role {
                controlling,
                direct_only: false,
            };
            let mut config = agent_config(&settings, role);
            config.include_loopback = true;
            config.ip_filter = Arc::new(Some(Box::new(gather)));
            let (tx, rx) = mpsc::unbounded_channel();
            let session = IceSession::with_config(&settings, config, 1, 7, tx.clone())
                .await
                .expect("agent");
            (settings, session, tx, rx, reader)
        }
    };
    let (settings_a, mut a, tx_a, mut rx_a, reader_a) = side(true).await;
    let (settings_b, mut b, tx_b, mut rx_b, reader_b) = side(false).await;
    // Candidates go straight into the other agent: `add_remote_candidate`
    // rightly refuses loopback from a peer.
    let deliver = |to: &IceSession, line: &str| {
        let c = webrtc_ice::candidate::candidate_base::unmarshal_candidate(line).unwrap();
        let c: Arc<dyn Candidate + Send + Sync> = Arc::new(c);
        to.agent.add_remote_candidate(&c).unwrap();
    };
    a.connect(true, 1, b.ufrag.clone(), b.pwd.clone(), tx_a);
    b.connect(false, 1, a.ufrag.clone(), a.pwd.clone(), tx_b);
    let mut selected = None;
    let mut ready = (false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while selected.is_none() || ready != (true, true) {
        let event = tokio::select! {
            Some(ev) = rx_a.recv() => (true, ev),
            Some(ev) = rx_b.recv() => (false, ev),
            _ = tokio::time::sleep_until(deadline) => {
                panic!("no IPv6 pair in 10 s: selected {selected:?}, ready {ready:?}")
            }
        };
        match event {
            (from_a, IceEvent::Candidate { candidate, .. }) => {
                deliver(if from_a { &b } else { &a }, &candidate)
            }
            (true, IceEvent::Selected { pair, .. }) => selected = Some(pair),
            (true, IceEvent::Ready { .. }) => ready.0 = true,
            (false, IceEvent::Ready { .. }) => ready.1 = true,
            (_, IceEvent::Failed { error, .. }) => panic!("ICE failed: {error}"),
            _ => {}
        }
    }
    let ports = (settings_a.mux.port(), settings_b.mux.port());
    a.close();
    b.close();
    reader_a.abort();
    reader_b.abort();
    (selected.unwrap(), ports.0, ports.1)
}

fn turn_url(server: &str) -> TurnUrl {
    let (host, port) = server.rsplit_once(':').unwrap();
    let host = host.trim_matches(|c| c == '[' || c == ']');
    TurnUrl {
        url: Url::parse_url(&format!("turn:{server}?transport=udp")).unwrap(),
        server: crate::ice::host_port(host, port.parse().unwrap()),
        v6: host.parse::<std::net::Ipv6Addr>().is_ok(),
    }
}

/// Every replica's TURN server is listed, but each ICE session allocates on
/// one per family: the first that answers.
#[test]
fn each_session_takes_one_turn_server_per_family_passing_over_silent_ones() {
    let turn = [
        turn_url("203.0.113.1:3478"),
        turn_url("[2001:db8::1]:3478"),
        turn_url("203.0.113.2:3478"),
        turn_url("[2001:db8::2]:3478"),
        turn_url("203.0.113.3:3478"),
    ];
    let hosts =
        |chosen: Vec<&Url>| -> Vec<String> { chosen.iter().map(|u| u.host.clone()).collect() };
    assert_eq!(
        hosts(choose_turn(&turn, |_| false)),
        ["203.0.113.1", "2001:db8::1"]
    );
    let dead = ["203.0.113.1:3478", "[2001:db8::1]:3478"];
    assert_eq!(
        hosts(choose_turn(&turn, |s| dead.contains(&s))),
        ["203.0.113.2", "2001:db8::2"]
    );
    // Every server of a family silent: the first, as if none were.
    assert_eq!(
        hosts(choose_turn(&turn, |s| s.starts_with("203."))),
        ["203.0.113.1", "2001:db8::1"]
    );
    assert_eq!(hosts(choose_turn(&turn[..1], |_| false)), ["203.0.113.1"]);
    assert!(choose_turn(&[], |_| false).is_empty());
}

const FULL: Role = Role {
    controlling: true,
    direct_only: false,
};

/// A direct-only session (see `PathState::on_direct_seen`) neither allocates
/// on a TURN server nor gathers relay candidates; a full one does both.
#[tokio::test]
async fn a_direct_only_session_gathers_no_relay() {
    let settings = IceSettings {
        urls: vec![Url::parse_url("stun:203.0.113.1:3478").unwrap()],
        turn: vec![turn_url("203.0.113.1:3478")],
        mux: Mux::bind().await.expect("UDP socket"),
        tun_name: "ovl-test".into(),
        mesh: "100.64.0.0/10".parse().unwrap(),
        mesh6: None,
    };
    let schemes = |config: &AgentConfig| -> Vec<SchemeType> {
        config.urls.iter().map(|u| u.scheme).collect()
    };
    let full = agent_config(&settings, FULL);
    assert_eq!(schemes(&full), [SchemeType::Stun, SchemeType::Turn]);
    assert!(full.candidate_types.contains(&CandidateType::Relay));

    let direct = agent_config(
        &settings,
        Role {
            controlling: false,
            direct_only: true,
        },
    );
    assert_eq!(schemes(&direct), [SchemeType::Stun]);
    assert_eq!(
        direct.candidate_types,
        [CandidateType::Host, CandidateType::ServerReflexive]
    );
    assert!(!direct.is_controlling);
}

//! `overlayctl netcheck`: does UDP get out, what public address does STUN see,
//! does the NAT keep one mapping for every destination, is TURN reachable; and
//! the same over IPv6 where the coordinator names IPv6 STUN servers
//! (`stun:[2001:db8::1]:3478`, or a name with an AAAA record). The classification is a plain function; the
//! probes are the IO around it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use overlay_proto::api::{NetcheckReport, StunProbe, TurnProbe};
use overlay_proto::coord::IceConfig;
use overlay_proto::signal::MappingBehaviour;
use tokio::net::UdpSocket;
use webrtc_util::Conn;

/// How long one STUN or TURN probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long looking up a server's IPv6 address may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The NAT's mapping behaviour from what STUN servers at different addresses saw
/// of one local socket, in the order they were asked.
pub fn classify(mapped: &[Option<SocketAddr>]) -> MappingBehaviour {
    let answered: Vec<_> = mapped.iter().flatten().collect();
    match answered.as_slice() {
        [] => MappingBehaviour::NoUdp,
        [_] => MappingBehaviour::Unknown,
        [first, rest @ ..] if rest.iter().all(|a| a == first) => {
            MappingBehaviour::EndpointIndependent
        }
        _ => MappingBehaviour::EndpointDependent,
    }
}

/// The port STUN and TURN URLs without one mean (RFC 7064, RFC 7065).
const DEFAULT_PORT: u16 = 3478;

/// `stun:host:port`, `stun:[v6]:port` or `turn:host:port?transport=udp` →
/// `host:port` (`[v6]:port`), the port 3478 when the URL has none.
pub fn server_addr(url: &str) -> Option<String> {
    let rest = url.split_once(':')?.1;
    let rest = rest.split('?').next()?;
    if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        let ip: std::net::Ipv6Addr = host.parse().ok()?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => DEFAULT_PORT,
            None => return None,
        };
        return Some(SocketAddr::new(ip.into(), port).to_string());
    }
    if rest.is_empty() {
        None
    } else if rest.contains(':') {
        Some(rest.to_owned())
    } else {
        Some(format!("{rest}:{DEFAULT_PORT}"))
    }
}

/// Whether a [`server_addr`] names an IPv6 server (a bracketed literal); host
/// names are asked over IPv4 by name, and over IPv6 at their AAAA address
/// ([`named_v6`]).
pub fn is_ipv6_server(server: &str) -> bool {
    server.starts_with('[')
}

/// The IPv6 address (`[v6]:port`) of each server among `servers` that is
/// named rather than written as an address and has one in DNS (the
/// caller drops repeats).
/// All looked up at once, so the slowest name bounds the wait.
async fn named_v6(servers: &[String]) -> Vec<String> {
    let lookups = servers
        .iter()
        .filter(|server| server.parse::<SocketAddr>().is_err())
        .map(|server| async move {
            let lookup = tokio::net::lookup_host(server.as_str());
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Ok(Ok(addrs)) => addrs.into_iter().find(SocketAddr::is_ipv6),
                _ => None,
            }
        });
    let found = futures_util::future::join_all(lookups).await;
    found.into_iter().flatten().map(|a| a.to_string()).collect()
}

pub async fn run(ice: &IceConfig, coordinator_rtt: Option<Duration>) -> NetcheckReport {
    let (servers6, servers): (Vec<String>, Vec<String>) = ice
        .stun
        .iter()
        .chain(ice.netcheck.iter())
        .filter_map(|u| server_addr(u))
        .partition(|s| is_ipv6_server(s));
    // One socket per family, asked side by side: IPv6 (and looking up the
    // IPv6 addresses of servers given by name) costs no extra time.
    let ipv6 = async {
        let mut servers6 = servers6;
        for v6 in named_v6(&servers).await {
            if !servers6.contains(&v6) {
                servers6.push(v6);
            }
        }
        stun_probes(&servers6, true).await
    };
    let (stun, stun6) = tokio::join!(stun_probes(&servers, false), ipv6);
    let answers = |probes: &[StunProbe]| -> Vec<Option<SocketAddr>> {
        probes
            .iter()
            .map(|p| p.mapped.as_ref().and_then(|m| m.parse().ok()))
            .collect()
    };
    let mapped = answers(&stun);
    let mapped6 = answers(&stun6);
    let mut turn = Vec::new();
    for server in &ice.turn {
        for url in &server.urls {
            let Some(addr) = server_addr(url) else {
                continue;
            };
            turn.push(turn_probe(&addr, &server.username, &server.credential).await);
        }
    }
    NetcheckReport {
        udp: mapped.iter().any(Option::is_some),
        public_addr: mapped.iter().flatten().next().copied(),
        // The NAT question is IPv4's: IPv6 has no NAT to classify.
        mapping: classify(&mapped),
        stun: stun.into_iter().chain(stun6).collect(),
        turn,
        coordinator_rtt_ms: coordinator_rtt.map(|d| d.as_secs_f64() * 1000.0),
        udp6: mapped6.iter().any(Option::is_some),
        public_addr6: mapped6.iter().flatten().next().copied(),
    }
}

/// Asks every server from one socket (IPv6 when `v6`), so the answers compare
/// one mapping.
async fn stun_probes(servers: &[String], v6: bool) -> Vec<StunProbe> {
    let failed = |server: &String, error: String| StunProbe {
        server: server.clone(),
        mapped: None,
        rtt_ms: None,
        error: Some(error),
    };
    let Some(first) = servers.first() else {
        return Vec::new();
    };
    let client = match client(first, first, "", "", v6).await {
        Ok(c) => c,
        Err(e) => return servers.iter().map(|s| failed(s, e.clone())).collect(),
    };
    let mut probes = Vec::new();
    for server in servers {
        let started = Instant::now();
        let probe =
            match tokio::time::timeout(PROBE_TIMEOUT, client.send_binding_request_to(server)).await
            {
                Ok(Ok(mapped)) => StunProbe {
                    server: server.clone(),
                    mapped: Some(mapped.to_string()),
                    rtt_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
                    error: None,
                },
                Ok(Err(e)) => failed(server, e.to_string()),
                Err(_) => failed(server, "no answer (UDP blocked?)".into()),
            };
        probes.push(probe);
    }
    let _ = client.close().await;
    probes
}

async fn turn_probe(server: &str, username: &str, password: &str) -> TurnProbe {
    let result = async {
        let v6 = is_ipv6_server(server);
        let client = client(server, server, username, password, v6).await?;
        let allocated = tokio::time::timeout(PROBE_TIMEOUT, client.allocate()).await;
        let outcome = match allocated {
            Ok(Ok(relay)) => {
                let addr = relay.local_addr().map_err(|e| e.to_string());
                let _ = relay.close().await;
                addr.map(|a| a.to_string())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer (UDP blocked?)".to_owned()),
        };
        let _ = client.close().await;
        outcome
    }
    .await;
    match result {
        Ok(relay) => TurnProbe {
            server: server.to_owned(),
            relay_addr: Some(relay),
            error: None,
        },
        Err(error) => TurnProbe {
            server: server.to_owned(),
            relay_addr: None,
            error: Some(error),
        },
    }
}

async fn client(
    stun: &str,
    turn: &str,
    username: &str,
    password: &str,
    v6: bool,
) -> Result<turn::client::Client, String> {
    let any = if v6 { "[::]:0" } else { "0.0.0.0:0" };
    let socket = UdpSocket::bind(any).await.map_err(|e| e.to_string())?;
    let conn: Arc<dyn Conn + Send + Sync> = Arc::new(socket);
    let client = turn::client::Client::new(turn::client::ClientConfig {
        stun_serv_addr: stun.to_owned(),
        turn_serv_addr: turn.to_owned(),
        username: username.to_owned(),
        password: password.to_owned(),
        realm: String::new(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await
    .map_err(|e| e.to_string())?;
    client.listen().await.map_err(|e| e.to_string())?;
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn mapping_is_classified_from_what_servers_saw() {
        use MappingBehaviour::*;
        assert_eq!(classify(&[]), NoUdp);
        assert_eq!(classify(&[None, None]), NoUdp);
        assert_eq!(classify(&[a("203.0.113.9:4000"), None]), Unknown);
        assert_eq!(
            classify(&[a("203.0.113.9:4000"), a("203.0.113.9:4000")]),
            EndpointIndependent
        );
        assert_eq!(
            classify(&[a("203.0.113.9:4000"), a("203.0.113.9:4711")]),
            EndpointDependent
        );
    }

    #[test]
    fn server_addresses_come_from_urls() {
        assert_eq!(
            server_addr("stun:203.0.113.1:3478").as_deref(),
            Some("203.0.113.1:3478")
        );
        assert_eq!(
            server_addr("turn:203.0.113.1:3479?transport=udp").as_deref(),
            Some("203.0.113.1:3479")
        );
        assert_eq!(
            server_addr("stun:example.com").as_deref(),
            Some("example.com:3478")
        );
        assert_eq!(server_addr("nonsense"), None);
    }

    #[tokio::test]
    async fn netcheck_asks_ipv6_stun_servers_beside_ipv4_ones() {
        let (server4, a) = crate::ice::test_stun_server([127, 0, 0, 1].into()).await;
        let (server6, b) = crate::ice::test_stun_server(std::net::Ipv6Addr::LOCALHOST.into()).await;
        let ice = IceConfig {
            stun: vec![format!("stun:{server4}"), format!("stun:{server6}")],
            ..IceConfig::default()
        };
        let report = run(&ice, None).await;
        a.abort();
        b.abort();
        assert!(report.udp && report.udp6, "{report:?}");
        assert!(
            report.public_addr.is_some_and(|a| a.is_ipv4()),
            "{report:?}"
        );
        let public6 = report.public_addr6.expect("an IPv6 answer");
        assert_eq!(public6.ip(), std::net::Ipv6Addr::LOCALHOST);
        assert_eq!(report.stun.len(), 2);
        // One IPv4 answer: the NAT's mapping cannot be told from one server.
        assert_eq!(report.mapping, MappingBehaviour::Unknown);
    }

    /// A server named in DNS is asked over IPv6 at its AAAA address: here
    /// `localhost`, with the STUN server listening on ::1 only.
    #[tokio::test]
    async fn a_named_stun_server_is_asked_over_ipv6_too() {
        let (server6, task) =
            crate::ice::test_stun_server(std::net::Ipv6Addr::LOCALHOST.into()).await;
        let port = server6.port();
        let ice = IceConfig {
            stun: vec![format!("stun:localhost:{port}")],
            ..IceConfig::default()
        };
        let report = run(&ice, None).await;
        task.abort();
        let named6 = tokio::net::lookup_host(("localhost", port))
            .await
            .is_ok_and(|mut a| a.any(|a| a.ip() == std::net::Ipv6Addr::LOCALHOST));
        if named6 {
            assert!(report.udp6, "{report:?}");
            assert_eq!(
                report.public_addr6.map(|a| a.ip()),
                Some(std::net::Ipv6Addr::LOCALHOST.into())
            );
            assert!(
                report
                    .stun
                    .iter()
                    .any(|p| p.server == format!("[::1]:{port}")),
                "{report:?}"
            );
        } else {
            // This host's `localhost` has no IPv6 address: nothing to ask.
            assert!(!report.udp6, "{report:?}");
        }
    }

    #[tokio::test]
    async fn without_ipv6_servers_netcheck_reports_no_ipv6() {
        let (server4, a) = crate::ice::test_stun_server([127, 0, 0, 1].into()).await;
        let ice = IceConfig {
            stun: vec![format!("stun:{server4}")],
            ..IceConfig::default()
        };
        let report = run(&ice, None).await;
        a.abort();
        assert!(report.udp && !report.udp6, "{report:?}");
        assert_eq!(report.public_addr6, None);
    }

    #[test]
    fn ipv6_server_addresses_keep_their_brackets() {
        assert_eq!(
            server_addr("stun:[2001:db8::1]:3478").as_deref(),
            Some("[2001:db8::1]:3478")
        );
        assert_eq!(
            server_addr("stun:[2001:db8::1]").as_deref(),
            Some("[2001:db8::1]:3478")
        );
        assert_eq!(
            server_addr("turn:[2001:db8::1]:3479?transport=udp").as_deref(),
            Some("[2001:db8::1]:3479")
        );
        assert_eq!(server_addr("stun:[2001:db8::1"), None);
        assert_eq!(server_addr("stun:[not-v6]:3478"), None);
        assert_eq!(server_addr("stun:[2001:db8::1]x"), None);
        let parsed: SocketAddr = server_addr("stun:[2001:db8::1]").unwrap().parse().unwrap();
        assert!(parsed.is_ipv6());
        assert!(is_ipv6_server(&server_addr("stun:[2001:db8::1]").unwrap()));
        assert!(!is_ipv6_server(&server_addr("stun:203.0.113.1").unwrap()));
        assert!(!is_ipv6_server(&server_addr("stun:example.com").unwrap()));
    }
}

//! `overlayctl netcheck`: does UDP get out, what public address does STUN see,
//! does the NAT keep one mapping for every destination, is TURN reachable.
//! The classification is a plain function; the probes are the IO around it.

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

/// `stun:host:port` or `turn:host:port?transport=udp` → `host:port`.
pub fn server_addr(url: &str) -> Option<String> {
    let rest = url.split_once(':')?.1;
    let rest = rest.split('?').next()?;
    if rest.contains(':') {
        Some(rest.to_owned())
    } else {
        Some(format!("{rest}:3478"))
    }
}

pub async fn run(ice: &IceConfig, coordinator_rtt: Option<Duration>) -> NetcheckReport {
    let servers: Vec<String> = ice
        .stun
        .iter()
        .chain(ice.netcheck.iter())
        .filter_map(|u| server_addr(u))
        .collect();
    let stun = stun_probes(&servers).await;
    let mapped: Vec<Option<SocketAddr>> = stun
        .iter()
        .map(|p| p.mapped.as_ref().and_then(|m| m.parse().ok()))
        .collect();
    let mapping = classify(&mapped);
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
        mapping,
        stun,
        turn,
        coordinator_rtt_ms: coordinator_rtt.map(|d| d.as_secs_f64() * 1000.0),
        udp6: false,
        public_addr6: None,
    }
}

/// Asks every server from one socket, so the answers compare one mapping.
async fn stun_probes(servers: &[String]) -> Vec<StunProbe> {
    let failed = |server: &String, error: String| StunProbe {
        server: server.clone(),
        mapped: None,
        rtt_ms: None,
        error: Some(error),
    };
    let Some(first) = servers.first() else {
        return Vec::new();
    };
    let client = match client(first, first, "", "").await {
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
        let client = client(server, server, username, password).await?;
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
) -> Result<turn::client::Client, String> {
    let socket = UdpSocket::bind("0.0.0.0:0")
        .await
        .map_err(|e| e.to_string())?;
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
}

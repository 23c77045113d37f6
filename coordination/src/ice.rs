//! The ICE configuration handed to nodes: STUN URLs, and TURN servers with
//! fresh REST credentials (the embedded server and any external coturn).

use std::net::{IpAddr, SocketAddr};

use overlay_proto::coord::{IceConfig, TurnServer};
use overlay_proto::NodeId;

use crate::auth;
use crate::config::ExternalTurn;

/// One TURN deployment and the secret its credentials are derived from.
#[derive(Debug, Clone)]
struct TurnDeployment {
    urls: Vec<String>,
    secret: String,
}

/// Everything needed to build an [`IceConfig`] for a node at a given time.
#[derive(Debug, Clone, Default)]
pub struct IceSettings {
    stun: Vec<String>,
    netcheck: Vec<String>,
    turn: Vec<TurnDeployment>,
    ttl_secs: u64,
}

/// `host:port` with IPv6 hosts bracketed, as URLs want them.
fn host_port(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
    }
}

impl IceSettings {
    /// `embedded`: the announced addresses of the embedded STUN/TURN
    /// server, one per family it serves. Each is a `stun:` URL and a `turn:`
    /// URL of the one deployment: a node that reaches it over IPv4 and IPv6
    /// gets a relay in each family, with one credential.
    pub fn new(
        embedded: &[SocketAddr],
        secret: &str,
        external: &[ExternalTurn],
        ttl_secs: u64,
    ) -> IceSettings {
        let mut settings = IceSettings {
            ttl_secs,
            ..IceSettings::default()
        };
        if !embedded.is_empty() {
            let hps: Vec<String> = embedded.iter().map(|a| host_port(*a)).collect();
            settings
                .stun
                .extend(hps.iter().map(|hp| format!("stun:{hp}")));
            settings.turn.push(TurnDeployment {
                urls: hps
                    .iter()
                    .map(|hp| format!("turn:{hp}?transport=udp"))
                    .collect(),
                secret: secret.to_string(),
            });
        }
        for ext in external {
            let (stun, turn): (Vec<_>, Vec<_>) = ext
                .urls
                .iter()
                .cloned()
                .partition(|u| u.starts_with("stun:"));
            settings.stun.extend(stun);
            if !turn.is_empty() {
                settings.turn.push(TurnDeployment {
                    urls: turn,
                    secret: ext.secret.clone().unwrap_or_else(|| secret.to_string()),
                });
            }
        }
        settings
    }

    /// Announces a STUN-only listener that netcheck compares with the main one.
    pub fn with_netcheck(mut self, addr: SocketAddr) -> Self {
        self.netcheck.push(format!("stun:{}", host_port(addr)));
        self
    }

    /// The configuration for `node`, with credentials valid from `now`.
    pub fn for_node(&self, node: NodeId, now: u64) -> IceConfig {
        IceConfig {
            stun: self.stun.clone(),
            netcheck: self.netcheck.clone(),
            turn: self
                .turn
                .iter()
                .map(|t| {
                    let c = auth::turn_credential(&t.secret, node, now, self.ttl_secs);
                    TurnServer {
                        urls: t.urls.clone(),
                        username: c.username,
                        credential: c.password,
                        expires_at: c.expires_at,
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_server_is_announced_with_stun_and_turn_urls() {
        let s = IceSettings::new(&["192.0.2.1:3478".parse().unwrap()], "secret", &[], 43_200);
        let ice = s.for_node(42, 1_699_956_800);
        assert_eq!(ice.stun, vec!["stun:192.0.2.1:3478"]);
        assert_eq!(ice.turn.len(), 1);
        assert_eq!(ice.turn[0].urls, vec!["turn:192.0.2.1:3478?transport=udp"]);
        assert_eq!(ice.turn[0].username, "1700000000:42");
        assert_eq!(ice.turn[0].credential, "ZzfPuPkrzUOsnm5YISnTiKDnXWo=");
        assert_eq!(ice.turn[0].expires_at, 1_700_000_000);
    }

    #[test]
    fn external_servers_get_their_own_secret_and_stun_urls_split_out() {
        let ext = vec![
            ExternalTurn {
                urls: vec![
                    "stun:turn.example.com:3478".into(),
                    "turn:turn.example.com:3478?transport=udp".into(),
                ],
                secret: Some("other".into()),
            },
            ExternalTurn {
                urls: vec!["turns:t2.example.com:5349".into()],
                secret: None,
            },
        ];
        let s = IceSettings::new(&[], "secret", &ext, 60);
        let ice = s.for_node(1, 1000);
        assert_eq!(ice.stun, vec!["stun:turn.example.com:3478"]);
        assert_eq!(ice.turn.len(), 2);
        assert_eq!(
            ice.turn[0].credential,
            auth::turn_password("other", "1060:1")
        );
        assert_eq!(
            ice.turn[1].credential,
            auth::turn_password("secret", "1060:1")
        );
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        let s = IceSettings::new(&["[2001:db8::1]:3478".parse().unwrap()], "s", &[], 60);
        assert_eq!(s.for_node(1, 0).stun, vec!["stun:[2001:db8::1]:3478"]);
    }

    #[test]
    fn a_dual_stack_server_is_announced_in_both_families_with_one_credential() {
        let s = IceSettings::new(
            &[
                "192.0.2.1:3478".parse().unwrap(),
                "[2001:db8::1]:3478".parse().unwrap(),
            ],
            "secret",
            &[],
            60,
        )
        .with_netcheck("192.0.2.1:3479".parse().unwrap())
        .with_netcheck("[2001:db8::1]:3479".parse().unwrap());
        let ice = s.for_node(7, 1000);
        assert_eq!(
            ice.stun,
            vec!["stun:192.0.2.1:3478", "stun:[2001:db8::1]:3478"]
        );
        assert_eq!(ice.turn.len(), 1, "one server, one credential");
        assert_eq!(
            ice.turn[0].urls,
            vec![
                "turn:192.0.2.1:3478?transport=udp",
                "turn:[2001:db8::1]:3478?transport=udp"
            ]
        );
        assert_eq!(
            ice.netcheck,
            vec!["stun:192.0.2.1:3479", "stun:[2001:db8::1]:3479"]
        );
    }
}

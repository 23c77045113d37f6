//! The ICE configuration handed to nodes: STUN URLs, and TURN servers with
//! fresh REST credentials (the embedded server and any external coturn).
//!
//! With replicas, a node is also told the other live replicas' embedded
//! STUN/TURN servers, after its own replica's: each replica says its URLs in
//! its bus heartbeats ([`ReplicaIceDirectory`]). Their `turn:` URLs go in
//! the same `TurnServer` entry as the own embedded server's, under one
//! credential: the TURN secret is the deployment's (kept in the shared store),
//! so every replica's server accepts it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock, RwLock};

use overlay_proto::coord::{IceConfig, TurnServer};
use overlay_proto::NodeId;

use crate::auth;
use crate::bus::{ReplicaIce, ReplicaId};
use crate::config::ExternalTurn;

/// This replica's embedded STUN/TURN URLs and the other live replicas'.
#[derive(Debug, Default)]
pub struct ReplicaIceDirectory {
    own: OnceLock<ReplicaIce>,
    /// By replica id, so every node lists the others in the same order.
    others: RwLock<BTreeMap<ReplicaId, ReplicaIce>>,
}

impl ReplicaIceDirectory {
    /// This replica's URLs, told to the others from now on (set once).
    pub fn set_own(&self, ice: ReplicaIce) {
        let _ = self.own.set(ice);
    }

    pub fn own(&self) -> Option<ReplicaIce> {
        self.own.get().cloned()
    }

    /// A heartbeat of `replica`: its URLs, or none (an older replica, or one
    /// without an embedded server).
    pub fn heard(&self, replica: ReplicaId, ice: Option<ReplicaIce>) {
        let mut others = self.others.write().unwrap_or_else(|e| e.into_inner());
        match ice {
            Some(ice) if others.get(&replica) != Some(&ice) => {
                others.insert(replica, ice);
            }
            Some(_) => {}
            None => {
                others.remove(&replica);
            }
        }
    }

    /// `replica` is gone (unheard, or the bus lost): nodes are no longer told of it.
    pub fn forget(&self, replica: ReplicaId) {
        self.others
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&replica);
    }

    /// The live other replicas' URLs, in replica id order.
    pub fn others(&self) -> Vec<ReplicaIce> {
        self.others
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

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
    /// The other replicas' servers, listed after these (replicas only).
    replicas: Option<Arc<ReplicaIceDirectory>>,
    /// The deployment's TURN secret, for the other replicas' TURN URLs when
    /// this replica runs no embedded server.
    secret: String,
}

/// `host:port` with IPv6 hosts bracketed, as URLs want them.
fn host_port(addr: SocketAddr) -> String {
    match addr.ip() {
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
    }
}

/// What this replica tells the others of its embedded STUN/TURN server
/// (`embedded`, one address per family) and its netcheck responders.
pub fn replica_ice(embedded: &[SocketAddr], netcheck: &[SocketAddr]) -> ReplicaIce {
    ReplicaIce {
        stun: embedded
            .iter()
            .map(|a| format!("stun:{}", host_port(*a)))
            .collect(),
        turn: embedded
            .iter()
            .map(|a| format!("turn:{}?transport=udp", host_port(*a)))
            .collect(),
        netcheck: netcheck
            .iter()
            .map(|a| format!("stun:{}", host_port(*a)))
            .collect(),
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
            secret: secret.to_string(),
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

    /// Lists the other live replicas of `directory` after this one's own
    /// servers, in every configuration handed out from now on.
    pub fn with_replicas(mut self, directory: Arc<ReplicaIceDirectory>) -> Self {
        self.replicas = Some(directory);
        self
    }

    /// The configuration for `node`, with credentials valid from `now`.
    pub fn for_node(&self, node: NodeId, now: u64) -> IceConfig {
        let mut stun = self.stun.clone();
        let mut netcheck = self.netcheck.clone();
        let mut turn = self.turn.clone();
        let others = self
            .replicas
            .as_ref()
            .map(|d| d.others())
            .unwrap_or_default();
        if others.iter().any(|o| !o.turn.is_empty()) {
            // The embedded deployment is the first one when it runs.
            if turn.first().is_none_or(|t| t.secret != self.secret) {
                turn.insert(
                    0,
                    TurnDeployment {
                        urls: Vec::new(),
                        secret: self.secret.clone(),
                    },
                );
            }
        }
        for other in others {
            stun.extend(other.stun);
            netcheck.extend(other.netcheck);
            if let Some(own) = turn.first_mut() {
                own.urls.extend(other.turn);
            }
        }
        IceConfig {
            stun,
            netcheck,
            turn: turn
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
    fn other_live_replicas_are_listed_after_the_own_one_under_one_credential() {
        let own: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        let directory = Arc::new(ReplicaIceDirectory::default());
        let s = IceSettings::new(&[own], "secret", &[], 60)
            .with_netcheck("192.0.2.1:3479".parse().unwrap())
            .with_replicas(Arc::clone(&directory));
        // Alone: as without replicas.
        assert_eq!(
            s.for_node(7, 1000),
            IceSettings::new(&[own], "secret", &[], 60)
                .with_netcheck("192.0.2.1:3479".parse().unwrap())
                .for_node(7, 1000)
        );
        let other = |ip: &str| {
            let addr: SocketAddr = format!("{ip}:3478").parse().unwrap();
            replica_ice(&[addr], &[SocketAddr::new(addr.ip(), 3479)])
        };
        directory.heard(9, Some(other("192.0.2.3")));
        directory.heard(5, Some(other("192.0.2.2")));
        let ice = s.for_node(7, 1000);
        assert_eq!(
            ice.stun,
            vec![
                "stun:192.0.2.1:3478",
                "stun:192.0.2.2:3478",
                "stun:192.0.2.3:3478"
            ]
        );
        assert_eq!(
            ice.netcheck,
            vec![
                "stun:192.0.2.1:3479",
                "stun:192.0.2.2:3479",
                "stun:192.0.2.3:3479"
            ]
        );
        assert_eq!(
            ice.turn.len(),
            1,
            "one credential for every replica's server"
        );
        assert_eq!(
            ice.turn[0].urls,
            vec![
                "turn:192.0.2.1:3478?transport=udp",
                "turn:192.0.2.2:3478?transport=udp",
                "turn:192.0.2.3:3478?transport=udp"
            ]
        );
        assert_eq!(
            ice.turn[0].credential,
            auth::turn_password("secret", "1060:7")
        );
        // A replica that is gone, or says it has no server, is dropped.
        directory.forget(5);
        directory.heard(9, None);
        assert_eq!(s.for_node(7, 1000).stun, vec!["stun:192.0.2.1:3478"]);
    }

    #[test]
    fn without_an_own_embedded_server_the_others_get_a_turn_entry_of_their_own() {
        let directory = Arc::new(ReplicaIceDirectory::default());
        let ext = vec![ExternalTurn {
            urls: vec!["turn:turn.example.com:3478?transport=udp".into()],
            secret: Some("other".into()),
        }];
        let s = IceSettings::new(&[], "secret", &ext, 60).with_replicas(Arc::clone(&directory));
        directory.heard(
            3,
            Some(replica_ice(&["[2001:db8::2]:3478".parse().unwrap()], &[])),
        );
        let ice = s.for_node(1, 1000);
        assert_eq!(ice.stun, vec!["stun:[2001:db8::2]:3478"]);
        assert_eq!(ice.turn.len(), 2);
        assert_eq!(
            ice.turn[0].urls,
            vec!["turn:[2001:db8::2]:3478?transport=udp"]
        );
        assert_eq!(
            ice.turn[0].credential,
            auth::turn_password("secret", "1060:1")
        );
        assert_eq!(
            ice.turn[1].credential,
            auth::turn_password("other", "1060:1")
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

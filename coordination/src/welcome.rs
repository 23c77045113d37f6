//! The netmap a session starts with: one `Welcome`, and for a large mesh the
//! `PeerBatch` parts that follow it.
//!
//! ```text
//!   small mesh:  Welcome{peers: all, more: false}
//!   large mesh:  Welcome{peers: part 1, more: true} → PeerBatch{part 2, last: false}
//!                → … → PeerBatch{part n, last: true}
//! ```
//!
//! Parts are cut by size, not by count, because size is what costs: tungstenite
//! keeps its write buffer at the capacity of the largest message a session
//! ever sent, so one netmap-sized frame would pin a netmap-sized buffer to
//! every session for its whole life (10,000 sessions × 1.3 MB).
//!
//! Nor does anything else grow with it: a session does not copy the netmap
//! when it attaches, it reads it from the hub one page (one part) at a time,
//! in node-id order. Each node's record is serialized once, whenever it
//! changes (the hub keeps the text beside the record), and a part is a
//! concatenation of those shared texts.
//!
//! A page read later than the attach may already show a change that is also
//! queued as a delta for the session, or miss a node added after its page
//! was read. Either way the node ends up right: deltas carry a peer's whole
//! state, the session subscribed to them before reading the first page, and
//! they reach the node after the last part.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use ipnet::{Ipv4Net, Ipv6Net};

use overlay_proto::coord::{IceConfig, PeerInfo};
use overlay_proto::NodeId;

/// One node's `PeerInfo` as JSON, shared by every netmap that lists it.
pub type PeerJson = Arc<str>;

pub fn peer_json(peer: &PeerInfo) -> PeerJson {
    // Serializing this plain struct cannot fail.
    Arc::from(serde_json::to_string(peer).unwrap_or_default())
}

/// Everything in a `Welcome` besides the peers.
#[derive(Debug, Clone)]
pub struct Head {
    pub protocol: u32,
    pub node: PeerInfo,
    pub network: Ipv4Net,
    /// The mesh's IPv6 prefix; `None` leaves the field out.
    pub network6: Option<Ipv6Net>,
    pub ice: IceConfig,
    /// The node's `NodeFilter` as JSON; `None` while no policy is in force.
    pub filter: Option<Arc<str>>,
}

/// One part of a netmap.
#[derive(Debug, Default)]
pub struct Page {
    pub peers: Vec<PeerJson>,
    /// Where the next page starts; `None` when this one is the last.
    pub next: Option<NodeId>,
}

/// Takes peers from `peers` while their JSON (with the commas between them)
/// stays within `max_bytes`; a peer larger than that on its own still makes
/// a page by itself.
pub fn fill<'a>(peers: impl IntoIterator<Item = (NodeId, &'a PeerJson)>, max_bytes: usize) -> Page {
    let mut page = Page::default();
    let mut bytes = 0;
    for (id, json) in peers {
        let add = json.len() + usize::from(!page.peers.is_empty());
        if !page.peers.is_empty() && bytes + add > max_bytes {
            page.next = Some(id);
            break;
        }
        bytes += add;
        page.peers.push(Arc::clone(json));
    }
    page
}

/// The text of one part: the Welcome when `first`, else a PeerBatch.
pub fn part_text(head: &Head, page: &Page, first: bool) -> Utf8Bytes {
    Utf8Bytes::from(if first {
        welcome_text(head, &page.peers, page.next.is_some(), false)
    } else {
        batch_text(&page.peers, page.next.is_none())
    })
}

/// The Welcome of a node whose netmap is current: no peers, `resumed`.
pub fn resumed_text(head: &Head) -> Utf8Bytes {
    Utf8Bytes::from(welcome_text(head, &[], false, true))
}

/// `ServerMsg::Welcome` exactly as serde writes it (a test holds the two
/// together), with the peers' stored JSON spliced in.
fn welcome_text(head: &Head, peers: &[PeerJson], more: bool, resumed: bool) -> String {
    let mut s = String::with_capacity(512 + array_len(peers));
    let _ = write!(s, r#"{{"type":"welcome","protocol":{}"#, head.protocol);
    s.push_str(r#","node":"#);
    s.push_str(&json(&head.node));
    s.push_str(r#","network":"#);
    s.push_str(&json(&head.network));
    if let Some(network6) = &head.network6 {
        s.push_str(r#","network6":"#);
        s.push_str(&json(network6));
    }
    s.push_str(r#","peers":"#);
    push_array(&mut s, peers);
    s.push_str(r#","ice":"#);
    s.push_str(&json(&head.ice));
    if more {
        s.push_str(r#","more":true"#);
    }
    if let Some(filter) = &head.filter {
        s.push_str(r#","filter":"#);
        s.push_str(filter);
    }
    if resumed {
        s.push_str(r#","resumed":true"#);
    }
    s.push('}');
    s
}

/// `ServerMsg::PeerBatch` exactly as serde writes it.
fn batch_text(peers: &[PeerJson], last: bool) -> String {
    let mut s = String::with_capacity(48 + array_len(peers));
    s.push_str(r#"{"type":"peer_batch","peers":"#);
    push_array(&mut s, peers);
    let _ = write!(s, r#","last":{last}}}"#);
    s
}

fn array_len(peers: &[PeerJson]) -> usize {
    2 + peers.iter().map(|p| p.len() + 1).sum::<usize>()
}

fn push_array(s: &mut String, peers: &[PeerJson]) {
    s.push('[');
    for (i, peer) in peers.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(peer);
    }
    s.push(']');
}

/// The Welcome's other fields are plain structs: serializing cannot fail.
fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_proto::coord::{ServerMsg, TurnServer};

    fn peer(id: u64) -> PeerInfo {
        PeerInfo {
            id,
            name: format!("node-{id}"),
            mesh_ip: std::net::Ipv4Addr::new(100, 64, (id >> 8) as u8, id as u8),
            mesh_ip6: None,
            public_key: format!("{id:0>43}="),
            online: id & 1 == 0,
            tags: Vec::new(),
        }
    }

    fn head() -> Head {
        Head {
            protocol: overlay_proto::PROTOCOL_VERSION,
            node: PeerInfo {
                online: true,
                ..peer(0)
            },
            network: "100.64.0.0/10".parse().unwrap(),
            network6: None,
            ice: IceConfig {
                stun: vec!["stun:192.0.2.1:3478".into()],
                turn: vec![TurnServer {
                    urls: vec!["turn:192.0.2.1:3478?transport=udp".into()],
                    username: "1700000000:0".into(),
                    credential: "c\"red\\".into(),
                    expires_at: 1_700_000_000,
                }],
                netcheck: vec![],
            },
            filter: None,
        }
    }

    fn netmap(n: u64) -> (Vec<PeerInfo>, Vec<PeerJson>) {
        let peers: Vec<PeerInfo> = (1..=n).map(peer).collect();
        let json = peers.iter().map(peer_json).collect();
        (peers, json)
    }

    /// The parts a session sends for `json` (ids 1..), paged as the hub does.
    fn parts(head: &Head, json: &[PeerJson], max_bytes: usize) -> Vec<Utf8Bytes> {
        let mut texts = Vec::new();
        let mut from = 1;
        loop {
            let page = fill((1..).zip(json).skip_while(|(id, _)| *id < from), max_bytes);
            texts.push(part_text(head, &page, texts.is_empty()));
            match page.next {
                Some(next) => from = next,
                None => return texts,
            }
        }
    }

    fn parse(texts: Vec<Utf8Bytes>) -> Vec<ServerMsg> {
        texts
            .iter()
            .map(|t| serde_json::from_str(t.as_str()).expect("valid ServerMsg"))
            .collect()
    }

    #[test]
    fn texts_are_what_serde_writes() {
        let (peers, json) = netmap(3);
        let filter = overlay_proto::filter::NodeFilter {
            inbound: vec![overlay_proto::filter::FilterRule {
                peers: vec!["tag:dev".parse().unwrap()],
                proto: overlay_proto::filter::Proto::Tcp,
                ports: vec![overlay_proto::filter::PortRange::one(22)],
            }],
            outbound: vec![],
        };
        let network6: ipnet::Ipv6Net = "fd12:3456:789a::/48".parse().unwrap();
        let dual = |p: &PeerInfo| PeerInfo {
            mesh_ip6: Some(overlay_proto::coord::mesh_ip6(network6, p.mesh_ip)),
            ..p.clone()
        };
        let cases = [
            (None, None),
            (Some(filter.clone()), None),
            (None, Some(network6)),
            (Some(filter), Some(network6)),
        ];
        for (with_filter, network6) in cases {
            // With a prefix, every record carries its IPv6 address.
            let listed: Vec<PeerInfo> = match network6 {
                Some(_) => peers.iter().map(dual).collect(),
                None => peers.clone(),
            };
            let texts: Vec<PeerJson> = listed.iter().map(peer_json).collect();
            let h = Head {
                filter: with_filter
                    .as_ref()
                    .map(|f| Arc::from(serde_json::to_string(f).unwrap())),
                network6,
                node: match network6 {
                    Some(_) => dual(&head().node),
                    None => head().node,
                },
                ..head()
            };
            for (more, resumed) in [(false, false), (true, false), (false, true)] {
                let expected = serde_json::to_string(&ServerMsg::Welcome {
                    protocol: h.protocol,
                    node: h.node.clone(),
                    network: h.network,
                    network6: h.network6,
                    peers: listed.clone(),
                    ice: h.ice.clone(),
                    more,
                    filter: with_filter.clone(),
                    resumed,
                })
                .unwrap();
                assert_eq!(welcome_text(&h, &texts, more, resumed), expected);
                assert_eq!(
                    expected.contains(r#""network6":"fd12:3456:789a::/48""#),
                    network6.is_some()
                );
                assert_eq!(
                    expected.contains("6440:1"),
                    network6.is_some(),
                    "peer 1's mesh_ip6"
                );
            }
        }
        for last in [false, true] {
            let expected = serde_json::to_string(&ServerMsg::PeerBatch {
                peers: peers.clone(),
                last,
            })
            .unwrap();
            assert_eq!(batch_text(&json, last), expected);
        }
    }

    #[test]
    fn a_small_mesh_is_one_welcome_without_more() {
        let (peers, json) = netmap(5);
        let msgs = parse(parts(&head(), &json, 16 * 1024));
        assert_eq!(msgs.len(), 1);
        match &msgs[0] {
            ServerMsg::Welcome {
                peers: got, more, ..
            } => {
                assert_eq!(got, &peers);
                assert!(!more);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_empty_mesh_is_one_empty_welcome() {
        let msgs = parse(parts(&head(), &[], 1024));
        assert!(matches!(
            &msgs[..],
            [ServerMsg::Welcome { peers, more: false, .. }] if peers.is_empty()
        ));
    }

    #[test]
    fn a_large_mesh_is_a_welcome_then_batches_each_within_the_budget() {
        let (peers, json) = netmap(1000);
        let budget = 4 * 1024;
        let h = head();
        let texts = parts(&h, &json, budget);
        assert!(texts.len() > 10, "{} parts", texts.len());
        let overhead = welcome_text(&h, &[], true, false).len();
        for t in &texts {
            assert!(t.len() <= budget + overhead, "{} bytes", t.len());
        }
        let msgs = parse(texts);
        let mut got = Vec::new();
        for (i, msg) in msgs.iter().enumerate() {
            match msg {
                ServerMsg::Welcome { peers, more, .. } => {
                    assert_eq!(i, 0, "only the first message is a Welcome");
                    assert!(more);
                    got.extend(peers.iter().cloned());
                }
                ServerMsg::PeerBatch { peers, last } => {
                    assert!(i > 0);
                    assert_eq!(*last, i + 1 == msgs.len(), "last only on the final part");
                    assert!(!peers.is_empty());
                    got.extend(peers.iter().cloned());
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, peers, "every peer once, in order");
    }

    #[test]
    fn fill_takes_peers_up_to_the_budget() {
        let json: Vec<PeerJson> = ["aaaa", "bbbb", "cccc"]
            .into_iter()
            .map(Arc::from)
            .collect();
        let page = |max| {
            let p = fill((10..).zip(&json), max);
            (p.peers.len(), p.next)
        };
        // "aaaa,bbbb" is 9 bytes; a third would make 14.
        assert_eq!(page(9), (2, Some(12)));
        assert_eq!(page(13), (2, Some(12)));
        assert_eq!(page(14), (3, None));
        // A peer over the budget travels alone rather than not at all.
        assert_eq!(page(2), (1, Some(11)));
        assert_eq!(fill([], 10).peers.len(), 0);
    }
}

use stun::agent::TransactionId;
use stun::message::{MessageType, Setter, CLASS_ERROR_RESPONSE};
use turn::proto::channum::ChannelNumber;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use turn::proto::relayaddr::RelayedAddress;

use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A STUN message of `method` and `class` with `attrs` (shared with the shim's tests).
pub(crate) fn message(
    method: stun::message::Method,
    class: stun::message::MessageClass,
    txid: u8,
    attrs: Vec<Box<dyn Setter>>,
) -> Vec<u8> {
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(TransactionId([txid; 12])),
        Box::new(MessageType::new(method, class)),
    ];
    setters.extend(attrs);
    let mut m = Message::new();
    m.build(&setters).unwrap();
    m.raw
}

fn bind(txid: u8, channel: u16, peer: &str) -> Vec<u8> {
    let p = addr(peer);
    message(
        METHOD_CHANNEL_BIND,
        CLASS_REQUEST,
        txid,
        vec![
            Box::new(ChannelNumber(channel)),
            Box::new(PeerAddress {
                ip: p.ip(),
                port: p.port(),
            }),
        ],
    )
}

const PEER: &str = "198.51.100.4:40000";

#[test]
fn a_bind_the_server_accepts_maps_the_channel_both_ways() {
    let now = Instant::now();
    let mut c = Channels::default();
    c.note_client(&bind(1, 0x4001, PEER));
    assert_eq!(
        c.channel_for(addr(PEER), now),
        None,
        "not before the answer"
    );
    let ok = message(METHOD_CHANNEL_BIND, CLASS_SUCCESS_RESPONSE, 1, vec![]);
    assert_eq!(c.note_server(&ok, now), Noted::Nothing);
    assert_eq!(c.channel_for(addr(PEER), now), Some(0x4001));
    assert_eq!(c.fast_node(0x4001, now), None, "not fast until asked");
    c.set_fast(addr(PEER), Some(7));
    assert_eq!(c.fast_node(0x4001, now), Some(7));
    assert_eq!(c.fast_node(0x4001, now + CHANNEL_LIFETIME), None, "lapsed");
    assert_eq!(c.channel_for(addr(PEER), now + CHANNEL_LIFETIME), None);
    c.set_fast(addr(PEER), None);
    assert_eq!(c.fast_node(0x4001, now), None);
}

#[test]
fn a_refused_or_unknown_bind_answer_installs_nothing() {
    let now = Instant::now();
    let mut c = Channels::default();
    c.note_client(&bind(2, 0x4001, PEER));
    c.note_server(
        &message(METHOD_CHANNEL_BIND, CLASS_ERROR_RESPONSE, 2, vec![]),
        now,
    );
    c.note_server(
        &message(METHOD_CHANNEL_BIND, CLASS_SUCCESS_RESPONSE, 2, vec![]),
        now,
    );
    c.note_server(
        &message(METHOD_CHANNEL_BIND, CLASS_SUCCESS_RESPONSE, 9, vec![]),
        now,
    );
    assert_eq!(c.channel_for(addr(PEER), now), None);
}

#[test]
fn allocate_success_names_the_relayed_address_and_a_zero_refresh_releases() {
    let now = Instant::now();
    let mut c = Channels::default();
    let relayed = addr("203.0.113.1:50000");
    let ok = message(
        METHOD_ALLOCATE,
        CLASS_SUCCESS_RESPONSE,
        3,
        vec![Box::new(RelayedAddress {
            ip: relayed.ip(),
            port: relayed.port(),
        })],
    );
    assert_eq!(c.note_server(&ok, now), Noted::Relayed(relayed));
    // A refresh that keeps the allocation releases nothing.
    let keep = message(
        METHOD_REFRESH,
        CLASS_REQUEST,
        4,
        vec![Box::new(Lifetime(Duration::from_secs(600)))],
    );
    c.note_client(&keep);
    assert_eq!(
        c.note_server(
            &message(METHOD_REFRESH, CLASS_SUCCESS_RESPONSE, 4, vec![]),
            now
        ),
        Noted::Nothing
    );
    let drop = message(
        METHOD_REFRESH,
        CLASS_REQUEST,
        5,
        vec![Box::new(Lifetime(Duration::ZERO))],
    );
    c.note_client(&drop);
    assert_eq!(
        c.note_server(
            &message(METHOD_REFRESH, CLASS_SUCCESS_RESPONSE, 5, vec![]),
            now
        ),
        Noted::Released
    );
}

#[test]
fn channel_data_parses_only_when_well_formed() {
    let mut p = channel_header(0x4002, 3).to_vec();
    p.extend_from_slice(b"abc");
    assert_eq!(parse_channel_data(&p), Some((0x4002, 4..7)));
    assert_eq!(parse_channel_data(&p[..6]), None);
    assert_eq!(parse_channel_data(&channel_header(0x5000, 0)), None);
    assert_eq!(parse_channel_data(&bind(1, 0x4001, PEER)), None);
}

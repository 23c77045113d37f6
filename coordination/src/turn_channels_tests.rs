use stun::agent::TransactionId;
use stun::message::{Setter, CLASS_ERROR_RESPONSE};

use super::*;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn message(typ: MessageType, txid: [u8; 12], attrs: Vec<Box<dyn Setter>>) -> Vec<u8> {
    let mut setters: Vec<Box<dyn Setter>> = vec![Box::new(TransactionId(txid)), Box::new(typ)];
    setters.extend(attrs);
    let mut m = Message::new();
    m.build(&setters).unwrap();
    m.raw
}

fn allocate_success(relayed: SocketAddr) -> Vec<u8> {
    message(
        MessageType::new(METHOD_ALLOCATE, CLASS_SUCCESS_RESPONSE),
        [1; 12],
        vec![Box::new(RelayedAddress {
            ip: relayed.ip(),
            port: relayed.port(),
        })],
    )
}

fn bind_request(txid: u8, channel: u16, peer: SocketAddr) -> Vec<u8> {
    message(
        MessageType::new(METHOD_CHANNEL_BIND, CLASS_REQUEST),
        [txid; 12],
        vec![
            Box::new(ChannelNumber(channel)),
            Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            }),
        ],
    )
}

fn bind_answer(txid: u8, class: stun::message::MessageClass) -> Vec<u8> {
    message(
        MessageType::new(METHOD_CHANNEL_BIND, class),
        [txid; 12],
        vec![],
    )
}

const CLIENT: &str = "198.51.100.7:40000";
const RELAYED: &str = "203.0.113.1:50000";
const PEER: &str = "192.0.2.9:41000";

/// A table with one allocation of CLIENT on RELAYED (handle 7).
fn allocated(now: Instant) -> ChannelTable<u32> {
    let mut t = ChannelTable::default();
    t.add_relay(addr(RELAYED), 7);
    t.note_response(addr(CLIENT), &allocate_success(addr(RELAYED)), now);
    t
}

#[test]
fn a_channel_bind_the_server_accepted_routes_both_ways() {
    let now = Instant::now();
    let mut t = allocated(now);
    t.note_request(addr(CLIENT), &bind_request(2, 0x4001, addr(PEER)), now);
    assert!(
        t.to_peer(addr(CLIENT), 0x4001, now).is_none(),
        "not before the answer"
    );
    t.note_response(addr(CLIENT), &bind_answer(2, CLASS_SUCCESS_RESPONSE), now);
    assert_eq!(t.to_peer(addr(CLIENT), 0x4001, now), Some((&7, addr(PEER))));
    assert_eq!(
        t.to_client(addr(RELAYED), addr(PEER), now),
        Some((addr(CLIENT), 0x4001))
    );
    assert!(t
        .to_client(addr(RELAYED), addr("192.0.2.9:41001"), now)
        .is_none());
    assert!(t.to_peer(addr(CLIENT), 0x4002, now).is_none());
}

#[test]
fn a_refused_channel_bind_installs_nothing() {
    let now = Instant::now();
    let mut t = allocated(now);
    t.note_request(addr(CLIENT), &bind_request(3, 0x4001, addr(PEER)), now);
    t.note_response(addr(CLIENT), &bind_answer(3, CLASS_ERROR_RESPONSE), now);
    assert!(t.to_peer(addr(CLIENT), 0x4001, now).is_none());
    // A success for another transaction does not install it either.
    t.note_response(addr(CLIENT), &bind_answer(3, CLASS_SUCCESS_RESPONSE), now);
    assert!(t.to_peer(addr(CLIENT), 0x4001, now).is_none());
}

#[test]
fn a_binding_lapses_with_the_turn_servers_unless_refreshed() {
    let now = Instant::now();
    let mut t = allocated(now);
    t.note_request(addr(CLIENT), &bind_request(4, 0x4001, addr(PEER)), now);
    t.note_response(addr(CLIENT), &bind_answer(4, CLASS_SUCCESS_RESPONSE), now);
    let later = now + CHANNEL_LIFETIME - Duration::from_secs(1);
    t.note_request(addr(CLIENT), &bind_request(5, 0x4001, addr(PEER)), later);
    t.note_response(addr(CLIENT), &bind_answer(5, CLASS_SUCCESS_RESPONSE), later);
    let past_first = now + CHANNEL_LIFETIME + Duration::from_secs(1);
    assert!(t.to_peer(addr(CLIENT), 0x4001, past_first).is_some());
    assert!(t
        .to_peer(addr(CLIENT), 0x4001, later + CHANNEL_LIFETIME)
        .is_none());
    assert!(t
        .to_client(addr(RELAYED), addr(PEER), later + CHANNEL_LIFETIME)
        .is_none());
}

#[test]
fn a_dropped_relay_takes_its_client_and_bindings_along() {
    let now = Instant::now();
    let mut t = allocated(now);
    t.note_request(addr(CLIENT), &bind_request(6, 0x4001, addr(PEER)), now);
    t.note_response(addr(CLIENT), &bind_answer(6, CLASS_SUCCESS_RESPONSE), now);
    t.remove_relay(addr(RELAYED));
    assert!(t.to_peer(addr(CLIENT), 0x4001, now).is_none());
    assert_eq!(t.relay_count(), 0);
}

#[test]
fn a_bind_for_a_client_without_a_known_allocation_is_ignored() {
    let now = Instant::now();
    let mut t = allocated(now);
    let other = addr("198.51.100.8:40000");
    t.note_request(other, &bind_request(7, 0x4001, addr(PEER)), now);
    t.note_response(other, &bind_answer(7, CLASS_SUCCESS_RESPONSE), now);
    assert!(t.to_peer(other, 0x4001, now).is_none());
}

#[test]
fn channel_data_is_parsed_only_when_well_formed() {
    let mut packet = channel_header(0x4001, 5).to_vec();
    packet.extend_from_slice(b"hello\0\0\0");
    assert_eq!(parse_channel_data(&packet), Some((0x4001, 4..9)));
    assert_eq!(
        parse_channel_data(&packet[..8]),
        None,
        "shorter than its length"
    );
    assert_eq!(
        parse_channel_data(&channel_header(0x3fff, 0)),
        None,
        "not a channel"
    );
    assert_eq!(parse_channel_data(&[0x40]), None);
    let stun = bind_answer(1, CLASS_SUCCESS_RESPONSE);
    assert_eq!(parse_channel_data(&stun), None);
}

//! What arrives on the coordinator's HTTP and WebSocket endpoints, and on the
//! daemon's local socket.

use overlay_coord::validate;
use overlay_proto::coord::{
    bearer, decode_relay_frame, encode_relay_frame, parse_bearer, ApiError, ClientMsg,
    RegisterRequest, RegisterResponse, RelayBatch, RelayFrameError, RelayMessage, ServerMsg,
    RELAY_BATCH_V1, RELAY_HEADER_LEN,
};
use overlayd::identity::decode_public_key;
use overlayd::local_api::{parse_request, MAX_REQUEST};

/// A binary message on the control stream, a single frame or a batch:
/// decoding never panics, a decoded single frame encodes back to the same
/// bytes, and a batch that parses re-encodes to the same bytes from its
/// records; a batch that does not parse is refused whole.
pub fn relay_frame(data: &[u8]) {
    match decode_relay_frame(data) {
        Some((id, payload)) => assert_eq!(encode_relay_frame(id, payload), data),
        None => assert!(data.len() < RELAY_HEADER_LEN),
    }
    match RelayMessage::parse(data) {
        Ok(RelayMessage::Single(id, payload)) => {
            assert_ne!(data.first(), Some(&RELAY_BATCH_V1));
            assert_eq!(encode_relay_frame(id, payload), data);
        }
        Ok(msg @ RelayMessage::Batch(_)) => {
            let mut batch = RelayBatch::new(usize::MAX, data.len());
            for (id, payload) in msg.records() {
                assert!(batch.push(id, payload), "a parsed record fits again");
            }
            assert_eq!(batch.into_message(), data);
        }
        Err(RelayFrameError::Short) => assert!(data.len() < RELAY_HEADER_LEN),
        Err(RelayFrameError::Truncated { at }) => {
            assert_eq!(data.first(), Some(&RELAY_BATCH_V1));
            assert!(at >= 1 && at < data.len());
        }
    }
}

/// A text frame in either direction (`ClientMsg` to the coordinator, `ServerMsg`
/// to a node), and the `Authorization` header of `/v1/connect`. Whatever parses
/// survives a serialize/parse round trip unchanged.
pub fn control_msg(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(msg) = serde_json::from_str::<ClientMsg>(text) {
        let again = serde_json::to_string(&msg).expect("a parsed ClientMsg serializes");
        assert_eq!(serde_json::from_str::<ClientMsg>(&again).ok(), Some(msg));
    }
    if let Ok(msg) = serde_json::from_str::<ServerMsg>(text) {
        let again = serde_json::to_string(&msg).expect("a parsed ServerMsg serializes");
        assert_eq!(
            serde_json::from_str::<ServerMsg>(&again).as_ref().ok(),
            Some(&msg)
        );
        let peers = match &msg {
            ServerMsg::Welcome { node, peers, .. } => std::iter::once(node).chain(peers).collect(),
            ServerMsg::PeerBatch { peers, .. } => peers.iter().collect(),
            ServerMsg::PeerUpsert { peer } => vec![peer],
            _ => Vec::new(),
        };
        for peer in peers {
            let _ = decode_public_key(&peer.public_key);
        }
    }
    if let Some((id, credential)) = parse_bearer(text) {
        assert_eq!(
            parse_bearer(&bearer(id, credential)),
            Some((id, credential))
        );
    }
}

/// The body of `POST /v1/register` as the coordinator reads it (JSON, then the
/// public key and hostname checks, then the name de-duplication the store does),
/// and the answer as the daemon reads it.
pub fn register_body(data: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<RegisterRequest>(data) {
        let again = serde_json::to_vec(&req).expect("a parsed RegisterRequest serializes");
        assert_eq!(
            serde_json::from_slice::<RegisterRequest>(&again).ok(),
            Some(req.clone())
        );
        if let Ok((key, bytes)) = validate::public_key(&req.public_key) {
            assert_eq!(
                validate::public_key(&key),
                Ok((key.clone(), bytes)),
                "canonical key is stable"
            );
        }
        if let Ok(name) = validate::hostname(&req.hostname) {
            assert_eq!(
                validate::hostname(&name).as_ref(),
                Ok(&name),
                "clean name is stable"
            );
            for n in [2, 10, 1000, u32::MAX] {
                let suffixed = validate::suffixed(&name, n);
                assert!(
                    validate::hostname(&suffixed).is_ok(),
                    "{suffixed:?} from {name:?} is not a valid name"
                );
            }
        }
    }
    if let Ok(resp) = serde_json::from_slice::<RegisterResponse>(data) {
        let again = serde_json::to_vec(&resp).expect("a parsed RegisterResponse serializes");
        assert_eq!(
            serde_json::from_slice::<RegisterResponse>(&again).ok(),
            Some(resp)
        );
    }
    let _ = serde_json::from_slice::<ApiError>(data);
}

/// One request line on the local API socket, cut as the daemon reads it: at
/// most `MAX_REQUEST` bytes up to the first newline, which must be UTF-8.
pub fn local_api_request(data: &[u8]) {
    let data = &data[..data.len().min(MAX_REQUEST)];
    let line = match data.iter().position(|&b| b == b'\n') {
        Some(end) => &data[..=end],
        None => data,
    };
    let Ok(line) = std::str::from_utf8(line) else {
        return;
    };
    if let Ok(request) = parse_request(line) {
        let again = serde_json::to_string(&request).expect("a parsed Request serializes");
        assert_eq!(parse_request(&again).ok(), Some(request));
    }
}

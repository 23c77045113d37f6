//! ICE: the async parts that find and keep a path to each peer.
//!
//! ```text
//!   agent    one webrtc-ice Agent per peer session (IceSession), its events ──▶ shell
//!   candidates  which local and remote addresses are candidates (IPv4 and IPv6)
//!   mux      the one UDP socket: STUN ──▶ agents, WireGuard ──▶ DataPlane::arrive
//!   inbox    an agent's datagrams, read by each of its host candidates
//!   netcheck what the network allows (UDP, NAT mapping), measured with STUN
//!   why      `overlayctl why`: what an attempt saw, and a conclusion
//!   turn_shim  webrtc-ice's TURN clients reach their server through the daemon's
//!            sockets, so relayed WireGuard skips the agent (turn_conn, turn_channels)
//! ```
//!
//! The decisions (when to start, retry or give up on a session, which side
//! offers, which path packets take) are the node core's (`crate::node`); this
//! module only runs what it decided. The TURN credential refresh schedule is
//! a decision too, so it lives in `node::ice_refresh`.

mod agent;
pub mod candidates;
mod inbox;
pub mod mux;
pub mod netcheck;
mod turn_channels;
mod turn_conn;
pub mod turn_shim;
pub mod why;

pub use agent::*;
pub use candidates::host_port;

/// A STUN server on `ip` that answers every Binding request with the
/// sender's address as it saw it: its address, and its task.
#[cfg(test)]
pub(crate) async fn test_stun_server(
    ip: std::net::IpAddr,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use stun::message::{Message, BINDING_SUCCESS};
    use stun::xoraddr::XorMappedAddress;
    let socket = tokio::net::UdpSocket::bind((ip, 0)).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut req = Message::new();
            if req.unmarshal_binary(&buf[..n]).is_err() {
                continue;
            }
            let mut resp = Message::new();
            resp.build(&[
                Box::new(BINDING_SUCCESS),
                Box::new(req.transaction_id),
                Box::new(XorMappedAddress {
                    ip: from.ip(),
                    port: from.port(),
                }),
            ])
            .unwrap();
            let _ = socket.send_to(&resp.raw, from).await;
        }
    });
    (addr, task)
}

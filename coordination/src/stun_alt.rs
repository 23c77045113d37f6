//! A STUN-only listener on a second port. A node asks both this and the embedded
//! STUN/TURN server from one socket: if its NAT reports different public ports for
//! the two, the mapping depends on the destination ("symmetric") and hole punching
//! to another such node cannot work. Only Binding requests are answered.

use std::net::SocketAddr;
use std::sync::Arc;

use stun::message::{Message, Setter, BINDING_REQUEST, BINDING_SUCCESS};
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use crate::turn_server::bind_udp;

/// Largest datagram read; a Binding request is 20 bytes plus a few attributes.
const MAX_DATAGRAM: usize = 1500;
/// How many ports above the configured one are tried when it is taken.
const FALLBACK_PORTS: u16 = 8;

pub struct StunResponder {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl StunResponder {
    /// Listens on `bind`, or, when another program holds that port, on the next
    /// free one of the [`FALLBACK_PORTS`] above it; [`StunResponder::local_addr`]
    /// says which, and that is the port to announce. (The server asks for the
    /// TURN port plus one, never the TURN port itself: that belongs to a real
    /// STUN/TURN server such as a coturn on the same host.)
    pub async fn start(bind: SocketAddr) -> std::io::Result<StunResponder> {
        let socket = Arc::new(bind_near(bind).await?);
        let local_addr = socket.local_addr()?;
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                // A dual-stack [::] socket reports IPv4 clients as
                // ::ffff:a.b.c.d; the client must hear its IPv4 address.
                let seen = SocketAddr::new(from.ip().to_canonical(), from.port());
                if let Some(reply) = answer(&buf[..n], seen) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        Ok(StunResponder { local_addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for StunResponder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A UDP socket on `bind`, or on the first free port of the few above it.
async fn bind_near(bind: SocketAddr) -> std::io::Result<UdpSocket> {
    // One socket per family (an IPv6 one takes IPv6 only), so the IPv4 and
    // IPv6 responders of one port do not collide.
    let taken = match bind_udp(bind) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && bind.port() != 0 => e,
        other => return other,
    };
    for offset in 1..=FALLBACK_PORTS {
        let Some(port) = bind.port().checked_add(offset) else {
            break;
        };
        if let Ok(socket) = bind_udp(SocketAddr::new(bind.ip(), port)) {
            tracing::warn!(
                "UDP port {} is taken (a STUN/TURN server on this host?): \
                 the netcheck STUN port is {port}",
                bind.port()
            );
            return Ok(socket);
        }
    }
    Err(taken)
}

/// The Binding success response to `request` from `from`; `None` for anything
/// that is not a well-formed Binding request (it is ignored, never answered).
pub fn answer(request: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    let mut req = Message::new();
    req.unmarshal_binary(request).ok()?;
    if req.typ != BINDING_REQUEST {
        return None;
    }
    let mut resp = Message::new();
    resp.transaction_id = req.transaction_id;
    resp.set_type(BINDING_SUCCESS);
    resp.write_header();
    XorMappedAddress {
        ip: from.ip(),
        port: from.port(),
    }
    .add_to(&mut resp)
    .ok()?;
    Some(resp.raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::message::Getter;

    #[test]
    fn binding_request_gets_the_observed_address() {
        let mut req = Message::new();
        req.new_transaction_id().unwrap();
        req.set_type(BINDING_REQUEST);
        req.write_header();
        let from: SocketAddr = "203.0.113.7:40000".parse().unwrap();
        let raw = answer(&req.raw, from).unwrap();
        let mut resp = Message::new();
        resp.unmarshal_binary(&raw).unwrap();
        assert_eq!(resp.typ, BINDING_SUCCESS);
        assert_eq!(resp.transaction_id, req.transaction_id);
        let mut xor = XorMappedAddress::default();
        xor.get_from(&resp).unwrap();
        assert_eq!(SocketAddr::new(xor.ip, xor.port), from);
    }

    #[test]
    fn garbage_and_other_methods_are_ignored() {
        assert!(answer(b"hello", "127.0.0.1:1".parse().unwrap()).is_none());
        let mut resp = Message::new();
        resp.new_transaction_id().unwrap();
        resp.set_type(BINDING_SUCCESS);
        resp.write_header();
        assert!(answer(&resp.raw, "127.0.0.1:1".parse().unwrap()).is_none());
    }

    #[tokio::test]
    async fn a_taken_port_moves_the_responder_to_the_next_free_one() {
        let holder = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let taken = holder.local_addr().unwrap();
        let responder = StunResponder::start(taken).await.unwrap();
        let moved = responder.local_addr();
        assert_eq!(moved.ip(), taken.ip());
        assert!(
            moved.port() > taken.port()
                && u32::from(moved.port()) <= u32::from(taken.port()) + u32::from(FALLBACK_PORTS),
            "{moved} after {taken}"
        );
    }

    /// The XOR-MAPPED-ADDRESS `responder` answers `client` with.
    async fn mapped(client: &UdpSocket, responder: SocketAddr) -> SocketAddr {
        let mut req = Message::new();
        req.new_transaction_id().unwrap();
        req.set_type(BINDING_REQUEST);
        req.write_header();
        client.send_to(&req.raw, responder).await.unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            client.recv_from(&mut buf),
        )
        .await
        .unwrap()
        .unwrap();
        let mut resp = Message::new();
        resp.unmarshal_binary(&buf[..n]).unwrap();
        let mut xor = XorMappedAddress::default();
        xor.get_from(&resp).unwrap();
        SocketAddr::new(xor.ip, xor.port)
    }

    #[tokio::test]
    async fn responders_of_both_families_share_a_port_and_tell_each_client_its_own_address() {
        let v4 = StunResponder::start("0.0.0.0:0".parse().unwrap())
            .await
            .unwrap();
        let port = v4.local_addr().port();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(mapped(&client, to).await, client.local_addr().unwrap());

        let Ok(client6) = UdpSocket::bind("[::1]:0").await else {
            return; // no IPv6 loopback on this host
        };
        let v6 = StunResponder::start(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)))
            .await
            .expect("an IPv6-only socket beside the IPv4 one");
        assert_eq!(v6.local_addr().port(), port);
        let to = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
        let got = mapped(&client6, to).await;
        assert!(got.is_ipv6(), "{got}");
        assert_eq!(got, client6.local_addr().unwrap());
    }
}

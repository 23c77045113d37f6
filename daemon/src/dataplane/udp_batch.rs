//! Fewer system calls per packet on the shared UDP socket: UDP GSO sends a run of
//! equal-sized WireGuard datagrams to one peer in one `sendmsg`, and UDP GRO hands
//! us a run of datagrams from one peer in one `recvmsg`. Both fall back to one
//! datagram per call where the kernel refuses them.
//!
//! The shared socket is dual-stack (`[::]`, `IPV6_V6ONLY` off) where the host
//! has IPv6. On such a socket the kernel names IPv4 peers `::ffff:a.b.c.d`;
//! the rest of the daemon (endpoints, candidates, the data plane's tables)
//! knows them only as plain IPv4 addresses. So every address read here is
//! [`normalise`]d. Destinations need nothing: Linux sends to a plain IPv4
//! address (`sockaddr_in`) on a dual-stack socket as on an IPv4 one
//! (`udpv6_sendmsg` hands it to `udp_sendmsg`, UDP GSO included), so a send
//! costs no lookup of the socket's family.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrLike, SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// The kernel coalesces at most 64 segments into one GSO send...
pub const MAX_SEGMENTS: usize = 64;
/// ...and no more than one IP datagram's worth of payload.
pub const MAX_GSO_BYTES: usize = 65_000;

/// Whether GSO sends still work here; cleared on the first refusal.
static GSO_OK: AtomicBool = AtomicBool::new(true);

/// Socket buffers large enough for GSO bursts from several peers (wireguard-go
/// asks for 7 MiB); as root the system's default ceiling does not apply.
const SOCKET_BUFFER: usize = 7 << 20;

/// `addr` as the rest of the daemon knows it: an IPv4 peer seen through a
/// dual-stack socket (`::ffff:a.b.c.d`) as plain IPv4, anything else as it is.
pub fn normalise(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// A UDP socket on every IPv6 and IPv4 address (`[::]:port`, `IPV6_V6ONLY`
/// off, whatever the `bindv6only` sysctl says), non-blocking. Fails where the
/// host has no IPv6 (`ipv6.disable=1`: no AF_INET6 sockets; or no address to
/// bind); the caller then takes an IPv4 socket.
pub fn bind_dual_stack(port: u16) -> std::io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, SockaddrIn6};
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    let any = SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, port, 0, 0);
    bind(fd.as_raw_fd(), &SockaddrIn6::from(any))?;
    Ok(std::net::UdpSocket::from(fd))
}

/// Raises the socket's send and receive buffers; best effort.
pub fn grow_buffers(socket: &UdpSocket) {
    let forced = setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_ok()
        && setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_ok();
    if !forced {
        let _ = setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER);
        let _ = setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER);
    }
}

/// Asks the kernel to coalesce received datagrams (UDP GRO); harmless if refused.
pub fn enable_gro(socket: &UdpSocket) -> bool {
    setsockopt(socket, sockopt::UdpGroSegment, &true).is_ok()
}

/// Sends `segments` to `dst`: one GSO `sendmsg` when there are several, all but
/// the last exactly as long as the first and the last no longer.
pub async fn send_segments(
    socket: &UdpSocket,
    dst: SocketAddr,
    segments: &[&[u8]],
) -> std::io::Result<()> {
    let iov: Vec<IoSlice> = segments.iter().map(|s| IoSlice::new(s)).collect();
    let size = segments.first().map_or(0, |s| s.len());
    send_run(socket, dst, &iov, 1, size).await
}

/// [`send_segments`] with each segment behind its own 4-byte `prefix` (a
/// TURN ChannelData header): segment `i` on the wire is `prefixes[i] ‖
/// segments[i]`, all in one GSO `sendmsg` without copying the data.
pub async fn send_prefixed(
    socket: &UdpSocket,
    dst: SocketAddr,
    prefixes: &[[u8; 4]],
    segments: &[&[u8]],
) -> std::io::Result<()> {
    let iov: Vec<IoSlice> = prefixes
        .iter()
        .zip(segments)
        .flat_map(|(p, s)| [IoSlice::new(p), IoSlice::new(s)])
        .collect();
    let size = segments.first().map_or(0, |s| s.len() + 4);
    send_run(socket, dst, &iov, 2, size).await
}

/// Sends the datagrams in `iov`, `per` iovecs each, the first `size` bytes
/// long: as one GSO message when there are several and the kernel takes it,
/// else one `sendmsg` per datagram.
async fn send_run(
    socket: &UdpSocket,
    dst: SocketAddr,
    iov: &[IoSlice<'_>],
    per: usize,
    size: usize,
) -> std::io::Result<()> {
    let addr = SockaddrStorage::from(dst);
    if iov.len() > per && GSO_OK.load(Ordering::Relaxed) {
        let seg = size as u16;
        let sent = socket
            .async_io(Interest::WRITABLE, || {
                let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
                sendmsg(
                    socket.as_raw_fd(),
                    iov,
                    &cmsg,
                    MsgFlags::empty(),
                    Some(&addr),
                )
                .map_err(std::io::Error::from)
            })
            .await;
        match sent {
            Ok(_) => return Ok(()),
            // The kernel or the device cannot do GSO at all: stop trying.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EIO | libc::EOPNOTSUPP)) => {
                tracing::debug!("UDP GSO refused ({e}); sending datagrams one by one");
                GSO_OK.store(false, Ordering::Relaxed);
            }
            // This run only (too large for the route, say): send it one by one.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EMSGSIZE)) => {
                tracing::debug!("GSO run of {} refused ({e}); one by one", iov.len() / per);
            }
            Err(e) => return Err(e),
        }
    }
    for parts in iov.chunks(per) {
        socket
            .async_io(Interest::WRITABLE, || {
                sendmsg(
                    socket.as_raw_fd(),
                    parts,
                    &[],
                    MsgFlags::empty(),
                    Some(&addr),
                )
                .map_err(std::io::Error::from)
            })
            .await?;
    }
    Ok(())
}

/// Receives into `buf`: the sender, the bytes, and the segment size when the
/// kernel coalesced several datagrams (each `segment` long, the last maybe shorter).
pub async fn recv_coalesced(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(SocketAddr, usize, Option<usize>)> {
    socket
        .async_io(Interest::READABLE, || recv_once(socket, buf))
        .await
}

/// [`recv_coalesced`] without waiting: `WouldBlock` when nothing is queued.
pub fn try_recv_coalesced(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(SocketAddr, usize, Option<usize>)> {
    socket.try_io(Interest::READABLE, || recv_once(socket, buf))
}

fn recv_once(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(SocketAddr, usize, Option<usize>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(i32);
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .map_err(std::io::Error::from)?;
    let mut segment = None;
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::UdpGroSegments(size) = c {
                segment = usize::try_from(size).ok().filter(|s| *s > 0);
            }
        }
    }
    let from = msg
        .address
        .as_ref()
        .and_then(sender)
        .ok_or_else(|| std::io::Error::other("datagram without an IP sender"))?;
    Ok((from, msg.bytes, segment))
}

/// The sender of a received datagram, [`normalise`]d.
fn sender(addr: &SockaddrStorage) -> Option<SocketAddr> {
    let addr = match addr.family()? {
        nix::sys::socket::AddressFamily::Inet => SocketAddr::V4((*addr.as_sockaddr_in()?).into()),
        nix::sys::socket::AddressFamily::Inet6 => SocketAddr::V6((*addr.as_sockaddr_in6()?).into()),
        _ => return None,
    };
    Some(normalise(addr))
}

/// The datagrams in a coalesced receive.
pub fn segments(data: &[u8], segment: Option<usize>) -> std::slice::Chunks<'_, u8> {
    data.chunks(segment.unwrap_or(data.len()).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dual_stack() -> UdpSocket {
        UdpSocket::from_std(bind_dual_stack(0).expect("IPv6 on the test host")).unwrap()
    }

    #[test]
    fn mapped_senders_read_as_plain_ipv4() {
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:4000".parse().unwrap();
        let v4: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::7]:4000".parse().unwrap();
        assert_eq!(normalise(mapped), v4);
        assert_eq!(normalise(v4), v4);
        assert_eq!(normalise(v6), v6);
    }

    #[tokio::test]
    async fn a_dual_stack_socket_speaks_both_families_and_names_ipv4_peers_plainly() {
        let shared = dual_stack();
        let port = shared.local_addr().unwrap().port();
        let peer4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer6 = UdpSocket::bind("[::1]:0").await.unwrap();
        let mut buf = vec![0u8; 65536];
        for peer in [&peer4, &peer6] {
            let to: SocketAddr = match peer.local_addr().unwrap() {
                SocketAddr::V4(_) => SocketAddr::new([127, 0, 0, 1].into(), port),
                SocketAddr::V6(_) => SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), port),
            };
            peer.send_to(b"hello", to).await.unwrap();
            let (from, n, _) = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                recv_coalesced(&shared, &mut buf),
            )
            .await
            .unwrap()
            .unwrap();
            assert_eq!(
                (from, &buf[..n]),
                (peer.local_addr().unwrap(), &b"hello"[..])
            );
            shared.send_to(b"back", from).await.unwrap();
            let (n, _) = peer.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], b"back");
        }
    }

    #[tokio::test]
    async fn gso_runs_leave_a_dual_stack_socket_to_either_family() {
        let tx = dual_stack();
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let rx = UdpSocket::bind(bind).await.unwrap();
            let segs = [[1u8; 100], [2u8; 100], [3u8; 100]];
            let parts: Vec<&[u8]> = segs.iter().map(|s| &s[..]).collect();
            send_segments(&tx, rx.local_addr().unwrap(), &parts)
                .await
                .unwrap();
            let mut buf = vec![0u8; 2048];
            for seg in &segs {
                let (n, _) =
                    tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv_from(&mut buf))
                        .await
                        .unwrap()
                        .unwrap();
                assert_eq!(&buf[..n], &seg[..], "to {bind}");
            }
        }
        assert!(GSO_OK.load(Ordering::Relaxed), "GSO was refused");
    }

    #[test]
    fn coalesced_data_splits_into_segments() {
        let data = [1u8; 10];
        let parts: Vec<_> = segments(&data, Some(4)).map(<[u8]>::len).collect();
        assert_eq!(parts, vec![4, 4, 2]);
        assert_eq!(segments(&data, None).count(), 1);
    }

    #[tokio::test]
    async fn gso_send_arrives_as_separate_datagrams_and_gro_reassembles_them() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let gro = enable_gro(&rx);
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let a = [0xaa; 100];
        let b = [0xbb; 100];
        let c = [0xcc; 40];
        send_segments(&tx, rx.local_addr().unwrap(), &[&a, &b, &c])
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < 3 {
            let (from, n, seg) = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                recv_coalesced(&rx, &mut buf),
            )
            .await
            .unwrap()
            .unwrap();
            assert_eq!(from, tx.local_addr().unwrap());
            got.extend(segments(&buf[..n], seg).map(<[u8]>::to_vec));
        }
        assert_eq!(
            got,
            vec![a.to_vec(), b.to_vec(), c.to_vec()],
            "GRO enabled: {gro}"
        );
    }

    #[tokio::test]
    async fn a_prefixed_run_arrives_as_separate_datagrams_each_behind_its_prefix() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let a = [0xaa; 100];
        let b = [0xbb; 100];
        let c = [0xcc; 40];
        let prefixes = [[1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]];
        send_prefixed(&tx, rx.local_addr().unwrap(), &prefixes, &[&a, &b, &c])
            .await
            .unwrap();
        let mut buf = vec![0u8; 65536];
        for (prefix, data) in prefixes.iter().zip([&a[..], &b[..], &c[..]]) {
            let (n, _) =
                tokio::time::timeout(std::time::Duration::from_secs(2), rx.recv_from(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
            assert_eq!(&buf[..4], prefix);
            assert_eq!(&buf[4..n], data);
        }
    }
}

//! Fewer system calls per packet on the shared UDP socket: UDP GSO sends a run of
//! equal-sized WireGuard datagrams to one peer in one `sendmsg`, and UDP GRO hands
//! us a run of datagrams from one peer in one `recvmsg`. Both go through
//! `quinn-udp`, which falls back to one datagram per call where the kernel
//! refuses them.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use nix::sys::socket::{setsockopt, sockopt};
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// The kernel coalesces at most 64 segments into one GSO send...
pub const MAX_SEGMENTS: usize = 64;
/// ...and no more than one IP datagram's worth of payload.
pub const MAX_GSO_BYTES: usize = 65_000;

/// Socket buffers large enough for GSO bursts from several peers (wireguard-go
/// asks for 7 MiB); as root the system's default ceiling does not apply.
const SOCKET_BUFFER: usize = 7 << 20;

/// quinn-udp's per-socket state (what GSO/GRO the socket can do), by descriptor.
static STATES: Mutex<Option<HashMap<i32, &'static UdpSocketState>>> = Mutex::new(None);

fn state(socket: &UdpSocket) -> std::io::Result<&'static UdpSocketState> {
    let mut states = STATES.lock().unwrap_or_else(|e| e.into_inner());
    let states = states.get_or_insert_with(HashMap::new);
    let fd = socket.as_raw_fd();
    if let Some(s) = states.get(&fd) {
        return Ok(s);
    }
    let s: &'static UdpSocketState = Box::leak(Box::new(UdpSocketState::new(socket.into())?));
    states.insert(fd, s);
    Ok(s)
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
    state(socket).is_ok_and(|s| s.gro_segments() > 1)
}

/// Sends `segments` to `dst`: one GSO `sendmsg` when there are several, all but
/// the last exactly as long as the first and the last no longer.
pub async fn send_segments(
    socket: &UdpSocket,
    dst: SocketAddr,
    segments: &[&[u8]],
) -> std::io::Result<()> {
    let state = state(socket)?;
    if segments.len() > 1 && state.max_gso_segments() > 1 {
        let size = segments[0].len();
        // quinn-udp sends one contiguous buffer: the run is copied into it.
        let run = segments.concat();
        let transmit = Transmit {
            destination: dst,
            ecn: None,
            contents: &run,
            segment_size: Some(size),
            src_ip: None,
        };
        let sent = socket
            .async_io(Interest::WRITABLE, || {
                state.try_send(UdpSockRef::from(socket), &transmit)
            })
            .await;
        match sent {
            Ok(()) => return Ok(()),
            // Refused for this run (quinn-udp stops GSO for good where the
            // kernel cannot do it): send it one by one.
            Err(e) => tracing::debug!("GSO run of {} refused ({e}); one by one", segments.len()),
        }
    }
    for s in segments {
        socket.send_to(s, dst).await?;
    }
    Ok(())
}

/// Receives into `buf`: the sender, the bytes, and the segment size when the
/// kernel coalesced several datagrams (each `segment` long, the last maybe shorter).
pub async fn recv_coalesced(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(SocketAddr, usize, Option<usize>)> {
    let state = state(socket)?;
    socket
        .async_io(Interest::READABLE, || {
            let mut bufs = [IoSliceMut::new(buf)];
            let mut meta = [RecvMeta::default()];
            state.recv(UdpSockRef::from(socket), &mut bufs, &mut meta)?;
            let m = meta[0];
            let from = match m.addr {
                SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                    Some(v4) => SocketAddr::from((v4, v6.port())),
                    None => m.addr,
                },
                v4 => v4,
            };
            let segment = (m.stride > 0 && m.stride < m.len).then_some(m.stride);
            Ok((from, m.len, segment))
        })
        .await
}

/// The datagrams in a coalesced receive.
pub fn segments(data: &[u8], segment: Option<usize>) -> std::slice::Chunks<'_, u8> {
    data.chunks(segment.unwrap_or(data.len()).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}

//! Batched UDP for the embedded TURN server's data path: `recvmmsg` into one
//! preallocated buffer, `sendmmsg` of iovec lists that point into it, so a
//! relayed datagram costs no allocation and a share of two syscalls.
//!
//! ```text
//!  socket ──recvmmsg──▶ RecvBatch (BATCH slots of SLOT bytes, reused)
//!                          │ slices borrowed by the caller
//!  socket ◀──sendmmsg── SendBatch (2 iovecs per datagram: header, payload;
//!                        a run of equal-sized datagrams to one address is
//!                        one UDP GSO message, so its receiver can take it
//!                        in one GRO read)
//! ```

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Datagrams per syscall.
pub const BATCH: usize = 64;
/// Bytes per slot: a full-size UDP datagram on a 1500-byte path and then some;
/// longer datagrams are truncated by the kernel and dropped by the caller.
pub const SLOT: usize = 2048;
/// A GSO message carries at most 64 segments...
const MAX_SEGMENTS: usize = 64;
/// ...and one IP datagram's worth of payload.
const MAX_GSO_BYTES: usize = 65_000;
/// Whether UDP GSO sends work here; cleared on the first refusal.
static GSO_OK: AtomicBool = AtomicBool::new(true);
/// Socket buffer size asked for the listener and every relay socket: a
/// gigabit of 1,300-byte datagrams is ~100,000 a second, and the default
/// ~200 KiB holds 2 ms of it.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// One received batch: datagram `i` is `data(i)` from `from(i)`.
pub struct RecvBatch {
    buf: Box<[u8]>,
    lens: [usize; BATCH],
    addrs: [SocketAddr; BATCH],
    truncated: [bool; BATCH],
    count: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            buf: vec![0u8; BATCH * SLOT].into_boxed_slice(),
            lens: [0; BATCH],
            addrs: [SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
            truncated: [false; BATCH],
            count: 0,
        }
    }
}

impl RecvBatch {
    pub fn len(&self) -> usize {
        self.count
    }

    /// The bytes of datagram `i`, or `None` when it did not fit a slot.
    pub fn data(&self, i: usize) -> Option<&[u8]> {
        if i >= self.count || self.truncated[i] {
            return None;
        }
        Some(&self.buf[i * SLOT..i * SLOT + self.lens[i]])
    }

    /// The sender of datagram `i`, with IPv4-mapped IPv6 made plain IPv4.
    pub fn from(&self, i: usize) -> SocketAddr {
        self.addrs[i]
    }

    /// Receives up to [`BATCH`] datagrams, waiting for the first.
    pub async fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        self.count = 0;
        let n = socket
            .async_io(Interest::READABLE, || self.recvmmsg(socket))
            .await?;
        self.count = n;
        Ok(n)
    }

    fn recvmmsg(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let mut names: [MaybeUninit<libc::sockaddr_storage>; BATCH] =
            [MaybeUninit::zeroed(); BATCH];
        let base = self.buf.as_mut_ptr();
        let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            // SAFETY: `i * SLOT` stays inside `buf` (BATCH * SLOT bytes).
            iov_base: unsafe { base.add(i * SLOT) }.cast(),
            iov_len: SLOT,
        });
        // SAFETY: mmsghdr is plain data; zero is a valid empty header.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            msgs[i].msg_hdr.msg_name = names[i].as_mut_ptr().cast();
            msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every pointer in `msgs` points at live locals or `buf`,
        // sized as the headers say.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as _,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            self.lens[i] = msgs[i].msg_len as usize;
            self.truncated[i] = msgs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            // SAFETY: the kernel wrote a sockaddr of the socket's family.
            self.addrs[i] = unsafe { from_storage(names[i].assume_init_ref()) }
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        }
        Ok(n)
    }
}

/// Datagrams queued for one `sendmmsg`: each is a 4-byte header (possibly
/// empty) and a payload slice borrowed from a [`RecvBatch`].
pub struct SendBatch {
    headers: [[u8; 4]; BATCH],
    header_lens: [usize; BATCH],
    payloads: [(*const u8, usize); BATCH],
    addrs: [SocketAddr; BATCH],
    count: usize,
}

// SAFETY: the raw payload pointers are only dereferenced inside `flush`,
// while the batch they point into is borrowed by the caller (see `push`).
unsafe impl Send for SendBatch {}

impl Default for SendBatch {
    fn default() -> Self {
        SendBatch {
            headers: [[0; 4]; BATCH],
            header_lens: [0; BATCH],
            payloads: [(std::ptr::null(), 0); BATCH],
            addrs: [SocketAddr::from(([0, 0, 0, 0], 0)); BATCH],
            count: 0,
        }
    }
}

impl SendBatch {
    /// Queues `header ‖ payload` to `to`; false when the batch is full.
    /// `payload` must stay alive and unchanged until the next `flush`.
    pub fn push(&mut self, header: &[u8], payload: &[u8], to: SocketAddr) -> bool {
        if self.count == BATCH || header.len() > 4 {
            return false;
        }
        let i = self.count;
        self.headers[i][..header.len()].copy_from_slice(header);
        self.header_lens[i] = header.len();
        self.payloads[i] = (payload.as_ptr(), payload.len());
        self.addrs[i] = to;
        self.count += 1;
        true
    }

    /// Sends everything queued on `socket` (waiting while its buffer is
    /// full) and empties the batch. Returns how many datagrams the kernel
    /// refused with an error other than "would block" (they are dropped).
    pub async fn flush(&mut self, socket: &UdpSocket) -> usize {
        let mut sent = 0;
        let mut failed = 0;
        let v6 = socket.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
        while sent < self.count {
            match socket
                .async_io(Interest::WRITABLE, || self.sendmmsg(socket, sent, v6))
                .await
            {
                Ok(n) => sent += n,
                Err(_) => {
                    // The first datagram of the rest failed for good: skip it.
                    failed += 1;
                    sent += 1;
                }
            }
        }
        self.count = 0;
        failed
    }

    fn len_of(&self, i: usize) -> usize {
        self.header_lens[i] + self.payloads[i].1
    }

    /// How many datagrams from `i` on go as one GSO message: same
    /// destination, all as long as the first but the last, which may be
    /// shorter, within the kernel's bounds.
    fn run_from(&self, i: usize, gso: bool) -> usize {
        let size = self.len_of(i);
        let mut bytes = size;
        let mut j = i + 1;
        while gso
            && j < self.count
            && j - i < MAX_SEGMENTS
            && self.addrs[j] == self.addrs[i]
            && self.len_of(j) <= size
            && bytes + self.len_of(j) <= MAX_GSO_BYTES
        {
            bytes += self.len_of(j);
            j += 1;
            if self.len_of(j - 1) < size {
                break;
            }
        }
        j - i
    }

    /// Sends from datagram `start` on; returns how many datagrams went.
    fn sendmmsg(&mut self, socket: &UdpSocket, start: usize, v6: bool) -> io::Result<usize> {
        let gso = GSO_OK.load(Ordering::Relaxed);
        let mut names: [MaybeUninit<libc::sockaddr_storage>; BATCH] =
            [MaybeUninit::zeroed(); BATCH];
        // Two iovecs per datagram, laid out in datagram order, so a run is
        // one contiguous slice of them.
        let mut iovs: [libc::iovec; 2 * BATCH] = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 2 * BATCH];
        let mut control = [[0u64; 4]; BATCH];
        let mut runs = [0usize; BATCH];
        // SAFETY: mmsghdr is plain data; zero is a valid empty header.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for k in 0..self.count - start {
            let i = start + k;
            iovs[2 * k] = libc::iovec {
                iov_base: self.headers[i].as_mut_ptr().cast(),
                iov_len: self.header_lens[i],
            };
            iovs[2 * k + 1] = libc::iovec {
                iov_base: self.payloads[i].0 as *mut libc::c_void,
                iov_len: self.payloads[i].1,
            };
        }
        let mut m = 0;
        let mut i = start;
        while i < self.count {
            let run = self.run_from(i, gso);
            let k = i - start;
            let hdr = &mut msgs[m].msg_hdr;
            hdr.msg_namelen = to_storage(self.addrs[i], v6, &mut names[m]);
            hdr.msg_name = names[m].as_mut_ptr().cast();
            hdr.msg_iov = iovs[2 * k..].as_mut_ptr();
            hdr.msg_iovlen = 2 * run;
            if run > 1 {
                hdr.msg_control = control[m].as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE(2) is 24 bytes, `control[m]` holds 32,
                // aligned for cmsghdr; FIRSTHDR/DATA stay inside it.
                unsafe {
                    hdr.msg_controllen = libc::CMSG_SPACE(2) as _;
                    let c = libc::CMSG_FIRSTHDR(hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(
                        libc::CMSG_DATA(c).cast::<u16>(),
                        self.len_of(i) as u16,
                    );
                }
            }
            runs[m] = run;
            m += 1;
            i += run;
        }
        // SAFETY: every pointer in `msgs` points at locals or fields of
        // self, and payloads into a RecvBatch the caller keeps borrowed
        // until flush ends.
        let r = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                m as _,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            let gso_refused = matches!(
                e.raw_os_error(),
                Some(libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT)
            );
            if runs[0] > 1 && gso_refused {
                // No UDP GSO here: send one datagram per message from now on.
                GSO_OK.store(false, Ordering::Relaxed);
                return Ok(0);
            }
            return Err(e);
        }
        Ok(runs[..r as usize].iter().sum())
    }
}

/// A UDP socket bound to `addr`. An IPv6 one takes IPv6 only
/// (`IPV6_V6ONLY`), so that `[::]` and `0.0.0.0` of one port are two
/// sockets, one per family, whatever `net.ipv6.bindv6only` says.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned right below.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let socket = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
    if addr.is_ipv6() {
        let on: libc::c_int = 1;
        // SAFETY: a c_int option value of the right size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IPV6,
                libc::IPV6_V6ONLY,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as _,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let mut name = MaybeUninit::zeroed();
    let len = to_storage(addr, addr.is_ipv6(), &mut name);
    // SAFETY: `name` holds a sockaddr of `len` bytes written by to_storage.
    if unsafe { libc::bind(fd, name.as_ptr().cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    UdpSocket::from_std(socket)
}

/// Asks for [`SOCKET_BUFFER`]-sized send and receive buffers, beyond
/// `net.core.[rw]mem_max` when the process may (the `FORCE` options need
/// CAP_NET_ADMIN); failing both leaves the kernel's default.
pub fn grow_buffers(socket: &UdpSocket) {
    let fd = socket.as_raw_fd();
    let size = SOCKET_BUFFER as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        for opt in [force, plain] {
            // SAFETY: a c_int option value of the right size.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as _,
                )
            };
            if r == 0 {
                break;
            }
        }
    }
}

/// The address in `storage`, IPv4-mapped IPv6 made plain IPv4.
fn from_storage(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin: &libc::sockaddr_in = unsafe { &*(storage as *const _ as *const _) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 = unsafe { &*(storage as *const _ as *const _) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            let port = u16::from_be(sin6.sin6_port);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, sin6.sin6_scope_id)),
            })
        }
        _ => None,
    }
}

/// Writes `addr` for a socket of family v6 (`true`) or v4 and returns its length.
fn to_storage(
    addr: SocketAddr,
    v6: bool,
    out: &mut MaybeUninit<libc::sockaddr_storage>,
) -> libc::socklen_t {
    let ip = match (addr.ip(), v6) {
        (IpAddr::V4(v4), true) => IpAddr::V6(v4.to_ipv6_mapped()),
        (ip, _) => ip,
    };
    match ip {
        IpAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as _,
                sin_port: addr.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(v4).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write(out.as_mut_ptr().cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>() as _
        }
        IpAddr::V6(v6ip) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as _,
                sin6_port: addr.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6ip.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6.
            unsafe { std::ptr::write(out.as_mut_ptr().cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>() as _
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_sent_with_headers_arrives_as_header_and_payload() {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = b.local_addr().unwrap();
        let payloads: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 100 + i as usize]).collect();
        let mut out = SendBatch::default();
        for (i, p) in payloads.iter().enumerate() {
            assert!(out.push(&[0x40, i as u8, 0, 0], p, to));
        }
        assert_eq!(out.flush(&a).await, 0);
        let mut got = RecvBatch::default();
        let mut seen = 0;
        while seen < 10 {
            let n = got.recv(&b).await.unwrap();
            for i in 0..n {
                let d = got.data(i).unwrap();
                assert_eq!(d[1] as usize, seen);
                assert_eq!(&d[4..], &payloads[seen][..]);
                assert_eq!(got.from(i), a.local_addr().unwrap());
                seen += 1;
            }
        }
    }

    #[tokio::test]
    async fn runs_of_equal_datagrams_leave_as_gso_and_arrive_one_by_one() {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (to_b, to_c) = (b.local_addr().unwrap(), c.local_addr().unwrap());
        // 20 equal to b, a shorter last one, then 3 to c, then 2 more to b.
        let mut payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 200]).collect();
        payloads.push(vec![20; 50]);
        payloads.extend((21..26u8).map(|i| vec![i; 200]));
        let mut out = SendBatch::default();
        for (i, p) in payloads.iter().enumerate() {
            let to = if (21..24).contains(&i) { to_c } else { to_b };
            assert!(out.push(&[0x40, 0, 0, i as u8], p, to));
        }
        assert_eq!(out.flush(&a).await, 0);
        assert!(GSO_OK.load(Ordering::Relaxed), "loopback takes UDP GSO");
        for (socket, expect) in [
            (&b, (0..21).chain(24..26).collect::<Vec<usize>>()),
            (&c, (21..24).collect()),
        ] {
            let mut buf = [0u8; 512];
            for i in expect {
                let (n, _) = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    socket.recv_from(&mut buf),
                )
                .await
                .unwrap()
                .unwrap();
                assert_eq!(buf[3] as usize, i, "in order, header first");
                assert_eq!(&buf[4..n], &payloads[i][..]);
            }
        }
    }

    #[tokio::test]
    async fn ipv4_and_ipv6_sockets_share_a_port_and_the_ipv6_one_takes_only_ipv6() {
        let v4 = bind_udp("0.0.0.0:0".parse().unwrap()).unwrap();
        let port = v4.local_addr().unwrap().port();
        let Ok(v6) = bind_udp(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) else {
            return; // no IPv6 on this host: nothing to check
        };
        assert_eq!(v6.local_addr().unwrap().port(), port);
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"4", ("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 4];
        let (n, _) = v4.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"4", "IPv4 reaches the IPv4 socket");
        let Ok(client6) = UdpSocket::bind("[::1]:0").await else {
            return; // no IPv6 loopback
        };
        client6.send_to(b"6", ("::1", port)).await.unwrap();
        let (n, from) = v6.recv_from(&mut buf).await.unwrap();
        assert_eq!(
            (&buf[..n], from),
            (&b"6"[..], client6.local_addr().unwrap())
        );
    }

    #[tokio::test]
    async fn a_dual_stack_socket_reports_ipv4_senders_as_ipv4() {
        let Ok(b) = UdpSocket::bind("[::]:0").await else {
            return; // no IPv6 on this host: nothing to check
        };
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = b.local_addr().unwrap().port();
        a.send_to(b"x", ("127.0.0.1", port)).await.unwrap();
        let mut got = RecvBatch::default();
        got.recv(&b).await.unwrap();
        assert_eq!(got.from(0), a.local_addr().unwrap());
        // And a reply to that IPv4 address leaves the IPv6 socket.
        let mut out = SendBatch::default();
        out.push(&[], b"y", got.from(0));
        assert_eq!(out.flush(&b).await, 0);
        let mut buf = [0u8; 4];
        let (n, _) = a.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"y");
    }
}

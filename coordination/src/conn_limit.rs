//! Per-source bounds on connections to the HTTP/WebSocket listener.
//!
//! A connection is *pending* from `accept` until it becomes an
//! authenticated WebSocket session (the `101 Switching Protocols` of
//! `/v1/connect`): the TLS handshake, and any request before the upgrade.
//! Anyone can open pending connections, so their bound per source is low;
//! sessions need a node credential, and many nodes may share one NAT
//! address, so the bound on all connections per source is much higher.
//!
//! ```text
//!  accept ──open()──▶ pending ──authenticated()──▶ session ──drop──▶ gone
//!            │ over a bound: refused, the socket closed at once
//! ```
//!
//! A source is an IPv4 address, or the /64 of an IPv6 address (what one
//! subscriber usually gets). Nothing here waits: a connection over a bound
//! is refused, so the accept loop never blocks on what a client does.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Bounds on the connections of one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpLimits {
    /// Connections that are not (yet) an authenticated session.
    pub pending_per_ip: usize,
    /// All connections, sessions included.
    pub conns_per_ip: usize,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    TooManyPending,
    TooManyConns,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    pending: usize,
    total: usize,
}

/// Counts the open connections of each source.
#[derive(Debug)]
pub struct ConnLimiter {
    limits: IpLimits,
    sources: Mutex<HashMap<IpAddr, Counts>>,
}

/// The key `ip` is counted under: its IPv4 address (an IPv4-mapped IPv6
/// address included), or the /64 it belongs to.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !(u128::from(u64::MAX));
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

impl ConnLimiter {
    pub fn new(limits: IpLimits) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            limits,
            sources: Mutex::new(HashMap::new()),
        })
    }

    fn sources(&self) -> MutexGuard<'_, HashMap<IpAddr, Counts>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a new pending connection from `ip`, or refuses it.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Result<ConnPermit, Refused> {
        let key = source_key(ip);
        let mut sources = self.sources();
        let counts = sources.entry(key).or_default();
        if counts.total >= self.limits.conns_per_ip {
            Self::forget_if_empty(&mut sources, key);
            return Err(Refused::TooManyConns);
        }
        if counts.pending >= self.limits.pending_per_ip {
            Self::forget_if_empty(&mut sources, key);
            return Err(Refused::TooManyPending);
        }
        counts.pending += 1;
        counts.total += 1;
        Ok(ConnPermit {
            limiter: Arc::clone(self),
            key,
            pending: AtomicBool::new(true),
        })
    }

    fn forget_if_empty(sources: &mut HashMap<IpAddr, Counts>, key: IpAddr) {
        if sources.get(&key).is_some_and(|c| c.total == 0) {
            sources.remove(&key);
        }
    }

    /// `(pending, total)` connections of `ip`'s source.
    pub fn counts(&self, ip: IpAddr) -> (usize, usize) {
        self.sources()
            .get(&source_key(ip))
            .map(|c| (c.pending, c.total))
            .unwrap_or((0, 0))
    }

    /// Sources with at least one open connection.
    pub fn sources_tracked(&self) -> usize {
        self.sources().len()
    }
}

/// One admitted connection; dropping it gives its slots back.
#[derive(Debug)]
pub struct ConnPermit {
    limiter: Arc<ConnLimiter>,
    key: IpAddr,
    pending: AtomicBool,
}

impl ConnPermit {
    /// The connection became an authenticated session: it no longer counts
    /// against the pending bound. Idempotent.
    pub fn authenticated(&self) {
        if self.pending.swap(false, Ordering::AcqRel) {
            if let Some(c) = self.limiter.sources().get_mut(&self.key) {
                c.pending = c.pending.saturating_sub(1);
            }
        }
    }
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        let was_pending = self.pending.swap(false, Ordering::AcqRel);
        let mut sources = self.limiter.sources();
        if let Some(c) = sources.get_mut(&self.key) {
            c.total = c.total.saturating_sub(1);
            if was_pending {
                c.pending = c.pending.saturating_sub(1);
            }
        }
        ConnLimiter::forget_if_empty(&mut sources, self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn limiter(pending: usize, total: usize) -> Arc<ConnLimiter> {
        ConnLimiter::new(IpLimits {
            pending_per_ip: pending,
            conns_per_ip: total,
        })
    }

    #[test]
    fn pending_connections_are_bounded_per_source() {
        let l = limiter(2, 10);
        let a = l.open(ip("192.0.2.1")).unwrap();
        let _b = l.open(ip("192.0.2.1")).unwrap();
        assert_eq!(
            l.open(ip("192.0.2.1")).unwrap_err(),
            Refused::TooManyPending
        );
        // Another source is not affected.
        let _c = l.open(ip("192.0.2.2")).unwrap();
        drop(a);
        assert!(l.open(ip("192.0.2.1")).is_ok());
    }

    #[test]
    fn sessions_leave_the_pending_bound_but_count_in_the_total() {
        let l = limiter(1, 3);
        let mut held = Vec::new();
        for _ in 0..3 {
            let p = l.open(ip("192.0.2.1")).unwrap();
            p.authenticated();
            p.authenticated();
            held.push(p);
        }
        assert_eq!(l.counts(ip("192.0.2.1")), (0, 3));
        assert_eq!(l.open(ip("192.0.2.1")).unwrap_err(), Refused::TooManyConns);
        held.pop();
        let p = l.open(ip("192.0.2.1")).unwrap();
        assert_eq!(l.counts(ip("192.0.2.1")), (1, 3));
        drop(p);
        drop(held);
        assert_eq!(l.sources_tracked(), 0, "empty sources are forgotten");
    }

    #[test]
    fn mapped_ipv4_and_one_ipv6_64_are_one_source() {
        let l = limiter(1, 10);
        let _a = l.open(ip("192.0.2.1")).unwrap();
        assert!(l.open(ip("::ffff:192.0.2.1")).is_err());
        let _b = l.open(ip("2001:db8:1:2::1")).unwrap();
        assert!(l.open(ip("2001:db8:1:2:ffff::9")).is_err());
        assert!(l.open(ip("2001:db8:1:3::1")).is_ok());
    }

    #[test]
    fn refused_sources_leave_no_entry() {
        let l = limiter(0, 0);
        assert!(l.open(ip("192.0.2.1")).is_err());
        assert_eq!(l.sources_tracked(), 0);
    }
}

//! One ICE agent's datagrams from the shared socket, read by each of its
//! host candidates.
//!
//! webrtc-ice gives all host candidates of an agent the one conn the mux
//! hands out, and every candidate runs its own receive task on it. Whichever
//! task reads a datagram handles it *as that candidate*: it looks the sender
//! up among the remote candidates of its own family, and pairs it with
//! itself. With one queue, an IPv4 check read by the IPv6 candidate's task is
//! taken for a new peer-reflexive candidate on a pair that can never succeed;
//! when that check was the controlling side's nomination, the controlled side
//! never selects a pair (seen in about one session in twenty with loopback
//! candidates of both families; see `agent_tests`). So every reader sees
//! every datagram:
//!
//! ```text
//!   mux ──deliver──▶ [ ring of the latest datagrams ] ──▶ task of candidate 10.0.0.5  (cursor)
//!                                                     ──▶ task of candidate 2001:db8::5 (cursor)
//! ```
//!
//! A reader of the wrong family finds no such remote and drops the datagram
//! without side effects (for answers) or answers a check the right reader
//! answers too (a duplicate success the peer ignores). Readers are told
//! apart by their tokio task: each candidate's receive loop is its own task.
//! The readers start together but not at once, so a datagram is kept
//! [`READER_GRACE`] after it came even when every reader so far has read it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio::task;

/// Datagrams kept for readers that have not read them yet; beyond, the
/// oldest are dropped, as a full socket buffer would (STUN is sparse).
pub const CAPACITY: usize = 256;
/// How long a datagram waits for readers that have not started yet. The
/// candidates' tasks start within microseconds of each other; keepalives
/// come once a second, so this keeps a datagram or two per agent.
pub const READER_GRACE: Duration = Duration::from_millis(500);

#[derive(Default)]
pub struct Inbox {
    state: Mutex<Ring>,
    arrived: Notify,
}

#[derive(Default)]
struct Ring {
    /// Datagrams kept, oldest first, with when they came; `first` numbers
    /// the front one.
    datagrams: VecDeque<(Instant, Vec<u8>, SocketAddr)>,
    first: u64,
    /// The next datagram each reader takes. `None`: read outside a task.
    cursors: HashMap<Option<task::Id>, u64>,
}

impl Inbox {
    pub fn deliver(&self, datagram: &[u8], from: SocketAddr, now: Instant) {
        {
            let mut ring = lock(&self.state);
            ring.datagrams.push_back((now, datagram.to_vec(), from));
            if ring.datagrams.len() > CAPACITY {
                ring.datagrams.pop_front();
                ring.first += 1;
                // A reader a whole ring behind has stopped (its candidate
                // closed): it must not keep the ring full. Were it only slow,
                // it registers again at the oldest datagram kept.
                let first = ring.first;
                ring.cursors.retain(|_, cursor| *cursor >= first);
            }
        }
        self.arrived.notify_waiters();
    }

    /// The calling task's next datagram, waiting for one.
    pub async fn recv(&self) -> (Vec<u8>, SocketAddr) {
        let reader = task::try_id();
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            // Registered before looking, so a delivery in between still wakes us.
            arrived.as_mut().enable();
            if let Some(next) = self.take(reader, Instant::now()) {
                return next;
            }
            arrived.await;
        }
    }

    /// `reader`'s next datagram, if one came it has not read.
    fn take(&self, reader: Option<task::Id>, now: Instant) -> Option<(Vec<u8>, SocketAddr)> {
        let mut ring = lock(&self.state);
        let Ring {
            datagrams,
            first,
            cursors,
        } = &mut *ring;
        // A new reader starts at the oldest datagram kept: the candidates'
        // tasks start together, after checks may already have arrived.
        let cursor = cursors.entry(reader).or_insert(*first);
        *cursor = (*cursor).max(*first);
        let index = usize::try_from(*cursor - *first).ok()?;
        let (_, datagram, from) = datagrams.get(index)?;
        let next = (datagram.clone(), *from);
        *cursor += 1;
        // What every reader has read, and late ones had time to, can go.
        let done = cursors.values().min().copied().unwrap_or(*first);
        while *first < done
            && datagrams
                .front()
                .is_some_and(|(came, ..)| now.duration_since(*came) >= READER_GRACE)
        {
            datagrams.pop_front();
            *first += 1;
        }
        Some(next)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn from() -> SocketAddr {
        "192.0.2.1:9".parse().unwrap()
    }

    async fn read_n(inbox: Arc<Inbox>, n: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        for _ in 0..n {
            let next = tokio::time::timeout(Duration::from_secs(2), inbox.recv());
            got.push(next.await.expect("a datagram").0);
        }
        got
    }

    #[tokio::test]
    async fn every_reading_task_gets_every_datagram_including_those_before_it_started() {
        let inbox = Arc::new(Inbox::default());
        inbox.deliver(b"early", from(), Instant::now());
        let a = tokio::spawn(read_n(Arc::clone(&inbox), 3));
        // `a` reads "early" before `b` exists; `b` still gets it.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b = tokio::spawn(read_n(Arc::clone(&inbox), 3));
        tokio::task::yield_now().await;
        inbox.deliver(b"one", from(), Instant::now());
        inbox.deliver(b"two", from(), Instant::now());
        let want: Vec<Vec<u8>> = vec![b"early".to_vec(), b"one".to_vec(), b"two".to_vec()];
        assert_eq!(a.await.unwrap(), want);
        assert_eq!(b.await.unwrap(), want);
    }

    #[test]
    fn datagrams_every_reader_has_read_go_after_the_grace() {
        let inbox = Inbox::default();
        let t0 = Instant::now();
        let [a, b] = two_task_ids().map(Some);
        inbox.deliver(b"x", from(), t0);
        assert!(inbox.take(a, t0).is_some());
        assert!(inbox.take(b, t0).is_some());
        assert_eq!(
            lock(&inbox.state).datagrams.len(),
            1,
            "kept for late readers"
        );
        inbox.deliver(b"y", from(), t0 + READER_GRACE);
        assert!(inbox.take(a, t0 + READER_GRACE).is_some());
        assert_eq!(
            lock(&inbox.state).datagrams.len(),
            1,
            "x is gone (read by both, old), y waits for b"
        );
        assert!(inbox.take(b, t0 + READER_GRACE * 2).is_some());
        assert_eq!(lock(&inbox.state).datagrams.len(), 0, "read by both, old");
        assert!(inbox.take(a, t0 + READER_GRACE * 2).is_none());
    }

    /// Task ids of two spawned tasks, as stand-ins for readers.
    fn two_task_ids() -> [task::Id; 2] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let id = || async { tokio::spawn(async { task::id() }).await.unwrap() };
            [id().await, id().await]
        })
    }

    #[tokio::test]
    async fn an_unread_backlog_is_bounded() {
        let inbox = Inbox::default();
        for i in 0..(CAPACITY + 10) {
            inbox.deliver(&i.to_be_bytes(), from(), Instant::now());
        }
        assert_eq!(lock(&inbox.state).datagrams.len(), CAPACITY);
        let (first, _) = inbox.recv().await;
        assert_eq!(first, 10usize.to_be_bytes(), "the oldest were dropped");
    }

    #[test]
    fn a_reader_that_stopped_does_not_keep_the_ring_full() {
        let inbox = Inbox::default();
        let [gone, live] = two_task_ids().map(Some);
        let t0 = Instant::now();
        inbox.deliver(b"x", from(), t0);
        assert!(inbox.take(gone, t0).is_some());
        // `gone` reads no more; `live` keeps up.
        let later = t0 + READER_GRACE;
        for i in 0..=CAPACITY {
            inbox.deliver(&i.to_be_bytes(), from(), later);
            while inbox.take(live, later).is_some() {}
        }
        let after = later + READER_GRACE;
        inbox.deliver(b"y", from(), after);
        assert!(inbox.take(live, after).is_some());
        assert!(
            lock(&inbox.state).datagrams.len() <= 1,
            "only what arrived within the grace is kept"
        );
    }
}

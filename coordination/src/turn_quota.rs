//! Allocation quotas of the embedded TURN server: per username (one node's
//! credential) and in total, as coturn's `user-quota` and `total-quota`.
//!
//! The turn crate has no quota hook, so the count is kept around it:
//!
//! ```text
//!  listener recv_from: Allocate request with USERNAME u
//!     ├─ check(u): u or the server at its quota → 486 / 508 answered here,
//!     │            not passed on
//!     └─ else the listener notes u ──▶ turn crate authenticates, then allocate_conn
//!                              └─ take(u) → AllocationSlot, kept in the relay
//!                                 socket; dropping the socket frees it
//! ```
//!
//! The listener's note and `take` pair up because the turn crate handles one
//! datagram of a listener at a time: the Allocate it was last handed is the
//! one whose relay socket it asks for (`turn_relay::Admitted`, one per
//! listener, so the IPv4 and IPv6 listeners never take each other's).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::metrics::Metrics;

/// Bounds on allocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub per_user: usize,
    pub total: usize,
}

/// Which quota an allocation would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverQuota {
    /// 486 Allocation Quota Reached.
    User,
    /// 508 Insufficient Capacity.
    Total,
}

#[derive(Debug, Default)]
struct Counts {
    per_user: HashMap<String, usize>,
    total: usize,
}

#[derive(Debug)]
pub struct AllocationQuota {
    quotas: Quotas,
    counts: Mutex<Counts>,
    metrics: Arc<Metrics>,
}

impl AllocationQuota {
    pub fn new(quotas: Quotas, metrics: Arc<Metrics>) -> Arc<AllocationQuota> {
        Arc::new(AllocationQuota {
            quotas,
            counts: Mutex::new(Counts::default()),
            metrics,
        })
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn over(&self, counts: &Counts, username: &str) -> Option<OverQuota> {
        if counts.per_user.get(username).copied().unwrap_or(0) >= self.quotas.per_user {
            Some(OverQuota::User)
        } else if counts.total >= self.quotas.total {
            Some(OverQuota::Total)
        } else {
            None
        }
    }

    /// Whether an Allocate request by `username` may go to the server, or
    /// which quota it would exceed.
    pub fn check(&self, username: &str) -> Result<(), OverQuota> {
        let counts = self.counts();
        if let Some(over) = self.over(&counts, username) {
            self.metrics
                .turn_quota_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(over);
        }
        Ok(())
    }

    /// Counts an allocation of `username`, whose request was checked.
    pub fn take(self: &Arc<Self>, username: String) -> Result<AllocationSlot, OverQuota> {
        let mut counts = self.counts();
        // Checked again: an earlier admitted request may have taken the room.
        if let Some(over) = self.over(&counts, &username) {
            self.metrics
                .turn_quota_refused
                .fetch_add(1, Ordering::Relaxed);
            return Err(over);
        }
        *counts.per_user.entry(username.clone()).or_default() += 1;
        counts.total += 1;
        self.metrics
            .turn_allocations
            .store(counts.total as u64, Ordering::Relaxed);
        Ok(AllocationSlot {
            quota: Arc::clone(self),
            username,
        })
    }

    /// Usernames holding at least one allocation.
    pub fn usernames(&self) -> Vec<String> {
        self.counts().per_user.keys().cloned().collect()
    }

    /// Allocations of `username`.
    pub fn count(&self, username: &str) -> usize {
        self.counts().per_user.get(username).copied().unwrap_or(0)
    }

    /// All allocations.
    pub fn total(&self) -> usize {
        self.counts().total
    }
}

/// One counted allocation; dropping it (with the relay socket) frees it.
#[derive(Debug)]
pub struct AllocationSlot {
    quota: Arc<AllocationQuota>,
    username: String,
}

impl AllocationSlot {
    pub fn username(&self) -> &str {
        &self.username
    }
}

impl Drop for AllocationSlot {
    fn drop(&mut self) {
        let mut counts = self.quota.counts();
        if let Some(n) = counts.per_user.get_mut(&self.username) {
            *n -= 1;
            if *n == 0 {
                counts.per_user.remove(&self.username);
            }
        }
        counts.total = counts.total.saturating_sub(1);
        self.quota
            .metrics
            .turn_allocations
            .store(counts.total as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(per_user: usize, total: usize) -> Arc<AllocationQuota> {
        AllocationQuota::new(Quotas { per_user, total }, Arc::new(Metrics::default()))
    }

    fn allocate(q: &Arc<AllocationQuota>, user: &str) -> Result<AllocationSlot, OverQuota> {
        q.check(user)?;
        q.take(user.to_string())
    }

    #[test]
    fn per_user_quota_leaves_other_users_alone() {
        let q = quota(2, 10);
        let _a1 = allocate(&q, "1:a").unwrap();
        let a2 = allocate(&q, "1:a").unwrap();
        assert_eq!(allocate(&q, "1:a").unwrap_err(), OverQuota::User);
        let _b = allocate(&q, "1:b").unwrap();
        drop(a2);
        assert!(allocate(&q, "1:a").is_ok());
        assert_eq!(q.metrics.turn_quota_refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn total_quota_counts_everyone() {
        let q = quota(5, 2);
        let _a = allocate(&q, "1:a").unwrap();
        let b = allocate(&q, "1:b").unwrap();
        assert_eq!(allocate(&q, "1:c").unwrap_err(), OverQuota::Total);
        assert_eq!(q.total(), 2);
        drop(b);
        assert_eq!(q.usernames(), vec!["1:a".to_string()]);
        assert_eq!(q.metrics.turn_allocations.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn take_checks_again_for_room_taken_since_the_check() {
        let q = quota(1, 5);
        q.check("1:a").unwrap();
        q.check("1:a").unwrap();
        let _a = q.take("1:a".into()).unwrap();
        assert_eq!(q.take("1:a".into()).unwrap_err(), OverQuota::User);
        assert_eq!(q.count("1:a"), 1);
    }
}

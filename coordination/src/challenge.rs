//! Outstanding registration challenges, sans-IO: time comes in as an
//! `Instant`, randomness as bytes.
//!
//! Each challenge is 32 random bytes with its own ephemeral X25519 secret; a
//! registration consumes it whatever the outcome, so a proof is good once.
//! The table is bounded: a full table refuses new challenges (the caller
//! answers 503) rather than evicting live ones, so a flood of challenge
//! requests cannot push out the one a real node is about to use, and memory
//! stays below [`MAX_OUTSTANDING`] entries of ~100 bytes.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Most challenges outstanding at once; about 400 KiB at most.
pub const MAX_OUTSTANDING: usize = 4096;
/// How long a challenge can be answered. A node asks and answers in one round
/// trip, so a minute is generous even over a slow link.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(60);

/// What a challenge hands back to the registration that consumes it.
pub struct Issued {
    /// The ephemeral secret whose public half went to the node.
    pub server_secret: [u8; 32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

pub struct Challenges {
    live: HashMap<[u8; 32], ([u8; 32], Instant)>,
    /// Challenges in issue order with their expiry; the TTL is the same for
    /// all, so the front is always the next to expire. Consumed ones stay
    /// here until they reach the front.
    order: VecDeque<([u8; 32], Instant)>,
    capacity: usize,
    ttl: Duration,
}

impl Default for Challenges {
    fn default() -> Self {
        Challenges::new(MAX_OUTSTANDING, CHALLENGE_TTL)
    }
}

impl Challenges {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Challenges {
            live: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            ttl,
        }
    }

    /// Records a challenge `nonce` with its ephemeral `secret`, unless the
    /// table is full of unexpired ones.
    pub fn issue(&mut self, nonce: [u8; 32], secret: [u8; 32], now: Instant) -> Result<(), Full> {
        self.expire(now);
        // `order` also holds consumed entries until they expire; bound both.
        if self.live.len() >= self.capacity || self.order.len() >= 2 * self.capacity {
            return Err(Full);
        }
        let expires = now + self.ttl;
        self.live.insert(nonce, (secret, expires));
        self.order.push_back((nonce, expires));
        Ok(())
    }

    /// Takes the challenge out; `None` when unknown, expired or already used.
    pub fn consume(&mut self, nonce: &[u8; 32], now: Instant) -> Option<Issued> {
        let (secret, expires) = self.live.remove(nonce)?;
        (now < expires).then_some(Issued {
            server_secret: secret,
        })
    }

    pub fn outstanding(&self) -> usize {
        self.live.len()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(nonce, expires)) = self.order.front() {
            if expires > now {
                break;
            }
            self.order.pop_front();
            if self.live.get(&nonce).is_some_and(|(_, e)| *e == expires) {
                self.live.remove(&nonce);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_is_good_once() {
        let t0 = Instant::now();
        let mut c = Challenges::default();
        c.issue([1; 32], [2; 32], t0).unwrap();
        let got = c.consume(&[1; 32], t0).expect("issued");
        assert_eq!(got.server_secret, [2; 32]);
        assert!(c.consume(&[1; 32], t0).is_none());
        assert!(c.consume(&[3; 32], t0).is_none());
    }

    #[test]
    fn stale_challenge_is_refused_and_forgotten() {
        let t0 = Instant::now();
        let mut c = Challenges::new(4, Duration::from_secs(60));
        c.issue([1; 32], [2; 32], t0).unwrap();
        assert!(c.consume(&[1; 32], t0 + Duration::from_secs(60)).is_none());
        c.issue([5; 32], [2; 32], t0).unwrap();
        c.issue([6; 32], [2; 32], t0 + Duration::from_secs(61))
            .unwrap();
        assert_eq!(c.outstanding(), 1, "the expired one was dropped on issue");
    }

    #[test]
    fn full_table_refuses_until_entries_expire() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut c = Challenges::new(3, ttl);
        for i in 0..3u8 {
            c.issue([i; 32], [0; 32], t0).unwrap();
        }
        assert_eq!(c.issue([9; 32], [0; 32], t0), Err(Full));
        // Live entries were not evicted by the refused one.
        assert!(c.consume(&[0; 32], t0).is_some());
        c.issue([9; 32], [0; 32], t0).unwrap();
        // Consumed entries still count in issue order, but never past 2× capacity.
        for i in 10..13u8 {
            let _ = c.issue([i; 32], [0; 32], t0);
        }
        assert!(c.order.len() <= 6);
        assert_eq!(c.issue([20; 32], [0; 32], t0 + ttl), Ok(()));
        assert_eq!(c.outstanding(), 1);
    }
}

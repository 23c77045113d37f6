//! Capped exponential backoff with jitter, as a plain value: the caller supplies
//! the randomness, so the schedule is testable.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay, without jitter.
    fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt: between half and all of the ceiling
    /// ("equal jitter"), so many nodes that lost the same server do not return in
    /// lockstep, and no delay collapses to zero. `unit` is uniform in `[0, 1)`.
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Call after a success: the next failure starts from the base delay again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let max: Vec<_> = (0..9).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(max[0], Duration::from_millis(500));
        assert_eq!(max[1], Duration::from_secs(1));
        assert_eq!(max[2], Duration::from_secs(2));
        assert_eq!(max[8], Duration::from_secs(30));
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(250));
    }

    #[test]
    fn jitter_stays_within_half_and_full_ceiling() {
        let mut b = Backoff::new(Duration::from_secs(4), Duration::from_secs(60));
        let d = b.next_delay(0.5);
        assert_eq!(d, Duration::from_secs(3));
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..100 {
            b.next_delay(0.3);
        }
        assert!(b.next_delay(0.99) <= Duration::from_secs(60));
    }
}

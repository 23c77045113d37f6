//! A token bucket, sans-IO (time comes in as an `Instant`): how both ends
//! bound each other's control traffic. The coordinator holds a node's session
//! to a message rate, and a node keeps its own signals below that rate so that
//! no mix of peers gets its session throttled.

use std::time::Instant;

/// Tokens refilled at `rate` per second up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilling `rate` tokens per second up to `burst`.
    pub fn new(rate: f64, burst: f64, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.try_take(1.0, now)
    }

    /// Takes `cost` tokens (bytes, say) if there are that many.
    pub fn try_take(&mut self, cost: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        // A `now` older than the last one refills nothing and moves nothing back.
        self.last = now.max(self.last);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_is_allowed_then_refused_then_refilled() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(200.0, 400.0, t0);
        for _ in 0..400 {
            assert!(b.take(t0));
        }
        assert!(!b.take(t0));
        // 10 ms at 200/s refills 2 tokens.
        let t1 = t0 + Duration::from_millis(10);
        assert!(b.take(t1));
        assert!(b.take(t1));
        assert!(!b.take(t1));
    }

    #[test]
    fn refill_never_exceeds_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5.0, t0);
        let later = t0 + Duration::from_secs(3600);
        assert!(b.try_take(5.0, later));
        assert!(!b.try_take(1.0, later));
    }

    #[test]
    fn cost_counts_bytes() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 1500.0, t0);
        assert!(b.try_take(1400.0, t0));
        assert!(!b.try_take(200.0, t0));
    }

    #[test]
    fn an_earlier_now_does_not_refill_twice() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let mut b = TokenBucket::new(1.0, 1.0, t0);
        assert!(b.take(t1));
        assert!(!b.take(t0));
        assert!(!b.take(t1));
    }
}

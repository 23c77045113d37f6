//! Which coordinator replica to try next, and after how long: a plain value
//! (the caller supplies the randomness), so the schedule is testable.
//!
//! A node is given one or more coordinator URLs (`--coordinator a,b,c`). It
//! stays with the one it reached until that connection is lost, then tries
//! the others in turn. Nodes that lose the same replica spread their first
//! retry over [`LOST_SPREAD`], so a replica's ten thousand nodes do not land
//! on the next one in the same instant; a failed attempt moves on to the next
//! URL after a short pause while untried ones remain, and only a whole round
//! of failures grows the delay (capped exponential backoff with jitter, as
//! with one coordinator).

use std::time::Duration;

use crate::control::transport::{Endpoint, TransportError};
use crate::node::backoff::Backoff;

/// The first retry after an established session is lost falls uniformly in
/// `[0, LOST_SPREAD)`.
pub const LOST_SPREAD: Duration = Duration::from_secs(2);
/// Between attempts at different URLs of one round: long enough not to spin
/// when every replica refuses at once, short enough to fail over quickly.
const NEXT_URL_PAUSE: Duration = Duration::from_millis(200);

/// Splits the configured coordinator list: URLs separated by commas or
/// whitespace, each `http[s]://host[:port]`. Duplicates are dropped.
pub fn parse_urls(list: &str) -> Result<Vec<Endpoint>, TransportError> {
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for url in list.split(|c: char| c == ',' || c.is_whitespace()) {
        if url.is_empty() {
            continue;
        }
        let endpoint = Endpoint::parse(url)?;
        if !endpoints.contains(&endpoint) {
            endpoints.push(endpoint);
        }
    }
    if endpoints.is_empty() {
        return Err(TransportError::BadUrl(
            "no coordinator URL given (expected http[s]://host[:port], several separated by commas)"
                .into(),
        ));
    }
    Ok(endpoints)
}

/// Whether two coordinator lists name the same deployment: they share a URL.
pub fn same_deployment(a: &str, b: &str) -> bool {
    match (parse_urls(a), parse_urls(b)) {
        (Ok(a), Ok(b)) => a.iter().any(|e| b.contains(e)),
        _ => false,
    }
}

#[derive(Debug, Clone)]
pub struct Failover {
    count: usize,
    current: usize,
    /// Attempts that failed since the last success (a lost session counts).
    failures: usize,
    backoff: Backoff,
}

impl Failover {
    /// `count` URLs, starting with the first; `backoff` paces whole rounds.
    pub fn new(count: usize, backoff: Backoff) -> Self {
        Failover {
            count: count.max(1),
            current: 0,
            failures: 0,
            backoff,
        }
    }

    /// The index of the URL to try now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// The attempt at [`Failover::current`] succeeded.
    pub fn connected(&mut self) {
        self.failures = 0;
        self.backoff.reset();
    }

    /// The established session was lost: the next URL is tried after a delay
    /// spread over [`LOST_SPREAD`]. `unit` is uniform in `[0, 1)`.
    pub fn lost(&mut self, unit: f64) -> Duration {
        self.failures = 1;
        self.advance();
        LOST_SPREAD.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The attempt at [`Failover::current`] failed: the next URL, after a
    /// short pause while this round has untried URLs, else after the growing
    /// backoff delay. `unit` is uniform in `[0, 1)`.
    pub fn failed(&mut self, unit: f64) -> Duration {
        self.failures += 1;
        self.advance();
        if self.failures.is_multiple_of(self.count) {
            self.backoff.next_delay(unit)
        } else {
            NEXT_URL_PAUSE
        }
    }

    /// Failed rounds since the last success.
    pub fn rounds(&self) -> usize {
        self.failures / self.count
    }

    fn advance(&mut self) {
        self.current = (self.current + 1) % self.count;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30))
    }

    #[test]
    fn urls_split_on_commas_and_spaces_and_drop_duplicates() {
        let urls = parse_urls("http://a:1, https://b ,http://a:1 http://[::1]:9").unwrap();
        let hosts: Vec<_> = urls.iter().map(|e| (e.host.as_str(), e.port)).collect();
        assert_eq!(hosts, [("a", 1), ("b", 443), ("::1", 9)]);
        assert!(parse_urls(" , ").is_err());
        assert!(parse_urls("http://a:1,ftp://b").is_err());
    }

    #[test]
    fn deployments_match_when_lists_share_a_url() {
        assert!(same_deployment("http://a:1,http://b:1", "http://b:1/"));
        assert!(!same_deployment("http://a:1", "http://b:1"));
        assert!(!same_deployment("http://a:1", "nonsense"));
    }

    #[test]
    fn one_url_keeps_the_old_backoff_schedule() {
        let mut f = Failover::new(1, backoff());
        let delays: Vec<_> = (0..4).map(|_| f.failed(1.0)).collect();
        assert_eq!(f.current(), 0);
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000].map(Duration::from_millis).to_vec()
        );
        f.connected();
        assert_eq!(f.failed(1.0), Duration::from_millis(500));
    }

    #[test]
    fn a_lost_replica_moves_on_within_the_spread() {
        let mut f = Failover::new(3, backoff());
        f.connected();
        let delay = f.lost(0.5);
        assert_eq!(f.current(), 1);
        assert_eq!(delay, LOST_SPREAD / 2);
        assert!(f.lost(0.999_999) < LOST_SPREAD);
        assert_eq!(f.lost(0.0), Duration::ZERO);
    }

    #[test]
    fn failures_try_every_url_before_backing_off() {
        let mut f = Failover::new(3, backoff());
        f.connected();
        f.lost(0.0); // replica 0 died; its node goes to 1
        assert_eq!(f.failed(1.0), NEXT_URL_PAUSE); // 1 is down too: on to 2
        assert_eq!(f.current(), 2);
        // 2 fails: a whole round failed, so the backoff starts.
        assert_eq!(f.failed(1.0), Duration::from_millis(500));
        assert_eq!(f.current(), 0);
        assert_eq!(f.rounds(), 1);
        assert_eq!(f.failed(1.0), NEXT_URL_PAUSE);
        assert_eq!(f.failed(1.0), NEXT_URL_PAUSE);
        assert_eq!(f.failed(1.0), Duration::from_secs(1));
        f.connected();
        assert_eq!(f.rounds(), 0);
        assert_eq!(f.failed(1.0), NEXT_URL_PAUSE);
    }
}

//! When to ask the coordinator for fresh TURN credentials: a pure function of the
//! credentials' expiry and the clock.
//!
//! TURN credentials (coturn's REST scheme) carry their expiry; an allocation whose
//! credential expired can be neither created nor refreshed, so the node asks
//! (`ClientMsg::RefreshIce`) well before, and new ICE sessions use the answer.

use std::time::Duration;

use overlay_proto::coord::IceConfig;

/// Ask once this share of the credential's remaining lifetime has passed...
pub const REFRESH_FRACTION: f64 = 0.75;
/// ...or this long before it expires, whichever comes first.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(10 * 60);
/// Never ask sooner than this: a credential that is already (nearly) expired, or
/// a coordinator that hands out very short ones, must not make us hammer it.
pub const MIN_REFRESH_DELAY: Duration = Duration::from_secs(30);
/// Ask again after this long when an answer did not come.
pub const REFRESH_RETRY: Duration = Duration::from_secs(60);

/// How long from now to ask for fresh credentials, given the `ice` settings
/// received at `now_unix`; `None` when no TURN server has credentials to renew.
pub fn refresh_delay(ice: &IceConfig, now_unix: u64) -> Option<Duration> {
    let expires_at = ice.turn.iter().map(|t| t.expires_at).min()?;
    let lifetime = Duration::from_secs(expires_at.saturating_sub(now_unix));
    let by_fraction = lifetime.mul_f64(REFRESH_FRACTION);
    let by_margin = lifetime.saturating_sub(REFRESH_MARGIN);
    Some(by_fraction.min(by_margin).max(MIN_REFRESH_DELAY))
}

#[cfg(test)]
mod tests {
    use super::*;
    use overlay_proto::coord::TurnServer;

    const NOW: u64 = 1_700_000_000;

    fn ice(expiries: &[u64]) -> IceConfig {
        IceConfig {
            turn: expiries
                .iter()
                .map(|&expires_at| TurnServer {
                    urls: vec!["turn:198.51.100.1:3478?transport=udp".into()],
                    username: format!("{expires_at}:7"),
                    credential: "c".into(),
                    expires_at,
                })
                .collect(),
            ..IceConfig::default()
        }
    }

    #[test]
    fn one_hour_credentials_are_renewed_after_45_minutes() {
        let delay = refresh_delay(&ice(&[NOW + 3600]), NOW);
        assert_eq!(delay, Some(Duration::from_secs(45 * 60)));
    }

    #[test]
    fn long_credentials_are_renewed_at_three_quarters() {
        let delay = refresh_delay(&ice(&[NOW + 12 * 3600]), NOW);
        assert_eq!(delay, Some(Duration::from_secs(9 * 3600)));
    }

    #[test]
    fn short_credentials_are_renewed_ten_minutes_before_expiry() {
        // 30 min: three quarters would be 22.5 min, ten minutes before is 20.
        let delay = refresh_delay(&ice(&[NOW + 1800]), NOW);
        assert_eq!(delay, Some(Duration::from_secs(20 * 60)));
    }

    #[test]
    fn expired_or_tiny_credentials_wait_the_minimum() {
        assert_eq!(
            refresh_delay(&ice(&[NOW - 5]), NOW),
            Some(MIN_REFRESH_DELAY)
        );
        assert_eq!(
            refresh_delay(&ice(&[NOW + 60]), NOW),
            Some(MIN_REFRESH_DELAY)
        );
    }

    #[test]
    fn the_earliest_expiry_decides_and_no_turn_means_no_refresh() {
        let delay = refresh_delay(&ice(&[NOW + 12 * 3600, NOW + 3600]), NOW);
        assert_eq!(delay, Some(Duration::from_secs(45 * 60)));
        assert_eq!(refresh_delay(&IceConfig::default(), NOW), None);
    }
}

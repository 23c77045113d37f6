//! Waiting for a condition with a deadline, never a fixed sleep.

use std::time::{Duration, Instant};

/// How often a condition is re-checked.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Why a condition is not met (yet).
#[derive(Debug)]
pub enum Wait {
    /// Not yet; the text describes the state seen, for the timeout message.
    NotYet(String),
    /// It will never be met (e.g. the process under test exited): stop waiting.
    Fatal(anyhow::Error),
}

/// Any ordinary error while polling (a socket not there yet, a command failing)
/// means "not yet": it is retried, and reported if the deadline passes.
impl From<anyhow::Error> for Wait {
    fn from(err: anyhow::Error) -> Self {
        Wait::NotYet(format!("{err:#}"))
    }
}

/// Shorthand for giving up immediately.
pub fn fatal(err: anyhow::Error) -> Wait {
    Wait::Fatal(err)
}

/// Polls `condition` until it returns `Ok`, for at most `timeout`.
///
/// The error names `what` was awaited and the last state seen, so a failing test
/// says what it was waiting for instead of just "timed out".
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut condition: impl FnMut() -> Result<T, Wait>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    let deadline = start + timeout;
    loop {
        match condition() {
            Ok(value) => return Ok(value),
            Err(Wait::Fatal(err)) => {
                return Err(err.context(format!("gave up waiting for {what}")));
            }
            Err(Wait::NotYet(state)) => {
                if Instant::now() >= deadline {
                    anyhow::bail!(
                        "timed out after {:.1}s waiting for {what}; last state: {state}",
                        start.elapsed().as_secs_f64()
                    );
                }
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The wall clock in milliseconds since the Unix epoch, to line a test's
/// events up with the timestamps in the lab's logs.
pub fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_value_once_the_condition_holds() {
        let mut calls = 0;
        let value = wait_until(Duration::from_secs(5), "three calls", || {
            calls += 1;
            if calls < 3 {
                Err(Wait::NotYet(format!("{calls} calls")))
            } else {
                Ok(calls)
            }
        })
        .expect("condition becomes true");
        assert_eq!(value, 3);
    }

    #[test]
    fn timeout_names_the_condition_and_last_state() {
        let err = wait_until::<()>(Duration::from_millis(250), "the impossible", || {
            Err(anyhow::anyhow!("still impossible").into())
        })
        .expect_err("never true");
        let text = err.to_string();
        assert!(text.contains("waiting for the impossible"), "{text}");
        assert!(text.contains("last state: still impossible"), "{text}");
    }

    #[test]
    fn fatal_stops_waiting_at_once() {
        let start = Instant::now();
        let err = wait_until::<()>(Duration::from_secs(30), "a dead process", || {
            Err(fatal(anyhow::anyhow!("it exited")))
        })
        .expect_err("fatal");
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(format!("{err:#}").contains("it exited"));
    }
}

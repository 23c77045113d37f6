//! Figures: delay percentiles and the servers' memory.

use std::time::Duration;

/// p50, p99 (nearest rank) and max of a set of delays.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    pub fn of(delays: &[Duration]) -> Stats {
        if delays.is_empty() {
            return Stats::default();
        }
        let mut ms: Vec<f64> = delays.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let rank = |q: usize| ms[(ms.len() * q).div_ceil(100).max(1) - 1];
        Stats {
            p50_ms: rank(50),
            p99_ms: rank(99),
            max_ms: ms[ms.len() - 1],
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.p50_ms, self.p99_ms, self.max_ms
        )
    }
}

/// The largest (VmRSS, VmHWM) of the replicas' processes, in kB.
pub fn servers_rss(pids: &[u32]) -> Option<(u64, u64)> {
    pids.iter()
        .filter_map(|&pid| server_rss(Some(pid)))
        .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1)))
}

/// (VmRSS, VmHWM) of `pid` in kB.
pub fn server_rss(pid: Option<u32>) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

pub fn mib(kb: Option<u64>) -> String {
    kb.map_or("-".to_string(), |kb| {
        format!("{:.1} MiB", kb as f64 / 1024.0)
    })
}

pub fn kb(kb: Option<u64>) -> String {
    kb.map_or("-".to_string(), |kb| kb.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_use_nearest_rank() {
        let delays: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = Stats::of(&delays);
        assert_eq!((s.p50_ms, s.p99_ms, s.max_ms), (50.0, 99.0, 100.0));
    }

    #[test]
    fn no_delays_give_zero_stats() {
        assert_eq!(Stats::of(&[]).max_ms, 0.0);
    }
}

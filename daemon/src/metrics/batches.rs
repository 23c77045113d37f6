//! How many packets the data plane's syscalls move at once: TUN reads, UDP
//! GRO reads and UDP GSO sends, as Prometheus histograms. Batching is where
//! the throughput comes from, so these say whether it happens on a machine
//! (a kernel without GRO shows every receive at 1).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the buckets (the last, `+Inf`, is implied).
pub const BOUNDS: [u64; 7] = [1, 2, 4, 8, 16, 32, 64];

/// One histogram of batch sizes; observing costs three relaxed atomic adds.
#[derive(Debug, Default)]
pub struct Batches {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum: AtomicU64,
    count: AtomicU64,
}

/// A histogram read out: cumulative bucket counts, as Prometheus wants them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchSnapshot {
    pub cumulative: [u64; BOUNDS.len() + 1],
    pub sum: u64,
    pub count: u64,
}

impl Batches {
    #[inline]
    pub fn observe(&self, n: usize) {
        let n = n as u64;
        let at = BOUNDS.iter().position(|b| n <= *b).unwrap_or(BOUNDS.len());
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(n, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BatchSnapshot {
        let mut cumulative = [0u64; BOUNDS.len() + 1];
        let mut running = 0;
        for (slot, bucket) in cumulative.iter_mut().zip(&self.buckets) {
            running += bucket.load(Ordering::Relaxed);
            *slot = running;
        }
        BatchSnapshot {
            cumulative,
            sum: self.sum.load(Ordering::Relaxed),
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// The Prometheus text of one histogram.
pub fn render(name: &str, help: &str, s: &BatchSnapshot) -> String {
    let mut text = format!("# HELP {name} {help}\n# TYPE {name} histogram\n");
    for (bound, count) in BOUNDS.iter().zip(&s.cumulative) {
        let _ = writeln!(text, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(
        text,
        "{name}_bucket{{le=\"+Inf\"}} {}",
        s.cumulative[BOUNDS.len()]
    );
    let _ = writeln!(text, "{name}_sum {}", s.sum);
    let _ = writeln!(text, "{name}_count {}", s.count);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fill_cumulative_buckets() {
        let b = Batches::default();
        for n in [1, 1, 3, 64, 65, 200] {
            b.observe(n);
        }
        let s = b.snapshot();
        assert_eq!(s.cumulative, [2, 2, 3, 3, 3, 3, 4, 6]);
        assert_eq!((s.sum, s.count), (334, 6));
        let text = render("overlay_x", "Help.", &s);
        assert!(text.contains("# TYPE overlay_x histogram\n"));
        assert!(text.contains("overlay_x_bucket{le=\"4\"} 3\n"));
        assert!(text.contains("overlay_x_bucket{le=\"+Inf\"} 6\n"));
        assert!(text.contains("overlay_x_sum 334\noverlay_x_count 6\n"));
    }
}

//! Path health: a direct path that stops carrying packets is noticed within
//! seconds, the peer falls back to the coordination relay (and keeps answering
//! pings there), and when UDP works again ICE finds the direct path once more.
//!
//! ```text
//!   coord (10.77.2.1)   a (.2)   b (.3)      a's firewall drops all UDP
//!        └──────────────┴────────┴──── 10.77.2.0/24   for a while, TCP stays
//! ```

use std::time::Duration;

use anyhow::ensure;
use overlay_proto::api::{PathKind, WhyReport};
use overlay_tests::overlay::ping;
use overlay_tests::{lab_test, wait_path, wait_until, Lab, LanPair, Wait};

/// How long a fresh pair may take to go direct.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A dead direct path must be left for the relay within this long.
const FALLBACK_TIMEOUT: Duration = Duration::from_secs(15);
/// ICE declares the session failed a few seconds after the path went quiet.
const FAILURE_TIMEOUT: Duration = Duration::from_secs(40);
/// After UDP returns, ICE retries (with backoff) and must find the direct path.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(90);

const BLOCK_UDP: &str = "table inet ovltest_block {
    chain input { type filter hook input priority -10; meta l4proto udp drop; }
    chain output { type filter hook output priority -10; meta l4proto udp drop; }
}
";

#[test]
fn dead_direct_path_falls_back_to_the_relay_and_recovers() {
    lab_test(|lab: &Lab| {
        let LanPair {
            a_host,
            mut a,
            mut b,
            coord,
            ..
        } = LanPair::start(lab, "10.77.2.0/24")?;
        let b_ip = b.status()?.mesh_ip;

        wait_path(&mut a, "b", PathKind::Direct, DIRECT_TIMEOUT)?;

        lab.nft(&a_host, BLOCK_UDP)?;
        let fallback = wait_path(&mut a, "b", PathKind::CoordRelay, FALLBACK_TIMEOUT)?;
        eprintln!(
            "direct path lost: a moved b to the coord relay after {:.1} s",
            fallback.as_secs_f64()
        );
        // b's checks fail too, a moment later: its replies take the relay
        // only from then on.
        wait_path(&mut b, "a", PathKind::CoordRelay, FALLBACK_TIMEOUT)?;
        let (sent, received) = ping(lab, &a_host, b_ip, &["-c", "10", "-i", "0.2", "-W", "2"])?;
        ensure!(
            sent == 10 && received == 10,
            "over the coord relay: {sent} sent, {received} received"
        );
        // Keep UDP blocked until ICE gave the session up and scheduled a retry,
        // so what follows proves a *new* ICE session finds the path.
        wait_until(FAILURE_TIMEOUT, "a's ICE session with b to fail", || {
            let report: WhyReport = a.ctl_json(&["why", "b"])?;
            match report.next_attempt_in_secs {
                Some(_) if report.path_kind == PathKind::CoordRelay => Ok(()),
                _ => Err(Wait::NotYet(report.conclusion)),
            }
        })?;
        let why = a.ctl(&["why", "b"])?;
        let why = String::from_utf8_lossy(&why.stdout).into_owned();
        ensure!(
            why.contains("coord relay") && why.contains("Next direct attempt in"),
            "overlayctl why b: {why}"
        );

        lab.exec(
            &a_host,
            "nft",
            &["delete", "table", "inet", "ovltest_block"],
        )?;
        let recovered = wait_path(&mut a, "b", PathKind::Direct, RECOVERY_TIMEOUT)?;
        eprintln!(
            "UDP back: a found the direct path to b again after {:.1} s",
            recovered.as_secs_f64()
        );
        let (sent, received) = ping(lab, &a_host, b_ip, &["-c", "10", "-i", "0.2", "-W", "2"])?;
        ensure!(
            sent == 10 && received == 10,
            "direct again: {sent} sent, {received} received"
        );
        drop((b, coord));
        Ok(())
    });
}

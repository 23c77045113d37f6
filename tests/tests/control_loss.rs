//! The data plane does not depend on the coordinator: when it goes away, peers
//! that are connected keep talking, and the daemons reconnect (with backoff) once
//! it is back.
//!
//! ```text
//!   coord (10.77.3.1)   a (.2)   b (.3)
//!        └──────────────┴────────┴──── 10.77.3.0/24
//! ```

use std::time::Duration;

use anyhow::ensure;
use overlay_proto::api::PathKind;
use overlay_tests::overlay::ping;
use overlay_tests::{lab_test, wait_path, wait_until, Coordinator, Daemon, Lab, LanPair, Wait};

const DIRECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The daemons notice a closed control connection at once; allow for slow CI.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(15);
/// Reconnect backoff is capped at 30 s; the coordinator is away for less than that.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(60);

fn wait_connected(d: &mut Daemon, want: bool, timeout: Duration) -> anyhow::Result<()> {
    let what = format!(
        "{} to be {}connected to the coordinator",
        d.name,
        if want { "" } else { "dis" }
    );
    wait_until(timeout, &what, || {
        d.alive()?;
        let status = d.status()?;
        if status.coordinator_connected == want {
            Ok(())
        } else {
            Err(Wait::NotYet(format!(
                "coordinator_connected = {}",
                status.coordinator_connected
            )))
        }
    })
}

#[test]
fn connected_peers_keep_talking_while_the_coordinator_is_down_and_reconnect_after() {
    lab_test(|lab: &Lab| {
        let LanPair {
            a_host,
            mut a,
            mut b,
            coord_host,
            coord,
            ..
        } = LanPair::start(lab, "10.77.3.0/24")?;
        let coord_ip = coord.ip;
        let b_ip = b.status()?.mesh_ip;
        wait_path(&mut a, "b", PathKind::Direct, DIRECT_TIMEOUT)?;
        wait_path(&mut b, "a", PathKind::Direct, DIRECT_TIMEOUT)?;

        drop(coord); // SIGTERM: the server closes every session and exits
        wait_connected(&mut a, false, NOTICE_TIMEOUT)?;
        wait_connected(&mut b, false, NOTICE_TIMEOUT)?;
        let (sent, received) = ping(lab, &a_host, b_ip, &["-c", "20", "-i", "0.2", "-W", "2"])?;
        ensure!(
            sent == 20 && received == 20,
            "with the coordinator down: {sent} sent, {received} received"
        );

        // Same host, same state directory: the nodes and their credentials survive.
        let coord = Coordinator::start(lab, &coord_host, coord_ip, &[])?;
        wait_connected(&mut a, true, RECONNECT_TIMEOUT)?;
        wait_connected(&mut b, true, RECONNECT_TIMEOUT)?;
        wait_path(&mut a, "b", PathKind::Direct, DIRECT_TIMEOUT)?;
        let (sent, received) = ping(lab, &a_host, b_ip, &["-c", "10", "-i", "0.2", "-W", "2"])?;
        ensure!(
            sent == 10 && received == 10,
            "after the coordinator returned: {sent} sent, {received} received"
        );
        drop(coord);
        Ok(())
    });
}

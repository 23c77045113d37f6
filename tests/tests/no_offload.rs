//! A node whose TUN runs without offloads (`OVERLAY_TUN_OFFLOAD=0`, what overlayd
//! falls back to where the kernel refuses them) talks to one with offloads: pings
//! and 32 MiB of TCP each way arrive intact.
//!
//! ```text
//!   coord (10.77.5.1)   a (.2, offloads on)   b (.3, offloads off)
//!        └──────────────┴─────────────────────┴──── 10.77.5.0/24
//! ```

use std::time::Duration;

use anyhow::ensure;
use overlay_proto::api::PathKind;
use overlay_tests::overlay::{bulk_transfer, ping};
use overlay_tests::{lab_test, wait_path, Lab, LanPair};

const BLAST: &str = env!("CARGO_BIN_EXE_tcp_blast");

#[test]
fn a_node_without_tun_offloads_interoperates_with_one_that_has_them() {
    lab_test(|lab: &Lab| {
        let LanPair {
            a_host,
            mut a,
            b_host,
            mut b,
            coord,
            ..
        } = LanPair::start_with(lab, "10.77.5.0/24", &[], |d| {
            if d.name == "b" {
                d.extra_env = vec![("OVERLAY_TUN_OFFLOAD".into(), "0".into())];
            }
        })?;
        let a_ip = a.status()?.mesh_ip;
        let b_ip = b.status()?.mesh_ip;
        wait_path(&mut a, "b", PathKind::Direct, Duration::from_secs(30))?;
        wait_path(&mut b, "a", PathKind::Direct, Duration::from_secs(30))?;
        ensure!(
            b.proc
                .as_ref()
                .is_some_and(|p| p.log().contains("offloads off")),
            "b did not say it runs without offloads"
        );
        let (sent, received) = ping(lab, &a_host, b_ip, &["-c", "5", "-i", "0.2", "-W", "2"])?;
        ensure!(sent == 5 && received == 5, "a → b: {received}/{sent}");
        bulk_transfer(lab, BLAST, &a_host, &b_host, b_ip, 32 << 20)?;
        bulk_transfer(lab, BLAST, &b_host, &a_host, a_ip, 32 << 20)?;
        drop((a, b, coord));
        Ok(())
    });
}

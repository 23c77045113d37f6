//! When both underlay families work, a direct path that stops carrying UDP
//! on one moves to the other (issue #12): ICE keeps both families'
//! candidates, and the session ICE restarts after its pair failed gathers
//! both again.
//!
//! ```text
//!   a ──┐  LAN 10.77.41.0/24 + 2001:db8:41::/64   ┌── b
//!       └──────────────── coord ──────────────────┘
//!   a drops UDP of the family its path to b uses (nftables, both ways);
//!   TCP to the coordinator is untouched.
//! ```
//!
//! Needs root and `cargo build --bins` first.

use std::time::{Duration, Instant};

use anyhow::ensure;
use overlay_proto::api::PathKind;
use overlay_tests::mesh::ping6_lossless;
use overlay_tests::{lab_test, ping_lossless, wait_path, wait_until, LanPair, Node, Wait};

/// How long a pair may take to go direct at first.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(40);
/// How long the move may take: ICE calls the pair disconnected after 3 s and
/// failed after 8 more, the node retries within a few seconds, and the new
/// session's checks take a second or two; generous for a loaded machine.
const MOVE_TIMEOUT: Duration = Duration::from_secs(60);

/// nftables rules that drop every UDP datagram of one family (`ipv4` or
/// `ipv6`) in and out of a host.
fn drop_udp(family: &str) -> String {
    format!(
        "table inet ice6_failover {{\n\
         \tchain input {{ type filter hook input priority 0; policy accept; \
         meta nfproto {family} meta l4proto udp drop; }}\n\
         \tchain output {{ type filter hook output priority 0; policy accept; \
         meta nfproto {family} meta l4proto udp drop; }}\n\
         }}\n"
    )
}

#[test]
fn a_direct_path_moves_to_the_other_family_when_its_own_stops_carrying_udp() {
    lab_test(|lab| {
        let pair = LanPair::start_dual_stack(lab, "10.77.41.0/24", "2001:db8:41::/64")?;
        let LanPair {
            a_host,
            mut a,
            b_host,
            mut b,
            coord: _coord,
            ..
        } = pair;
        wait_path(&mut a, "b", PathKind::Direct, DIRECT_TIMEOUT)?;
        wait_path(&mut b, "a", PathKind::Direct, DIRECT_TIMEOUT)?;
        let (a_ip, b_ip) = (a.status()?.mesh_ip, b.status()?.mesh_ip);
        let a = Node {
            host: a_host,
            daemon: a,
            mesh_ip: a_ip,
        };
        let b = Node {
            host: b_host,
            daemon: b,
            mesh_ip: b_ip,
        };
        let before = a.view_of(&b)?.path;
        let was_v6 = before.contains("v6");
        let (dropped, other) = if was_v6 {
            ("ipv6", "direct (host)")
        } else {
            ("ipv4", "direct (host, v6)")
        };

        lab.nft(&a.host, &drop_udp(dropped))?;
        let cut = Instant::now();
        wait_until(
            MOVE_TIMEOUT,
            &format!("a's path to b to move to {other}"),
            || {
                let (a_sees, b_sees) = (a.view_of(&b)?, b.view_of(&a)?);
                if a_sees.path == other && b_sees.path == other {
                    Ok(())
                } else {
                    Err(Wait::NotYet(format!(
                        "a sees {}, b sees {}",
                        a_sees.path, b_sees.path
                    )))
                }
            },
        )?;
        let moved = cut.elapsed();
        ping_lossless(lab, &a, &b)?;
        ping_lossless(lab, &b, &a)?;
        ping6_lossless(lab, &a, &b)?;
        ping6_lossless(lab, &b, &a)?;
        let after = a.view_of(&b)?.path;
        ensure!(
            after == other,
            "the path changed again during the pings: {after}"
        );
        eprintln!(
            "FAILOVER | {before} -> {after} | {:.1} s after {dropped} UDP was dropped | \
             20 pings each way per mesh family, none lost",
            moved.as_secs_f64()
        );
        Ok(())
    });
}

//! A malicious member of the mesh floods a peer with sealed ICE offers (each one a
//! fresh session, all within its own signaling rate). The victim answers at most
//! one new session per peer every two seconds, drops and counts the rest, and so
//! never exceeds its own signaling rate: it stays connected to the coordinator.
//!
//! ```text
//!   coord (.1)   attacker = a or b, whichever controls ICE (smaller key)
//!      └──────────┴──────── victim = the other one
//! ```
//!
//! Needs root and `cargo build --workspace` first.

use std::time::Duration;

use anyhow::{ensure, Context};
use overlay_proto::api::PathKind;
use overlay_tests::{lab_test, wait_path, Daemon, LanPair};

/// Offers a second the attacker sends: half the coordinator's default message
/// rate, so the attacker itself is not throttled.
const FLOOD_RATE: &str = "100";
const FLOOD_SECS: u64 = 10;

#[test]
fn offer_flood_gets_few_answers_and_the_victim_stays_online() {
    lab_test(|lab| {
        let mut pair = LanPair::start(lab, "10.77.6.0/24")?;
        wait_path(&mut pair.a, "b", PathKind::Direct, Duration::from_secs(30))?;
        let key = |d: &Daemon| -> anyhow::Result<[u8; 32]> {
            overlayd::identity::decode_public_key(&d.status()?.public_key)
                .context("public key in status")
        };
        // The controlling side (smaller key) is the one whose offers are answered.
        let a_controls = key(&pair.a)? < key(&pair.b)?;
        let (attacker, victim) = if a_controls {
            (&mut pair.a, &mut pair.b)
        } else {
            (&mut pair.b, &mut pair.a)
        };
        attacker.stop()?;
        let before = victim.status()?.dropped;

        let state = attacker.state_dir.to_string_lossy().into_owned();
        let secs = FLOOD_SECS.to_string();
        let out = lab.output(
            &attacker.host,
            env!("CARGO_BIN_EXE_hostile_node"),
            &[&state, "offer-flood", &victim.name, FLOOD_RATE, &secs],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        ensure!(
            out.status.success(),
            "hostile_node: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let field = |name: &str| -> anyhow::Result<u64> {
            text.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("no {name}= in {text:?}"))
        };
        eprintln!("hostile_node: {text}");
        let (sent, answers, signals) = (field("sent")?, field("answers")?, field("signals")?);
        ensure!(sent >= 900, "the flood sent only {sent} offers");
        // A burst of 3 sessions, then one per 2 s; a little slack for timing.
        ensure!(
            answers <= 3 + FLOOD_SECS / 2 + 2,
            "the victim answered {answers} of {sent} offers"
        );
        // Its signals to the attacker stay within the per-peer budget (40 + 10/s).
        ensure!(
            signals <= 40 + 10 * FLOOD_SECS + 10,
            "the victim sent {signals} signals during the flood"
        );

        let after = victim.status()?;
        ensure!(
            after.coordinator_connected,
            "the victim lost its coordinator session"
        );
        let dropped = after.dropped.excess_offer - before.excess_offer;
        ensure!(
            dropped + answers >= sent * 9 / 10,
            "the victim counted {dropped} excess offers of {sent}"
        );
        let log = victim.proc.as_ref().map(|p| p.log()).unwrap_or_default();
        ensure!(
            !log.contains("lost coordinator connection"),
            "the victim's control session was closed during the flood"
        );
        Ok(())
    });
}

//! A coordinator served over TLS (a self-signed certificate made by openssl): nodes
//! that trust it (`--ca-cert`) enrol, connect and reach each other directly; a node
//! that does not trust it is refused with one clear line.
//!
//! ```text
//!   coord https://10.77.4.1:8080   a (.2)   b (.3)   c (.4, no --ca-cert)
//!        └─────────────────────────┴────────┴────────┴──── 10.77.4.0/24
//! ```

use std::time::Duration;

use anyhow::ensure;
use overlay_proto::api::PathKind;
use overlay_tests::overlay::ping;
use overlay_tests::{bin, cert, lab_test, wait_path, Coordinator, Daemon, Lab};

const DIRECT_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn nodes_enrol_and_connect_over_tls_and_an_untrusted_certificate_is_refused() {
    lab_test(|lab: &Lab| {
        let lan = lab.segment("lan", "10.77.4.0/24")?;
        let coord_host = lab.host("coord")?;
        let coord_ip = lab.attach(&coord_host, &lan)?.ip;
        let (cert, key) = cert::self_signed(lab.dir(), &coord_ip.to_string())?;
        let (cert, key) = (
            cert.to_string_lossy().into_owned(),
            key.to_string_lossy().into_owned(),
        );
        let coord = Coordinator::start(
            lab,
            &coord_host,
            coord_ip,
            &["--tls-cert", &cert, "--tls-key", &key],
        )?;
        let auth = coord.create_key(lab)?;
        let url = format!("https://{coord_ip}:8080");

        let mut nodes = Vec::new();
        for name in ["a", "b"] {
            let host = lab.host(name)?;
            lab.attach(&host, &lan)?;
            let mut d = Daemon::new(lab, &host, name, &url)?;
            d.extra_args = vec!["--ca-cert".into(), cert.clone()];
            d.start(lab, Some(&auth))?;
            nodes.push((host, d));
        }
        let b_ip = nodes[1].1.status()?.mesh_ip;
        ensure!(
            nodes[0].1.status()?.coordinator_connected,
            "a is not connected over TLS"
        );
        wait_path(&mut nodes[0].1, "b", PathKind::Direct, DIRECT_TIMEOUT)?;
        let (sent, received) = ping(lab, &nodes[0].0, b_ip, &["-c", "5", "-i", "0.2", "-W", "2"])?;
        ensure!(
            sent == 5 && received == 5,
            "a → b: {sent} sent, {received} received"
        );

        // Without the certificate the node cannot enrol, and says why in one line.
        let c_host = lab.host("c")?;
        lab.attach(&c_host, &lan)?;
        let state = lab.subdir("c-state")?;
        let out = lab.output(
            &c_host,
            bin("overlayd")?,
            &[
                "up",
                "--coordinator",
                &url,
                "--auth-key",
                &auth,
                "--state-dir",
                &state.to_string_lossy(),
                "--interface",
                "ovl0",
                "--socket",
                &state.join("sock").to_string_lossy(),
            ],
        )?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        ensure!(
            !out.status.success() && lines.len() == 1 && lines[0].contains("TLS"),
            "an untrusted coordinator should give one TLS error line, got {stderr:?}"
        );
        drop(nodes);
        drop(coord);
        Ok(())
    });
}

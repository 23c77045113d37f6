//! A coordinator served over TLS (a self-signed certificate made by openssl): nodes
//! that trust it (`--ca-cert`) enrol, connect and reach each other directly; a node
//! that does not trust it is refused with one clear line.
//!
//! ```text
//!   coord https://10.77.4.1:8080   a (.2)   b (.3)   c (.4, no --ca-cert)
//!        └─────────────────────────┴────────┴────────┴──── 10.77.4.0/24
//! ```

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use overlay_proto::api::PathKind;
use overlay_tests::overlay::ping;
use overlay_tests::{
    bin, cert, lab_test, wait_path, wait_until, Coordinator, Daemon, Host, Lab, Wait,
};

const DIRECT_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn nodes_enrol_and_connect_over_tls_and_an_untrusted_certificate_is_refused() {
    lab_test(|lab: &Lab| {
        let lan = lab.segment("lan", "10.77.4.0/24")?;
        let coord_host = lab.host("coord")?;
        let coord_ip = lab.attach(&coord_host, &lan)?.ip;
        let (coord, cert, auth) = tls_coordinator(lab, &coord_host, coord_ip, "critical,CA:FALSE")?;
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
        let line = failed_enrolment(lab, &c_host, "c", &url, &auth, &[])?;
        ensure!(
            line.contains("TLS") && line.contains("--ca-cert FILE"),
            "an untrusted coordinator should give one TLS error line saying what to do, got {line:?}"
        );
        drop(nodes);
        drop(coord);
        Ok(())
    });
}

/// The certificate `openssl req -x509` makes by default is a CA (CA:TRUE), which
/// webpki refuses as a server's even when trusted: the node says so in one line.
#[test]
fn a_ca_certificate_served_by_the_coordinator_gets_a_one_line_explanation() {
    lab_test(|lab: &Lab| {
        let lan = lab.segment("lan", "10.77.5.0/24")?;
        let coord_host = lab.host("coord")?;
        let coord_ip = lab.attach(&coord_host, &lan)?.ip;
        let (coord, cert, auth) = tls_coordinator(lab, &coord_host, coord_ip, "critical,CA:TRUE")?;
        let host = lab.host("a")?;
        lab.attach(&host, &lan)?;
        let url = format!("https://{coord_ip}:8080");
        let line = failed_enrolment(lab, &host, "a", &url, &auth, &["--ca-cert", &cert])?;
        ensure!(
            line.contains("CaUsedAsEndEntity") && line.contains("CA:FALSE"),
            "a CA:TRUE coordinator certificate should give one explaining line, got {line:?}"
        );
        drop(coord);
        Ok(())
    });
}

/// `overlay-coord cert self-signed` writes what a lab needs: the coordinator
/// serves its leaf, and a node given the printed `--ca-cert` flag enrols.
#[test]
fn self_signed_certificates_from_overlay_coord_let_a_node_enrol() {
    lab_test(|lab: &Lab| {
        let lan = lab.segment("lan", "10.77.6.0/24")?;
        let coord_host = lab.host("coord")?;
        let coord_ip = lab.attach(&coord_host, &lan)?.ip;
        let dir = lab.subdir("certs")?;
        let out = Command::new(bin("overlay-coord")?)
            .args([
                "cert",
                "self-signed",
                "--ip",
                &coord_ip.to_string(),
                "--dns",
                "coord.lab",
            ])
            .arg("--out")
            .arg(&dir)
            .output()?;
        ensure!(out.status.success(), "cert self-signed failed: {out:?}");
        let flag = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let ca = flag
            .strip_prefix("--ca-cert ")
            .with_context(|| format!("cert self-signed printed {flag:?}"))?
            .to_string();
        let (cert, key) = (dir.join("coord.crt"), dir.join("coord.key"));
        let coord = Coordinator::start(
            lab,
            &coord_host,
            coord_ip,
            &[
                "--tls-cert",
                &cert.to_string_lossy(),
                "--tls-key",
                &key.to_string_lossy(),
            ],
        )?;
        let auth = coord.create_key(lab)?;
        let host = lab.host("a")?;
        lab.attach(&host, &lan)?;
        let mut node = Daemon::new(lab, &host, "a", &format!("https://{coord_ip}:8080"))?;
        node.extra_args = vec!["--ca-cert".into(), ca];
        node.start(lab, Some(&auth))?;
        wait_until(
            Duration::from_secs(10),
            "a to connect over TLS with the generated certificates",
            || match node.status()? {
                s if s.coordinator_connected => Ok(()),
                s => Err(Wait::NotYet(format!("{s:?}"))),
            },
        )?;
        drop(node);
        drop(coord);
        Ok(())
    });
}

/// Runs `overlayd up` on `host` against `url` (plus `extra` arguments), expects
/// it to fail, and returns the one line it printed on stderr.
fn failed_enrolment(
    lab: &Lab,
    host: &Host,
    name: &str,
    url: &str,
    auth: &str,
    extra: &[&str],
) -> anyhow::Result<String> {
    let state = lab.subdir(&format!("{name}-state"))?;
    let (state_dir, socket) = (
        state.to_string_lossy().into_owned(),
        state.join("sock").to_string_lossy().into_owned(),
    );
    let mut args = vec!["up", "--coordinator", url, "--auth-key", auth];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--state-dir",
        &state_dir,
        "--interface",
        "ovl0",
        "--socket",
        &socket,
    ]);
    let out = lab.output(host, bin("overlayd")?, &args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(
        !out.status.success() && lines.len() == 1,
        "overlayd should fail with one line on stderr, got {stderr:?}"
    );
    Ok(lines[0].to_string())
}

/// A coordinator on `ip` serving a self-signed certificate with the given
/// basicConstraints; returns it, the certificate's path and a reusable auth key.
fn tls_coordinator(
    lab: &Lab,
    host: &Host,
    ip: std::net::Ipv4Addr,
    constraints: &str,
) -> anyhow::Result<(Coordinator, String, String)> {
    let (cert, key) = cert::self_signed_with(lab.dir(), &ip.to_string(), constraints)?;
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let coord = Coordinator::start(lab, host, ip, &["--tls-cert", &cert, "--tls-key", &key])?;
    let auth = coord.create_key(lab)?;
    Ok((coord, cert, auth))
}

//! Built-in ACME against Debian's pebble (the ACME test CA): the coordinator
//! obtains its certificate with TLS-ALPN-01, nodes trusting pebble's root enrol
//! by name over TLS, the short-lived certificate is renewed and swapped in
//! while the nodes stay connected, and a restart reuses the stored certificate.
//!
//! ```text
//!   coord (.1)                  ca (.2)                         a (.3)   b (.4)
//!   overlay-coord :8080         pebble :14000 (ACME), :15000    resolv.conf → ca
//!   --acme-domain coord.lab.test dnsmasq: coord.lab.test → .1
//!        └──────────────────────────┴──────────────────────────────┴────────┴──── 10.77.41.0/24
//! ```
//!
//! pebble validates on `tlsPort` 8080, the coordinator's listener, and
//! resolves the name through the lab's dnsmasq (`-dnsserver`).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use overlay_tests::overlay::{tcp_listening, COORD_PORT};
use overlay_tests::{cert, lab_test, wait_until, Coordinator, Daemon, Host, Lab, Wait};

const DOMAIN: &str = "coord.lab.test";
/// Lifetime of pebble's certificates: renewal is due two thirds in (40 s).
const CERT_LIFETIME_SECS: u64 = 60;
const ISSUE_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn coordinator_obtains_and_renews_its_certificate_with_acme_without_dropping_nodes() {
    lab_test(|lab: &Lab| {
        let lan = lab.segment("pub", "10.77.41.0/24")?;
        let coord_host = lab.host("coord")?;
        let coord_ip = lab.attach(&coord_host, &lan)?.ip;
        let ca_host = lab.host("ca")?;
        let ca_ip = lab.attach(&ca_host, &lan)?.ip;

        let _dnsmasq = overlay_tests::dnsmasq::start(lab, &ca_host, ca_ip, &[(DOMAIN, coord_ip)])?;
        let pebble = Pebble::start(lab, &ca_host, ca_ip)?;

        let acme_args = [
            "--acme-domain",
            DOMAIN,
            "--acme-directory",
            &format!("https://{ca_ip}:14000/dir"),
            "--acme-ca",
            &pebble.https_cert,
            "--acme-email",
            "ops@lab.test",
        ];
        let started = Instant::now();
        let mut coord = Coordinator::start(lab, &coord_host, coord_ip, &acme_args)?;
        coord
            .proc
            .wait_for_log("ACME: obtained the certificate", ISSUE_TIMEOUT)?;
        eprintln!("certificate obtained {:?} after start", started.elapsed());
        let files = coord.state_dir.join("acme");
        for file in ["account.json", "coord.lab.test.crt", "coord.lab.test.key"] {
            let mode = file_mode(&files.join(file))?;
            ensure!(mode == 0o600, "{file} has mode {mode:o}, not 600");
        }
        let auth = coord.create_key(lab)?;

        let url = format!("https://{DOMAIN}:{COORD_PORT}");
        let mut nodes = Vec::new();
        for name in ["a", "b"] {
            let host = lab.host(name)?;
            lab.attach(&host, &lan)?;
            lab.resolv_conf(&host, &format!("nameserver {ca_ip}\n"))?;
            let mut d = Daemon::new(lab, &host, name, &url)?;
            d.extra_args = vec!["--ca-cert".into(), pebble.root.clone()];
            d.start(lab, Some(&auth))?;
            nodes.push((host, d));
        }
        for (_, d) in &nodes {
            ensure!(
                d.status()?.coordinator_connected,
                "{} did not connect over TLS",
                d.name
            );
        }
        let first_serial = served_serial(lab, &nodes[0].0)?;

        // The renewal: the nodes' sessions must stay up throughout.
        let renewal_deadline = Duration::from_secs(CERT_LIFETIME_SECS + 30);
        wait_until(
            renewal_deadline,
            "the coordinator to renew its certificate",
            || {
                coord.proc.ensure_running().map_err(overlay_tests::fatal)?;
                for (_, d) in &nodes {
                    let s = d.status().map_err(overlay_tests::fatal)?;
                    if !s.coordinator_connected {
                        return Err(overlay_tests::fatal(anyhow::anyhow!(
                            "{} lost the coordinator while waiting for the renewal",
                            d.name
                        )));
                    }
                }
                if coord.proc.log().contains("ACME: renewed the certificate") {
                    Ok(())
                } else {
                    Err(Wait::NotYet("no renewal logged yet".into()))
                }
            },
        )?;
        eprintln!("certificate renewed {:?} after start", started.elapsed());
        let second_serial = served_serial(lab, &nodes[0].0)?;
        ensure!(
            first_serial != second_serial,
            "the coordinator still serves certificate {first_serial} after the renewal"
        );
        for (_, d) in &nodes {
            ensure!(d.status()?.coordinator_connected, "{} disconnected", d.name);
            let connects = d
                .proc
                .as_ref()
                .map(|p| p.log().matches("connected to coordinator").count())
                .unwrap_or_default();
            ensure!(
                connects == 1,
                "{} connected {connects} times: the renewal dropped its session",
                d.name
            );
        }

        // A restart serves the stored certificate before any new order.
        coord.proc.stop()?;
        let obtained = coord.proc.log().matches("ACME: obtained").count();
        let mut coord = Coordinator::start(lab, &coord_host, coord_ip, &acme_args)?;
        coord.proc.wait_for_log(
            "ACME: using the stored certificate for coord.lab.test",
            Duration::from_secs(10),
        )?;
        ensure!(
            served_serial(lab, &nodes[0].0)? == second_serial,
            "the restarted coordinator does not serve the stored certificate"
        );
        for (_, d) in &nodes {
            let name = d.name.clone();
            wait_until(
                Duration::from_secs(30),
                &format!("{name} to reconnect"),
                || match d.status()? {
                    s if s.coordinator_connected => Ok(()),
                    s => Err(Wait::NotYet(format!("{s:?}"))),
                },
            )?;
        }
        ensure!(
            coord.proc.log().matches("ACME: obtained").count() == obtained,
            "the restarted coordinator ordered a new certificate instead of reusing the stored one"
        );
        drop(nodes);
        drop(coord);
        drop(pebble);
        Ok(())
    });
}

/// A running pebble and the files a test needs from it.
struct Pebble {
    /// pebble's own HTTPS certificate, for `--acme-ca`.
    https_cert: String,
    /// The root its certificates chain to, for the nodes' `--ca-cert`.
    root: String,
    _proc: overlay_tests::Proc,
}

impl Pebble {
    fn start(lab: &Lab, host: &Host, ip: std::net::Ipv4Addr) -> anyhow::Result<Pebble> {
        let dir = lab.subdir("pebble")?;
        let (cert, key) = cert::self_signed(&dir, &ip.to_string())?;
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("{ip}:14000"),
                "managementListenAddress": format!("{ip}:15000"),
                "certificate": cert,
                "privateKey": key,
                "httpPort": 5002,
                "tlsPort": COORD_PORT,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": CERT_LIFETIME_SECS,
            }
        });
        let config_path = dir.join("pebble-config.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let mut cmd = Command::new("/usr/bin/pebble");
        cmd.arg("-config")
            .arg(&config_path)
            .args(["-dnsserver", &format!("{ip}:53")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_VA_ALWAYS_VALID", "0")
            // Every order validates again (no reused authorizations), and no
            // nonce is rejected at random: the test is about our side.
            .env("PEBBLE_AUTHZREUSE", "0")
            .env("PEBBLE_WFE_NONCEREJECT", "0");
        let mut proc = lab.spawn(host, "pebble", cmd)?;
        wait_until(Duration::from_secs(20), "pebble to listen", || {
            proc.ensure_running().map_err(overlay_tests::fatal)?;
            if tcp_listening(lab, host, "14000")? && tcp_listening(lab, host, "15000")? {
                Ok(())
            } else {
                Err(Wait::NotYet("not on 14000 and 15000 yet".into()))
            }
        })?;
        let cert = cert.to_string_lossy().into_owned();
        let root_pem = lab.exec(
            host,
            "curl",
            &[
                "-sSf",
                "--cacert",
                &cert,
                &format!("https://{ip}:15000/roots/0"),
            ],
        )?;
        ensure!(
            root_pem.contains("BEGIN CERTIFICATE"),
            "pebble's /roots/0 gave {root_pem:?}"
        );
        let root = dir.join("root.pem");
        std::fs::write(&root, root_pem)?;
        Ok(Pebble {
            https_cert: cert,
            root: root.to_string_lossy().into_owned(),
            _proc: proc,
        })
    }
}

/// The serial of the certificate the coordinator serves to `from`, by name.
fn served_serial(lab: &Lab, from: &Host) -> anyhow::Result<String> {
    let script = format!(
        "openssl s_client -connect {DOMAIN}:{COORD_PORT} -servername {DOMAIN} </dev/null 2>/dev/null \
         | openssl x509 -noout -serial"
    );
    let out = lab.exec(from, "sh", &["-c", &script])?;
    let serial = out.trim();
    ensure!(
        serial.starts_with("serial="),
        "openssl printed {out:?} for the served certificate"
    );
    Ok(serial.to_string())
}

fn file_mode(path: &std::path::Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .permissions()
        .mode()
        & 0o777)
}

//! The files in `packaging/` stay true to the programs: the example configurations
//! name every key and only real ones, and the systemd units run what they should.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use overlay_tests::{bin, lab_test, Host, Lab};

fn packaging(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(file)
}

fn read(file: &str) -> String {
    std::fs::read_to_string(packaging(file))
        .unwrap_or_else(|e| panic!("reading packaging/{file}: {e}"))
}

/// Settings are written `#key = value` (no space after `#`), prose `# text`.
/// Returns `table.key` for every commented setting.
fn commented_keys(text: &str) -> BTreeSet<String> {
    let mut table = String::new();
    let mut keys = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        let setting = line.strip_prefix('#').unwrap_or(line);
        if setting.starts_with('[') {
            table = setting.trim_matches(|c| c == '[' || c == ']').to_string();
            continue;
        }
        let Some((key, _)) = setting.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if line.starts_with("# ")
            || key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            continue;
        }
        keys.insert(if table.is_empty() {
            key.to_string()
        } else {
            format!("{table}.{key}")
        });
    }
    keys
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[test]
fn daemon_example_config_documents_every_key() {
    let keys = commented_keys(&read("overlayd.toml.example"));
    let expected = set(&[
        "coordinator",
        "auth_key",
        "auth_key_file",
        "hostname",
        "state_dir",
        "interface",
        "socket",
        "mtu",
        "ca_cert",
        "metrics_listen",
        "dns",
        "idle_timeout",
        "log",
    ]);
    assert_eq!(keys, expected);
}

#[test]
fn coordinator_example_config_documents_every_key() {
    let keys = commented_keys(&read("coord.toml.example"));
    let expected = set(&[
        "listen",
        "state_dir",
        "network",
        "network6",
        "public_addr",
        "allow_http",
        "tls_cert",
        "tls_key",
        "max_sessions",
        "pending_conns_per_ip",
        "conns_per_ip",
        "relay_rate_mib",
        "relay_burst_mib",
        "turn.embedded",
        "turn.port",
        "turn.secret",
        "turn.allow_private",
        "turn.ttl",
        "turn.allocations_per_user",
        "turn.max_allocations",
        "turn.external.urls",
        "turn.external.secret",
        "dns.enabled",
        "dns.domain",
        "dns.records.name",
        "dns.records.ip",
        "acme.domain",
        "acme.directory",
        "acme.email",
        "acme.ca",
    ]);
    assert_eq!(keys, expected);
}

#[test]
fn systemd_units_run_the_packaged_configs() {
    let daemon = read("overlayd.service");
    for line in [
        "Type=simple",
        "ExecStart=/usr/bin/overlayd up --config /etc/overlay/overlayd.toml",
        "RuntimeDirectory=overlay",
        "StateDirectory=overlay",
        "Restart=on-failure",
    ] {
        assert!(
            daemon.lines().any(|l| l == line),
            "overlayd.service lacks {line}"
        );
    }
    assert!(daemon.contains("CAP_NET_ADMIN"));
    let coord = read("overlay-coord.service");
    for line in [
        "Type=simple",
        "ExecStart=/usr/bin/overlay-coord serve --config /etc/overlay/coord.toml",
        "StateDirectory=overlay-coord",
        "Restart=on-failure",
        "User=overlay-coord",
    ] {
        assert!(
            coord.lines().any(|l| l == line),
            "overlay-coord.service lacks {line}"
        );
    }
}

/// The example with every setting uncommented and every system path moved under
/// `dir`, so trying it touches nothing outside the lab.
fn uncommented(text: &str, dir: &Path) -> String {
    let dir = dir.to_string_lossy();
    text.lines()
        .map(|line| match line.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("/var/lib/", &format!("{dir}/var-lib-"))
        .replace("/run/overlay/", &format!("{dir}/run-"))
        .replace("/etc/overlay/", &format!("{dir}/etc-"))
        .replace("https://coord.example.com", "http://127.0.0.1:1")
        .replace("0.0.0.0:443", "127.0.0.1:18443")
}

/// Runs `program args` in an empty namespace for at most a few seconds and returns
/// its stderr: it may fail for other reasons (missing files, unreachable
/// coordinator), but never because of an unknown key.
fn stderr_of(lab: &Lab, host: &Host, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let err_path = lab.dir().join(format!("{program}.stderr"));
    let mut cmd = lab.command(host, bin(program)?);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path)?);
    let mut child = cmd.spawn().context("spawn")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(std::fs::read_to_string(&err_path).unwrap_or_default())
}

#[test]
fn example_configs_use_only_keys_the_programs_know() {
    lab_test(|lab| {
        let dir = lab.subdir("examples")?;
        let daemon_cfg = dir.join("overlayd.toml");
        std::fs::write(
            &daemon_cfg,
            uncommented(&read("overlayd.toml.example"), &dir),
        )?;
        let coord_cfg = dir.join("coord.toml");
        std::fs::write(&coord_cfg, uncommented(&read("coord.toml.example"), &dir))?;

        let host = lab.host("cfg")?;
        let err = stderr_of(
            lab,
            &host,
            "overlayd",
            &["up", "--config", &daemon_cfg.to_string_lossy()],
        )?;
        ensure!(
            !err.contains("unknown field"),
            "overlayd rejects a key of its example: {err}"
        );
        ensure!(
            !err.contains("panicked"),
            "overlayd panicked on its example: {err}"
        );

        let coord_args = ["--config", &coord_cfg.to_string_lossy(), "serve"].map(String::from);
        let coord_args: Vec<&str> = coord_args.iter().map(String::as_str).collect();
        let err = stderr_of(lab, &host, "overlay-coord", &coord_args)?;
        ensure!(
            !err.contains("unknown field"),
            "overlay-coord rejects a key of its example: {err}"
        );
        ensure!(
            !err.contains("panicked"),
            "overlay-coord panicked on its example: {err}"
        );
        Ok(())
    });
}

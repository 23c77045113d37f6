//! Bad configuration gets one clear line and a nonzero exit, never a panic.
//!
//! The programs run inside an otherwise empty lab namespace (loopback only), so a
//! daemon that got further than it should could not touch the host's network.

use std::fs::File;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use overlay_tests::{bin, lab_test, Host, Lab};

/// A misconfigured program must give up within this time, not retry forever.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

struct Run {
    status: ExitStatus,
    stderr: String,
}

/// Runs `program args…` in `host` with `RUST_LOG` unset (what a user sees), and
/// waits for it to exit by itself; killed if it does not within [`EXIT_TIMEOUT`].
fn run(lab: &Lab, host: &Host, label: &str, program: &str, args: &[&str]) -> anyhow::Result<Run> {
    let stdout_path = lab.dir().join(format!("{label}.stdout"));
    let stderr_path = lab.dir().join(format!("{label}.stderr"));
    let mut cmd = lab.command(host, bin(program)?);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).context("creating stdout file")?)
        .stderr(File::create(&stderr_path).context("creating stderr file")?);
    let mut child = cmd.spawn().with_context(|| format!("starting {program}"))?;
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            bail!(
                "{program} {} did not exit within {EXIT_TIMEOUT:?}; stderr so far:\n{stderr}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    Ok(Run { status, stderr })
}

/// Nonzero exit; no panic; exactly one line of error (clap's "For more
/// information, try '--help'." hint aside) which contains every one of `needles`.
fn assert_one_clear_line(run: &Run, what: &str, needles: &[&str]) -> anyhow::Result<()> {
    ensure!(
        !run.status.success(),
        "{what}: exited successfully; stderr: {}",
        run.stderr
    );
    ensure!(
        !run.stderr.contains("panicked") && !run.stderr.contains("RUST_BACKTRACE"),
        "{what}: panicked: {}",
        run.stderr
    );
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
        .collect();
    ensure!(
        lines.len() == 1,
        "{what}: expected one error line, got {}:\n{}",
        lines.len(),
        run.stderr
    );
    for needle in needles {
        ensure!(
            lines[0].contains(needle),
            "{what}: the error line does not mention {needle:?}: {}",
            lines[0]
        );
    }
    Ok(())
}

/// Runs `check` in a lab with one empty host, `cfg`, and a directory for files.
fn cfg_lab(check: impl FnOnce(&Lab, &Host, &Path) -> anyhow::Result<()>) {
    lab_test(|lab| {
        let host = lab.host("cfg")?;
        let dir = lab.subdir("cfg")?;
        check(lab, &host, &dir)
    });
}

/// `up` arguments for a daemon whose files live in `dir`, plus `extra`.
fn daemon_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["up", "--hostname", "cfg", "--interface", "ovl0"]
        .map(String::from)
        .to_vec();
    args.push("--state-dir".into());
    args.push(dir.join("state").to_string_lossy().into_owned());
    args.push("--socket".into());
    args.push(dir.join("overlayd.sock").to_string_lossy().into_owned());
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[test]
fn unknown_key_in_daemon_config_names_file_and_key() {
    cfg_lab(|lab, host, dir| {
        let config = dir.join("overlayd.toml");
        std::fs::write(
            &config,
            format!(
                "coordinator = \"http://127.0.0.1:1\"\nhostname = \"cfg\"\nstate_dir = \"{}\"\n\
                 socket = \"{}\"\ninterface = \"ovl0\"\nbogus_key = true\n",
                dir.join("state").display(),
                dir.join("overlayd.sock").display()
            ),
        )?;
        let config = config.to_string_lossy();
        let r = run(
            lab,
            host,
            "unknown-key",
            "overlayd",
            &["up", "--config", &config],
        )?;
        assert_one_clear_line(
            &r,
            "overlayd with an unknown config key",
            &["bogus_key", &config],
        )
    });
}

#[test]
fn first_start_without_auth_key_says_to_pass_one() {
    cfg_lab(|lab, host, dir| {
        let args = daemon_args(dir, &["--coordinator", "http://127.0.0.1:1"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = run(lab, host, "no-key", "overlayd", &args)?;
        assert_one_clear_line(&r, "overlayd without an auth key", &["--auth-key"])
    });
}

#[test]
fn unreachable_coordinator_is_one_line_and_leaves_nothing_behind() {
    cfg_lab(|lab, host, dir| {
        let args = daemon_args(
            dir,
            &[
                "--coordinator",
                "http://127.0.0.1:1",
                "--auth-key",
                "not-a-real-key",
            ],
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = run(lab, host, "unreachable", "overlayd", &args)?;
        assert_one_clear_line(
            &r,
            "overlayd with an unreachable coordinator",
            &["127.0.0.1:1"],
        )?;
        let link = lab.output(host, "ip", &["link", "show", "ovl0"])?;
        ensure!(
            !link.status.success(),
            "a failed overlayd left its interface behind"
        );
        ensure!(
            !dir.join("overlayd.sock").exists(),
            "a failed overlayd left its socket behind"
        );
        Ok(())
    });
}

#[test]
fn coordinator_rejects_an_impossible_network() {
    cfg_lab(|lab, host, dir| {
        let state = dir.join("coord-state");
        let state = state.to_string_lossy();
        let r = run(
            lab,
            host,
            "bad-cidr",
            "overlay-coord",
            &[
                "serve",
                "--listen",
                "127.0.0.1:18080",
                "--state-dir",
                &state,
                "--public-addr",
                "127.0.0.1",
                "--allow-http",
                "--network",
                "10.0.0.0/99",
            ],
        )?;
        assert_one_clear_line(
            &r,
            "overlay-coord with --network 10.0.0.0/99",
            &["10.0.0.0/99"],
        )
    });
}

#[test]
fn overlayctl_without_a_daemon_says_how_to_start_one() {
    let missing = std::env::temp_dir().join(format!("ovl-no-daemon-{}.sock", std::process::id()));
    let out = Command::new(bin("overlayctl").expect("overlayctl built"))
        .args(["--socket", &missing.to_string_lossy(), "peers"])
        .output()
        .expect("run overlayctl");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "overlayctl: overlayd is not running (no socket at {}); start it with 'sudo overlayd up'\n",
            missing.display()
        )
    );
}

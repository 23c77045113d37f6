//! Processes run by the lab: short commands whose output we check, and long-lived
//! [`Proc`]s that log to a file and are stopped when dropped.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a stopped process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs `cmd` to completion and returns its output, whatever its exit status.
pub fn output(cmd: &mut Command) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", describe(cmd)))
}

/// Runs `cmd` and returns its stdout; a nonzero exit is an error carrying stderr.
pub fn checked(cmd: &mut Command) -> anyhow::Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `prog arg arg …`, for error messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Sends `signal` (a name such as `TERM`) to `pid` with kill(1), the tests crate
/// having no libc.
pub fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    checked(
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string()),
    )
    .map(|_| ())
}

/// A long-lived process with its stdout and stderr in a log file. Dropping it stops
/// it: SIGTERM, then SIGKILL after [`STOP_GRACE`].
pub struct Proc {
    label: String,
    child: Child,
    log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Proc {
    /// Starts `cmd` with its output appended to `log`.
    pub fn spawn(label: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = file.try_clone().context("cloning log handle")?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {label}: {}", describe(&cmd)))?;
        Ok(Proc {
            label: label.to_string(),
            child,
            log: log.to_path_buf(),
            exit: None,
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process has written so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.exit.is_none() {
            self.exit = self
                .child
                .try_wait()
                .with_context(|| format!("checking on {}", self.label))?;
        }
        Ok(self.exit)
    }

    /// An error (with the log tail) if the process has already exited: for polling
    /// loops that wait on something this process should produce.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.try_exit()? {
            bail!(
                "{} exited early ({status}); its log ends with:\n{}",
                self.label,
                tail(&self.log(), 30)
            );
        }
        Ok(())
    }

    /// Waits up to `timeout` until the process's log contains `needle` (a program
    /// saying it is ready), failing early with its log tail if it exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let what = format!("{} to log {needle:?}", self.label);
        crate::wait::wait_until(timeout, &what, || {
            self.ensure_running().map_err(crate::wait::fatal)?;
            if self.log().contains(needle) {
                Ok(())
            } else {
                Err(crate::wait::Wait::NotYet("not yet".into()))
            }
        })
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.label);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then SIGKILL if it is still running after `grace`. Returns how it
    /// ended and whether it needed the SIGKILL.
    pub fn stop_within(&mut self, grace: Duration) -> anyhow::Result<(ExitStatus, bool)> {
        if let Some(status) = self.try_exit()? {
            return Ok((status, false));
        }
        // The process may exit between the check and the signal; that is fine.
        let _ = signal(self.pid(), "TERM");
        match self.wait_exit(grace) {
            Ok(status) => Ok((status, false)),
            Err(_) => {
                let _ = self.child.kill();
                let status = self.child.wait().context("waiting after SIGKILL")?;
                self.exit = Some(status);
                Ok((status, true))
            }
        }
    }

    /// Stops the process (see [`Proc::stop_within`]) and returns its exit status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.stop_within(STOP_GRACE).map(|(status, _)| status)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn proc_logs_output_and_stops_on_drop() {
        let log = std::env::temp_dir().join(format!("ovl-proc-test-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&log);
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 60"]);
        let mut proc = Proc::spawn("sleeper", cmd, &log).expect("spawn sh");
        crate::wait_until(Duration::from_secs(5), "the echo", || {
            if proc.log().contains("started") {
                Ok(())
            } else {
                Err(crate::Wait::NotYet("no output".into()))
            }
        })
        .expect("sh echoes");
        let start = Instant::now();
        let (status, killed) = proc.stop_within(Duration::from_secs(5)).expect("stop");
        assert!(!killed, "sleep obeys SIGTERM");
        assert!(!status.success());
        assert!(start.elapsed() < Duration::from_secs(5));
        let _ = std::fs::remove_file(&log);
    }
}

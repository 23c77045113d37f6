//! Self-signed TLS certificates for tests, made by openssl (which tests that
//! need one require: a test skipped for want of it would pass without testing).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{ensure, Context};

/// A self-signed end-entity certificate for the address `ip` and its key,
/// written to `dir` as `cert.pem` and `key.pem`; valid for one day.
pub fn self_signed(dir: &Path, ip: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    self_signed_with(dir, ip, "critical,CA:FALSE")
}

/// As [`self_signed`], with the given basicConstraints (`critical,CA:TRUE` is
/// what a plain `openssl req -x509` makes, and what nodes must refuse).
pub fn self_signed_with(
    dir: &Path,
    ip: &str,
    constraints: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", &format!("/CN={ip}")])
        .args(["-addext", &format!("subjectAltName=IP:{ip}")])
        .args(["-addext", &format!("basicConstraints={constraints}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .context("running openssl (install the openssl package)")?;
    ensure!(status.success(), "openssl could not make a certificate");
    Ok((cert, key))
}

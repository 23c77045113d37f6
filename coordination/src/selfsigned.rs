//! `overlay-coord cert self-signed`: a CA and a server certificate it signs.
//!
//! A certificate made with a plain `openssl req -x509` is a CA (CA:TRUE), and
//! webpki refuses a CA as a server's certificate (`CaUsedAsEndEntity`) even when
//! the node trusts it. So this writes the two a lab needs: a CA for the nodes'
//! `--ca-cert`, and a leaf (CA:FALSE, serverAuth, the given IPs and names) for the
//! coordinator. The CA's private key is dropped: nothing more can be signed.

use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("give at least one --ip or --dns the coordinator is reached at")]
    NoNames,
    #[error("making the certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The files written.
#[derive(Debug)]
pub struct Written {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// PEM texts of the CA certificate, the server certificate and its key.
pub struct Pems {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

/// Makes the CA and the server certificate, valid from the start of this year
/// for `years` more.
pub fn generate(ips: &[IpAddr], names: &[String], years: u16) -> Result<Pems, CertError> {
    if ips.is_empty() && names.is_empty() {
        return Err(CertError::NoNames);
    }
    let year = current_year();
    let (from, until) = (
        rcgen::date_time_ymd(year, 1, 1),
        rcgen::date_time_ymd(year + i32::from(years), 1, 1),
    );

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "overlay-coord lab CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = from;
    ca.not_after = until;
    let ca_cert = ca.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.subject_alt_names
        .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
    let common_name = names
        .first()
        .cloned()
        .or_else(|| ips.first().map(IpAddr::to_string))
        .unwrap_or_default();
    leaf.distinguished_name
        .push(DnType::CommonName, common_name);
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = from;
    leaf.not_after = until;
    let cert = leaf.signed_by(&key, &Issuer::from_params(&ca, &ca_key))?;

    Ok(Pems {
        ca: ca_cert.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    })
}

/// Generates and writes `ca.crt`, `coord.crt` and `coord.key` (0600) into `dir`.
pub fn write(
    dir: &Path,
    ips: &[IpAddr],
    names: &[String],
    years: u16,
) -> Result<Written, CertError> {
    let pems = generate(ips, names, years)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let dir = dir.canonicalize().map_err(io(dir))?;
    let written = Written {
        ca: dir.join("ca.crt"),
        cert: dir.join("coord.crt"),
        key: dir.join("coord.key"),
    };
    for (path, text, mode) in [
        (&written.ca, &pems.ca, 0o644),
        (&written.cert, &pems.cert, 0o644),
        (&written.key, &pems.key, 0o600),
    ] {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(io(path))?;
    }
    Ok(written)
}

fn current_year() -> i32 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    // Mean Gregorian year; exact enough for a certificate that starts on 1 January.
    1970 + (secs / 31_556_952) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_certificate_for_nothing() {
        assert!(matches!(generate(&[], &[], 1), Err(CertError::NoNames)));
    }

    #[test]
    fn writes_a_ca_and_a_leaf_with_a_private_key_file() {
        let dir = std::env::temp_dir().join(format!("ovl-cert-{}", std::process::id()));
        let written = write(
            &dir,
            &["10.0.0.1".parse().expect("ip")],
            &["coord.lab".into()],
            1,
        )
        .expect("write");
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
        };
        assert_eq!(mode(&written.key), 0o600);
        let ca = std::fs::read_to_string(&written.ca).expect("ca");
        let cert = std::fs::read_to_string(&written.cert).expect("cert");
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_ne!(ca, cert);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

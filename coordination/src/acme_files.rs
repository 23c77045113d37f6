//! What built-in ACME keeps in the state directory, every file mode 0600:
//!
//! ```text
//!   STATE_DIR/acme/account.json   the ACME account (its key) and the directory it is on
//!   STATE_DIR/acme/NAME.crt       the certificate chain for NAME
//!   STATE_DIR/acme/NAME.key       its private key
//! ```
//!
//! and when a certificate is due for renewal, read from its own validity.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use instant_acme::AccountCredentials;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The ACME files of one name.
#[derive(Debug, Clone)]
pub struct AcmeFiles {
    dir: PathBuf,
    name: String,
}

#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

impl AcmeFiles {
    pub fn new(state_dir: &Path, name: &str) -> AcmeFiles {
        AcmeFiles {
            dir: state_dir.join("acme"),
            name: name.to_owned(),
        }
    }

    pub fn account_path(&self) -> PathBuf {
        self.dir.join("account.json")
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(format!("{}.crt", self.name))
    }

    pub fn key_path(&self) -> PathBuf {
        self.dir.join(format!("{}.key", self.name))
    }

    /// The stored account, if it is one on `directory` (an account on
    /// another directory is of no use there, and is replaced).
    pub fn load_account(&self, directory: &str) -> Result<Option<AccountCredentials>, FilesError> {
        let path = self.account_path();
        let Some(text) = read_if_present(&path)? else {
            return Ok(None);
        };
        let stored: StoredAccount =
            serde_json::from_str(&text).map_err(|source| FilesError::Json { path, source })?;
        Ok((stored.directory == directory).then_some(stored.credentials))
    }

    pub fn save_account(
        &self,
        directory: &str,
        credentials: AccountCredentials,
    ) -> Result<(), FilesError> {
        let path = self.account_path();
        let stored = StoredAccount {
            directory: directory.to_owned(),
            credentials,
        };
        let text = serde_json::to_string_pretty(&stored).map_err(|source| FilesError::Json {
            path: path.clone(),
            source,
        })?;
        self.write_private(&path, &text)
    }

    /// The stored certificate chain and key (PEM), if both are there.
    pub fn load_cert(&self) -> Result<Option<(String, String)>, FilesError> {
        let cert = read_if_present(&self.cert_path())?;
        let key = read_if_present(&self.key_path())?;
        Ok(cert.zip(key))
    }

    /// Stores a new chain and key; each file is replaced whole (written
    /// beside it, then renamed), so a crash leaves the old or the new one.
    pub fn save_cert(&self, chain_pem: &str, key_pem: &str) -> Result<(), FilesError> {
        self.write_private(&self.key_path(), key_pem)?;
        self.write_private(&self.cert_path(), chain_pem)
    }

    fn write_private(&self, path: &Path, text: &str) -> Result<(), FilesError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| FilesError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))
    }
}

fn read_if_present(path: &Path) -> Result<Option<String>, FilesError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FilesError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A certificate's validity, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: u64,
    pub not_after: u64,
}

impl Validity {
    /// When to renew: two thirds into the lifetime (day 60 of Let's
    /// Encrypt's 90), which leaves a third for retries.
    pub fn renew_at(&self) -> u64 {
        let lifetime = self.not_after.saturating_sub(self.not_before);
        self.not_before.saturating_add(lifetime / 3 * 2)
    }
}

/// The validity of a DER certificate. Only the few fields before it in
/// `tbsCertificate` are walked; anything malformed gives `None`.
pub fn validity(cert_der: &[u8]) -> Option<Validity> {
    let (cert, _) = der(cert_der, 0x30)?;
    let (mut tbs, _) = der(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        tbs = der(tbs, 0xa0)?.1; // [0] version
    }
    let (_, rest) = der(tbs, 0x02)?; // serialNumber
    let (_, rest) = der(rest, 0x30)?; // signature algorithm
    let (_, rest) = der(rest, 0x30)?; // issuer
    let (validity, _) = der(rest, 0x30)?;
    let (not_before, rest) = time(validity)?;
    let (not_after, _) = time(rest)?;
    Some(Validity {
        not_before,
        not_after,
    })
}

/// One DER element with tag `tag` at the start of `input`: (its content, the rest).
fn der(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, mut rest) = rest.split_first()?;
    let len = if len < 0x80 {
        usize::from(len)
    } else {
        let count = usize::from(len & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let (bytes, after) = rest.split_at(count);
        rest = after;
        bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// A UTCTime or GeneralizedTime (`Z` form, as RFC 5280 requires) as Unix seconds.
fn time(input: &[u8]) -> Option<(u64, &[u8])> {
    let (text, rest, year) = match input.first()? {
        0x17 => {
            let (text, rest) = der(input, 0x17)?;
            let yy = number(text.get(0..2)?)?;
            // RFC 5280: YY >= 50 is 19YY.
            (
                text.get(2..)?,
                rest,
                if yy >= 50 { 1900 + yy } else { 2000 + yy },
            )
        }
        0x18 => {
            let (text, rest) = der(input, 0x18)?;
            (text.get(4..)?, rest, number(text.get(0..4)?)?)
        }
        _ => return None,
    };
    if text.len() != 11 || text[10] != b'Z' {
        return None;
    }
    let field = |i: usize| number(&text[i..i + 2]);
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    Some((u64::try_from(secs).ok()?, rest))
}

fn number(digits: &[u8]) -> Option<u32> {
    digits.iter().try_fold(0u32, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
    })
}

/// Days since 1970-01-01 (Howard Hinnant's days-from-civil).
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_valid(from: (i32, u8, u8), until: (i32, u8, u8)) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec!["coord.lab".into()]).expect("params");
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn validity_is_read_from_utc_and_generalized_times() {
        // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 on.
        let der = cert_valid((2023, 11, 14), (2051, 3, 1));
        assert_eq!(
            validity(&der),
            Some(Validity {
                not_before: 1_699_920_000,
                not_after: 2_561_241_600, // date -u -d 2051-03-01 +%s
            })
        );
    }

    #[test]
    fn malformed_certificates_have_no_validity() {
        let der = cert_valid((2024, 1, 1), (2024, 4, 1));
        assert!(validity(&der).is_some());
        for cut in [0, 1, 5, 40, 120] {
            assert_eq!(validity(&der[..cut.min(der.len())]), None, "cut at {cut}");
        }
        assert_eq!(validity(b"not a certificate"), None);
        assert_eq!(validity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_lifetime() {
        let v = Validity {
            not_before: 1000,
            not_after: 1000 + 90 * 86_400,
        };
        assert_eq!(v.renew_at(), 1000 + 60 * 86_400);
    }

    #[test]
    fn files_are_private_and_an_account_belongs_to_its_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = AcmeFiles::new(dir.path(), "coord.lab");
        assert!(files.load_cert().expect("load").is_none());
        files.save_cert("CHAIN", "KEY").expect("save");
        assert_eq!(
            files.load_cert().expect("load"),
            Some(("CHAIN".into(), "KEY".into()))
        );
        let mode = |p: &Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
        };
        assert_eq!(mode(&files.cert_path()), 0o600);
        assert_eq!(mode(&files.key_path()), 0o600);

        let credentials: AccountCredentials = serde_json::from_str(
            r#"{"id":"https://ca/acct/1","key_pkcs8":"MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgJVWC_QzOTCS5vtsJp2IG-UDc8cdDfeoKtxSZxaznM-mhRANCAAQenCPoGgPFTdPJ7VLLKt56RxPlYT1wNXnHc54PEyBg3LxKaH0-sJkX0mL8LyPEdsfL_Oz4TxHkWLJGrXVtNhfH","directory":"https://ca/dir"}"#,
        )
        .expect("credentials");
        files
            .save_account("https://ca/dir", credentials)
            .expect("save account");
        assert_eq!(mode(&files.account_path()), 0o600);
        assert!(files
            .load_account("https://ca/dir")
            .expect("load")
            .is_some());
        assert!(files
            .load_account("https://other/dir")
            .expect("load")
            .is_none());
    }
}

//! Built-in ACME (`serve --acme-domain NAME`): the coordinator obtains its
//! certificate itself, with TLS-ALPN-01 on its own TLS listener, keeps it in
//! the state directory ([`crate::acme_files`]) and renews it while serving.
//!
//! ```text
//!   start ── stored certificate for NAME? ──yes──▶ serve it
//!                    │no                              │
//!                    ▼                                ▼
//!   order ─▶ challenge cert in the resolver ─▶ validator connects with
//!   acme-tls/1 ─▶ finalize ─▶ store (0600) ─▶ swap into the resolver
//!                    ▲                                │
//!                    └── at 2/3 of the lifetime, or after a backoff ◀┘
//! ```
//!
//! Why TLS-ALPN-01: the listener is already TLS on the port the name points
//! at (443 in production), so the challenge needs no second, plain-HTTP port
//! (HTTP-01 would need port 80) and no DNS API (DNS-01).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::acme_files::{self, AcmeFiles, FilesError, Validity};
use crate::acme_http::{AcmeHttp, HttpError};
use crate::cert_resolver::{self, CertResolver, KeyError};
use crate::config::{ConfigError, FileAcme};

/// Let's Encrypt's production directory, the default.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// The wait after the first failed attempt; it doubles with every failure.
const FIRST_RETRY: Duration = Duration::from_secs(60);
/// The longest wait between failed attempts: a 90-day certificate renewed at
/// day 60 gets some 180 more attempts before it expires.
const MAX_RETRY: Duration = Duration::from_secs(4 * 3600);
/// How long the CA may take to validate and to issue.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

/// `--acme-*` / `[acme]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The DNS name the certificate is for; it must point at this listener.
    pub domain: String,
    /// The ACME directory URL.
    pub directory: String,
    /// Contact for the CA's expiry and policy mail.
    pub email: Option<String>,
    /// A CA certificate (PEM) to trust for the directory's HTTPS, besides the
    /// system's roots (a test CA such as pebble).
    pub ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    #[error("the CA offers no TLS-ALPN-01 challenge for {0}")]
    NoTlsAlpn(String),
    #[error("authorization for {name} is {status}")]
    Authorization { name: String, status: String },
    #[error("order is {0}, not ready, after validation")]
    Order(String),
    #[error("the issued certificate: {0}")]
    Key(#[from] KeyError),
    #[error("the issued certificate has no readable validity")]
    Validity,
}

/// Obtains and renews the certificate the resolver serves.
pub struct Acme {
    config: AcmeConfig,
    files: AcmeFiles,
    http: AcmeHttp,
    resolver: Arc<CertResolver>,
    account: Option<Account>,
    /// Validity of the certificate being served.
    current: Option<Validity>,
}

impl Acme {
    /// Checks what can be checked before serving (the CA file, the state
    /// directory) and serves the stored certificate, if there is one for the
    /// name. Obtaining a new one waits for [`Acme::run`]: the validator needs
    /// the listener up.
    pub fn prepare(
        config: &AcmeConfig,
        state_dir: &Path,
        resolver: Arc<CertResolver>,
    ) -> Result<Acme, AcmeError> {
        let http = AcmeHttp::new(config.ca.as_deref())?;
        let files = AcmeFiles::new(state_dir, &config.domain);
        let mut acme = Acme {
            config: config.clone(),
            files,
            http,
            resolver,
            account: None,
            current: None,
        };
        match acme.files.load_cert()? {
            Some((chain, key)) => match serve_pem(&acme.resolver, &chain, &key) {
                Ok(validity) => {
                    info!(
                        "ACME: using the stored certificate for {} (valid until {})",
                        config.domain,
                        crate::cli::fmt_time(validity.not_after)
                    );
                    acme.current = Some(validity);
                }
                Err(e) => warn!(
                    "ACME: the stored certificate {} is unusable ({e}); obtaining a new one",
                    acme.files.cert_path().display()
                ),
            },
            None => info!(
                "ACME: no certificate for {} yet; obtaining one from {}",
                config.domain, config.directory
            ),
        }
        Ok(acme)
    }

    /// Obtains a certificate when one is due, until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut failures = 0u32;
        loop {
            let wait = next_attempt(unix_now(), self.current, failures);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            let renewal = self.current.is_some();
            let result = tokio::select! {
                r = self.obtain() => r,
                _ = shutdown.changed() => return,
            };
            self.resolver.clear_challenge(&self.config.domain);
            match result {
                Ok(validity) => {
                    failures = 0;
                    self.current = Some(validity);
                    info!(
                        "ACME: {} the certificate for {} (valid until {}, renewal due {})",
                        if renewal { "renewed" } else { "obtained" },
                        self.config.domain,
                        crate::cli::fmt_time(validity.not_after),
                        crate::cli::fmt_time(validity.renew_at()),
                    );
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    // A directory that forgot the account (a test CA restarted)
                    // gets a new one next time.
                    self.account = None;
                    warn!(
                        "ACME: could not obtain a certificate for {}: {e}; retrying in {:?}",
                        self.config.domain,
                        next_attempt(unix_now(), self.current, failures)
                    );
                }
            }
        }
    }

    /// One order, from account to the certificate served.
    async fn obtain(&mut self) -> Result<Validity, AcmeError> {
        let account = self.account().await?;
        let name = self.config.domain.clone();
        let identifiers = [Identifier::Dns(name.clone())];
        let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => {
                    return Err(AcmeError::Authorization {
                        name,
                        status: format!("{other:?}").to_lowercase(),
                    })
                }
            }
            let mut challenge = authz
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or_else(|| AcmeError::NoTlsAlpn(name.clone()))?;
            let digest = challenge.key_authorization().digest();
            let key = cert_resolver::challenge_key(&name, digest.as_ref())?;
            self.resolver.set_challenge(&name, Arc::new(key));
            challenge.set_ready().await?;
        }
        let retries = RetryPolicy::new().timeout(ORDER_TIMEOUT);
        let status = order.poll_ready(&retries).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order(format!("{status:?}").to_lowercase()));
        }
        let key_pem = order.finalize().await?;
        let chain_pem = order.poll_certificate(&retries).await?;
        let validity = serve_pem(&self.resolver, &chain_pem, &key_pem)?;
        self.files.save_cert(&chain_pem, &key_pem)?;
        Ok(validity)
    }

    /// The account: cached, else the stored one, else a new one (stored).
    async fn account(&mut self) -> Result<Account, AcmeError> {
        if let Some(account) = &self.account {
            return Ok(account.clone());
        }
        let directory = &self.config.directory;
        let builder = Account::builder_with_http(Box::new(self.http.clone()));
        let account = match self.files.load_account(directory)? {
            Some(credentials) => builder.from_credentials(credentials).await?,
            None => {
                let contact = self.config.email.as_ref().map(|e| format!("mailto:{e}"));
                let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
                let new = NewAccount {
                    contact: &contact,
                    // Asking for --acme-domain is agreeing to the CA's terms (README).
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                };
                let (account, credentials) = builder.create(&new, directory.clone(), None).await?;
                self.files.save_account(directory, credentials)?;
                info!(
                    "ACME: created an account on {directory} ({})",
                    self.files.account_path().display()
                );
                account
            }
        };
        self.account = Some(account.clone());
        Ok(account)
    }
}

/// Parses a chain and key and makes them the served certificate.
fn serve_pem(resolver: &CertResolver, chain: &str, key: &str) -> Result<Validity, AcmeError> {
    let key = cert_resolver::certified_key(chain, key)?;
    let leaf = key.cert.first().ok_or(AcmeError::Validity)?;
    let validity = acme_files::validity(leaf).ok_or(AcmeError::Validity)?;
    resolver.set_current(Arc::new(key));
    Ok(validity)
}

/// How long to wait before the next attempt: none without a certificate,
/// until two thirds of its lifetime with one, and after `failures` failed
/// attempts in a row a doubling backoff (even when the renewal is overdue).
pub fn next_attempt(now: u64, current: Option<Validity>, failures: u32) -> Duration {
    if failures > 0 {
        let doublings = (failures - 1).min(16);
        return FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY);
    }
    match current {
        Some(v) => Duration::from_secs(v.renew_at().saturating_sub(now)),
        None => Duration::ZERO,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// `--acme-*` over `[acme]`; `None` without a domain.
pub(crate) fn resolve_config(
    flags: FileAcme,
    file: FileAcme,
    path: Option<&Path>,
) -> Result<Option<AcmeConfig>, ConfigError> {
    // Errors name the flag when the value came from one, else the key.
    let pick = |flag: Option<String>, key: Option<String>, name: &str| match flag {
        Some(v) => Some((v, format!("--acme-{name}"))),
        None => key.map(|v| (v, format!("acme.{name}"))),
    };
    let bad = |source: &str, message: String| {
        if source.starts_with("--") {
            ConfigError::Invalid(format!("{source}: {message}"))
        } else {
            ConfigError::bad_key(path, source, message)
        }
    };
    let domain = pick(flags.domain, file.domain, "domain");
    let directory = pick(flags.directory, file.directory, "directory");
    let email = pick(flags.email, file.email, "email");
    let ca = flags.ca.or(file.ca);
    let Some((domain, source)) = domain else {
        if directory.is_some() || email.is_some() || ca.is_some() {
            return Err(ConfigError::Invalid(
                "--acme-directory, --acme-email and --acme-ca (acme.*) need --acme-domain (acme.domain)".into(),
            ));
        }
        return Ok(None);
    };
    let domain = acme_domain(&domain).map_err(|e| bad(&source, e))?;
    let directory = match directory {
        Some((url, source)) if !url.starts_with("https://") => {
            return Err(bad(&source, format!("{url:?} is not an https:// URL")))
        }
        Some((url, _)) => url,
        None => LETS_ENCRYPT.to_owned(),
    };
    if let Some((email, source)) = &email {
        if !email.contains('@') || email.contains(char::is_whitespace) || email.contains(',') {
            return Err(bad(source, format!("{email:?} is not an email address")));
        }
    }
    Ok(Some(AcmeConfig {
        domain,
        directory,
        email: email.map(|(e, _)| e),
        ca,
    }))
}

/// A DNS name a certificate can be obtained for with TLS-ALPN-01: no IP
/// address, no wildcard (that needs DNS-01).
fn acme_domain(text: &str) -> Result<String, String> {
    let name = text.trim_end_matches('.').to_ascii_lowercase();
    if name.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "{text:?} is an IP address; ACME needs the DNS name nodes use"
        ));
    }
    if name.contains('*') {
        return Err(format!(
            "{text:?}: wildcard names need DNS-01, which is not supported"
        ));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.contains('.')
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(name)
    } else {
        Err(format!(
            "{text:?} is not a DNS name such as coord.example.com"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400;

    #[test]
    fn without_a_certificate_the_first_attempt_is_immediate() {
        assert_eq!(next_attempt(1000, None, 0), Duration::ZERO);
    }

    #[test]
    fn a_certificate_is_renewed_two_thirds_into_its_lifetime() {
        let v = Validity {
            not_before: 0,
            not_after: 90 * DAY,
        };
        assert_eq!(
            next_attempt(10 * DAY, Some(v), 0),
            Duration::from_secs(50 * DAY)
        );
        assert_eq!(next_attempt(61 * DAY, Some(v), 0), Duration::ZERO);
    }

    #[test]
    fn failures_back_off_doubling_up_to_the_bound() {
        let v = Some(Validity {
            not_before: 0,
            not_after: 90 * DAY,
        });
        assert_eq!(next_attempt(61 * DAY, v, 1), FIRST_RETRY);
        assert_eq!(next_attempt(61 * DAY, v, 2), FIRST_RETRY * 2);
        assert_eq!(next_attempt(61 * DAY, None, 3), FIRST_RETRY * 4);
        assert_eq!(next_attempt(61 * DAY, v, 30), MAX_RETRY);
        assert_eq!(next_attempt(61 * DAY, v, u32::MAX), MAX_RETRY);
    }
}

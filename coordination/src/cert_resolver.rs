//! The certificate the TLS listener serves when it is obtained by ACME: one
//! [`CertResolver`] answers every handshake with the current
//! `Arc<CertifiedKey>`, so a renewal is one pointer swap. Sessions already
//! established keep their keys; only handshakes after the swap see the new
//! certificate, and nothing is dropped.
//!
//! It also answers TLS-ALPN-01 validations (RFC 8737): a client that offers
//! only the `acme-tls/1` protocol gets the self-signed challenge certificate
//! for the name it asks for, and the listener closes the connection after the
//! handshake (see [`crate::http_server`]).

use std::collections::HashMap;
use std::io::BufReader;
use std::sync::{Arc, RwLock};

use rcgen::{CertificateParams, CustomExtension, KeyPair};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// The ALPN protocol of TLS-ALPN-01 validations.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no PEM certificate")]
    NoCert,
    #[error("no PEM private key")]
    NoKey,
    #[error("unreadable PEM: {0}")]
    Pem(#[from] std::io::Error),
    #[error("unusable private key: {0}")]
    Key(#[from] rustls::Error),
    #[error("making the challenge certificate: {0}")]
    Challenge(#[from] rcgen::Error),
}

/// The listener's certificate and the pending TLS-ALPN-01 challenges.
#[derive(Debug, Default)]
pub struct CertResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    /// Challenge certificates by DNS name, while an order is being validated.
    challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl CertResolver {
    /// Serves `key` to every handshake from now on.
    pub fn set_current(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(key);
    }

    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_challenge(&self, name: &str, key: Arc<CertifiedKey>) {
        self.challenges
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_ascii_lowercase(), key);
    }

    pub fn clear_challenge(&self, name: &str) {
        self.challenges
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name.to_ascii_lowercase());
    }

    fn challenge(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.challenges
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&name.to_ascii_lowercase())
            .cloned()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let validation = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
        if validation {
            // A validator never gets the real certificate, and a client
            // that is not one has no business offering acme-tls/1.
            return self.challenge(hello.server_name()?);
        }
        // None (no certificate obtained yet) fails the handshake.
        self.current()
    }
}

/// The listener's rustls configuration, serving what `resolver` holds.
pub fn server_config(
    resolver: Arc<CertResolver>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    // WebSocket upgrades need HTTP/1.1; validators offer only acme-tls/1.
    config.alpn_protocols = vec![b"http/1.1".to_vec(), ACME_TLS_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// A certificate chain and its key, from PEM text.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey, KeyError> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(chain_pem.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(KeyError::NoCert);
    }
    let key = rustls_pemfile::private_key(&mut BufReader::new(key_pem.as_bytes()))?
        .ok_or(KeyError::NoKey)?;
    from_der(certs, key)
}

/// The TLS-ALPN-01 certificate for `name`: self-signed, with the SHA-256 of
/// the key authorization in the critical acmeIdentifier extension.
pub fn challenge_key(
    name: &str,
    key_authorization_digest: &[u8],
) -> Result<CertifiedKey, KeyError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![name.to_owned()])?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(
        key_authorization_digest,
    )];
    let cert = params.self_signed(&key)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    from_der(vec![cert.der().clone()], key_der)
}

fn from_der(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, KeyError> {
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(CertifiedKey::new(certs, signing))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_and_key_from_pem_become_a_certified_key() {
        let pems = crate::selfsigned::generate(&[], &["coord.lab".into()], 1).expect("pems");
        let key = certified_key(&pems.cert, &pems.key).expect("certified key");
        assert_eq!(key.cert.len(), 1);
        assert!(matches!(
            certified_key("", &pems.key),
            Err(KeyError::NoCert)
        ));
        assert!(matches!(
            certified_key(&pems.cert, ""),
            Err(KeyError::NoKey)
        ));
    }

    #[test]
    fn challenges_are_kept_by_name_until_cleared() {
        let resolver = CertResolver::default();
        let key = Arc::new(challenge_key("coord.lab", &[7; 32]).expect("challenge"));
        resolver.set_challenge("Coord.Lab", Arc::clone(&key));
        assert!(resolver.challenge("coord.lab").is_some());
        resolver.clear_challenge("coord.lab");
        assert!(resolver.challenge("coord.lab").is_none());
        assert!(resolver.current().is_none());
        resolver.set_current(key);
        assert!(resolver.current().is_some());
    }
}

//! Secrets: auth keys and node credentials (random, stored as SHA-256),
//! constant-time comparison, and TURN credentials in coturn's REST scheme.

use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use overlay_proto::NodeId;

/// Prefix of auth keys, so a leaked one is recognisable in logs and scanners.
pub const AUTH_KEY_PREFIX: &str = "ovk_";
/// Name of the generated TURN secret inside the state directory.
pub const TURN_SECRET_FILE: &str = "turn-secret";

/// SHA-256 of a secret; what the store keeps instead of the secret.
pub type SecretHash = [u8; 32];

/// 32 random bytes, URL-safe base64: 256 bits, so a plain hash is enough.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A fresh auth key (`ovk_…`), shown to the admin once.
pub fn new_auth_key() -> String {
    format!("{AUTH_KEY_PREFIX}{}", random_token())
}

/// A fresh node credential, shown to the node once.
pub fn new_credential() -> String {
    random_token()
}

pub fn hash_secret(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// Checks `secret` against a stored hash. When the node does not exist the
/// caller passes `None`; the work done is the same, so a timing observer
/// cannot tell an unknown node from a wrong secret.
pub fn verify_secret(secret: &str, stored: Option<&[u8]>) -> bool {
    let presented = hash_secret(secret);
    let dummy = [0xa5u8; 32];
    // `subtle` compares without an early exit, so timing does not tell how
    // much of the hash matched.
    let matches: bool = presented.ct_eq(stored.unwrap_or(&dummy)).into();
    matches && stored.is_some()
}

/// One TURN credential in coturn's REST scheme (`use-auth-secret`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnCredential {
    pub username: String,
    pub password: String,
    pub expires_at: u64,
}

/// `password = base64(HMAC-SHA1(secret, username))`, as coturn computes it.
pub fn turn_password(secret: &str, username: &str) -> String {
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        // HMAC accepts keys of any length; this arm cannot be reached.
        Err(_) => return String::new(),
    };
    mac.update(username.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Credentials for `node` valid until `now + ttl_secs`:
/// username `"<expiry-unix>:<node-id>"`.
pub fn turn_credential(secret: &str, node: NodeId, now: u64, ttl_secs: u64) -> TurnCredential {
    let expires_at = now.saturating_add(ttl_secs);
    let username = format!("{expires_at}:{node}");
    let password = turn_password(secret, &username);
    TurnCredential {
        username,
        password,
        expires_at,
    }
}

/// The expiry of a REST username (`"<expiry>:<anything>"` or just `"<expiry>"`).
pub fn turn_username_expiry(username: &str) -> Option<u64> {
    let expiry = username.split(':').next()?;
    expiry.parse().ok()
}

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is empty")]
    Empty { path: String },
}

/// The TURN secret kept in the state directory, created (mode 0600) on first use.
pub fn load_or_create_turn_secret(state_dir: &Path) -> Result<String, SecretFileError> {
    let path = state_dir.join(TURN_SECRET_FILE);
    let shown = path.display().to_string();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let secret = text.trim().to_string();
            if secret.is_empty() {
                return Err(SecretFileError::Empty { path: shown });
            }
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = random_token();
            let write = || -> std::io::Result<()> {
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    options.mode(0o600);
                }
                let mut file = options.open(&path)?;
                file.write_all(secret.as_bytes())?;
                file.write_all(b"\n")?;
                file.sync_all()
            };
            write().map_err(|source| SecretFileError::Write {
                path: shown,
                source,
            })?;
            Ok(secret)
        }
        Err(source) => Err(SecretFileError::Read {
            path: shown,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_password_matches_coturn_known_vector() {
        // printf '%s' "1700000000:42" | openssl dgst -sha1 -hmac secret -binary | base64
        assert_eq!(
            turn_password("secret", "1700000000:42"),
            "ZzfPuPkrzUOsnm5YISnTiKDnXWo="
        );
    }

    #[test]
    fn turn_credential_username_is_expiry_colon_node() {
        let c = turn_credential("secret", 42, 1_699_956_800, 43_200);
        assert_eq!(c.username, "1700000000:42");
        assert_eq!(c.password, "ZzfPuPkrzUOsnm5YISnTiKDnXWo=");
        assert_eq!(c.expires_at, 1_700_000_000);
        assert_eq!(turn_username_expiry(&c.username), Some(1_700_000_000));
        assert_eq!(turn_username_expiry("x:1"), None);
    }

    #[test]
    fn secrets_verify_only_against_their_hash() {
        let cred = new_credential();
        let stored = hash_secret(&cred);
        assert!(verify_secret(&cred, Some(&stored)));
        assert!(!verify_secret("wrong", Some(&stored)));
        assert!(!verify_secret(&cred, None));
        assert_ne!(new_credential(), cred);
        assert!(new_auth_key().starts_with(AUTH_KEY_PREFIX));
    }

    #[test]
    fn a_hash_differing_in_its_last_byte_or_length_does_not_verify() {
        let mut stored = hash_secret("s");
        stored[31] ^= 1;
        assert!(!verify_secret("s", Some(&stored)));
        assert!(!verify_secret("s", Some(&hash_secret("s")[..31])));
    }

    #[test]
    fn turn_secret_is_created_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let a = load_or_create_turn_secret(dir).unwrap();
        let b = load_or_create_turn_secret(dir).unwrap();
        assert_eq!(a, b);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(TURN_SECRET_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}

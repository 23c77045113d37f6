//! The node's identity on disk: its WireGuard key pair and its enrolment.
//!
//! ```text
//! <state-dir>/private.key   base64 X25519 private key, 0600
//! <state-dir>/node.json     node id, credential, name, mesh IP, network (and IPv6
//!                           prefix when the mesh has one), coordinator; 0600
//! ```

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::{Ipv4Net, Ipv6Net};
use overlay_proto::coord::RegisterResponse;
use overlay_proto::NodeId;
use serde::{Deserialize, Serialize};

/// The node's private key in the state directory, standard base64, mode 0600.
pub const KEY_FILE: &str = "private.key";
const NODE_FILE: &str = "node.json";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot use state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is corrupt ({reason}); remove it to enrol this node again")]
    Corrupt { path: PathBuf, reason: String },
}

/// The node's static WireGuard key pair.
#[derive(Clone)]
pub struct Keypair {
    pub secret: StaticSecret,
    pub public: PublicKey,
}

impl Keypair {
    fn from_bytes(bytes: [u8; 32]) -> Self {
        // boringtun's x25519 wants an older rand_core than ours, so the key is
        // built from our own random bytes rather than `StaticSecret::random`.
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        Keypair { secret, public }
    }

    pub fn generate() -> Self {
        Self::from_bytes(rand::random())
    }

    pub fn public_base64(&self) -> String {
        B64.encode(self.public.as_bytes())
    }
}

/// What enrolment gave us, kept so later starts need no auth key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    pub coordinator: String,
    pub node_id: NodeId,
    pub credential: String,
    pub name: String,
    pub mesh_ip: Ipv4Addr,
    pub network: Ipv4Net,
    /// The mesh's IPv6 prefix when registration gave one: the TUN gets its
    /// IPv6 address at creation. Absent from enrolments made before the
    /// mesh had IPv6 (the coordinator's `Welcome` brings it then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network6: Option<Ipv6Net>,
}

impl Enrolment {
    pub fn from_response(coordinator: &str, r: RegisterResponse) -> Self {
        Enrolment {
            coordinator: coordinator.to_owned(),
            node_id: r.node_id,
            credential: r.credential,
            name: r.name,
            mesh_ip: r.mesh_ip,
            network: r.network,
            network6: r.network6,
        }
    }
}

/// Decodes a base64 X25519 public key as the coordinator distributes them.
pub fn decode_public_key(b64: &str) -> Option<[u8; 32]> {
    B64.decode(b64).ok()?.try_into().ok()
}

pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating, 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Self, IdentityError> {
        let io = |source| IdentityError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    /// Loads the private key, generating and saving one on first start.
    pub fn keypair(&self) -> Result<Keypair, IdentityError> {
        let path = self.dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let bytes: [u8; 32] = B64
                    .decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| IdentityError::Corrupt {
                        path: path.clone(),
                        reason: "not a base64 32-byte key".into(),
                    })?;
                Ok(Keypair::from_bytes(bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = Keypair::generate();
                write_private(&path, B64.encode(keys.secret.to_bytes()).as_bytes())?;
                Ok(keys)
            }
            Err(source) => Err(IdentityError::Io { path, source }),
        }
    }

    pub fn enrolment(&self) -> Result<Option<Enrolment>, IdentityError> {
        let path = self.dir.join(NODE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| IdentityError::Corrupt {
                        path,
                        reason: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(IdentityError::Io { path, source }),
        }
    }

    pub fn save_enrolment(&self, enrolment: &Enrolment) -> Result<(), IdentityError> {
        let bytes = serde_json::to_vec_pretty(enrolment).unwrap_or_default();
        write_private(&self.dir.join(NODE_FILE), &bytes)
    }

    pub fn forget_enrolment(&self) -> Result<(), IdentityError> {
        let path = self.dir.join(NODE_FILE);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(IdentityError::Io { path, source: e })
            }
            _ => Ok(()),
        }
    }
}

/// Writes a secret file atomically with mode 0600 from the start.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let io = |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("overlayd-id-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn key_is_generated_once_and_kept_private() {
        let dir = temp_dir();
        let state = StateDir::open(&dir).unwrap();
        let first = state.keypair().unwrap();
        let again = state.keypair().unwrap();
        assert_eq!(first.public.as_bytes(), again.public.as_bytes());
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn enrolment_round_trips() {
        let dir = temp_dir();
        let state = StateDir::open(&dir).unwrap();
        assert_eq!(state.enrolment().unwrap(), None);
        let e = Enrolment {
            coordinator: "http://c:1".into(),
            node_id: 4,
            credential: "s".into(),
            name: "a".into(),
            mesh_ip: Ipv4Addr::new(100, 64, 0, 4),
            network: "100.64.0.0/10".parse().unwrap(),
            network6: Some("fd7a:115c:a1e0::/48".parse().unwrap()),
        };
        state.save_enrolment(&e).unwrap();
        assert_eq!(state.enrolment().unwrap(), Some(e));
        state.forget_enrolment().unwrap();
        assert_eq!(state.enrolment().unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_enrolment_from_before_ipv6_reads_without_a_prefix() {
        let dir = temp_dir();
        let old = r#"{"coordinator":"http://c:1","node_id":4,"credential":"s","name":"a",
            "mesh_ip":"100.64.0.4","network":"100.64.0.0/10"}"#;
        std::fs::write(dir.join(NODE_FILE), old).unwrap();
        let e = StateDir::open(&dir).unwrap().enrolment().unwrap().unwrap();
        assert_eq!(
            (e.mesh_ip, e.network6),
            (Ipv4Addr::new(100, 64, 0, 4), None)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_key_is_reported() {
        let dir = temp_dir();
        std::fs::write(dir.join(KEY_FILE), "nonsense").unwrap();
        let err = StateDir::open(&dir).unwrap().keypair().err().unwrap();
        assert!(err.to_string().contains("corrupt"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}

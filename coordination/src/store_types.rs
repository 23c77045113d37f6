//! What the store hands out and takes in: node and key rows, enrolment
//! requests and their outcomes.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::Ipv4Net;
use serde::Serialize;

use overlay_proto::coord::PeerInfo;
use overlay_proto::NodeId;

use super::db::DbError;
use super::StoreError;

/// Why an auth key was refused; each maps to a code in `proto::coord::error_code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyProblem {
    Unknown,
    Expired,
    Revoked,
    Spent,
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("auth key refused: {0:?}")]
    AuthKey(KeyProblem),
    /// The public key belongs to an enrolled node and the request did not
    /// carry that node's current credential.
    #[error("public key already enrolled as node {0}")]
    AlreadyEnrolled(NodeId),
    #[error("no free address left in {0}")]
    PoolExhausted(Ipv4Net),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<DbError> for RegisterError {
    fn from(e: DbError) -> Self {
        RegisterError::Store(StoreError::Db(e))
    }
}

/// A validated enrolment request.
#[derive(Debug, Clone)]
pub struct Enrolment {
    pub auth_key: String,
    /// Canonical base64.
    pub public_key: String,
    /// Validated DNS label, lower case.
    pub hostname: String,
    /// The node's current credential, when it re-enrols a known key.
    pub credential: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub node: NodeRow,
    /// The new credential, in clear, returned to the node once.
    pub credential: String,
    /// False when an existing node (same public key, with its credential)
    /// re-registered.
    pub created: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    pub id: NodeId,
    pub name: String,
    pub mesh_ip: Ipv4Addr,
    /// Derived from `mesh_ip` and the mesh's IPv6 prefix; filled by
    /// `list_nodes` (`node_from_row` leaves it empty, and the hub fills
    /// what it is given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mesh_ip6: Option<Ipv6Addr>,
    pub public_key: String,
    pub online: bool,
    pub created_at: u64,
    pub last_seen: Option<u64>,
    pub relay_bytes_in: u64,
    pub relay_bytes_out: u64,
    /// Sorted; filled by the queries that hand rows out (`node_from_row` leaves it empty).
    pub tags: Vec<String>,
}

impl NodeRow {
    pub fn peer_info(&self) -> PeerInfo {
        PeerInfo {
            id: self.id,
            name: self.name.clone(),
            mesh_ip: self.mesh_ip,
            mesh_ip6: self.mesh_ip6,
            public_key: self.public_key.clone(),
            online: self.online,
            tags: self.tags.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyRow {
    pub id: u64,
    pub reusable: bool,
    pub created_at: u64,
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
    pub uses: u64,
    pub last_used_at: Option<u64>,
    /// Tags every node this key enrols gets (`keys create --tag`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl KeyRow {
    /// Why this key cannot be used at `now`, if it cannot.
    pub fn problem(&self, now: u64) -> Option<KeyProblem> {
        if self.revoked_at.is_some() {
            Some(KeyProblem::Revoked)
        } else if self.expires_at.is_some_and(|e| e <= now) {
            Some(KeyProblem::Expired)
        } else if !self.reusable && self.uses > 0 {
            Some(KeyProblem::Spent)
        } else {
            None
        }
    }
}

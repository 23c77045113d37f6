//! overlay's coordination server: enrolment, the node store, IP allocation,
//! netmap push, signaling routing, the last-resort packet relay, TURN
//! credentials and an embedded STUN/TURN server.
//!
//! Start it in-process with [`server::start`] (tests) or [`server::run`]
//! (the binary); administer the same store with [`store::Store`].
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | TOML file, flags, resolved settings and limits |
//! | [`store`] (keys and enrolment in `store_keys.rs`, `store_register.rs`), [`migrations`] | SQLite (default) or PostgreSQL (`db.rs`, `db_pg.rs`): nodes, keys, credentials, removals, held addresses, shared secrets |
//! | [`ipam`] | sans-IO mesh address allocation, the resolver's reserved address |
//! | [`mesh6`] | the mesh IPv6 prefix: validation, the random ULA /48 of a new deployment |
//! | [`dns`] | the mesh DNS settings nodes get: domain, resolver, extra records |
//! | [`auth`] | secrets, hashing, TURN REST credentials |
//! | [`challenge`] | stateless registration challenges (MAC + issue time), single use |
//! | [`validate`] | public key and hostname checks |
//! | [`http`] | routes: register, connect, healthz, metrics |
//! | [`session`] | one node's WebSocket session |
//! | [`hub`] | online sessions, routing, delta broadcast; nodes on other replicas (`hub_remote.rs`) |
//! | [`bus`], [`replica`], [`replica_nats`] | the replicas' bus: what replicas tell each other, the hub's queue to it and who is alive, NATS |
//! | [`welcome`] | the netmap a session starts with, in parts |
//! | [`store_sync`] | presence to the store, removals from it |
//! | [`ice`] | the ICE configuration handed to nodes |
//! | [`turn_server`], [`peer_policy`], [`stun_filter`], [`turn_quota`] | embedded STUN/TURN, its denied peers and quotas |
//! | [`http_server`], [`conn_limit`], [`tls`] | the listener: per-source bounds, deadlines, TLS |
//! | [`acme`] (files in [`acme_files`], HTTPS in [`acme_http`]), [`cert_resolver`] | built-in ACME: obtaining, storing and renewing the certificate; swapping it in while serving |
//! | [`metrics`] | operations (the sessions' token buckets are `overlay_proto::ratelimit`) |
//! | [`server`] | wiring and shutdown |
//! | [`cli`] | the command line and admin commands |
//! | [`selfsigned`] | `cert self-signed`: a lab CA and the server certificate it signs |

pub mod acme;
pub mod acme_files;
pub mod acme_http;
pub mod auth;
pub mod bus;
pub mod cert_resolver;
pub mod challenge;
pub mod cli;
mod cli_policy;
pub mod config;
pub mod conn_limit;
pub mod dns;
pub mod http;
pub mod http_server;
pub mod hub;
pub mod ice;
pub mod ipam;
pub mod mesh6;
pub mod metrics;
pub mod migrations;
pub mod peer_policy;
pub mod policy;
pub mod replica;
pub mod replica_nats;
pub mod selfsigned;
pub mod server;
pub mod session;
pub mod store;
pub mod store_sync;
pub mod stun_alt;
pub mod stun_filter;
pub mod tls;
pub mod turn_quota;
pub mod turn_server;
pub mod validate;
pub mod welcome;

pub use config::Config;
pub use server::{run, start, ServeError, Server};

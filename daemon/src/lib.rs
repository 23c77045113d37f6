//! `overlayd`: one node of the overlay mesh.
//!
//! Modules are named by responsibility: [`control`] talks to the coordination
//! server, [`dataplane`] moves packets, [`path`] decides which path a peer's packets
//! take, [`ice`] owns the ICE agents, [`engine`] ties signaling and paths together,
//! [`local_api`] answers `overlayctl`.

pub mod backoff;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod engine;
pub mod gro;
pub mod ice;
pub mod ice_refresh;
pub mod identity;
pub mod local_api;
pub mod metrics;
pub mod mux;
pub mod netcheck;
pub mod netmap;
pub mod offload;
pub mod packet;
pub mod path;
pub mod peer;
pub mod seal;
pub mod signaling;
pub mod supervise;
pub mod transport;
pub mod tun_device;
pub mod udp_batch;
pub mod why;

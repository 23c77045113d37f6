//! `overlayd`: one node of the overlay mesh.
//!
//! Modules are named by responsibility: [`control`] talks to the coordination
//! server, [`dataplane`] moves packets, [`path`] decides which path a peer's packets
//! take, [`ice`] owns the ICE agents, [`engine`] ties signaling and paths together,
//! [`local_api`] answers `overlayctl`.

pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod gro;
pub mod ice;
pub mod identity;
pub mod local_api;
pub mod mux;
pub mod netcheck;
pub mod node;
pub mod offload;
pub mod packet;
pub mod peer;
pub mod seal;
pub mod shell;
pub mod supervise;
pub mod transport;
pub mod tun_device;
pub mod udp_batch;
pub mod why;

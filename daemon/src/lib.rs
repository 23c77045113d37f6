//! `overlayd`: one node of the overlay mesh.
//!
//! Modules are named by responsibility (see DESIGN.md's module map):
//!
//! ```text
//!   control ──ServerMsg──▶ shell ──inputs──▶ node (decides, no I/O)
//!                            │  ◀──outputs──┘
//!                            ├──▶ ice (agents, the UDP mux, netcheck, why)
//!                            └──▶ dataplane (peers, TUN ⇄ WireGuard ⇄ paths)
//!   local_api ──queries──▶ shell; snapshots ◀── dataplane
//! ```
//!
//! [`control`] talks to the coordination server, [`node`] is the sans-IO core
//! that decides about peers, [`shell`] runs it, [`ice`] owns the ICE agents and
//! the shared socket, [`dataplane`] moves packets, [`local_api`] answers
//! `overlayctl`; [`daemon`] wires them together.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod dns;
pub mod host_dns;
pub mod ice;
pub mod identity;
pub mod local_api;
pub mod metrics;
pub mod node;
pub mod seal;
pub mod shell;
pub mod supervise;

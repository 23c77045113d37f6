//! The network-namespace lab that overlay's end-to-end tests run in.
//!
//! A [`Lab`] owns a set of network namespaces named `ovlXXXX-*` (a random prefix per
//! run): hosts, the "switch" namespaces that hold the bridge of each LAN segment,
//! and NAT routers. Every interface, bridge and nftables table lives inside those
//! namespaces, so the root namespace's links and routes are never touched and
//! deleting the namespaces removes everything. Traffic only ever flows between lab
//! namespaces.
//!
//! ```text
//!   ovl1a2b-coord     ovl1a2b-a      ovl1a2b-b
//!       eth0            eth0           eth0
//!        │               │              │
//!   ─────┴───────── br0 in ovl1a2b-sw0 ─┴──────   10.77.1.0/24
//! ```
//!
//! The real binaries (`overlay-coord`, `overlayd`, `overlayctl`) run inside the
//! namespaces as [`Proc`]s whose output goes to log files in the lab's directory;
//! when a test fails, the tail of every log is printed.

pub mod bins;
pub mod cert;
pub mod coturn;
pub mod dnsmasq;
pub mod lab;
mod lab6;
pub mod mesh;
pub mod nats;
pub mod overlay;
pub mod pcap;
pub mod postgres;
pub mod process;
pub mod wait;

pub use bins::bin;
pub use coturn::Coturn;
pub use lab::{lab_test, Host, Iface, Lab, NatKind, Segment, Site, Subnet};
pub use mesh::{ping_lossless, Node};
pub use overlay::{wait_path, Coordinator, Daemon, LanPair};
pub use process::Proc;
pub use wait::{fatal, wait_until, Wait};

//! `overlayd`'s command line, in the library so that the man page and shell
//! completions are generated from the same definition the binary parses.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// overlayd: a node of the overlay mesh VPN.
#[derive(Parser)]
#[command(name = "overlayd", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create the interface, enrol (first start) and join the mesh; runs until stopped.
    Up(UpArgs),
}

#[derive(clap::Args)]
pub struct UpArgs {
    /// Configuration file [default: /etc/overlay/overlayd.toml, if present]
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Coordination server URL, e.g. https://coord.example.com; for replicas,
    /// several separated by commas (the node fails over between them)
    #[arg(long, value_name = "URL[,URL...]")]
    pub coordinator: Option<String>,
    /// Auth key from 'overlay-coord keys create' (first start only)
    #[arg(long, conflicts_with = "auth_key_file")]
    pub auth_key: Option<String>,
    /// File holding the auth key
    #[arg(long)]
    pub auth_key_file: Option<PathBuf>,
    /// Name of this node in the mesh [default: the system hostname]
    #[arg(long)]
    pub hostname: Option<String>,
    /// Where the key and enrolment are kept [default: /var/lib/overlay]
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// TUN interface name [default: overlay0]
    #[arg(long)]
    pub interface: Option<String>,
    /// Local API socket for overlayctl [default: /run/overlay/overlayd.sock]
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// MTU of the interface [default: 1280]
    #[arg(long)]
    pub mtu: Option<u16>,
    /// Extra CA certificate (PEM) to trust for an https coordinator
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP on this address, e.g. 127.0.0.1:9470
    /// (GET /metrics; no authentication, so bind it to a trusted interface) [default: off]
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// How the host learns of the mesh resolver: auto (split DNS through
    /// systemd-resolved when it runs, else nothing), resolv-conf (manage
    /// /etc/resolv.conf, restored on exit) or off [default: auto]
    #[arg(long, value_name = "MODE")]
    pub dns: Option<crate::config::DnsMode>,
    /// Seconds without data packets before a peer turns idle: its ICE session
    /// and keepalives stop until the next packet; 0 turns this off [default: 300]
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

//! `overlayctl`'s command line, in the library so that the man page and shell
//! completions are generated from the same definition the binary parses.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use overlay_proto::api::{DEFAULT_SOCKET, SOCKET_ENV};

#[derive(Debug, Parser)]
#[command(
    name = "overlayctl",
    version,
    about = "Control the local overlay daemon"
)]
pub struct Cli {
    /// The daemon's socket [default: $OVERLAY_SOCKET, else /run/overlay/overlayd.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// This node: name, mesh address, coordinator connection, uptime.
    Status,
    /// Every peer and how packets reach it.
    Peers,
    /// Ping a peer through the mesh.
    Ping(PingArgs),
    /// Measure this node's network: UDP, public address, NAT mapping, TURN, coordinator latency.
    Netcheck,
    /// Explain the path to a peer: candidates, pairs tried, both NATs, and a conclusion.
    Why {
        /// A peer's name or mesh IP.
        peer: String,
    },
    /// The access rules this node enforces, and what they let through with
    /// each peer (set on the coordinator with `overlay-coord policy set`).
    Policy,
    /// The mesh's names: ask this node's mesh resolver directly.
    Dns {
        #[command(subcommand)]
        command: DnsCommand,
    },
    /// Print the daemon's metrics in the Prometheus text format (what
    /// `overlayd up --metrics-listen` serves).
    Metrics,
    /// Ask the daemon to stop.
    Down,
}

#[derive(Debug, Subcommand)]
pub enum DnsCommand {
    /// Resolve NAME (or an IPv4 address, by PTR) as the mesh resolver does.
    Query {
        /// A name (`db1.overlay.internal`) or a mesh IPv4 address.
        name: String,
        /// Record type: A, AAAA, PTR, SOA, ... [default: A, or PTR for an address]
        #[arg(value_name = "TYPE")]
        kind: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct PingArgs {
    /// A peer's name or mesh IP.
    pub target: String,
    /// Number of echo requests.
    #[arg(short = 'c', long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=65535))]
    pub count: u32,
    /// Seconds between requests.
    #[arg(short = 'i', long, default_value_t = 1.0, value_parser = parse_secs)]
    pub interval: f64,
    /// Seconds to wait for each reply.
    #[arg(short = 'W', long, default_value_t = 2.0, value_parser = parse_secs)]
    pub timeout: f64,
}

/// A positive, finite number of seconds, at least a millisecond.
fn parse_secs(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !secs.is_finite() || !(0.001..=86_400.0).contains(&secs) {
        return Err(format!("'{text}' must be between 0.001 and 86400 seconds"));
    }
    Ok(secs)
}

impl Cli {
    pub fn socket_path(&self) -> PathBuf {
        resolve_socket(self.socket.clone(), std::env::var_os(SOCKET_ENV))
    }
}

/// `--socket`, else the environment, else the default.
pub fn resolve_socket(flag: Option<PathBuf>, env: Option<std::ffi::OsString>) -> PathBuf {
    flag.or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("overlayctl").chain(args.iter().copied()))
    }

    #[test]
    fn ping_defaults_match_ping8() {
        let cli = parse(&["ping", "bob"]).expect("parses");
        let Command::Ping(args) = cli.command else {
            panic!("not a ping: {:?}", cli.command)
        };
        assert_eq!(args.target, "bob");
        assert_eq!(args.count, 4);
        assert_eq!(args.interval, 1.0);
        assert_eq!(args.timeout, 2.0);
    }

    #[test]
    fn ping_takes_short_flags_and_global_options_after_the_command() {
        let cli = parse(&[
            "ping",
            "100.64.0.2",
            "-c",
            "20",
            "-i",
            "0.2",
            "-W",
            "3",
            "--json",
            "--socket",
            "/tmp/s",
        ])
        .expect("parses");
        assert!(cli.json);
        assert_eq!(cli.socket.as_deref(), Some(std::path::Path::new("/tmp/s")));
        let Command::Ping(args) = cli.command else {
            panic!("not a ping")
        };
        assert_eq!((args.count, args.interval, args.timeout), (20, 0.2, 3.0));
    }

    #[test]
    fn ping_rejects_nonsense_numbers() {
        assert!(parse(&["ping", "bob", "-c", "0"]).is_err());
        assert!(parse(&["ping", "bob", "-i", "-1"]).is_err());
        assert!(parse(&["ping", "bob", "-i", "NaN"]).is_err());
        assert!(parse(&["ping", "bob", "-W", "abc"]).is_err());
        assert!(parse(&["ping"]).is_err());
    }

    #[test]
    fn socket_flag_beats_environment_beats_default() {
        let flag = Some(PathBuf::from("/flag.sock"));
        let env = Some(std::ffi::OsString::from("/env.sock"));
        assert_eq!(
            resolve_socket(flag, env.clone()),
            PathBuf::from("/flag.sock")
        );
        assert_eq!(resolve_socket(None, env), PathBuf::from("/env.sock"));
        assert_eq!(
            resolve_socket(None, Some("".into())),
            PathBuf::from(DEFAULT_SOCKET)
        );
        assert_eq!(resolve_socket(None, None), PathBuf::from(DEFAULT_SOCKET));
    }

    #[test]
    fn every_command_parses() {
        for cmd in ["status", "peers", "down"] {
            assert!(parse(&[cmd]).is_ok(), "{cmd}");
            assert!(parse(&["--json", cmd]).is_ok(), "--json {cmd}");
        }
        assert!(parse(&["bogus"]).is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}

//! `overlayctl`: the user's commands against the local `overlayd`.
//!
//! Every command is one request over the daemon's Unix socket; the answer is shown
//! as a human table or, with `--json`, as machine-readable JSON.

mod client;
mod explain;
mod format;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use overlay_proto::api::{Request, Response, DEFAULT_SOCKET, SOCKET_ENV};

/// How long a one-shot request (status, peers, down) may wait for the daemon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Netcheck waits for STUN and TURN probes, a few seconds each at worst.
const NETCHECK_TIMEOUT: Duration = Duration::from_secs(40);
/// Slack on top of a ping's own interval and timeout before we give up on the daemon.
const PING_SLACK: Duration = Duration::from_secs(5);

#[derive(Debug, Parser)]
#[command(
    name = "overlayctl",
    version,
    about = "Control the local overlay daemon"
)]
struct Cli {
    /// The daemon's socket [default: $OVERLAY_SOCKET, else /run/overlay/overlayd.sock].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    /// Ask the daemon to stop.
    Down,
}

#[derive(Debug, clap::Args)]
struct PingArgs {
    /// A peer's name or mesh IP.
    target: String,
    /// Number of echo requests.
    #[arg(short = 'c', long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=65535))]
    count: u32,
    /// Seconds between requests.
    #[arg(short = 'i', long, default_value_t = 1.0, value_parser = parse_secs)]
    interval: f64,
    /// Seconds to wait for each reply.
    #[arg(short = 'W', long, default_value_t = 2.0, value_parser = parse_secs)]
    timeout: f64,
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
    fn socket_path(&self) -> PathBuf {
        resolve_socket(self.socket.clone(), std::env::var_os(SOCKET_ENV))
    }
}

/// `--socket`, else the environment, else the default.
fn resolve_socket(flag: Option<PathBuf>, env: Option<std::ffi::OsString>) -> PathBuf {
    flag.or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// What a command ends with, beyond success.
enum Failure {
    /// Print `overlayctl: <message>` and exit 1.
    Message(String),
    /// Already reported (e.g. a ping without replies); just exit 1.
    Silent,
}

impl From<client::ClientError> for Failure {
    fn from(err: client::ClientError) -> Self {
        Failure::Message(err.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    match run(&cli, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Silent) => ExitCode::from(1),
        Err(Failure::Message(message)) => {
            let _ = out.flush();
            // The daemon's error texts can carry peer-supplied strings.
            eprintln!("overlayctl: {}", format::clean(&message));
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli, out: &mut dyn Write) -> Result<(), Failure> {
    let socket = cli.socket_path();
    match &cli.command {
        Command::Status => match single(&socket, &Request::Status)? {
            Response::Status(status) if cli.json => emit(out, &json(&status)),
            Response::Status(status) => emit(out, format::status(&status).trim_end()),
            other => Err(unexpected(&other)),
        },
        Command::Peers => match single(&socket, &Request::Peers)? {
            Response::Peers { peers } if cli.json => emit(out, &json(&peers)),
            Response::Peers { peers } => emit(out, format::peers_table(&peers).trim_end()),
            other => Err(unexpected(&other)),
        },
        Command::Down => match single(&socket, &Request::Down)? {
            Response::Ok if cli.json => emit(out, r#"{"ok":true}"#),
            Response::Ok => emit(out, "overlayd is stopping"),
            other => Err(unexpected(&other)),
        },
        Command::Ping(args) => ping(&socket, args, cli.json, out),
        Command::Netcheck => match single_within(&socket, &Request::Netcheck, NETCHECK_TIMEOUT)? {
            Response::Netcheck(report) if cli.json => emit(out, &json(&report)),
            Response::Netcheck(report) => emit(out, explain::netcheck(&report).trim_end()),
            other => Err(unexpected(&other)),
        },
        Command::Why { peer } => {
            let request = Request::Why { peer: peer.clone() };
            match single(&socket, &request)? {
                Response::Why(report) if cli.json => emit(out, &json(&report)),
                Response::Why(report) => emit(out, explain::why(&report).trim_end()),
                other => Err(unexpected(&other)),
            }
        }
    }
}

/// Sends a request whose answer is exactly one response.
fn single(socket: &std::path::Path, request: &Request) -> Result<Response, Failure> {
    single_within(socket, request, REQUEST_TIMEOUT)
}

fn single_within(
    socket: &std::path::Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, Failure> {
    let mut exchange = client::send(socket, request, timeout)?;
    match exchange.next_response()? {
        Some(Response::Error { message }) => Err(Failure::Message(message)),
        Some(response) => Ok(response),
        None => Err(Failure::Message(
            "overlayd closed the connection without answering".to_string(),
        )),
    }
}

fn ping(
    socket: &std::path::Path,
    args: &PingArgs,
    as_json: bool,
    out: &mut dyn Write,
) -> Result<(), Failure> {
    let interval = Duration::from_secs_f64(args.interval);
    let timeout = Duration::from_secs_f64(args.timeout);
    let request = Request::Ping {
        target: args.target.clone(),
        count: args.count,
        interval_ms: interval.as_millis() as u64,
        timeout_ms: timeout.as_millis() as u64,
    };
    // Replies stream in; the longest legitimate silence is one interval plus one
    // reply timeout (a lost request followed by the next one).
    let mut exchange = client::send(socket, &request, interval + timeout + PING_SLACK)?;
    let mut rtts = Vec::new();
    while let Some(response) = exchange.next_response()? {
        match response {
            Response::PingReply(reply) => {
                rtts.push(reply.rtt_ms);
                let line = if as_json {
                    json(&Response::PingReply(reply))
                } else {
                    format::ping_reply(&reply)
                };
                emit(out, &line)?;
            }
            Response::PingDone(summary) => {
                if as_json {
                    emit(out, &json(&Response::PingDone(summary.clone())))?;
                } else {
                    emit(out, format::ping_summary(&summary, &rtts).trim_end())?;
                }
                return if summary.received == 0 {
                    Err(Failure::Silent)
                } else {
                    Ok(())
                };
            }
            Response::Error { message } => return Err(Failure::Message(message)),
            other => return Err(unexpected(&other)),
        }
    }
    Err(Failure::Message(
        "overlayd closed the connection before the ping finished".to_string(),
    ))
}

fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    // Serializing our own plain data types cannot fail; fall back to an empty
    // object rather than panic should that ever change.
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_string())
}

fn emit(out: &mut dyn Write, text: &str) -> Result<(), Failure> {
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .or_else(|e| {
            // A closed pipe (`overlayctl peers | head`) is the reader's choice, not an error.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                Ok(())
            } else {
                Err(Failure::Message(format!("writing output: {e}")))
            }
        })
}

fn unexpected(response: &Response) -> Failure {
    Failure::Message(format!(
        "overlayd sent an unexpected answer: {}",
        json(response)
    ))
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

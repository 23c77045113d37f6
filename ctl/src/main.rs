//! `overlayctl`: the user's commands against the local `overlayd`.
//!
//! Every command is one request over the daemon's Unix socket; the answer is shown
//! as a human table or, with `--json`, as machine-readable JSON.

mod client;
mod explain;
mod format;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use overlay_proto::api::{Request, Response};
use overlayctl::cli::{Cli, Command, DnsCommand, PingArgs};

/// How long a one-shot request (status, peers, down) may wait for the daemon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Netcheck waits for STUN and TURN probes, a few seconds each at worst.
const NETCHECK_TIMEOUT: Duration = Duration::from_secs(40);
/// Slack on top of a ping's own interval and timeout before we give up on the daemon.
const PING_SLACK: Duration = Duration::from_secs(5);

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
        Command::Metrics => match single(&socket, &Request::Metrics)? {
            Response::Metrics { text } if cli.json => emit(out, &json(&text)),
            Response::Metrics { text } => emit(out, text.trim_end()),
            other => Err(unexpected(&other)),
        },
        Command::Policy => match single(&socket, &Request::Policy)? {
            Response::Policy(report) if cli.json => emit(out, &json(&report)),
            Response::Policy(report) => emit(out, explain::policy(&report).trim_end()),
            other => Err(unexpected(&other)),
        },
        Command::Dns {
            command: DnsCommand::Query { name, kind },
        } => {
            let request = Request::DnsQuery {
                name: name.clone(),
                kind: kind.clone(),
            };
            match single(&socket, &request)? {
                Response::DnsAnswer { rcode, answers } if cli.json => emit(
                    out,
                    &json(&serde_json::json!({ "rcode": rcode, "answers": answers })),
                ),
                Response::DnsAnswer { rcode, answers } => {
                    emit(out, format::dns_answer(&rcode, &answers).trim_end())
                }
                other => Err(unexpected(&other)),
            }
        }
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

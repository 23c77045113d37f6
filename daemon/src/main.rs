use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use overlayd::cli::{Cli, Command};
use overlayd::config::{Config, FileConfig, Overrides};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Command::Up(args) = cli.command;
    let config = FileConfig::load(args.config.as_deref()).and_then(|file| {
        Config::resolve(
            file,
            Overrides {
                coordinator: args.coordinator,
                auth_key: args.auth_key,
                auth_key_file: args.auth_key_file,
                hostname: args.hostname,
                state_dir: args.state_dir,
                interface: args.interface,
                socket: args.socket,
                mtu: args.mtu,
                ca_cert: args.ca_cert,
                metrics_listen: args.metrics_listen,
                dns: args.dns,
                idle_timeout: args.idle_timeout,
            },
        )
    });
    let config = match config {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    init_logging(config.log.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    match runtime.block_on(overlayd::daemon::up(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&one_line(&e)),
    }
}

fn init_logging(config_filter: Option<&str>) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| config_filter.map(str::to_owned))
        .unwrap_or_else(|| {
            "info,webrtc_ice=error,webrtc_mdns=error,turn=error,webrtc_util=error".to_owned()
        });
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // journald and log files get plain text; colour only for a person at a terminal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The error and its causes on one line, skipping a cause whose text the line
/// already carries (library errors often include their source in their message).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("overlayd: error: {e}");
    ExitCode::FAILURE
}

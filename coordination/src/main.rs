//! `overlay-coord`: the coordination server and its admin commands.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use tracing_subscriber::EnvFilter;

use overlay_coord::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::parse().with_global_flags_after_tags() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("overlay-coord: error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = match &cli.command {
        Command::Serve(args) => serve(&cli, args),
        Command::Cert { command } => cli::cert(command),
        _ => cli::admin(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("overlay-coord: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cli: &Cli, args: &cli::ServeArgs) -> Result<()> {
    let config = cli::serve_config(cli, args)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let signal = shutdown_signal().context("installing signal handlers")?;
        overlay_coord::run(config, signal).await?;
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

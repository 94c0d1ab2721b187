//! `blixard-agent`: parses the command line, sets up logging and the
//! runtime, and dispatches. Everything else lives in the library
//! (`blixard::cli` for the client commands, `blixard::daemon` for `run`).

use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use blixard::cli::{self, Command, args::RunArgs};
use blixard::config::Config;

fn main() -> ExitCode {
    let cli = match cli::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(exit) => return exit.report(),
    };
    match cli.command {
        Command::Run(args) => run(&args),
        command => cli::execute(command),
    }
}

/// `run`: a configuration error is bad usage (exit 2); the daemon failing
/// once started is an operation failure (exit 1).
fn run(args: &RunArgs) -> ExitCode {
    let config = match cli::run_config(args) {
        Ok(config) => config,
        Err(e) => return cli::CliError::usage(e.to_string()).report(),
    };
    match daemon(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::CliError::failed(format!("{e:#}")).report(),
    }
}

fn daemon(config: Config) -> anyhow::Result<()> {
    // Logs go to stderr, where journald picks them up. RUST_LOG, when set,
    // overrides `log_level` (as the NixOS module documents).
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => tracing_subscriber::EnvFilter::try_new(&env).context("RUST_LOG")?,
        _ => tracing_subscriber::EnvFilter::try_new(&config.log_level).context("log_level")?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        blixard::daemon::run(config, shutdown).await
    })
}

/// Resolves on SIGTERM (systemd stopping the unit) or SIGINT (Ctrl-C). The
/// handlers are installed before the daemon starts, so a signal that
/// arrives during start-up is not lost.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        }
    })
}

//! `blixard-agent`: parses the command line, sets up logging and the
//! runtime, and dispatches. Everything else lives in the library
//! (`blixard::cli` for the client commands, `blixard::daemon` for `run`).

use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use blixard::api::tls::AgentAuth;
use blixard::cli::{self, Command, args::GuardArgs, args::RunArgs};
use blixard::config::Config;

fn main() -> ExitCode {
    // The process runtime's trampoline between the agent and a child: it
    // must not parse a command line or set anything up.
    if let Some(exit) = blixard::runtime::process::exec_child_if_asked() {
        return exit;
    }
    // A shell asking for completions (the script `completions SHELL`
    // prints sets COMPLETE): answer and exit.
    if cli::docs::answer_completion_request() {
        return ExitCode::SUCCESS;
    }
    let cli = match cli::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(exit) => return exit.report(),
    };
    match cli.command {
        Command::Run(args) => run(&args),
        Command::Guard(args) => guard(&args),
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
    // Credentials are configuration too: a bad or missing one is bad usage.
    let auth = match AgentAuth::load(&config) {
        Ok(auth) => auth,
        Err(e) => return cli::CliError::usage(e.to_string()).report(),
    };
    match daemon(config, auth) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::CliError::failed(format!("{e:#}")).report(),
    }
}

/// `guard`: the fence guard, or (`--fence-if-stale`) its one-shot stop-post.
/// Logs at info (`RUST_LOG` overrides); a failure is exit 1, and systemd
/// restarts the guard.
fn guard(args: &GuardArgs) -> ExitCode {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|env| tracing_subscriber::EnvFilter::try_new(env).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    init_logging(filter, "blixard-guard");
    let config = args.config();
    // One thread: the guard does little, and must not need much to do it.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return cli::CliError::failed(format!("starting the tokio runtime: {e}")).report(),
    };
    let result = runtime.block_on(async {
        if args.fence_if_stale {
            blixard::guard::fence_if_stale(config).await
        } else {
            blixard::guard::run(config, shutdown_signal()?).await
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => cli::CliError::failed(format!("{e:#}")).report(),
    }
}

fn daemon(config: Config, auth: AgentAuth) -> anyhow::Result<()> {
    // RUST_LOG, when set, overrides `log_level` (as the NixOS module documents).
    let filter = match std::env::var("RUST_LOG") {
        Ok(env) if !env.is_empty() => tracing_subscriber::EnvFilter::try_new(&env).context("RUST_LOG")?,
        _ => tracing_subscriber::EnvFilter::try_new(&config.log_level).context("log_level")?,
    };
    init_logging(filter, "blixard-agent");
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        blixard::daemon::run(config, auth, shutdown).await
    })
}

/// Logs go to the journal, with structured fields (`journalctl -o verbose`
/// shows `VM=`, `REASON=`...), when stderr is connected to it (systemd sets
/// `JOURNAL_STREAM` to stderr's device and inode); otherwise to stderr.
fn init_logging(filter: tracing_subscriber::EnvFilter, identifier: &str) {
    use tracing_subscriber::prelude::*;
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(journald) => {
                registry.with(journald.with_syslog_identifier(identifier.into())).init();
                return;
            }
            Err(e) => eprintln!("cannot log to the journal ({e}); logging to stderr"),
        }
    }
    let stderr =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    registry.with(stderr).init();
}

/// Whether `JOURNAL_STREAM` (`DEVICE:INODE`) names our stderr, as
/// systemd.exec(5) says to check (a child that inherited the variable but
/// not the stream must not log to the journal).
fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.split_once(':') else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    nix::sys::stat::fstat(std::io::stderr()).is_ok_and(|st| st.st_dev == dev && st.st_ino == ino)
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

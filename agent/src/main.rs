//! Minimal launcher, replaced by the CLI branch: `blixard-agent run --config
//! FILE` only, so that the daemon branch's integration tests can start real
//! agent processes before the CLI lands.

use std::path::PathBuf;
use std::process::ExitCode;

use blixard::config::{Config, FileConfig, Overrides};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = match args.as_slice() {
        [run, flag, path] if run == "run" && flag == "--config" => PathBuf::from(path),
        _ => {
            eprintln!("usage: blixard-agent run --config FILE");
            return ExitCode::from(2);
        }
    };
    let config = match FileConfig::load(&path).and_then(|file| Config::resolve(file, Overrides::default())) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        blixard::daemon::run(config, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

//! Shell completion, computed by the binary itself: the script that
//! `completions bash|zsh|fish` prints calls `COMPLETE=<shell> blixard-agent
//! -- <words>` on every TAB, and clap_complete's engine answers from the
//! command tree (so every level completes, whatever the binary's name),
//! with VM and node names asked of the local agent where it answers.
//!
//! Names come from the agent the client commands would talk to by default
//! (`$BLIXARD_ENDPOINT`, else the local agent's config, else
//! 127.0.0.1:7000), within [`ASK_TIMEOUT`]; when it does not answer, TAB
//! offers no names rather than hanging the shell.

use std::ffi::OsStr;
use std::time::Duration;

use clap::{Args, FromArgMatches};
use clap_complete::engine::{ArgValueCompleter, CompletionCandidate};

use super::args::ClientArgs;
use crate::api::client::Client;
use crate::api::pb;

/// How long TAB waits for the local agent.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);
/// Names offered at most.
const CANDIDATES_MAX: u32 = 200;

/// Completes a VM name.
pub fn vms() -> ArgValueCompleter {
    ArgValueCompleter::new(complete_vms)
}

/// Completes a node name.
pub fn nodes() -> ArgValueCompleter {
    ArgValueCompleter::new(complete_nodes)
}

fn complete_vms(current: &OsStr) -> Vec<CompletionCandidate> {
    let Some(prefix) = current.to_str().and_then(|p| super::args::parse_prefix(p).ok()) else {
        return Vec::new();
    };
    let request = pb::VmListRequest { name_prefix: prefix, page_size: CANDIDATES_MAX, ..Default::default() };
    let vms = ask(|client| async move { client.vm_list(request).await.map(|r| r.vms) }).unwrap_or_default();
    vms.into_iter()
        .map(|vm| {
            let place = if vm.node.is_empty() { String::new() } else { format!(" on {}", vm.node) };
            CompletionCandidate::new(vm.name).help(Some(format!("{}{place}", vm.state).into()))
        })
        .collect()
}

fn complete_nodes(current: &OsStr) -> Vec<CompletionCandidate> {
    let Some(prefix) = current.to_str() else { return Vec::new() };
    let nodes = ask(|client| async move { client.node_list().await.map(|r| r.nodes) }).unwrap_or_default();
    nodes
        .into_iter()
        .filter(|n| n.name.starts_with(prefix))
        .map(|n| CompletionCandidate::new(n.name).help(Some(n.status.into())))
        .collect()
}

/// Runs `f` against the default agent; `None` on any failure.
fn ask<T, F, Fut>(f: F) -> Option<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::api::client::ClientError>>,
{
    // The connection options of a client command given no flags (the
    // environment still applies), so completion reaches the same agent.
    let command = ClientArgs::augment_args(clap::Command::new("complete"));
    let matches = command.try_get_matches_from(["complete"]).ok()?;
    let args = ClientArgs::from_arg_matches(&matches).ok()?;
    let mut options = super::target::resolve(&args, std::path::Path::new(crate::config::DEFAULT_CONFIG_PATH)).ok()?;
    options.timeout = ASK_TIMEOUT;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    runtime.block_on(async move {
        let call = async move {
            let client = Client::connect(options).await.ok()?;
            f(client).await.ok()
        };
        tokio::time::timeout(ASK_TIMEOUT * 2, call).await.ok().flatten()
    })
}

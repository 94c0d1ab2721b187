//! `--wait` for long operations (`node drain`, `vm migrate`, and `vm create`,
//! `start`, `stop`, `delete`, `update`): after the
//! request is accepted, follow the cluster state until the operation is
//! done, telling the user on stderr what is moving and how far it is.
//!
//! The CLI polls `vm list` / `vm status` (linearizable reads served by any
//! member) every [`POLL_INTERVAL`]; a line of progress is printed only when
//! something changed, so the output reads as a log of the operation in a
//! terminal and in a CI job alike.

use std::collections::BTreeSet;
use std::io::Write;
use std::time::{Duration, Instant};

use crate::api::client::{Client, ClientError, ErrorClass};
use crate::api::pb;

use super::error::one_line;

/// How often the cluster state is read while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Progress lines to stderr (unless `--json` asked for a quiet stderr).
pub struct Progress {
    enabled: bool,
    last: std::cell::RefCell<String>,
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        Progress { enabled, last: std::cell::RefCell::new(String::new()) }
    }

    /// Prints `line` unless it repeats the previous one.
    pub fn say(&self, line: &str) {
        let mut last = self.last.borrow_mut();
        if !self.enabled || *last == line {
            return;
        }
        *last = line.to_string();
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

fn timed_out(what: String, limit: Duration) -> ClientError {
    ClientError {
        class: ErrorClass::Failed,
        message: format!("gave up after {} s (--wait-timeout): {what}", limit.as_secs()),
    }
}

/// A read that failed for a passing reason (a leader election, a loaded
/// agent) is tried again while there is time; a rejection is final.
fn retry(e: &ClientError, deadline: Instant) -> bool {
    e.class == ErrorClass::Failed && Instant::now() < deadline
}

fn where_is(vm: &pb::VmInfo) -> String {
    let node = if vm.node.is_empty() { "no host".to_string() } else { one_line(&vm.node) };
    format!("{} {} on {node}", one_line(&vm.name), one_line(&vm.state))
}

/// Whether `vm` has settled: running when desired running; when desired
/// stopped, stopped (or on no host, where nothing runs it).
pub fn settled(vm: &pb::VmInfo) -> bool {
    match vm.desired.as_str() {
        "running" => vm.state == "running",
        _ => vm.state == "stopped" || (vm.node.is_empty() && vm.state == "pending"),
    }
}

/// [`status_of`] of a VM that must exist.
async fn status_of_existing(client: &Client, vm: &str, deadline: Instant) -> Result<pb::VmInfo, ClientError> {
    status_of(client, vm, deadline)
        .await?
        .ok_or_else(|| ClientError { class: ErrorClass::Rejected, message: format!("no VM named {vm:?}") })
}

/// A read of `vm`'s status while waiting: `Ok(None)` when it does not
/// exist (any more); a passing failure is retried while there is time.
async fn status_of(client: &Client, vm: &str, deadline: Instant) -> Result<Option<pb::VmInfo>, ClientError> {
    loop {
        match client.vm_status(vm.to_string()).await {
            Ok(info) => return Ok(Some(info)),
            Err(e) if e.class == ErrorClass::Rejected && e.message.starts_with("no VM named") => return Ok(None),
            Err(e) if retry(&e, deadline) => tokio::time::sleep(POLL_INTERVAL).await,
            Err(e) => return Err(e),
        }
    }
}

/// How many VMs moved off `node` still have a copy there not known stopped
/// (`NodeInfo.stopping`); a passing failure is retried while there is time.
async fn stopping_on(client: &Client, node: &str, deadline: Instant) -> Result<u32, ClientError> {
    loop {
        match client.node_list().await {
            Ok(list) => return Ok(list.nodes.iter().find(|n| n.name == node).map_or(0, |n| n.stopping)),
            Err(e) if retry(&e, deadline) => tokio::time::sleep(POLL_INTERVAL).await,
            Err(e) => return Err(e),
        }
    }
}

/// The names of the VMs placed on `node`, taken before it is drained: the
/// leader may move one before [`drain`] first looks, and the wait must
/// still wait for it to settle elsewhere.
pub async fn vms_on(client: &Client, node: &str) -> Result<BTreeSet<String>, ClientError> {
    let on_node = pb::VmListRequest { node: node.to_string(), ..Default::default() };
    Ok(client.vm_list_all(on_node).await?.into_iter().map(|v| v.name).collect())
}

/// Waits until no VM is placed on `node` and the VMs that were there
/// (`before`, from [`vms_on`], and any seen since) have settled on their
/// new hosts.
pub async fn drain(
    client: &Client,
    node: &str,
    before: BTreeSet<String>,
    limit: Duration,
    progress: &Progress,
) -> Result<(), ClientError> {
    let deadline = Instant::now() + limit;
    let on_node = pb::VmListRequest { node: node.to_string(), ..Default::default() };
    // Every VM seen on the node, and those of them settled elsewhere (or gone).
    let (mut moving, mut done): (BTreeSet<String>, BTreeSet<String>) = (before, BTreeSet::new());
    loop {
        let left = match client.vm_list_all(on_node.clone()).await {
            Ok(vms) => vms,
            Err(e) if retry(&e, deadline) => {
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        moving.extend(left.iter().map(|v| v.name.clone()));
        let mut unsettled: Vec<String> = left.iter().map(where_is).collect();
        let away: Vec<String> =
            moving.iter().filter(|n| !done.contains(*n) && !left.iter().any(|v| &v.name == *n)).cloned().collect();
        for name in away {
            match status_of(client, &name, deadline).await? {
                None => {
                    done.insert(name);
                }
                Some(vm) if vm.node != node && !vm.node.is_empty() && settled(&vm) => {
                    done.insert(name);
                }
                Some(vm) => unsettled.push(where_is(&vm)),
            }
        }
        let mut line = format!("draining {}: {}/{} VMs moved", one_line(node), done.len(), moving.len());
        if !unsettled.is_empty() {
            line.push_str(&format!("; waiting for {}", unsettled.join(", ")));
        }
        progress.say(&line);
        if left.is_empty() && done.len() == moving.len() {
            break;
        }
        if Instant::now() >= deadline {
            return Err(timed_out(format!("{} is still draining: {}", one_line(node), unsettled.join(", ")), limit));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    // A VM that moved off a host that is down runs elsewhere before the
    // leader judges the host fenced: until then its old copy counts as
    // stopping, and the host may not leave.
    loop {
        let stopping = stopping_on(client, node, deadline).await?;
        if stopping == 0 {
            progress.say(&format!("{} is drained", one_line(node)));
            return Ok(());
        }
        let what = format!(
            "{} has not yet confirmed that it stopped its copies of {stopping} VM(s) that run elsewhere now",
            one_line(node)
        );
        if Instant::now() >= deadline {
            return Err(timed_out(what, limit));
        }
        progress.say(&format!("draining {}: {what}", one_line(node)));
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Waits until `vm` has settled ([`settled`]). A VM that fails on its host
/// ends the wait with the host's error.
pub async fn settle(
    client: &Client,
    vm: &str,
    limit: Duration,
    progress: &Progress,
) -> Result<pb::VmInfo, ClientError> {
    let deadline = Instant::now() + limit;
    loop {
        let info = status_of_existing(client, vm, deadline).await?;
        let now = super::output::where_is(&info);
        let mut line = format!("{}: desired {}, {now}", one_line(vm), one_line(&info.desired));
        if !info.pending_reason.is_empty() {
            line.push_str(&format!(" ({})", one_line(&info.pending_reason)));
        }
        progress.say(&line);
        if settled(&info) {
            return Ok(info);
        }
        if info.state == "failed" && info.desired == "running" {
            let why =
                if info.last_error.is_empty() { "no error reported".to_string() } else { one_line(&info.last_error) };
            return Err(ClientError {
                class: ErrorClass::Failed,
                message: format!(
                    "VM {vm} failed on {}: {why}",
                    if info.node.is_empty() { "its host" } else { &info.node }
                ),
            });
        }
        if Instant::now() >= deadline {
            return Err(timed_out(format!("{vm} is not yet {}: it is {now}", info.desired), limit));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Waits until `vm` is placed on `to` and has settled there (running, or
/// stopped when desired stopped).
pub async fn migrate(
    client: &Client,
    vm: &str,
    to: &str,
    limit: Duration,
    progress: &Progress,
) -> Result<pb::VmInfo, ClientError> {
    let deadline = Instant::now() + limit;
    loop {
        let info = status_of_existing(client, vm, deadline).await?;
        progress.say(&format!("moving {} to {}: {}", one_line(vm), one_line(to), where_is(&info)));
        if info.node == to && settled(&info) {
            return Ok(info);
        }
        if Instant::now() >= deadline {
            return Err(timed_out(format!("{} is not yet {} on {to}: {}", vm, info.desired, where_is(&info)), limit));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

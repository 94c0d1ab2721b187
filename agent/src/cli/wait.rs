//! `--wait` for long operations (`node drain`, `vm migrate`): after the
//! request is accepted, follow the cluster state until the operation is
//! done, telling the user on stderr what is moving and how far it is.
//!
//! The CLI polls `vm list` / `vm status` (linearizable reads served by any
//! member) every [`POLL_INTERVAL`]; a line of progress is printed only when
//! something changed, so the output reads as a log of the operation in a
//! terminal and in a CI job alike.

use std::collections::BTreeMap;
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

/// Whether `vm`, moved off the drained node, has settled where it went.
fn settled(vm: &pb::VmInfo) -> bool {
    match vm.desired.as_str() {
        "running" => vm.state == "running",
        _ => vm.state == "stopped" || vm.state == "pending",
    }
}

/// Waits until no VM is placed on `node` and the VMs that were there have
/// settled on their new hosts.
pub async fn drain(client: &Client, node: &str, limit: Duration, progress: &Progress) -> Result<(), ClientError> {
    let deadline = Instant::now() + limit;
    let mut moving: BTreeMap<String, ()> = BTreeMap::new();
    loop {
        let vms = match client.vm_list().await {
            Ok(list) => list.vms,
            Err(e) if retry(&e, deadline) => {
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let left: Vec<&pb::VmInfo> = vms.iter().filter(|v| v.node == node).collect();
        for vm in &left {
            moving.insert(vm.name.clone(), ());
        }
        let moved: Vec<&pb::VmInfo> =
            vms.iter().filter(|v| moving.contains_key(&v.name) && v.node != node && !v.node.is_empty()).collect();
        let settled_count = moved.iter().filter(|v| settled(v)).count();
        // VMs deleted meanwhile count as done.
        let gone = moving.keys().filter(|name| !vms.iter().any(|v| &v.name == *name)).count();
        let total = moving.len();
        let done = settled_count + gone;
        let mut line = format!("draining {}: {done}/{total} VMs moved", one_line(node));
        let unsettled: Vec<String> =
            left.iter().copied().chain(moved.iter().copied().filter(|v| !settled(v))).map(where_is).collect();
        if !unsettled.is_empty() {
            line.push_str(&format!("; waiting for {}", unsettled.join(", ")));
        }
        progress.say(&line);
        if left.is_empty() && done == total {
            progress.say(&format!("{} is drained", one_line(node)));
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(timed_out(format!("{} is still draining: {}", one_line(node), unsettled.join(", ")), limit));
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
        let info = match client.vm_status(vm.to_string()).await {
            Ok(info) => info,
            Err(e) if retry(&e, deadline) => {
                tokio::time::sleep(POLL_INTERVAL).await;
                continue;
            }
            Err(e) => return Err(e),
        };
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

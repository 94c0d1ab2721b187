//! The `process` runtime's guests, as the guard finds them in `/proc`.
//!
//! The process runtime runs each guest as a child of the agent, leading its
//! own process group, in the guest's directory `<state_dir>/<name>`
//! (`runtime::process`). The guard is another child of the agent: its
//! parent is the agent, and the agent's other children that lead a process
//! group whose working directory is a guest directory are the guests. No
//! file or message from the agent is needed, so a frozen agent cannot
//! withhold them.
//!
//! Signals go to the guest's whole process group. A guest that has exited
//! stays a zombie until the (frozen) agent reaps it; a zombie counts as
//! gone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::Guests;
use crate::runtime::{KILL_WAIT, RuntimeError};

/// How often a stop looks whether the guest is gone.
const POLL: Duration = Duration::from_millis(20);

/// The guests of the process that is this process's parent.
pub struct ProcessGuests {
    parent: i32,
    me: i32,
    state_dir: PathBuf,
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
}

/// Parses `/proc/<pid>/stat`: `pid (comm) state ppid pgrp ...`, where
/// `comm` may hold spaces and parentheses (so: after the last `)`).
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some(Stat { state, ppid, pgrp })
}

impl ProcessGuests {
    /// The guests of this process's parent (the agent that spawned the
    /// guard), under `state_dir`.
    pub fn of_parent(state_dir: &Path) -> anyhow::Result<Self> {
        let state_dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
        Ok(ProcessGuests { parent: nix::unistd::getppid().as_raw(), me: std::process::id() as i32, state_dir })
    }

    /// `(vm, pid)` of every live guest group leader.
    fn scan(&self) -> Vec<(String, i32)> {
        let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            if let Some(vm) = self.guest_of(pid) {
                found.push((vm, pid));
            }
        }
        found.sort();
        found
    }

    /// The guest that process `pid` is, if it is one of our parent's
    /// guests and alive.
    fn guest_of(&self, pid: i32) -> Option<String> {
        if pid == self.me {
            return None;
        }
        let stat = parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
        if stat.ppid != self.parent || stat.pgrp != pid || stat.state == 'Z' {
            return None;
        }
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
        if cwd.parent()? != self.state_dir {
            return None;
        }
        let vm = cwd.file_name()?.to_str()?;
        crate::names::validate(vm).ok()?;
        Some(vm.to_owned())
    }

    fn alive(&self, vm: &str, pid: i32) -> bool {
        self.guest_of(pid).as_deref() == Some(vm)
    }

    async fn wait_gone(&self, vm: &str, pid: i32, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.alive(vm, pid) {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
        true
    }
}

#[async_trait]
impl Guests for ProcessGuests {
    async fn up(&self) -> Result<Vec<String>, RuntimeError> {
        let mut vms: Vec<String> = self.scan().into_iter().map(|(vm, _)| vm).collect();
        vms.dedup();
        Ok(vms)
    }

    async fn kill(&self, vm: &str) -> Result<(), RuntimeError> {
        for (_, pid) in self.scan().into_iter().filter(|(name, _)| name == vm) {
            // Checked just before the signal: the pid is still this guest.
            if self.alive(vm, pid) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if !self.wait_gone(vm, pid, KILL_WAIT).await {
                return Err(RuntimeError::Unkillable { vm: vm.to_owned() });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_past_odd_command_names() {
        assert_eq!(parse_stat("42 (microvm-run) S 7 42 42 0 -1"), Some(Stat { state: 'S', ppid: 7, pgrp: 42 }));
        assert_eq!(parse_stat("42 (a) b) (c) Z 7 9 1"), Some(Stat { state: 'Z', ppid: 7, pgrp: 9 }));
        assert_eq!(parse_stat("42 (x"), None);
        assert_eq!(parse_stat(""), None);
    }
}

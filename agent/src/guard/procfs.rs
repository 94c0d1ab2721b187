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
//!
//! # Finding them cheaply
//!
//! Reading `/proc/<pid>/stat` of every process on the machine costs the
//! kernel a lot once there are thousands (a test machine with 100 agents
//! and their guests: 100 fenced guards' scans took 43% of its CPU). So a
//! pass normally reads only the agent's children, listed by the kernel in
//! `/proc/<agent>/task/<tid>/children` (one file per thread of the agent),
//! and the stat of each. The kernel does not promise that list is exact
//! while children are forking or exiting: one can be skipped. So a
//! *thorough* pass reads every process, as before: the first pass of every
//! fence (the one the fence's time bound rests on) and the guard's
//! stop-post use it, and so does every pass on a kernel without
//! `CONFIG_PROC_CHILDREN` (no `children` file). A guest a cheap pass
//! skipped is found by the next pass, one guard period later: a pass that
//! finds a guest to stop is followed by another at the next check.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
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
    /// The kernel lists a process's children (`CONFIG_PROC_CHILDREN`).
    children_listed: bool,
    /// `(vm, pid)` as the last listing found them, for the kills that
    /// follow it (each checked just before its signal).
    last: Mutex<Vec<(String, i32)>>,
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
        Ok(Self::of(nix::unistd::getppid().as_raw(), state_dir))
    }

    /// The guests of process `parent`, under `state_dir`.
    pub fn of(parent: i32, state_dir: &Path) -> Self {
        let state_dir = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
        let me = std::process::id() as i32;
        let children_listed = Path::new(&format!("/proc/{me}/task/{me}/children")).exists();
        ProcessGuests { parent, me, state_dir, children_listed, last: Mutex::new(Vec::new()) }
    }

    /// `(vm, pid)` of every live guest group leader: of every process on
    /// the machine if `thorough` (or the kernel lists no children), else of
    /// the parent's children as the kernel lists them.
    fn scan(&self, thorough: bool) -> Vec<(String, i32)> {
        let pids = match (thorough, self.children_listed) {
            (false, true) => self.children(),
            _ => None,
        };
        let pids = pids.unwrap_or_else(every_pid);
        let mut found: Vec<(String, i32)> =
            pids.into_iter().filter_map(|pid| self.guest_of(pid).map(|vm| (vm, pid))).collect();
        found.sort();
        found
    }

    /// The parent's children, from each of its threads' `children` file;
    /// `None` if the parent's threads cannot be read (then every process
    /// is looked at). A thread that exited meanwhile has no file: its
    /// children went to another of the parent's threads.
    fn children(&self) -> Option<Vec<i32>> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.parent)).ok()?;
        let mut pids = Vec::new();
        for task in tasks.flatten() {
            let Ok(list) = std::fs::read_to_string(task.path().join("children")) else { continue };
            pids.extend(list.split_ascii_whitespace().filter_map(|pid| pid.parse::<i32>().ok()));
        }
        Some(pids)
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

/// Every process on the machine, from `/proc`.
fn every_pid() -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries.flatten().filter_map(|entry| entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok())).collect()
}

#[async_trait]
impl Guests for ProcessGuests {
    async fn up(&self, thorough: bool) -> Result<Vec<String>, RuntimeError> {
        let found = self.scan(thorough);
        let mut vms: Vec<String> = found.iter().map(|(vm, _)| vm.clone()).collect();
        vms.dedup();
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = found;
        Ok(vms)
    }

    async fn kill(&self, vm: &str) -> Result<(), RuntimeError> {
        let known: Vec<i32> = {
            let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            last.iter().filter(|(name, _)| name == vm).map(|&(_, pid)| pid).collect()
        };
        // Not in the last listing (a kill without one): list again.
        let pids = if known.is_empty() {
            self.scan(false).into_iter().filter(|(name, _)| name == vm).map(|(_, pid)| pid).collect()
        } else {
            known
        };
        for pid in pids {
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

    /// `sleep 600` as a child of this process in `dir`, leading its own
    /// process group if `leader`.
    fn child(dir: &Path, leader: bool) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        std::fs::create_dir_all(dir).unwrap();
        let mut command = std::process::Command::new("sleep");
        command.arg("600").current_dir(dir);
        if leader {
            command.process_group(0);
        }
        command.spawn().unwrap()
    }

    #[tokio::test]
    async fn the_childrens_list_finds_the_guests_a_full_scan_finds_and_kills_them() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let mut a = child(&state.join("vm-a"), true);
        let mut b = child(&state.join("vm-b"), true);
        // Not guests: not leading a group, a directory that is no guest's,
        // a name that is no VM's.
        let mut others = [
            child(&state.join("vm-c"), false),
            child(&dir.path().join("elsewhere").join("vm-d"), true),
            child(&state.join("Not A Name"), true),
        ];
        let guests = ProcessGuests::of(std::process::id() as i32, &state);
        assert!(guests.children_listed, "this kernel lists children (CONFIG_PROC_CHILDREN)");
        let expected = {
            let mut e = vec![("vm-a".to_string(), a.id() as i32), ("vm-b".to_string(), b.id() as i32)];
            e.sort();
            e
        };
        assert_eq!(guests.scan(false), expected, "from the children's list");
        assert_eq!(guests.scan(true), expected, "from every process");
        let fallback = ProcessGuests { children_listed: false, ..ProcessGuests::of(std::process::id() as i32, &state) };
        assert_eq!(fallback.scan(false), expected, "a kernel that lists no children: every process");
        // Another process's guests are not ours.
        assert_eq!(ProcessGuests::of(1, &state).scan(false), Vec::new());

        assert_eq!(guests.up(false).await.unwrap(), ["vm-a", "vm-b"]);
        guests.kill("vm-a").await.unwrap();
        // Killed (a zombie until reaped counts as gone), the other left.
        assert!(a.wait().unwrap().code().is_none(), "killed by a signal");
        assert_eq!(guests.up(false).await.unwrap(), ["vm-b"]);
        // A kill with no listing before it lists for itself.
        let fresh = ProcessGuests::of(std::process::id() as i32, &state);
        fresh.kill("vm-b").await.unwrap();
        assert!(b.wait().unwrap().code().is_none());
        assert_eq!(guests.up(true).await.unwrap(), Vec::<String>::new());
        for other in &mut others {
            assert!(other.try_wait().unwrap().is_none(), "a process that is no guest was left alone");
            other.kill().unwrap();
            other.wait().unwrap();
        }
    }
}

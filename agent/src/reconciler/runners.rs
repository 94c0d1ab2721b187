//! Rolling a running guest to a new runner.
//!
//! microvm.nix's `install-microvm-<name>.service` points `<state_dir>/<name>/current`
//! at a guest's runner whenever a switch installs a new one, on every host; and
//! `microvm-set-booted@<name>.service` links `<state_dir>/<name>/booted` to what
//! `current` was when the guest started (and removes it when the guest stops). The
//! NixOS module turns off microvm.nix's own restart on switch (`restartIfChanged =
//! false`), so that only the agent starts and stops guests: a running guest whose
//! `booted` no longer equals `current` runs an old runner, and the reconciler restarts
//! it on its host (a graceful stop, then the start every pass makes for a VM placed
//! here), one guest at a time.
//!
//! Only the systemd runtime has `booted`; the process runtime starts `current` directly
//! and has nothing to roll. A guest without `booted` (never started through microvm.nix's
//! units) is never taken for stale.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::names;

/// Where to look for `current` and `booted`.
#[derive(Debug, Clone)]
pub struct RunnerWatch {
    state_dir: PathBuf,
}

impl RunnerWatch {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self { state_dir: state_dir.into() }
    }

    /// Of `running`, the guests booted from a runner that is no longer `current`.
    pub async fn stale(&self, running: &[String]) -> BTreeSet<String> {
        let mut stale = BTreeSet::new();
        for vm in running {
            if is_stale(&self.state_dir, vm).await {
                stale.insert(vm.clone());
            }
        }
        stale
    }
}

/// The next guest to roll: a stale one that `eligible` (placed here, desired
/// running, running now).
pub(super) fn next_roll(stale: &BTreeSet<String>, eligible: impl Fn(&str) -> bool) -> Option<String> {
    stale.iter().find(|vm| eligible(vm)).cloned()
}

/// `booted` and `current` both exist and point at different runners. Either link
/// missing (not installed, not started through microvm.nix's units, or in the middle of
/// a start) is not stale: the next scan looks again.
async fn is_stale(state_dir: &Path, vm: &str) -> bool {
    if names::validate(vm).is_err() {
        return false;
    }
    let dir = state_dir.join(vm);
    match (tokio::fs::read_link(dir.join("booted")).await, tokio::fs::read_link(dir.join("current")).await) {
        (Ok(booted), Ok(current)) => booted != current,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn guest(dir: &Path, vm: &str, current: &str, booted: Option<&str>) {
        let guest = dir.join(vm);
        std::fs::create_dir_all(&guest).unwrap();
        symlink(current, guest.join("current")).unwrap();
        if let Some(booted) = booted {
            symlink(booted, guest.join("booted")).unwrap();
        }
    }

    #[tokio::test]
    async fn a_guest_booted_from_an_older_runner_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        guest(dir.path(), "same", "/nix/store/a-runner", Some("/nix/store/a-runner"));
        guest(dir.path(), "moved", "/nix/store/b-runner", Some("/nix/store/a-runner"));
        guest(dir.path(), "never-booted", "/nix/store/c-runner", None);
        let running: Vec<String> =
            ["same", "moved", "never-booted", "not-installed", "../escape"].into_iter().map(String::from).collect();
        let stale = RunnerWatch::new(dir.path()).stale(&running).await;
        assert_eq!(stale, BTreeSet::from(["moved".to_string()]));
    }
}

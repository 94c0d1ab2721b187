//! The cgroups that contain each host, so that a host can be killed whole.
//!
//! `systemd-nspawn --keep-unit --register=no` does not ask a host systemd for a scope (this
//! machine has none: PID 1 is not systemd); it runs the container in whatever cgroup it
//! was started in and splits that into `supervisor/` (itself) and `payload/` (the
//! container, whose cgroup namespace is rooted there). Started from the test process in
//! the root cgroup, every container would share `/payload` and each container's systemd
//! would see and manage the others' units. So every host gets its own cgroup,
//! `blixard-testbed/<bed>/<host>/`, which nspawn joins before exec, and commands run into
//! the host with nsenter join the sibling `exec/`, so that killing the host's cgroup takes
//! them down with it.
//!
//! Layouts: on a cgroup v1/v2 *hybrid* host (this one: cgroup2 at
//! `/sys/fs/cgroup/unified`, the `name=systemd` v1 hierarchy at `/sys/fs/cgroup/systemd`)
//! nspawn reads its own path from `name=systemd` and mirrors it in cgroup2, so a host's
//! cgroup is created at the same path in both. On a *unified* host there is one tree.
//! Killing uses cgroup2's `cgroup.kill` (Linux 5.14), with a SIGKILL sweep as fallback.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::wait::{Probe, wait_for};

/// All test-bed cgroups live below this directory of each hierarchy.
pub const TOP: &str = "blixard-testbed";

/// How long killed processes may take to leave their cgroup.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug)]
pub struct Layout {
    /// The cgroup2 mount: where `cgroup.kill` and `cgroup.events` are.
    pub unified: PathBuf,
    /// The `name=systemd` v1 mount on a hybrid host.
    pub legacy_systemd: Option<PathBuf>,
}

impl Layout {
    pub fn detect() -> Result<Layout, String> {
        let fs = Path::new("/sys/fs/cgroup");
        if fs.join("cgroup.controllers").exists() {
            return Ok(Layout { unified: fs.into(), legacy_systemd: None });
        }
        let unified = fs.join("unified");
        let systemd = fs.join("systemd");
        if unified.join("cgroup.controllers").exists() && systemd.join("cgroup.procs").exists() {
            return Ok(Layout { unified, legacy_systemd: Some(systemd) });
        }
        Err("no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: the test bed \
             needs cgroup2 to contain and kill each host"
            .into())
    }

    /// A cgroup at `relative` (below [`TOP`]), in every hierarchy of this layout.
    pub fn group(&self, relative: &str) -> Group {
        Group { layout: self.clone(), relative: Path::new(TOP).join(relative) }
    }

    /// Names of the entries directly below [`TOP`] in the cgroup2 tree.
    pub fn top_entries(&self) -> Vec<String> {
        let mut names = Vec::new();
        for root in self.roots() {
            if let Ok(entries) = fs::read_dir(root.join(TOP)) {
                names.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.file_name().to_string_lossy().into_owned()),
                );
            }
        }
        names.sort();
        names.dedup();
        names
    }

    fn roots(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.unified).chain(self.legacy_systemd.as_ref())
    }
}

/// One cgroup, present at the same path in each hierarchy of its layout.
#[derive(Clone, Debug)]
pub struct Group {
    layout: Layout,
    relative: PathBuf,
}

impl Group {
    pub fn child(&self, name: &str) -> Group {
        Group { layout: self.layout.clone(), relative: self.relative.join(name) }
    }

    pub fn paths(&self) -> Vec<PathBuf> {
        self.layout.roots().map(|root| root.join(&self.relative)).collect()
    }

    /// This group's directory in the cgroup2 tree.
    pub(super) fn unified_path(&self) -> PathBuf {
        self.layout.unified.join(&self.relative)
    }

    pub fn create(&self) -> Result<()> {
        for path in self.paths() {
            fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes itself into to join this group.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.paths().into_iter().map(|p| p.join("cgroup.procs")).collect()
    }

    pub fn exists(&self) -> bool {
        self.unified_path().exists()
    }

    /// Every process in this group and below it.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        collect_pids(&self.unified_path(), &mut pids);
        pids
    }

    /// Sends the kill to every process in this group and below it, without waiting.
    pub fn kill_once(&self) -> Result<()> {
        let kill_file = self.unified_path().join("cgroup.kill");
        if !self.exists() {
            return Ok(());
        }
        if kill_file.exists() {
            return fs::write(&kill_file, "1").with_context(|| format!("writing {}", kill_file.display()));
        }
        for pid in self.pids() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        Ok(())
    }

    /// Kills every process in this group and below it, abruptly, and waits until they
    /// are gone. This is a power cut: nothing inside gets to run a stop action.
    pub fn kill(&self) -> Result<()> {
        if !self.exists() {
            return Ok(());
        }
        let kill_file = self.unified_path().join("cgroup.kill");
        let has_kill_file = kill_file.exists();
        wait_for(&format!("cgroup {} to empty", self.relative.display()), EXIT_TIMEOUT, || {
            let pids = self.pids();
            if pids.is_empty() {
                return Ok(Probe::Ready(()));
            }
            // Repeated on every probe: a process forking while the fallback sweep runs
            // could escape one round.
            if has_kill_file {
                fs::write(&kill_file, "1").with_context(|| format!("writing {}", kill_file.display()))?;
            } else {
                for &pid in &pids {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                }
            }
            Ok(Probe::NotYet(format!("{} processes left: {pids:?}", pids.len())))
        })
    }

    /// Kills everything inside, then removes this group and its descendants from every
    /// hierarchy.
    pub fn destroy(&self) -> Result<()> {
        self.kill()?;
        self.remove_descendants()?;
        for path in self.paths() {
            remove_dir_ignoring_absent(&path)?;
        }
        Ok(())
    }

    /// Removes the groups below this one (all must be empty of processes).
    pub fn remove_descendants(&self) -> Result<()> {
        for path in self.paths() {
            let Ok(entries) = fs::read_dir(&path) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&entry.path())?;
                }
            }
        }
        Ok(())
    }
}

fn collect_pids(dir: &Path, pids: &mut Vec<u32>) {
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&entry.path(), pids);
            }
        }
    }
}

/// Removes an empty cgroup tree, deepest first (a cgroup directory only goes with rmdir,
/// and only once it has no children).
fn remove_tree(dir: &Path) -> Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path())?;
            }
        }
    }
    remove_dir_ignoring_absent(dir)
}

/// Removes one cgroup directory. The kernel refuses (EBUSY) while the group is still
/// populated, and it stays populated for a moment after `cgroup.procs` reads empty: a
/// killed process is gone from that list as it begins to exit, but its other threads,
/// and the kernel threads KVM and vhost attach to a qemu's cgroup, leave only as the
/// exit completes. So a busy group is killed again and retried until `EXIT_TIMEOUT`.
fn remove_dir_ignoring_absent(dir: &Path) -> Result<()> {
    wait_for(&format!("cgroup {} to be removable", dir.display()), EXIT_TIMEOUT, || match fs::remove_dir(dir) {
        Ok(()) => Ok(Probe::Ready(())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Probe::Ready(())),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let kill_file = dir.join("cgroup.kill");
            if kill_file.exists() {
                let _ = fs::write(&kill_file, "1");
            }
            let events = fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
            let mut left = Vec::new();
            collect_pids(dir, &mut left);
            Ok(Probe::NotYet(format!(
                "busy ({}); processes left: {left:?}",
                events.split_whitespace().collect::<Vec<_>>().join(" ")
            )))
        }
        Err(e) => bail!("removing cgroup {}: {e}", dir.display()),
    })
}

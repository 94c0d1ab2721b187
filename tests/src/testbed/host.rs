//! One host of a test bed: a systemd-nspawn container with its own root file system,
//! systemd, system bus and address on the bed's bridge.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::cgroup::Group;
use super::cmd::{self, tool};
use super::resources::{self, link_exists};
use crate::wait::{Probe, wait_for, wait_until};

/// How long a host may take from spawn until systemd is up, the bus answers and host0 has
/// its address. A boot takes about a second here; the margin is for a loaded CI machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Default bound on one command run inside a host.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the kernel may take to destroy a dead container's network namespace (and with
/// it the host-side veth) before the test bed deletes the veth itself.
const VETH_GONE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one readiness probe while booting.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on reaping nspawn after its cgroup was killed.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the nspawn log quoted in boot errors.
const LOG_TAIL_LINES: usize = 40;

/// Inside a host: systemd's view of the boot, whether systemd answers on the system bus,
/// and host0's IPv4 addresses, in one process spawn per probe.
const READY_PROBE: &str = "\
echo \"state=$(systemctl is-system-running 2>&1)\"
busctl call org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.DBus.Peer Ping \
  > /dev/null 2>&1 && echo bus=ok
ip -4 -o addr show dev host0 2>&1";

/// The environment commands inside a host get, instead of the test process's own.
const GUEST_ENV: &[(&str, &str)] = &[
    ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("HOME", "/root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
    ("SYSTEMD_PAGER", ""),
    ("SYSTEMD_COLORS", "0"),
];

/// Names the per-command cgroups of [`Host::exec`], unique within this process (and the
/// process owns its bed's cgroups).
static EXEC_SEQ: AtomicU64 = AtomicU64::new(0);

/// Where the agent binary goes in every host.
pub const AGENT_PATH: &str = "/usr/local/bin/blixard-agent";

pub struct Host {
    pub(super) index: usize,
    pub(super) name: String,
    pub(super) machine: String,
    pub(super) addr: Ipv4Addr,
    pub(super) prefix_len: u8,
    pub(super) bridge: String,
    pub(super) dir: PathBuf,
    pub(super) root: PathBuf,
    pub(super) upper: PathBuf,
    pub(super) cgroup: Group,
    pub(super) state: Mutex<State>,
}

#[derive(Default)]
pub(super) struct State {
    /// The systemd-nspawn process while the host is powered on.
    pub(super) nspawn: Option<Child>,
    /// The container's init (PID 1 inside), host PID: the target of nsenter.
    pub(super) leader: Option<u32>,
}

impl Host {
    /// Position in the bed, from 0.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The host's name inside: its hostname and the name the other hosts' /etc/hosts
    /// know it by (`h0`, `h1`, ...). Use it as the agent's node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The nspawn machine name, unique on this machine (`bxtb<k>h<i>`).
    pub fn machine_name(&self) -> &str {
        &self.machine
    }

    /// The host's address on the bed's bridge (on `host0` inside).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The host's root file system as seen from the test process. Files written here
    /// appear inside the host, running or not, and survive power_off. What the host
    /// mounts for itself while running (/run, /tmp, /proc, /sys) is not seen here: read
    /// those with [`Host::run`].
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path_inside` (absolute, as the host sees it) seen from the test process.
    pub fn path(&self, path_inside: &str) -> PathBuf {
        assert!(path_inside.starts_with('/'), "{path_inside} is not absolute");
        self.root.join(path_inside.trim_start_matches('/'))
    }

    /// The cgroup2 directory on this machine of the cgroup the host's systemd calls
    /// `/<relative>` (a unit's, say `system.slice/dbus.service`): nspawn roots the
    /// container's cgroup tree at the host's `payload/`. It exists only while the host
    /// runs and has that cgroup.
    pub fn unit_cgroup(&self, relative: &str) -> PathBuf {
        self.cgroup.child("payload").unified_path().join(relative)
    }

    /// The host-side end of the host's link to the bridge.
    pub fn veth(&self) -> String {
        resources::veth_name(&self.machine)
    }

    /// Writes `contents` to `path_inside` with `mode`, creating parent directories.
    pub fn write_file(&self, path_inside: &str, contents: impl AsRef<[u8]>, mode: u32) -> Result<()> {
        let path = self.path(path_inside);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        // Durable before it returns, as a package manager leaves a file: a test that
        // writes a 300 MiB agent binary and then restarts the agent must not have
        // the kernel's write-back of it stall every agent's fsync in the restart
        // window (their quorum contact then ages past fence_after).
        let mut file = fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        file.write_all(contents.as_ref()).with_context(|| format!("writing {}", path.display()))?;
        file.sync_all().with_context(|| format!("syncing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", path.display()))
    }

    pub fn read_file(&self, path_inside: &str) -> Result<String> {
        let path = self.path(path_inside);
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Copies the agent binary to [`AGENT_PATH`] inside the host.
    /// A new file renamed over the old, as a package upgrade does: the old
    /// binary may still run (the fence guard does, across agent restarts).
    pub fn install_agent(&self, binary: &Path) -> Result<()> {
        let contents = fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
        let new = format!("{AGENT_PATH}.new");
        self.write_file(&new, contents, 0o755)?;
        fs::rename(self.path(&new), self.path(AGENT_PATH)).with_context(|| format!("installing {AGENT_PATH}"))
    }

    /// Bytes this host's own files take on disk: the overlay upper layer, i.e. what it
    /// wrote on top of the shared rootfs.
    pub fn disk_usage_bytes(&self) -> u64 {
        disk_usage(&self.upper)
    }

    pub fn is_running(&self) -> bool {
        let mut state = self.state();
        match state.nspawn.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                state.nspawn = None;
                state.leader = None;
                false
            }
            None => false,
        }
    }

    /// Runs `argv` inside the host (all its namespaces, as root, environment reset), with
    /// the default timeout. A non-zero exit is not an error here; see [`Host::run`].
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        self.exec_timeout(argv, EXEC_TIMEOUT)
    }

    pub fn exec_timeout(&self, argv: &[&str], timeout: Duration) -> Result<Output> {
        let leader = self.leader()?;
        let mut command = Command::new(tool("nsenter")?);
        command
            .arg(format!("--target={leader}"))
            .args(["--all", "--root", "--wd", "--"])
            .args(argv)
            .env_clear()
            .envs(GUEST_ENV.iter().copied());
        // Each command runs in a cgroup of its own below the host's: power_off kills it
        // with the host, and a timeout kills it whole. Killing nsenter alone would not do:
        // it forks to enter the PID namespace, and Debian 12's nsenter has no
        // --kill-child to take that child along.
        let group = self.cgroup.child("exec").child(&EXEC_SEQ.fetch_add(1, Ordering::Relaxed).to_string());
        group.create()?;
        cmd::join_cgroups(&mut command, &group.procs_files());
        let output = cmd::output_within_then(&mut command, timeout, || {
            // Also whatever it started in the background, which would hold its pipes.
            if let Err(e) = group.destroy() {
                eprintln!("testbed: cleaning up after {argv:?} on {}: {e:#}", self.name);
            }
        });
        output.with_context(|| format!("{argv:?} on {}", self.name))
    }

    /// Runs `argv` inside the host; a non-zero exit is an error carrying its stderr.
    /// Returns stdout.
    pub fn run(&self, argv: &[&str]) -> Result<String> {
        self.run_within(argv, EXEC_TIMEOUT)
    }

    /// [`Host::run`] for a command that may take longer than the default timeout.
    pub fn run_within(&self, argv: &[&str], timeout: Duration) -> Result<String> {
        let output = self.exec_timeout(argv, timeout)?;
        cmd::check_success(&format!("{argv:?} on {}", self.name), &output)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// [`Host::run`] of a `sh -c` script.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.run(&["sh", "-c", script])
    }

    /// Starts `argv` as transient service `unit` of the host's systemd (`systemd-run`),
    /// so it belongs to the host like any daemon: it dies with power_off, logs to the
    /// host's journal, and does not tie up the caller. Returns once it has been exec'd.
    pub fn spawn_unit(&self, unit: &str, argv: &[&str]) -> Result<()> {
        let mut full = vec!["systemd-run", "--quiet", "--service-type=exec", "--unit", unit, "--"];
        full.extend_from_slice(argv);
        self.run(&full).map(drop)
    }

    /// Whether `unit` is active, per `systemctl is-active` inside.
    pub fn unit_active(&self, unit: &str) -> Result<bool> {
        Ok(self.unit_state(unit)? == "active")
    }

    /// `unit`'s ActiveState per `systemctl is-active` (active, inactive, activating,
    /// failed, ...).
    pub fn unit_state(&self, unit: &str) -> Result<String> {
        // is-active exits non-zero for every state but active, and still prints it.
        let output = self.exec(&["systemctl", "is-active", unit])?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// `unit`'s ActiveState read over the system bus from systemd's unit object, the way
    /// the agent sees it.
    pub fn unit_state_dbus(&self, unit: &str) -> Result<String> {
        let path = unit_object_path(unit);
        let out = self.run(&[
            "busctl",
            "get-property",
            "org.freedesktop.systemd1",
            &path,
            "org.freedesktop.systemd1.Unit",
            "ActiveState",
        ])?;
        // busctl prints a string property as: s "active"
        out.trim()
            .strip_prefix("s \"")
            .and_then(|s| s.strip_suffix('"'))
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("unexpected busctl output for {unit}: {out:?}"))
    }

    /// Waits until `unit` reports `state` (per systemctl).
    pub fn wait_unit_state(&self, unit: &str, state: &str, timeout: Duration) -> Result<()> {
        wait_for(&format!("{unit} on {} to be {state}", self.name), timeout, || {
            let now = self.unit_state(unit)?;
            Ok(if now == state { Probe::Ready(()) } else { Probe::NotYet(now) })
        })
    }

    /// The journal of `unit` on this host. Read from inside while the host runs, else
    /// from its persistent journal files (what a host said before it lost power).
    pub fn journal(&self, unit: &str) -> Result<String> {
        self.journal_args(&["-u", unit])
    }

    /// The journal with any `journalctl` filter arguments (`-b`, `-n 50`, `-u x`, ...).
    pub fn journal_args(&self, filter: &[&str]) -> Result<String> {
        let mut args = vec!["--no-pager", "--output=short-monotonic"];
        args.extend_from_slice(filter);
        if self.is_running() {
            let mut argv = vec!["journalctl"];
            argv.extend(args);
            return self.run(&argv);
        }
        let dir = self.path("/var/log/journal");
        let mut command = Command::new(tool("journalctl")?);
        command.arg(format!("--directory={}", dir.display())).args(args);
        cmd::stdout_within(&mut command, EXEC_TIMEOUT)
    }

    /// Powers the host on and waits until it is up: see [`Host::wait_booted`].
    pub fn boot(&self) -> Result<()> {
        self.spawn()?;
        self.wait_booted()
    }

    /// Starts the container; returns at once.
    pub(super) fn spawn(&self) -> Result<()> {
        let mut state = self.state();
        if state.nspawn.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))) {
            bail!("{} is already running", self.name);
        }
        self.cgroup.create()?;
        self.cgroup.child("exec").create()?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .with_context(|| format!("opening {}", self.log_path().display()))?;
        let mut command = Command::new(tool("systemd-nspawn")?);
        command
            .args([
                "--boot",
                // No host systemd to register with or to ask for a scope (PID 1 here is
                // not systemd): run in the cgroup we were started in, ours below.
                "--register=no",
                "--keep-unit",
                "--console=passive",
                "--link-journal=no",
                "--resolv-conf=off",
                "--timezone=off",
            ])
            .arg(format!("--network-bridge={}", self.bridge))
            .arg(format!("--machine={}", self.machine))
            .arg(format!("--directory={}", self.root.display()))
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a ^C meant for the test runner must not reach the
            // containers before the test bed's cleanup does.
            .process_group(0);
        cmd::join_cgroups(&mut command, &self.cgroup.procs_files());
        let child = command.spawn().with_context(|| format!("spawning systemd-nspawn for {}", self.name))?;
        state.nspawn = Some(child);
        state.leader = None;
        Ok(())
    }

    /// Waits until systemd inside reports running (or degraded), systemd answers on the
    /// system bus and host0 has the host's address.
    pub fn wait_booted(&self) -> Result<()> {
        let what = format!("{} to boot", self.name);
        let result = wait_for(&what, BOOT_TIMEOUT, || self.probe_booted());
        match result {
            Ok(degraded) => {
                if let Some(failed) = degraded {
                    eprintln!("testbed: {} booted degraded; failed units:\n{failed}", self.name);
                }
                Ok(())
            }
            Err(e) => Err(e.context(self.diagnostics())),
        }
    }

    /// Ready(None) when up, Ready(Some(failed units)) when up but degraded.
    fn probe_booted(&self) -> Result<Probe<Option<String>>> {
        {
            let mut state = self.state();
            let Some(child) = state.nspawn.as_mut() else { bail!("{} is powered off", self.name) };
            if let Some(status) = child.try_wait()? {
                state.nspawn = None;
                bail!("systemd-nspawn for {} exited during boot ({status})", self.name);
            }
            if state.leader.is_none() {
                state.leader = self.find_leader();
            }
            if state.leader.is_none() {
                return Ok(Probe::NotYet("the container's init has not started".into()));
            }
        }
        let output = match self.exec_timeout(&["sh", "-c", READY_PROBE], PROBE_TIMEOUT) {
            Ok(output) => output,
            Err(e) => return Ok(Probe::NotYet(format!("{e:#}"))),
        };
        if output.stdout.is_empty() {
            return Ok(Probe::NotYet(format!(
                "the probe printed nothing: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let state = text.lines().find_map(|l| l.strip_prefix("state=")).unwrap_or("").trim();
        let bus_ok = text.lines().any(|l| l == "bus=ok");
        let addressed = text.contains(&format!(" {}/{} ", self.addr, self.prefix_len));
        if !(matches!(state, "running" | "degraded") && bus_ok && addressed) {
            return Ok(Probe::NotYet(format!(
                "system state {state:?}, bus ok: {bus_ok}, host0 addressed: {addressed}"
            )));
        }
        if state == "degraded" {
            let failed = self.run(&["systemctl", "--failed", "--plain", "--no-legend"]).unwrap_or_default();
            return Ok(Probe::Ready(Some(failed)));
        }
        Ok(Probe::Ready(None))
    }

    /// The container's init: the process in the host's payload cgroup that is PID 1 in
    /// its own PID namespace.
    fn find_leader(&self) -> Option<u32> {
        self.cgroup.child("payload").pids().into_iter().find(|pid| {
            let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
                return false;
            };
            status.lines().find_map(|l| l.strip_prefix("NSpid:")).is_some_and(|ids| {
                let ids: Vec<&str> = ids.split_whitespace().collect();
                ids.len() >= 2 && ids.last() == Some(&"1")
            })
        })
    }

    /// The host PID of the container's init while the host runs: for
    /// `nsenter --target=PID --all --root --wd bash` when debugging by hand.
    pub fn leader_pid(&self) -> Option<u32> {
        self.leader().ok()
    }

    fn leader(&self) -> Result<u32> {
        let mut state = self.state();
        if state.nspawn.is_none() {
            bail!("{} is powered off", self.name);
        }
        if state.leader.is_none() {
            state.leader = self.find_leader();
        }
        state.leader.ok_or_else(|| anyhow!("{} has not started its init yet", self.name))
    }

    /// Cuts power: kills every process of the host at once (its nspawn, its systemd and
    /// everything below, commands being run into it), with no shutdown. Its files stay.
    /// Note that data the host wrote but did not fsync survives too, in the page cache of
    /// the kernel all hosts share: this is not a test of durability.
    pub fn power_off(&self) -> Result<()> {
        let mut state = self.state();
        let Some(mut nspawn) = state.nspawn.take() else {
            return Ok(());
        };
        state.leader = None;
        self.cgroup.kill_once()?;
        let deadline = Instant::now() + REAP_TIMEOUT;
        while nspawn.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                bail!("systemd-nspawn for {} survived its cgroup being killed", self.name);
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.cgroup.kill()?;
        self.cgroup.remove_descendants()?;
        // The veth goes when the kernel destroys the dead container's network namespace,
        // asynchronously; a boot before that would fail to create it again.
        let veth = self.veth();
        if wait_until(&format!("{veth} to go"), VETH_GONE_TIMEOUT, || Ok(!link_exists(&veth))).is_err() {
            let _ = resources::ip(&["link", "del", &veth]);
        }
        Ok(())
    }

    /// Takes the host's link to the bridge down: nothing passes between it and the other
    /// hosts (or the test process) until [`Host::heal_link`]. Inside, host0 keeps its
    /// carrier and address, as when a switch port or a cable further away fails.
    pub fn cut_link(&self) -> Result<()> {
        self.set_link(false)
    }

    pub fn heal_link(&self) -> Result<()> {
        self.set_link(true)
    }

    fn set_link(&self, up: bool) -> Result<()> {
        let veth = self.veth();
        if !link_exists(&veth) {
            bail!("{} has no link {veth}: is it powered off?", self.name);
        }
        resources::ip(&["link", "set", "dev", &veth, if up { "up" } else { "down" }]).map(drop)
    }

    pub(super) fn log_path(&self) -> PathBuf {
        self.dir.join("nspawn.log")
    }

    /// What to look at when a boot fails: nspawn's own output and systemd's jobs.
    pub(super) fn diagnostics(&self) -> String {
        let mut text = format!("--- {} ({}): last lines of {}\n", self.name, self.machine, self.log_path().display());
        let mut log = String::new();
        if let Ok(mut file) = fs::File::open(self.log_path()) {
            let _ = file.read_to_string(&mut log);
        }
        let lines: Vec<&str> = log.lines().collect();
        text.push_str(&lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n"));
        if self.leader().is_ok() {
            for argv in [&["systemctl", "list-jobs", "--no-pager"][..], &["systemctl", "--failed", "--no-pager"]] {
                if let Ok(out) = self.exec_timeout(argv, PROBE_TIMEOUT) {
                    text.push_str(&format!("\n--- {}\n{}", argv.join(" "), String::from_utf8_lossy(&out.stdout)));
                }
            }
        }
        text
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock leaves a consistent State: every
        // update to it is a single assignment.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The D-Bus object path of systemd unit `unit`, escaped as systemd escapes bus labels:
/// every byte but [A-Za-z0-9] (and a leading digit) becomes `_xx` in lower-case hex.
pub fn unit_object_path(unit: &str) -> String {
    let mut path = String::from("/org/freedesktop/systemd1/unit/");
    if unit.is_empty() {
        path.push('_');
    }
    for (i, byte) in unit.bytes().enumerate() {
        if byte.is_ascii_alphabetic() || (i > 0 && byte.is_ascii_digit()) {
            path.push(byte as char);
        } else {
            path.push_str(&format!("_{byte:02x}"));
        }
    }
    path
}

/// Bytes allocated on disk below `dir`, not following symlinks.
fn disk_usage(dir: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let children: u64 =
        fs::read_dir(dir).map(|entries| entries.flatten().map(|e| disk_usage(&e.path())).sum()).unwrap_or(0);
    own + children
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_paths_are_escaped_like_systemd_does() {
        assert_eq!(unit_object_path("microvm@demo.service"), "/org/freedesktop/systemd1/unit/microvm_40demo_2eservice");
        assert_eq!(unit_object_path("dbus.service"), "/org/freedesktop/systemd1/unit/dbus_2eservice");
        assert_eq!(unit_object_path("9p-x.mount"), "/org/freedesktop/systemd1/unit/_39p_2dx_2emount");
    }
}

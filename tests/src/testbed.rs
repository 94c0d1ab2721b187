//! A cluster of real hosts on one machine: systemd-nspawn containers booted from a cached
//! Debian rootfs, each with real systemd and a system bus, on a private bridge.
//!
//! ```no_run
//! use blixard_systests::Testbed;
//!
//! let Some(bed) = Testbed::start_or_skip(3) else { return };
//! bed.host(0).run(&["ping", "-c1", &bed.host(1).addr().to_string()]).unwrap();
//! bed.cut_link(1).unwrap(); // h1 is partitioned from everyone
//! bed.power_off(2).unwrap(); // h2 loses power; bed.boot(2) brings it back
//! // Dropping `bed` (even while a test panics) removes containers, links and files.
//! ```
//!
//! Layout of a bed `k` (see `resources` for the names and the locking):
//! - bridge `bxtb<k>`, 10.77.<k>.1/24, on this machine; host i is `h<i>` at
//!   10.77.<k>.(10+i)/24 on `host0` inside, configured by systemd-networkd from a static
//!   .network file, so it comes back by itself after power_off and boot.
//! - each host's root is an overlay: the shared read-only rootfs that
//!   `tests/testbed/prepare.sh` built, plus the host's own upper layer in
//!   `<work dir>/bxtb<k>/h<i>/`. Booting three hosts copies nothing.
//! - each host runs in cgroup `blixard-testbed/bxtb<k>/h<i>` (see `cgroup`), so
//!   power_off kills exactly that host, whole.
//!
//! Everything is synchronous: a test drives hosts from its own thread and waits on
//! conditions with [`crate::wait_for`], never with fixed sleeps.

mod cgroup;
mod cmd;
mod host;
pub mod impair;
mod resources;

use std::fmt::Write as _;
use std::fs;
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use host::{AGENT_PATH, BOOT_TIMEOUT, EXEC_TIMEOUT, Host, unit_object_path};
pub use impair::{Impaired, Impairment};
use resources::{BED_ID_MAX, BedLock, HOSTS_MAX};

/// The prefix length of every bed's subnet.
const PREFIX_LEN: u8 = 24;
/// Last octet of host 0's address; host i gets HOST_ADDR_BASE + i.
const HOST_ADDR_BASE: u8 = 10;

/// Set to `skip` to let tests skip (with a message) on a machine that cannot run the test
/// bed. Unset, such a machine fails the tests: CI must never skip them silently.
pub const SKIP_ENV: &str = "BLIXARD_TESTBED";
/// Set to `1` to keep a bed's files after the test (the next run's sweeper removes them).
pub const KEEP_ENV: &str = "BLIXARD_TESTBED_KEEP";
/// Set to `copy` to give each host a full copy of the rootfs instead of an overlay.
pub const ROOTFS_MODE_ENV: &str = "BLIXARD_TESTBED_ROOTFS_MODE";

const PREPARE_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/testbed/prepare.sh");
const PREPARE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on copying the rootfs for one host (about 4 s here) when not using overlays.
const COPY_TIMEOUT: Duration = Duration::from_secs(300);

/// A running cluster of hosts. Dropping it removes everything it created.
pub struct Testbed {
    hosts: Vec<Host>,
    k: u8,
    bridge: String,
    dir: PathBuf,
    cgroups: cgroup::Layout,
    boot_time: Duration,
    lock: Option<BedLock>,
}

/// What a test bed needs from this machine, found by [`Testbed::available`].
struct Environment {
    rootfs: PathBuf,
    cgroups: cgroup::Layout,
}

impl Testbed {
    /// Whether this machine can run a test bed; if not, why, in one sentence that says
    /// what to do about it.
    pub fn available() -> Result<(), String> {
        Environment::check().map(drop)
    }

    /// Starts a bed of `n_hosts` hosts if this machine can; see [`Testbed::can_run`] for
    /// what happens when it cannot.
    pub fn start_or_skip(n_hosts: usize) -> Option<Testbed> {
        Testbed::can_run().then(|| Testbed::start(n_hosts).unwrap_or_else(|e| panic!("starting the test bed: {e:#}")))
    }

    /// True when this machine can run a test bed. When it cannot: with
    /// `BLIXARD_TESTBED=skip`, says why and returns false (the test should return);
    /// otherwise panics with the reason, so that CI never skips these tests silently.
    pub fn can_run() -> bool {
        match Testbed::available() {
            Ok(()) => true,
            Err(why) if std::env::var(SKIP_ENV).as_deref() == Ok("skip") => {
                eprintln!("SKIPPED: the container test bed cannot run here: {why}");
                false
            }
            Err(why) => panic!(
                "the container test bed cannot run here: {why}\n\
                 (on a machine that cannot run it, {SKIP_ENV}=skip skips these tests; CI must not set it)"
            ),
        }
    }

    /// Removes what crashed or killed runs left behind (containers, bridges, veths,
    /// mounts, files, cgroups), never touching a bed whose owner still runs. `start`
    /// does this first; returns the names of the beds removed.
    pub fn sweep() -> Result<Vec<String>> {
        let cgroups = cgroup::Layout::detect().map_err(anyhow::Error::msg)?;
        resources::sweep_stale(&cgroups)
    }

    /// Boots `n_hosts` hosts on a new bridge and waits until all are up.
    pub fn start(n_hosts: usize) -> Result<Testbed> {
        Testbed::start_with_layers(n_hosts, &[])
    }

    /// [`Testbed::start`] with more read-only layers over the shared rootfs in every
    /// host, uppermost first (e.g. the real guest's, `tests/testbed/prepare-guest.sh`).
    pub fn start_with_layers(n_hosts: usize, layers: &[PathBuf]) -> Result<Testbed> {
        assert!((1..=HOSTS_MAX).contains(&n_hosts), "a bed has 1 to {HOSTS_MAX} hosts");
        let env = Environment::check().map_err(anyhow::Error::msg)?;
        let swept = resources::sweep_stale(&env.cgroups)?;
        if !swept.is_empty() {
            eprintln!("testbed: removed leftovers of earlier runs: {}", swept.join(", "));
        }
        let lock = claim_bed_id(&env.cgroups)?;
        let k = lock.k;
        let bridge = resources::bed_name(k);
        let dir = resources::work_dir().join(&bridge);
        // From here on, dropping `bed` (on any early return) undoes what was done.
        let mut bed = Testbed {
            hosts: Vec::new(),
            k,
            bridge: bridge.clone(),
            dir: dir.clone(),
            cgroups: env.cgroups.clone(),
            boot_time: Duration::ZERO,
            lock: Some(lock),
        };
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // A fixed MAC: by default a bridge takes the lowest of its ports' MACs, which
        // changes as hosts power off and boot, and hosts would then hold a stale ARP
        // entry for this machine's address.
        let mac = format!("02:62:78:74:62:{k:02x}");
        resources::ip(&["link", "add", "name", &bridge, "address", &mac, "type", "bridge"])?;
        resources::ip(&["addr", "add", &format!("{}/{PREFIX_LEN}", bed.bridge_addr()), "dev", &bridge])?;
        resources::ip(&["link", "set", "dev", &bridge, "up"])?;

        let names: Vec<(String, Ipv4Addr)> = (0..n_hosts).map(|i| (format!("h{i}"), host_addr(k, i))).collect();
        for (index, (name, addr)) in names.iter().enumerate() {
            let host_dir = dir.join(name);
            let upper = lay_out_root(&host_dir, &env.rootfs, layers)?;
            let host = Host {
                index,
                name: name.clone(),
                machine: resources::machine_name(k, index),
                addr: *addr,
                prefix_len: PREFIX_LEN,
                bridge: bridge.clone(),
                root: host_dir.join("root"),
                upper,
                dir: host_dir,
                cgroup: env.cgroups.group(&format!("{bridge}/{name}")),
                state: Mutex::new(Default::default()),
            };
            write_identity(&host, &names)?;
            bed.hosts.push(host);
        }

        let started = Instant::now();
        for host in &bed.hosts {
            host.spawn()?;
        }
        for host in &bed.hosts {
            host.wait_booted()?;
        }
        bed.boot_time = started.elapsed();
        Ok(bed)
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The bridge's name on this machine.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// This machine's address on the bridge: the test process reaches hosts from it.
    pub fn bridge_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.k, 1)
    }

    /// Where this bed keeps its files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long booting the hosts took in [`Testbed::start`], from spawning the first
    /// to the last one being up.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// See [`Host::power_off`].
    pub fn power_off(&self, i: usize) -> Result<()> {
        self.hosts[i].power_off()
    }

    /// See [`Host::boot`].
    pub fn boot(&self, i: usize) -> Result<()> {
        self.hosts[i].boot()
    }

    /// See [`Host::cut_link`].
    pub fn cut_link(&self, i: usize) -> Result<()> {
        self.hosts[i].cut_link()
    }

    /// See [`Host::heal_link`].
    pub fn heal_link(&self, i: usize) -> Result<()> {
        self.hosts[i].heal_link()
    }

    /// See [`Host::unit_active`].
    pub fn unit_active(&self, i: usize, unit: &str) -> Result<bool> {
        self.hosts[i].unit_active(unit)
    }

    /// See [`Host::journal`].
    pub fn journal(&self, i: usize, unit: &str) -> Result<String> {
        self.hosts[i].journal(unit)
    }

    /// Failed units and the end of each running host's journal: printed when a test
    /// panics with the bed still up.
    pub fn diagnostics(&self) -> String {
        let mut text = String::new();
        for host in &self.hosts {
            let _ =
                writeln!(text, "=== {} ({}, {}) running: {}", host.name, host.machine, host.addr, host.is_running());
            if let Ok(failed) = host.run(&["systemctl", "--failed", "--no-pager", "--plain"]) {
                let _ = writeln!(text, "{failed}");
            }
            if let Ok(journal) = host.journal_args(&["-b", "-n", "60"]) {
                let _ = writeln!(text, "{journal}");
            }
        }
        text
    }

    fn shutdown(&mut self) -> Result<()> {
        let group = self.cgroups.group(&self.bridge);
        group.kill_once()?;
        for host in &self.hosts {
            // Reap our nspawn children so they do not linger as zombies.
            if let Some(mut child) = host.state().nspawn.take() {
                let _ = child.wait();
            }
        }
        let lock = self.lock.take().expect("a bed is shut down once");
        if std::env::var(KEEP_ENV).as_deref() == Ok("1") {
            group.destroy()?;
            eprintln!("testbed: kept {} ({KEEP_ENV}=1); the next run removes it", self.dir.display());
            return Ok(());
        }
        resources::remove_bed(&lock, &self.cgroups)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.hosts.is_empty() {
            eprintln!("testbed: a test panicked; state of bed {}:\n{}", self.bridge, self.diagnostics());
        }
        if let Err(e) = self.shutdown() {
            // Not a panic: this may run while unwinding. The next run's sweeper retries.
            eprintln!("testbed: cleaning up {} failed: {e:#}", self.bridge);
        }
    }
}

impl Environment {
    fn check() -> Result<Environment, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("it needs root (it creates bridges, mounts and containers): run the tests as root".into());
        }
        for name in ["systemd-nspawn", "nsenter", "ip", "journalctl"] {
            cmd::tool(name).map_err(|e| e.to_string())?;
        }
        let cgroups = cgroup::Layout::detect()?;
        let rootfs = rootfs_path().map_err(|e| format!("{e:#}"))?;
        if !rootfs.join("etc/blixard-testbed-tag").exists() {
            return Err(format!(
                "the hosts' rootfs is not prepared ({} is missing): run `tests/testbed/prepare.sh` as root",
                rootfs.display()
            ));
        }
        Ok(Environment { rootfs, cgroups })
    }
}

/// The rootfs the prepare script builds for its current package list and configuration,
/// or `BLIXARD_TESTBED_ROOTFS`.
fn rootfs_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("BLIXARD_TESTBED_ROOTFS") {
        return Ok(path.into());
    }
    let out = cmd::stdout_within(Command::new("bash").args([PREPARE_SCRIPT, "--print-path"]), PREPARE_TIMEOUT)?;
    Ok(PathBuf::from(out.trim()))
}

/// Takes the lowest free bed number whose subnet nothing else on this machine uses.
fn claim_bed_id(cgroups: &cgroup::Layout) -> Result<BedLock> {
    let in_use =
        resources::ip(&["-4", "-o", "addr", "show"])? + &resources::ip(&["-4", "route", "show", "table", "all"])?;
    for k in 1..=BED_ID_MAX {
        let Some(lock) = BedLock::try_take(k)? else {
            continue;
        };
        // Whatever is left of an earlier owner of k (the sweeper got it already unless
        // that owner died just now).
        resources::remove_bed(&lock, cgroups)?;
        if in_use.contains(&format!("10.77.{k}.")) {
            continue;
        }
        return Ok(lock);
    }
    bail!("all {BED_ID_MAX} test bed numbers are in use")
}

fn host_addr(k: u8, index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, k, HOST_ADDR_BASE + u8::try_from(index).expect("fewer than 100 hosts"))
}

/// Lays out a host's root in `host_dir/root`: an overlay of the host's own upper layer
/// on `layers` (uppermost first) on the shared rootfs, or, when overlayfs is unavailable
/// or `BLIXARD_TESTBED_ROOTFS_MODE=copy`, a full copy of them. Returns the directory
/// holding what belongs to this host alone (the upper layer, or the whole copy).
fn lay_out_root(host_dir: &Path, rootfs: &Path, layers: &[PathBuf]) -> Result<PathBuf> {
    let root = host_dir.join("root");
    let upper = host_dir.join("upper");
    let work = host_dir.join("work");
    for dir in [&root, &upper, &work] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if std::env::var(ROOTFS_MODE_ENV).as_deref() != Ok("copy") {
        let lower: Vec<String> =
            layers.iter().chain([&rootfs.to_path_buf()]).map(|p| p.display().to_string()).collect();
        let options = format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), upper.display(), work.display());
        match mount_overlay(&root, &options) {
            Ok(()) => return Ok(upper),
            Err(e) => {
                eprintln!("testbed: mounting an overlay failed ({e}); copying the rootfs instead")
            }
        }
    }
    // Lowest first, so that upper layers win.
    for source in std::iter::once(rootfs).chain(layers.iter().rev().map(PathBuf::as_path)) {
        let mut copy = Command::new("cp");
        copy.args(["-a", "--reflink=auto"]).arg(source.join(".")).arg(&root);
        cmd::stdout_within(&mut copy, COPY_TIMEOUT)?;
    }
    Ok(root)
}

fn mount_overlay(target: &Path, options: &str) -> std::io::Result<()> {
    use std::ffi::CString;
    let source = CString::new("overlay").expect("no NUL");
    let target = CString::new(target.as_os_str().as_encoded_bytes()).expect("no NUL in paths");
    let options = CString::new(options).expect("no NUL in paths");
    // SAFETY: valid C strings; overlay takes its options as a string.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), source.as_ptr(), 0, options.as_ptr().cast()) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Per-host files: hostname, a machine id of its own (kept across power cycles like a
/// real host's), every host's name in /etc/hosts, and host0's static address.
fn write_identity(host: &Host, all: &[(String, Ipv4Addr)]) -> Result<()> {
    host.write_file("/etc/hostname", format!("{}\n", host.name), 0o644)?;
    host.write_file("/etc/machine-id", format!("{}\n", random_hex(16)?), 0o444)?;
    let mut hosts = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for (name, addr) in all {
        let _ = writeln!(hosts, "{addr}\t{name}");
    }
    host.write_file("/etc/hosts", hosts, 0o644)?;
    // ConfigureWithoutCarrier (which implies IgnoreCarrierLoss): cut_link is a fault in
    // the network, not a reconfiguration of the host.
    let network = format!(
        "[Match]\nName=host0\n\n[Link]\nRequiredForOnline=no\n\n[Network]\nAddress={}/{}\n\
         LinkLocalAddressing=no\nIPv6AcceptRA=no\nConfigureWithoutCarrier=yes\n",
        host.addr, host.prefix_len
    );
    host.write_file("/etc/systemd/network/10-host0.network", network, 0o644)
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

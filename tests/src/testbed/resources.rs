//! Names, locks and the on-disk, network and mount resources of a test bed, and the
//! sweeper that removes those of runs that crashed.
//!
//! A bed is identified by a small number `k` (1..=[`BED_ID_MAX`]): its bridge is
//! `bxtb<k>` with 10.77.<k>.1/24, its hosts are machines `bxtb<k>h<i>` (whose host-side
//! veth nspawn names `vb-bxtb<k>h<i>`, within the kernel's 15-byte limit), its files live
//! in `<work dir>/bxtb<k>/` and its cgroups in `blixard-testbed/bxtb<k>/`.
//!
//! Ownership of `k` is an exclusive `flock` on `<work dir>/locks/bxtb<k>.lock`, held for
//! the bed's lifetime. The kernel drops it when the owner dies however it dies, so
//! "the lock can be taken" is exactly "nobody owns these resources": that is what makes
//! sweeping safe while other test processes (or other tests in this process: flock locks
//! belong to open file descriptions) run beds of their own.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::cgroup::Layout;
use super::cmd::{self, tool};

/// Prefix of every name a bed gives a kernel or file-system object.
pub const PREFIX: &str = "bxtb";
/// Largest bed number: the third octet of 10.77.<k>.0/24, and at most three digits so
/// that `vb-bxtb<k>h<i>` fits in an interface name.
pub const BED_ID_MAX: u8 = 250;
/// Hosts per bed: keeps `h<i>` to two digits and the address 10 + i below the broadcast.
pub const HOSTS_MAX: usize = 99;

const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where beds keep their files: upper layers, logs, locks.
pub fn work_dir() -> PathBuf {
    std::env::var_os("BLIXARD_TESTBED_WORKDIR").map_or_else(|| "/var/tmp/blixard-testbed".into(), PathBuf::from)
}

pub fn bed_name(k: u8) -> String {
    format!("{PREFIX}{k}")
}

pub fn machine_name(k: u8, index: usize) -> String {
    format!("{PREFIX}{k}h{index}")
}

/// The host-side end of a host's veth pair, as nspawn's `--network-bridge` names it.
pub fn veth_name(machine: &str) -> String {
    let name = format!("vb-{machine}");
    assert!(name.len() <= 15, "{name} is too long for an interface name; nspawn would hash it");
    name
}

fn parse_bed_name(name: &str) -> Option<u8> {
    name.strip_prefix(PREFIX)?.parse().ok().filter(|k| (1..=BED_ID_MAX).contains(k))
}

/// An exclusive hold on bed number `k`, released when dropped or when the process dies.
pub struct BedLock {
    pub k: u8,
    _file: File,
}

impl BedLock {
    /// Takes the lock on `k` if nobody holds it.
    pub fn try_take(k: u8) -> Result<Option<BedLock>> {
        let dir = work_dir().join("locks");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(format!("{}.lock", bed_name(k)));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == ErrorKind::WouldBlock {
                return Ok(None);
            }
            bail!("locking {}: {error}", path.display());
        }
        Ok(Some(BedLock { k, _file: file }))
    }
}

/// Removes every resource of bed `k`. The caller holds its lock.
pub fn remove_bed(lock: &BedLock, cgroups: &Layout) -> Result<()> {
    let name = bed_name(lock.k);
    let mut errors = Vec::new();
    // Processes first: nothing may still use the mounts, links and files removed below.
    if let Err(e) = cgroups.group(&name).destroy() {
        errors.push(format!("{e:#}"));
    }
    for link in links_with_prefix(&format!("vb-{name}h")) {
        if let Err(e) = delete_link(&link) {
            errors.push(format!("{e:#}"));
        }
    }
    if let Err(e) = delete_link(&name) {
        errors.push(format!("{e:#}"));
    }
    if let Err(e) = remove_tree(&work_dir().join(&name)) {
        errors.push(format!("{e:#}"));
    }
    if errors.is_empty() { Ok(()) } else { bail!("cleaning up bed {name}: {}", errors.join("; ")) }
}

/// Removes the resources of beds whose owner is gone (a run that crashed, was killed, or
/// lost power). Returns the names of the beds it removed.
pub fn sweep_stale(cgroups: &Layout) -> Result<Vec<String>> {
    let mut candidates: Vec<u8> = Vec::new();
    candidates.extend(links_with_prefix(PREFIX).iter().filter_map(|n| parse_bed_name(n)));
    candidates.extend(cgroups.top_entries().iter().filter_map(|n| parse_bed_name(n)));
    if let Ok(entries) = fs::read_dir(work_dir()) {
        candidates.extend(entries.flatten().filter_map(|e| parse_bed_name(&e.file_name().to_string_lossy())));
    }
    candidates.sort_unstable();
    candidates.dedup();
    let mut swept = Vec::new();
    for k in candidates {
        if let Some(lock) = BedLock::try_take(k)? {
            remove_bed(&lock, cgroups)?;
            swept.push(bed_name(k));
        }
    }
    Ok(swept)
}

/// Network interfaces whose name starts with `prefix`.
pub fn links_with_prefix(prefix: &str) -> Vec<String> {
    let Ok(entries) = fs::read_dir("/sys/class/net") else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

pub fn ip(args: &[&str]) -> Result<String> {
    cmd::stdout_within(Command::new(tool("ip")?).args(args), IP_TIMEOUT)
}

fn delete_link(name: &str) -> Result<()> {
    if !link_exists(name) {
        return Ok(());
    }
    // The link can vanish on its own between the check and the delete (a veth goes
    // with its container's network namespace).
    match ip(&["link", "del", name]) {
        Err(_) if !link_exists(name) => Ok(()),
        other => other.map(drop),
    }
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut mounts: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    mounts.dedup();
    mounts
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mount_path(escaped: &str) -> String {
    let bytes = escaped.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let octal = std::str::from_utf8(&bytes[i + 1..i + 4]).expect("ascii digits");
            out.push(u8::from_str_radix(octal, 8).expect("octal digits"));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn unmount(path: &Path) -> Result<()> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).context("path has a NUL")?;
    // Lazy: the mount leaves the namespace now even if a dying process still holds it.
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } != 0 {
        let error = std::io::Error::last_os_error();
        bail!("unmounting {}: {error}", path.display());
    }
    Ok(())
}

/// Unmounts everything at or below `dir`, then deletes it. Refuses to delete while
/// anything is still mounted there: `remove_dir_all` through a live mount of the cached
/// rootfs would destroy it.
pub fn remove_tree(dir: &Path) -> Result<()> {
    for mount in mounts_below(dir) {
        unmount(&mount)?;
    }
    let left = mounts_below(dir);
    if !left.is_empty() {
        bail!("not deleting {}: still mounted below it: {left:?}", dir.display());
    }
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("deleting {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_the_kernel_limit_at_the_largest_ids() {
        let machine = machine_name(BED_ID_MAX, HOSTS_MAX);
        assert_eq!(veth_name(&machine), "vb-bxtb250h99");
        assert!(bed_name(BED_ID_MAX).len() <= 15);
    }

    #[test]
    fn only_our_names_parse_as_beds() {
        assert_eq!(parse_bed_name("bxtb7"), Some(7));
        assert_eq!(parse_bed_name("bxtb0"), None);
        assert_eq!(parse_bed_name("bxtb251"), None);
        assert_eq!(parse_bed_name("bxtb7h0"), None);
        assert_eq!(parse_bed_name("docker0"), None);
    }

    #[test]
    fn mount_paths_are_unescaped() {
        assert_eq!(unescape_mount_path(r"/a\040b/c\134d"), r"/a b/c\d");
        assert_eq!(unescape_mount_path(r"/plain/\04"), r"/plain/\04");
    }
}

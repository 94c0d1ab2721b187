//! Support code for Blixard's system tests.
//!
//! - [`Testbed`]: a cluster of real hosts on one machine (systemd-nspawn containers with
//!   real systemd and a system bus, on a private bridge) that tests can partition, power
//!   off and boot again. Needs root and `tests/testbed/prepare.sh` run once.
//! - [`guest`]: fake microvm.nix guests for those hosts.
//! - [`wait_for`] / [`wait_until`]: waiting on conditions with deadlines.
//! - [`agent_binary`]: the `blixard-agent` binary to install into hosts.

pub mod guest;
pub mod testbed;
pub mod wait;

use std::path::PathBuf;

use anyhow::{Result, bail};

pub use testbed::{Host, Testbed};
pub use wait::{Probe, wait_for, wait_until};

/// The `blixard-agent` binary to put into hosts: `$BLIXARD_AGENT_BIN`, else the one in
/// the target directory this test binary was built into (build it first with
/// `cargo build -p blixard-agent`, in the same profile). It runs inside the hosts as is:
/// their rootfs is the same Debian release as the build host, so its glibc and libgcc_s
/// match.
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("BLIXARD_AGENT_BIN") {
        return Ok(path.into());
    }
    // A test binary is <target>/<profile>/deps/<name>-<hash>.
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(|deps| deps.parent());
    match profile_dir.map(|d| d.join("blixard-agent")) {
        Some(path) if path.is_file() => Ok(path),
        Some(path) => bail!(
            "{} does not exist: run `cargo build -p blixard-agent` (same profile) first, or set BLIXARD_AGENT_BIN",
            path.display()
        ),
        None => bail!("cannot find the target directory from {}", exe.display()),
    }
}

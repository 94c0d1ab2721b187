//! Support code for Blixard's system tests.
//!
//! - [`Testbed`]: a cluster of real hosts on one machine (systemd-nspawn containers with
//!   real systemd and a system bus, on a private bridge) that tests can partition, power
//!   off and boot again. Needs root and `tests/testbed/prepare.sh` run once.
//! - [`etcd`]: a 3-member etcd cluster on loopback, for the load client's comparison.
//! - [`guest`]: fake microvm.nix guests for those hosts.
//! - [`wait_for`] / [`wait_until`]: waiting on conditions with deadlines.
//! - [`agent_binary`]: the `blixard-agent` binary to install into hosts.
//! - [`bedcluster`]: agents with the systemd runtime on a test bed, and
//!   [`timeline`]: which host ran which guest when.

pub mod bedcluster;
pub mod cluster;
pub mod etcd;
pub mod guest;
pub mod soak;
pub mod testbed;
pub mod timeline;
pub mod wait;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

pub use testbed::{Host, Testbed};
pub use wait::{Probe, wait_for, wait_until};

/// The `blixard-agent` binary to put into hosts: `$BLIXARD_AGENT_BIN` if set, else the
/// workspace's agent, built by `cargo build -p blixard-agent` into the target directory
/// and profile this test binary was built with (a no-op when it is up to date, so tests
/// never run a stale agent). Built once per test process.
///
/// It runs inside the hosts as is: their rootfs is the same Debian release as the build
/// host, so its glibc and libgcc_s match.
pub fn agent_binary() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if let Some(path) = std::env::var_os("BLIXARD_AGENT_BIN") {
        return Ok(path.into());
    }
    BUILT.get_or_init(|| build_agent().map_err(|e| format!("{e:#}"))).clone().map_err(anyhow::Error::msg)
}

/// `cargo`, for a test to build with, without the per-crate variables cargo set for the
/// test binary itself: CARGO_PKG_*, CARGO_MANIFEST_*, OUT_DIR (this crate has a build
/// script) and friends. A build script that tracks one (ring's tracks all of those)
/// would see it differ from the suite's own build, and the test would rebuild half the
/// dependency tree (ring, rustls, tonic, the agent: 35 s in the dev profile), and a plain
/// `cargo build` after it the same again.
pub fn cargo_command() -> Command {
    let mut cargo = Command::new(env!("CARGO"));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let per_crate = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_", "CARGO_PRIMARY_PACKAGE"];
        if per_crate.iter().any(|p| key.starts_with(p)) || key == "CARGO_TARGET_TMPDIR" || key == "OUT_DIR" {
            cargo.env_remove(key.as_ref());
        }
    }
    cargo
}

fn build_agent() -> Result<PathBuf> {
    // A test binary is <target dir>/<profile dir>/deps/<name>-<hash>.
    let exe = std::env::current_exe()?;
    let Some(profile_dir) = exe.parent().and_then(Path::parent) else {
        bail!("cannot find the target directory from {}", exe.display());
    };
    let Some(target_dir) = profile_dir.parent() else {
        bail!("cannot find the target directory from {}", exe.display());
    };
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(name) => name,
        None => bail!("no profile directory in {}", exe.display()),
    };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace");
    let status = cargo_command()
        .args(["build", "--quiet", "-p", "blixard-agent", "--bin", "blixard-agent", "--profile", profile])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace)
        .status()
        .context("running cargo build -p blixard-agent")?;
    if !status.success() {
        bail!("cargo build -p blixard-agent failed ({status})");
    }
    let binary = profile_dir.join("blixard-agent");
    if !binary.is_file() {
        bail!("cargo built the agent but {} is missing", binary.display());
    }
    Ok(binary)
}

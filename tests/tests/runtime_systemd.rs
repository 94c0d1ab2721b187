//! The agent's systemd runtime against real systemd: builds the agent's
//! `systemd_runtime` test binary, copies it into a test-bed host and runs its
//! `#[ignore]`d tests there, against the host's own systemd over its system bus
//! (`/run/dbus/system_bus_socket`), with microvm.nix's `microvm@.service`.
//!
//! The tests themselves live in `agent/tests/systemd_runtime.rs`, next to the code they
//! test; this is only the harness that gives them a host to change.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use blixard_systests::Testbed;

/// The whole run inside the host; it takes a few seconds (the kill test waits 2 s).
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const TEST_PATH: &str = "/usr/local/bin/blixard-systemd-runtime-test";

#[test]
fn systemd_runtime_tests_pass_inside_a_host() {
    let Some(bed) = Testbed::start_or_skip(1) else { return };
    let binary = agent_test_binary("systemd_runtime").unwrap();
    let host = bed.host(0);
    host.write_file(TEST_PATH, std::fs::read(&binary).unwrap(), 0o755).unwrap();

    let output = host
        .exec_timeout(
            &[
                "env",
                "BLIXARD_SYSTEMD_TEST_HOST=1",
                "RUST_BACKTRACE=1",
                TEST_PATH,
                "--ignored",
                "--test-threads=1",
                "--nocapture",
            ],
            RUN_TIMEOUT,
        )
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("--- inside {}:\n{stdout}{}", host.name(), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the systemd runtime tests failed inside {} ({})", host.name(), output.status);
    let passed = passed_count(&stdout).expect("a libtest summary line");
    assert!(passed >= 5, "only {passed} tests ran inside the host");
}

/// "test result: ok. 5 passed; 0 failed; ..." -> 5.
fn passed_count(stdout: &str) -> Option<usize> {
    let line = stdout.lines().find(|l| l.starts_with("test result: ok."))?;
    line.strip_prefix("test result: ok. ")?.split(' ').next()?.parse().ok()
}

/// Builds integration test `name` of blixard-agent into the target directory and profile
/// this test binary was built with (a no-op when up to date) and returns its path.
fn agent_test_binary(name: &str) -> Result<PathBuf> {
    // A test binary is <target dir>/<profile dir>/deps/<name>-<hash>.
    let exe = std::env::current_exe()?;
    let profile_dir = exe.parent().and_then(Path::parent).context("no profile directory")?;
    let target_dir = profile_dir.parent().context("no target directory")?;
    let mut cargo = blixard_systests::cargo_command();
    cargo
        .args(["test", "--no-run", "--message-format=json", "--workspace", "--test", name])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the workspace"));
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => {}
        Some(profile) => {
            cargo.args(["--profile", profile]);
        }
        None => bail!("no profile in {}", exe.display()),
    }
    let output = cargo.output().context("running cargo test --no-run")?;
    if !output.status.success() {
        bail!("building the agent's {name} tests failed:\n{}", String::from_utf8_lossy(&output.stderr));
    }
    // One JSON object per line; ours is the test artifact named `name`.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let artifact = stdout
        .lines()
        .find(|l| l.contains(&format!("\"name\":\"{name}\"")) && l.contains("\"executable\":\""))
        .with_context(|| format!("cargo reported no executable for test {name}"))?;
    let start = artifact.find("\"executable\":\"").expect("checked above") + "\"executable\":\"".len();
    let end = start + artifact[start..].find('"').context("unterminated executable path")?;
    Ok(PathBuf::from(&artifact[start..end]))
}

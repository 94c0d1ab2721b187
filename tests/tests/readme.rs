//! The README's "A cluster by hand" walk-through, run as it is written: the
//! shell block is taken out of README.md and run by bash. Only what it
//! builds is supplied: `cargo build --release -p blixard-agent` finds a
//! `cargo` on PATH that puts the agent this test suite uses at
//! `target/release/blixard-agent` in the block's working directory (a
//! release build here would take minutes and build what CI just built).
//! After the block, the test stops the agents it started and checks what
//! the block printed.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use blixard_systests::agent_binary;

/// The first ```sh block after `heading` in `markdown`.
fn shell_block<'a>(markdown: &'a str, heading: &str) -> &'a str {
    let section = &markdown[markdown.find(heading).unwrap_or_else(|| panic!("README has no {heading:?}"))..];
    let start = section.find("```sh\n").expect("the section has a ```sh block") + "```sh\n".len();
    let end = section[start..].find("```").expect("the block ends");
    &section[start..start + end]
}

#[test]
fn the_readme_cluster_by_hand_walk_through_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let block = shell_block(&readme, "## A cluster by hand");
    let work = tempfile::tempdir().unwrap();
    let bin = agent_binary().expect("the agent binary");
    // The `cargo` the block's first line finds.
    let tools = work.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let cargo = tools.join("cargo");
    std::fs::write(
        &cargo,
        format!(
            "#!/bin/sh\n[ \"$*\" = \"build --release -p blixard-agent\" ] || {{ echo \"unexpected: cargo $*\" >&2; exit 1; }}\n\
             mkdir -p target/release && ln -sf {} target/release/blixard-agent\n",
            bin.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&cargo, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The block, then: stop what it started (the process runtime stops the
    // guests with their agents) and remove its directory.
    let script = format!(
        "set -eu\ntrap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf \"${{dir:-/nonexistent}}\"' EXIT\n{block}"
    );
    let path = format!("{}:{}", tools.display(), std::env::var("PATH").unwrap_or_default());
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(work.path())
        .env("PATH", path)
        .env_remove("BLIXARD_ENDPOINT")
        .env_remove("COMPLETE")
        .env_remove("RUST_LOG")
        .output()
        .expect("running the README block");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the README block failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("leader: h"), "cluster status names a leader:\n{stdout}");
    assert!(stdout.contains("vm web is running on h"), "vm create --wait returns once web runs:\n{stdout}");
    let listed = stdout.lines().find(|l| l.starts_with("web ")).unwrap_or_default();
    assert!(
        listed.split_whitespace().eq([
            "web",
            listed.split_whitespace().nth(1).unwrap_or("-"),
            "running",
            "running",
            "1",
            "256",
            "MiB"
        ]),
        "vm list shows web running:\n{stdout}"
    );
}

//! The README's first command, `scripts/demo.sh`, run the way a newcomer runs
//! it (with `--exit`, so it stops its agents when done): three agents form a
//! cluster, the demo guests run, one agent stops and its guests run elsewhere.

use std::process::Command;

use blixard_systests::agent_binary;

#[test]
fn the_demo_script_fails_a_stopped_agents_guests_over() {
    let bin = agent_binary().expect("the agent binary");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/demo.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("--exit")
        .env("BLIXARD_AGENT_BIN", &bin)
        // Its own loopback address, so the demo's fixed ports meet no other test.
        .env("BLIXARD_DEMO_HOST", "127.0.99.1")
        .output()
        .expect("running scripts/demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("every guest is running again on the other agents"), "{stdout}");
    // The final node list shows the stopped agent's host down and empty.
    let last_list = stdout.rsplit("NAME   STATUS").next().unwrap_or_default();
    assert!(last_list.lines().any(|l| l.contains(" down ") && l.trim_end().ends_with(" 0")), "{stdout}");
}

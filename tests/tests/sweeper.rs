//! A run that dies without cleaning up (SIGKILL, a crash, a CI timeout) leaves running
//! containers, links, mounts and files; the next run's sweeper removes them. Its own test
//! binary, so no other test of this crate starts a bed (and sweeps) meanwhile.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use blixard_systests::Testbed;

/// Identifies one incarnation of a network interface: a later bed may reuse the name.
fn ifindex(name: &str) -> Option<String> {
    fs::read_to_string(Path::new("/sys/class/net").join(name).join("ifindex")).ok()
}

fn inode(path: &str) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Start time of a live process, to tell it from a later one with the same PID. A zombie
/// counts as dead: once the container's init is killed, its parent (nspawn) is dead too,
/// and reaping it is up to this machine's init, in its own time.
fn process_start(pid: &str) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    if matches!(fields.first(), Some(&"Z") | Some(&"X")) {
        return None;
    }
    fields.get(19).map(|s| (*s).to_owned())
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .trim_matches('\'')
}

#[test]
fn leftovers_of_a_killed_run_are_swept_and_live_beds_are_not() {
    if !Testbed::can_run() {
        return;
    }
    let live = Testbed::start(1).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_blixard-testbed"))
        .args(["up", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let bed_line = lines.next().unwrap().unwrap();
    let host_line = lines.next().unwrap().unwrap();
    assert!(lines.any(|l| l.unwrap().starts_with("ready")));
    // bed <bridge> bridge-addr=... dir=<dir>
    let bridge = bed_line.split_whitespace().nth(1).unwrap().to_owned();
    let dir = field(&bed_line, "dir=").to_owned();
    // host h0 ... shell='nsenter --target=<pid> --all ...'
    let leader = field(&host_line, "--target=").to_owned();
    let machine = field(&host_line, "machine=").to_owned();
    let veth = format!("vb-{machine}");

    let before = (ifindex(&bridge), ifindex(&veth), inode(&dir), process_start(&leader));
    assert!(before.0.is_some() && before.1.is_some() && before.2.is_some() && before.3.is_some(), "{before:?}");

    // The owner dies without a chance to clean up: everything it made stays.
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(ifindex(&bridge), before.0, "the bed is still there before the sweep");
    assert_eq!(process_start(&leader), before.3, "its containers still run before the sweep");

    Testbed::sweep().unwrap();
    assert!(process_start(&leader).is_none() || process_start(&leader) != before.3, "container init survived");
    assert!(ifindex(&bridge).is_none() || ifindex(&bridge) != before.0, "bridge {bridge} survived");
    assert!(ifindex(&veth).is_none() || ifindex(&veth) != before.1, "veth {veth} survived");
    assert!(inode(&dir).is_none() || inode(&dir) != before.2, "{dir} survived");
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&format!("{dir}/")), "mounts below {dir} survived");

    // The live bed, whose owner (this process) holds its lock, was left alone.
    assert!(live.host(0).exec(&["true"]).unwrap().status.success());
}

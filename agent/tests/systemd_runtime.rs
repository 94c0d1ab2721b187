//! The systemd runtime against a real systemd: start, stop, state, list, events,
//! kill after the stop timeout, and re-adoption by a new runtime.
//!
//! These tests change the system they run on (they install fake guests under
//! /var/lib/microvms and start `microvm@` units), so they are `#[ignore]`d and refuse to
//! run unless `BLIXARD_SYSTEMD_TEST_HOST=1`. They are meant to run inside a host of the
//! container test bed (real systemd, a system bus, microvm.nix's `microvm@.service`
//! template), where the system test copies this binary and runs it with
//! `--ignored --test-threads=1`; see blixard-systests.
//!
//! Every wait is for a condition, with a deadline; nothing sleeps for a fixed time.

use std::fs;
use std::os::unix::fs::{PermissionsExt, lchown, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use blixard::config::DEFAULT_STATE_DIR as STATE_DIR_DEFAULT;
use blixard::runtime::systemd::{SystemdConfig, SystemdRuntime};
use blixard::runtime::{GuestEvent, GuestState, Phase, Runtime, RuntimeError, Stopped};
use tokio::sync::broadcast;

const HOST_ENV: &str = "BLIXARD_SYSTEMD_TEST_HOST";
/// Where the fake runners live, like store paths (`current` links here).
const STORE: &str = "/var/lib/blixard-systemd-test";
/// Bound on what takes well under a second on an idle host.
const SETTLE: Duration = Duration::from_secs(30);

/// Logs each start, writes its pid (kept by exec) and runs until stopped.
const SLEEPER: &str = "echo \"start $$\" >> runner.log\necho $$ > pid\nexec sleep 100000\n";
/// Runs for a second (past its start job), then exits with status 3.
const CRASHER: &str = "echo \"start $$\" >> runner.log\nsleep 1\nexit 3\n";
/// Ignores SIGTERM (its sleeps die of it, the loop goes on); only SIGKILL ends it.
const STUBBORN: &str = "trap '' TERM\necho $$ > pid\nwhile :; do sleep 0.05; done\n";

fn on_test_host() {
    assert_eq!(
        std::env::var(HOST_ENV).as_deref(),
        Ok("1"),
        "these tests start units on the system they run on: run them inside a test-bed host \
         with {HOST_ENV}=1 (the blixard-systests system test does)"
    );
}

/// Installs fake guest `name` as microvm.nix lays one out: `<state dir>/<name>` owned
/// by microvm:kvm, `current` a link to a directory holding `bin/microvm-run` and
/// `bin/microvm-shutdown`.
fn install(name: &str, runner: &str) -> PathBuf {
    let store = Path::new(STORE).join(name);
    let bin = store.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for dir in [Path::new(STORE), &store, &bin] {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let write = |file: &str, script: &str| {
        let path = bin.join(file);
        fs::write(&path, format!("#!/bin/sh\n{script}")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    };
    write("microvm-run", runner);
    write("microvm-shutdown", "echo shutdown >> runner.log\n");

    let dir = Path::new(STATE_DIR_DEFAULT).join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let current = dir.join("current");
    symlink(&store, &current).unwrap();
    let (uid, gid) = (id_of("/etc/passwd", "microvm"), id_of("/etc/group", "kvm"));
    for path in [&dir, &current] {
        lchown(path, Some(uid), Some(gid)).unwrap();
    }
    dir
}

fn id_of(file: &str, name: &str) -> u32 {
    let text = fs::read_to_string(file).unwrap();
    let line = text
        .lines()
        .find(|l| l.split(':').next() == Some(name))
        .unwrap_or_else(|| panic!("{name} is not in {file}: is this a test-bed host?"));
    line.split(':').nth(2).unwrap().parse().unwrap()
}

fn config() -> SystemdConfig {
    SystemdConfig::new(STATE_DIR_DEFAULT)
}

async fn connect(config: SystemdConfig) -> SystemdRuntime {
    SystemdRuntime::connect(config).await.expect("connecting to systemd on the system bus")
}

/// The next event about `vm` in `phase`, skipping others.
async fn event(rx: &mut broadcast::Receiver<GuestEvent>, vm: &str, phase: Phase) -> GuestState {
    loop {
        let state = next_event(rx, vm).await;
        if state.phase == phase {
            return state;
        }
    }
}

/// The next event about `vm`.
async fn next_event(rx: &mut broadcast::Receiver<GuestEvent>, vm: &str) -> GuestState {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let event = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no event for {vm} within {SETTLE:?}"))
            .expect("the event stream stays open");
        eprintln!("event: {} {}", event.vm, event.state);
        if event.vm == vm {
            return event.state;
        }
    }
}

/// Polls `state(vm)` until `done` holds; never sleeps longer than needed.
async fn wait_state(rt: &SystemdRuntime, vm: &str, done: impl Fn(&GuestState) -> bool) -> GuestState {
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut pause = Duration::from_millis(5);
    loop {
        let state = rt.state(vm).await.unwrap();
        if done(&state) {
            return state;
        }
        assert!(tokio::time::Instant::now() < deadline, "{vm} still {state} after {SETTLE:?}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

async fn read_pid(dir: &Path) -> i32 {
    let path = dir.join("pid");
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        if let Ok(text) = fs::read_to_string(&path)
            && text.ends_with('\n')
        {
            return text.trim().parse().unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "{} never written", path.display());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

fn runner_log(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("runner.log")).unwrap_or_default().lines().map(str::to_owned).collect()
}

#[tokio::test]
#[ignore = "needs a test-bed host (real systemd); run by blixard-systests"]
async fn start_stop_state_list_and_events() {
    on_test_host();
    let dir = install("rt-basic", SLEEPER);
    let rt = connect(config()).await;
    let mut events = rt.events();
    assert!(!rt.state("rt-basic").await.unwrap().is_up());

    rt.start("rt-basic").await.unwrap();
    event(&mut events, "rt-basic", Phase::Active).await;
    let state = rt.state("rt-basic").await.unwrap();
    assert_eq!(state, GuestState::new(Phase::Active, "running"));
    let pid = read_pid(&dir).await;
    assert!(alive(pid));
    let listed = rt.list().await.unwrap();
    assert!(listed.contains(&("rt-basic".to_owned(), state)), "{listed:?}");
    // Idempotent: a second start leaves the running guest alone.
    rt.start("rt-basic").await.unwrap();
    assert_eq!(read_pid(&dir).await, pid);

    assert_eq!(rt.stop("rt-basic").await.unwrap(), Stopped::Gracefully);
    event(&mut events, "rt-basic", Phase::Inactive).await;
    assert_eq!(rt.state("rt-basic").await.unwrap().phase, Phase::Inactive);
    assert!(!alive(pid));
    // microvm.nix's ExecStop (microvm-shutdown) ran, and Restart=always did not bring
    // the guest back: one start, one shutdown.
    assert_eq!(runner_log(&dir).iter().filter(|l| l.starts_with("start")).count(), 1);
    assert_eq!(runner_log(&dir).last().map(String::as_str), Some("shutdown"));
    assert_eq!(rt.stop("rt-basic").await.unwrap(), Stopped::Gracefully, "stopping twice is fine");
}

#[tokio::test]
#[ignore = "needs a test-bed host (real systemd); run by blixard-systests"]
async fn a_crash_is_reported_failed_and_stop_cancels_the_restart() {
    on_test_host();
    let dir = install("rt-crash", CRASHER);
    let rt = connect(config()).await;
    let mut events = rt.events();

    rt.start("rt-crash").await.unwrap();
    let failed = event(&mut events, "rt-crash", Phase::Failed).await;
    assert!(failed.detail.as_deref().unwrap().contains("exited with status 3"), "{failed}");
    // systemd (252) shows the unit `failed` for a moment, then waiting to restart it
    // (`activating`/`auto-restart`): both are the one failure, phase Failed throughout.
    let mut restarting = failed;
    while !restarting.detail.as_deref().unwrap().contains("systemd will restart it") {
        restarting = next_event(&mut events, "rt-crash").await;
        assert_eq!(restarting.phase, Phase::Failed, "{restarting}");
    }
    assert!(restarting.detail.unwrap().contains("exited with status 3"));
    assert_eq!(rt.state("rt-crash").await.unwrap().phase, Phase::Failed);
    let listed = rt.list().await.unwrap();
    let (_, listed_state) = listed.iter().find(|(vm, _)| vm == "rt-crash").expect("listed");
    assert_eq!(listed_state.phase, Phase::Failed);
    assert!(listed_state.detail.as_deref().unwrap().contains("status 3"), "{listed_state}");

    // systemd restarts it by itself after RestartSec (5 s): seen as events too.
    event(&mut events, "rt-crash", Phase::Active).await;
    // Active as soon as systemd has forked it: the runner logs its start a
    // moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let starts = |dir: &std::path::Path| runner_log(dir).iter().filter(|l| l.starts_with("start")).count();
    while starts(&dir) < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(starts(&dir), 2, "{:?}", runner_log(&dir));
    event(&mut events, "rt-crash", Phase::Failed).await;

    // Stopping ends the auto-restart: the unit is inactive, not waiting to restart.
    rt.stop("rt-crash").await.unwrap();
    let stopped = wait_state(&rt, "rt-crash", |s| s.phase != Phase::Failed).await;
    assert_eq!(stopped, GuestState::inactive());
}

#[tokio::test]
#[ignore = "needs a test-bed host (real systemd); run by blixard-systests"]
async fn a_guest_that_will_not_stop_is_killed_after_the_stop_timeout() {
    on_test_host();
    let dir = install("rt-stubborn", STUBBORN);
    let rt = connect(SystemdConfig { stop_timeout: Duration::from_secs(2), ..config() }).await;
    let mut events = rt.events();
    rt.start("rt-stubborn").await.unwrap();
    event(&mut events, "rt-stubborn", Phase::Active).await;
    let pid = read_pid(&dir).await;

    let started = std::time::Instant::now();
    assert_eq!(rt.stop("rt-stubborn").await.unwrap(), Stopped::Killed);
    let took = started.elapsed();
    // Killed by us after 2 s, not by systemd's own 150 s stop timeout.
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(20), "{took:?}");
    assert!(!alive(pid));
    let state = rt.state("rt-stubborn").await.unwrap();
    assert!(!state.is_up(), "{state}");
    eprintln!("after the kill: {state}");
    // And it stays down: Restart=always does not apply to a stopped unit.
    assert!(!wait_state(&rt, "rt-stubborn", |s| !s.is_up()).await.is_up());
}

#[tokio::test]
#[ignore = "needs a test-bed host (real systemd); run by blixard-systests"]
async fn a_new_runtime_adopts_running_guests_without_restarting_them() {
    on_test_host();
    let dir = install("rt-adopt", SLEEPER);
    let first = connect(config()).await;
    first.start("rt-adopt").await.unwrap();
    let pid = read_pid(&dir).await;
    drop(first); // the agent goes away (a restart, an upgrade)

    let second = connect(config()).await;
    let mut events = second.events();
    let listed = second.list().await.unwrap();
    let (_, state) = listed.iter().find(|(vm, _)| vm == "rt-adopt").expect("the running guest is listed");
    assert_eq!(state.phase, Phase::Active);
    assert!(alive(pid));
    assert_eq!(read_pid(&dir).await, pid, "not restarted");
    assert_eq!(runner_log(&dir).len(), 1, "started once: {:?}", runner_log(&dir));

    // The new runtime drives and watches the adopted guest like any other.
    assert_eq!(second.stop("rt-adopt").await.unwrap(), Stopped::Gracefully);
    event(&mut events, "rt-adopt", Phase::Inactive).await;
    assert!(!alive(pid));
}

#[tokio::test]
#[ignore = "needs a test-bed host (real systemd); run by blixard-systests"]
async fn installed_guests_and_clear_errors() {
    on_test_host();
    install("rt-installed", SLEEPER);
    let bad = Path::new(STATE_DIR_DEFAULT).join("Not_A_Name/current/bin");
    fs::create_dir_all(&bad).unwrap();
    fs::write(bad.join("microvm-run"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(bad.join("microvm-run"), fs::Permissions::from_mode(0o755)).unwrap();

    let rt = connect(config()).await;
    let installed = rt.installed().await.unwrap();
    assert!(installed.contains("rt-installed"), "{installed:?}");
    assert!(!installed.contains("Not_A_Name"));

    let err = rt.start("rt-absent").await.unwrap_err();
    assert!(matches!(err, RuntimeError::NotInstalled { .. }), "{err}");
    for bad in ["../x", "Not_A_Name", "a.service"] {
        assert!(matches!(rt.start(bad).await, Err(RuntimeError::InvalidName(_))), "{bad}");
        assert!(matches!(rt.stop(bad).await, Err(RuntimeError::InvalidName(_))), "{bad}");
    }
    // A guest systemd has never loaded is simply inactive.
    assert_eq!(rt.state("rt-never-seen").await.unwrap(), GuestState::inactive());
    fs::remove_dir_all(Path::new(STATE_DIR_DEFAULT).join("Not_A_Name")).unwrap();
}

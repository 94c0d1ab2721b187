//! The process runtime, for real: fake guests (shell scripts standing in for
//! microvm-run) in a temporary state dir, run as children of this test process.
//!
//! Nothing here sleeps for a fixed time: every wait is for a condition, with a deadline.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blixard::runtime::process::{ProcessConfig, ProcessRuntime};
use blixard::runtime::{GuestEvent, GuestState, Phase, Runtime, RuntimeError, Stopped};
use tokio::sync::broadcast;

/// Bound on anything that takes milliseconds on an idle machine.
const SETTLE: Duration = Duration::from_secs(20);

/// Runs until stopped; writes its pid (which `exec` keeps) for the test to watch.
const SLEEPER: &str = "echo $$ > pid\nexec sleep 1000\n";
/// Exits at once with status 3, saying why on stderr.
const CRASHER: &str = "echo 'guest: cannot open /dev/kvm' >&2\nexit 3\n";
/// Ignores SIGTERM: only SIGKILL stops it.
const STUBBORN: &str = "trap '' TERM\necho $$ > pid\nwhile :; do sleep 0.05; done\n";

fn install(state_dir: &Path, name: &str, script: &str, mode: u32) -> PathBuf {
    let bin = state_dir.join(name).join("current").join("bin");
    fs::create_dir_all(&bin).unwrap();
    let runner = bin.join("microvm-run");
    fs::write(&runner, format!("#!/bin/sh\n{script}")).unwrap();
    fs::set_permissions(&runner, fs::Permissions::from_mode(mode)).unwrap();
    runner
}

fn runtime(state_dir: &Path, stop_timeout: Duration) -> ProcessRuntime {
    runtime_via(state_dir, stop_timeout, Via::Fork)
}

/// How the runtime under test spawns its children (see `runtime::process`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Forked, PDEATHSIG set in `pre_exec`.
    Fork,
    /// Through the agent's binary, as `blixard-agent run` does.
    Trampoline,
}

fn runtime_via(state_dir: &Path, stop_timeout: Duration, via: Via) -> ProcessRuntime {
    let trampoline = (via == Via::Trampoline).then(|| PathBuf::from(env!("CARGO_BIN_EXE_blixard-agent")));
    ProcessRuntime::new(ProcessConfig { state_dir: state_dir.to_owned(), stop_timeout, trampoline }).unwrap()
}

/// A test run both ways: `$name` forks, `$name` with `_through_the_trampoline` does not.
macro_rules! both_ways {
    ($fork:ident, $trampoline:ident, $body:ident) => {
        #[tokio::test]
        async fn $fork() {
            $body(Via::Fork).await
        }

        #[tokio::test]
        async fn $trampoline() {
            $body(Via::Trampoline).await
        }
    };
}

/// Waits for the next event about `vm` in `phase`, skipping others; returns it.
async fn event(rx: &mut broadcast::Receiver<GuestEvent>, vm: &str, phase: Phase) -> GuestState {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let event = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {phase} event for {vm} within {SETTLE:?}"))
            .expect("the event stream stays open");
        if event.vm == vm && event.state.phase == phase {
            return event.state;
        }
    }
}

/// Polls `condition` until it holds, failing after `SETTLE`. Async, so that the
/// runtime's tasks (a supervisor reaping its child) go on while we wait.
async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut pause = Duration::from_millis(2);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {SETTLE:?} waiting for {what}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

async fn read_pid(state_dir: &Path, vm: &str) -> i32 {
    let path = state_dir.join(vm).join("pid");
    wait_until(&format!("{} to be written", path.display()), || {
        fs::read_to_string(&path).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    fs::read_to_string(&path).unwrap().trim().parse().unwrap()
}

/// Whether `pid` is a live process (a zombie waiting for its reaper is dead).
fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

both_ways!(
    start_then_stop_reports_active_then_inactive,
    start_then_stop_through_the_trampoline,
    start_then_stop_reports_active_then_inactive_via
);

async fn start_then_stop_reports_active_then_inactive_via(via: Via) {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "web", SLEEPER, 0o755);
    let rt = runtime_via(dir.path(), SETTLE, via);
    let mut events = rt.events();
    assert_eq!(rt.state("web").await.unwrap(), GuestState::inactive());

    rt.start("web").await.unwrap();
    event(&mut events, "web", Phase::Active).await;
    assert_eq!(rt.state("web").await.unwrap().phase, Phase::Active);
    let pid = read_pid(dir.path(), "web").await;
    assert!(alive(pid));
    let listed = rt.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].0.as_str(), listed[0].1.phase), ("web", Phase::Active));
    // Starting a running guest changes nothing.
    rt.start("web").await.unwrap();
    assert_eq!(read_pid(dir.path(), "web").await, pid);

    assert_eq!(rt.stop("web").await.unwrap(), Stopped::Gracefully);
    event(&mut events, "web", Phase::Deactivating).await;
    let stopped = event(&mut events, "web", Phase::Inactive).await;
    assert!(stopped.detail.unwrap().contains("SIGTERM"));
    assert_eq!(rt.state("web").await.unwrap().phase, Phase::Inactive);
    wait_until("the guest process to be gone", || !alive(pid)).await;
    // Stopping a stopped guest is fine too, and it can start again.
    assert_eq!(rt.stop("web").await.unwrap(), Stopped::Gracefully);
    fs::remove_file(dir.path().join("web/pid")).unwrap();
    rt.start("web").await.unwrap();
    event(&mut events, "web", Phase::Active).await;
    assert_ne!(read_pid(dir.path(), "web").await, pid);
}

both_ways!(
    a_guest_that_exits_by_itself_is_reported_failed_with_its_status,
    a_guest_exit_status_through_the_trampoline,
    a_guest_that_exits_by_itself_is_reported_failed_with_its_status_via
);

async fn a_guest_that_exits_by_itself_is_reported_failed_with_its_status_via(via: Via) {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "crashy", CRASHER, 0o755);
    let rt = runtime_via(dir.path(), SETTLE, via);
    let mut events = rt.events();

    rt.start("crashy").await.unwrap();
    event(&mut events, "crashy", Phase::Active).await;
    let failed = event(&mut events, "crashy", Phase::Failed).await;
    let detail = failed.detail.unwrap();
    assert!(detail.contains("exited with status 3"), "{detail}");
    assert_eq!(rt.state("crashy").await.unwrap().phase, Phase::Failed);
    assert_eq!(rt.list().await.unwrap()[0].1.phase, Phase::Failed);
    // Its output went to the log beside it.
    let log = fs::read_to_string(dir.path().join("crashy/microvm-run.log")).unwrap();
    assert!(log.contains("cannot open /dev/kvm"), "{log}");
    // A failed guest can be started again (the reconciler's restart after back-off).
    rt.start("crashy").await.unwrap();
    event(&mut events, "crashy", Phase::Failed).await;
}

both_ways!(
    a_guest_that_ignores_sigterm_is_killed_after_the_stop_timeout,
    a_stubborn_guest_killed_through_the_trampoline,
    a_guest_that_ignores_sigterm_is_killed_after_the_stop_timeout_via
);

async fn a_guest_that_ignores_sigterm_is_killed_after_the_stop_timeout_via(via: Via) {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "stubborn", STUBBORN, 0o755);
    let rt = runtime_via(dir.path(), Duration::from_millis(300), via);
    let mut events = rt.events();
    rt.start("stubborn").await.unwrap();
    let pid = read_pid(dir.path(), "stubborn").await;
    // The trap is set before the pid is written, so SIGTERM is ignored from here on.

    let started = Instant::now();
    assert_eq!(rt.stop("stubborn").await.unwrap(), Stopped::Killed);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let stopped = event(&mut events, "stubborn", Phase::Inactive).await;
    assert!(stopped.detail.unwrap().contains("SIGKILL"));
    wait_until("the stubborn guest to be gone", || !alive(pid)).await;
}

/// Through the trampoline, a runner the kernel cannot run (its interpreter is
/// missing) fails as a guest that exited (127, as a shell would), saying why in its
/// log; forked, the start itself fails.
#[tokio::test]
async fn a_runner_that_cannot_be_run_fails_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let runner = install(dir.path(), "broken", SLEEPER, 0o755);
    fs::write(&runner, "#!/nonexistent/interpreter\n").unwrap();

    let rt = runtime_via(dir.path(), SETTLE, Via::Trampoline);
    let mut events = rt.events();
    rt.start("broken").await.unwrap();
    let failed = event(&mut events, "broken", Phase::Failed).await;
    assert!(failed.detail.as_deref().unwrap_or_default().contains("status 127"), "{failed:?}");
    let log = fs::read_to_string(dir.path().join("broken/microvm-run.log")).unwrap();
    assert!(log.contains("cannot run") && log.contains("microvm-run"), "{log}");

    let forked = runtime(dir.path(), SETTLE);
    assert!(matches!(forked.start("broken").await, Err(RuntimeError::StartFailed { .. })));
}

#[tokio::test]
async fn installed_lists_valid_names_with_an_executable_runner() {
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("microvms");
    let rt = runtime(&state_dir, SETTLE);
    // No state dir yet: nothing installed, no error.
    assert!(rt.installed().await.unwrap().is_empty());

    install(&state_dir, "web", SLEEPER, 0o755);
    install(&state_dir, "db-2", SLEEPER, 0o700);
    install(&state_dir, "Bad_Name", SLEEPER, 0o755);
    install(&state_dir, "-dash", SLEEPER, 0o755);
    install(&state_dir, "not-executable", SLEEPER, 0o644);
    fs::create_dir_all(state_dir.join("no-runner/current/bin")).unwrap();
    fs::create_dir_all(state_dir.join("runner-is-a-dir/current/bin/microvm-run")).unwrap();
    fs::write(state_dir.join("stray-file"), "").unwrap();
    // `current` is a symlink on a real host: followed.
    let store = dir.path().join("store/abc-runner");
    install(&store, "x", SLEEPER, 0o755);
    fs::create_dir_all(state_dir.join("linked")).unwrap();
    std::os::unix::fs::symlink(store.join("x/current"), state_dir.join("linked/current")).unwrap();

    let installed: Vec<String> = rt.installed().await.unwrap().into_iter().collect();
    assert_eq!(installed, ["db-2", "linked", "web"]);
}

#[tokio::test]
async fn names_are_checked_before_they_become_paths() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(dir.path(), SETTLE);
    for bad in ["../etc", "a/b", "", "Web", "x.service"] {
        assert!(matches!(rt.start(bad).await, Err(RuntimeError::InvalidName(_))), "start {bad:?}");
        assert!(matches!(rt.stop(bad).await, Err(RuntimeError::InvalidName(_))), "stop {bad:?}");
        assert!(matches!(rt.state(bad).await, Err(RuntimeError::InvalidName(_))), "state {bad:?}");
    }
    let err = rt.start("absent").await.unwrap_err();
    assert!(matches!(err, RuntimeError::NotInstalled { .. }), "{err}");
    assert!(err.to_string().contains("absent/current/bin/microvm-run"), "{err}");
    install(dir.path(), "noexec", SLEEPER, 0o644);
    assert!(matches!(rt.start("noexec").await, Err(RuntimeError::NotInstalled { .. })));
    assert!(rt.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn guests_die_with_their_runtime_and_a_new_one_adopts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "web", SLEEPER, 0o755);
    let first = runtime(dir.path(), SETTLE);
    first.start("web").await.unwrap();
    let pid = read_pid(dir.path(), "web").await;
    assert!(alive(pid));

    drop(first);
    wait_until("the guest to die with its runtime", || !alive(pid)).await;
    // Unlike systemd's, these guests do not outlive the agent: nothing to re-adopt.
    let second = runtime(dir.path(), SETTLE);
    assert!(second.list().await.unwrap().is_empty());
    assert_eq!(second.state("web").await.unwrap(), GuestState::inactive());
}

/// Set by `guests_die_when_the_agent_is_killed` for the helper process it spawns.
const HELPER_ENV: &str = "BLIXARD_TEST_PROCESS_HELPER_STATE_DIR";
/// Set too when the helper is to spawn through the trampoline.
const HELPER_TRAMPOLINE_ENV: &str = "BLIXARD_TEST_PROCESS_HELPER_TRAMPOLINE";

/// Not a test on its own: the helper process of the next test. It stands in for an
/// agent: it starts a guest and then waits to be killed.
#[tokio::test]
async fn helper_agent_process() {
    let Some(state_dir) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let via = if std::env::var_os(HELPER_TRAMPOLINE_ENV).is_some() { Via::Trampoline } else { Via::Fork };
    let rt = runtime_via(Path::new(&state_dir), SETTLE, via);
    rt.start("orphan").await.unwrap();
    std::future::pending::<()>().await;
}

both_ways!(
    guests_die_when_the_agent_is_killed_with_sigkill,
    guests_die_with_a_sigkilled_agent_through_the_trampoline,
    guests_die_when_the_agent_is_killed_with_sigkill_via
);

async fn guests_die_when_the_agent_is_killed_with_sigkill_via(via: Via) {
    let dir = tempfile::tempdir().unwrap();
    install(dir.path(), "orphan", SLEEPER, 0o755);
    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_agent_process", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, dir.path())
        .envs((via == Via::Trampoline).then_some((HELPER_TRAMPOLINE_ENV, "1")))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = read_pid(dir.path(), "orphan").await;
    assert!(alive(pid));
    assert_eq!(parent_of(pid), Some(helper.id() as i32), "the guest is the helper's child");

    helper.kill().unwrap(); // SIGKILL: no destructor, no cleanup code runs
    helper.wait().unwrap();
    wait_until("the guest of a SIGKILLed agent to die", || !alive(pid)).await;
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split_whitespace().nth(1)?.parse().ok()
}

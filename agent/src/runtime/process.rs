//! The process runtime (development and tests): each guest is the agent's own child,
//! `<state_dir>/<name>/current/bin/microvm-run`, run in the guest's directory (as
//! microvm.nix's unit does) with its output appended to `<state_dir>/<name>/microvm-run.log`.
//!
//! Guests die with the agent, however it dies:
//! - `PR_SET_PDEATHSIG(SIGKILL)` in the child: the kernel kills it when the thread that
//!   spawned it exits, which covers an agent killed with SIGKILL. All spawns happen on
//!   one thread that lives exactly as long as the [`ProcessRuntime`] (a tokio worker or
//!   blocking-pool thread could exit earlier and take the guests with it).
//! - Dropping the runtime sends SIGKILL to every guest's process group, and the spawner
//!   thread's exit (PDEATHSIG again) and `kill_on_drop` back that up if the tokio
//!   runtime is going away too.
//!
//! A child is spawned through a trampoline, this binary again (`/proc/self/exe
//! __exec-child <agent pid> <program> <args>`, see [`exec_child_if_asked`]): it sets
//! PDEATHSIG, checks that the agent is still its parent, and execs the program. That
//! lets the spawn itself be a `posix_spawn` (the child shares the agent's memory until
//! its exec) rather than a `fork`, which copies the page tables of the whole agent for
//! every child: with 100 agents on one machine starting 10,000 guests, those copies
//! took a quarter of its CPU (where `exec` itself is dear, on a virtual machine whose
//! `cpuid` traps, the trampoline's extra one costs nearly as much: see BENCHMARKS).
//! Code between a fork and exec (`pre_exec`) is what forces the fork, so that is where
//! the trampoline's work moved. Without a trampoline ([`ProcessConfig::trampoline`]
//! `None`: a library user, a test running a runtime in its own process) the child is
//! forked and does the same in `pre_exec`.
//!
//! Each child leads its own process group: a Ctrl-C meant for the agent in a terminal
//! does not reach the guests, and stop signals the whole group. A runner that forks
//! instead of exec'ing its hypervisor (microvm.nix's runners exec) could leave a
//! grandchild behind when the agent is SIGKILLed: PDEATHSIG is per process.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use super::{
    EVENTS_BUFFERED_MAX, GuardSpec, GuardStatus, GuestEvent, GuestState, KILL_WAIT, Phase, Runtime, RuntimeError,
    STOP_TIMEOUT_DEFAULT, Stopped,
};
use crate::names;

/// Where guests live and how long they get to stop.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    pub state_dir: PathBuf,
    /// After SIGTERM, how long before SIGKILL.
    pub stop_timeout: Duration,
    /// This agent's binary, to spawn children through (see the module docs);
    /// `None`: fork them.
    pub trampoline: Option<PathBuf>,
}

impl ProcessConfig {
    /// Children forked, without a trampoline.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self { state_dir: state_dir.into(), stop_timeout: STOP_TIMEOUT_DEFAULT, trampoline: None }
    }

    /// Children spawned through the running binary (`/proc/self/exe`, which names it
    /// even once a rebuild replaced the file): for `blixard-agent run`.
    pub fn through_this_binary(mut self) -> Self {
        self.trampoline = Some(PathBuf::from("/proc/self/exe"));
        self
    }
}

/// The first argument that makes `blixard-agent` the trampoline of a child.
const EXEC_CHILD: &str = "__exec-child";

/// The trampoline (see the module docs): if this process was started as
/// `blixard-agent __exec-child <agent pid> <program> [args]`, becomes `program` and
/// returns only if it could not (the exit code to leave with). `None`: this is not a
/// trampoline; go on as usual. To be called first thing in `main`.
pub fn exec_child_if_asked() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    if args.next()? != EXEC_CHILD {
        return None;
    }
    Some(exec_child(args.collect()))
}

fn exec_child(args: Vec<OsString>) -> ExitCode {
    let [parent, program, rest @ ..] = args.as_slice() else {
        eprintln!("blixard-agent: {EXEC_CHILD} needs the agent's pid and a program");
        return ExitCode::from(2);
    };
    let Some(parent) = parent.to_str().and_then(|p| p.parse::<i32>().ok()) else {
        eprintln!("blixard-agent: {EXEC_CHILD}: {parent:?} is not a pid");
        return ExitCode::from(2);
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Some(Signal::SIGKILL)) {
        eprintln!("blixard-agent: cannot ask to die with the agent: {e}");
        return ExitCode::from(127);
    }
    // The agent died before PDEATHSIG took effect: this child is already orphaned.
    if nix::unistd::getppid().as_raw() != parent {
        let _ = nix::sys::signal::raise(Signal::SIGKILL);
        return ExitCode::from(127);
    }
    let error = std::process::Command::new(program).args(rest).exec();
    eprintln!("blixard-agent: cannot run {}: {error}", Path::new(program).display());
    ExitCode::from(127)
}

/// A command that runs `program` as a child that dies with this agent: through
/// `trampoline` if given, else forked with the same steps in `pre_exec`.
fn child_command(trampoline: Option<&Path>, program: &Path) -> std::process::Command {
    let parent = std::process::id();
    if let Some(trampoline) = trampoline {
        let mut command = std::process::Command::new(trampoline);
        command.arg(EXEC_CHILD).arg(parent.to_string()).arg(program);
        return command;
    }
    let mut command = std::process::Command::new(program);
    // SAFETY: between fork and exec only async-signal-safe calls: prctl, getppid and
    // raise. If the agent died before prctl took effect, the child is already orphaned
    // and kills itself.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Some(Signal::SIGKILL))?;
            if nix::unistd::getppid().as_raw() as u32 != parent {
                nix::sys::signal::raise(Signal::SIGKILL)?;
            }
            Ok(())
        });
    }
    command
}

/// Supervises guests as child processes. See the module docs.
pub struct ProcessRuntime {
    config: ProcessConfig,
    guests: Arc<Mutex<HashMap<String, Guest>>>,
    events: broadcast::Sender<GuestEvent>,
    spawner: Spawner,
    /// The fence guard, a child like the guests (see `guard`): it kills
    /// them when a frozen agent cannot.
    guard: tokio::sync::Mutex<Option<Child>>,
}

/// What the runtime knows of one guest it started.
struct Guest {
    state: GuestState,
    /// Which start this is; a supervisor only updates the guest it was started for.
    generation: u64,
    /// Present while the child process exists.
    running: Option<Running>,
}

struct Running {
    /// Signals for the supervisor to send to the child's process group.
    signals: mpsc::Sender<Signal>,
    /// Becomes true once the child has exited and its state is recorded.
    exited: watch::Receiver<bool>,
    /// Set by `stop`: the coming exit is requested, not a failure.
    stop_requested: bool,
}

impl ProcessRuntime {
    /// A runtime with no guests yet. Must be called within a tokio runtime.
    pub fn new(config: ProcessConfig) -> Result<Self, RuntimeError> {
        let handle = tokio::runtime::Handle::try_current().map_err(|e| RuntimeError::Backend {
            context: "the process runtime needs a tokio runtime".into(),
            source: Box::new(e),
        })?;
        let (events, _) = broadcast::channel(EVENTS_BUFFERED_MAX);
        Ok(Self {
            config,
            guests: Arc::default(),
            events,
            spawner: Spawner::new(handle)?,
            guard: tokio::sync::Mutex::new(None),
        })
    }

    fn guests(&self) -> MutexGuard<'_, HashMap<String, Guest>> {
        lock(&self.guests)
    }

    fn command(&self, vm: &str, runner: PathBuf) -> Command {
        let dir = self.config.state_dir.join(vm);
        let log_path = dir.join("microvm-run.log");
        let (stdout, stderr) = match OpenOptions::new().create(true).append(true).open(&log_path) {
            Ok(log) => match log.try_clone() {
                Ok(copy) => (Stdio::from(log), Stdio::from(copy)),
                Err(_) => (Stdio::from(log), Stdio::null()),
            },
            Err(e) => {
                tracing::warn!(vm, "cannot open {}: {e}; discarding the guest's output", log_path.display());
                (Stdio::null(), Stdio::null())
            }
        };
        let mut command = child_command(self.config.trampoline.as_deref(), &runner);
        command.current_dir(&dir).stdin(Stdio::null()).stdout(stdout).stderr(stderr).process_group(0);
        let mut command = Command::from(command);
        command.kill_on_drop(true);
        command
    }

    fn set_state(&self, guests: &mut HashMap<String, Guest>, vm: &str, state: GuestState) {
        set_state(guests, &self.events, vm, state);
    }
}

/// Records `state` for `vm` and announces it, in that order (see the module invariants
/// in `runtime`), under the caller's lock so that events leave in the order of changes.
fn set_state(guests: &mut HashMap<String, Guest>, events: &broadcast::Sender<GuestEvent>, vm: &str, state: GuestState) {
    let guest = guests.get_mut(vm).expect("state is set for a known guest");
    if guest.state == state {
        return;
    }
    guest.state = state.clone();
    // No receiver is fine: nobody is watching yet.
    let _ = events.send(GuestEvent { vm: vm.to_owned(), state });
}

/// Sends SIGKILL and waits (at most [`KILL_WAIT`]) until the guest is gone.
async fn kill_and_wait(
    vm: &str,
    signals: &mpsc::Sender<Signal>,
    mut exited: watch::Receiver<bool>,
) -> Result<Stopped, RuntimeError> {
    let _ = signals.send(Signal::SIGKILL).await;
    match tokio::time::timeout(KILL_WAIT, exited.wait_for(|done| *done)).await {
        Ok(_) => Ok(Stopped::Killed),
        Err(_) => Err(RuntimeError::Unkillable { vm: vm.to_owned() }),
    }
}

fn lock(guests: &Mutex<HashMap<String, Guest>>) -> MutexGuard<'_, HashMap<String, Guest>> {
    // Every update under this lock is a few assignments that cannot panic halfway.
    guests.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ProcessRuntime {
    /// Marks running guest `vm` as being stopped, with `signal` about to be sent
    /// (for its state's detail); `None` if it does not run.
    #[allow(clippy::type_complexity)]
    fn begin_stop(
        &self,
        vm: &str,
        signal: Signal,
    ) -> Result<Option<(mpsc::Sender<Signal>, watch::Receiver<bool>)>, RuntimeError> {
        names::validate(vm)?;
        let mut guests = self.guests();
        let Some(Guest { running: Some(running), .. }) = guests.get_mut(vm) else {
            return Ok(None);
        };
        running.stop_requested = true;
        let handles = (running.signals.clone(), running.exited.clone());
        self.set_state(&mut guests, vm, GuestState::new(Phase::Deactivating, format!("{signal} sent")));
        Ok(Some(handles))
    }
}

impl Drop for ProcessRuntime {
    fn drop(&mut self) {
        for guest in self.guests().values() {
            if let Some(running) = &guest.running {
                let _ = running.signals.try_send(Signal::SIGKILL);
            }
        }
    }
}

#[async_trait]
impl Runtime for ProcessRuntime {
    fn kind(&self) -> &'static str {
        "process"
    }

    async fn start(&self, vm: &str) -> Result<(), RuntimeError> {
        names::validate(vm)?;
        if let Some(guest) = self.guests().get(vm)
            && let Some(running) = &guest.running
        {
            return if running.stop_requested { Err(RuntimeError::Stopping { vm: vm.to_owned() }) } else { Ok(()) };
        }
        let runner = super::require_installed(&self.config.state_dir, vm).await?;
        let command = self.command(vm, runner);
        let spawned = self.spawner.spawn(command).await;

        let mut guests = self.guests();
        // Another start may have won the race while we spawned; then ours goes (dropping
        // the child kills it) and theirs stays.
        if let Some(Guest { running: Some(_), .. }) = guests.get(vm) {
            return Ok(());
        }
        let generation = guests.get(vm).map_or(0, |g| g.generation + 1);
        let entry =
            guests.entry(vm.to_owned()).or_insert(Guest { state: GuestState::inactive(), generation, running: None });
        entry.generation = generation;
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let detail = format!("could not run the runner: {e}");
                self.set_state(&mut guests, vm, GuestState::new(Phase::Failed, detail.clone()));
                return Err(RuntimeError::StartFailed { vm: vm.to_owned(), detail });
            }
        };
        let pid = child.id().expect("a child that was just spawned has a pid");
        let (signals, signal_rx) = mpsc::channel(4);
        let (exited_tx, exited) = watch::channel(false);
        entry.running = Some(Running { signals, exited, stop_requested: false });
        self.set_state(&mut guests, vm, GuestState::new(Phase::Active, format!("pid {pid}")));
        drop(guests);
        tracing::info!(vm, pid, "guest started");

        tokio::spawn(supervise(Supervised {
            vm: vm.to_owned(),
            generation,
            child,
            signals: signal_rx,
            exited: exited_tx,
            guests: Arc::clone(&self.guests),
            events: self.events.clone(),
        }));
        Ok(())
    }

    async fn stop(&self, vm: &str) -> Result<Stopped, RuntimeError> {
        self.stop_within(vm, self.config.stop_timeout).await
    }

    async fn stop_within(&self, vm: &str, timeout: Duration) -> Result<Stopped, RuntimeError> {
        let Some((signals, mut exited)) = self.begin_stop(vm, Signal::SIGTERM)? else {
            return Ok(Stopped::Gracefully);
        };
        // A closed channel means the supervisor is done: the child is gone already.
        let _ = signals.send(Signal::SIGTERM).await;
        if tokio::time::timeout(timeout, exited.wait_for(|done| *done)).await.is_ok() {
            return Ok(Stopped::Gracefully);
        }
        tracing::warn!(vm, "guest did not stop within {timeout:?}; killing it");
        {
            let mut guests = self.guests();
            if guests.get(vm).is_some_and(|g| g.running.is_some()) {
                let detail = format!("SIGKILL sent: still running {timeout:?} after SIGTERM");
                self.set_state(&mut guests, vm, GuestState::new(Phase::Deactivating, detail));
            }
        }
        kill_and_wait(vm, &signals, exited).await
    }

    async fn kill(&self, vm: &str) -> Result<Stopped, RuntimeError> {
        let Some((signals, exited)) = self.begin_stop(vm, Signal::SIGKILL)? else {
            return Ok(Stopped::Gracefully);
        };
        kill_and_wait(vm, &signals, exited).await
    }

    async fn state(&self, vm: &str) -> Result<GuestState, RuntimeError> {
        names::validate(vm)?;
        Ok(self.guests().get(vm).map_or_else(GuestState::inactive, |g| g.state.clone()))
    }

    async fn list(&self) -> Result<Vec<(String, GuestState)>, RuntimeError> {
        let mut all: Vec<_> = self.guests().iter().map(|(name, g)| (name.clone(), g.state.clone())).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    async fn installed(&self) -> Result<BTreeSet<String>, RuntimeError> {
        super::scan_installed(&self.config.state_dir).await
    }

    fn events(&self) -> broadcast::Receiver<GuestEvent> {
        self.events.subscribe()
    }

    fn log_source(&self, vm: &str) -> Result<super::logs::LogSource, RuntimeError> {
        crate::names::validate(vm)?;
        Ok(super::logs::LogSource::File(self.config.state_dir.join(vm).join("microvm-run.log")))
    }

    /// The guard is a child of the agent, spawned like the guests (it dies
    /// with the agent, as they do), started again when it has exited.
    async fn ensure_guard(&self, spec: &GuardSpec) -> Result<GuardStatus, RuntimeError> {
        let mut guard = self.guard.lock().await;
        let mut restarted = None;
        if let Some(child) = guard.as_mut() {
            match child.try_wait() {
                Ok(None) => return Ok(GuardStatus::Running),
                Ok(Some(status)) => restarted = Some(describe(status)),
                Err(e) => restarted = Some(format!("lost track of it: {e}")),
            }
        }
        let mut command = child_command(self.config.trampoline.as_deref(), &spec.program);
        command.args(&spec.args).stdin(Stdio::null()).process_group(0);
        let mut command = Command::from(command);
        command.kill_on_drop(true);
        let child = self
            .spawner
            .spawn(command)
            .await
            .map_err(|source| RuntimeError::Io { path: spec.program.clone(), source })?;
        let pid = child.id().unwrap_or_default();
        *guard = Some(child);
        Ok(GuardStatus::Started(match restarted {
            Some(how) => format!("the guard {how}; started it again (pid {pid})"),
            None => format!("started the guard (pid {pid})"),
        }))
    }
}

/// Everything one supervisor task owns.
struct Supervised {
    vm: String,
    generation: u64,
    child: Child,
    signals: mpsc::Receiver<Signal>,
    exited: watch::Sender<bool>,
    guests: Arc<Mutex<HashMap<String, Guest>>>,
    events: broadcast::Sender<GuestEvent>,
}

/// Waits for the child to exit, relaying stop signals to its process group meanwhile,
/// then records how it ended. Signals go through here because only the task that reaps
/// the child knows its pid is still its own: `Child::id` is `None` once reaped, so a
/// signal can never hit a recycled pid.
async fn supervise(mut s: Supervised) {
    let status = loop {
        tokio::select! {
            status = s.child.wait() => break status,
            Some(signal) = s.signals.recv() => {
                if let Some(pid) = s.child.id() {
                    let group = Pid::from_raw(pid as i32);
                    if let Err(e) = killpg(group, signal) {
                        tracing::warn!(vm = s.vm, "sending {signal} to guest: {e}");
                    }
                }
            }
        }
    };
    let mut guests = lock(&s.guests);
    let Some(guest) = guests.get_mut(&s.vm).filter(|g| g.generation == s.generation) else {
        return;
    };
    let stop_requested = guest.running.take().is_some_and(|r| r.stop_requested);
    let state = match status {
        Ok(status) if stop_requested => GuestState::new(Phase::Inactive, format!("stopped; {}", describe(status))),
        Ok(status) => GuestState::new(Phase::Failed, format!("{} without being asked to stop", describe(status))),
        Err(e) => GuestState::new(Phase::Failed, format!("lost track of the guest process: {e}")),
    };
    if state.phase == Phase::Failed {
        tracing::warn!(vm = s.vm, "guest {state}");
    } else {
        tracing::info!(vm = s.vm, "guest {state}");
    }
    set_state(&mut guests, &s.events, &s.vm, state);
    drop(guests);
    let _ = s.exited.send(true);
}

/// "exited with status 3", "killed by SIGKILL".
fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exited with status {code}");
    }
    match status.signal() {
        Some(n) => match Signal::try_from(n) {
            Ok(signal) => format!("killed by {signal}"),
            Err(_) => format!("killed by signal {n}"),
        },
        None => format!("ended ({status})"),
    }
}

/// The one thread that spawns guests; see the module docs for why it must be one
/// long-lived thread. It ends when the runtime (the only sender) is dropped, and the
/// kernel then kills the children it spawned.
struct Spawner {
    requests: std::sync::mpsc::Sender<SpawnRequest>,
}

type SpawnRequest = (Command, oneshot::Sender<std::io::Result<Child>>);

impl Spawner {
    fn new(handle: tokio::runtime::Handle) -> Result<Self, RuntimeError> {
        let (requests, incoming) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("guest-spawner".into())
            .spawn(move || {
                // tokio's child reaping needs its runtime's context.
                let _runtime = handle.enter();
                for (mut command, reply) in incoming {
                    let _ = reply.send(command.spawn());
                }
            })
            .map_err(|e| RuntimeError::Backend {
                context: "starting the guest spawner thread".into(),
                source: Box::new(e),
            })?;
        Ok(Self { requests })
    }

    async fn spawn(&self, command: Command) -> std::io::Result<Child> {
        let (reply, answer) = oneshot::channel();
        let gone = || std::io::Error::other("the guest spawner thread is gone");
        self.requests.send((command, reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

//! Runtimes: what starts, stops and watches the microvm.nix guests of this host.
//!
//! The reconciler decides *what* should run here; a [`Runtime`] does it and reports what
//! it sees. Two kinds (design decision 7):
//!
//! - [`systemd::SystemdRuntime`] (production): `microvm@NAME.service` units over the
//!   system bus. Guests belong to systemd and survive an agent restart; a new agent
//!   re-adopts them by listing the units, without restarting anything.
//! - [`process::ProcessRuntime`] (development and tests): runs
//!   `<state_dir>/<name>/current/bin/microvm-run` as a supervised child. Its guests die
//!   with the agent, even when the agent is killed with SIGKILL.
//!
//! [`health`] holds the pure back-off policy the reconciler applies to guests that keep
//! exiting.
//!
//! # Invariants
//!
//! - Only [`systemd`] knows D-Bus; nothing in the runtime's interface mentions it.
//! - Every VM name that comes in is checked with [`crate::names::validate`] before it
//!   becomes a unit name or a path, although the state machine checked it already: a
//!   name is the only thing that could make a unit name or a path point elsewhere.
//! - A change event is sent after the state it carries is what [`Runtime::state`] and
//!   [`Runtime::list`] report, so a consumer that reacts to an event never reads an older
//!   state back.
//!
//! # Using the event stream without missing a change
//!
//! Subscribe first, then read the current states, then react to events:
//!
//! ```no_run
//! # async fn f(rt: &dyn blixard::runtime::Runtime) -> Result<(), blixard::runtime::RuntimeError> {
//! let mut events = rt.events();
//! let guests = rt.list().await?; // what runs now: re-adopted, not restarted
//! # let _ = guests;
//! while let Ok(event) = events.recv().await {
//!     println!("{} is now {}", event.vm, event.state);
//! }
//! # Ok(()) }
//! ```
//!
//! Events are a broadcast with a bounded buffer ([`EVENTS_BUFFERED_MAX`]): a consumer
//! that falls that far behind gets `RecvError::Lagged` and should call [`Runtime::list`]
//! to catch up. `RecvError::Closed` means the runtime lost its event source (the systemd
//! runtime's bus connection): treat it as fatal and let systemd restart the agent.

pub mod health;
pub mod logs;
pub mod process;
pub mod systemd;

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::config::RuntimeKind;
use crate::names::{self, NameError};

/// How long a graceful stop may take before the guest is killed. microvm.nix's
/// `microvm-shutdown` asks the guest to power off; 30 s is enough for a guest that is
/// going to, and short enough that a fenced host's guests are gone well before the
/// leader reschedules them.
pub const STOP_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// How long to wait for a guest to go away after SIGKILL, before reporting it as
/// unkillable (a process in uninterruptible sleep, say).
pub const KILL_WAIT: Duration = Duration::from_secs(10);

/// Change events buffered per subscriber before the slowest one lags. A host runs at
/// most a few hundred guests and each change of state is a handful of events.
pub const EVENTS_BUFFERED_MAX: usize = 1024;

/// What a runtime knows about one guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestState {
    pub phase: Phase,
    /// For people: systemd's sub-state, how the guest exited, what it is waiting for.
    pub detail: Option<String>,
}

/// The life cycle of a guest, in systemd's terms (a unit's `ActiveState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Not running, and nothing went wrong (never started, or stopped on request).
    Inactive,
    /// Starting.
    Activating,
    /// Running.
    Active,
    /// Stopping.
    Deactivating,
    /// Not running because it exited without being asked to, or could not start. The
    /// reconciler counts each entry into this phase as one failure (see [`health`]):
    /// entries, not events, since one failure can be several events with different
    /// details (systemd shows a crashed unit `failed`, then waiting to restart it).
    Failed,
}

impl GuestState {
    pub fn new(phase: Phase, detail: impl Into<String>) -> Self {
        Self { phase, detail: Some(detail.into()) }
    }

    pub fn inactive() -> Self {
        Self { phase: Phase::Inactive, detail: None }
    }

    /// Whether a guest process may exist: anything but inactive or failed.
    pub fn is_up(&self) -> bool {
        !matches!(self.phase, Phase::Inactive | Phase::Failed)
    }
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Inactive => "inactive",
            Phase::Activating => "activating",
            Phase::Active => "active",
            Phase::Deactivating => "deactivating",
            Phase::Failed => "failed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for GuestState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.detail {
            Some(detail) => write!(f, "{} ({detail})", self.phase),
            None => write!(f, "{}", self.phase),
        }
    }
}

/// A guest changed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestEvent {
    pub vm: String,
    pub state: GuestState,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The guest shut down within the stop timeout, or was not running.
    Gracefully,
    /// It did not, and was killed (SIGKILL to all its processes).
    Killed,
}

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("refusing to manage guest: {0}")]
    InvalidName(#[from] NameError),
    #[error(
        "guest {vm:?} is not installed on this host: {} is missing or not executable",
        runner.display()
    )]
    NotInstalled { vm: String, runner: PathBuf },
    #[error("guest {vm:?} is being stopped; start it again once it has stopped")]
    Stopping { vm: String },
    #[error("starting guest {vm:?} failed: {detail}")]
    StartFailed { vm: String, detail: String },
    #[error("{what} did not finish within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("guest {vm:?} was sent SIGKILL but is still there after {:?}", KILL_WAIT)]
    Unkillable { vm: String },
    #[error("{} failed: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The service manager or the bus failed, or answered what we did not expect.
    #[error("{context}: {source}")]
    Backend {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The runtime has shut down its event source (the bus connection was lost).
    #[error("the runtime is no longer running: {0}")]
    Closed(String),
}

/// The fence guard as a runtime keeps it running beside the agent (see
/// `guard`): a program that stops the guests when the agent cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardSpec {
    /// The agent's own binary.
    pub program: PathBuf,
    /// `guard ...`: the guard's arguments.
    pub args: Vec<String>,
    /// `guard --fence-if-stale ...`: what runs whenever the guard stops,
    /// however it stops (the systemd runtime's `ExecStopPost`).
    pub stop_post_args: Vec<String>,
    /// The watchdog timeout of a guard that has not pinged yet.
    pub watchdog_ms: u64,
}

/// How the guard was found by [`Runtime::ensure_guard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardStatus {
    /// It runs, as it should.
    Running,
    /// It did not run, and was started now (the text says how).
    Started(String),
    /// It runs, but not quite as it should; the text says what is wrong.
    Degraded(String),
    /// This runtime has no guard (test fakes).
    Unsupported,
}

/// Starts, stops and watches the guests of this host.
///
/// A trait object (`Arc<dyn Runtime>`), not an enum or a generic parameter: the kind is
/// chosen once from the config at startup, the reconciler and node stay free of type
/// parameters, and tests (the reconciler's, the simulator's) plug in a fake of their own.
/// The price, one boxed future per call, is nothing next to a D-Bus round trip or a
/// process spawn.
///
/// Every operation is idempotent: starting a running guest or stopping a stopped one
/// succeeds and changes nothing.
#[async_trait]
pub trait Runtime: Send + Sync {
    /// `"systemd"` or `"process"`, for logs and status.
    fn kind(&self) -> &'static str;

    /// Starts guest `vm`. Returns once the start has happened (systemd's start job is
    /// done; the child is spawned), not when the guest has booted.
    async fn start(&self, vm: &str) -> Result<(), RuntimeError>;

    /// Stops guest `vm` gracefully; if it has not stopped within the runtime's stop
    /// timeout, kills all its processes. Returns once it is no longer running.
    async fn stop(&self, vm: &str) -> Result<Stopped, RuntimeError>;

    /// [`Runtime::stop`] with its own timeout before the kill: a fenced host must
    /// have its guests gone within `failure::Timing::stop_max_ms`, far sooner than a
    /// graceful shutdown may take.
    async fn stop_within(&self, vm: &str, timeout: Duration) -> Result<Stopped, RuntimeError>;

    /// Ends guest `vm` at once, without a graceful shutdown: the fence's
    /// and a removed host's stop. Such a guest is abandoned (another host
    /// starts it once the leader's `reschedule_after` has passed), so
    /// nothing is worth waiting for, and the sooner it is gone the shorter
    /// `failure::Timing::stop_max_ms` and with it a failover. SIGKILL goes
    /// to every process of the guest right after the stop that keeps it
    /// down (systemd: a stop job, which cancels `Restart=always`). Returns
    /// [`Stopped::Killed`] once it is gone (within [`KILL_WAIT`]), or
    /// [`Stopped::Gracefully`] if it was not running.
    async fn kill(&self, vm: &str) -> Result<Stopped, RuntimeError>;

    /// The current state of guest `vm`, asked afresh (not from a cache).
    async fn state(&self, vm: &str) -> Result<GuestState, RuntimeError>;

    /// Every guest this runtime manages that exists right now (systemd: every loaded
    /// `microvm@` unit; process: every child it started), sorted by name. After an agent
    /// restart this is how running guests are re-adopted.
    async fn list(&self) -> Result<Vec<(String, GuestState)>, RuntimeError>;

    /// The guests whose runner `<state_dir>/<name>/current/bin/microvm-run` exists and is
    /// executable: what this host can run. See [`scan_installed`].
    async fn installed(&self) -> Result<BTreeSet<String>, RuntimeError>;

    /// A receiver of every change of state of a managed guest, from now on.
    fn events(&self) -> broadcast::Receiver<GuestEvent>;

    /// Where guest `vm`'s log is on this host (see [`logs`]).
    fn log_source(&self, vm: &str) -> Result<logs::LogSource, RuntimeError>;

    /// Makes sure the fence guard `spec` runs (starting it, or what it
    /// needs, when it does not), so that this host's guests stop when its
    /// quorum contact is too old even if the agent cannot stop them. Called
    /// at start and every few seconds; cheap when all is well.
    async fn ensure_guard(&self, spec: &GuardSpec) -> Result<GuardStatus, RuntimeError> {
        let _ = spec;
        Ok(GuardStatus::Unsupported)
    }
}

/// The runtime the config asks for, with the default stop timeout. The systemd runtime connects
/// to the system bus here, so a host without one fails at startup, not at the first
/// start.
pub async fn open(
    kind: RuntimeKind,
    state_dir: &Path,
    start_timeout: Duration,
) -> Result<Arc<dyn Runtime>, RuntimeError> {
    Ok(match kind {
        RuntimeKind::Systemd => {
            let config = systemd::SystemdConfig { start_timeout, ..systemd::SystemdConfig::new(state_dir) };
            Arc::new(systemd::SystemdRuntime::connect(config).await?)
        }
        RuntimeKind::Process => {
            Arc::new(process::ProcessRuntime::new(process::ProcessConfig::new(state_dir).through_this_binary())?)
        }
    })
}

/// `<state_dir>/<vm>/current`: where microvm.nix's `install-microvm-<vm>.service` links
/// the guest's runner.
pub fn current_dir(state_dir: &Path, vm: &str) -> Result<PathBuf, RuntimeError> {
    names::validate(vm)?;
    Ok(state_dir.join(vm).join("current"))
}

/// `<state_dir>/<vm>/current/bin/microvm-run`.
pub fn runner_path(state_dir: &Path, vm: &str) -> Result<PathBuf, RuntimeError> {
    Ok(current_dir(state_dir, vm)?.join("bin").join("microvm-run"))
}

/// Fails with [`RuntimeError::NotInstalled`] unless `vm`'s runner is there to run.
pub(crate) async fn require_installed(state_dir: &Path, vm: &str) -> Result<PathBuf, RuntimeError> {
    let runner = runner_path(state_dir, vm)?;
    if is_executable_file(&runner).await {
        Ok(runner)
    } else {
        Err(RuntimeError::NotInstalled { vm: vm.to_owned(), runner })
    }
}

/// A regular file (after following symlinks: `current` is one) with an execute bit.
async fn is_executable_file(path: &Path) -> bool {
    tokio::fs::metadata(path).await.is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The guests installed under `state_dir`: every directory entry whose name is a valid
/// VM name and whose `current/bin/microvm-run` is an executable file. Entries with other
/// names are skipped with a warning (nothing we could start safely); a missing
/// `state_dir` means nothing is installed yet.
pub async fn scan_installed(state_dir: &Path) -> Result<BTreeSet<String>, RuntimeError> {
    let io_error = |source| RuntimeError::Io { path: state_dir.to_owned(), source };
    let mut entries = match tokio::fs::read_dir(state_dir).await {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(io_error(e)),
    };
    let mut installed = BTreeSet::new();
    while let Some(entry) = entries.next_entry().await.map_err(io_error)? {
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            tracing::warn!(entry = ?file_name, dir = %state_dir.display(), "ignoring a guest directory whose name is not UTF-8");
            continue;
        };
        if let Err(e) = names::validate(name) {
            tracing::warn!(dir = %state_dir.display(), "ignoring guest directory: {e}");
            continue;
        }
        if is_executable_file(&runner_path(state_dir, name)?).await {
            installed.insert(name.to_owned());
        }
    }
    Ok(installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_refuse_names_that_would_escape_the_state_dir() {
        let dir = Path::new("/var/lib/microvms");
        assert_eq!(runner_path(dir, "web-1").unwrap(), Path::new("/var/lib/microvms/web-1/current/bin/microvm-run"));
        for bad in ["..", "../etc", "a/b", "", "Web", "-x"] {
            assert!(matches!(runner_path(dir, bad), Err(RuntimeError::InvalidName(_))), "{bad:?}");
        }
    }

    #[test]
    fn states_display_for_people() {
        assert_eq!(GuestState::inactive().to_string(), "inactive");
        let failed = GuestState::new(Phase::Failed, "exited with status 3");
        assert_eq!(failed.to_string(), "failed (exited with status 3)");
        assert!(!failed.is_up());
        assert!(GuestState::new(Phase::Deactivating, "stop-sigterm").is_up());
    }
}

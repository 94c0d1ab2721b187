//! The systemd runtime (production): guests are microvm.nix's `microvm@NAME.service`
//! units, driven over the system bus. The only module of the agent that knows D-Bus.
//!
//! - Start and stop are `Manager.StartUnit` / `StopUnit` (mode `replace`), each waiting
//!   for its job's `JobRemoved` signal. A stop that has not finished within the stop
//!   timeout is followed by `KillUnit(name, "all", SIGKILL)`; a fence's
//!   [`Runtime::kill`] sends that kill right after the stop job, without waiting. The unit has
//!   `Restart=always`: stopping a guest is always a stop job (which cancels a pending
//!   restart), never just killing its process, which systemd would start again.
//! - States come from the unit's properties: `ActiveState`, `SubState` and `LoadState`
//!   of `org.freedesktop.systemd1.Unit`, `Result`, `ExecMainCode`/`ExecMainStatus` and
//!   `NRestarts` of `.Service`. [`SystemdRuntime::state`] reads them with `GetAll` (one
//!   consistent snapshot per interface); changes arrive as `PropertiesChanged` signals
//!   (after `Manager.Subscribe`), which carry the same properties. Nothing is polled.
//! - Guests belong to systemd, not to the agent: a new agent lists the `microvm@*`
//!   units (`ListUnitsByPatterns`) and reports the running ones as active, without
//!   restarting anything.
//!
//! One watcher task reads both signal streams and never awaits anything else: zbus
//! stops reading the socket when a stream's queue is full, so a watcher that blocked on
//! a method call could deadlock the connection. Callers wait for their jobs on a tokio
//! broadcast the watcher feeds, which never blocks it.
//!
//! A crashed guest is, to systemd, `activating` / `auto-restart` (waiting `RestartSec`
//! to start it again). We report that as [`Phase::Failed`]: the guest is not running
//! because it exited on its own, which is what the reconciler counts; the detail says
//! systemd is about to restart it.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use zbus::proxy::CacheProperties;
use zbus::zvariant::{OwnedObjectPath, OwnedValue, Value};
use zbus::{Connection, MessageStream, names::InterfaceName};

use super::{
    EVENTS_BUFFERED_MAX, GuardSpec, GuardStatus, GuestEvent, GuestState, KILL_WAIT, Phase, Runtime, RuntimeError,
    STOP_TIMEOUT_DEFAULT, Stopped,
};
use crate::names;

/// How long a start job may take. microvm.nix's unit gives up after `TimeoutSec=150`
/// (its `startupTimeout` default) and fails the job itself; we wait a little longer so
/// that its verdict, not ours, is what is reported.
pub const START_TIMEOUT_DEFAULT: Duration = Duration::from_secs(160);

/// Signals queued for the watcher before zbus stops reading the socket. The watcher
/// drains them continuously; the bound only matters if it is starved.
const SIGNALS_QUEUED_MAX: usize = 1024;
/// Finished jobs buffered for callers waiting on theirs.
const JOBS_BUFFERED_MAX: usize = 1024;

const SYSTEMD: &str = "org.freedesktop.systemd1";
const UNIT_INTERFACE: &str = "org.freedesktop.systemd1.Unit";
const SERVICE_INTERFACE: &str = "org.freedesktop.systemd1.Service";
const UNIT_PATH_PREFIX: &str = "/org/freedesktop/systemd1/unit/";
/// Object paths of `microvm@…` units start with this (`@` is escaped as `_40`).
const GUEST_UNIT_PATH_PREFIX: &str = "/org/freedesktop/systemd1/unit/microvm_40";
const GUEST_UNIT_PATTERN: &str = "microvm@*.service";
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";
const NO_SUCH_PROCESS: &str = "org.freedesktop.systemd1.NoSuchProcess";

/// The fence guard's unit (see `guard`).
pub const GUARD_UNIT: &str = "blixard-guard.service";
/// Where the agent ties every guest to the guard on a host where nothing
/// declared it: a runtime drop-in for microvm.nix's template (gone at
/// reboot, with the transient guard itself).
pub const GUARD_DROPIN_DIR: &str = "/run/systemd/system/microvm@.service.d";
pub const GUARD_DROPIN_FILE: &str = "50-blixard-guard.conf";
/// A start-time check, not a dependency: on systemd 252 `BindsTo=`,
/// `Requires=` and `Requisite=` all propagate the guard's restart after a
/// crash to every guest (systemd would stop and start them itself; see
/// `guard`).
pub const GUARD_DROPIN: &str = "\
# Written by blixard-agent: no guest starts while its fence guard does not
# run (see the agent's guard module).
[Unit]
After=blixard-guard.service

[Service]
ExecStartPre=systemctl is-active --quiet blixard-guard.service
# A stop waits for the hypervisor to exit (microvm.nix's microvm-shutdown
# returns at once under systemd at some revisions, and systemd then killed
# the guest instead of letting it shut down).
ExecStop=-tail --pid=${MAINPID} -f /dev/null
";
/// How long the guard's start (until its READY=1) may take.
const GUARD_START_TIMEOUT: Duration = Duration::from_secs(20);
/// The guard's restart delay after it died: its stop-post has fenced if it
/// had to, and a new guard should look again at once.
const GUARD_RESTART: Duration = Duration::from_millis(100);
/// The transient guard's `CPUWeight` (systemd's default, and the guests', is 100).
const GUARD_CPU_WEIGHT: u64 = 1000;

/// `waitid`'s `si_code` values that systemd reports as `ExecMainCode`.
const CLD_EXITED: i32 = 1;
const CLD_KILLED: i32 = 2;
const CLD_DUMPED: i32 = 3;

/// A row of `ListUnitsByPatterns`: name, description, load state, active state, sub
/// state, followed unit, object path, job id, job type, job path.
type UnitRow = (String, String, String, String, String, String, OwnedObjectPath, u32, String, OwnedObjectPath);

/// The part of `org.freedesktop.systemd1.Manager` we use.
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;
    fn get_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn list_units_by_patterns(&self, states: &[&str], patterns: &[&str]) -> zbus::Result<Vec<UnitRow>>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    #[zbus(name = "GetUnitByPID")]
    fn get_unit_by_pid(&self, pid: u32) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, Value<'_>)],
        aux: &[(&str, Vec<(&str, Value<'_>)>)],
    ) -> zbus::Result<OwnedObjectPath>;
    /// `daemon-reload`: answers once the reload is done.
    fn reload(&self) -> zbus::Result<()>;
    /// Asks systemd to send its signals (it sends none to nobody).
    fn subscribe(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(&self, id: u32, job: OwnedObjectPath, unit: String, result: String) -> zbus::Result<()>;
}

/// How to reach systemd and how long to wait for it.
#[derive(Debug, Clone)]
pub struct SystemdConfig {
    /// Where microvm.nix installs guests (`microvm.stateDir`).
    pub state_dir: PathBuf,
    /// How long a stop job may take before the guest's processes are killed.
    pub stop_timeout: Duration,
    /// How long a start job may take.
    pub start_timeout: Duration,
    /// A D-Bus address; `None` is the system bus (`$DBUS_SYSTEM_BUS_ADDRESS`, else
    /// `/run/dbus/system_bus_socket`).
    pub bus_address: Option<String>,
}

impl SystemdConfig {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            stop_timeout: STOP_TIMEOUT_DEFAULT,
            start_timeout: START_TIMEOUT_DEFAULT,
            bus_address: None,
        }
    }
}

/// A job that systemd has finished, as its `JobRemoved` signal said.
#[derive(Debug, Clone)]
struct JobDone {
    job: OwnedObjectPath,
    result: String,
}

/// Drives `microvm@` units. See the module docs.
pub struct SystemdRuntime {
    config: SystemdConfig,
    conn: Connection,
    manager: ManagerProxy<'static>,
    // Weak: when the watcher (which holds the only strong senders) ends, subscribers see
    // the channels close instead of waiting forever.
    events: broadcast::WeakSender<GuestEvent>,
    jobs: broadcast::WeakSender<JobDone>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for SystemdRuntime {
    fn drop(&mut self) {
        // The guests stay: they belong to systemd.
        self.watcher.abort();
    }
}

impl SystemdRuntime {
    /// Connects to the bus, subscribes to systemd's signals and starts watching the
    /// `microvm@` units. Guests already running are left alone.
    pub async fn connect(config: SystemdConfig) -> Result<Self, RuntimeError> {
        let builder = match &config.bus_address {
            Some(address) => zbus::connection::Builder::address(address.as_str()),
            None => zbus::connection::Builder::system(),
        }
        .map_err(backend("the D-Bus address"))?;
        let conn = builder.build().await.map_err(backend("connecting to the system bus"))?;
        let manager = ManagerProxy::builder(&conn)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(backend("creating the systemd manager proxy"))?;

        // The match rules go in before Subscribe, so that no signal is missed.
        let properties = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(SYSTEMD)
            .and_then(|b| b.interface("org.freedesktop.DBus.Properties"))
            .and_then(|b| b.member("PropertiesChanged"))
            .and_then(|b| b.path_namespace(UNIT_PATH_PREFIX.trim_end_matches('/')))
            .map_err(backend("building a match rule"))?
            .build();
        let properties = MessageStream::for_match_rule(properties, &conn, Some(SIGNALS_QUEUED_MAX))
            .await
            .map_err(backend("watching unit properties"))?;
        let job_rule = zbus::MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender(SYSTEMD)
            .and_then(|b| b.path("/org/freedesktop/systemd1"))
            .and_then(|b| b.interface("org.freedesktop.systemd1.Manager"))
            .and_then(|b| b.member("JobRemoved"))
            .map_err(backend("building a match rule"))?
            .build();
        let jobs_stream = MessageStream::for_match_rule(job_rule, &conn, Some(SIGNALS_QUEUED_MAX))
            .await
            .map_err(backend("watching systemd jobs"))?;
        manager.subscribe().await.map_err(backend("subscribing to systemd's signals"))?;

        let (events, _) = broadcast::channel(EVENTS_BUFFERED_MAX);
        let (jobs, _) = broadcast::channel(JOBS_BUFFERED_MAX);
        let weak = (events.downgrade(), jobs.downgrade());
        let watcher = tokio::spawn(watch(properties, jobs_stream, events, jobs));
        Ok(Self { config, conn, manager, events: weak.0, jobs: weak.1, watcher })
    }

    fn subscribe_jobs(&self) -> Result<broadcast::Receiver<JobDone>, RuntimeError> {
        match self.jobs.upgrade() {
            Some(jobs) => Ok(jobs.subscribe()),
            None => Err(RuntimeError::Closed("the systemd watcher has stopped (bus connection lost?)".into())),
        }
    }

    /// Waits until systemd removes `job`, or `timeout` passes (`Ok(None)`). The result
    /// is `"done"`, `"canceled"`, `"timeout"`, `"failed"`, `"dependency"` or `"skipped"`;
    /// `"unknown"` if our buffer overflowed and we only know the job is gone.
    async fn wait_job(
        &self,
        jobs: &mut broadcast::Receiver<JobDone>,
        job: &OwnedObjectPath,
        timeout: Duration,
    ) -> Result<Option<String>, RuntimeError> {
        let deadline = Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, jobs.recv()).await {
                Err(_elapsed) => return Ok(None),
                Ok(Ok(done)) if done.job == *job => return Ok(Some(done.result)),
                Ok(Ok(_other_job)) => {}
                Ok(Err(RecvError::Lagged(missed))) => {
                    tracing::warn!(missed, "missed systemd job signals; checking on {} directly", job.as_str());
                    if !self.job_exists(job).await? {
                        return Ok(Some("unknown".into()));
                    }
                }
                Ok(Err(RecvError::Closed)) => {
                    return Err(RuntimeError::Closed("the systemd watcher stopped while waiting for a job".into()));
                }
            }
        }
    }

    async fn job_exists(&self, job: &OwnedObjectPath) -> Result<bool, RuntimeError> {
        let properties = self.properties_proxy(job.clone()).await?;
        let interface = InterfaceName::from_static_str_unchecked("org.freedesktop.systemd1.Job");
        match properties.get(interface, "State").await {
            Ok(_) => Ok(true),
            Err(zbus::fdo::Error::UnknownObject(_) | zbus::fdo::Error::UnknownMethod(_)) => Ok(false),
            Err(e) => Err(backend(format!("looking up job {}", job.as_str()))(e)),
        }
    }

    async fn properties_proxy(
        &self,
        path: OwnedObjectPath,
    ) -> Result<zbus::fdo::PropertiesProxy<'static>, RuntimeError> {
        zbus::fdo::PropertiesProxy::builder(&self.conn)
            .destination(SYSTEMD)
            .and_then(|b| b.path(path))
            .map_err(backend("addressing a unit"))?
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(backend("creating a properties proxy"))
    }

    /// The unit's properties of `interface`, all in one consistent snapshot.
    async fn read_interface(
        &self,
        path: &OwnedObjectPath,
        interface: &'static str,
        props: &mut UnitProps,
    ) -> Result<(), RuntimeError> {
        let proxy = self.properties_proxy(path.clone()).await?;
        let all = proxy
            .get_all(InterfaceName::from_static_str_unchecked(interface))
            .await
            .map_err(backend(format!("reading {interface} properties of {}", path.as_str())))?;
        props.merge(interface, all.iter().map(|(k, v)| (k.as_str(), &**v)));
        Ok(())
    }

    /// `vm`'s unit state, or `None` when systemd has no such unit loaded.
    async fn unit_state(&self, unit: &str) -> Result<Option<GuestState>, RuntimeError> {
        let path = match self.manager.get_unit(unit).await {
            Ok(path) => path,
            Err(e) if is_no_such_unit(&e) => return Ok(None),
            Err(e) => return Err(backend(format!("looking up {unit}"))(e)),
        };
        let mut props = UnitProps::default();
        self.read_interface(&path, UNIT_INTERFACE, &mut props).await?;
        // Service properties only exist while the unit is loaded as a service.
        if props.load_state.as_deref() == Some("loaded") {
            self.read_interface(&path, SERVICE_INTERFACE, &mut props).await?;
        }
        Ok(Some(props.guest_state()))
    }
}

/// What `ensure_guard` needs to know of the guard's unit.
#[derive(Debug, Default)]
struct GuardUnitInfo {
    load_state: String,
    active_state: String,
    description: String,
    transient: bool,
}

impl SystemdRuntime {
    async fn guard_unit_info(&self) -> Result<GuardUnitInfo, RuntimeError> {
        let path = self.manager.load_unit(GUARD_UNIT).await.map_err(backend(format!("loading {GUARD_UNIT}")))?;
        let proxy = self.properties_proxy(path).await?;
        let all = proxy
            .get_all(InterfaceName::from_static_str_unchecked(UNIT_INTERFACE))
            .await
            .map_err(backend(format!("reading the properties of {GUARD_UNIT}")))?;
        let text = |name: &str| match all.get(name).map(|v| &**v) {
            Some(Value::Str(s)) => s.as_str().to_owned(),
            _ => String::new(),
        };
        Ok(GuardUnitInfo {
            load_state: text("LoadState"),
            active_state: text("ActiveState"),
            description: text("Description"),
            transient: matches!(all.get("Transient").map(|v| &**v), Some(Value::Bool(true))),
        })
    }

    /// Runs a job (`start` of a unit, a transient unit) to its end.
    async fn run_job(
        &self,
        jobs: &mut broadcast::Receiver<JobDone>,
        job: OwnedObjectPath,
        what: &str,
    ) -> Result<(), RuntimeError> {
        match self.wait_job(jobs, &job, GUARD_START_TIMEOUT).await? {
            Some(result) if result == "done" || result == "unknown" => Ok(()),
            Some(result) => Err(RuntimeError::Backend {
                context: what.to_owned(),
                source: format!("the job ended with result {result:?}").into(),
            }),
            None => Err(RuntimeError::Timeout { what: what.to_owned(), timeout: GUARD_START_TIMEOUT }),
        }
    }

    async fn start_declared_guard(&self, failed: bool) -> Result<(), RuntimeError> {
        if failed {
            let _ = self.manager.reset_failed_unit(GUARD_UNIT).await;
        }
        let mut jobs = self.subscribe_jobs()?;
        let job =
            self.manager.start_unit(GUARD_UNIT, "replace").await.map_err(backend(format!("starting {GUARD_UNIT}")))?;
        self.run_job(&mut jobs, job, &format!("starting {GUARD_UNIT}")).await
    }

    /// Creates and starts the guard as a transient unit (a host where
    /// nothing declared it). Root only: systemd refuses others.
    async fn start_transient_guard(&self, spec: &GuardSpec, description: &str) -> Result<(), RuntimeError> {
        let program = spec.program.display().to_string();
        let command = |args: &[String]| {
            let argv: Vec<String> = std::iter::once(program.clone()).chain(args.iter().cloned()).collect();
            Value::from(vec![(program.clone(), argv, false)])
        };
        let micros = |d: Duration| Value::U64(d.as_micros() as u64);
        let properties: Vec<(&str, Value<'_>)> = vec![
            ("Description", Value::from(description)),
            ("Type", Value::from("notify")),
            ("NotifyAccess", Value::from("main")),
            ("ExecStart", command(&spec.args)),
            ("ExecStopPost", command(&spec.stop_post_args)),
            ("Restart", Value::from("always")),
            ("RestartUSec", micros(GUARD_RESTART)),
            // Each death runs the stop-post (the fence when stale); never give up.
            ("StartLimitIntervalUSec", Value::U64(0)),
            ("WatchdogUSec", micros(Duration::from_millis(spec.watchdog_ms))),
            ("WatchdogSignal", Value::I32(nix::sys::signal::Signal::SIGKILL as i32)),
            // The stop-post waits for the guests' kills (SIGKILL at once).
            ("TimeoutStopUSec", micros(Duration::from_secs(30))),
            // Ahead of the guests (weight 100) on a contended CPU, as the
            // NixOS module's unit: a guard starved by them would fence late.
            ("CPUWeight", Value::U64(GUARD_CPU_WEIGHT)),
            // It needs no network and writes nothing.
            ("PrivateNetwork", Value::Bool(true)),
            ("NoNewPrivileges", Value::Bool(true)),
            ("ProtectSystem", Value::from("strict")),
            ("ProtectHome", Value::from("read-only")),
            ("PrivateTmp", Value::Bool(true)),
        ];
        let mut jobs = self.subscribe_jobs()?;
        let job = self
            .manager
            .start_transient_unit(GUARD_UNIT, "fail", &properties, &[])
            .await
            .map_err(backend(format!("creating the transient unit {GUARD_UNIT}")))?;
        self.run_job(&mut jobs, job, &format!("starting the transient unit {GUARD_UNIT}")).await
    }

    async fn stop_guard(&self) -> Result<(), RuntimeError> {
        let mut jobs = self.subscribe_jobs()?;
        let job =
            self.manager.stop_unit(GUARD_UNIT, "replace").await.map_err(backend(format!("stopping {GUARD_UNIT}")))?;
        self.run_job(&mut jobs, job, &format!("stopping {GUARD_UNIT}")).await
    }

    /// Writes the guests' drop-in if it is not there as it should be, and
    /// reloads systemd so it applies. `Ok(false)`: nothing to do.
    async fn ensure_guard_dropin(&self) -> Result<bool, RuntimeError> {
        let dir = std::path::Path::new(GUARD_DROPIN_DIR);
        let path = dir.join(GUARD_DROPIN_FILE);
        if tokio::fs::read_to_string(&path).await.is_ok_and(|text| text == GUARD_DROPIN) {
            return Ok(false);
        }
        let io = |source| RuntimeError::Io { path: path.clone(), source };
        tokio::fs::create_dir_all(dir).await.map_err(io)?;
        let tmp = dir.join(format!("{GUARD_DROPIN_FILE}.new"));
        tokio::fs::write(&tmp, GUARD_DROPIN).await.map_err(|source| RuntimeError::Io { path: tmp.clone(), source })?;
        tokio::fs::rename(&tmp, &path).await.map_err(io)?;
        self.manager.reload().await.map_err(backend("reloading systemd for the guests' guard drop-in"))?;
        Ok(true)
    }
}

/// The restart settings of the unit a process runs in, as systemd has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitRestart {
    pub unit: String,
    pub restart: String,
    pub restart_sec_ms: u64,
    /// `None`: no watchdog.
    pub watchdog_sec_ms: Option<u64>,
}

/// This process's own unit's restart settings, over a short-lived
/// connection of its own (the agent checks them once at start).
pub async fn own_unit_restart() -> Result<UnitRestart, RuntimeError> {
    let runtime = SystemdRuntime::connect(SystemdConfig::new("/nonexistent")).await?;
    runtime.unit_restart_of(std::process::id()).await
}

impl SystemdRuntime {
    /// The restart settings of the unit that runs process `pid` (this
    /// agent's own, to check them against the fence's timing).
    pub async fn unit_restart_of(&self, pid: u32) -> Result<UnitRestart, RuntimeError> {
        let path = self.manager.get_unit_by_pid(pid).await.map_err(backend("finding this agent's unit"))?;
        let proxy = self.properties_proxy(path).await?;
        let unit = proxy
            .get_all(InterfaceName::from_static_str_unchecked(UNIT_INTERFACE))
            .await
            .map_err(backend("reading this agent's unit"))?;
        let service = proxy
            .get_all(InterfaceName::from_static_str_unchecked(SERVICE_INTERFACE))
            .await
            .map_err(backend("reading this agent's service"))?;
        let text = |map: &HashMap<String, OwnedValue>, name: &str| match map.get(name).map(|v| &**v) {
            Some(Value::Str(s)) => s.as_str().to_owned(),
            _ => String::new(),
        };
        let micros = |name: &str| match service.get(name).map(|v| &**v) {
            Some(Value::U64(us)) => *us,
            _ => 0,
        };
        let watchdog = micros("WatchdogUSec");
        Ok(UnitRestart {
            unit: text(&unit, "Id"),
            restart: text(&service, "Restart"),
            restart_sec_ms: micros("RestartUSec") / 1000,
            watchdog_sec_ms: (watchdog != 0 && watchdog != u64::MAX).then_some(watchdog / 1000),
        })
    }
}

impl SystemdRuntime {
    /// Waits (at most `timeout`) until microvm.nix's `microvm-set-booted@`
    /// unit of guest `unit` has stopped too. It is `PartOf` the guest's unit
    /// and ordered before it, so its stop job runs only after the guest's
    /// has ended: a start queued at once would replace that pending stop,
    /// leave the unit active and `booted` pointing at the runner the guest
    /// no longer runs (the next runner scan then rolls the guest again).
    /// A host without the unit (no microvm.nix) has nothing to wait for.
    async fn wait_set_booted_stopped(&self, jobs: &mut broadcast::Receiver<JobDone>, unit: &str, timeout: Duration) {
        let set_booted = unit.replacen("microvm@", "microvm-set-booted@", 1);
        match self.stop_job(&set_booted).await {
            Ok(Some(job)) => match self.wait_job(jobs, &job, timeout).await {
                Ok(Some(_)) => {}
                Ok(None) => tracing::warn!(unit = set_booted, "did not stop within {timeout:?}"),
                Err(e) => tracing::warn!(unit = set_booted, error = %e, "waiting for its stop"),
            },
            Ok(None) => {}
            Err(e) => tracing::debug!(unit = set_booted, error = %e, "not stopped"),
        }
    }

    /// Queues the stop job of `unit`; `None` if the unit is not loaded
    /// (nothing runs).
    async fn stop_job(&self, unit: &str) -> Result<Option<OwnedObjectPath>, RuntimeError> {
        match self.manager.stop_unit(unit, "replace").await {
            Ok(job) => Ok(Some(job)),
            Err(e) if is_no_such_unit(&e) => Ok(None),
            Err(e) => Err(backend(format!("stopping {unit}"))(e)),
        }
    }
}

/// The guard unit's description, which names its settings: a guard of
/// other settings is told apart by it.
fn guard_description(spec: &GuardSpec) -> String {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    for part in std::iter::once(spec.program.display().to_string()).chain(spec.args.iter().cloned()) {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hash.finalize();
    let tag: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("Blixard fence guard (stops this host's guests without quorum contact) [{tag}]")
}

fn is_running(active_state: &str) -> bool {
    matches!(active_state, "active" | "reloading" | "activating" | "refreshing")
}

#[async_trait]
impl Runtime for SystemdRuntime {
    fn kind(&self) -> &'static str {
        "systemd"
    }

    async fn start(&self, vm: &str) -> Result<(), RuntimeError> {
        let unit = unit_name(vm)?;
        // The unit's ConditionPathExists would skip the start silently; say why instead.
        super::require_installed(&self.config.state_dir, vm).await?;
        let mut jobs = self.subscribe_jobs()?;
        let job = match self.manager.start_unit(&unit, "replace").await {
            Ok(job) => job,
            Err(e) if is_no_such_unit(&e) => {
                let detail = format!("systemd has no unit {unit}: is microvm.nix's host module enabled? ({e})");
                return Err(RuntimeError::StartFailed { vm: vm.to_owned(), detail });
            }
            Err(e) => return Err(backend(format!("starting {unit}"))(e)),
        };
        let timeout = self.config.start_timeout;
        match self.wait_job(&mut jobs, &job, timeout).await? {
            Some(result) if result == "done" || result == "unknown" => {
                tracing::info!(vm, "guest started ({unit})");
                Ok(())
            }
            Some(result) => {
                let state = self.unit_state(&unit).await?.unwrap_or_else(GuestState::inactive);
                let detail = format!("the start job of {unit} ended with result {result:?}; the unit is {state}");
                Err(RuntimeError::StartFailed { vm: vm.to_owned(), detail })
            }
            None => Err(RuntimeError::Timeout { what: format!("the start job of {unit}"), timeout }),
        }
    }

    async fn stop(&self, vm: &str) -> Result<Stopped, RuntimeError> {
        self.stop_within(vm, self.config.stop_timeout).await
    }

    async fn stop_within(&self, vm: &str, timeout: Duration) -> Result<Stopped, RuntimeError> {
        let unit = unit_name(vm)?;
        let mut jobs = self.subscribe_jobs()?;
        let Some(job) = self.stop_job(&unit).await? else {
            return Ok(Stopped::Gracefully);
        };
        let result = match self.wait_job(&mut jobs, &job, timeout).await? {
            Some(result) => result,
            None => {
                tracing::warn!(vm, "{unit} did not stop within {timeout:?}; killing all its processes");
                self.manager
                    .kill_unit(&unit, "all", nix::sys::signal::Signal::SIGKILL as i32)
                    .await
                    .map_err(backend(format!("killing {unit}")))?;
                // The stop job ends once the killed processes are gone.
                return match self.wait_job(&mut jobs, &job, KILL_WAIT).await? {
                    Some(_) => Ok(Stopped::Killed),
                    None => Err(RuntimeError::Unkillable { vm: vm.to_owned() }),
                };
            }
        };
        if result == "canceled" {
            // Another job replaced ours: someone started the guest again meanwhile.
            let state = self.unit_state(&unit).await?.unwrap_or_else(GuestState::inactive);
            return Err(RuntimeError::Backend {
                context: format!("stopping {unit}"),
                source: format!("the stop job was canceled by another job; the unit is {state}").into(),
            });
        }
        self.wait_set_booted_stopped(&mut jobs, &unit, timeout).await;
        tracing::info!(vm, result, "guest stopped ({unit})");
        // systemd's own stop timeout (TimeoutStopSec) ran out first and it killed them.
        Ok(if result == "timeout" { Stopped::Killed } else { Stopped::Gracefully })
    }

    async fn kill(&self, vm: &str) -> Result<Stopped, RuntimeError> {
        let unit = unit_name(vm)?;
        let mut jobs = self.subscribe_jobs()?;
        // The stop job first: a kill alone would have systemd start the
        // guest again (`Restart=always`).
        let Some(job) = self.stop_job(&unit).await? else {
            return Ok(Stopped::Gracefully);
        };
        match self.manager.kill_unit(&unit, "all", nix::sys::signal::Signal::SIGKILL as i32).await {
            Ok(()) => {}
            // Nothing left to kill: it was not running, or the stop job
            // ended it already.
            Err(e) if is_no_such_unit(&e) || is_no_such_process(&e) => {}
            Err(e) => return Err(backend(format!("killing {unit}"))(e)),
        }
        match self.wait_job(&mut jobs, &job, KILL_WAIT).await? {
            Some(result) => {
                tracing::warn!(vm, result, "guest killed ({unit})");
                Ok(Stopped::Killed)
            }
            None => Err(RuntimeError::Unkillable { vm: vm.to_owned() }),
        }
    }

    async fn state(&self, vm: &str) -> Result<GuestState, RuntimeError> {
        let unit = unit_name(vm)?;
        Ok(self.unit_state(&unit).await?.unwrap_or_else(GuestState::inactive))
    }

    async fn list(&self) -> Result<Vec<(String, GuestState)>, RuntimeError> {
        let rows = self
            .manager
            .list_units_by_patterns(&[], &[GUEST_UNIT_PATTERN])
            .await
            .map_err(backend("listing microvm@ units"))?;
        let mut guests = Vec::with_capacity(rows.len());
        for (unit, _, load_state, active_state, sub_state, _, path, ..) in rows {
            let Some(vm) = vm_from_unit_name(&unit) else {
                continue;
            };
            if let Err(e) = names::validate(vm) {
                tracing::warn!("ignoring unit {unit}: {e}");
                continue;
            }
            let mut props = UnitProps {
                load_state: Some(load_state),
                active_state: Some(active_state),
                sub_state: Some(sub_state),
                ..UnitProps::default()
            };
            // How it exited matters for a failed guest only; the unit may have gone in the
            // meantime, and then the list's view is all there is.
            if props.guest_state().phase == Phase::Failed
                && let Err(e) = self.read_interface(&path, SERVICE_INTERFACE, &mut props).await
            {
                tracing::debug!("reading how {unit} exited: {e}");
            }
            guests.push((vm.to_owned(), props.guest_state()));
        }
        guests.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(guests)
    }

    async fn installed(&self) -> Result<BTreeSet<String>, RuntimeError> {
        super::scan_installed(&self.config.state_dir).await
    }

    fn log_source(&self, vm: &str) -> Result<super::logs::LogSource, RuntimeError> {
        Ok(super::logs::LogSource::Journal { unit: unit_name(vm)? })
    }

    async fn ensure_guard(&self, spec: &GuardSpec) -> Result<GuardStatus, RuntimeError> {
        let info = self.guard_unit_info().await?;
        if info.load_state == "loaded" && !info.transient {
            // Declared (the NixOS module): it owns the guard's settings and
            // the guests' start check; we only see that it runs.
            if is_running(&info.active_state) {
                return Ok(GuardStatus::Running);
            }
            self.start_declared_guard(info.active_state == "failed").await?;
            return Ok(GuardStatus::Started(format!("started the declared {GUARD_UNIT}")));
        }
        let description = guard_description(spec);
        let mut status = GuardStatus::Running;
        if info.transient && is_running(&info.active_state) {
            if info.description != description {
                // Stopping the guard stops every guest: replace it only when
                // none runs.
                let guests_up = self.list().await?.iter().any(|(_, state)| state.is_up());
                if guests_up {
                    status = GuardStatus::Degraded(format!(
                        "the running {GUARD_UNIT} has other settings than this agent ({}); it is replaced once no guest \
                         runs on this host",
                        info.description
                    ));
                } else {
                    self.stop_guard().await?;
                    let _ = self.manager.reset_failed_unit(GUARD_UNIT).await;
                    self.start_transient_guard(spec, &description).await?;
                    status = GuardStatus::Started(format!("replaced {GUARD_UNIT} (its settings changed)"));
                }
            }
        } else {
            if info.transient {
                let _ = self.manager.reset_failed_unit(GUARD_UNIT).await;
            }
            self.start_transient_guard(spec, &description).await?;
            status = GuardStatus::Started(format!("created the transient unit {GUARD_UNIT}"));
        }
        // The guests' start check comes after the guard runs.
        match self.ensure_guard_dropin().await {
            Ok(true) => tracing::info!("tied every guest to {GUARD_UNIT} ({GUARD_DROPIN_DIR}/{GUARD_DROPIN_FILE})"),
            Ok(false) => {}
            Err(e) => {
                status = GuardStatus::Degraded(format!(
                    "guests are not tied to {GUARD_UNIT} (a guest could start without a guard): {e}"
                ))
            }
        }
        Ok(status)
    }

    fn events(&self) -> broadcast::Receiver<GuestEvent> {
        match self.events.upgrade() {
            Some(events) => events.subscribe(),
            // The watcher is gone: a receiver that reports Closed at once.
            None => broadcast::channel(1).1,
        }
    }
}

/// The watcher: turns `PropertiesChanged` signals of `microvm@` units into guest events
/// and relays `JobRemoved` to waiting callers. Ends (closing both channels) when the
/// bus connection does.
async fn watch(
    mut properties: MessageStream,
    mut jobs_stream: MessageStream,
    events: broadcast::Sender<GuestEvent>,
    jobs: broadcast::Sender<JobDone>,
) {
    // By object path: what we know of each guest unit and what we last announced. Grows
    // with the guests this host has ever run, not with time.
    let mut units: HashMap<String, Watched> = HashMap::new();
    loop {
        tokio::select! {
            message = properties.next() => match message {
                Some(Ok(message)) => on_properties_changed(&message, &mut units, &events),
                Some(Err(e)) => tracing::warn!("reading a unit signal: {e}"),
                None => break,
            },
            message = jobs_stream.next() => match message {
                Some(Ok(message)) => {
                    if let Some(signal) = JobRemoved::from_message(message) {
                        match signal.args() {
                            Ok(args) => {
                                let _ = jobs.send(JobDone { job: args.job, result: args.result });
                            }
                            Err(e) => tracing::warn!("decoding a JobRemoved signal: {e}"),
                        }
                    }
                }
                Some(Err(e)) => tracing::warn!("reading a job signal: {e}"),
                None => break,
            },
        }
    }
    tracing::error!("the system bus connection is gone: no more guest state changes will be seen");
}

struct Watched {
    vm: String,
    props: UnitProps,
    announced: Option<GuestState>,
}

fn on_properties_changed(
    message: &zbus::Message,
    units: &mut HashMap<String, Watched>,
    events: &broadcast::Sender<GuestEvent>,
) {
    let header = message.header();
    let Some(path) = header.path() else { return };
    if !path.as_str().starts_with(GUEST_UNIT_PATH_PREFIX) {
        return; // some other unit: most signals are
    }
    let watched = match units.get_mut(path.as_str()) {
        Some(watched) => watched,
        None => {
            let vm = vm_from_object_path(path.as_str());
            // The template itself, or a hand-made instance with a name we do not manage.
            let Some(vm) = vm.filter(|vm| names::validate(vm).is_ok()) else {
                return;
            };
            let watched = Watched { vm, props: UnitProps::default(), announced: None };
            units.entry(path.as_str().to_owned()).or_insert(watched)
        }
    };
    let body = message.body();
    let (interface, changed, _invalidated): (String, HashMap<String, OwnedValue>, Vec<String>) =
        match body.deserialize() {
            Ok(body) => body,
            Err(e) => {
                tracing::warn!("decoding PropertiesChanged of {}: {e}", path.as_str());
                return;
            }
        };
    watched.props.merge(&interface, changed.iter().map(|(k, v)| (k.as_str(), &**v)));
    // systemd sends a unit's .Service changes just before its .Unit changes; deciding on
    // the latter sees both, and a change in the former alone is no change of state.
    if interface != UNIT_INTERFACE {
        return;
    }
    let state = watched.props.guest_state();
    if watched.announced.as_ref() == Some(&state) {
        return;
    }
    tracing::debug!(vm = watched.vm, "guest is {state}");
    watched.announced = Some(state.clone());
    let _ = events.send(GuestEvent { vm: watched.vm.clone(), state });
}

/// The properties of a unit that make up a guest's state.
#[derive(Debug, Clone, Default)]
struct UnitProps {
    load_state: Option<String>,
    active_state: Option<String>,
    sub_state: Option<String>,
    result: Option<String>,
    exec_main_code: Option<i32>,
    exec_main_status: Option<i32>,
    restarts: Option<u32>,
}

impl UnitProps {
    fn merge<'a>(&mut self, interface: &str, changed: impl Iterator<Item = (&'a str, &'a Value<'a>)>) {
        let text = |value: &Value<'_>| match value {
            Value::Str(s) => Some(s.as_str().to_owned()),
            _ => None,
        };
        for (name, value) in changed {
            match (interface, name) {
                (UNIT_INTERFACE, "LoadState") => self.load_state = text(value),
                (UNIT_INTERFACE, "ActiveState") => self.active_state = text(value),
                (UNIT_INTERFACE, "SubState") => self.sub_state = text(value),
                (SERVICE_INTERFACE, "Result") => self.result = text(value),
                (SERVICE_INTERFACE, "ExecMainCode") => self.exec_main_code = i32::try_from(value).ok(),
                (SERVICE_INTERFACE, "ExecMainStatus") => self.exec_main_status = i32::try_from(value).ok(),
                (SERVICE_INTERFACE, "NRestarts") => self.restarts = u32::try_from(value).ok(),
                _ => {}
            }
        }
    }

    fn guest_state(&self) -> GuestState {
        let sub = self.sub_state.clone().unwrap_or_default();
        match self.active_state.as_deref() {
            None => GuestState::inactive(),
            Some("active" | "reloading" | "refreshing") => GuestState::new(Phase::Active, sub),
            // Waiting to be restarted after it exited (systemd >= 254 adds -queued).
            Some("activating") if sub.starts_with("auto-restart") => {
                GuestState::new(Phase::Failed, format!("{}; systemd will restart it", self.how_it_ended()))
            }
            Some("activating") => GuestState::new(Phase::Activating, sub),
            Some("deactivating") => GuestState::new(Phase::Deactivating, sub),
            Some("inactive") => match self.load_state.as_deref() {
                Some("loaded") | None => GuestState::inactive(),
                Some(load) => GuestState::new(Phase::Inactive, format!("unit {load}")),
            },
            Some("failed") => GuestState::new(Phase::Failed, self.how_it_ended()),
            Some(other) => GuestState::new(Phase::Inactive, format!("{other} ({sub})")),
        }
    }

    /// "exited with status 3; 2 restarts", "killed by SIGKILL", "result timeout".
    fn how_it_ended(&self) -> String {
        let status = self.exec_main_status.unwrap_or(0);
        let signal = || match nix::sys::signal::Signal::try_from(status) {
            Ok(signal) => signal.to_string(),
            Err(_) => format!("signal {status}"),
        };
        let mut facts = Vec::new();
        match self.exec_main_code {
            Some(CLD_EXITED) => facts.push(format!("exited with status {status}")),
            Some(CLD_KILLED) => facts.push(format!("killed by {}", signal())),
            Some(CLD_DUMPED) => facts.push(format!("dumped core on {}", signal())),
            _ => {}
        }
        // These results only restate how the main process ended, when we know that.
        let restates_exit = matches!(self.result.as_deref(), Some("success" | "exit-code" | "signal" | "core-dump"));
        match &self.result {
            Some(_) if restates_exit && !facts.is_empty() => {}
            Some(result) => facts.push(format!("result {result}")),
            None if facts.is_empty() => facts.push("how it ended is unknown".into()),
            None => {}
        }
        match self.restarts {
            Some(0) | None => {}
            Some(1) => facts.push("1 restart".into()),
            Some(n) => facts.push(format!("{n} restarts")),
        }
        facts.join("; ")
    }
}

/// `microvm@<vm>.service`, for a valid `vm` only.
fn unit_name(vm: &str) -> Result<String, RuntimeError> {
    names::validate(vm)?;
    Ok(format!("microvm@{vm}.service"))
}

fn vm_from_unit_name(unit: &str) -> Option<&str> {
    unit.strip_prefix("microvm@")?.strip_suffix(".service")
}

/// The VM of a `microvm@` unit's object path: the last element unescaped (systemd
/// writes every byte outside `[A-Za-z0-9]` as `_xx`).
fn vm_from_object_path(path: &str) -> Option<String> {
    let label = path.strip_prefix(UNIT_PATH_PREFIX)?.as_bytes();
    let mut unit = Vec::with_capacity(label.len());
    let mut i = 0;
    while i < label.len() {
        if label[i] == b'_' {
            let hex = std::str::from_utf8(label.get(i + 1..i + 3)?).ok()?;
            unit.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            unit.push(label[i]);
            i += 1;
        }
    }
    vm_from_unit_name(&String::from_utf8(unit).ok()?).map(str::to_owned)
}

fn is_no_such_unit(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::MethodError(name, _, _) if name.as_str() == NO_SUCH_UNIT)
}

/// `KillUnit` of a unit without processes.
fn is_no_such_process(e: &zbus::Error) -> bool {
    matches!(e, zbus::Error::MethodError(name, _, _) if name.as_str() == NO_SUCH_PROCESS)
}

fn backend<E: std::error::Error + Send + Sync + 'static>(context: impl Into<String>) -> impl FnOnce(E) -> RuntimeError {
    let context = context.into();
    move |e| RuntimeError::Backend { context, source: Box::new(e) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths_map_back_to_vm_names() {
        let path = "/org/freedesktop/systemd1/unit/microvm_40web_2d1_2eservice";
        assert!(path.starts_with(GUEST_UNIT_PATH_PREFIX));
        assert_eq!(vm_from_object_path(path).as_deref(), Some("web-1"));
        assert_eq!(
            vm_from_object_path("/org/freedesktop/systemd1/unit/microvm_40_39db_2eservice").as_deref(),
            Some("9db")
        );
        // The template, other units, malformed escapes.
        assert_eq!(vm_from_object_path("/org/freedesktop/systemd1/unit/microvm_40_2eservice").as_deref(), Some(""));
        assert_eq!(vm_from_object_path("/org/freedesktop/systemd1/unit/dbus_2eservice"), None);
        assert_eq!(vm_from_object_path("/org/freedesktop/systemd1/unit/microvm_40x_2"), None);
        assert_eq!(vm_from_object_path("/elsewhere/microvm_40x_2eservice"), None);
    }

    #[test]
    fn unit_names_only_for_valid_vms() {
        assert_eq!(unit_name("web").unwrap(), "microvm@web.service");
        assert!(unit_name("../web").is_err());
        assert!(unit_name("a.service b").is_err());
    }

    fn props(active: &str, sub: &str) -> UnitProps {
        UnitProps {
            load_state: Some("loaded".into()),
            active_state: Some(active.into()),
            sub_state: Some(sub.into()),
            ..UnitProps::default()
        }
    }

    #[test]
    fn unit_states_map_to_guest_phases() {
        assert_eq!(props("active", "running").guest_state(), GuestState::new(Phase::Active, "running"));
        assert_eq!(props("activating", "start").guest_state().phase, Phase::Activating);
        assert_eq!(props("deactivating", "stop-sigterm").guest_state().phase, Phase::Deactivating);
        assert_eq!(props("inactive", "dead").guest_state(), GuestState::inactive());
        let crashed = UnitProps {
            result: Some("exit-code".into()),
            exec_main_code: Some(CLD_EXITED),
            exec_main_status: Some(3),
            restarts: Some(2),
            ..props("activating", "auto-restart")
        };
        assert_eq!(
            crashed.guest_state(),
            GuestState::new(Phase::Failed, "exited with status 3; 2 restarts; systemd will restart it")
        );
        let killed = UnitProps {
            result: Some("signal".into()),
            exec_main_code: Some(CLD_KILLED),
            exec_main_status: Some(9),
            ..props("failed", "failed")
        };
        assert_eq!(killed.guest_state(), GuestState::new(Phase::Failed, "killed by SIGKILL"));
        let timed_out = UnitProps { result: Some("timeout".into()), ..props("failed", "failed") };
        assert_eq!(timed_out.guest_state(), GuestState::new(Phase::Failed, "result timeout"));
        assert_eq!(props("failed", "failed").guest_state(), GuestState::new(Phase::Failed, "how it ended is unknown"));
        let missing = UnitProps { load_state: Some("not-found".into()), ..props("inactive", "dead") };
        assert_eq!(missing.guest_state(), GuestState::new(Phase::Inactive, "unit not-found"));
    }

    #[test]
    fn property_changes_merge_by_interface() {
        let mut p = UnitProps::default();
        let active = Value::from("active");
        let result = Value::from("success");
        let restarts = Value::U32(4);
        p.merge(UNIT_INTERFACE, [("ActiveState", &active), ("Result", &result)].into_iter());
        p.merge(SERVICE_INTERFACE, [("Result", &result), ("NRestarts", &restarts)].into_iter());
        assert_eq!(p.active_state.as_deref(), Some("active"));
        assert_eq!(p.result.as_deref(), Some("success"));
        assert_eq!(p.restarts, Some(4));
    }
}

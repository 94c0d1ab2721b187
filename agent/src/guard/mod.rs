//! The fence guard: stops this host's guests when its quorum contact is
//! too old, without needing a live agent.
//!
//! The agent's reconciler fences its host itself (`failure::Fence`), but
//! only while it runs: a frozen, stopped, crash-looping or killed agent
//! fences nothing, and the leader moves its VMs anyway once it has not
//! heard from the host for `reschedule_after`. The guard closes that gap.
//! It is a separate process (`blixard-agent guard`, the same binary) with
//! no network and no Raft. Its only input is the contact the agent records
//! (`<data_dir>/fence-contact`, see [`record`]): the send time of the
//! newest quorum contact the current leader confirmed, on the boot-wide
//! monotonic clock. Once that is `fence_after` old, the guard stops every
//! guest (except those with `failover = "manual"`, listed in
//! `<data_dir>/fence-exempt`) at once (SIGKILL: a fenced guest is
//! abandoned, see `runtime::Runtime::kill`), within `stop_max`, and keeps them stopped
//! until the contact is fresh again.
//!
//! # The layers (systemd runtime)
//!
//! 1. **The agent** fences itself, as before (`reconciler`).
//! 2. **The guard** (`blixard-guard.service`, root, no network) fences from
//!    the contact record when the agent does not. It survives agent
//!    restarts: an agent that is back within `fence_after` renews the
//!    record and nothing stops.
//! 3. **PID 1's watchdog on the guard.** With every check the guard tells
//!    systemd its watchdog timeout (`WATCHDOG_USEC`): the fence deadline
//!    plus one check interval. A guard that freezes or dies is therefore
//!    killed by systemd (`WatchdogSignal=SIGKILL`) no later than that, and
//!    the unit's `ExecStopPost` (`guard --fence-if-stale`, a fresh process)
//!    fences; then systemd restarts the guard (`Restart=always`).
//! 4. **No guard, no guest**: every `microvm@` unit checks before it starts
//!    that the guard is active (`ExecStartPre=systemctl is-active ...`), and
//!    is ordered after it. A check, not a dependency: on systemd 252
//!    `BindsTo=`, `Requires=` and `Requisite=` all pass the guard's restart
//!    after a crash on to every guest, which systemd would then stop and
//!    start by itself (seen in the container test bed).
//! 5. **The host's own watchdog** (`RuntimeWatchdogSec`, a hardware or soft
//!    watchdog; the NixOS option `services.blixard.hostWatchdog`) reboots
//!    the host when PID 1 or the kernel hangs.
//!
//! The agent sets layers 2 to 4 up itself when nothing declared them (a
//! host set up by hand: a transient unit and a runtime drop-in, see
//! `runtime::systemd`); the NixOS module declares them instead.
//!
//! With the `process` runtime (development and tests) the guard is a child
//! process of the agent that dies with it (so do the guests); it kills the
//! guest process groups of a frozen agent (`procfs`).
//!
//! # The timing it keeps
//!
//! The guard checks the record every [`GuardConfig::period_ms`] (at most
//! 50 ms), so it starts fencing within that of the deadline, and is done
//! `stop_max` later: within `fence_after + check_interval + stop_max` of
//! the contact, the bound `failure::Timing::validate` already holds the
//! leader's `reschedule_after` to. A frozen guard is killed at the
//! deadline plus one check interval at the latest (layer 3), and its
//! stop-post is done `stop_max` after that: the same bound.
//!
//! While the contact stays stale it passes again at every check, to stop a
//! guest whose start raced the deadline; only the agent starts guests, and
//! it starts none without fresh contact of its own. The first pass of a
//! fence is *thorough*: with the `process` runtime it reads every process
//! of the machine, the later ones only the agent's children (`procfs`).
//! With the `process` runtime a pass that found nothing to stop is
//! repeated every [`PROCESS_IDLE_PASS_MS`] once the fence is that old, not
//! at every check (100 agents' guards on one machine passing 20 times a
//! second took both of its cores): the guests running at the deadline are
//! stopped within the bound as before, and so is a start that raced it by
//! the passes of the fence's first second (one held up longer than that,
//! on a starved machine, is stopped within a second of appearing).
//!
//! [`Guard`] is the pure decision (what a check sees, what it does, what
//! it asks of the watchdog); [`run`] and [`fence_if_stale`] are the shell.

pub mod procfs;
pub mod record;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use record::{ContactFile, ExemptFile, NoContact};

use crate::clock::monotonic_ms;
use crate::config::RuntimeKind;
use crate::failure::Timing;
use crate::runtime::{GuardSpec, KILL_WAIT, Runtime, RuntimeError};

/// The guard's settings: the flags of `blixard-agent guard`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    pub data_dir: PathBuf,
    pub state_dir: PathBuf,
    pub runtime: RuntimeKind,
    pub fence_after_ms: u64,
    pub stop_max_ms: u64,
    pub check_interval_ms: u64,
}

impl GuardConfig {
    /// The guard of an agent with these settings.
    pub fn new(data_dir: &Path, state_dir: &Path, runtime: RuntimeKind, timing: &Timing) -> Self {
        GuardConfig {
            data_dir: data_dir.to_owned(),
            state_dir: state_dir.to_owned(),
            runtime,
            fence_after_ms: timing.fence_after_ms,
            stop_max_ms: timing.stop_max_ms,
            check_interval_ms: timing.check_interval_ms,
        }
    }

    /// How often the guard reads the contact record.
    pub fn period_ms(&self) -> u64 {
        (self.check_interval_ms / 3).clamp(10, 50)
    }

    /// The command line of `blixard-agent guard` with these settings (after
    /// the program name); `fence_if_stale` for the one-shot stop-post.
    pub fn args(&self, fence_if_stale: bool) -> Vec<String> {
        let mut args = vec!["guard".to_string()];
        if fence_if_stale {
            args.push("--fence-if-stale".into());
        }
        let runtime = match self.runtime {
            RuntimeKind::Systemd => "systemd",
            RuntimeKind::Process => "process",
        };
        args.extend([
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--runtime".into(),
            runtime.into(),
            "--fence-after-ms".into(),
            self.fence_after_ms.to_string(),
            "--stop-max-ms".into(),
            self.stop_max_ms.to_string(),
            "--check-interval-ms".into(),
            self.check_interval_ms.to_string(),
        ]);
        args
    }

    /// What the runtime keeps running: this binary as the guard.
    pub fn spec(&self, program: PathBuf) -> GuardSpec {
        GuardSpec {
            program,
            args: self.args(false),
            stop_post_args: self.args(true),
            watchdog_ms: self.fence_after_ms + self.check_interval_ms,
        }
    }

    fn guard(&self) -> Guard {
        Guard::new(self.fence_after_ms, self.check_interval_ms, self.fence_budget_ms())
    }

    /// The watchdog timeout while fencing: a stop may take `stop_max`, and
    /// a kill after it up to [`KILL_WAIT`].
    fn fence_budget_ms(&self) -> u64 {
        self.stop_max_ms + KILL_WAIT.as_millis() as u64 + 2_000
    }
}

/// What one look at the contact record found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Contact at `contact_ms`; the guests may run until `deadline_ms`.
    Fresh { contact_ms: u64, deadline_ms: u64 },
    /// No contact that counts: the host must not run guests.
    Stale(Stale),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    NoContact(NoContact),
    Expired { contact_ms: u64, age_ms: u64 },
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stale::NoContact(why) => why.fmt(f),
            Stale::Expired { age_ms, .. } => write!(f, "the last quorum contact is {age_ms} ms old"),
        }
    }
}

/// Judges a contact read at `now_ms`: fresh strictly before
/// `contact + fence_after`, as `failure::Fence::should_fence` decides.
pub fn judge(contact: Result<u64, NoContact>, now_ms: u64, fence_after_ms: u64) -> Verdict {
    match contact {
        Err(why) => Verdict::Stale(Stale::NoContact(why)),
        Ok(contact_ms) => {
            let deadline_ms = contact_ms.saturating_add(fence_after_ms);
            if now_ms > deadline_ms {
                Verdict::Stale(Stale::Expired { contact_ms, age_ms: now_ms - contact_ms })
            } else {
                Verdict::Fresh { contact_ms, deadline_ms }
            }
        }
    }
}

/// The guard's decision procedure, pure: feed it each look at the record.
#[derive(Debug, Clone)]
pub struct Guard {
    fence_after_ms: u64,
    slack_ms: u64,
    fence_budget_ms: u64,
    fencing: bool,
}

/// What one check decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub verdict: Verdict,
    /// Stop every guest that is up (but the exempt ones) now.
    pub fence: bool,
    /// The watchdog timeout to give systemd with this check's ping: a
    /// guard that does not check again within it is killed, and its
    /// stop-post fences.
    pub watchdog_timeout_ms: u64,
    /// The verdict changed between fresh and stale with this check (for
    /// the log: one line per change, not per check).
    pub changed: bool,
}

impl Guard {
    /// `slack_ms`: how far past the fence deadline a frozen guard may be
    /// killed (one check interval, the reconciler's own lateness).
    pub fn new(fence_after_ms: u64, slack_ms: u64, fence_budget_ms: u64) -> Self {
        Guard { fence_after_ms, slack_ms: slack_ms.max(1), fence_budget_ms, fencing: false }
    }

    pub fn fencing(&self) -> bool {
        self.fencing
    }

    pub fn step(&mut self, now_ms: u64, contact: Result<u64, NoContact>) -> Step {
        let verdict = judge(contact, now_ms, self.fence_after_ms);
        let (fence, watchdog_timeout_ms) = match &verdict {
            Verdict::Fresh { deadline_ms, .. } => (false, deadline_ms - now_ms + self.slack_ms),
            Verdict::Stale(_) => (true, self.fence_budget_ms),
        };
        let changed = fence != self.fencing;
        self.fencing = fence;
        Step { verdict, fence, watchdog_timeout_ms, changed }
    }
}

/// The guests the guard can see and stop.
#[async_trait]
pub trait Guests: Send + Sync {
    /// Every guest that may be running now. Not `thorough`, a runtime may
    /// use a cheaper listing that can miss a guest starting or exiting at
    /// that very moment (`procfs`); the next pass finds it.
    async fn up(&self, thorough: bool) -> Result<Vec<String>, RuntimeError>;
    /// Kills `vm` at once (SIGKILL to all its processes, and kept down) and
    /// waits until it is gone: a fenced guest is abandoned, so it is not
    /// given a graceful stop (see `Runtime::kill`).
    async fn kill(&self, vm: &str) -> Result<(), RuntimeError>;
}

/// The systemd runtime's guests, as the agent sees them.
struct RuntimeGuests(Arc<dyn Runtime>);

#[async_trait]
impl Guests for RuntimeGuests {
    async fn up(&self, _thorough: bool) -> Result<Vec<String>, RuntimeError> {
        Ok(self.0.list().await?.into_iter().filter(|(_, s)| s.is_up()).map(|(vm, _)| vm).collect())
    }

    async fn kill(&self, vm: &str) -> Result<(), RuntimeError> {
        self.0.kill(vm).await.map(|_| ())
    }
}

async fn open_guests(config: &GuardConfig) -> anyhow::Result<Arc<dyn Guests>> {
    Ok(match config.runtime {
        RuntimeKind::Systemd => {
            let runtime = crate::runtime::systemd::SystemdRuntime::connect(
                crate::runtime::systemd::SystemdConfig::new(&config.state_dir),
            )
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach systemd: {e}"))?;
            Arc::new(RuntimeGuests(Arc::new(runtime)))
        }
        RuntimeKind::Process => Arc::new(procfs::ProcessGuests::of_parent(&config.state_dir)?),
    })
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

fn watchdog_usec(ms: u64) -> u32 {
    u32::try_from(ms.saturating_mul(1000)).unwrap_or(u32::MAX)
}

/// Kills every guest that is up and not exempt, all at once (each kill is
/// sent within `stop_max`). Looks at the record again just before each stop: contact
/// that came back in the meantime (the agent got it and may be starting
/// guests) cancels the stop.
///
/// How many guests it found to stop (`None`: it could not list them).
/// `thorough` for the first pass of a fence (see [`Guests::up`]).
async fn fence_pass(config: &GuardConfig, contact: &ContactFile, guests: &dyn Guests, thorough: bool) -> Option<usize> {
    let up = match guests.up(thorough).await {
        Ok(up) => up,
        Err(e) => {
            tracing::error!(error = %e, "cannot list the guests to fence; trying again");
            return None;
        }
    };
    let exempt: BTreeSet<String> = ExemptFile::in_dir(&config.data_dir).load();
    let up: Vec<String> = up.into_iter().filter(|vm| !exempt.contains(vm)).collect();
    let found = up.len();
    let stops = up.into_iter().map(|vm| async move {
        if matches!(judge(contact.read(monotonic_ms()), monotonic_ms(), config.fence_after_ms), Verdict::Fresh { .. }) {
            return;
        }
        tracing::warn!(vm, "fencing: killing guest");
        if let Err(e) = guests.kill(&vm).await {
            tracing::error!(vm, error = %e, "fencing: killing the guest failed");
        }
    });
    futures_util::future::join_all(stops).await;
    Some(found)
}

/// With the `process` runtime a fence pass reads `/proc` (`procfs`), and
/// one machine may run many agents (tests run 100):
/// every guard passing every period through a long fence took both cores
/// of such a machine, so that no agent could get its contact back. So,
/// with that runtime only, once a fence is this old, a pass that found no
/// guest to stop waits this long for the next. See the module
/// documentation for why that keeps the bound.
pub const PROCESS_IDLE_PASS_MS: u64 = 1000;

/// When the guard passes: at every check of a fence, but see
/// [`PROCESS_IDLE_PASS_MS`]. Pure, for the tests; `run` feeds it.
#[derive(Debug, Clone, Default)]
pub struct Passes {
    /// When the current fence began (`monotonic_ms`); `None` while fresh.
    fenced_since_ms: Option<u64>,
    /// When the next pass is due; 0: at the next check.
    next_pass_ms: u64,
}

/// A pass to make now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// The first of its fence: look at everything (see [`Guests::up`]).
    pub thorough: bool,
}

impl Passes {
    /// A check at `now_ms` that decided `fence`: the pass to make, if any.
    pub fn due(&mut self, fence: bool, now_ms: u64) -> Option<Pass> {
        if !fence {
            // A new fence passes at once, whatever the last one planned.
            *self = Passes::default();
            return None;
        }
        let thorough = self.fenced_since_ms.is_none();
        self.fenced_since_ms.get_or_insert(now_ms);
        (now_ms >= self.next_pass_ms).then_some(Pass { thorough })
    }

    /// The pass made at `now_ms` found `found` guests to stop (`None`: it
    /// could not list them): the next is due at the next check, unless
    /// [`PROCESS_IDLE_PASS_MS`] applies.
    pub fn done(&mut self, runtime: RuntimeKind, now_ms: u64, found: Option<usize>) {
        let since = self.fenced_since_ms.unwrap_or(now_ms);
        let idle = runtime == RuntimeKind::Process && found == Some(0);
        self.next_pass_ms =
            if idle && now_ms >= since + PROCESS_IDLE_PASS_MS { now_ms + PROCESS_IDLE_PASS_MS } else { 0 };
    }
}

/// One check: reads the record, tells the watchdog, logs a change.
fn check(guard: &mut Guard, contact: &ContactFile) -> Step {
    let now = monotonic_ms();
    let step = guard.step(now, contact.read(now));
    notify(&[
        sd_notify::NotifyState::WatchdogUsec(watchdog_usec(step.watchdog_timeout_ms)),
        sd_notify::NotifyState::Watchdog,
    ]);
    match (&step.verdict, step.changed) {
        (Verdict::Stale(why), true) => {
            tracing::warn!(reason = %why, "no quorum contact: fencing, stopping every guest on this host")
        }
        (Verdict::Fresh { .. }, true) => tracing::info!("quorum contact is back; guests may run again"),
        _ => {}
    }
    step
}

/// `blixard-agent guard`: checks the record every period until `shutdown`.
pub async fn run(config: GuardConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let contact = ContactFile::in_dir(&config.data_dir);
    let mut guard = config.guard();
    // The first look, and the watchdog set from it, before anything that
    // may take time: a new guard's deadline is the contact's, not systemd's
    // start-up watchdog.
    let first = check(&mut guard, &contact);
    let guests = open_guests(&config).await?;
    tracing::info!(
        data_dir = %config.data_dir.display(),
        fence_after_ms = config.fence_after_ms,
        stop_max_ms = config.stop_max_ms,
        fencing = first.fence,
        "fence guard running"
    );
    notify(&[sd_notify::NotifyState::Ready]);
    let mut tick = tokio::time::interval(Duration::from_millis(config.period_ms()));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut passes = Passes::default();
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            _ = tick.tick() => {}
        }
        let fence = check(&mut guard, &contact).fence;
        let now = monotonic_ms();
        let Some(pass) = passes.due(fence, now) else { continue };
        let found = fence_pass(&config, &contact, guests.as_ref(), pass.thorough).await;
        passes.done(config.runtime, now, found);
        notify(&[sd_notify::NotifyState::Watchdog]);
    }
}

/// `blixard-agent guard --fence-if-stale`: the guard unit's stop-post. If
/// the contact is stale, stops every guest (but the exempt) and waits for
/// them; either way returns, and systemd restarts the guard.
pub async fn fence_if_stale(config: GuardConfig) -> anyhow::Result<()> {
    let contact = ContactFile::in_dir(&config.data_dir);
    let now = monotonic_ms();
    let result = std::env::var("SERVICE_RESULT").unwrap_or_default();
    match judge(contact.read(now), now, config.fence_after_ms) {
        Verdict::Fresh { deadline_ms, .. } => {
            tracing::info!(
                service_result = result,
                fence_in_ms = deadline_ms - now,
                "the guard stopped while quorum contact is fresh; nothing to fence"
            );
            Ok(())
        }
        Verdict::Stale(why) => {
            tracing::warn!(
                service_result = result,
                reason = %why,
                "the guard stopped without quorum contact: fencing, stopping every guest on this host"
            );
            let guests = open_guests(&config).await?;
            fence_pass(&config, &contact, guests.as_ref(), true).await;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;

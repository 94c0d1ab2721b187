//! The reconciler: makes this host run exactly what the committed state
//! places on it, and tells the cluster what it sees.
//!
//! Every `check_interval` (and whenever a guest or the state changes) it
//! compares the state as applied here with what the runtime reports:
//!
//! - a VM placed here, desired running, with no pending handoff, starts —
//!   unless the host is fenced, its state has not caught up with its last
//!   quorum contact, or the guest keeps failing (back-off, then `failed`);
//! - every other guest that is up stops: VMs placed elsewhere (and once
//!   stopped, the move's handoff is released with `Released`), VMs desired
//!   stopped, and guests the state does not know;
//! - a fenced host (no quorum contact for `fence_after`) kills every guest
//!   at once (`Runtime::kill`: no graceful stop for an abandoned guest),
//!   within `stop_max`;
//! - a running guest whose runner changed (`current` no longer what it
//!   booted from) is restarted on the new one, one guest at a time (see
//!   `runners`);
//! - the observed state and last error of each VM placed here is reported
//!   when it differs from what the state says, and the runners installed
//!   under the state dir when they differ from the member's record.
//!
//! Starting a VM is never a side effect of an RPC or of Raft apply: this
//! loop is the only thing that starts or stops guests.
//!
//! Quorum contact normally comes confirmed by the leader, riding its
//! heartbeats (`node::Contact`); when none has come for
//! [`Timing::contact_read_after_ms`], the host sends a linearizable read (a
//! Raft read index) of its own. Either way the contact time is a *send*
//! time of this host's, see the safety argument in `failure`.

mod runners;

pub use crate::clock::monotonic_ms;
pub use crate::guard::{ContactFile, ExemptFile};
pub use runners::RunnerWatch;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::failure::{Fence, Timing};
use crate::node::events::{Derived, EventKind};
use crate::node::{Contact, NodeHandle};
use crate::runtime::health::{Health, HealthPolicy, Verdict};
use crate::runtime::{GuestState, Phase, Runtime};
use crate::state::{CommandKind, Desired, Failover, NodeId, State, VmState};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How the reconciler proposes commands: through the leader, wherever it
/// is. Failures are only logged (the next pass tries again), so the error
/// is a sentence.
pub trait Proposer: Send + Sync + 'static {
    fn propose(&self, kind: CommandKind) -> BoxFuture<'_, Result<(), String>>;
}

/// Proposes on the local node; only useful where this node is the leader
/// (single-node clusters, tests).
impl Proposer for NodeHandle {
    fn propose(&self, kind: CommandKind) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { NodeHandle::propose(self, kind).await.map(|_| ()).map_err(|e| e.to_string()) })
    }
}

/// How often the installed runners are rescanned.
const RUNNER_SCAN_INTERVAL: Duration = Duration::from_secs(5);
/// The longest a fence read may wait for its answer before another is sent.
const CONTACT_READ_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    pub timing: Timing,
    pub health: HealthPolicy,
    /// Where the last quorum contact is kept across agent restarts, and
    /// read by the fence guard.
    pub contact_file: Option<ContactFile>,
    /// Where the guests no fence stops (`failover = "manual"`) are listed
    /// for the fence guard.
    pub exempt_file: Option<ExemptFile>,
    /// Where pass latency and self-fencing are counted.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where to see that a running guest's runner changed (systemd runtime);
    /// `None`: guests are never rolled to a new runner.
    pub runners: Option<RunnerWatch>,
}

/// What one pass needs from the state, copied out of the raft thread.
#[derive(Debug, Clone, Default)]
struct View {
    applied: u64,
    /// VMs placed here: name -> (generation, desired, may start, reported state, reported error).
    mine: BTreeMap<String, Mine>,
    /// Handoffs waiting for this host: name -> handoff generation.
    handoffs: BTreeMap<String, u64>,
    /// Of the guests up on this host (`up` given to [`view`]), those the
    /// state knows. Only these, never every VM's name: the view is built
    /// on the raft thread after every applied change, so it must not cost
    /// O(VMs in the cluster) in copies.
    known: BTreeSet<String>,
    runners: Option<BTreeSet<String>>,
    /// VMs here (placed, or a copy handed off) that no fence stops.
    exempt: BTreeSet<String>,
}

#[derive(Debug, Clone)]
struct Mine {
    generation: u64,
    desired: Desired,
    may_start: bool,
    state: VmState,
    last_error: Option<String>,
}

fn view(state: &State, me: NodeId, applied: u64, up: &[String]) -> View {
    let mine = state
        .vms_on(me)
        .map(|vm| {
            let generation = vm.placement.map_or(0, |p| p.generation);
            (
                vm.name.clone(),
                Mine {
                    generation,
                    desired: vm.spec.desired,
                    may_start: vm.may_start_on(me),
                    state: vm.observed.state,
                    last_error: vm.observed.last_error.clone(),
                },
            )
        })
        .collect();
    let manual = |vm: &crate::state::Vm| vm.spec.failover == Failover::Manual;
    View {
        applied,
        exempt: state
            .vms_on(me)
            .filter(|vm| manual(vm))
            .chain(state.handoffs_from(me).map(|(vm, _)| vm).filter(|vm| manual(vm)))
            .map(|vm| vm.name.clone())
            .collect(),
        mine,
        handoffs: state.handoffs_from(me).map(|(vm, h)| (vm.name.clone(), h.generation)).collect(),
        known: up.iter().filter(|name| state.vm(name).is_some()).cloned().collect(),
        runners: state.member(me).map(|m| m.runners.clone()),
    }
}

/// Per-guest bookkeeping of this host.
struct Guest {
    generation: u64,
    health: Health,
    /// Do not start before this (back-off after a failure).
    not_before_ms: u64,
    /// The last failure's detail, reported with the state.
    last_error: Option<String>,
    /// It failed here since it was last started: its next start is a
    /// restart (`guest_restarts_total`).
    failed_since_start: bool,
}

/// Why this host stops a guest: the words for the log, and the label of
/// `guest_stops_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    DesiredStopped,
    MovedAway,
    PlacedElsewhere,
    NotInState,
    Fenced,
    Removed,
    RunnerChanged,
}

impl StopReason {
    fn words(self) -> &'static str {
        match self {
            StopReason::DesiredStopped => "desired stopped",
            StopReason::MovedAway => "moved to another host",
            StopReason::PlacedElsewhere => "placed on another host",
            StopReason::NotInState => "not in the cluster state",
            StopReason::Fenced => "fenced",
            StopReason::Removed => "removed from the cluster",
            StopReason::RunnerChanged => "its runner changed: restarting it on the new one",
        }
    }

    fn label(self) -> &'static str {
        match self {
            StopReason::DesiredStopped => "desired_stopped",
            StopReason::MovedAway | StopReason::PlacedElsewhere => "moved",
            StopReason::NotInState => "not_in_state",
            StopReason::Fenced => "fenced",
            StopReason::Removed => "removed",
            StopReason::RunnerChanged => "runner_changed",
        }
    }
}

enum Done {
    Started { vm: String, result: Result<(), String> },
    Stopped { vm: String, reason: StopReason, result: Result<(), String> },
    Proposed { key: String },
    Contact { sent_at_ms: u64, commit: Option<u64> },
}

pub struct Reconciler {
    me: NodeId,
    node: NodeHandle,
    runtime: Arc<dyn Runtime>,
    proposer: Arc<dyn Proposer>,
    config: ReconcilerConfig,
    fence: Fence,
    observed: BTreeMap<String, GuestState>,
    guests: BTreeMap<String, Guest>,
    /// Runtime operations and proposals in flight, so a pass never repeats
    /// one that has not finished.
    busy: BTreeSet<String>,
    /// Guests this agent stopped or killed since it last started them: their
    /// exit is not a failure.
    stopped_by_us: BTreeSet<String>,
    /// Running guests booted from a runner that is no longer `current`, as of
    /// the last runner scan.
    stale_runners: BTreeSet<String>,
    contact_in_flight: bool,
    fenced_logged: bool,
    /// This fence was a real one (it had quorum contact before, unlike a
    /// fresh start): its end is an event too.
    fence_recorded: bool,
    /// This host was removed from the cluster: it stopped everything and
    /// revoked its contact, for good (until `cluster join`).
    removed: bool,
    /// The guests no fence stops, as last written for the guard; kept
    /// across passes so a fence that cannot read the state still spares
    /// them.
    exempt: BTreeSet<String>,
    /// The last pass found the fence open and guests free to start: a new
    /// quorum contact then changes nothing until the next tick's pass.
    contact_settled: bool,
    /// The last pass's view, with the guests that were up then: a tick's
    /// pass reuses it while the applied index and the guests are the same
    /// (the state at an applied index never changes), which at rest spares
    /// a trip to the raft thread every check interval.
    last_view: Option<(Vec<String>, Arc<View>)>,
    /// An applied change arrived since the last view was read.
    state_changed: bool,
    /// Quorum contact confirmed by the leader (see `node::Contact`).
    confirmed: watch::Receiver<Option<Contact>>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
}

impl Reconciler {
    pub fn new(
        me: NodeId,
        node: NodeHandle,
        runtime: Arc<dyn Runtime>,
        proposer: Arc<dyn Proposer>,
        config: ReconcilerConfig,
    ) -> Self {
        // What the previous agent recorded, if it still counts (this boot,
        // not revoked, not in the future: see `guard::record`).
        let last_contact = config.contact_file.as_ref().and_then(|file| file.load(monotonic_ms()));
        let exempt = config.exempt_file.as_ref().map(ExemptFile::load).unwrap_or_default();
        let fence = Fence::new(config.timing.fence_after_ms, last_contact);
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let confirmed = node.watch_contact();
        Reconciler {
            me,
            node,
            runtime,
            proposer,
            config,
            fence,
            observed: BTreeMap::new(),
            guests: BTreeMap::new(),
            busy: BTreeSet::new(),
            stopped_by_us: BTreeSet::new(),
            stale_runners: BTreeSet::new(),
            contact_in_flight: false,
            fenced_logged: false,
            fence_recorded: false,
            removed: false,
            exempt,
            contact_settled: false,
            last_view: None,
            state_changed: true,
            confirmed,
            done_tx,
            done_rx,
        }
    }

    /// Runs until `shutdown` resolves. Guests are left as they are on
    /// shutdown: the systemd runtime's survive the agent, the process
    /// runtime's die with it.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), crate::runtime::RuntimeError> {
        let mut events = self.runtime.events();
        // Re-adopt what already runs (subscribe first, then list).
        for (vm, state) in self.runtime.list().await? {
            self.observed.insert(vm, state);
        }
        let mut effects = self.node.subscribe_effects();
        let mut tick = tokio::time::interval(Duration::from_millis(self.config.timing.check_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut scan = tokio::time::interval(RUNNER_SCAN_INTERVAL);
        let mut installed: Option<BTreeSet<String>> = None;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                event = events.recv() => match event {
                    Ok(event) => self.on_guest(event.vm, event.state),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        self.observed = self.runtime.list().await?.into_iter().collect();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return Err(crate::runtime::RuntimeError::Closed("guest events ended".into()));
                    }
                },
                // Any applied change may concern us; the pass below reads it.
                // One pass for every effect already queued, not one each.
                _ = effects.recv() => {
                    while effects.try_recv().is_ok() {}
                    self.state_changed = true;
                }
                Some(done) = self.done_rx.recv() => {
                    // A contact that only renews an open fence needs no pass
                    // (at rest that is one pass, and one trip to the raft
                    // thread, per check interval saved).
                    let renewal = matches!(done, Done::Contact { commit: Some(_), .. }) && self.contact_settled;
                    self.on_done(done);
                    if renewal {
                        continue;
                    }
                }
                _ = tick.tick() => {
                    self.take_confirmed();
                    // Confirmations keep the contact fresh; a read of our own
                    // only when they stop (no leader, or one that does not
                    // confirm).
                    let read_after = self.config.timing.contact_read_after_ms();
                    if self.fence.last_contact_ms().is_none_or(|c| monotonic_ms().saturating_sub(c) > read_after) {
                        self.send_contact_read();
                    }
                }
                _ = scan.tick() => {
                    match self.runtime.installed().await {
                        Ok(set) => installed = Some(set),
                        Err(e) => tracing::warn!(error = %e, "cannot scan the installed guests"),
                    }
                    if let Some(watch) = &self.config.runners {
                        // Collected first: no iterator (and its closures) lives across the await.
                        let active: Vec<String> =
                            self.observed.iter().filter(|(_, s)| s.phase == Phase::Active).map(|(vm, _)| vm.clone()).collect();
                        self.stale_runners = watch.clone().stale(&active).await;
                    }
                }
            }
            self.take_confirmed();
            let started = std::time::Instant::now();
            self.pass(installed.as_ref()).await;
            self.config.metrics.observe_reconcile(started.elapsed());
        }
    }

    fn on_guest(&mut self, vm: String, state: GuestState) {
        // A guest this agent is stopping or killing did not fail: a fence's
        // kill leaves a systemd unit `failed` (SIGKILL), and counting that
        // would put a guest that was fenced a few times into back-off, then
        // `failed`, for good.
        let entered_failure = !self.stopped_by_us.contains(&vm)
            && state.phase == Phase::Failed
            && self.observed.get(&vm).is_none_or(|old| old.phase != Phase::Failed);
        if entered_failure && let Some(guest) = self.guests.get_mut(&vm) {
            self.config.metrics.guest_failures.inc();
            guest.failed_since_start = true;
            let now = monotonic_ms();
            guest.last_error = state.detail.clone().or_else(|| Some("the guest exited".into()));
            match guest.health.record_failure(now) {
                Verdict::Restart { at_ms, failures_in_window } => {
                    tracing::warn!(
                        vm,
                        failures = failures_in_window,
                        retry_in_ms = at_ms - now,
                        "guest failed; restarting it after a back-off"
                    );
                    guest.not_before_ms = at_ms;
                }
                Verdict::GiveUp { failures_in_window } => {
                    tracing::error!(vm, failures = failures_in_window, "guest keeps failing; giving up on this host");
                }
            }
        }
        self.observed.insert(vm, state);
    }

    fn on_done(&mut self, done: Done) {
        match done {
            Done::Started { vm, result } => {
                self.busy.remove(&format!("op:{vm}"));
                if result.is_ok() {
                    self.config.metrics.guest_starts.inc();
                }
                if let Err(error) = result
                    && let Some(guest) = self.guests.get_mut(&vm)
                {
                    tracing::warn!(vm, error, "starting the guest failed");
                    self.config.metrics.guest_failures.inc();
                    guest.failed_since_start = true;
                    guest.last_error = Some(error);
                    let now = monotonic_ms();
                    if let Verdict::Restart { at_ms, .. } = guest.health.record_failure(now) {
                        guest.not_before_ms = at_ms;
                    }
                }
            }
            Done::Stopped { vm, reason, result } => {
                self.busy.remove(&format!("op:{vm}"));
                match result {
                    Ok(()) => self.config.metrics.guest_stop(reason.label()),
                    Err(error) => tracing::error!(vm, error, "stopping the guest failed"),
                }
            }
            Done::Proposed { key } => {
                self.busy.remove(&key);
            }
            Done::Contact { sent_at_ms, commit } => {
                self.contact_in_flight = false;
                if let Some(commit) = commit {
                    self.node.own_contact(Contact { sent_at_ms, commit });
                    self.on_contact(sent_at_ms, commit);
                }
            }
        }
    }

    /// Takes the newest contact the leader confirmed.
    fn take_confirmed(&mut self) {
        if !self.confirmed.has_changed().unwrap_or(false) {
            return;
        }
        let Some(contact) = *self.confirmed.borrow_and_update() else { return };
        self.on_contact(contact.sent_at_ms, contact.commit);
    }

    fn on_contact(&mut self, sent_at_ms: u64, commit: u64) {
        if self.removed {
            return;
        }
        self.fence.quorum_contact(sent_at_ms, commit);
        if let Some(file) = &self.config.contact_file
            && !file.store(sent_at_ms)
        {
            self.config.metrics.disk_error("fence-contact");
        }
    }

    /// Sends a linearizable read; its completion is quorum contact as of its
    /// send time.
    fn send_contact_read(&mut self) {
        if self.contact_in_flight {
            return;
        }
        self.contact_in_flight = true;
        self.config.metrics.contact_reads.inc();
        let node = self.node.clone();
        let done = self.done_tx.clone();
        let sent_at_ms = monotonic_ms();
        tokio::spawn(async move {
            let read = node.read(|_, status| status.commit);
            let commit = match tokio::time::timeout(CONTACT_READ_TIMEOUT, read).await {
                Ok(Ok(commit)) => Some(commit),
                _ => None,
            };
            let _ = done.send(Done::Contact { sent_at_ms, commit });
        });
    }

    fn spawn_proposal(&mut self, key: String, kind: CommandKind) {
        if !self.busy.insert(key.clone()) {
            return;
        }
        let proposer = self.proposer.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            if let Err(e) = proposer.propose(kind).await {
                tracing::debug!(key, error = %e, "proposal did not go through; the next pass retries");
            }
            let _ = done.send(Done::Proposed { key });
        });
    }

    fn spawn_start(&mut self, vm: &str) {
        if !self.busy.insert(format!("op:{vm}")) {
            return;
        }
        self.stopped_by_us.remove(vm);
        if let Some(guest) = self.guests.get_mut(vm)
            && std::mem::take(&mut guest.failed_since_start)
        {
            self.config.metrics.guest_restarts.inc();
        }
        let runtime = self.runtime.clone();
        let done = self.done_tx.clone();
        let vm = vm.to_string();
        tracing::info!(vm, "starting guest");
        tokio::spawn(async move {
            let result = runtime.start(&vm).await.map_err(|e| e.to_string());
            let _ = done.send(Done::Started { vm, result });
        });
    }

    /// Stops `vm` gracefully (`kill`: false), or kills it at once (`kill`:
    /// true; a fenced or removed host's guests, see `Runtime::kill`).
    fn spawn_stop(&mut self, vm: &str, kill: bool, reason: StopReason) {
        if !self.busy.insert(format!("op:{vm}")) {
            return;
        }
        self.stopped_by_us.insert(vm.to_owned());
        let runtime = self.runtime.clone();
        let done = self.done_tx.clone();
        let vm = vm.to_string();
        tracing::info!(vm, why = reason.words(), "stopping guest");
        tokio::spawn(async move {
            let result = if kill { runtime.kill(&vm).await } else { runtime.stop(&vm).await };
            let _ = done.send(Done::Stopped { vm, reason, result: result.map(|_| ()).map_err(|e| e.to_string()) });
        });
    }

    /// Records one of this host's own events (fencing, removal) in the
    /// agent's event log, at the applied index it happened at.
    fn record_event(&self, kind: EventKind, message: String) {
        let status = self.node.status();
        let event = Derived { kind, vm: None, node: Some(status.name.clone()), from: None, message };
        self.node.events().record(status.applied, crate::node::now_unix_ms(), event);
    }

    fn up_guests(&self) -> Vec<String> {
        self.observed.iter().filter(|(_, s)| s.is_up()).map(|(n, _)| n.clone()).collect()
    }

    /// This host was removed from the cluster: every guest stops at once
    /// (manual ones too: nothing manages them any more), and the contact is
    /// revoked so the guard stops whatever this agent cannot.
    fn on_removed(&mut self) {
        if !self.removed {
            self.removed = true;
            self.config.metrics.set_fenced(true);
            if let Some(file) = &self.config.contact_file
                && !file.revoke()
            {
                self.config.metrics.disk_error("fence-contact");
            }
            self.exempt.clear();
            if let Some(file) = &self.config.exempt_file
                && let Err(e) = file.store(&self.exempt)
            {
                self.config.metrics.disk_error("fence-exempt");
                tracing::warn!(error = %e, "cannot clear the fence's exempt list");
            }
            tracing::warn!(
                "this host was removed from the cluster: stopping every guest now; to bring it back, run \
                 `blixard-agent cluster join ADDRESS` on it with the address of a member"
            );
            self.record_event(
                EventKind::HostFenced,
                format!("{} was removed from the cluster and stops every guest", self.node.status().name),
            );
        }
        for vm in self.up_guests() {
            self.spawn_stop(&vm, true, StopReason::Removed);
        }
    }

    /// No quorum contact: kill every guest but the exempt ones at once,
    /// within `stop_max`. Needs nothing from the state (a member that cannot read
    /// it must fence all the same).
    fn fence_now(&mut self) {
        self.config.metrics.set_fenced(true);
        if !self.fenced_logged {
            if let Some(contact) = self.fence.last_contact_ms() {
                let age_ms = monotonic_ms().saturating_sub(contact);
                tracing::warn!(
                    fence_after_ms = self.config.timing.fence_after_ms,
                    age_ms,
                    "no quorum contact: fencing, stopping every guest on this host"
                );
                self.record_event(
                    EventKind::HostFenced,
                    format!(
                        "{} fenced itself: no quorum contact for {age_ms} ms (fence_after {} ms); it stops its guests",
                        self.node.status().name,
                        self.config.timing.fence_after_ms
                    ),
                );
                self.fence_recorded = true;
                self.config.metrics.fencing_event("self");
            } else {
                // A fresh start: nothing is wrong yet, this host just has
                // not reached a quorum since it started.
                tracing::info!("no quorum contact yet: this host runs no guests until it reaches a quorum");
            }
            self.fenced_logged = true;
        }
        for vm in self.up_guests() {
            if self.exempt.contains(&vm) {
                continue;
            }
            self.spawn_stop(&vm, true, StopReason::Fenced);
        }
    }

    async fn pass(&mut self, installed: Option<&BTreeSet<String>>) {
        let me = self.me;
        let status = self.node.status();
        if status.removed || self.removed {
            self.on_removed();
            return;
        }
        // Fencing comes first and overrides everything else, the state too.
        self.contact_settled = false;
        if self.fence.should_fence(monotonic_ms()) {
            self.fence_now();
            return;
        }
        let up = self.up_guests();
        let applied = status.applied;
        let view = match self.last_view.take() {
            Some((last_up, view)) if !self.state_changed && last_up == up && view.applied == applied => view,
            _ => {
                self.state_changed = false;
                let read_up = up.clone();
                match self.node.read_local(move |state, status| view(state, me, status.applied, &read_up)).await {
                    Ok(view) => Arc::new(view),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read the local state");
                        return;
                    }
                }
            }
        };
        self.last_view = Some((up, view.clone()));
        let now = monotonic_ms();
        if self.fence.should_fence(now) {
            self.fence_now();
            return;
        }
        if self.fenced_logged {
            if std::mem::take(&mut self.fence_recorded) {
                self.record_event(
                    EventKind::HostUnfenced,
                    format!("{} has quorum contact again and may run guests", self.node.status().name),
                );
            }
            tracing::info!("quorum contact is back; this host may run guests again");
            self.fenced_logged = false;
        }
        self.config.metrics.set_fenced(false);
        // The guard learns of a new manual VM before it may start here.
        if view.exempt != self.exempt {
            match self.config.exempt_file.as_ref().map(|file| file.store(&view.exempt)) {
                Some(Err(e)) => {
                    self.config.metrics.disk_error("fence-exempt");
                    tracing::warn!(error = %e, "cannot write the fence's exempt list; the guard fences every guest")
                }
                _ => self.exempt = view.exempt.clone(),
            }
        }
        let may_start_any = self.fence.may_start(now, view.applied);
        self.contact_settled = may_start_any;

        // Forget bookkeeping of VMs no longer here; reset it for new placements.
        self.guests.retain(|name, g| view.mine.get(name).is_some_and(|m| m.generation == g.generation));
        let observed = &self.observed;
        self.stopped_by_us.retain(|vm| observed.contains_key(vm));
        for (name, mine) in &view.mine {
            self.guests.entry(name.clone()).or_insert_with(|| Guest {
                generation: mine.generation,
                health: Health::new(self.config.health),
                not_before_ms: 0,
                last_error: None,
                failed_since_start: false,
            });
        }

        // Stop what should not run here.
        let up: Vec<String> = self.observed.iter().filter(|(_, s)| s.is_up()).map(|(n, _)| n.clone()).collect();
        for vm in up {
            let why = match view.mine.get(&vm) {
                Some(m) if m.desired == Desired::Running => continue,
                Some(_) => StopReason::DesiredStopped,
                None if view.handoffs.contains_key(&vm) => StopReason::MovedAway,
                None if view.known.contains(&vm) => StopReason::PlacedElsewhere,
                None => StopReason::NotInState,
            };
            self.spawn_stop(&vm, false, why);
        }

        // Roll one guest to its new runner: stopped here, the start below (in a
        // later pass) boots it from `current`. Only while nothing else starts or
        // stops here, and only when it may start again at once.
        let settled = !self.busy.iter().any(|key| key.starts_with("op:"))
            && self.observed.values().all(|s| !matches!(s.phase, Phase::Activating | Phase::Deactivating));
        if may_start_any
            && settled
            && let Some(vm) = runners::next_roll(&self.stale_runners, |vm| {
                view.mine.get(vm).is_some_and(|m| m.desired == Desired::Running)
                    && self.observed.get(vm).is_some_and(|s| s.phase == Phase::Active)
            })
        {
            self.stale_runners.remove(&vm);
            self.spawn_stop(&vm, false, StopReason::RunnerChanged);
        }

        // Start what should run here.
        for (name, mine) in &view.mine {
            let guest = self.guests.get(name).expect("inserted above");
            let up = self.observed.get(name).is_some_and(GuestState::is_up);
            if mine.desired == Desired::Running
                && mine.may_start
                && may_start_any
                && !up
                && !guest.health.gave_up()
                && now >= guest.not_before_ms
            {
                self.spawn_start(name);
            }
        }

        // Release handoffs whose copy here is gone.
        for (name, generation) in &view.handoffs {
            let up = self.observed.get(name).is_some_and(GuestState::is_up);
            if !up && !self.busy.contains(&format!("op:{name}")) {
                let kind = CommandKind::Released { node: me, vm: name.clone(), generation: *generation };
                self.spawn_proposal(format!("release:{name}:{generation}"), kind);
            }
        }

        // Report what we see of our VMs.
        for (name, mine) in &view.mine {
            let guest = self.guests.get(name).expect("inserted above");
            let observed = self.observed.get(name).cloned().unwrap_or_else(GuestState::inactive);
            let starting = self.busy.contains(&format!("op:{name}"));
            let (state, error) = reported_state(mine, &observed, guest, starting);
            if state != mine.state || (error.is_some() && error != mine.last_error) {
                let kind = CommandKind::Report {
                    node: me,
                    vm: name.clone(),
                    generation: mine.generation,
                    state,
                    last_error: error,
                };
                self.spawn_proposal(format!("report:{name}"), kind);
            }
        }

        // Report the runners installed here.
        if let (Some(installed), Some(runners)) = (installed, &view.runners)
            && installed != runners
        {
            let kind = CommandKind::SetRunners { node: me, runners: installed.iter().cloned().collect() };
            self.spawn_proposal("runners".into(), kind);
        }
    }
}

/// The state to report for a VM placed here, from what the runtime shows.
fn reported_state(mine: &Mine, observed: &GuestState, guest: &Guest, busy: bool) -> (VmState, Option<String>) {
    match observed.phase {
        Phase::Active => (VmState::Running, None),
        Phase::Activating => (VmState::Starting, guest.last_error.clone()),
        Phase::Deactivating => (VmState::Stopping, None),
        Phase::Failed if guest.health.gave_up() => (VmState::Failed, guest.last_error.clone()),
        Phase::Failed => (VmState::Starting, guest.last_error.clone()),
        Phase::Inactive => match mine.desired {
            Desired::Stopped => (VmState::Stopped, None),
            Desired::Running if guest.health.gave_up() => (VmState::Failed, guest.last_error.clone()),
            Desired::Running if busy => (VmState::Starting, guest.last_error.clone()),
            // Waiting for a handoff, the fence or a back-off.
            Desired::Running => (VmState::Pending, guest.last_error.clone()),
        },
    }
}

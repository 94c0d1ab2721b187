//! Cluster events: what happened, in words an operator reads (`blixard-agent
//! events`, the dashboard). This log is the one history of the cluster:
//! every view of events reads it.
//!
//! Events are derived on every member from the entries it applies, by a
//! pure function of the effect and the state ([`events_of`]), and each
//! carries the time of the entry that caused it (its command's
//! `at_unix_ms`, set by the proposer): every member applies the same
//! entries in the same order, so every member derives the same events,
//! with the same Raft `index` and the same time, whether it applied the
//! entry as it happened or caught up on it later. Leader changes are
//! entries too (`LeaderElected`, proposed by each new leader). The one
//! exception is a host's own fencing (`host_fenced`, `host_unfenced`),
//! which only that host sees, in its own log, at its own clock.
//!
//! The log is a bounded ring ([`EVENTS_MAX`]) in memory, kept since this
//! agent started: a restarted member has applied everything before its
//! restart already and does not re-derive those events. Nothing here is
//! persisted or replicated, so the ring costs no Raft traffic.
//!
//! For consumers (the gRPC `Events` call, the dashboard):
//! [`EventLog::recent`] returns the last events, and [`EventLog::follow`]
//! returns them together with a subscription that continues exactly after
//! them (no gap, no repeat: compare `seq`).

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::broadcast;

use crate::state::{Desired, Effect, MemberStatus, NodeId, State, VmState};

/// Events kept in the ring; older ones are dropped.
pub const EVENTS_MAX: usize = 1000;
/// Events a slow follower may lag behind before it misses some.
const FOLLOWERS_LAG_MAX: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    LeaderChanged,
    HostJoined,
    HostPromoted,
    /// A voter became a learner (the voter autopilot); it stays a member.
    HostDemoted,
    HostRemoved,
    HostUp,
    HostDown,
    HostDraining,
    HostUndrained,
    /// This host fenced itself (no quorum contact) or was removed: each
    /// member's own observation, like leader changes.
    HostFenced,
    HostUnfenced,
    VmCreated,
    VmDeleted,
    VmDesired,
    VmPlaced,
    VmMoved,
    VmUnplaced,
    VmStarted,
    VmStopped,
    VmFailed,
    VmFenced,
    /// Its host went down while it was desired running.
    VmLost,
    /// The guest exited (or failed to start) on its host, which restarts it
    /// after a back-off; a guest that keeps exiting ends `failed`.
    VmExited,
}

/// How much an event matters to an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Info = 0,
    Warning = 1,
    Error = 2,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Info => "info",
            Level::Warning => "warning",
            Level::Error => "error",
        }
    }
}

impl EventKind {
    /// The stable name used on the wire and in `--json`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::LeaderChanged => "leader_changed",
            EventKind::HostJoined => "host_joined",
            EventKind::HostPromoted => "host_promoted",
            EventKind::HostDemoted => "host_demoted",
            EventKind::HostRemoved => "host_removed",
            EventKind::HostUp => "host_up",
            EventKind::HostDown => "host_down",
            EventKind::HostDraining => "host_draining",
            EventKind::HostUndrained => "host_undrained",
            EventKind::HostFenced => "host_fenced",
            EventKind::HostUnfenced => "host_unfenced",
            EventKind::VmCreated => "vm_created",
            EventKind::VmDeleted => "vm_deleted",
            EventKind::VmDesired => "vm_desired",
            EventKind::VmPlaced => "vm_placed",
            EventKind::VmMoved => "vm_moved",
            EventKind::VmUnplaced => "vm_unplaced",
            EventKind::VmStarted => "vm_started",
            EventKind::VmStopped => "vm_stopped",
            EventKind::VmFailed => "vm_failed",
            EventKind::VmFenced => "vm_fenced",
            EventKind::VmLost => "vm_lost",
            EventKind::VmExited => "vm_exited",
        }
    }

    pub fn level(self) -> Level {
        use EventKind as K;
        match self {
            K::HostDown | K::HostFenced | K::VmFailed | K::VmLost => Level::Error,
            K::HostRemoved | K::HostDraining | K::VmFenced | K::VmExited | K::VmUnplaced => Level::Warning,
            K::LeaderChanged
            | K::HostJoined
            | K::HostPromoted
            | K::HostDemoted
            | K::HostUp
            | K::HostUndrained
            | K::HostUnfenced
            | K::VmCreated
            | K::VmDeleted
            | K::VmDesired
            | K::VmPlaced
            | K::VmMoved
            | K::VmStarted
            | K::VmStopped => Level::Info,
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event, as derived (before it gets a place in the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derived {
    pub kind: EventKind,
    pub vm: Option<String>,
    /// The host concerned (for a move: where the VM went).
    pub node: Option<String>,
    /// For a move: the host the VM left.
    pub from: Option<String>,
    /// One sentence.
    pub message: String,
}

/// One event in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in this agent's log, from 1, without gaps.
    pub seq: u64,
    /// The Raft index of the entry that caused it; for this host's own
    /// fencing, the applied index when it happened.
    pub index: u64,
    /// The time of the entry that caused it (its proposer's clock), the
    /// same on every member; for this host's own fencing, this host's clock.
    pub at_unix_ms: u64,
    pub kind: EventKind,
    pub vm: Option<String>,
    pub node: Option<String>,
    pub from: Option<String>,
    pub message: String,
}

/// The bounded event log of one agent, and its followers.
pub struct EventLog {
    inner: Mutex<Ring>,
    followers: broadcast::Sender<Event>,
    /// Counts events by level (`events_total`), when given.
    metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

struct Ring {
    events: VecDeque<Event>,
    next_seq: u64,
    /// Events recorded since this agent started, by level (info, warning,
    /// error), dropped ones included.
    by_level: [u64; 3],
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").finish_non_exhaustive()
    }
}

impl EventLog {
    pub fn new() -> Self {
        let (followers, _) = broadcast::channel(FOLLOWERS_LAG_MAX);
        EventLog {
            inner: Mutex::new(Ring { events: VecDeque::new(), next_seq: 1, by_level: [0; 3] }),
            followers,
            metrics: None,
        }
    }

    /// A log that counts what it records in `metrics` (`events_total`).
    pub fn with_metrics(metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        EventLog { metrics: Some(metrics), ..Self::new() }
    }

    /// The last `n` events (at most [`EVENTS_MAX`]), oldest first.
    pub fn recent(&self, n: usize) -> Vec<Event> {
        let ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        ring.events.iter().skip(ring.events.len().saturating_sub(n)).cloned().collect()
    }

    /// The last `n` events and a subscription to every later one: the
    /// first event received has the `seq` after the last one returned. A
    /// subscriber more than 1024 events behind gets `Lagged`.
    pub fn follow(&self, n: usize) -> (Vec<Event>, broadcast::Receiver<Event>) {
        // Subscribing under the lock: `record` sends under it too, so no
        // event falls between the snapshot and the subscription.
        let ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.followers.subscribe();
        let events = ring.events.iter().skip(ring.events.len().saturating_sub(n)).cloned().collect();
        (events, rx)
    }

    /// The `seq` of the newest event (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).next_seq - 1
    }

    /// Events recorded since this agent started, by level.
    pub fn counts_by_level(&self) -> [(Level, u64); 3] {
        let ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        [Level::Info, Level::Warning, Level::Error].map(|level| (level, ring.by_level[level as usize]))
    }

    /// Appends an event, dropping the oldest beyond [`EVENTS_MAX`].
    pub fn record(&self, index: u64, at_unix_ms: u64, derived: Derived) {
        let mut ring = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Derived { kind, vm, node, from, message } = derived;
        if let Some(metrics) = &self.metrics {
            metrics.event(kind.level().as_str());
        }
        let event = Event { seq: ring.next_seq, index, at_unix_ms, kind, vm, node, from, message };
        ring.next_seq += 1;
        ring.by_level[kind.level() as usize] += 1;
        if ring.events.len() == EVENTS_MAX {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        let _ = self.followers.send(event);
    }
}

fn name_of(state: &State, node: NodeId) -> String {
    state.member(node).map_or_else(|| format!("member {node}"), |m| m.name.clone())
}

fn derived(kind: EventKind, vm: Option<&str>, node: Option<String>, from: Option<String>, message: String) -> Derived {
    Derived { kind, vm: vm.map(str::to_string), node, from, message }
}

/// The events an applied effect means, given the state after it (pure:
/// every member derives the same). Effects that only a machine cares about
/// (a report of `starting`, a capacity change) give none.
pub fn events_of(effect: &Effect, state: &State) -> Vec<Derived> {
    use EventKind as K;
    let vm_host = |vm: &str| state.vm(vm).and_then(|v| v.placement).map(|p| name_of(state, p.node));
    let one = |d: Derived| vec![d];
    match effect {
        Effect::None
        | Effect::VmUpdated { .. }
        | Effect::MemberChanged { .. }
        | Effect::MemberChangedUnplaced { .. }
        | Effect::JoinTokenAdded { .. }
        | Effect::JoinTokenUsed { .. } => Vec::new(),
        Effect::LeaderElected { node, term } => {
            let host = name_of(state, *node);
            one(derived(
                K::LeaderChanged,
                None,
                Some(host.clone()),
                None,
                format!("{host} is the leader in term {term}"),
            ))
        }
        Effect::VmCreated { vm } => one(derived(K::VmCreated, Some(vm), None, None, format!("VM {vm} created"))),
        Effect::VmDeleted { vm, was_on } => {
            let on = was_on.map(|n| name_of(state, n));
            let message = match &on {
                Some(host) => format!("VM {vm} deleted (it was on {host})"),
                None => format!("VM {vm} deleted"),
            };
            one(derived(K::VmDeleted, Some(vm), on, None, message))
        }
        Effect::DesiredSet { vm, desired } => {
            let what = if *desired == Desired::Running { "running" } else { "stopped" };
            one(derived(K::VmDesired, Some(vm), vm_host(vm), None, format!("VM {vm} is now desired {what}")))
        }
        Effect::Placed { vm, node, from, .. } => {
            let to = name_of(state, *node);
            match from {
                Some(from) if from != node => {
                    let from = name_of(state, *from);
                    let message = format!("VM {vm} moved from {from} to {to}");
                    one(derived(K::VmMoved, Some(vm), Some(to), Some(from), message))
                }
                _ => one(derived(K::VmPlaced, Some(vm), Some(to.clone()), None, format!("VM {vm} placed on {to}"))),
            }
        }
        Effect::Unplaced { vm, from, .. } => {
            let from = from.map(|n| name_of(state, n));
            let message = match &from {
                Some(host) => format!("VM {vm} taken off {host}"),
                None => format!("VM {vm} unplaced"),
            };
            one(derived(K::VmUnplaced, Some(vm), None, from, message))
        }
        Effect::StatusSet { node, status } => {
            let host = name_of(state, *node);
            let (kind, message) = match status {
                MemberStatus::Down => (K::HostDown, format!("host {host} is down")),
                MemberStatus::Up => (K::HostUp, format!("host {host} is up")),
            };
            let mut events = vec![derived(kind, None, Some(host.clone()), None, message)];
            if *status == MemberStatus::Down {
                for vm in state.vms_on(*node).filter(|vm| vm.spec.desired == Desired::Running) {
                    let next = if vm.spec.failover == crate::state::Failover::Manual {
                        format!(
                            "failover is manual: once {host} is known to be dead, `blixard-agent vm recover {} --to NODE`",
                            vm.name
                        )
                    } else {
                        format!("it moves once {host} has certainly fenced itself, if another host can take it")
                    };
                    let message = format!("VM {} is lost: its host {host} is down; {next}", vm.name);
                    events.push(derived(K::VmLost, Some(&vm.name), Some(host.clone()), None, message));
                }
            }
            events
        }
        Effect::DrainSet { node, drain } => {
            let host = name_of(state, *node);
            let (kind, message) = if *drain {
                (K::HostDraining, format!("host {host} is draining"))
            } else {
                (K::HostUndrained, format!("host {host} takes placements again"))
            };
            one(derived(kind, None, Some(host), None, message))
        }
        Effect::Reported { vm, state: observed, previous } => {
            let host = vm_host(vm);
            let on = host.as_deref().map(|h| format!(" on {h}")).unwrap_or_default();
            let error = state.vm(vm).and_then(|v| v.observed.last_error.clone());
            let why = error.as_ref().map(|e| format!(": {e}")).unwrap_or_default();
            let (kind, message) = match (previous, observed) {
                (_, VmState::Running) => (K::VmStarted, format!("VM {vm} is running{on}")),
                (_, VmState::Stopped) => (K::VmStopped, format!("VM {vm} stopped{on}")),
                (_, VmState::Failed) => (K::VmFailed, format!("VM {vm} failed{on}{why}")),
                // A guest that was up (or starting) and is starting again
                // or waiting to, with an error: it exited, and its host
                // restarts it after a back-off (every crash of a crash
                // loop, until the host gives up and reports it failed).
                (VmState::Running, VmState::Starting | VmState::Pending) | (VmState::Starting, VmState::Pending)
                    if error.is_some() =>
                {
                    (K::VmExited, format!("VM {vm} exited{on}{why}; it is restarted after a back-off"))
                }
                _ => return Vec::new(),
            };
            one(derived(kind, Some(vm), host, None, message))
        }
        Effect::MemberAdded { node } => {
            let host = name_of(state, *node);
            one(derived(K::HostJoined, None, Some(host.clone()), None, format!("host {host} joined as a learner")))
        }
        Effect::MemberPromoted { node } => {
            let host = name_of(state, *node);
            one(derived(K::HostPromoted, None, Some(host.clone()), None, format!("host {host} became a voter")))
        }
        Effect::MemberDemoted { node } => {
            let host = name_of(state, *node);
            let message = format!("host {host} became a learner (it no longer votes, and still runs VMs)");
            one(derived(K::HostDemoted, None, Some(host.clone()), None, message))
        }
        Effect::MemberRemoved { node, unplaced } => {
            let host = name_of(state, *node);
            let message = if unplaced.is_empty() {
                format!("host {host} left the cluster")
            } else {
                format!("host {host} left the cluster; {} VM(s) lost their placement", unplaced.len())
            };
            one(derived(K::HostRemoved, None, Some(host), None, message))
        }
        Effect::HandoffEnded { vm, from, fenced } => {
            if !fenced {
                return Vec::new();
            }
            let host = name_of(state, *from);
            let message =
                format!("VM {vm}: {host} is considered fenced (down past reschedule_after); its copy is gone");
            one(derived(K::VmFenced, Some(vm), Some(host), None, message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Member;

    fn state() -> State {
        State::with_members([Member::new(1, "h1", "a:1"), Member::new(2, "h2", "a:2")])
    }

    fn leader(state: &State, node: NodeId, term: u64) -> Derived {
        events_of(&Effect::LeaderElected { node, term }, state).remove(0)
    }

    #[test]
    fn leader_changes_come_from_their_entry() {
        let s = state();
        let event = leader(&s, 2, 7);
        assert_eq!((event.kind, event.message.as_str()), (EventKind::LeaderChanged, "h2 is the leader in term 7"));
        assert_eq!(event.kind.level(), Level::Info);
    }

    #[test]
    fn every_exit_of_a_crash_loop_is_an_event() {
        use crate::state::{Capacity, Command, CommandKind, VmSpec};
        let mut s = state();
        let capacity = Capacity { vcpu: 4, memory_mib: 4096, ..Capacity::default() };
        let runners = vec!["web".to_string()];
        let spec = VmSpec { vcpu: 1, memory_mib: 64, desired: Desired::Running, ..VmSpec::default() };
        for kind in [
            CommandKind::SetCapacity { node: 1, capacity },
            CommandKind::SetRunners { node: 1, runners },
            CommandKind::CreateVm { name: "web".into(), spec },
        ] {
            s.apply(&Command { at_unix_ms: 1, kind }).unwrap();
        }
        let expected_generation = s.vm("web").unwrap().generation;
        s.apply(&Command {
            at_unix_ms: 2,
            kind: CommandKind::Place { vm: "web".into(), node: 1, expected_generation },
        })
        .unwrap();
        let generation = s.vm("web").unwrap().generation;
        let mut kinds = Vec::new();
        // running, exits, running, exits while starting, fails for good.
        let reports = [
            (VmState::Starting, None),
            (VmState::Running, None),
            (VmState::Starting, Some("exit status 1")),
            (VmState::Running, None),
            (VmState::Pending, Some("exit status 1")),
            (VmState::Starting, Some("exit status 1")),
            (VmState::Pending, Some("exit status 1")),
            (VmState::Failed, Some("exit status 1")),
        ];
        for (i, (state, error)) in reports.into_iter().enumerate() {
            let report = CommandKind::Report {
                node: 1,
                vm: "web".into(),
                generation,
                state,
                last_error: error.map(str::to_string),
            };
            let effect = s.apply(&Command { at_unix_ms: 10 + i as u64, kind: report }).unwrap();
            kinds.extend(events_of(&effect, &s).into_iter().map(|e| e.kind));
        }
        use EventKind as K;
        assert_eq!(kinds, [K::VmStarted, K::VmExited, K::VmStarted, K::VmExited, K::VmExited, K::VmFailed]);
    }

    #[test]
    fn moves_and_fencing_are_named_with_hosts() {
        let s = state();
        let moved = events_of(&Effect::Placed { vm: "web".into(), node: 2, from: Some(1), generation: 2 }, &s);
        assert_eq!(moved[0].kind, EventKind::VmMoved);
        assert_eq!((moved[0].from.as_deref(), moved[0].node.as_deref()), (Some("h1"), Some("h2")));
        let placed = events_of(&Effect::Placed { vm: "web".into(), node: 1, from: None, generation: 1 }, &s);
        assert_eq!(placed[0].kind, EventKind::VmPlaced);
        let fenced = events_of(&Effect::HandoffEnded { vm: "web".into(), from: 1, fenced: true }, &s);
        assert_eq!(fenced[0].kind, EventKind::VmFenced);
        assert!(events_of(&Effect::HandoffEnded { vm: "web".into(), from: 1, fenced: false }, &s).is_empty());
        let down = events_of(&Effect::StatusSet { node: 2, status: MemberStatus::Down }, &s);
        assert_eq!((down[0].kind, down[0].message.as_str()), (EventKind::HostDown, "host h2 is down"));
    }

    #[test]
    fn the_ring_is_bounded_and_follow_continues_without_gaps() {
        let log = EventLog::new();
        let s = state();
        for i in 0..(EVENTS_MAX as u64 + 5) {
            log.record(i, 0, leader(&s, 1, i));
        }
        let recent = log.recent(usize::MAX);
        assert_eq!(recent.len(), EVENTS_MAX);
        assert_eq!(recent[0].seq, 6);
        let (last, mut rx) = log.follow(2);
        assert_eq!(last.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1004, 1005]);
        log.record(9, 0, leader(&s, 2, 9));
        assert_eq!(rx.try_recv().map(|e| e.seq), Ok(1006));
    }
}

//! Work only the leader does on its own initiative: promoting caught-up
//! learners, the failure detector, and placement. It runs on the raft
//! thread every `check_interval`, on the state as applied there, and
//! proposes what it decides like any other command (so a decision made on
//! stale state loses at apply).

use std::collections::BTreeSet;
use std::sync::Arc;

use super::autopilot::{self, Voters};
use crate::consensus::{Core, Outcome, ProposalId};
use crate::failure::{Detector, Timing};
use crate::metrics::Metrics;
use crate::scheduler::{self, Decision, Memo, Policy};
use crate::state::{Command, CommandKind, MemberStatus, NodeId, State};

/// Ticks a new leader waits before promoting anyone, so that progress
/// reflects real replication rather than the optimistic start.
const PROMOTION_GRACE_CHECKS: u64 = 5;
/// A plan runs at least this often even when nothing was applied, so time-
/// based changes (a host becoming fenced) are acted on.
const PLAN_INTERVAL_MS: u64 = 1000;
/// Plans triggered by applied changes keep the raft thread at most about
/// 1/(1+PLAN_BACKOFF_FACTOR) busy planning: after a plan that took T ms, the
/// next waits PLAN_BACKOFF_FACTOR * T ms (at most PLAN_INTERVAL_MS). A plan
/// over a few hundred VMs takes well under a millisecond, and VMs found to
/// fit nowhere are skipped until something frees room (`scheduler::Memo`),
/// so this only delays planning when many VMs change at once or room keeps
/// being freed while thousands wait. A change in the fenced hosts (failover)
/// plans at once regardless.
const PLAN_BACKOFF_FACTOR: u32 = 9;

pub struct Duties {
    checks_as_leader: u64,
    /// When this node last became leader (monotonic ms).
    leader_since_ms: u64,
    detector: Detector,
    policy: Policy,
    voters: Voters,
    check_interval_ms: u64,
    last_check_ms: u64,
    /// This leader's own proposals not yet resolved; no new plan runs while
    /// any is in flight, so the same decision is never proposed twice.
    in_flight: BTreeSet<ProposalId>,
    /// The autopilot's change in flight, if any (also in `in_flight`).
    voters_change: Option<ProposalId>,
    last_plan: Option<(u64, BTreeSet<NodeId>, u64)>,
    /// What the last plan learned (which waiting VMs fit nowhere), reused
    /// with the VMs changed since; see `scheduler::Memo`.
    memo: Memo,
    /// No plan triggered by applied changes before this (monotonic ms).
    plan_not_before_ms: u64,
    /// VMs (name, generation) on fenced hosts that this leader has logged
    /// as unable to fail over, so each is logged once.
    stuck_logged: BTreeSet<(String, u64)>,
    /// The term this leader proposed its `LeaderElected` entry in.
    announced: Option<u64>,
    metrics: Arc<Metrics>,
}

impl Duties {
    pub fn new(me: NodeId, timing: Timing, policy: Policy, voters: Voters, metrics: Arc<Metrics>) -> Self {
        Duties {
            checks_as_leader: 0,
            leader_since_ms: 0,
            detector: Detector::new(me, timing),
            policy,
            voters,
            check_interval_ms: timing.check_interval_ms,
            last_check_ms: 0,
            in_flight: BTreeSet::new(),
            voters_change: None,
            last_plan: None,
            memo: Memo::default(),
            plan_not_before_ms: 0,
            stuck_logged: BTreeSet::new(),
            announced: None,
            metrics,
        }
    }

    /// How often the duties run.
    pub fn check_interval_ms(&self) -> u64 {
        self.check_interval_ms
    }

    pub fn became_leader(&mut self, now_ms: u64) {
        self.checks_as_leader = 0;
        self.leader_since_ms = now_ms;
        self.detector.on_became_leader(now_ms);
        self.in_flight.clear();
        self.last_plan = None;
        self.memo = Memo::default();
    }

    pub fn lost_leadership(&mut self) {
        self.detector.on_lost_leadership();
        self.in_flight.clear();
    }

    /// A message from `node` arrived (see `failure::Detector::heard_from`).
    pub fn heard_from(&mut self, node: NodeId, now_ms: u64) {
        self.detector.heard_from(node, now_ms);
    }

    /// The peers this leader heard from within the shortest election
    /// timeout (half the longest): what `NodeStatus::active_peers` reports
    /// besides raft-rs's own activity flags, which raft-rs clears at every
    /// quorum check until each peer's next answer.
    pub fn heard_recently(&self, now_ms: u64) -> impl Iterator<Item = NodeId> + '_ {
        self.detector.heard_within(self.detector.timing().election_timeout_max_ms / 2, now_ms)
    }

    /// A proposal resolved; returns whether it was one of ours.
    pub fn resolved(&mut self, id: ProposalId, outcome: &Outcome) -> bool {
        if !self.in_flight.remove(&id) {
            return false;
        }
        if self.voters_change == Some(id) {
            // The next change of voters (say, the second half of a
            // replacement, or the next of many extra initial voters) need
            // not wait a whole check interval: the duties run at the next tick.
            self.voters_change = None;
            self.last_check_ms = 0;
        }
        if let Outcome::Applied(Err(rejection)) = outcome {
            tracing::debug!(%rejection, "a leader decision lost to a newer state; the next plan decides again");
        }
        true
    }

    /// Runs the duties if a check interval has passed; proposes through
    /// `core` (the leader).
    pub fn check(&mut self, core: &mut Core, now_ms: u64, at_unix_ms: u64) {
        // A quarter interval of slack: the raft thread wakes for the duties
        // on a tick clock, and a wake-up a millisecond early must not put
        // the check off by a whole interval.
        if !core.is_leader() {
            // A follower has no use for the changed VMs' names.
            core.stop_vm_changes();
            return;
        }
        if now_ms + self.check_interval_ms / 4 < self.last_check_ms + self.check_interval_ms {
            return;
        }
        self.last_check_ms = now_ms;
        self.checks_as_leader += 1;
        if self.announced != Some(core.term()) {
            // Once per term, first: the leader change as an entry, so that
            // every member tells it with the same time (`node::events`).
            let kind = CommandKind::LeaderElected { node: core.id(), term: core.term() };
            match core.propose(&Command { at_unix_ms, kind }) {
                Ok(id) => {
                    self.announced = Some(core.term());
                    self.in_flight.insert(id);
                }
                Err(e) => tracing::debug!(error = %e, "could not propose this leader's LeaderElected"),
            }
        }
        if !self.in_flight.is_empty() {
            return;
        }

        if self.checks_as_leader >= PROMOTION_GRACE_CHECKS
            && let Some(choice) = self.autopilot(core, now_ms)
        {
            match core.propose_membership(&choice.change, at_unix_ms) {
                Ok(id) => {
                    tracing::info!(target: "blixard::decision", kind = "voters", change = %choice.change, "{}", choice.reason);
                    self.in_flight.insert(id);
                    self.voters_change = Some(id);
                }
                Err(e) => tracing::debug!(error = %e, "could not propose a change of voters"),
            }
        }

        let mut decisions = self.detector.decisions(core.state(), now_ms);
        let fenced = self.detector.fenced(core.state(), now_ms);
        let applied = core.store().applied();
        let due = match &self.last_plan {
            None => true,
            Some((last_applied, last_fenced, last_ms)) => {
                *last_fenced != fenced
                    || now_ms >= last_ms + PLAN_INTERVAL_MS
                    || (*last_applied != applied && now_ms >= self.plan_not_before_ms)
            }
        };
        if due {
            let started = std::time::Instant::now();
            // The first plan as leader (or after a snapshot replaced the
            // state) gets `None` and considers every waiting VM.
            let changed = core.take_vm_changes();
            decisions.extend(scheduler::plan_with(
                core.state(),
                &self.policy,
                &fenced,
                changed.as_ref(),
                &mut self.memo,
            ));
            let took = started.elapsed();
            self.metrics.plan_seconds.observe(took.as_secs_f64());
            self.metrics.blocked_vms.set(self.memo.blocked() as i64);
            let backoff = took.saturating_mul(PLAN_BACKOFF_FACTOR);
            self.plan_not_before_ms = now_ms + (backoff.as_millis() as u64).min(PLAN_INTERVAL_MS);
            self.last_plan = Some((applied, fenced.clone(), now_ms));
            self.log_stuck(core.state(), &fenced, &decisions);
        }
        for Decision { command, reason } in decisions {
            let kind = decision_kind(core.state(), &command, &fenced);
            match core.propose(&Command { at_unix_ms, kind: command }) {
                Ok(id) => {
                    // Logged once, when proposed: the decision and its reason.
                    tracing::info!(target: "blixard::decision", kind = kind.as_str(), "{reason}");
                    self.metrics.decision(kind.as_str());
                    match kind {
                        DecisionKind::Failover => {
                            self.metrics.failovers.inc();
                        }
                        DecisionKind::ClearHandoff => self.metrics.fencing_event("vouched"),
                        _ => {}
                    }
                    self.in_flight.insert(id);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "could not propose a decision");
                    break;
                }
            }
        }
    }
}

impl Duties {
    /// The autopilot's next change of voters (`node::autopilot`).
    fn autopilot(&self, core: &Core, now_ms: u64) -> Option<autopilot::Choice> {
        let live_within_ms = self.detector.timing().election_timeout_max_ms;
        // A new leader counts everyone as heard when it became leader
        // (`Detector::silent_ms`): only once that is `live_within_ms` old
        // does "live" mean heard from.
        if now_ms < self.leader_since_ms + live_within_ms {
            return None;
        }
        let status = core.status();
        let state = core.state();
        let silent_ms =
            state.members().keys().filter_map(|&id| self.detector.silent_ms(id, now_ms).map(|s| (id, s))).collect();
        let view = autopilot::View {
            leader: core.id(),
            commit: status.commit,
            progress: &status.progress,
            members: state.members(),
            silent_ms: &silent_ms,
            live_within_ms,
        };
        autopilot::next_change(&self.voters, &view)
    }

    /// Logs, once per VM and placement, each VM left on a fenced host by a
    /// plan: it cannot fail over (it fits nowhere, or its failover is
    /// manual), and says why.
    fn log_stuck(&mut self, state: &State, fenced: &BTreeSet<NodeId>, decisions: &[Decision]) {
        let moving: BTreeSet<&str> = decisions
            .iter()
            .filter_map(|d| match &d.command {
                CommandKind::Place { vm, .. } => Some(vm.as_str()),
                _ => None,
            })
            .collect();
        let mut stuck = BTreeSet::new();
        for &node in fenced {
            for vm in state.vms_on(node) {
                if vm.spec.desired != crate::state::Desired::Running || moving.contains(vm.name.as_str()) {
                    continue;
                }
                let key = (vm.name.clone(), vm.generation);
                if !self.stuck_logged.contains(&key) {
                    let why = scheduler::why_pending(state, &self.policy, &vm.name);
                    tracing::warn!(target: "blixard::decision", kind = "stuck", vm = vm.name, "VM {} is lost: {why}", vm.name);
                }
                stuck.insert(key);
            }
        }
        self.stuck_logged = stuck;
    }
}

/// What a decision does, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecisionKind {
    Place,
    Move,
    /// A move off a fenced host.
    Failover,
    Unplace,
    HostDown,
    HostUp,
    ClearHandoff,
    Other,
}

impl DecisionKind {
    fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Place => "place",
            DecisionKind::Move => "move",
            DecisionKind::Failover => "failover",
            DecisionKind::Unplace => "unplace",
            DecisionKind::HostDown => "host_down",
            DecisionKind::HostUp => "host_up",
            DecisionKind::ClearHandoff => "clear_handoff",
            DecisionKind::Other => "other",
        }
    }
}

fn decision_kind(state: &State, command: &CommandKind, fenced: &BTreeSet<NodeId>) -> DecisionKind {
    match command {
        CommandKind::Place { vm, .. } => match state.vm(vm).and_then(|v| v.placement) {
            None => DecisionKind::Place,
            Some(p) if fenced.contains(&p.node) => DecisionKind::Failover,
            Some(_) => DecisionKind::Move,
        },
        CommandKind::Unplace { .. } => DecisionKind::Unplace,
        CommandKind::SetStatus { status: MemberStatus::Down, .. } => DecisionKind::HostDown,
        CommandKind::SetStatus { .. } => DecisionKind::HostUp,
        CommandKind::ClearHandoff { .. } => DecisionKind::ClearHandoff,
        _ => DecisionKind::Other,
    }
}

//! Failure detection (leader side) and fencing (host side), as pure state
//! machines: time comes in as `now_ms` from a monotonic clock, decisions go
//! out as values.
//!
//! - [`Detector`], on the leader: marks a member down after
//!   `node_down_after_ms` without hearing from it, up again when heard, and
//!   names the hosts that have certainly fenced themselves
//!   ([`Detector::fenced`]); the scheduler moves their VMs and ends their
//!   handoffs.
//! - [`Fence`], on every host: once it has gone `fence_after_ms` without
//!   quorum contact, the host stops all its guests, and starts none until
//!   contact is back and its state has caught up.
//!
//! # Safety: a partitioned host stops its copy before another starts one
//!
//! The claim: when host B starts a VM that host X had, X's copy has stopped.
//! If X is up, B waits for X's own `Released` (the handoff, see `state`).
//! Otherwise the handoff ends by `ClearHandoff`, which the leader proposes
//! only for a host in [`Detector::fenced`]: one the leader has not heard
//! from for `reschedule_after_ms`. So the claim reduces to: *X's fence fires
//! and finishes stopping before the leader's `reschedule_after_ms` expires.*
//!
//! 1. **What counts as quorum contact.** X calls [`Fence::quorum_contact`]
//!    with the time it *sent* a Raft read-index request (`Core::read_index`)
//!    that has since completed, not the time it received some message. A
//!    completed read index proves two things about that send time `s`: the
//!    leader received the request after `s`, and a quorum acknowledged that
//!    leader's heartbeat round after `s`. The leader's confirmations
//!    (`node::Contact`) are the same proof: a read index the leader asked
//!    after receiving a frame X sent at `s`, which names its `s`, and the
//!    leader calls `heard_from` for that frame. Receiving leader messages
//!    proves neither: with a one-way partition (X hears the leader, the
//!    leader does not hear X) X would never fence while the leader
//!    reschedules its VMs; and a deposed leader that has not noticed yet
//!    keeps sending.
//! 2. **Same leader.** The leader calls [`Detector::heard_from`] for every
//!    message it receives, so its last-heard time for X is at least the
//!    arrival of X's last read request, which is after `s`. The leader
//!    reschedules at `heard + reschedule_after` (its clock); X fences at
//!    `s + fence_after` (its clock) and is done stopping `check_interval +
//!    stop_max` later.
//! 3. **New leader.** A new leader counts everyone as heard at the moment it
//!    became leader, `b` ([`Detector::on_became_leader`]). Every quorum-acked
//!    round of an older leader was sent before `b`: the voters that elected
//!    the new leader form a quorum, every quorum shares a member with it,
//!    and that member refuses the old term's heartbeats once it has voted
//!    (before `b`). So every contact X can have through an old leader has
//!    `s < b`, and the new leader's clock starts no earlier than X's.
//!    Measuring from the leader's own last-heard, not from when `Down` was
//!    committed, keeps this bound without letting leader changes postpone
//!    rescheduling forever.
//! 4. **Clocks.** Durations are measured on two monotonic clocks whose rates
//!    differ by at most [`CLOCK_RATE_ERROR_PPM`] each from true time. So the
//!    guarantee holds when `reschedule_after * (1 - e) >= (fence_after +
//!    check_interval + stop_max) * (1 + e)`, which [`Timing::validate`]
//!    enforces.
//! 5. **Coming back.** A fenced host must not restart a VM from stale state
//!    (it still shows the VM placed on itself, without a handoff). It starts
//!    guests only while [`Fence::may_start`], which also requires its applied
//!    index to have reached the commit index of its last contact: by then it
//!    has applied the moves made while it was away.
//!
//! What the shell must guarantee: contact times as in (1), taken only from
//! the current leader's confirmations (`node`'s `on_confirmation`: from the
//! leader of the receiver's term, never later than the receiver's clock) or
//! from a read index of the host's own; `heard_from` for every received
//! message as in (2); the fence checked at least every `check_interval_ms`;
//! a fence ends every guest within `stop_max_ms` (it kills them at once:
//! StopUnit, so systemd does not restart them, and KillUnit with SIGKILL
//! right after; `runtime::Runtime::kill`); and a restarted agent restores its last contact time
//! (`<data_dir>/fence-contact`, with the boot id: a record from another boot,
//! or later than the clock, counts as none) or fences at once.
//!
//! # Layers: the fence does not need a live agent
//!
//! The argument above needs *someone* on host X to fence at `s +
//! fence_after`. The agent is not enough: frozen (a disk stall, SIGSTOP, a
//! deadlock), stopped for maintenance, crash-looping on a bad config,
//! killed, or removed from the cluster, it fences nothing, while the leader
//! reschedules as always. So the fence has layers; each guarantees the bound
//! `s + fence_after + check_interval + stop_max` under its own assumption:
//!
//! | layer | acts when | assumes | shown by |
//! |---|---|---|---|
//! | the agent's reconciler ([`Fence`]) | the agent runs | nothing else | `reconciler` tests, the simulator, `tests/tests/scenarios.rs` |
//! | the guard (`guard`, `blixard-guard.service`) | the agent cannot | the guard runs; the agent recorded `s` | `guard::tests` (the model), `tests/tests/fencing.rs` 1-4 |
//! | systemd's watchdog on the guard, then the guard's stop-post | the guard is frozen or dies | PID 1 runs | `guard::tests`, `fencing.rs` 5-6 |
//! | every guest's start check for the guard | no guard runs | PID 1 runs | `fencing.rs` (the drop-in), `runtime::systemd` |
//! | the host watchdog (`RuntimeWatchdogSec`) | PID 1 or the kernel hangs | a hardware or soft watchdog | documented (docs/fencing.md) |
//!
//! The guard reads only the contact record and writes nothing; it stops
//! guests at `s + fence_after` (checking every `period` <= 50 ms, so within
//! one check interval) and is done `stop_max` later. A frozen guard is
//! killed at the latest at the deadline plus one check interval (it sets its
//! watchdog timeout to that at every check), and its stop-post fences within
//! `stop_max`: the same bound, so `Timing::validate`'s inequality covers
//! every layer. A removed agent revokes its record (and stops every guest at
//! once): the guard fences too. Guests with `failover = "manual"` are listed
//! in `<data_dir>/fence-exempt` and no layer above stops them for want of
//! quorum: the cluster never moves them by itself either (the scheduler
//! leaves them on a lost host; `vm recover` is the operator vouching).
//!
//! A restart is not a failure: an agent back within `fence_after` (systemd
//! restarts it after `RestartSec=100ms`; see [`Timing::validate_unit`])
//! renews the record before the deadline, its guests keep running and it
//! re-adopts them; the guard never stops.
use std::collections::{BTreeMap, BTreeSet};

use crate::scheduler::Decision;
use crate::state::{CommandKind, MemberStatus, NodeId, State};

/// The largest rate error of a host's monotonic clock, in parts per million:
/// 1%, far beyond a quartz oscillator's 50 ppm, to cover virtualised hosts.
pub const CLOCK_RATE_ERROR_PPM: u64 = 10_000;

/// The failure-handling timeouts, in milliseconds of a monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// The leader marks a member down after this long without a message.
    /// Informational, and it stops new placements there; nothing moves yet.
    pub node_down_after_ms: u64,
    /// The leader moves a silent host's VMs (and ends handoffs from it) after
    /// this long without a message: by then the host has fenced itself.
    pub reschedule_after_ms: u64,
    /// A host stops its guests after this long without quorum contact.
    pub fence_after_ms: u64,
    /// The longest a fence takes to end every guest: it kills them at once
    /// (`Runtime::kill`), so this bounds the kill's round trips, not a
    /// graceful stop.
    pub stop_max_ms: u64,
    /// How often the leader runs the detector and each host checks its
    /// fence (the agent's tick).
    pub check_interval_ms: u64,
    /// The longest a Raft election takes (raft-rs randomises the election
    /// timeout in `[election_tick, 2 * election_tick)` ticks).
    pub election_timeout_max_ms: u64,
    /// The leader's heartbeat interval: a read index waits up to this long
    /// for the heartbeat round that confirms it, and the leader's
    /// confirmation of a host's quorum contact arrives up to two of them
    /// after the contact's send time (see `node::Contact`).
    pub heartbeat_interval_ms: u64,
}

impl Default for Timing {
    /// Chosen to put a lost host's VMs back into `running` within 2.5 s
    /// (BENCHMARKS.md, "Faster safe failover"; on a network that loses 10%
    /// of its packets, hosts still fence: see docs/fencing.md):
    ///
    /// - `check_interval` 100 ms: the agent's tick.
    /// - `election_timeout_max` 600 ms: Raft ticks of 25 ms, election after
    ///   12..24 of them.
    /// - `heartbeat_interval` 100 ms: Raft heartbeats every 4 ticks (3 to the
    ///   shortest election timeout, as before).
    /// - `fence_after` 1500 ms: a leader election never fences a healthy
    ///   cluster (see [`Timing::validate`]: 600 + 5 * 100 = 1100), with 400 ms
    ///   to spare for a slow network: a confirmation crosses it three times
    ///   (the host's frame, the leader's round, the confirmation), and a lost
    ///   segment costs TCP a retransmission.
    /// - `node_down_after` 1500 ms: as soon as the fence could fire, the host
    ///   stops receiving new placements.
    /// - `stop_max` 250 ms: a fence does not stop its guests gracefully, it
    ///   kills them at once (SIGKILL to every process of the guest, with the
    ///   stop that keeps it down, see [`crate::runtime::Runtime::kill`]): a
    ///   fenced guest is abandoned anyway. 250 ms bounds the kill's round
    ///   trips to systemd; normal stops stay graceful.
    /// - `reschedule_after` 1900 ms: the smallest round number that clears
    ///   the safety bound, (1500 + 100 + 250) * 1.01 / 0.99 = 1888 ms.
    ///
    /// Failover then takes at most `reschedule_after` + one tick + a Raft
    /// commit + the guest's start, about 2.0 s plus the start; when the
    /// leader's own host is lost, add up to one election: 2.6 s plus the
    /// start.
    fn default() -> Self {
        Timing {
            node_down_after_ms: 1500,
            reschedule_after_ms: 1900,
            fence_after_ms: 1500,
            stop_max_ms: 250,
            check_interval_ms: 100,
            election_timeout_max_ms: 600,
            heartbeat_interval_ms: 100,
        }
    }
}

impl Timing {
    /// Refuses combinations that break the safety argument in the module
    /// documentation (or that would fence a healthy cluster), with one
    /// sentence saying what to change.
    pub fn validate(&self) -> Result<(), String> {
        let fields = [
            ("node_down_after_ms", self.node_down_after_ms),
            ("reschedule_after_ms", self.reschedule_after_ms),
            ("fence_after_ms", self.fence_after_ms),
            ("stop_max_ms", self.stop_max_ms),
            ("check_interval_ms", self.check_interval_ms),
            ("election_timeout_max_ms", self.election_timeout_max_ms),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
        ];
        for (name, value) in fields {
            if value == 0 || value > TIMING_MS_MAX {
                return Err(format!("{name} must be between 1 and {TIMING_MS_MAX}, not {value}"));
            }
        }
        let scale = 1_000_000u128;
        let e = u128::from(CLOCK_RATE_ERROR_PPM);
        let fenced_by = u128::from(self.fence_after_ms + self.check_interval_ms + self.stop_max_ms);
        if u128::from(self.reschedule_after_ms) * (scale - e) < fenced_by * (scale + e) {
            let needed = (fenced_by * (scale + e)).div_ceil(scale - e);
            return Err(format!(
                "reschedule_after_ms ({}) must be at least {needed}: fence_after_ms + check_interval_ms + \
                 stop_max_ms ({fenced_by}) plus {}% for clock rates, or a cut-off host may still run a VM when \
                 another host starts it",
                self.reschedule_after_ms,
                CLOCK_RATE_ERROR_PPM * 2 / 10_000,
            ));
        }
        // A healthy host must not fence while a new leader is elected: its
        // newest contact when the leader is lost may already be old, and
        // after the election (at most `election_timeout_max`) the next one
        // takes time to arrive.
        // - Confirmed by the leader: the newest contact can be 3 heartbeat
        //   intervals old (its frame waits for a round, the confirmation for
        //   the next heartbeat, then a heartbeat passes), and the next one
        //   arrives 2 after the election (a round, then the heartbeat that
        //   carries it): 5 in all.
        // - Read by the host itself: a check interval old before the loss;
        //   after the election, a check interval until the next read and a
        //   heartbeat for its round.
        let confirmed = 5 * self.heartbeat_interval_ms;
        let read = 2 * self.check_interval_ms + self.heartbeat_interval_ms;
        let election = self.election_timeout_max_ms + confirmed.max(read);
        if self.fence_after_ms < election {
            return Err(format!(
                "fence_after_ms ({}) must be at least election_timeout_max_ms + the larger of 5 * \
                 heartbeat_interval_ms and 2 * check_interval_ms + heartbeat_interval_ms ({election}), or every \
                 host stops its VMs while a new leader is elected",
                self.fence_after_ms
            ));
        }
        if self.node_down_after_ms > self.reschedule_after_ms {
            return Err(format!(
                "node_down_after_ms ({}) must not exceed reschedule_after_ms ({}): a host's VMs move only \
                 once it is marked down",
                self.node_down_after_ms, self.reschedule_after_ms
            ));
        }
        Ok(())
    }

    /// Refuses agent unit settings under which a restart would not be cheap:
    /// systemd must start the agent again (`RestartSec`) and the agent must
    /// renew its contact (about a heartbeat round once it serves, plus its
    /// start) before `fence_after` runs out, or every restart fences the
    /// host. `start_budget_ms` is what starting takes (the store opening,
    /// the first contact). The watchdog (`WatchdogSec`) must also be well
    /// above the agent's own pet interval (half of it) and no longer than a
    /// minute, so a hung agent is restarted in seconds.
    pub fn validate_unit(
        &self,
        restart_sec_ms: u64,
        watchdog_sec_ms: Option<u64>,
        start_budget_ms: u64,
    ) -> Result<(), String> {
        if restart_sec_ms + start_budget_ms >= self.fence_after_ms {
            return Err(format!(
                "RestartSec ({restart_sec_ms} ms) plus the agent's start ({start_budget_ms} ms) must stay below \
                 fence_after_ms ({}), or every agent restart stops this host's guests",
                self.fence_after_ms
            ));
        }
        if let Some(watchdog) = watchdog_sec_ms
            && !(2 * self.check_interval_ms..=60_000).contains(&watchdog)
        {
            return Err(format!(
                "WatchdogSec ({watchdog} ms) must be between {} ms and 60 s: the agent pets the watchdog every half \
                 of it, and a hung agent should be restarted within seconds",
                2 * self.check_interval_ms
            ));
        }
        Ok(())
    }

    /// A host reads its quorum contact itself once the last is this old:
    /// the leader's confirmations normally keep it under three heartbeat
    /// intervals (one round to confirm, one to carry the confirmation, one
    /// until the next), checked every check interval.
    pub fn contact_read_after_ms(&self) -> u64 {
        3 * self.heartbeat_interval_ms + self.check_interval_ms
    }
}

/// The largest accepted timing: an hour. Larger values are typos, and the
/// arithmetic in `validate` stays far from overflow.
pub const TIMING_MS_MAX: u64 = 3_600_000;

/// The leader's failure detector. Feed it every message received and the
/// leadership changes; ask it for decisions every `check_interval_ms`.
#[derive(Debug, Clone)]
pub struct Detector {
    timing: Timing,
    me: NodeId,
    /// When this node last became leader; `None` while it is not leader.
    leader_since_ms: Option<u64>,
    /// When this leader last heard from each node, during this leadership.
    /// Pruned to members and hosts that still hold handoffs, so it is bounded
    /// by the state.
    heard_ms: BTreeMap<NodeId, u64>,
}

impl Detector {
    pub fn new(me: NodeId, timing: Timing) -> Self {
        Detector { timing, me, leader_since_ms: None, heard_ms: BTreeMap::new() }
    }

    pub fn timing(&self) -> &Timing {
        &self.timing
    }

    /// This node became leader: everyone counts as heard from now (grace),
    /// because a new leader cannot know when its predecessor last heard from
    /// anyone; see the module documentation, point 3.
    pub fn on_became_leader(&mut self, now_ms: u64) {
        self.leader_since_ms = Some(now_ms);
        self.heard_ms.clear();
    }

    /// This node is no longer leader: it decides nothing until it is again.
    pub fn on_lost_leadership(&mut self) {
        self.leader_since_ms = None;
        self.heard_ms.clear();
    }

    /// A message from `node` arrived. Call it for every message, before the
    /// message is handled (a read-index request in particular).
    pub fn heard_from(&mut self, node: NodeId, now_ms: u64) {
        if self.leader_since_ms.is_some() {
            let heard = self.heard_ms.entry(node).or_insert(now_ms);
            *heard = (*heard).max(now_ms);
        }
    }

    /// The nodes this leader heard from within the last `window_ms`, during
    /// this leadership (none unless leader).
    pub fn heard_within(&self, window_ms: u64, now_ms: u64) -> impl Iterator<Item = NodeId> + '_ {
        self.heard_ms.iter().filter(move |(_, t)| now_ms.saturating_sub(**t) <= window_ms).map(|(&node, _)| node)
    }

    /// How long `node` has been silent, as far as this leader can vouch
    /// (`None` unless leader; a new leader counts everyone heard when it
    /// became leader).
    pub fn silent_ms(&self, node: NodeId, now_ms: u64) -> Option<u64> {
        let since = self.leader_since_ms?;
        if node == self.me {
            return Some(0);
        }
        let heard = self.heard_ms.get(&node).copied().unwrap_or(since).max(since);
        Some(now_ms.saturating_sub(heard))
    }

    /// Member status changes to propose: `Down` for a member silent for
    /// longer than `node_down_after_ms`, `Up` for a down member this leader
    /// has heard from within it. Empty unless leader. Also prunes what it
    /// remembers of nodes the state no longer mentions.
    pub fn decisions(&mut self, state: &State, now_ms: u64) -> Vec<Decision> {
        if self.leader_since_ms.is_none() {
            return Vec::new();
        }
        let handoff_hosts: BTreeSet<NodeId> = state.handoff_hosts().collect();
        self.heard_ms.retain(|node, _| state.member(*node).is_some() || handoff_hosts.contains(node));
        let down_after = self.timing.node_down_after_ms;
        let mut out = Vec::new();
        for member in state.members().values() {
            let silent = self.silent_ms(member.id, now_ms).expect("leader");
            let heard_recently = member.id == self.me
                || self.heard_ms.get(&member.id).is_some_and(|&t| now_ms.saturating_sub(t) <= down_after);
            let (status, reason) = match member.status {
                MemberStatus::Up if silent > down_after => (
                    MemberStatus::Down,
                    format!("{} not heard from for {silent} ms (node_down_after {down_after} ms)", member.name),
                ),
                // Only a message heard during this leadership marks a member
                // up; the new-leader grace does not.
                MemberStatus::Down if heard_recently => (MemberStatus::Up, format!("{} heard from again", member.name)),
                _ => continue,
            };
            out.push(Decision { command: CommandKind::SetStatus { node: member.id, status }, reason });
        }
        out
    }

    /// The hosts that have certainly stopped their guests: down members, and
    /// removed hosts that still hold handoffs, silent for longer than
    /// `reschedule_after_ms` as this leader measures it. The scheduler moves
    /// their VMs and clears their handoffs. Empty unless leader.
    pub fn fenced(&self, state: &State, now_ms: u64) -> BTreeSet<NodeId> {
        if self.leader_since_ms.is_none() {
            return BTreeSet::new();
        }
        let down = state.members().values().filter(|m| m.status == MemberStatus::Down).map(|m| m.id);
        let removed = state.handoff_hosts().filter(|node| state.member(*node).is_none());
        down.chain(removed)
            .filter(|&node| node != self.me)
            .filter(|&node| self.silent_ms(node, now_ms).is_some_and(|s| s > self.timing.reschedule_after_ms))
            .collect()
    }
}

/// A host's fence: stop every guest once quorum contact is older than
/// `fence_after_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    fence_after_ms: u64,
    /// The send time of the latest completed read-index request.
    contact_ms: Option<u64>,
    /// The commit index that request returned.
    contact_index: u64,
}

impl Fence {
    /// `last_contact_ms`: the contact time this host's previous agent process
    /// recorded (same boot, same monotonic clock), or `None`, which fences at
    /// once: guests survive an agent restart, and nobody knows how long the
    /// agent was gone.
    pub fn new(fence_after_ms: u64, last_contact_ms: Option<u64>) -> Self {
        Fence { fence_after_ms, contact_ms: last_contact_ms, contact_index: 0 }
    }

    /// A read-index request this host sent at `sent_at_ms` completed with
    /// commit index `read_index`: the current leader heard from this host,
    /// and a quorum from that leader, after `sent_at_ms`. Pass the send time,
    /// never the completion time (module documentation, point 1).
    pub fn quorum_contact(&mut self, sent_at_ms: u64, read_index: u64) {
        self.contact_ms = Some(self.contact_ms.map_or(sent_at_ms, |c| c.max(sent_at_ms)));
        self.contact_index = self.contact_index.max(read_index);
    }

    /// The time of the latest quorum contact, for the shell to record.
    pub fn last_contact_ms(&self) -> Option<u64> {
        self.contact_ms
    }

    /// When the fence fires unless contact comes first.
    pub fn fence_at_ms(&self) -> Option<u64> {
        self.contact_ms.map(|c| c.saturating_add(self.fence_after_ms))
    }

    /// Whether this host must stop all its guests now.
    pub fn should_fence(&self, now_ms: u64) -> bool {
        self.fence_at_ms().is_none_or(|at| now_ms > at)
    }

    /// Whether this host may start a guest now: not fenced, and its state
    /// applied up to `applied_index` includes everything committed at its
    /// last contact. Stopping is always allowed.
    pub fn may_start(&self, now_ms: u64, applied_index: u64) -> bool {
        !self.should_fence(now_ms) && applied_index >= self.contact_index
    }
}

#[cfg(test)]
mod tests;

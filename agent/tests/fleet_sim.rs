//! 1,000 simulated hosts against the leader's real failure detector and
//! scheduler.
//!
//! One leader runs the real `failure::Detector`, the real
//! `scheduler::plan_with` (with its `Memo` and the state's change feed) and
//! a real `State`, which every decision and every host report goes through
//! (`State::apply`). 1,000 hosts, each with its own drifting monotonic
//! clock (up to `CLOCK_RATE_ERROR_PPM` fast or slow) and its real `Fence`,
//! send frames to the leader every heartbeat interval; the leader confirms
//! each host's quorum contact as `node::Contact` does (a frame heard before
//! one heartbeat round is confirmed, with its send time, by the next round's
//! heartbeat), and the heartbeat carries the host's view of the state (its
//! placements). Frames and heartbeats are delayed and lost; reports and
//! releases are delayed, never lost while connected (a stream retries
//! them). Some hosts lose power (their guests die with them), some are cut
//! off both ways or one way (the leader cannot hear them) and heal; their
//! guests keep running until their fence stops them within `stop_max`.
//! About 10,000 VMs are placed on the hosts first and then moved by the
//! scheduler as hosts are lost.
//!
//! Checked after every step:
//! - never two copies: a VM starts on a host only when no other host still
//!   runs (or is still stopping) a copy of it;
//! - a healthy host (no fault, only the network's ordinary loss and delay)
//!   is never marked down, never in the detector's fenced set, and never
//!   fences itself;
//! - every desired-running VM on a host lost for good (silent from `t`) is
//!   placed on another host by `t + reschedule_after_ms + MOVE_SLACK_MS`
//!   (leader's clock), unless no other host could take it.
//!
//! What is simplified: one leader for the whole run (leader changes and
//! Raft itself are the `sim` test's), a decision is committed and applied
//! at once, and a host applies the state it is sent at once.
//!
//! Everything is drawn from one seed; a failure prints it. Replay with
//! `BLIXARD_FLEET_SEED=<n> cargo test -p blixard-agent --test fleet_sim --
//! --nocapture`; `BLIXARD_FLEET_SEEDS=<count>` runs more seeds. The run
//! prints the leader's cost per check interval (the detector's check and
//! the plan), the numbers BENCHMARKS.md records.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use blixard::failure::{CLOCK_RATE_ERROR_PPM, Detector, Fence, Timing};
use blixard::scheduler::{self, Memo, Policy};
use blixard::state::{CommandKind, Desired, MemberStatus, NodeId, State, VmState};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const HOSTS: u64 = 1_000;
const VMS: usize = 10_000;
/// A VM's runner is on the hosts whose id is its index modulo this.
const RUNNER_GROUPS: u64 = 50;
/// The leader's host: it never fails.
const LEADER: NodeId = 1;
/// The simulated time of one run, and its step.
const RUN_MS: u64 = 30_000;
const STEP_MS: u64 = 5;
/// Faults start after this (the fleet has settled) and end before
/// `RUN_MS - SETTLE_MS`, so that every lost host's VMs have time to move.
const SETTLE_MS: u64 = 8_000;
/// Hosts that lose power, are cut off both ways, are cut off one way.
const CRASHES: usize = 20;
const PARTITIONS: usize = 20;
const ONE_WAY: usize = 10;
/// Ordinary network: delay of a message, in ms, and loss of frames and
/// heartbeats (at most `LOSS_RUN_MAX` in a row per host and direction).
const DELAY_MS_MAX: u64 = 40;
const LOSS_PCT: u32 = 5;
const LOSS_RUN_MAX: u32 = 2;
/// What a move may take beyond `reschedule_after_ms`: a check interval to
/// notice, clock rate error, and the plan's bound per check.
const MOVE_SLACK_MS: u64 = 1_000;

#[path = "support/fleet.rs"]
mod fleet;
use fleet::cmd;

/// A host's monotonic clock: `offset + t * (1 + rate)`.
#[derive(Debug, Clone, Copy)]
struct Clock {
    offset_ms: u64,
    rate_ppm: i64,
}

impl Clock {
    fn at(&self, t: u64) -> u64 {
        let drift = (t as i128 * self.rate_ppm as i128 / 1_000_000) as i64;
        self.offset_ms + (t as i64 + drift) as u64
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Power lost at `from` (guests die with the host); back at `until`.
    Crash,
    /// Cut off both ways.
    Partition,
    /// The leader cannot hear the host; the host hears the leader.
    OneWay,
}

#[derive(Debug)]
struct Host {
    id: NodeId,
    clock: Clock,
    fence: Fence,
    fault: Option<(Fault, u64, u64)>,
    next_frame_ms: u64,
    next_check_ms: u64,
    /// The placements on this host as last sent by the leader: VM ->
    /// (generation, may start), with the index it was sent at.
    view: BTreeMap<String, (u64, bool)>,
    view_index: u64,
    /// Copies running here, by VM: the generation started.
    running: BTreeMap<String, u64>,
    /// Copies being stopped: VM, generation, true time the stop is done.
    stopping: Vec<(String, u64, u64)>,
    /// Reports and releases not yet sent (sent once connected).
    outbox: Vec<CommandKind>,
    lost_in_a_row: [u32; 2],
    /// Whether it restarted after its power loss.
    restarted: bool,
}

impl Host {
    fn down_at(&self, t: u64) -> bool {
        matches!(self.fault, Some((Fault::Crash, from, until)) if t >= from && t < until)
    }
    /// Whether the leader hears this host at `t`.
    fn heard_at(&self, t: u64) -> bool {
        !matches!(self.fault, Some((_, from, until)) if t >= from && t < until)
    }
    /// Whether this host hears the leader at `t`.
    fn hears_at(&self, t: u64) -> bool {
        !matches!(self.fault, Some((Fault::Crash | Fault::Partition, from, until)) if t >= from && t < until)
    }
    fn healthy(&self) -> bool {
        self.fault.is_none()
    }
}

enum Message {
    /// Host -> leader: a frame sent at `sent_ms` on the host's clock.
    Frame { from: NodeId, sent_ms: u64 },
    /// Host -> leader: a command the host proposes (report, release).
    Propose(CommandKind),
    /// Leader -> host: a heartbeat confirming contact `confirm` (a send
    /// time) with the commit index, and the host's placements.
    Heartbeat { to: NodeId, confirm: Option<u64>, index: u64, view: BTreeMap<String, (u64, bool)> },
}

/// The leader's cost per check interval.
#[derive(Debug, Default)]
struct Cost {
    checks: u64,
    /// The detector's check (`decisions`, `fenced`) and the plan, per check.
    total: Duration,
    max: Duration,
    detector: Duration,
    plans: Vec<Duration>,
    /// `Detector::heard_from`, over every frame heard.
    heard_from: Duration,
    frames: u64,
}

struct Sim {
    seed: u64,
    rng: ChaCha8Rng,
    timing: Timing,
    t: u64,
    hosts: Vec<Host>,
    state: State,
    index: u64,
    leader_clock: Clock,
    detector: Detector,
    memo: Memo,
    policy: Policy,
    next_duties_ms: u64,
    next_round_ms: u64,
    /// Frames heard since the last round (host -> newest send time), and
    /// those the last round asked a read index for (confirmed this round).
    heard: BTreeMap<NodeId, u64>,
    asked: BTreeMap<NodeId, u64>,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    messages: HashMap<u64, Message>,
    next_message: u64,
    /// Which hosts run (or are still stopping) a copy of each VM.
    copies: HashMap<String, BTreeSet<NodeId>>,
    /// VMs seen on a lost host: (vm, host) -> true time first seen so.
    stranded: BTreeMap<(String, NodeId), u64>,
    cost: Cost,
    moves: u64,
    fences: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let timing = Timing::default();
        let e = CLOCK_RATE_ERROR_PPM as i64;
        let has_runner = |id, v: usize| v as u64 % RUNNER_GROUPS == id % RUNNER_GROUPS;
        let spec_of = |v: usize| {
            let mut spec = fleet::vm_spec(v);
            if v % 10 == 3 {
                // Ten VMs per group, on the twenty hosts with their runner.
                spec.anti_affinity = Some(format!("g{}", v % 1_000));
            }
            if v.is_multiple_of(97) {
                spec.desired = Desired::Stopped;
            }
            spec
        };
        let mut state = fleet::build(HOSTS, VMS, 10, has_runner, spec_of);
        // The fleet before the run: placed, every copy running.
        let policy = Policy { decisions_max: usize::MAX, ..Policy::default() };
        for decision in scheduler::plan(&state, &policy, &BTreeSet::new()) {
            state.apply(&cmd(decision.command)).expect("initial placement");
        }
        let mut hosts: Vec<Host> = (1..=HOSTS)
            .map(|id| {
                let clock = Clock {
                    offset_ms: rng.random_range(0..1_000_000),
                    rate_ppm: if id == LEADER { 0 } else { rng.random_range(-e..=e) },
                };
                Host {
                    id,
                    clock,
                    fence: Fence::new(timing.fence_after_ms, Some(clock.at(0))),
                    fault: None,
                    next_frame_ms: 0,
                    next_check_ms: rng.random_range(0..timing.check_interval_ms),
                    view: BTreeMap::new(),
                    view_index: 0,
                    running: BTreeMap::new(),
                    stopping: Vec::new(),
                    outbox: Vec::new(),
                    lost_in_a_row: [0; 2],
                    restarted: false,
                }
            })
            .collect();
        let mut copies: HashMap<String, BTreeSet<NodeId>> = HashMap::new();
        let placed: Vec<(String, NodeId, u64)> = state
            .vms()
            .values()
            .filter_map(|vm| vm.placement.map(|p| (vm.name.clone(), p.node, p.generation)))
            .collect();
        for (vm, node, generation) in placed {
            let desired = state.vm(&vm).expect("placed").spec.desired;
            let host = &mut hosts[node as usize - 1];
            host.view.insert(vm.clone(), (generation, desired == Desired::Running));
            if desired == Desired::Running {
                host.running.insert(vm.clone(), generation);
                copies.entry(vm.clone()).or_default().insert(node);
                let report = CommandKind::Report { node, vm, generation, state: VmState::Running, last_error: None };
                state.apply(&cmd(report)).expect("report");
            }
        }
        // Faults, each on a host of its own (never the leader's).
        let mut ids: Vec<NodeId> = (2..=HOSTS).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.random_range(0..=i));
        }
        let kinds = std::iter::repeat_n(Fault::Crash, CRASHES)
            .chain(std::iter::repeat_n(Fault::Partition, PARTITIONS))
            .chain(std::iter::repeat_n(Fault::OneWay, ONE_WAY));
        for (kind, id) in kinds.zip(ids) {
            let from = rng.random_range(SETTLE_MS..RUN_MS - 2 * SETTLE_MS);
            // Half come back before they would be rescheduled, half after.
            let length =
                if rng.random_bool(0.5) { rng.random_range(200..2_500) } else { rng.random_range(4_000..8_000) };
            hosts[id as usize - 1].fault = Some((kind, from, from + length));
        }
        state.take_dirty();
        state.validate().expect("invariants");
        let leader_clock = hosts[0].clock;
        let mut detector = Detector::new(LEADER, timing);
        detector.on_became_leader(leader_clock.at(0));
        Sim {
            seed,
            rng,
            timing,
            t: 0,
            hosts,
            state,
            index: 1,
            leader_clock,
            detector,
            memo: Memo::default(),
            policy: Policy::default(),
            next_duties_ms: 0,
            next_round_ms: 0,
            heard: BTreeMap::new(),
            asked: BTreeMap::new(),
            queue: BinaryHeap::new(),
            messages: HashMap::new(),
            next_message: 0,
            copies,
            stranded: BTreeMap::new(),
            cost: Cost::default(),
            moves: 0,
            fences: 0,
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "fleet simulation seed {} at {} ms: {what}\nreplay with: BLIXARD_FLEET_SEED={} cargo test -p blixard-agent --test fleet_sim -- --nocapture",
            self.seed, self.t, self.seed
        )
    }

    /// Sends `message` over the ordinary network; `lossy` messages may be
    /// lost (at most `LOSS_RUN_MAX` in a row per host and direction).
    fn send(&mut self, host: usize, direction: usize, lossy: bool, message: Message) {
        if lossy {
            let h = &mut self.hosts[host];
            if h.lost_in_a_row[direction] < LOSS_RUN_MAX && self.rng.random_ratio(LOSS_PCT, 100) {
                h.lost_in_a_row[direction] += 1;
                return;
            }
            h.lost_in_a_row[direction] = 0;
        }
        let at = self.t + if host == 0 { 0 } else { self.rng.random_range(1..=DELAY_MS_MAX) };
        let id = self.next_message;
        self.next_message += 1;
        self.messages.insert(id, message);
        self.queue.push(Reverse((at, id)));
    }

    fn leader_now(&self) -> u64 {
        self.leader_clock.at(self.t)
    }

    fn apply(&mut self, kind: CommandKind) {
        if self.state.apply(&cmd(kind)).is_ok() {
            self.index += 1;
        }
    }

    fn run(mut self) -> Self {
        while self.t <= RUN_MS {
            self.deliver();
            for i in 0..self.hosts.len() {
                self.host_step(i);
            }
            if self.t >= self.next_round_ms {
                self.heartbeat_round();
                self.next_round_ms = self.t + self.timing.heartbeat_interval_ms;
            }
            if self.t >= self.next_duties_ms {
                self.duties();
                self.next_duties_ms = self.t + self.timing.check_interval_ms;
            }
            if self.t.is_multiple_of(1_000) {
                self.state.validate().unwrap_or_else(|e| self.fail(format!("state invariants: {e}")));
            }
            self.t += STEP_MS;
        }
        self.check_settled();
        self
    }

    fn deliver(&mut self) {
        while let Some(&Reverse((at, id))) = self.queue.peek() {
            if at > self.t {
                break;
            }
            self.queue.pop();
            let message = self.messages.remove(&id).expect("queued");
            match message {
                Message::Frame { from, sent_ms } => {
                    if !self.hosts[from as usize - 1].heard_at(self.t) {
                        continue;
                    }
                    self.cost.frames += 1;
                    let now = self.leader_now();
                    let started = Instant::now();
                    self.detector.heard_from(from, now);
                    self.cost.heard_from += started.elapsed();
                    let newest = self.heard.entry(from).or_insert(sent_ms);
                    *newest = (*newest).max(sent_ms);
                }
                Message::Propose(kind) => self.apply(kind),
                Message::Heartbeat { to, confirm, index, view } => {
                    let host = &mut self.hosts[to as usize - 1];
                    if !host.hears_at(self.t) {
                        continue;
                    }
                    if index >= host.view_index {
                        host.view = view;
                        host.view_index = index;
                    }
                    if let Some(sent) = confirm {
                        host.fence.quorum_contact(sent, index);
                    }
                }
            }
        }
    }

    /// One heartbeat round: confirm what the last round asked, ask for what
    /// was heard since, and send every host its placements.
    fn heartbeat_round(&mut self) {
        let confirmed = std::mem::replace(&mut self.asked, std::mem::take(&mut self.heard));
        for i in 0..self.hosts.len() {
            let id = self.hosts[i].id;
            let view: BTreeMap<String, (u64, bool)> =
                self.state.vms_on(id).map(|vm| (vm.name.clone(), (vm.generation, vm.may_start_on(id)))).collect();
            let heartbeat =
                Message::Heartbeat { to: id, confirm: confirmed.get(&id).copied(), index: self.index, view };
            self.send(i, 1, true, heartbeat);
        }
    }

    fn host_step(&mut self, i: usize) {
        let t = self.t;
        let id = self.hosts[i].id;
        if self.hosts[i].stopping.iter().any(|(_, _, at)| *at <= t) {
            // Copies whose stop is done: released.
            let stopping = std::mem::take(&mut self.hosts[i].stopping);
            for (vm, generation, at) in stopping {
                if at > t {
                    self.hosts[i].stopping.push((vm, generation, at));
                    continue;
                }
                if let Some(c) = self.copies.get_mut(&vm) {
                    c.remove(&id);
                }
                self.hosts[i].outbox.push(CommandKind::Released { node: id, vm, generation });
            }
        }
        if self.hosts[i].down_at(t) {
            // Power is off: every guest died with the host.
            let host = &mut self.hosts[i];
            let dead = std::mem::take(&mut host.running).into_keys().chain(host.stopping.drain(..).map(|(vm, ..)| vm));
            for vm in dead.collect::<Vec<_>>() {
                if let Some(c) = self.copies.get_mut(&vm) {
                    c.remove(&id);
                }
            }
            host.outbox.clear();
            return;
        }
        if let Some((Fault::Crash, _, until)) = self.hosts[i].fault
            && t >= until
            && !self.hosts[i].restarted
        {
            // Back from a power loss: a new agent with no recorded contact
            // fences at once until the leader confirms it again.
            let host = &mut self.hosts[i];
            host.restarted = true;
            host.fence = Fence::new(self.timing.fence_after_ms, None);
            host.view.clear();
            host.view_index = 0;
        }
        let local = self.hosts[i].clock.at(t);
        if local >= self.hosts[i].next_frame_ms {
            self.hosts[i].next_frame_ms = local + self.timing.heartbeat_interval_ms;
            if self.hosts[i].heard_at(t) {
                self.send(i, 0, true, Message::Frame { from: id, sent_ms: local });
            }
        }
        if local < self.hosts[i].next_check_ms {
            return;
        }
        self.hosts[i].next_check_ms = local + self.timing.check_interval_ms;
        let stop_ms = self.rng.random_range(1..self.timing.stop_max_ms * 99 / 100);
        let host = &mut self.hosts[i];
        let fenced = host.fence.should_fence(local);
        if fenced && host.healthy() {
            let contact = host.fence.last_contact_ms();
            self.fail(format!("healthy host {id} fenced itself (last contact {contact:?}, now {local})"));
        }
        let may_start = !fenced && host.fence.may_start(local, host.view_index);
        // Stop what must not run: everything when fenced, else what the
        // view does not let run.
        let stop: Vec<(String, u64)> = host
            .running
            .iter()
            .filter(|(vm, generation)| fenced || host.view.get(*vm) != Some(&(**generation, true)))
            .map(|(vm, g)| (vm.clone(), *g))
            .collect();
        if fenced && !stop.is_empty() {
            self.fences += 1;
        }
        for (vm, generation) in stop {
            host.running.remove(&vm);
            // The stop takes real time, bounded by `stop_max` on this
            // host's clock (true time within 1% of it).
            host.stopping.push((vm, generation, t + stop_ms));
        }
        if !may_start {
            return;
        }
        let start: Vec<(String, u64)> = host
            .view
            .iter()
            .filter(|(vm, (_, may))| {
                *may && !host.running.contains_key(*vm) && !host.stopping.iter().any(|(s, ..)| s == *vm)
            })
            .map(|(vm, (g, _))| (vm.clone(), *g))
            .collect();
        for (vm, generation) in start {
            let others = self.copies.entry(vm.clone()).or_default();
            if let Some(other) = others.iter().find(|&&h| h != id) {
                let other = *other;
                self.fail(format!("two copies: {vm} starts on host {id} while host {other} still runs it"));
            }
            others.insert(id);
            let host = &mut self.hosts[i];
            host.running.insert(vm.clone(), generation);
            host.outbox.push(CommandKind::Report {
                node: id,
                vm,
                generation,
                state: VmState::Running,
                last_error: None,
            });
        }
        if self.hosts[i].heard_at(t) {
            for kind in std::mem::take(&mut self.hosts[i].outbox) {
                self.send(i, 0, false, Message::Propose(kind));
            }
        }
    }

    /// The leader's duties, as `node::leader::Duties::check` runs them.
    fn duties(&mut self) {
        let now = self.leader_now();
        let started = Instant::now();
        let mut decisions = self.detector.decisions(&self.state, now);
        let fenced = self.detector.fenced(&self.state, now);
        let changed = self.state.take_vm_changes();
        self.cost.detector += started.elapsed();
        let plan_started = Instant::now();
        decisions.extend(scheduler::plan_with(&self.state, &self.policy, &fenced, changed.as_ref(), &mut self.memo));
        let plan_took = plan_started.elapsed();
        let took = started.elapsed();
        self.cost.checks += 1;
        self.cost.total += took;
        self.cost.max = self.cost.max.max(took);
        self.cost.plans.push(plan_took);
        for &node in &fenced {
            if self.hosts[node as usize - 1].healthy() {
                self.fail(format!("the detector counts healthy host {node} as fenced"));
            }
        }
        for decision in decisions {
            match &decision.command {
                CommandKind::SetStatus { node, status: MemberStatus::Down }
                    if self.hosts[*node as usize - 1].healthy() =>
                {
                    self.fail(format!("healthy host {node} marked down: {}", decision.reason));
                }
                CommandKind::Place { .. } => self.moves += 1,
                _ => {}
            }
            self.apply(decision.command);
        }
        self.check_stranded(now);
    }

    /// Every desired-running VM on a host the leader has lost for good
    /// moves within the bound, unless it fits nowhere else.
    fn check_stranded(&mut self, now: u64) {
        let lost: Vec<NodeId> = self
            .hosts
            .iter()
            .filter(|h| matches!(h.fault, Some((_, from, until)) if self.t >= from && until - from > self.timing.reschedule_after_ms + MOVE_SLACK_MS + 500))
            .map(|h| h.id)
            .collect();
        let mut still = BTreeMap::new();
        for node in lost {
            let from = self.hosts[node as usize - 1].fault.expect("lost").1;
            if self.t >= self.hosts[node as usize - 1].fault.expect("lost").2 {
                continue;
            }
            for vm in self.state.vms_on(node) {
                if vm.spec.desired != Desired::Running {
                    continue;
                }
                let key = (vm.name.clone(), node);
                // Since it was first seen on the lost host (it may have been
                // placed there after the loss, before the host was down).
                let since = self.stranded.get(&key).copied().unwrap_or(self.t.max(from));
                still.insert(key, since);
                // The bound in the leader's clock (1% fast at most).
                let bound = self.timing.reschedule_after_ms + MOVE_SLACK_MS;
                if self.t - since > bound {
                    let fits = self.state.members().values().any(|m| {
                        m.id != node
                            && m.accepts_placements()
                            && self.state.placement_violation(&vm.name, &vm.spec, m.id).is_none()
                    });
                    if fits {
                        self.fail(format!(
                            "{} is still on lost host {node} {} ms after the host was lost (bound {bound} ms, leader at {now})",
                            vm.name,
                            self.t - since
                        ));
                    }
                }
            }
        }
        self.stranded = still;
    }

    /// At the end: the state is valid, and every desired-running VM that
    /// some up host could run has exactly one copy or is about to start.
    fn check_settled(&self) {
        self.state.validate().unwrap_or_else(|e| self.fail(format!("state invariants: {e}")));
        let running = self.copies.values().filter(|c| !c.is_empty()).count();
        let desired = self.state.vms().values().filter(|vm| vm.spec.desired == Desired::Running).count();
        if running * 100 < desired * 95 {
            self.fail(format!("only {running} of {desired} desired-running VMs run at the end"));
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")))
}

#[test]
fn a_thousand_hosts_fail_and_heal_with_never_two_copies() {
    let seeds: Vec<u64> = match env_u64("BLIXARD_FLEET_SEED") {
        Some(seed) => vec![seed],
        None => (0..env_u64("BLIXARD_FLEET_SEEDS").unwrap_or(1)).collect(),
    };
    for seed in seeds {
        let started = Instant::now();
        let sim = Sim::new(seed).run();
        let cost = &sim.cost;
        let mut plans = cost.plans.clone();
        plans.sort();
        let p = |q: usize| plans[(plans.len() - 1) * q / 100];
        let checks = cost.checks.max(1) as u32;
        eprintln!(
            "seed {seed}: {HOSTS} hosts, {} VMs, {} moves, {} fence stops, in {:.1} s. The leader per check interval \
             ({} ms): detector check + plan mean {:?}, max {:?} (detector check mean {:?}; plan p50 {:?}, p99 {:?}, \
             max {:?}); heard_from {:?} per frame, {} frames per check interval",
            sim.state.vms().len(),
            sim.moves,
            sim.fences,
            started.elapsed().as_secs_f64(),
            sim.timing.check_interval_ms,
            cost.total / checks,
            cost.max,
            cost.detector / checks,
            p(50),
            p(99),
            p(100),
            cost.heard_from / cost.frames.max(1) as u32,
            cost.frames / u64::from(checks),
        );
        assert!(sim.moves > 0 && sim.fences > 0, "seed {seed}: the run moved nothing or fenced nothing");
    }
}

//! The simulated cluster: real `Core`s over real redb stores on simulated
//! disks, a simulated network and a simulated clock, all driven by one
//! seeded RNG so a seed replays exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use blixard::consensus::{BOOTSTRAP_INDEX, BOOTSTRAP_TERM, Core, CoreConfig, Outcome, ProposalId, Role, Transport};
use blixard::state::{Member, MembershipChange, NodeId, State};
use blixard::storage::{CrashDisk, Store};
use raft::eraftpb::{ConfState, Message, MessageType};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::checker::Checker;
use crate::workload;

/// Simulated milliseconds between two ticks of a node.
const TICK_MS: u64 = 100;

/// The knobs of one run, all drawn from the seed.
#[derive(Debug, Clone)]
pub struct Params {
    pub initial_nodes: usize,
    pub loss: f64,
    pub duplicate: f64,
    pub delay_ms_max: u64,
    /// Per step probabilities.
    pub crash: f64,
    pub restart: f64,
    pub partition: f64,
    pub heal: f64,
    pub fail_sync: f64,
    pub propose: f64,
    pub membership: f64,
    pub read: f64,
    pub compact_entries_max: u64,
    /// Simulated time with faults, then time to converge without.
    pub chaos_ms: u64,
    pub calm_ms: u64,
}

impl Params {
    pub fn draw(rng: &mut impl Rng) -> Self {
        Params {
            initial_nodes: rng.random_range(3..=5),
            loss: *[0.0, 0.01, 0.05, 0.15].choose(rng).expect("non-empty"),
            duplicate: *[0.0, 0.02].choose(rng).expect("non-empty"),
            delay_ms_max: *[2, 10, 40].choose(rng).expect("non-empty"),
            crash: *[0.0, 0.002, 0.01].choose(rng).expect("non-empty"),
            restart: *[0.002, 0.02].choose(rng).expect("non-empty"),
            partition: *[0.0, 0.003, 0.01].choose(rng).expect("non-empty"),
            heal: *[0.0005, 0.002, 0.01].choose(rng).expect("non-empty"),
            fail_sync: *[0.0, 0.003].choose(rng).expect("non-empty"),
            propose: *[0.02, 0.1].choose(rng).expect("non-empty"),
            membership: *[0.0, 0.002].choose(rng).expect("non-empty"),
            read: 0.02,
            compact_entries_max: *[8, 40, 1000].choose(rng).expect("non-empty"),
            chaos_ms: 10_000,
            calm_ms: 5_000,
        }
    }
}

struct Node {
    disk: CrashDisk,
    core: Option<Core>,
    next_tick_ms: u64,
    /// Removed from the cluster: stopped for good.
    removed: bool,
}

#[derive(Default)]
struct Outbox(Vec<Message>);

impl Transport for Outbox {
    fn send(&mut self, messages: Vec<Message>) {
        self.0.extend(messages);
    }
}

/// A linearizable read in flight: the read must see at least everything
/// committed when it was issued.
struct PendingRead {
    node: NodeId,
    committed_at_issue: u64,
}

pub struct Sim {
    pub seed: u64,
    rng: ChaCha8Rng,
    pub params: Params,
    now_ms: u64,
    nodes: BTreeMap<NodeId, Node>,
    /// (deliver_at_ms, sequence) -> message.
    in_flight: BTreeMap<(u64, u64), Message>,
    sequence: u64,
    /// Directed links that drop everything.
    blocked: BTreeSet<(NodeId, NodeId)>,
    checker: Checker,
    reads: BTreeMap<u64, PendingRead>,
    next_node_id: NodeId,
    /// Proposals waiting for an outcome, per proposer.
    proposals: BTreeMap<ProposalId, u64>,
    /// Proposals their proposer reported dropped: none may ever be applied.
    dropped: BTreeSet<ProposalId>,
    pub stats: Stats,
    /// A ring of recent events, printed when a check fails.
    trace: Vec<String>,
    verbose: bool,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub steps: u64,
    pub proposals: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub dropped: u64,
    pub crashes: u64,
    pub sync_failures: u64,
    pub snapshots: u64,
    pub reads: u64,
    pub joins: u64,
    pub removals: u64,
    pub demotions: u64,
    pub max_commit: u64,
}

fn node_name(id: NodeId) -> String {
    format!("n{id}")
}

impl Sim {
    pub fn new(seed: u64, verbose: bool) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let params = Params::draw(&mut rng);
        let mut sim = Sim {
            seed,
            rng,
            params: params.clone(),
            now_ms: 0,
            nodes: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            sequence: 0,
            blocked: BTreeSet::new(),
            checker: Checker::default(),
            reads: BTreeMap::new(),
            next_node_id: params.initial_nodes as NodeId + 1,
            proposals: BTreeMap::new(),
            dropped: BTreeSet::new(),
            stats: Stats::default(),
            trace: Vec::new(),
            verbose,
        };
        let ids: Vec<NodeId> = (1..=params.initial_nodes as NodeId).collect();
        let members: Vec<Member> =
            ids.iter().map(|id| Member::new(*id, node_name(*id), format!("{}:7000", node_name(*id)))).collect();
        for id in &ids {
            let disk = CrashDisk::new();
            let mut store = Store::open_backend(disk.backend()).expect("open a fresh store");
            let conf_state = ConfState::from((ids.clone(), Vec::<u64>::new()));
            store
                .bootstrap(conf_state, State::with_members(members.clone()), BOOTSTRAP_INDEX, BOOTSTRAP_TERM)
                .expect("bootstrap");
            drop(store);
            sim.nodes.insert(*id, Node { disk, core: None, next_tick_ms: 0, removed: false });
            sim.start(*id);
        }
        sim
    }

    fn log(&mut self, event: impl FnOnce() -> String) {
        let line = format!("[{:>6}ms] {}", self.now_ms, event());
        if self.verbose {
            eprintln!("{line}");
        }
        self.trace.push(line);
        if self.trace.len() > 60 {
            self.trace.remove(0);
        }
    }

    fn core_config(&mut self, id: NodeId) -> CoreConfig {
        CoreConfig {
            log_compact_entries_max: self.params.compact_entries_max,
            // From the seed, so that a run replays exactly.
            incarnation: self.rng.random(),
            ..CoreConfig::new(id)
        }
    }

    /// (Re)starts a node from what its disk holds.
    fn start(&mut self, id: NodeId) {
        let config = self.core_config(id);
        let node = self.nodes.get_mut(&id).expect("known node");
        let store = match Store::open_backend(node.disk.backend()) {
            Ok(store) => store,
            // An injected sync failure hit the start-up itself: the node
            // dies again and stays down until the next restart.
            Err(_) if node.disk.is_dead() => {
                node.disk.crash(|_| false);
                self.log(|| format!("node {id} crashed while starting"));
                return;
            }
            Err(e) => panic!("seed {}: node {id} cannot reopen its store: {e}", self.seed),
        };
        node.core = Some(Core::new(config, store).unwrap_or_else(|e| panic!("node {id} cannot restart: {e}")));
        node.next_tick_ms = self.now_ms + self.rng.random_range(0..TICK_MS);
        self.checker.node_restarted(id);
        self.log(|| format!("node {id} started"));
    }

    /// The process dies: whatever was not synced may or may not be on disk.
    fn crash(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        let Some(core) = node.core.take() else { return };
        node.disk.kill();
        drop(core);
        let keep_pct: f64 = self.rng.random_range(0.0..1.0);
        let mut rng = ChaCha8Rng::seed_from_u64(self.rng.random());
        node.disk.crash(|_| rng.random_bool(keep_pct));
        self.stats.crashes += 1;
        self.log(|| format!("node {id} crashed"));
    }

    fn alive(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|(_, n)| n.core.is_some()).map(|(id, _)| *id).collect()
    }

    fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|(id, n)| n.core.as_ref().filter(|c| c.is_leader()).map(|c| (c.term(), *id)))
            .max()
            .map(|(_, id)| id)
    }

    fn core_mut(&mut self, id: NodeId) -> Option<&mut Core> {
        self.nodes.get_mut(&id).and_then(|n| n.core.as_mut())
    }

    fn send(&mut self, from: NodeId, messages: Vec<Message>) {
        for message in messages {
            let to = message.to;
            if self.blocked.contains(&(from, to)) || !self.nodes.contains_key(&to) {
                if message.get_msg_type() == MessageType::MsgSnapshot
                    && let Some(core) = self.core_mut(from)
                {
                    core.report_snapshot(to, false);
                }
                if self.rng.random_bool(0.5)
                    && let Some(core) = self.core_mut(from)
                {
                    core.report_unreachable(to);
                }
                continue;
            }
            if self.rng.random_bool(self.params.loss) {
                if message.get_msg_type() == MessageType::MsgSnapshot
                    && let Some(core) = self.core_mut(from)
                {
                    core.report_snapshot(to, false);
                }
                continue;
            }
            let copies = if self.rng.random_bool(self.params.duplicate) { 2 } else { 1 };
            for _ in 0..copies {
                let at = self.now_ms + self.rng.random_range(1..=self.params.delay_ms_max);
                self.sequence += 1;
                self.in_flight.insert((at, self.sequence), message.clone());
            }
        }
    }

    /// Handles every node's ready until nothing is left, checking after each.
    fn process_readies(&mut self) -> Result<(), String> {
        for _round in 0..50 {
            let mut any = false;
            for id in self.alive() {
                let draw: u64 = self.rng.random();
                let node = self.nodes.get_mut(&id).expect("alive");
                let core = node.core.as_mut().expect("alive");
                core.redraw_election_timeout(|range| range.start + (draw as usize) % range.len());
                if !core.has_ready() {
                    continue;
                }
                any = true;
                let mut outbox = Outbox::default();
                let result = core.handle_ready(&mut outbox);
                self.send(id, outbox.0);
                match result {
                    Ok(out) => {
                        if let Some(role) = out.role {
                            self.log(|| {
                                format!("node {id}: {:?} leader={:?} term={}", role.role, role.leader, role.term)
                            });
                        }
                        if let Some(index) = out.snapshot_installed {
                            self.stats.snapshots += 1;
                            self.log(|| format!("node {id}: installed snapshot at {index}"));
                        }
                        for applied in out.applied {
                            self.on_applied(id, applied)?;
                        }
                        for (context, index) in out.reads {
                            self.on_read(id, &context, index)?;
                        }
                    }
                    Err(e) => {
                        // A failed sync: the node dies mid-ready. What it
                        // already sent stays sent.
                        self.stats.sync_failures += 1;
                        self.log(|| format!("node {id}: storage failed ({e}); crashing"));
                        self.crash(id);
                        continue;
                    }
                }
                // (It may have stopped after applying its own removal.)
                if let Some(core) = self.nodes[&id].core.as_ref() {
                    self.checker.check(core)?;
                }
            }
            if !any {
                return Ok(());
            }
        }
        Ok(())
    }

    fn on_applied(&mut self, id: NodeId, applied: blixard::consensus::Applied) -> Result<(), String> {
        if let Some(proposal) = applied.proposal
            && matches!(applied.outcome, Outcome::Applied(_))
            && self.dropped.contains(&proposal)
        {
            return Err(format!(
                "node {id} applied {proposal:?} at index {}, which its proposer had reported dropped",
                applied.index
            ));
        }
        if let Some(proposal) = applied.proposal
            && proposal.proposer == id
            && self.proposals.remove(&proposal).is_some()
        {
            match &applied.outcome {
                Outcome::Applied(Ok(effect)) => {
                    self.stats.accepted += 1;
                    if let blixard::state::Effect::MemberRemoved { node, .. } = effect {
                        self.stats.removals += 1;
                        let node = *node;
                        self.log(|| format!("member {node} removed"));
                    }
                    if let blixard::state::Effect::MemberDemoted { node } = effect {
                        self.stats.demotions += 1;
                        let node = *node;
                        self.log(|| format!("member {node} demoted"));
                    }
                }
                Outcome::Applied(Err(_)) => self.stats.rejected += 1,
                Outcome::Dropped => {
                    self.stats.dropped += 1;
                    self.dropped.insert(proposal);
                }
                Outcome::Unknown => self.stats.dropped += 1,
            }
        }
        // A node that applied its own removal stops for good.
        if let Outcome::Applied(Ok(blixard::state::Effect::MemberRemoved { node, .. })) = applied.outcome
            && node == id
        {
            let n = self.nodes.get_mut(&id).expect("known");
            n.removed = true;
            n.core = None;
            self.log(|| format!("node {id} stopped after its removal"));
        }
        Ok(())
    }

    fn on_read(&mut self, id: NodeId, context: &[u8], index: u64) -> Result<(), String> {
        let key = u64::from_le_bytes(context.try_into().map_err(|_| "bad read context".to_string())?);
        if let Some(read) = self.reads.remove(&key) {
            if read.node != id {
                return Err(format!("read {key} answered on node {id}, asked on {}", read.node));
            }
            if index < read.committed_at_issue {
                return Err(format!(
                    "linearizability: read {key} on node {id} got index {index} but {} was committed when it was issued",
                    read.committed_at_issue
                ));
            }
            self.stats.reads += 1;
        }
        Ok(())
    }

    fn deliver_due(&mut self) {
        let due: Vec<(u64, u64)> = self.in_flight.range(..=(self.now_ms, u64::MAX)).map(|(k, _)| *k).collect();
        for key in due {
            let message = self.in_flight.remove(&key).expect("listed");
            let (from, to) = (message.from, message.to);
            let is_snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let delivered = if self.blocked.contains(&(from, to)) {
                false
            } else {
                match self.core_mut(to) {
                    Some(core) => {
                        let _ = core.step(message);
                        true
                    }
                    None => false,
                }
            };
            // The transport tells the leader whether a snapshot arrived;
            // a leader never told stays waiting for it forever.
            if is_snapshot && let Some(core) = self.core_mut(from) {
                core.report_snapshot(to, delivered);
            }
        }
    }

    fn tick_due(&mut self) {
        for id in self.alive() {
            let node = self.nodes.get_mut(&id).expect("alive");
            if node.next_tick_ms <= self.now_ms {
                node.next_tick_ms += TICK_MS - 5 + self.rng.random_range(0..10);
                let core = node.core.as_mut().expect("alive");
                core.tick();
                // As the node does every tick: write the state that readies
                // deferred (so crashes hit both written and deferred state).
                if let Err(e) = core.write_state() {
                    self.stats.sync_failures += 1;
                    self.log(|| format!("node {id}: storage failed writing its state ({e}); crashing"));
                    self.crash(id);
                }
            }
        }
    }

    fn faults(&mut self) {
        let p = self.params.clone();
        let alive = self.alive();
        if !alive.is_empty() && self.rng.random_bool(p.crash) {
            let id = *alive.choose(&mut self.rng).expect("non-empty");
            self.crash(id);
        }
        let dead: Vec<NodeId> =
            self.nodes.iter().filter(|(_, n)| n.core.is_none() && !n.removed).map(|(id, _)| *id).collect();
        if !dead.is_empty() && self.rng.random_bool(p.restart) {
            let id = *dead.choose(&mut self.rng).expect("non-empty");
            self.start(id);
        }
        if self.rng.random_bool(p.partition) {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            if self.rng.random_bool(0.5) {
                // A split into two sides.
                let side: BTreeSet<NodeId> = ids.iter().copied().filter(|_| self.rng.random_bool(0.5)).collect();
                for a in &ids {
                    for b in &ids {
                        if side.contains(a) != side.contains(b) {
                            self.blocked.insert((*a, *b));
                        }
                    }
                }
                self.log(|| format!("partition {side:?} | rest"));
            } else {
                // One-way: a hears b but b does not hear a.
                let a = *ids.choose(&mut self.rng).expect("non-empty");
                let b = *ids.choose(&mut self.rng).expect("non-empty");
                if a != b {
                    self.blocked.insert((a, b));
                    self.log(|| format!("one-way cut {a} -> {b}"));
                }
            }
        }
        if !self.blocked.is_empty() && self.rng.random_bool(p.heal) {
            self.blocked.clear();
            self.log(|| "healed".to_string());
        }
        if !alive.is_empty() && self.rng.random_bool(p.fail_sync) {
            let id = *alive.choose(&mut self.rng).expect("non-empty");
            let n = self.rng.random_range(0..3);
            self.nodes[&id].disk.fail_sync_in(n);
        }
    }

    fn clients(&mut self) {
        let Some(leader) = self.leader() else { return };
        if self.rng.random_bool(self.params.propose) {
            // On any live member: a follower hands it to its leader in a
            // Raft message.
            let alive = self.alive();
            let at = *alive.choose(&mut self.rng).expect("the leader is alive");
            let command = {
                let core = self.nodes[&at].core.as_ref().expect("alive");
                workload::command(&mut self.rng, core.state(), self.now_ms)
            };
            let core = self.core_mut(at).expect("alive");
            if let Ok(id) = core.propose(&command) {
                self.stats.proposals += 1;
                self.proposals.insert(id, 0);
            }
        }
        if self.rng.random_bool(self.params.membership) {
            self.membership(leader);
        }
        if self.rng.random_bool(self.params.read) {
            let alive = self.alive();
            let id = *alive.choose(&mut self.rng).expect("the leader is alive");
            let key: u64 = self.rng.random();
            let committed_at_issue = self.checker.max_committed();
            self.reads.insert(key, PendingRead { node: id, committed_at_issue });
            self.core_mut(id).expect("alive").read_index(key.to_le_bytes().to_vec());
        }
    }

    fn membership(&mut self, leader: NodeId) {
        let (state_members, status) = {
            let core = self.nodes[&leader].core.as_ref().expect("leader is alive");
            (core.state().members().clone(), core.status())
        };
        let learners: Vec<NodeId> = state_members.values().filter(|m| m.learner).map(|m| m.id).collect();
        let voters: Vec<NodeId> = state_members.values().filter(|m| !m.learner).map(|m| m.id).collect();
        let change = match self.rng.random_range(0..4) {
            0 if state_members.len() < 7 => {
                let id = self.next_node_id;
                self.next_node_id += 1;
                // A new, empty host; it learns everything from the leader.
                let disk = CrashDisk::new();
                drop(Store::open_backend(disk.backend()).expect("fresh store"));
                self.nodes.insert(id, Node { disk, core: None, next_tick_ms: 0, removed: false });
                self.start(id);
                self.stats.joins += 1;
                MembershipChange::AddLearner { id, name: node_name(id), address: format!("{}:7000", node_name(id)) }
            }
            1 if !learners.is_empty() => {
                let id = *learners.choose(&mut self.rng).expect("non-empty");
                let caught_up = status.progress.iter().any(|p| p.id == id && p.matched >= status.commit);
                if !caught_up {
                    return;
                }
                MembershipChange::Promote { id }
            }
            2 if voters.len() > 2 => {
                let candidates: Vec<NodeId> = voters.iter().copied().filter(|id| *id != leader).collect();
                let id = *candidates.choose(&mut self.rng).expect("more than two voters");
                MembershipChange::Remove { id }
            }
            // A voter becomes a learner (the voter autopilot's demotion);
            // it stays a member and may be promoted again.
            3 if voters.len() > 2 => {
                let candidates: Vec<NodeId> = voters.iter().copied().filter(|id| *id != leader).collect();
                let id = *candidates.choose(&mut self.rng).expect("more than two voters");
                MembershipChange::Demote { id }
            }
            _ => return,
        };
        self.log(|| format!("propose {change:?}"));
        let now = self.now_ms;
        let core = self.core_mut(leader).expect("alive");
        if let Ok(id) = core.propose_membership(&change, now) {
            self.proposals.insert(id, 0);
        }
    }

    fn fail(&self, step: &str, error: String) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "simulation seed {} failed at {}ms ({step}): {error}", self.seed, self.now_ms);
        let _ = writeln!(out, "params: {:?}", self.params);
        let _ = writeln!(out, "last events:");
        for line in &self.trace {
            let _ = writeln!(out, "  {line}");
        }
        let _ = writeln!(
            out,
            "replay with: BLIXARD_SIM_SEED={} cargo test -p blixard-agent --test sim -- --nocapture",
            self.seed
        );
        out
    }

    /// Runs the whole scenario: chaos, then calm, then liveness checks.
    pub fn run(&mut self) -> Result<Stats, String> {
        let chaos_end = self.params.chaos_ms;
        while self.now_ms < chaos_end {
            self.now_ms += self.rng.random_range(1..=5);
            self.stats.steps += 1;
            self.deliver_due();
            self.tick_due();
            self.faults();
            self.clients();
            self.process_readies().map_err(|e| self.fail("chaos", e))?;
        }

        // Calm: heal everything, stop faults, restart every crashed member
        // (in that order: a sync failure still armed would otherwise fire
        // during the restart and keep that member down for good).
        self.blocked.clear();
        for node in self.nodes.values() {
            node.disk.clear_faults();
        }
        let dead: Vec<NodeId> =
            self.nodes.iter().filter(|(_, n)| n.core.is_none() && !n.removed).map(|(id, _)| *id).collect();
        for id in dead {
            self.start(id);
        }
        let loss = self.params.loss;
        self.params = Params {
            loss: 0.0,
            duplicate: 0.0,
            crash: 0.0,
            partition: 0.0,
            fail_sync: 0.0,
            membership: 0.0,
            ..self.params.clone()
        };
        let calm_end = self.now_ms + self.params.calm_ms;
        // Clients stop for the last seconds so that followers can catch up.
        let quiet_from = calm_end - self.params.calm_ms / 3;
        while self.now_ms < calm_end {
            self.now_ms += self.rng.random_range(1..=5);
            self.stats.steps += 1;
            self.deliver_due();
            self.tick_due();
            if self.now_ms < quiet_from {
                self.clients();
            }
            self.process_readies().map_err(|e| self.fail("calm", e))?;
        }
        self.params.loss = loss;
        self.check_converged().map_err(|e| self.fail("liveness", e))?;
        self.stats.max_commit = self.checker.max_committed();
        Ok(self.stats.clone())
    }

    /// After the calm phase every member agrees and a leader serves.
    fn check_converged(&mut self) -> Result<(), String> {
        let leader = self.leader().ok_or("no leader after 10 s without faults")?;
        let leader_core = self.nodes[&leader].core.as_ref().expect("alive");
        let members: Vec<NodeId> = leader_core.state().members().keys().copied().collect();
        let applied = leader_core.store().applied();
        let state = blixard::state::codec::encode_snapshot(leader_core.state());
        for id in members {
            let Some(core) = self.nodes.get(&id).and_then(|n| n.core.as_ref()) else {
                return Err(format!("member {id} is not running after the calm phase"));
            };
            if core.store().applied() != applied {
                return Err(format!(
                    "member {id} applied {} but the leader applied {applied} after 10 s of calm",
                    core.store().applied()
                ));
            }
            if blixard::state::codec::encode_snapshot(core.state()) != state {
                return Err(format!("member {id}'s state differs from the leader's at the same index"));
            }
        }
        Ok(())
    }

    /// The role of each live node, for debugging.
    #[allow(dead_code)]
    pub fn roles(&self) -> Vec<(NodeId, Role)> {
        self.nodes.iter().filter_map(|(id, n)| n.core.as_ref().map(|c| (*id, c.status().role))).collect()
    }
}

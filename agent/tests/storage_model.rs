//! Property tests of `storage::Store` against an in-memory model.
//!
//! The model is the simplest thing that could be right: a `Vec` of the log
//! entries after the snapshot point, the hard state, conf state, applied
//! index, identity and a `State` fed the same commands. Random sequences of
//! Raft-shaped writes (appends, conflicting appends that replace the tail,
//! hard state, commit, apply, conf state, compaction, snapshot install,
//! bootstrap) and reopens go to both, and after every step the store must
//! answer exactly as the model does: through its own accessors, through
//! `raft::Storage` (including the `Compacted` / `Unavailable` errors at the
//! edges of the log) and through the snapshot it would send a follower.
//!
//! Operations are generated as choices *relative* to the current state (how
//! far back a conflicting append starts, how many committed entries to
//! apply, ...) and resolved against the model, so every sequence is one
//! Raft could produce and proptest can shrink a failure freely.
//!
//! Crashes (`CrashDisk` only): the model keeps every state since the last
//! durable write. After a crash the reopened store must equal one of them:
//! never an older one (a synced batch was lost) and never anything else (a
//! torn batch, e.g. state machine rows without their applied index). A sync
//! that fails (`CrashDisk::fail_sync_in`, how the simulator crashes a node
//! mid-write) must fail `commit`, and the crash after it may keep that batch
//! whole or not at all.

use std::path::PathBuf;

use blixard::state::{Capacity, Command, CommandKind, Desired, Member, MemberStatus, State, VmSpec, VmState, codec};
use blixard::storage::{CrashDisk, NodeIdentity, Store, WriteBatch};
use proptest::prelude::*;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, Storage as _};

const VM_NAMES: [&str; 4] = ["web", "db", "cache", "queue"];
const NODE_IDS: [u64; 3] = [1, 2, 3];
/// Entries per generated append; a few, so that appends overlap often.
const APPEND_ENTRIES_MAX: usize = 5;
/// Large enough to spill out of one redb page.
const BLOB_BYTES_MAX: usize = 9000;

// ---------------------------------------------------------------- the model

/// What the store should hold.
#[derive(Debug, Clone, Default)]
struct Model {
    snapshot_index: u64,
    snapshot_term: u64,
    /// Entries `snapshot_index + 1 ..= last_index()`.
    log: Vec<Entry>,
    hard_state: HardState,
    conf_state: ConfState,
    applied: u64,
    state: State,
    identity: Option<NodeIdentity>,
}

/// The errors `raft::Storage` may answer with, comparable.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fail {
    Compacted,
    Unavailable,
    Other(String),
}

fn fail_of(e: raft::Error) -> Fail {
    match e {
        raft::Error::Store(raft::StorageError::Compacted) => Fail::Compacted,
        raft::Error::Store(raft::StorageError::Unavailable) => Fail::Unavailable,
        other => Fail::Other(other.to_string()),
    }
}

impl Model {
    fn first_index(&self) -> u64 {
        self.snapshot_index + 1
    }

    fn last_index(&self) -> u64 {
        self.snapshot_index + self.log.len() as u64
    }

    fn entry(&self, index: u64) -> Option<&Entry> {
        let offset = index.checked_sub(self.first_index())?;
        self.log.get(usize::try_from(offset).ok()?)
    }

    /// `raft::Storage::term` as raft-rs's `MemStorage` answers it.
    fn term(&self, index: u64) -> Result<u64, Fail> {
        if index == self.snapshot_index {
            Ok(self.snapshot_term)
        } else if index < self.snapshot_index {
            Err(Fail::Compacted)
        } else {
            self.entry(index).map(|e| e.term).ok_or(Fail::Unavailable)
        }
    }

    /// `raft::Storage::entries` as `MemStorage` answers it, for
    /// `high <= last_index + 1` (beyond that both panic).
    fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>, Fail> {
        if low < self.first_index() {
            return Err(Fail::Compacted);
        }
        let start = (low - self.first_index()) as usize;
        let end = (high - self.first_index()) as usize;
        let mut out = self.log[start..end].to_vec();
        raft::util::limit_size(&mut out, max_size);
        Ok(out)
    }

    fn is_initialized(&self) -> bool {
        !self.conf_state.voters.is_empty() || self.last_index() > 0
    }

    /// A leader's entries replace ours from their first index on.
    fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        assert!(first.index >= self.first_index() && first.index <= self.last_index() + 1);
        self.log.truncate((first.index - self.first_index()) as usize);
        self.log.extend_from_slice(entries);
    }

    fn install(&mut self, index: u64, term: u64, conf_state: &ConfState, state: State) {
        self.log.clear();
        self.snapshot_index = index;
        self.snapshot_term = term;
        self.applied = index;
        self.conf_state = conf_state.clone();
        self.state = state;
        self.hard_state.commit = self.hard_state.commit.max(index);
        self.hard_state.term = self.hard_state.term.max(term);
    }

    fn compact(&mut self, to: u64) {
        let term = self.term(to).expect("compaction point is in the log");
        self.log.drain(..(to - self.snapshot_index) as usize);
        self.snapshot_index = to;
        self.snapshot_term = term;
    }
}

/// Applies a committed entry the way the consensus core does: empty entries
/// are no-ops, anything else is a command, applied or rejected.
fn apply_entry(state: &mut State, entry: &Entry) {
    if entry.get_data().is_empty() {
        return;
    }
    if let Ok(command) = codec::decode_command(entry.get_data()) {
        let _ = state.apply(&command);
    }
}

// ---------------------------------------------------------------- comparing

macro_rules! same {
    ($what:expr, $store:expr, $model:expr) => {{
        let (store, model) = ($store, $model);
        if store != model {
            return Err(format!("{}: store has {:?}, model has {:?}", $what, store, model));
        }
    }};
}

fn store_term(store: &Store, index: u64) -> Result<u64, Fail> {
    store.term(index).map_err(fail_of)
}

fn store_entries(store: &Store, low: u64, high: u64, max_size: Option<u64>) -> Result<Vec<Entry>, Fail> {
    raft::Storage::entries(store, low, high, max_size, GetEntriesContext::empty(false)).map_err(fail_of)
}

/// Everything the store answers must be what the model answers.
fn check(store: &Store, model: &Model) -> Result<(), String> {
    store.validate().map_err(|e| format!("validate: {e}"))?;
    let (snap, first, last) = (model.snapshot_index, model.first_index(), model.last_index());
    same!("first_index", store.first_index(), first);
    same!("last_index", store.last_index(), last);
    same!("raft first_index", raft::Storage::first_index(store).map_err(fail_of), Ok(first));
    same!("raft last_index", raft::Storage::last_index(store).map_err(fail_of), Ok(last));
    same!("hard state", store.hard_state(), &model.hard_state);
    same!("conf state", store.conf_state(), &model.conf_state);
    let raft_state = store.initial_state().map_err(|e| format!("initial_state: {e}"))?;
    same!("initial_state hard state", &raft_state.hard_state, &model.hard_state);
    same!("initial_state conf state", &raft_state.conf_state, &model.conf_state);
    same!("applied", store.applied(), model.applied);
    same!("applied entries in log", store.applied_entries_in_log(), model.applied - snap);
    same!("snapshot point", store.snapshot_point(), (snap, model.snapshot_term));
    same!("members", store.state().members(), model.state.members());
    same!("vms", store.state().vms(), model.state.vms());
    same!("identity", store.identity(), model.identity.as_ref());
    same!("is_initialized", store.is_initialized(), model.is_initialized());

    // Every entry, one at a time and all at once.
    for index in first..=last {
        same!(format!("entry {index}"), store.entry(index), model.entry(index));
        same!(format!("term {index}"), store_term(store, index), model.term(index));
        same!(
            format!("entries({index}, {})", index + 1),
            store_entries(store, index, index + 1, None),
            model.entries(index, index + 1, None)
        );
    }
    same!("all entries", store_entries(store, first, last + 1, None), model.entries(first, last + 1, None));

    // The edges of the log: Compacted below the snapshot point, Unavailable
    // past the last entry, size limits that cut the answer short.
    for index in [0, snap.saturating_sub(1), snap, first, last, last + 1, last + 2] {
        same!(format!("term {index} at an edge"), store_term(store, index), model.term(index));
    }
    let first_size = model.log.first().map_or(1, |e| u64::from(protobuf::Message::compute_size(e)));
    let sizes = [None, Some(0), Some(1), Some(first_size), Some(first_size * 2 + 1), Some(raft::NO_LIMIT)];
    for low in [snap.saturating_sub(1), snap, first, last, last + 1] {
        for high in [low, first, last, last + 1] {
            if low > high || high > last + 1 {
                continue;
            }
            for max_size in sizes {
                same!(
                    format!("entries({low}, {high}, {max_size:?})"),
                    store_entries(store, low, high, max_size),
                    model.entries(low, high, max_size)
                );
            }
        }
    }

    // The snapshot a follower would get.
    let snapshot = raft::Storage::snapshot(store, 0, 0).map_err(|e| format!("snapshot: {e}"))?;
    let meta = snapshot.get_metadata();
    same!("sent snapshot index", meta.index, model.applied);
    same!("sent snapshot term", Ok(meta.term), model.term(model.applied));
    same!("sent snapshot conf state", meta.get_conf_state(), &model.conf_state);
    let sent = codec::decode_snapshot(snapshot.get_data()).map_err(|e| format!("sent snapshot: {e}"))?;
    same!("sent snapshot members", sent.members(), model.state.members());
    same!("sent snapshot vms", sent.vms(), model.state.vms());
    Ok(())
}

// ---------------------------------------------------------------- operations

#[derive(Debug, Clone)]
enum Op {
    Ready(Ready),
    InstallSnapshot(SnapshotOp),
    Bootstrap(SnapshotOp),
    SetIdentity(u64),
    Reopen(Reopen),
    /// A synced `Ready` whose sync fails, then a crash.
    FailedSync(Ready, Keep),
}

/// One `WriteBatch` as a Raft `Ready` or light ready would make it.
#[derive(Debug, Clone)]
struct Ready {
    append: Option<Append>,
    hard_state: Option<HardStateOp>,
    /// Apply up to this many more committed entries.
    apply: Option<u8>,
    conf_voters: Option<Vec<u64>>,
    /// Compact up to this many entries past the snapshot point (at most to
    /// the applied index; 0 re-compacts at the snapshot point).
    compact: Option<u8>,
    sync: bool,
}

#[derive(Debug, Clone)]
struct Append {
    /// How far back from `last_index + 1` the new entries start; clamped so
    /// that committed entries are never replaced.
    back: u8,
    term_bump: bool,
    payloads: Vec<Payload>,
}

#[derive(Debug, Clone)]
enum Payload {
    /// A leader's empty entry.
    Empty,
    Command(Command),
    /// Bytes that are no command (applying them is rejected).
    Blob(usize),
}

#[derive(Debug, Clone)]
enum HardStateOp {
    /// A whole new hard state; the commit index moves forward by up to this
    /// many entries.
    Full { term_bump: bool, vote: u64, commit_ahead: u8 },
    /// A light ready's commit index only.
    Commit { ahead: u8 },
}

#[derive(Debug, Clone)]
struct SnapshotOp {
    /// The snapshot index is `commit + 1 + ahead`.
    ahead: u8,
    term_bump: bool,
    members: Vec<u64>,
    commands: Vec<Command>,
    voters: Vec<u64>,
    learners: Vec<u64>,
    /// Entries following the snapshot in the same batch.
    then: Option<Vec<Payload>>,
    /// A hard state in the same batch.
    hard_state: bool,
    sync: bool,
}

#[derive(Debug, Clone)]
enum Reopen {
    /// Drop the store (redb closes cleanly) and open it again.
    Clean,
    /// The process dies with the store open; the disk keeps the given subset
    /// of the writes made since the last sync. On a real file, `Clean`.
    Crash(Keep),
}

#[derive(Debug, Clone)]
enum Keep {
    All,
    Nothing,
    /// The first n unsynced writes (an in-order disk).
    Prefix(usize),
    /// Each unsynced write independently, decided by a hash of the seed.
    Random(u64),
}

impl Keep {
    fn keeps(&self, i: usize) -> bool {
        match self {
            Keep::All => true,
            Keep::Nothing => false,
            Keep::Prefix(n) => i < *n,
            Keep::Random(seed) => splitmix(seed ^ (i as u64)) & 1 == 1,
        }
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------- strategies

fn command() -> impl Strategy<Value = Command> {
    let vm = || prop::sample::select(VM_NAMES.to_vec()).prop_map(String::from);
    let node = || prop::sample::select(NODE_IDS.to_vec());
    let kind = prop_oneof![
        3 => (vm(), 1u32..4, 16u64..2048, any::<bool>(), prop::option::of(node())).prop_map(
            |(name, vcpu, memory_mib, stopped, pinned)| CommandKind::CreateVm {
                name,
                spec: VmSpec {
                    vcpu,
                    memory_mib,
                    node: pinned.map(|id| format!("h{id}")),
                    desired: if stopped { Desired::Stopped } else { Desired::Running },
                    ..VmSpec::default()
                },
            }
        ),
        1 => (vm(), 1u32..8).prop_map(|(name, vcpu)| CommandKind::UpdateVm {
            name,
            spec: VmSpec { vcpu, memory_mib: 64, ..VmSpec::default() },
        }),
        1 => vm().prop_map(|name| CommandKind::DeleteVm { name }),
        1 => (vm(), any::<bool>()).prop_map(|(name, stop)| CommandKind::SetDesired {
            name,
            desired: if stop { Desired::Stopped } else { Desired::Running },
        }),
        3 => (vm(), node(), 0u64..4).prop_map(|(vm, node, expected_generation)| CommandKind::Place {
            vm,
            node,
            expected_generation,
        }),
        1 => (vm(), 0u64..4).prop_map(|(vm, expected_generation)| CommandKind::Unplace { vm, expected_generation }),
        1 => (node(), prop::sample::subsequence(VM_NAMES.to_vec(), 0..=VM_NAMES.len())).prop_map(|(node, names)| {
            CommandKind::SetRunners { node, runners: names.into_iter().map(String::from).collect() }
        }),
        1 => (node(), any::<bool>()).prop_map(|(node, drain)| CommandKind::SetDrain { node, drain }),
        1 => (node(), 0u32..16, 0u64..8192).prop_map(|(node, vcpu, memory_mib)| CommandKind::SetCapacity {
            node,
            capacity: Capacity { vcpu, memory_mib, vcpu_overcommit_pct: 100, memory_overcommit_pct: 150 },
        }),
        1 => (node(), any::<bool>()).prop_map(|(node, down)| CommandKind::SetStatus {
            node,
            status: if down { MemberStatus::Down } else { MemberStatus::Up },
        }),
        1 => (node(), vm(), 0u64..4, prop::sample::select(VmState::ALL.to_vec()), prop::option::of("[a-z ]{0,12}"))
            .prop_map(|(node, vm, generation, state, last_error)| CommandKind::Report {
                node,
                vm,
                generation,
                state,
                last_error,
            }),
        // A few hashes and TTLs around the 7-day limit: tokens are added,
        // used, refused and expire.
        1 => (0u8..3, 1u64..700_000_000).prop_map(|(h, ttl_ms)| CommandKind::AddJoinToken { hash: [h; 32], ttl_ms }),
        1 => (0u8..3, node()).prop_map(|(h, node)| CommandKind::UseJoinToken { hash: [h; 32], node }),
    ];
    (0u64..1_000_000_000, kind).prop_map(|(at_unix_ms, kind)| Command { at_unix_ms, kind })
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        1 => Just(Payload::Empty),
        8 => command().prop_map(Payload::Command),
        1 => (1..=BLOB_BYTES_MAX).prop_map(Payload::Blob),
    ]
}

fn payloads() -> impl Strategy<Value = Vec<Payload>> {
    prop::collection::vec(payload(), 1..=APPEND_ENTRIES_MAX)
}

fn node_set() -> impl Strategy<Value = Vec<u64>> {
    prop::sample::subsequence(NODE_IDS.to_vec(), 0..=NODE_IDS.len())
}

fn ready(sync: BoxedStrategy<bool>) -> impl Strategy<Value = Ready> {
    let append = (0u8..8, prop::bool::weighted(0.2), payloads()).prop_map(|(back, term_bump, payloads)| Append {
        back,
        term_bump,
        payloads,
    });
    let hard_state = prop_oneof![
        (prop::bool::weighted(0.2), 0u64..4, 0u8..8)
            .prop_map(|(term_bump, vote, commit_ahead)| { HardStateOp::Full { term_bump, vote, commit_ahead } }),
        (0u8..8).prop_map(|ahead| HardStateOp::Commit { ahead }),
    ];
    (
        prop::option::weighted(0.6, append),
        prop::option::weighted(0.6, hard_state),
        prop::option::weighted(0.5, 0u8..8),
        prop::option::weighted(0.1, node_set()),
        prop::option::weighted(0.25, 0u8..10),
        sync,
    )
        .prop_map(|(append, hard_state, apply, conf_voters, compact, sync)| Ready {
            append,
            hard_state,
            apply,
            conf_voters,
            compact,
            sync,
        })
}

fn snapshot_op(sync: BoxedStrategy<bool>) -> impl Strategy<Value = SnapshotOp> {
    (
        (0u8..6, any::<bool>(), node_set(), prop::collection::vec(command(), 0..12)),
        (node_set(), node_set(), prop::option::weighted(0.4, payloads()), any::<bool>(), sync),
    )
        .prop_map(|((ahead, term_bump, members, commands), (voters, learners, then, hard_state, sync))| {
            SnapshotOp { ahead, term_bump, members, commands, voters, learners, then, hard_state, sync }
        })
}

fn keep() -> impl Strategy<Value = Keep> {
    prop_oneof![
        1 => Just(Keep::All),
        1 => Just(Keep::Nothing),
        1 => (0usize..64).prop_map(Keep::Prefix),
        3 => any::<u64>().prop_map(Keep::Random),
    ]
}

/// Operations for the model test: reopens are clean or keep every write.
fn model_op() -> impl Strategy<Value = Op> {
    let sync = || any::<bool>().boxed();
    prop_oneof![
        20 => ready(sync()).prop_map(Op::Ready),
        2 => snapshot_op(sync()).prop_map(Op::InstallSnapshot),
        1 => snapshot_op(sync()).prop_map(Op::Bootstrap),
        1 => (1u64..4).prop_map(Op::SetIdentity),
        1 => Just(Op::Reopen(Reopen::Clean)),
        1 => Just(Op::Reopen(Reopen::Crash(Keep::All))),
    ]
}

/// Operations for the crash test: mostly unsynced writes, crashes that keep
/// any subset of them, syncs that fail.
fn crash_op() -> impl Strategy<Value = Op> {
    let sync = || prop::bool::weighted(0.3).boxed();
    prop_oneof![
        16 => ready(sync()).prop_map(Op::Ready),
        2 => snapshot_op(sync()).prop_map(Op::InstallSnapshot),
        1 => snapshot_op(sync()).prop_map(Op::Bootstrap),
        1 => (1u64..4).prop_map(Op::SetIdentity),
        1 => Just(Op::Reopen(Reopen::Clean)),
        5 => keep().prop_map(|k| Op::Reopen(Reopen::Crash(k))),
        2 => (ready(Just(true).boxed()), keep()).prop_map(|(r, k)| Op::FailedSync(r, k)),
    ]
}

// ---------------------------------------------------------------- the harness

enum Disk {
    Crash(CrashDisk),
    File { _dir: tempfile::TempDir, path: PathBuf },
}

impl Disk {
    fn open(&self) -> Result<Store, String> {
        match self {
            Disk::Crash(disk) => Store::open_backend(disk.backend()),
            Disk::File { path, .. } => Store::open(path),
        }
        .map_err(|e| format!("reopening the store: {e}"))
    }
}

struct Harness {
    disk: Disk,
    store: Option<Store>,
    model: Model,
    /// The model after every write since the last durable one, oldest first:
    /// `[0]` is durable, a crash may leave any of them.
    since_durable: Vec<Model>,
}

fn entry(index: u64, term: u64, payload: &Payload) -> Entry {
    let mut e = Entry { index, term, ..Default::default() };
    match payload {
        Payload::Empty => {}
        Payload::Command(command) => {
            e.set_data(codec::encode_command(command).into());
            e.set_context(index.to_le_bytes().to_vec().into());
        }
        Payload::Blob(len) => e.set_data(vec![0xff ^ (index as u8); *len].into()),
    }
    e
}

fn conf_state(voters: &[u64], learners: &[u64]) -> ConfState {
    ConfState {
        voters: voters.to_vec(),
        learners: learners.iter().copied().filter(|id| !voters.contains(id)).collect(),
        ..Default::default()
    }
}

fn snapshot_state(op: &SnapshotOp) -> State {
    let mut state = State::with_members(op.members.iter().map(|&id| {
        let mut m = Member::new(id, format!("h{id}"), format!("10.0.0.{id}:7000"));
        m.capacity = Capacity { vcpu: 8, memory_mib: 4096, vcpu_overcommit_pct: 100, memory_overcommit_pct: 100 };
        m.runners = VM_NAMES.iter().map(|s| s.to_string()).collect();
        m
    }));
    for command in &op.commands {
        let _ = state.apply(command);
    }
    state
}

impl Harness {
    fn new(disk: Disk) -> Self {
        let store = disk.open().expect("a new store opens");
        let model = Model::default();
        let harness = Harness { disk, store: Some(store), since_durable: vec![model.clone()], model };
        harness.check().expect("a new store is empty");
        harness
    }

    fn store(&mut self) -> &mut Store {
        self.store.as_mut().expect("the store is open")
    }

    fn check(&self) -> Result<(), String> {
        check(self.store.as_ref().expect("the store is open"), &self.model)
    }

    fn written(&mut self, sync: bool) {
        if sync {
            self.since_durable = vec![self.model.clone()];
        } else {
            self.since_durable.push(self.model.clone());
        }
    }

    fn step(&mut self, op: &Op) -> Result<(), String> {
        match op {
            Op::Ready(ready) => self.ready(ready),
            Op::InstallSnapshot(op) => self.install_snapshot(op, false),
            Op::Bootstrap(op) => {
                if self.model.is_initialized() {
                    return Ok(());
                }
                self.install_snapshot(op, true)
            }
            Op::SetIdentity(id) => {
                let identity = self.model.identity.clone().unwrap_or(NodeIdentity {
                    id: *id,
                    name: format!("h{id}"),
                    cluster_id: 0xb115_a4d0 + id,
                });
                self.store().set_identity(identity.clone()).map_err(|e| format!("set_identity: {e}"))?;
                if self.model.identity.is_none() {
                    self.model.identity = Some(identity);
                    // Written with redb's default durability, which makes
                    // every earlier unsynced write durable too. Setting the
                    // same identity again writes nothing.
                    self.written(true);
                }
                Ok(())
            }
            Op::Reopen(reopen) => self.reopen(reopen),
            Op::FailedSync(ready, keep) => self.failed_sync(ready, keep),
        }
    }

    fn ready(&mut self, op: &Ready) -> Result<(), String> {
        let (batch, new) = self.prepare(op);
        self.store().commit(batch).map_err(|e| format!("commit: {e}"))?;
        self.model = new;
        self.written(op.sync);
        Ok(())
    }

    /// The batch for `op` and the model once it is written. Applies the
    /// batch's committed entries to the store's state machine, as the
    /// consensus core does before it commits the batch.
    fn prepare(&mut self, op: &Ready) -> (WriteBatch, Model) {
        let old = self.model.clone();
        let mut new = old.clone();
        let mut batch = WriteBatch { sync: op.sync, ..WriteBatch::default() };

        if let Some(append) = &op.append {
            // Never replace committed entries: Raft does not.
            let first = (old.last_index() + 1).saturating_sub(u64::from(append.back)).max(old.hard_state.commit + 1);
            let prev_term = old.term(first - 1).expect("the entry before an append is in the log");
            let term = prev_term.max(old.hard_state.term) + u64::from(append.term_bump);
            batch.entries = append.payloads.iter().enumerate().map(|(i, p)| entry(first + i as u64, term, p)).collect();
            new.append(&batch.entries);
        }
        match op.hard_state {
            Some(HardStateOp::Full { term_bump, vote, commit_ahead }) => {
                let mut hs = old.hard_state.clone();
                let last_term = new.term(new.last_index()).expect("the last entry has a term");
                hs.term = hs.term.max(last_term) + u64::from(term_bump);
                hs.vote = vote;
                hs.commit = (hs.commit + u64::from(commit_ahead)).min(new.last_index());
                new.hard_state = hs.clone();
                batch.hard_state = Some(hs);
            }
            Some(HardStateOp::Commit { ahead }) => {
                let commit = (old.hard_state.commit + u64::from(ahead)).min(new.last_index());
                new.hard_state.commit = commit;
                batch.commit = Some(commit);
            }
            None => {}
        }
        if let Some(n) = op.apply {
            let to = (old.applied + u64::from(n)).min(new.hard_state.commit);
            for index in old.applied + 1..=to {
                let e = new.entry(index).expect("committed entries are in the log").clone();
                apply_entry(self.store().state_mut(), &e);
                apply_entry(&mut new.state, &e);
            }
            new.applied = to;
            batch.applied = Some(to);
        }
        if let Some(voters) = &op.conf_voters {
            let cs = conf_state(voters, &[]);
            new.conf_state = cs.clone();
            batch.conf_state = Some(cs);
        }
        if let Some(k) = op.compact {
            let to = (old.snapshot_index + u64::from(k)).min(new.applied);
            new.compact(to);
            batch.compact_to = Some(to);
        }
        (batch, new)
    }

    /// A synced batch whose fsync fails (the simulator's way to crash a node
    /// mid-write): `commit` must fail, and after the crash the store holds
    /// either the batch or what was there before, never part of it.
    fn failed_sync(&mut self, op: &Ready, keep: &Keep) -> Result<(), String> {
        let Disk::Crash(disk) = &self.disk else {
            return Ok(());
        };
        let disk = disk.clone();
        let (batch, attempted) = self.prepare(&Ready { sync: true, ..op.clone() });
        disk.fail_sync_in(0);
        if self.store().commit(batch).is_ok() {
            return Err("commit returned Ok although its sync failed".into());
        }
        self.since_durable.push(attempted);
        self.reopen(&Reopen::Crash(keep.clone()))
    }

    fn install_snapshot(&mut self, op: &SnapshotOp, bootstrap: bool) -> Result<(), String> {
        let old = self.model.clone();
        let index = old.hard_state.commit + 1 + u64::from(op.ahead);
        let term = [old.hard_state.term, old.snapshot_term, old.log.last().map_or(0, |e| e.term), 1]
            .into_iter()
            .max()
            .unwrap()
            + u64::from(op.term_bump);
        let cs = conf_state(&op.voters, &op.learners);
        let state = snapshot_state(op);
        let mut new = old.clone();
        new.install(index, term, &cs, state.clone());

        if bootstrap {
            self.store().bootstrap(cs, state, index, term).map_err(|e| format!("bootstrap: {e}"))?;
            self.model = new;
            self.written(true);
            return Ok(());
        }

        let mut snapshot = Snapshot::default();
        snapshot.set_data(codec::encode_snapshot(&state).into());
        snapshot.mut_metadata().index = index;
        snapshot.mut_metadata().term = term;
        snapshot.mut_metadata().set_conf_state(cs);
        let mut batch = WriteBatch { snapshot: Some(snapshot), sync: op.sync, ..WriteBatch::default() };
        if let Some(payloads) = &op.then {
            batch.entries = payloads.iter().enumerate().map(|(i, p)| entry(index + 1 + i as u64, term, p)).collect();
            new.append(&batch.entries);
        }
        if op.hard_state {
            let mut hs = new.hard_state.clone();
            hs.vote = 1;
            hs.commit = new.last_index();
            new.hard_state = hs.clone();
            batch.hard_state = Some(hs);
        }
        self.store().commit(batch).map_err(|e| format!("install snapshot: {e}"))?;
        self.model = new;
        self.written(op.sync);
        Ok(())
    }

    fn reopen(&mut self, reopen: &Reopen) -> Result<(), String> {
        let store = self.store.take().expect("the store is open");
        match (reopen, &self.disk) {
            (Reopen::Crash(keep), Disk::Crash(disk)) => {
                // The process dies: nothing it would write on the way out
                // reaches the disk.
                disk.kill();
                drop(store);
                disk.crash(|i| keep.keeps(i));
                let store = self.disk.open()?;
                // Any state since the last durable write, newest first.
                let found = self.since_durable.iter().rev().find(|m| check(&store, m).is_ok()).cloned();
                let Some(model) = found else {
                    let newest = check(&store, self.since_durable.last().unwrap()).unwrap_err();
                    let durable = check(&store, &self.since_durable[0]).unwrap_err();
                    return Err(format!(
                        "after a crash the store matches none of the {} states since the last durable write; \
                         against the newest: {newest}; against the durable one: {durable}",
                        self.since_durable.len()
                    ));
                };
                self.model = model;
                self.store = Some(store);
            }
            _ => {
                drop(store);
                self.store = Some(self.disk.open()?);
            }
        }
        // Opening writes (creates the tables) durably; a clean close
        // persisted everything before it.
        self.since_durable = vec![self.model.clone()];
        Ok(())
    }

    fn run(&mut self, ops: &[Op]) -> Result<(), TestCaseError> {
        for (i, op) in ops.iter().enumerate() {
            self.step(op).map_err(|e| TestCaseError::fail(format!("op {i} ({op:?}): {e}")))?;
            self.check().map_err(|e| TestCaseError::fail(format!("after op {i} ({op:?}): {e}")))?;
        }
        Ok(())
    }
}

fn crash_disk() -> Disk {
    Disk::Crash(CrashDisk::new())
}

fn file_disk() -> Disk {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("node.redb");
    Disk::File { _dir: dir, path }
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The store answers as the model does after every write and reopen.
    #[test]
    fn store_matches_model(ops in prop::collection::vec(model_op(), 1..80)) {
        Harness::new(crash_disk()).run(&ops)?;
    }

    /// After a crash that keeps any subset of the unsynced writes, the store
    /// is one of the states since its last synced write: nothing synced is
    /// lost and no batch is torn.
    #[test]
    fn crash_keeps_every_synced_batch(ops in prop::collection::vec(crash_op(), 1..80)) {
        Harness::new(crash_disk()).run(&ops)?;
    }
}

proptest! {
    // Real files fsync; fewer cases.
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The same on a real file, reopened with `Store::open`.
    #[test]
    fn store_matches_model_on_a_real_file(ops in prop::collection::vec(model_op(), 1..60)) {
        Harness::new(file_disk()).run(&ops)?;
    }
}

// ---------------------------------------------------------------- by hand

/// Pins the edges of `raft::Storage` with numbers written out, so that the
/// model's own rules are checked too: snapshot at 5 (term 2), entries 6..=8.
#[test]
fn storage_errors_at_the_edges_of_the_log() {
    let mut store = Store::open_backend(CrashDisk::new().backend()).unwrap();
    let payloads = vec![Payload::Empty; 8];
    let entries: Vec<Entry> = payloads.iter().enumerate().map(|(i, p)| entry(i as u64 + 1, 2, p)).collect();
    let hs = HardState { term: 2, commit: 8, ..Default::default() };
    store
        .commit(WriteBatch { entries, hard_state: Some(hs), applied: Some(5), sync: true, ..Default::default() })
        .unwrap();
    store.commit(WriteBatch { compact_to: Some(5), sync: true, ..Default::default() }).unwrap();

    assert_eq!((store.first_index(), store.last_index()), (6, 8));
    assert_eq!(store_term(&store, 0), Err(Fail::Compacted));
    assert_eq!(store_term(&store, 4), Err(Fail::Compacted));
    assert_eq!(store_term(&store, 5), Ok(2), "the snapshot point keeps its term");
    assert_eq!(store_term(&store, 8), Ok(2));
    assert_eq!(store_term(&store, 9), Err(Fail::Unavailable));
    assert_eq!(store_entries(&store, 5, 6, None), Err(Fail::Compacted));
    assert_eq!(store_entries(&store, 4, 9, None), Err(Fail::Compacted));
    assert_eq!(store_entries(&store, 6, 6, None), Ok(vec![]));
    assert_eq!(store_entries(&store, 9, 9, None).map(|v| v.len()), Ok(0));
    assert_eq!(store_entries(&store, 6, 9, None).map(|v| v.len()), Ok(3));
    assert_eq!(store_entries(&store, 6, 9, Some(0)).map(|v| v.len()), Ok(1), "at least one entry");
}

/// raft-rs's contract: asking beyond `last_index + 1` is a bug in the caller.
#[test]
#[should_panic(expected = "beyond last index")]
fn entries_beyond_the_last_index_panic() {
    let store = Store::open_backend(CrashDisk::new().backend()).unwrap();
    let _ = store_entries(&store, 1, 3, None);
}

//! Durable storage of one node: the Raft log, hard state, conf state,
//! snapshot point and the applied state machine, in one redb file.
//!
//! Tables:
//!
//! | table     | key            | value                                   |
//! |-----------|----------------|-----------------------------------------|
//! | `log`     | index (u64)    | term (u64 LE) ++ encoded `eraftpb::Entry` |
//! | `meta`    | name (&str)    | see the `META_*` keys                   |
//! | `members` | node id (u64)  | encoded `state.v1.Member`               |
//! | `vms`     | name (&str)    | encoded `state.v1.Vm`                   |
//!
//! The pointer invariant, checked by [`Store::validate`]:
//! `snapshot_index <= applied <= commit <= last_index` and
//! `first_index == snapshot_index + 1`; the `log` table holds exactly the
//! indices `first_index..=last_index`.
//!
//! Atomicity: [`Store::commit`] writes one [`WriteBatch`] in one redb write
//! transaction. A batch carries a Raft `Ready`'s entries and hard state, the
//! rows changed by applying its committed entries and the new applied index
//! and conf state, so the state machine and its applied index can never
//! disagree on disk: were they written separately, a crash between the two
//! writes would re-apply entries on restart (a second `Place` bumps the
//! generation twice) and the replicas would diverge.
//!
//! A batch may also *defer* the applied state ([`WriteBatch::defer_state`]):
//! the rows, applied index and light-ready commit index then stay in memory
//! and a later batch (or [`Store::write_state`]) writes them all, still
//! together, so the same holds. What a crash loses of them is re-applied from
//! the log on restart: a deferred applied index only ever lags, and the log
//! is compacted only in a batch that writes the state, so the entries to
//! re-apply are always there. The node writes its state every tick; a batch
//! per `Ready` then holds only the log and hard state, as etcd's WAL does,
//! and the hard state only when its term or vote changed: a change of the
//! commit index alone is deferred with the applied state (see
//! [`Store::commit`]), so an append syncs the log's pages and no others.
//!
//! The whole log since the snapshot point is also kept in memory
//! (`entries`): it is bounded by the compaction threshold, and raft-rs reads
//! entries and terms far more often than we write them.

mod backend;

pub use backend::{CrashBackend, CrashDisk};

use std::collections::VecDeque;
use std::path::Path;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::state::{NodeId, State, codec};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const MEMBERS: TableDefinition<u64, &[u8]> = TableDefinition::new("members");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");

const META_HARD_STATE: &str = "hard_state";
const META_CONF_STATE: &str = "conf_state";
const META_APPLIED: &str = "applied";
/// `index (u64 LE) ++ term (u64 LE)` of the last entry folded into the
/// state machine and removed from the log.
const META_SNAPSHOT_POINT: &str = "snapshot_point";
/// The state's join tokens (hashes only), one record.
const META_JOIN_TOKENS: &str = "join_tokens";
/// Identity of this node (`NodeIdentity`), written once.
const META_IDENTITY: &str = "identity";

/// Page cache for redb; the working set is the log tail and a few rows.
const CACHE_SIZE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open the database {path}: {source}")]
    Open { path: String, source: redb::DatabaseError },
    #[error("database: {0}")]
    Redb(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

macro_rules! impl_from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Redb(e.to_string())
            }
        }
    )*};
}
impl_from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<protobuf::ProtobufError> for StorageError {
    fn from(e: protobuf::ProtobufError) -> Self {
        StorageError::Corrupt(e.to_string())
    }
}

impl From<prost::DecodeError> for StorageError {
    fn from(e: prost::DecodeError) -> Self {
        StorageError::Corrupt(e.to_string())
    }
}

impl From<codec::DecodeError> for StorageError {
    fn from(e: codec::DecodeError) -> Self {
        StorageError::Corrupt(e.to_string())
    }
}

/// Who this node is; generated once and persisted with the log, so a
/// restarted node keeps its identity and membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    pub id: NodeId,
    pub name: String,
    /// Identifies the cluster this node belongs to; peers with another
    /// cluster id are refused.
    pub cluster_id: u64,
}

impl NodeIdentity {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.name.len());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.cluster_id.to_le_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        if bytes.len() < 16 {
            return Err(StorageError::Corrupt("identity record too short".into()));
        }
        Ok(NodeIdentity {
            id: u64_le(&bytes[..8])?,
            cluster_id: u64_le(&bytes[8..16])?,
            name: String::from_utf8(bytes[16..].to_vec())
                .map_err(|_| StorageError::Corrupt("identity name is not UTF-8".into()))?,
        })
    }
}

/// Everything one Raft `Ready` (or light ready) asks to persist, written in
/// one transaction by [`Store::commit`].
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// A snapshot received from the leader, to install first.
    pub snapshot: Option<Snapshot>,
    /// New log entries; they replace any stored entries from the first one's
    /// index on (a leader's log wins over a follower's uncommitted tail).
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    /// A commit index from a light ready.
    pub commit: Option<u64>,
    /// The applied index after this batch's applied entries.
    pub applied: Option<u64>,
    /// The conf state after this batch's applied conf changes.
    pub conf_state: Option<ConfState>,
    /// Compact the log up to and including this (applied) index.
    pub compact_to: Option<u64>,
    /// Must the batch be on disk before `commit` returns? Set whenever the
    /// batch holds entries, a snapshot, or a changed term or vote.
    pub sync: bool,
    /// Keep the applied state (changed rows, `applied`) and `commit` (a
    /// light ready's, or a hard state's that changes nothing but the
    /// commit index) in memory for a later batch to write (module
    /// documentation). Ignored,
    /// and everything written, when the batch installs a snapshot, changes
    /// the conf state or compacts.
    pub defer_state: bool,
    /// Records this node's identity in the same transaction, replacing
    /// any: only for starting a new cluster from a store (a restore, or
    /// `recover --force-new-cluster`), so that a crash never leaves the new
    /// cluster's state under the old cluster's id.
    pub identity: Option<NodeIdentity>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.commit.is_none()
            && self.applied.is_none()
            && self.conf_state.is_none()
            && self.compact_to.is_none()
            && self.identity.is_none()
    }
}

pub struct Store {
    db: Database,
    hard_state: HardState,
    conf_state: ConfState,
    applied: u64,
    snapshot_index: u64,
    snapshot_term: u64,
    /// Entries `snapshot_index + 1 ..= last_index`, mirrored from `log`.
    entries: VecDeque<Entry>,
    state: State,
    identity: Option<NodeIdentity>,
    /// `applied` and the rows changed up to it are ahead of the disk.
    state_unwritten: bool,
    /// A commit index ahead of `hard_state.commit` (which is what the disk
    /// holds), from a deferred batch.
    commit_unwritten: Option<u64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("hard_state", &self.hard_state)
            .field("conf_state", &self.conf_state)
            .field("applied", &self.applied)
            .field("snapshot", &(self.snapshot_index, self.snapshot_term))
            .field("last_index", &self.last_index())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in the redb file at `path`.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let db = Database::builder()
            .set_cache_size(CACHE_SIZE_BYTES)
            .create(path)
            .map_err(|source| StorageError::Open { path: path.display().to_string(), source })?;
        Self::from_db(db)
    }

    /// Opens a store over any redb backend; the simulator passes a
    /// [`CrashBackend`] whose unsynced writes it can throw away.
    pub fn open_backend(backend: impl redb::StorageBackend) -> Result<Self, StorageError> {
        let db = Database::builder().set_cache_size(CACHE_SIZE_BYTES).create_with_backend(backend)?;
        Self::from_db(db)
    }

    fn from_db(db: Database) -> Result<Self, StorageError> {
        {
            // Create the tables so that reads never meet a missing table.
            let txn = db.begin_write()?;
            txn.open_table(LOG)?;
            txn.open_table(META)?;
            txn.open_table(MEMBERS)?;
            txn.open_table(VMS)?;
            txn.commit()?;
        }
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        let get =
            |key: &str| -> Result<Option<Vec<u8>>, StorageError> { Ok(meta.get(key)?.map(|v| v.value().to_vec())) };
        let hard_state = match get(META_HARD_STATE)? {
            Some(bytes) => HardState::parse_from_bytes(&bytes)?,
            None => HardState::default(),
        };
        let conf_state = match get(META_CONF_STATE)? {
            Some(bytes) => ConfState::parse_from_bytes(&bytes)?,
            None => ConfState::default(),
        };
        let applied = get(META_APPLIED)?.map(|b| u64_le(&b)).transpose()?.unwrap_or(0);
        let (snapshot_index, snapshot_term) = match get(META_SNAPSHOT_POINT)? {
            Some(bytes) if bytes.len() == 16 => (u64_le(&bytes[..8])?, u64_le(&bytes[8..])?),
            Some(_) => return Err(StorageError::Corrupt("snapshot point record has the wrong size".into())),
            None => (0, 0),
        };
        let identity = get(META_IDENTITY)?.map(|b| NodeIdentity::decode(&b)).transpose()?;
        let join_tokens =
            get(META_JOIN_TOKENS)?.map(|b| codec::decode_join_tokens(&b)).transpose()?.unwrap_or_default();

        let mut entries = VecDeque::new();
        for row in txn.open_table(LOG)?.range(snapshot_index + 1..)? {
            let (index, value) = row?;
            let entry = decode_entry(value.value())?;
            let expected = snapshot_index + 1 + entries.len() as u64;
            if index.value() != expected || entry.index != expected {
                return Err(StorageError::Corrupt(format!(
                    "log has a hole: expected index {expected}, found {}",
                    index.value()
                )));
            }
            entries.push_back(entry);
        }

        let mut members = Vec::new();
        for row in txn.open_table(MEMBERS)?.iter()? {
            let (_, value) = row?;
            members.push(codec::member_from_pb(prost::Message::decode(value.value())?)?);
        }
        let mut vms = Vec::new();
        for row in txn.open_table(VMS)?.iter()? {
            let (_, value) = row?;
            vms.push(codec::vm_from_pb(prost::Message::decode(value.value())?)?);
        }
        drop(meta);
        drop(txn);

        let store = Store {
            db,
            hard_state,
            conf_state,
            applied,
            snapshot_index,
            snapshot_term,
            entries,
            state: State::load(members, vms, join_tokens),
            identity,
            state_unwritten: false,
            commit_unwritten: None,
        };
        store.validate().map_err(StorageError::Corrupt)?;
        Ok(store)
    }

    /// Checks the pointer invariant (module documentation). Called after
    /// opening and, in tests, after every write.
    pub fn validate(&self) -> Result<(), String> {
        let (snap, applied, commit, last) = (self.snapshot_index, self.applied, self.commit_index(), self.last_index());
        if !(snap <= applied && applied <= commit && commit <= last.max(snap)) {
            return Err(format!(
                "pointer invariant broken: snapshot {snap} <= applied {applied} <= commit {commit} <= last {last}"
            ));
        }
        // The in-memory log is contiguous by construction (appends replace a
        // suffix, compaction drops a prefix), so its ends pin every index.
        let ends = (self.entries.front().map(|e| e.index), self.entries.back().map(|e| e.index));
        match ends {
            (None, None) => Ok(()),
            (Some(first), Some(last)) if first == snap + 1 && last == self.last_index() => Ok(()),
            _ => Err(format!("in-memory log ends {ends:?} do not match snapshot point {snap} and last index {last}")),
        }
    }

    pub fn identity(&self) -> Option<&NodeIdentity> {
        self.identity.as_ref()
    }

    /// Records this node's identity (durably). An identity is set once.
    pub fn set_identity(&mut self, identity: NodeIdentity) -> Result<(), StorageError> {
        if let Some(existing) = &self.identity {
            assert_eq!(*existing, identity, "a node's identity never changes");
            return Ok(());
        }
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert(META_IDENTITY, identity.encode().as_slice())?;
        txn.commit()?;
        self.identity = Some(identity);
        Ok(())
    }

    /// Whether this store belongs to a cluster member (bootstrapped, or
    /// received state from a leader).
    pub fn is_initialized(&self) -> bool {
        !self.conf_state.voters.is_empty() || self.last_index() > 0
    }

    /// Writes the initial state of a new cluster as a snapshot at `index`:
    /// every initial member computes the same one from the same config. A
    /// node that joins later has an empty log, so the leader sends it this
    /// snapshot (or a newer one) instead of a log that lacks the initial
    /// members.
    pub fn bootstrap(
        &mut self,
        conf_state: ConfState,
        state: State,
        index: u64,
        term: u64,
    ) -> Result<(), StorageError> {
        self.bootstrap_with(conf_state, state, index, term, None)
    }

    /// [`Store::bootstrap`] for a new cluster whose first state is not
    /// derived from `initial_members` (a restored backup), recording the
    /// node's `identity` in the same transaction.
    pub fn bootstrap_as(
        &mut self,
        conf_state: ConfState,
        state: State,
        index: u64,
        term: u64,
        identity: NodeIdentity,
    ) -> Result<(), StorageError> {
        assert!(self.identity.is_none(), "a restore never rewrites a member's identity");
        self.bootstrap_with(conf_state, state, index, term, Some(identity))
    }

    fn bootstrap_with(
        &mut self,
        conf_state: ConfState,
        mut state: State,
        index: u64,
        term: u64,
        identity: Option<NodeIdentity>,
    ) -> Result<(), StorageError> {
        assert!(!self.is_initialized(), "bootstrap on an initialized store would wipe it");
        assert!(index > 0 && term > 0);
        let snapshot = snapshot_of(&state, index, term, conf_state);
        state.take_dirty();
        self.commit(WriteBatch { snapshot: Some(snapshot), sync: true, identity, ..WriteBatch::default() })
    }

    /// `recover --force-new-cluster`: makes this store the whole of a new
    /// cluster. `state` (this store's applied state with the other members
    /// removed) becomes a snapshot at the applied index, under `conf_state`
    /// and the new `identity`; every log entry is dropped, which discards
    /// the entries after the commit index this node never saw committed.
    /// The applied state must be written and caught up with the commit
    /// index (`Core::apply_committed`). Returns the entries discarded.
    pub fn force_new_cluster(
        &mut self,
        state: &State,
        conf_state: ConfState,
        identity: NodeIdentity,
    ) -> Result<u64, StorageError> {
        assert!(!self.state_unwritten(), "the applied state is written first");
        assert_eq!(self.applied, self.commit_index(), "every committed entry is applied first");
        let index = self.applied;
        let term = self.term_of(index).expect("the applied entry is in the log or is the snapshot point");
        let discarded = self.last_index() - index;
        let snapshot = snapshot_of(state, index, term, conf_state);
        let batch =
            WriteBatch { snapshot: Some(snapshot), sync: true, identity: Some(identity), ..WriteBatch::default() };
        self.commit(batch)?;
        Ok(discarded)
    }

    /// The hard state as written.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The commit index, including one a deferred batch has not written.
    pub fn commit_index(&self) -> u64 {
        self.commit_unwritten.map_or(self.hard_state.commit, |c| c.max(self.hard_state.commit))
    }

    /// Whether deferred state waits for [`Store::write_state`].
    pub fn state_unwritten(&self) -> bool {
        self.state_unwritten || self.commit_unwritten.is_some()
    }

    /// Writes the deferred state, synced: redb keeps an unsynced commit
    /// only in its own memory until a synced one, so a killed process would
    /// lose it and re-apply everything since the last synced state (up to a
    /// compaction interval of entries, which measured 1.1 s of restart for
    /// 100,000 VMs instead of 0.4 s). At rest there is nothing to write.
    pub fn write_state(&mut self) -> Result<(), StorageError> {
        if !self.state_unwritten() {
            return Ok(());
        }
        self.commit(WriteBatch { sync: true, ..WriteBatch::default() })
    }

    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn snapshot_point(&self) -> (u64, u64) {
        (self.snapshot_index, self.snapshot_term)
    }

    pub fn last_index(&self) -> u64 {
        self.snapshot_index + self.entries.len() as u64
    }

    pub fn first_index(&self) -> u64 {
        self.snapshot_index + 1
    }

    /// The number of applied entries still in the log.
    pub fn applied_entries_in_log(&self) -> u64 {
        self.applied - self.snapshot_index
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// The state machine, for applying committed entries. Changed rows are
    /// written by the next [`Store::commit`] together with the new applied
    /// index.
    pub fn state_mut(&mut self) -> &mut State {
        &mut self.state
    }

    /// The entry at `index`, if it is still in the log.
    pub fn entry(&self, index: u64) -> Option<&Entry> {
        let offset = index.checked_sub(self.first_index())?;
        self.entries.get(usize::try_from(offset).ok()?)
    }

    /// A snapshot of the applied state, as sent to a follower.
    pub fn build_snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        snapshot.set_data(codec::encode_snapshot(&self.state).into());
        let meta: &mut SnapshotMetadata = snapshot.mut_metadata();
        meta.index = self.applied;
        meta.term = self.term_of(self.applied).expect("the applied entry is in the log or is the snapshot point");
        meta.set_conf_state(self.conf_state.clone());
        snapshot
    }

    fn term_of(&self, index: u64) -> Option<u64> {
        if index == self.snapshot_index { Some(self.snapshot_term) } else { self.entry(index).map(|e| e.term) }
    }

    /// The term of `index` once `entries` (a batch's new entries, which
    /// replace the log from their first index on) are appended.
    fn term_after_append(&self, entries: &[Entry], index: u64) -> Option<u64> {
        match entries.first() {
            Some(first) if index >= first.index => {
                entries.get(usize::try_from(index - first.index).ok()?).map(|e| e.term)
            }
            _ => self.term_of(index),
        }
    }

    /// Writes `batch` in one transaction, then updates the in-memory mirror.
    /// An error here is fatal for the node: the caller must not continue
    /// (in memory the state machine may already be ahead of the disk).
    pub fn commit(&mut self, mut batch: WriteBatch) -> Result<(), StorageError> {
        // A hard state whose term and vote are those on disk changes only
        // the commit index, which Raft may forget (a restarted node learns
        // it again from the leader): deferred, it goes with the applied
        // state, as a light ready's does. An append's transaction then holds
        // only the log, and a commit costs no transaction of its own: fewer
        // redb pages to fsync, and no transaction between a quorum's ack
        // and the reply.
        if batch.defer_state
            && let Some(hs) = &batch.hard_state
            && hs.term == self.hard_state.term
            && hs.vote == self.hard_state.vote
        {
            batch.commit = Some(batch.commit.unwrap_or(0).max(hs.commit));
            batch.hard_state = None;
        }
        let installed = batch.snapshot.as_ref().map(|s| {
            let state = codec::decode_snapshot(s.get_data());
            (s.get_metadata().clone(), state)
        });
        let installed = match installed {
            Some((meta, state)) => Some((meta, state?)),
            None => None,
        };

        // The compaction point and its term in the log as this batch leaves
        // it: the batch's own entries may add or replace the entry there.
        // Both halves below use this one value: the log as it was before
        // the batch may lack the entry, or hold the replaced one with a
        // stale term, and disk and memory would then disagree.
        let compaction = batch.compact_to.map(|to| {
            let applied = batch.applied.unwrap_or(self.applied);
            assert!(to <= applied, "compacting unapplied entries ({to} > applied {applied})");
            let term = self.term_after_append(&batch.entries, to).expect("compaction point is in the log");
            (to, term)
        });

        let write_state =
            !batch.defer_state || installed.is_some() || batch.conf_state.is_some() || batch.compact_to.is_some();
        if !write_state && batch.entries.is_empty() && batch.hard_state.is_none() {
            // Nothing for the disk yet: only the in-memory mirror moves.
            if let Some(applied) = batch.applied {
                self.applied = applied;
                self.state_unwritten = true;
            }
            if let Some(commit) = batch.commit {
                self.commit_unwritten = Some(self.commit_index().max(commit));
            }
            debug_assert_eq!(self.validate(), Ok(()));
            return Ok(());
        }
        // The applied index to write: this batch's, or one deferred earlier
        // (never that one over a snapshot, which replaces it).
        let applied_to_write = match batch.applied {
            Some(applied) if write_state => Some(applied),
            None if write_state && self.state_unwritten && installed.is_none() => Some(self.applied),
            _ => None,
        };

        let mut txn = self.db.begin_write()?;
        txn.set_durability(if batch.sync { Durability::Immediate } else { Durability::None })?;
        {
            let mut log = txn.open_table(LOG)?;
            let mut meta = txn.open_table(META)?;
            let mut members = txn.open_table(MEMBERS)?;
            let mut vms = txn.open_table(VMS)?;

            if let Some((snap_meta, new_state)) = &installed {
                // Everything up to the snapshot index is replaced by it.
                log.retain(|_, _| false)?;
                members.retain(|_, _| false)?;
                vms.retain(|_, _| false)?;
                for member in new_state.members().values() {
                    members
                        .insert(member.id, prost::Message::encode_to_vec(&codec::member_to_pb(member)).as_slice())?;
                }
                for vm in new_state.vms().values() {
                    vms.insert(vm.name.as_str(), prost::Message::encode_to_vec(&codec::vm_to_pb(vm)).as_slice())?;
                }
                meta.insert(META_JOIN_TOKENS, codec::encode_join_tokens(new_state).as_slice())?;
                let point = [snap_meta.index.to_le_bytes(), snap_meta.term.to_le_bytes()].concat();
                meta.insert(META_SNAPSHOT_POINT, point.as_slice())?;
                meta.insert(META_APPLIED, snap_meta.index.to_le_bytes().as_slice())?;
                meta.insert(META_CONF_STATE, snap_meta.get_conf_state().write_to_bytes()?.as_slice())?;
            }

            // Rows changed by applying committed entries (they stay marked
            // while the state is deferred).
            if write_state {
                let dirty = self.state.take_dirty();
                if installed.is_none() {
                    for id in dirty.members {
                        match self.state.member(id) {
                            Some(m) => {
                                members
                                    .insert(id, prost::Message::encode_to_vec(&codec::member_to_pb(m)).as_slice())?;
                            }
                            None => {
                                members.remove(id)?;
                            }
                        }
                    }
                    for name in dirty.vms {
                        match self.state.vm(&name) {
                            Some(vm) => {
                                vms.insert(
                                    name.as_str(),
                                    prost::Message::encode_to_vec(&codec::vm_to_pb(vm)).as_slice(),
                                )?;
                            }
                            None => {
                                vms.remove(name.as_str())?;
                            }
                        }
                    }
                    if dirty.join_tokens {
                        meta.insert(META_JOIN_TOKENS, codec::encode_join_tokens(&self.state).as_slice())?;
                    }
                }
            }
            if let Some(applied) = applied_to_write {
                meta.insert(META_APPLIED, applied.to_le_bytes().as_slice())?;
            }
            if let Some(conf_state) = &batch.conf_state {
                meta.insert(META_CONF_STATE, conf_state.write_to_bytes()?.as_slice())?;
            }

            if let Some(first) = batch.entries.first() {
                let first_index = first.index;
                let last_after_snapshot = match &installed {
                    Some((m, _)) => m.index,
                    None => self.last_index(),
                };
                assert!(
                    first_index <= last_after_snapshot + 1,
                    "appending entry {first_index} would leave a hole after {last_after_snapshot}"
                );
                // Drop the conflicting tail before appending.
                let stale: Vec<u64> =
                    log.range(first_index..)?.map(|r| r.map(|(k, _)| k.value())).collect::<Result<_, _>>()?;
                for index in stale {
                    log.remove(index)?;
                }
                for entry in &batch.entries {
                    log.insert(entry.index, encode_entry(entry)?.as_slice())?;
                }
            }

            let mut hard_state = self.hard_state.clone();
            if let Some((snap_meta, _)) = &installed {
                hard_state.commit = hard_state.commit.max(snap_meta.index);
                hard_state.term = hard_state.term.max(snap_meta.term);
            }
            if let Some(hs) = batch.hard_state.take() {
                hard_state = hs;
            }
            if write_state {
                let deferred = self.commit_unwritten.take().into_iter();
                for commit in batch.commit.into_iter().chain(deferred) {
                    hard_state.commit = hard_state.commit.max(commit);
                }
            } else if let Some(commit) = batch.commit {
                self.commit_unwritten = Some(self.commit_index().max(commit));
            }
            if let Some((to, term)) = compaction {
                let stale: Vec<u64> = log.range(..=to)?.map(|r| r.map(|(k, _)| k.value())).collect::<Result<_, _>>()?;
                for index in stale {
                    log.remove(index)?;
                }
                let point = [to.to_le_bytes(), term.to_le_bytes()].concat();
                meta.insert(META_SNAPSHOT_POINT, point.as_slice())?;
            }
            if hard_state != self.hard_state || installed.is_some() {
                meta.insert(META_HARD_STATE, hard_state.write_to_bytes()?.as_slice())?;
            }
            if let Some(identity) = &batch.identity {
                meta.insert(META_IDENTITY, identity.encode().as_slice())?;
            }
            self.hard_state = hard_state;
        }
        txn.commit()?;

        // The transaction is durable (or, unsynced, at least ordered before
        // any later synced one); mirror it in memory.
        if let Some(identity) = batch.identity.take() {
            self.identity = Some(identity);
        }
        if let Some((snap_meta, new_state)) = installed {
            self.entries.clear();
            self.snapshot_index = snap_meta.index;
            self.snapshot_term = snap_meta.term;
            self.applied = snap_meta.index;
            self.conf_state = snap_meta.get_conf_state().clone();
            self.state = new_state;
        }
        if let Some(applied) = batch.applied {
            self.applied = applied;
        }
        self.state_unwritten = !write_state && (self.state_unwritten || batch.applied.is_some());
        if self.commit_unwritten.is_some_and(|c| c <= self.hard_state.commit) {
            self.commit_unwritten = None;
        }
        if let Some(conf_state) = batch.conf_state {
            self.conf_state = conf_state;
        }
        if let Some(first) = batch.entries.first() {
            let keep = first.index - self.first_index();
            self.entries.truncate(usize::try_from(keep).expect("log length fits in memory"));
            self.entries.extend(batch.entries);
        }
        if let Some((to, term)) = compaction {
            let drop = usize::try_from(to - self.snapshot_index).expect("log length fits in memory");
            self.entries.drain(..drop);
            self.snapshot_index = to;
            self.snapshot_term = term;
        }
        debug_assert_eq!(self.validate(), Ok(()));
        Ok(())
    }

    /// All log entries `low..high` as raft-rs asks for them.
    fn slice(&self, low: u64, high: u64, max_size: Option<u64>) -> raft::Result<Vec<Entry>> {
        if low <= self.snapshot_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if high > self.last_index() + 1 {
            panic!("entries({low}, {high}) beyond last index {}", self.last_index());
        }
        let start = usize::try_from(low - self.first_index()).expect("fits");
        let end = usize::try_from(high - self.first_index()).expect("fits");
        let mut out = Vec::with_capacity(end - start);
        let mut size = 0u64;
        for entry in self.entries.range(start..end) {
            size += u64::from(entry.compute_size());
            if !out.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }
}

impl raft::Storage for Store {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hard_state.clone(), self.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.slice(low, high, max_size.into())
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx < self.snapshot_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        self.term_of(idx).ok_or(raft::Error::Store(RaftStorageError::Unavailable))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(Store::first_index(self))
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(Store::last_index(self))
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        Ok(self.build_snapshot())
    }
}

/// A snapshot of `state` at `index` and `term`, under `conf_state`.
fn snapshot_of(state: &State, index: u64, term: u64, conf_state: ConfState) -> Snapshot {
    let mut snapshot = Snapshot::default();
    snapshot.set_data(codec::encode_snapshot(state).into());
    let meta = snapshot.mut_metadata();
    meta.index = index;
    meta.term = term;
    meta.set_conf_state(conf_state);
    snapshot
}

fn encode_entry(entry: &Entry) -> Result<Vec<u8>, StorageError> {
    let mut out = entry.term.to_le_bytes().to_vec();
    entry.write_to_vec(&mut out)?;
    Ok(out)
}

fn decode_entry(bytes: &[u8]) -> Result<Entry, StorageError> {
    if bytes.len() < 8 {
        return Err(StorageError::Corrupt("log record too short".into()));
    }
    let entry = Entry::parse_from_bytes(&bytes[8..])?;
    if entry.term != u64_le(&bytes[..8])? {
        return Err(StorageError::Corrupt(format!("log record {} has two terms", entry.index)));
    }
    Ok(entry)
}

fn u64_le(bytes: &[u8]) -> Result<u64, StorageError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| StorageError::Corrupt("expected 8 bytes".into()))?;
    Ok(u64::from_le_bytes(array))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Member;

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, ..Default::default() }
    }

    /// `recover --force-new-cluster` rewrites a store in one transaction:
    /// the applied state as a snapshot at the applied index, one voter, a
    /// new cluster id, and no log (the entries never seen committed gone).
    #[test]
    fn a_forced_new_cluster_keeps_the_applied_state_and_drops_the_uncommitted_tail() {
        let disk = CrashDisk::new();
        let mut store = Store::open_backend(disk.backend()).unwrap();
        let old = NodeIdentity { id: 1, name: "h1".into(), cluster_id: 7 };
        store.set_identity(old.clone()).unwrap();
        let hs = HardState { term: 2, commit: 3, ..Default::default() };
        let entries = (1..=5).map(|i| entry(i, if i <= 3 { 1 } else { 2 })).collect();
        let batch = WriteBatch {
            entries,
            hard_state: Some(hs),
            applied: Some(3),
            conf_state: Some(ConfState::from((vec![1, 2, 3], vec![]))),
            sync: true,
            ..WriteBatch::default()
        };
        store.commit(batch).unwrap();
        let state = State::with_members([Member::new(1, "h1", "127.0.0.1:7000")]);
        let new = NodeIdentity { cluster_id: 8, ..old };
        let discarded = store.force_new_cluster(&state, ConfState::from((vec![1], vec![])), new.clone()).unwrap();
        assert_eq!(discarded, 2);
        for store in [store, Store::open_backend(disk.backend()).unwrap()] {
            assert_eq!(store.identity(), Some(&new));
            assert_eq!((store.snapshot_point(), store.applied(), store.last_index()), ((3, 1), 3, 3));
            assert_eq!(store.conf_state().voters, vec![1]);
            assert_eq!(store.hard_state().term, 2, "the term is kept");
            assert_eq!(store.state().members().len(), 1);
            store.validate().unwrap();
        }
    }

    /// A hard state that moves only the commit index waits for the applied
    /// state (one synced write a tick later) instead of a transaction of
    /// its own; a new term or vote is written, synced, at once.
    #[test]
    fn a_commit_only_hard_state_is_deferred_and_a_new_vote_is_not() {
        let disk = CrashDisk::new();
        let mut store = Store::open_backend(disk.backend()).unwrap();
        let hs = HardState { term: 2, vote: 1, ..Default::default() };
        let batch = WriteBatch {
            entries: vec![entry(1, 2), entry(2, 2)],
            hard_state: Some(hs.clone()),
            sync: true,
            defer_state: true,
            ..WriteBatch::default()
        };
        store.commit(batch).unwrap();
        assert_eq!(store.hard_state(), &hs, "a new term and vote are written with the entries");
        let committed = HardState { commit: 2, ..hs.clone() };
        store
            .commit(WriteBatch {
                hard_state: Some(committed),
                applied: Some(2),
                defer_state: true,
                ..WriteBatch::default()
            })
            .unwrap();
        assert_eq!(store.hard_state(), &hs, "no transaction for the commit index alone");
        assert_eq!((store.commit_index(), store.applied()), (2, 2));
        store.validate().unwrap();
        // A crash now loses the commit index with the applied index: both
        // come back from the log and the leader.
        disk.kill();
        drop(store);
        disk.crash(|_| false);
        let mut store = Store::open_backend(disk.backend()).unwrap();
        assert_eq!((store.hard_state(), store.commit_index(), store.applied(), store.last_index()), (&hs, 0, 0, 2));
        store.validate().unwrap();
        store
            .commit(WriteBatch {
                hard_state: Some(HardState { commit: 2, ..hs.clone() }),
                applied: Some(2),
                defer_state: true,
                ..WriteBatch::default()
            })
            .unwrap();
        store.write_state().unwrap();
        disk.kill();
        drop(store);
        disk.crash(|_| false);
        let store = Store::open_backend(disk.backend()).unwrap();
        assert_eq!((store.commit_index(), store.applied()), (2, 2), "written together by write_state");
        store.validate().unwrap();
    }
}

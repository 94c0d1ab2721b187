//! The node: the consensus core running on its own thread, and the handle
//! the rest of the agent uses to talk to it.
//!
//! The core does synchronous disk I/O (fsync), so it runs on a dedicated
//! OS thread ("raft"), not on the async runtime. The thread owns the
//! [`Core`]; everything else sends it an [`Input`] through one bounded
//! queue and awaits a reply. Each loop turn drains *every* queued input
//! before handling the Ready, so many concurrent proposals share one Raft
//! `Ready`, one redb transaction and one fsync.
//!
//! Writes: commands are proposed on any member that knows a leader (a
//! follower hands them to the leader in a Raft message, see
//! `Core::propose`) and answered once applied here; membership changes
//! only on the leader, and a follower answers [`NodeError::NotLeader`] with
//! the leader's address, for the API layer to forward the request there.
//! Reads are linearizable by default: a read
//! index round confirms leadership, and the read runs on the local state
//! once the local applied index has caught up with it.

pub mod autopilot;
mod contact;
mod copies;
pub mod events;
mod identity;
mod leader;
pub mod record;

pub use contact::Contact;

pub use identity::{cluster_id_of, member_id_of, random_member_id, restored_cluster_id_of};

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use raft::eraftpb::{ConfState, Message};
use tokio::sync::{broadcast, oneshot, watch};

use crate::config::InitialMember;
use crate::consensus::{
    BOOTSTRAP_INDEX, BOOTSTRAP_TERM, Core, CoreConfig, CoreStatus, Outcome, ProposalId, ProposeError, Role, Transport,
};
use crate::metrics::Metrics;
use crate::state::{Command, CommandKind, Effect, Member, MembershipChange, NodeId, Rejection, State};
use crate::storage::{NodeIdentity, StorageError, Store};
use crate::trust;
use events::EventLog;

/// Inputs queued for the raft thread; beyond this, requests are refused as
/// overloaded and peer messages dropped (Raft retransmits).
const INPUT_QUEUE_MAX: usize = 16 * 1024;
/// Applied effects kept for slow event subscribers.
const EFFECTS_CHANNEL_MAX: usize = 4096;

/// The file name of the store inside the data dir.
pub const STORE_FILE: &str = "blixard.redb";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("this member is not the leader")]
    NotLeader { leader: Option<LeaderInfo> },
    #[error("{0}")]
    Rejected(Rejection),
    #[error("the request was dropped by a leader change; it was not applied")]
    Dropped,
    #[error("the leader changed while the request was in flight; it may or may not have been applied")]
    Unknown,
    #[error("this member knows no leader right now: it cannot reach a quorum, or an election is under way")]
    NoLeader,
    #[error("the request timed out")]
    Timeout,
    #[error("the agent is overloaded; retry")]
    Overloaded,
    #[error("the request is too large: {0}")]
    TooLarge(String),
    #[error("this agent is not a member of a cluster yet; run `blixard-agent cluster join ADDRESS`")]
    NotMember,
    #[error("the agent is shutting down")]
    Stopped,
}

impl NodeError {
    /// Whether retrying the same request may succeed (after forwarding or
    /// waiting for a leader).
    pub fn is_retryable(&self) -> bool {
        matches!(self, NodeError::NotLeader { .. } | NodeError::Dropped | NodeError::NoLeader | NodeError::Overloaded)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    pub id: NodeId,
    pub name: String,
    pub address: String,
}

/// What the node publishes after every loop turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: NodeId,
    pub name: String,
    pub cluster_id: u64,
    pub role: Role,
    pub leader: Option<LeaderInfo>,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Peers the leader heard from within an election timeout (leader
    /// only), in id order.
    pub active_peers: Vec<NodeId>,
    /// This member has been removed from the cluster.
    pub removed: bool,
}

/// An applied effect, for events and for the local reconciler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedEffect {
    pub index: u64,
    pub at_unix_ms: u64,
    pub effect: Effect,
}

/// Where the raft thread sends peer messages; implemented by the gRPC peer
/// transport (and by in-process test harnesses). Must not block.
pub trait PeerSender: Send + 'static {
    fn send(&mut self, to: NodeId, messages: Vec<Message>);

    /// Confirms the quorum contact of `to` (see the `contact` module), to
    /// ride the next frame sent to `to`. A transport that carries no send
    /// times ignores it, and its hosts read their contact themselves.
    fn confirm_contact(&mut self, to: NodeId, contact: Contact) {
        let _ = (to, contact);
    }

    /// The members that do not vote, in id order, whenever that changes
    /// (and once at start). Nothing waits on what a learner acknowledges,
    /// so a transport may pace what it sends them: a learner then syncs
    /// its log once per batch rather than once per commit.
    fn set_learners(&mut self, learners: &[NodeId]) {
        let _ = learners;
    }
}

/// Addresses of peers, kept current by the raft thread from the member
/// list and read by the transport.
pub type AddressBook = Arc<RwLock<BTreeMap<NodeId, String>>>;

type ReadFn = Box<dyn FnOnce(Result<(&State, &CoreStatus), NodeError>) + Send>;
/// Answers a proposal, once, with its outcome and this node's state just
/// after (on the raft thread: the caller needs no second trip to read it).
type ProposalReply = Box<dyn FnOnce(Result<Effect, NodeError>, &State) + Send>;
/// Refuses a proposal before it is made, from this node's state.
pub type ProposalCheck = Box<dyn FnOnce(&State) -> Option<Rejection> + Send>;

enum Input {
    Propose {
        kind: CommandKind,
        check: Option<ProposalCheck>,
        reply: ProposalReply,
    },
    Membership {
        change: MembershipChange,
        reply: ProposalReply,
    },
    Read {
        linearizable: bool,
        f: ReadFn,
    },
    Raft {
        /// The member that sent them (bound to its certificate by the
        /// transport).
        from: NodeId,
        /// Its send time (boot-wide monotonic clock), when the transport
        /// carries one.
        sent_at_ms: Option<u64>,
        messages: Vec<Message>,
        /// The sender's confirmation of this host's quorum contact: counts
        /// only if the sender is the leader of this node's term once the
        /// frame's messages are stepped, and only for a time not later than
        /// this host's clock.
        confirmation: Option<Contact>,
        /// When it was queued for the raft thread.
        queued: Instant,
    },
    SnapshotReport {
        peer: NodeId,
        delivered: bool,
    },
    Unreachable(NodeId),
    TransferLeader(NodeId),
    /// Hand leadership to another voter before a clean stop.
    StepDown,
    Shutdown,
}

impl Input {
    /// When a peer's frame was queued for the raft thread.
    fn queued(&self) -> Option<Instant> {
        match self {
            Input::Raft { queued, .. } => Some(*queued),
            _ => None,
        }
    }
}

/// Tunables of the node shell.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub tick: Duration,
    pub core: CoreConfig,
    /// How long a proposal or read may wait for its outcome.
    pub request_timeout: Duration,
    /// Failure detection timing (the leader's detector).
    pub timing: crate::failure::Timing,
    /// How the leader places VMs.
    pub policy: crate::scheduler::Policy,
    /// Where proposal latency, leader changes and the leader's decisions
    /// are counted.
    pub metrics: Arc<Metrics>,
    /// Where the cluster events this member derives go; the daemon shares
    /// it with the HTTP listener (dashboard).
    pub events: Arc<EventLog>,
    /// How many voters the leader keeps (`node::autopilot`).
    pub voters: autopilot::Voters,
}

impl NodeOptions {
    /// Defaults for node `id`: 50 ms ticks (see `config::RaftTiming`).
    pub fn new(id: NodeId) -> Self {
        NodeOptions {
            tick: Duration::from_millis(50),
            core: CoreConfig::new(id),
            request_timeout: Duration::from_secs(10),
            timing: crate::failure::Timing::default(),
            policy: crate::scheduler::Policy::default(),
            metrics: Arc::new(Metrics::new()),
            events: Arc::new(EventLog::new()),
            voters: autopilot::Voters::default(),
        }
    }
}

/// A cheap, clonable handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    inputs: SyncSender<Input>,
    status: watch::Receiver<NodeStatus>,
    effects: broadcast::Sender<AppliedEffect>,
    addresses: AddressBook,
    request_timeout: Duration,
    metrics: Arc<Metrics>,
    events: Arc<EventLog>,
    contact: Arc<watch::Sender<Option<Contact>>>,
    fence_after_ms: u64,
    voters_wanted: usize,
    /// The heartbeats and answers stepped last, to drop their copies.
    copies: Arc<copies::Copies>,
    /// Closed when the raft thread ends (see [`NodeHandle::stopped`]).
    alive: watch::Receiver<()>,
}

/// The running node: its handle plus the raft thread.
pub struct Node {
    handle: NodeHandle,
    thread: Option<std::thread::JoinHandle<Result<(), StorageError>>>,
}

/// How a node comes into being.
pub enum Start<'a> {
    /// Reopen an existing store, or bootstrap a new cluster from the same
    /// `initial_members` every initial host is given.
    InitialMembers(&'a [InitialMember]),
    /// A host that was admitted to a cluster (learner) and now starts with
    /// an empty log; the leader sends it a snapshot.
    Joined { id: NodeId, cluster_id: u64, peers: BTreeMap<NodeId, String> },
}

/// Opens the store at `data_dir` and reports its identity, if any.
pub fn open_store(data_dir: &Path) -> Result<Store, StorageError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| StorageError::Redb(format!("cannot create {}: {e}", data_dir.display())))?;
    Store::open(&store_path(data_dir))
}

pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STORE_FILE)
}

/// The wall clock in milliseconds since the Unix epoch (0 before 1970).
pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Prepares `store` for `start`: bootstraps a new cluster when the store is
/// empty and this host is an initial member, and records the identity.
/// Never rewrites an initialized store.
pub fn prepare_store(store: &mut Store, name: &str, start: &Start<'_>) -> Result<NodeIdentity, NodeError> {
    if let Some(identity) = store.identity().cloned() {
        return Ok(identity);
    }
    match start {
        Start::InitialMembers(members) if !members.is_empty() => {
            let cluster_id = cluster_id_of(members);
            let id = member_id_of(name);
            let identity = NodeIdentity { id, name: name.to_string(), cluster_id };
            if !store.is_initialized() {
                let voters: Vec<NodeId> = members.iter().map(|m| member_id_of(&m.name)).collect();
                let state = State::with_members(
                    members.iter().map(|m| Member::new(member_id_of(&m.name), &m.name, &m.address)),
                );
                store
                    .bootstrap(ConfState::from((voters, Vec::<NodeId>::new())), state, BOOTSTRAP_INDEX, BOOTSTRAP_TERM)
                    .map_err(|e| NodeError::TooLarge(format!("bootstrap failed: {e}")))?;
            }
            store.set_identity(identity.clone()).map_err(|_| NodeError::Stopped)?;
            Ok(identity)
        }
        Start::Joined { id, cluster_id, .. } => {
            let identity = NodeIdentity { id: *id, name: name.to_string(), cluster_id: *cluster_id };
            store.set_identity(identity.clone()).map_err(|_| NodeError::Stopped)?;
            Ok(identity)
        }
        Start::InitialMembers(_) => Err(NodeError::NotMember),
    }
}

/// What [`restore_store`] made of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub cluster_id: u64,
    pub vms: usize,
    /// VMs placed on a host of the new cluster (same name), kept there.
    pub kept: usize,
    /// VMs placed on a host the new cluster does not have: placed again.
    pub unplaced: usize,
}

/// Writes the first state of a NEW cluster into an empty `store`, from
/// `backup`: the cluster of `members` (this host `name` among them; every
/// member restores the same backup with the same list), with an id of
/// its own ([`restored_cluster_id_of`]). See `State::for_new_cluster` for
/// what is kept.
pub fn restore_store(
    store: &mut Store,
    name: &str,
    members: &[InitialMember],
    backup: &crate::backup::Backup,
) -> Result<Restored, StorageError> {
    let new_members: Vec<Member> =
        members.iter().map(|m| Member::new(member_id_of(&m.name), &m.name, &m.address)).collect();
    let state = backup.state.for_new_cluster(&new_members, backup.header.taken_unix_ms);
    state.validate().map_err(|e| StorageError::Corrupt(format!("the restored state is inconsistent: {e}")))?;
    let placed_before = backup.state.vms().values().filter(|vm| vm.placement.is_some()).count();
    let kept = state.vms().values().filter(|vm| vm.placement.is_some()).count();
    let cluster_id = restored_cluster_id_of(&backup.header.state_sha256, members);
    let voters: Vec<NodeId> = new_members.iter().map(|m| m.id).collect();
    let identity = NodeIdentity { id: member_id_of(name), name: name.to_string(), cluster_id };
    let restored = Restored { cluster_id, vms: state.vms().len(), kept, unplaced: placed_before - kept };
    store.bootstrap_as(
        ConfState::from((voters, Vec::<NodeId>::new())),
        state,
        BOOTSTRAP_INDEX,
        BOOTSTRAP_TERM,
        identity,
    )?;
    Ok(restored)
}

/// What [`force_new_cluster`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forced {
    pub cluster_id: u64,
    /// The index the new cluster starts from (this member's commit index).
    pub index: u64,
    /// Entries this member had received but never seen committed, dropped.
    pub discarded: u64,
    /// The members removed, by name, with the VMs that were on them.
    pub removed: Vec<(String, usize)>,
}

/// `recover --force-new-cluster` on a stopped member's `store`: applies
/// what it knows committed, removes every other member (their VMs are
/// placed again; their handoffs stay until the new leader knows they
/// fenced), and makes it the only voter of a new cluster `cluster_id`.
pub fn force_new_cluster(store: Store, cluster_id: u64) -> Result<Forced, StorageError> {
    let identity =
        store.identity().cloned().ok_or_else(|| StorageError::Corrupt("the store has no identity".into()))?;
    let mut core = Core::new(CoreConfig::new(identity.id), store)
        .map_err(|e| StorageError::Corrupt(format!("raft refuses the store: {e}")))?;
    core.apply_committed()?;
    let mut state = core.state().clone();
    let _ = state.take_dirty();
    if state.member(identity.id).is_some_and(|m| m.learner) {
        state
            .apply_membership(&MembershipChange::Promote { id: identity.id }, now_unix_ms())
            .map_err(|r| StorageError::Corrupt(format!("cannot make this member a voter: {r}")))?;
    }
    let others: Vec<Member> = state.members().values().filter(|m| m.id != identity.id).cloned().collect();
    let mut removed = Vec::new();
    for member in others {
        let on = state.vms_on(member.id).count();
        state
            .apply_membership(&MembershipChange::Remove { id: member.id }, now_unix_ms())
            .map_err(|r| StorageError::Corrupt(format!("cannot remove {}: {r}", member.name)))?;
        removed.push((member.name, on));
    }
    let store = core.store_mut();
    let index = store.applied();
    let identity = NodeIdentity { cluster_id, ..identity };
    let conf = ConfState::from((vec![identity.id], Vec::<NodeId>::new()));
    let discarded = store.force_new_cluster(&state, conf, identity)?;
    Ok(Forced { cluster_id, index, discarded, removed })
}

impl Node {
    /// Starts the raft thread over `store` (already prepared).
    pub fn start(
        store: Store,
        options: NodeOptions,
        mut sender: Box<dyn PeerSender>,
        addresses: AddressBook,
        known_peers: BTreeMap<NodeId, String>,
    ) -> Result<Node, NodeError> {
        let identity = store.identity().cloned().ok_or(NodeError::NotMember)?;
        assert_eq!(identity.id, options.core.id, "the core runs under the stored identity");
        {
            let mut book = addresses.write().unwrap_or_else(|e| e.into_inner());
            book.extend(known_peers);
            for member in store.state().members().values() {
                book.insert(member.id, member.address.clone());
            }
        }
        // A member removed before this restart: its state (from the log or
        // a snapshot) no longer lists it. (A joiner that has not received
        // its first snapshot yet has an uninitialized store.)
        let removed = store.is_initialized() && store.state().member(identity.id).is_none();
        let core = Core::new(options.core.clone(), store).map_err(|e| NodeError::TooLarge(format!("raft: {e}")))?;
        let (inputs, rx) = mpsc::sync_channel(INPUT_QUEUE_MAX);
        let status = status_of(&core, &identity, &addresses, removed, []);
        sender.set_learners(&status.learners);
        let (status_tx, status_rx) = watch::channel(status);
        let (effects, _) = broadcast::channel(EFFECTS_CHANNEL_MAX);
        let (alive, alive_rx) = watch::channel(());
        let events_log = options.events.clone();
        let handle = NodeHandle {
            inputs,
            status: status_rx,
            effects: effects.clone(),
            addresses: addresses.clone(),
            request_timeout: options.request_timeout,
            metrics: options.metrics.clone(),
            events: events_log.clone(),
            contact: Arc::new(watch::Sender::new(None)),
            fence_after_ms: options.timing.fence_after_ms,
            voters_wanted: options.voters.target,
            copies: Arc::new(copies::Copies::new(Duration::from_millis(options.timing.heartbeat_interval_ms / 2))),
            alive: alive_rx,
        };
        let duties = leader::Duties::new(
            identity.id,
            options.timing,
            options.policy.clone(),
            options.voters,
            options.metrics.clone(),
        );
        let mut raft = RaftThread {
            core,
            identity,
            options,
            sender,
            addresses,
            status: status_tx,
            effects,
            proposals: BTreeMap::new(),
            waiting_changes: VecDeque::new(),
            reads: BTreeMap::new(),
            waiting_reads: VecDeque::new(),
            next_read: 0,
            removed,
            duties,
            last_leader: None,
            events: events_log,
            rounds: contact::ContactRounds::default(),
            contact: handle.contact.clone(),
            _alive: alive,
        };
        let thread = std::thread::Builder::new()
            .name("raft".into())
            .spawn(move || raft.run(rx))
            .map_err(|e| NodeError::TooLarge(format!("cannot start the raft thread: {e}")))?;
        Ok(Node { handle, thread: Some(thread) })
    }

    pub fn handle(&self) -> NodeHandle {
        self.handle.clone()
    }

    /// Stops the raft thread after it flushed what it was doing.
    pub fn shutdown(mut self) -> Result<(), StorageError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), StorageError> {
        let _ = self.handle.inputs.send(Input::Shutdown);
        match self.thread.take() {
            Some(thread) => {
                thread.join().unwrap_or_else(|_| Err(StorageError::Redb("the raft thread panicked".into())))
            }
            None => Ok(()),
        }
    }

    /// Waits until the raft thread ends (a fatal storage error or a
    /// shutdown), from async code.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl NodeHandle {
    fn submit(&self, input: Input) -> Result<(), NodeError> {
        self.inputs.try_send(input).map_err(|e| match e {
            TrySendError::Full(_) => NodeError::Overloaded,
            TrySendError::Disconnected(_) => NodeError::Stopped,
        })
    }

    async fn wait<T>(&self, rx: oneshot::Receiver<Result<T, NodeError>>) -> Result<T, NodeError> {
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(NodeError::Stopped),
            Err(_) => Err(NodeError::Timeout),
        }
    }

    /// Proposes a command and waits until this node applies it: on the
    /// leader, or on a follower that hands it to the leader in a Raft
    /// message (see `Core::propose`).
    pub async fn propose(&self, kind: CommandKind) -> Result<Effect, NodeError> {
        self.propose_then(kind, None, |effect, _| effect).await
    }

    /// [`NodeHandle::propose`], in one trip to the raft thread: `check`
    /// may refuse the command first from this node's state (the same
    /// rejection apply would give, but nothing is proposed), and `after`
    /// reads the state once this node applied it.
    pub async fn propose_then<T: Send + 'static>(
        &self,
        kind: CommandKind,
        check: Option<ProposalCheck>,
        after: impl FnOnce(Effect, &State) -> T + Send + 'static,
    ) -> Result<T, NodeError> {
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let reply: ProposalReply = Box::new(move |result, state| {
            let _ = tx.send(result.map(|effect| after(effect, state)));
        });
        self.submit(Input::Propose { kind, check, reply })?;
        let result = self.wait(rx).await;
        if result.is_ok() {
            self.metrics.observe_proposal(started.elapsed());
        }
        result
    }

    /// The cluster events this member derived (see `events`).
    pub fn events(&self) -> Arc<EventLog> {
        self.events.clone()
    }

    /// The agent's metrics, as this node counts into them.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub async fn propose_membership(&self, change: MembershipChange) -> Result<Effect, NodeError> {
        let (tx, rx) = oneshot::channel();
        let reply: ProposalReply = Box::new(move |result, _| {
            let _ = tx.send(result);
        });
        self.submit(Input::Membership { change, reply })?;
        self.wait(rx).await
    }

    /// Runs `f` on the state once it reflects every write committed before
    /// the call (linearizable).
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&State, &CoreStatus) -> T + Send + 'static,
    ) -> Result<T, NodeError> {
        self.read_with(true, f).await
    }

    /// Runs `f` on the local state as applied so far (may be stale; works
    /// without a leader).
    pub async fn read_local<T: Send + 'static>(
        &self,
        f: impl FnOnce(&State, &CoreStatus) -> T + Send + 'static,
    ) -> Result<T, NodeError> {
        self.read_with(false, f).await
    }

    async fn read_with<T: Send + 'static>(
        &self,
        linearizable: bool,
        f: impl FnOnce(&State, &CoreStatus) -> T + Send + 'static,
    ) -> Result<T, NodeError> {
        let (reply, rx) = oneshot::channel();
        let f: ReadFn = Box::new(move |view| {
            let _ = reply.send(view.map(|(state, status)| f(state, status)));
        });
        self.submit(Input::Read { linearizable, f })?;
        self.wait(rx).await
    }

    /// Feeds messages received from peer `from` (bound to its certificate
    /// by the transport). The raft thread judges each message by the trust
    /// table (`crate::trust`) before raft-rs sees it. Dropped when the
    /// queue is full: Raft retransmits.
    pub fn step(&self, from: NodeId, messages: Vec<Message>) {
        let _ =
            self.submit(Input::Raft { from, sent_at_ms: None, messages, confirmation: None, queued: Instant::now() });
    }

    /// Feeds a frame from peer `from`, which it sent at `sent_at_ms` on its
    /// boot-wide monotonic clock (0: not carried): the leader confirms that
    /// time once a quorum has answered a heartbeat round it started after
    /// receiving it. `confirmation` is the sender's confirmation of this
    /// host's quorum contact, if the frame carries one; it counts only from
    /// the current leader (see `Input::Raft`). The second copy of a
    /// heartbeat or of its answer (both paths carry them) is dropped here,
    /// and a frame left with nothing to say with it (`copies`).
    pub fn step_frame(&self, from: NodeId, sent_at_ms: u64, mut messages: Vec<Message>, confirmation: Option<Contact>) {
        if self.copies.drop_copies(from, &mut messages, Instant::now()) && messages.is_empty() && confirmation.is_none()
        {
            return;
        }
        let sent_at_ms = (sent_at_ms != 0).then_some(sent_at_ms);
        let _ = self.submit(Input::Raft { from, sent_at_ms, messages, confirmation, queued: Instant::now() });
    }

    /// How old this host's newest quorum contact (confirmed by the leader,
    /// or its own read) is; `None` if it never had one since the agent
    /// started. The reconciler keeps it fresh with its own reads when
    /// confirmations stop, so it is what the fence sees.
    pub fn contact_age_ms(&self) -> Option<u64> {
        let contact = (*self.contact.borrow())?;
        Some(crate::clock::monotonic_ms().saturating_sub(contact.sent_at_ms))
    }

    /// Whether this host has quorum contact now: its newest is younger than
    /// `fence_after`. Without it, what it serves may be stale.
    pub fn has_quorum_contact(&self) -> bool {
        self.contact_age_ms().is_some_and(|age| age <= self.fence_after_ms)
    }

    /// How many voters this member keeps when it leads (`raft.voters`).
    pub fn voters_wanted(&self) -> usize {
        self.voters_wanted
    }

    /// Records a quorum contact found by this host itself (its own
    /// completed read index), so [`NodeHandle::contact_age_ms`] counts it.
    pub fn own_contact(&self, contact: Contact) {
        raise_contact(&self.contact, contact);
    }

    /// This host's newest quorum contact, as confirmed by the leader (or
    /// found as leader); `None` until the first.
    pub fn watch_contact(&self) -> watch::Receiver<Option<Contact>> {
        self.contact.subscribe()
    }

    pub fn report_snapshot(&self, peer: NodeId, delivered: bool) {
        let _ = self.inputs.try_send(Input::SnapshotReport { peer, delivered });
    }

    pub fn report_unreachable(&self, peer: NodeId) {
        let _ = self.inputs.try_send(Input::Unreachable(peer));
    }

    pub fn transfer_leader(&self, to: NodeId) -> Result<(), NodeError> {
        self.submit(Input::TransferLeader(to))
    }

    /// Before a clean stop: if this member leads, hands leadership to the
    /// most up-to-date voter and waits up to `within` for another leader.
    /// Without it the cluster has no leader for an election timeout, and
    /// every host's fence keeps counting meanwhile. Returns whether this
    /// member no longer leads.
    pub async fn step_down(&self, within: Duration) -> bool {
        let me = self.status.borrow().id;
        let leads = |s: &NodeStatus| s.leader.as_ref().is_some_and(|l| l.id == me);
        if !leads(&self.status.borrow()) {
            return true;
        }
        if self.submit(Input::StepDown).is_err() {
            return false;
        }
        let mut status = self.status.clone();
        tokio::time::timeout(within, status.wait_for(|s| !leads(s))).await.is_ok_and(|r| r.is_ok())
    }

    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }

    /// Waits until the raft thread ends (a storage failure, or the node
    /// shutting down). A status watch would say so too, but it wakes its
    /// task at every commit (the status carries the commit index), on
    /// every member: work on the path of every write's answer.
    pub async fn stopped(&self) {
        let mut alive = self.alive.clone();
        // Nothing is ever sent: `changed` ends only when the sender, held
        // by the raft thread, is dropped.
        while alive.changed().await.is_ok() {}
    }

    pub fn subscribe_effects(&self) -> broadcast::Receiver<AppliedEffect> {
        self.effects.subscribe()
    }

    pub fn addresses(&self) -> AddressBook {
        self.addresses.clone()
    }
}

/// `heard`: the peers the leader's failure detector heard from recently
/// (see `Duties::heard_recently`).
fn status_of(
    core: &Core,
    identity: &NodeIdentity,
    addresses: &AddressBook,
    removed: bool,
    heard: impl IntoIterator<Item = NodeId>,
) -> NodeStatus {
    let s = core.status();
    let leader = s.leader.map(|id| {
        let member = core.state().member(id);
        LeaderInfo {
            id,
            name: member.map_or_else(|| format!("{id}"), |m| m.name.clone()),
            address: member.map(|m| m.address.clone()).unwrap_or_else(|| {
                addresses.read().unwrap_or_else(|e| e.into_inner()).get(&id).cloned().unwrap_or_default()
            }),
        }
    });
    NodeStatus {
        id: identity.id,
        name: identity.name.clone(),
        cluster_id: identity.cluster_id,
        role: s.role,
        leader,
        term: s.term,
        commit: s.commit,
        applied: s.applied,
        voters: s.voters,
        learners: s.learners,
        active_peers: {
            let mut active: BTreeSet<NodeId> = s.progress.iter().filter(|p| p.recent_active).map(|p| p.id).collect();
            if s.role == Role::Leader {
                active.extend(heard.into_iter().filter(|id| s.progress.iter().any(|p| p.id == *id)));
            }
            active.into_iter().collect()
        },
        removed,
    }
}

struct SenderTransport<'a> {
    sender: &'a mut dyn PeerSender,
}

impl Transport for SenderTransport<'_> {
    fn send(&mut self, messages: Vec<Message>) {
        // Group by destination, keeping each peer's order.
        let mut by_peer: BTreeMap<NodeId, Vec<Message>> = BTreeMap::new();
        for m in messages {
            by_peer.entry(m.to).or_default().push(m);
        }
        for (to, batch) in by_peer {
            self.sender.send(to, batch);
        }
    }
}

/// Ticks a removed member sleeps between looking at its inputs.
const IDLE_TICKS: usize = 20;
/// The most membership changes a leader keeps waiting for the one in flight.
const WAITING_CHANGES_MAX: usize = 256;
/// The most ticks delivered at once after the raft thread was held up.
const CATCH_UP_TICKS_MAX: usize = 100;

/// The raft thread's clock: the ticks of `tick` that passed since `last`,
/// the end of the last tick delivered.
struct TickClock {
    tick: Duration,
    last: Instant,
}

impl TickClock {
    /// Takes the whole ticks that passed by `until` (none when `until` is
    /// earlier); after a stall of more than [`CATCH_UP_TICKS_MAX`] ticks,
    /// that many, and the rest of the time is dropped.
    fn take(&mut self, until: Instant) -> usize {
        let passed = (until.saturating_duration_since(self.last).as_nanos() / self.tick.as_nanos().max(1)) as usize;
        if passed > CATCH_UP_TICKS_MAX {
            self.last = until;
            CATCH_UP_TICKS_MAX
        } else {
            self.last += self.tick * passed as u32;
            passed
        }
    }

    /// Drops the time that passed by `until`: the next tick ends a whole
    /// tick after it.
    fn skip_to(&mut self, until: Instant) {
        self.last = self.last.max(until);
    }
}

/// One turn of the raft thread's loop.
#[derive(Default)]
struct Turn {
    /// The thread runs a tick or more later than it should have (an
    /// overloaded host, a suspended process), and the turn before did not
    /// hold: the leader's heartbeats that came meanwhile may still be on
    /// their way through this agent (its transport's threads were held up
    /// too), so the tick that would start an election waits for the next
    /// turn, a tick later. Once: the next turn delivers it whatever
    /// happens, so an election is delayed by at most a turn after the
    /// thread catches up. The leader holds nothing back: its heartbeats
    /// must go out, and its quorum check already sees the answers that
    /// came before it (ticks and messages reach raft-rs in order).
    hold: bool,
    /// An election's tick was held back.
    held: bool,
    /// Time passed: at least one tick.
    ticked: bool,
    /// One of them was the leader's heartbeat.
    beat: bool,
}

struct PendingRead {
    f: ReadFn,
    deadline: Instant,
    /// When its read index was (last) asked for.
    asked: Instant,
}

/// A read index not answered after this long is asked for again under a
/// new context: raft-rs never resends a follower's read-index request, so
/// one lost on the way to the leader (a peer stream that broke with it in
/// flight) would otherwise wait out the whole request timeout.
const READ_RETRY: Duration = Duration::from_secs(1);

struct RaftThread {
    core: Core,
    identity: NodeIdentity,
    options: NodeOptions,
    sender: Box<dyn PeerSender>,
    addresses: AddressBook,
    status: watch::Sender<NodeStatus>,
    effects: broadcast::Sender<AppliedEffect>,
    proposals: BTreeMap<ProposalId, (ProposalReply, Instant)>,
    /// As leader: membership changes waiting for the one in flight, in
    /// order, with their deadlines (see `propose_membership`).
    waiting_changes: VecDeque<(MembershipChange, ProposalReply, Instant)>,
    /// Reads waiting for their read index: context -> read.
    reads: BTreeMap<u64, PendingRead>,
    /// Reads whose index is known, waiting for the applied index.
    waiting_reads: VecDeque<(u64, PendingRead)>,
    next_read: u64,
    removed: bool,
    duties: leader::Duties,
    /// The leader last seen, to count leader changes.
    last_leader: Option<NodeId>,
    events: Arc<EventLog>,
    /// As leader: the heartbeat rounds that confirm every member's
    /// quorum contact (see the `contact` module).
    rounds: contact::ContactRounds,
    /// This host's newest quorum contact (shared with the handle).
    contact: Arc<watch::Sender<Option<Contact>>>,
    /// Dropped with the thread's state when it ends ([`NodeHandle::stopped`]).
    _alive: watch::Sender<()>,
}

/// Raises the contact in `watch` to `contact` (each field only grows).
fn raise_contact(watch: &watch::Sender<Option<Contact>>, contact: Contact) {
    watch.send_if_modified(|known| {
        let newer = known.map_or(contact, |k| k.max(contact));
        let changed = *known != Some(newer);
        *known = Some(newer);
        changed
    });
}

impl RaftThread {
    fn run(&mut self, rx: mpsc::Receiver<Input>) -> Result<(), StorageError> {
        let tick = self.options.tick;
        // Leader duties run every check interval: the leader wakes for them.
        let duty_ticks = self.duties.check_interval_ms().div_ceil(tick.as_millis().max(1) as u64).max(1) as usize;
        let mut clock = TickClock { tick, last: Instant::now() };
        // The last turn held back a tick that acts on silence.
        let mut held = false;
        loop {
            // Sleep until a tick would do something (a heartbeat, a quorum
            // check, an election, the leader's duties) or an input comes, not
            // through every tick: at rest that spares most wake-ups.
            let due = if self.removed {
                IDLE_TICKS
            } else if self.core.is_leader() {
                self.core.ticks_until_due().min(duty_ticks)
            } else {
                self.core.ticks_until_due()
            };
            let wake_at = clock.last + tick * due as u32;
            let mut turn = Turn::default();
            match rx.recv_timeout(wake_at.saturating_duration_since(Instant::now())) {
                Ok(Input::Shutdown) => return self.core.write_state(),
                Ok(input) => {
                    let now = Instant::now();
                    // Behind: this thread runs a tick or more later than it
                    // should have (the host is overloaded, or it was
                    // suspended). See `Turn::hold`.
                    let expected = input.queued().map_or(wake_at, |q| q.min(wake_at));
                    turn.hold = !held && now.saturating_duration_since(expected) >= tick;
                    self.tick_then_handle(&mut clock, &mut turn, input);
                    // Batch: take everything already queued.
                    while let Ok(input) = rx.try_recv() {
                        if matches!(input, Input::Shutdown) {
                            self.process_ready()?;
                            return self.core.write_state();
                        }
                        self.tick_then_handle(&mut clock, &mut turn, input);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    turn.hold = !held && Instant::now().saturating_duration_since(wake_at) >= tick;
                }
                Err(RecvTimeoutError::Disconnected) => return self.core.write_state(),
            }
            let now = Instant::now();
            self.deliver_ticks(&mut clock, &mut turn, now);
            held = turn.held;
            if turn.ticked && !self.removed {
                // Each heartbeat round also confirms every member's
                // quorum contact: its read index goes out with it.
                if turn.beat && self.core.is_leader() {
                    let ctx = self.rounds.ask(crate::clock::monotonic_ms());
                    self.core.read_index(ctx);
                }
                self.leader_duties();
            }
            if turn.ticked {
                self.expire(now);
            }
            self.process_ready()?;
            if self.propose_waiting_change() {
                self.process_ready()?;
            }
            if turn.ticked {
                // The applied state `process_ready` deferred, at most a tick
                // behind the log (see `consensus`).
                if let Err(e) = self.core.write_state() {
                    tracing::error!(error = %e, "storage failed; stopping this member (systemd restarts it)");
                    self.options.metrics.disk_error("store");
                    return Err(e);
                }
            }
        }
    }

    /// Handles `input` after the ticks that passed before it was queued:
    /// ticks and peer messages reach raft-rs in the order they happened, so
    /// a heartbeat that waited in the queue resets the election timeout
    /// after the ticks before it, not before them.
    fn tick_then_handle(&mut self, clock: &mut TickClock, turn: &mut Turn, input: Input) {
        if let Some(queued) = input.queued() {
            self.deliver_ticks(clock, turn, queued);
        }
        self.handle(input);
    }

    /// Delivers the ticks that passed by `until` (at most
    /// [`CATCH_UP_TICKS_MAX`]). In a turn that holds ([`Turn::hold`]) a
    /// member that does not lead stops before the tick that would start
    /// its election and drops the time left.
    fn deliver_ticks(&mut self, clock: &mut TickClock, turn: &mut Turn, until: Instant) {
        let passed = clock.take(until);
        if passed == 0 {
            return;
        }
        turn.ticked = true;
        if self.removed {
            return;
        }
        let mut ticks = passed;
        if turn.hold
            && let Some(election) = self.core.ticks_until_election()
            && ticks >= election
        {
            tracing::debug!(
                passed,
                election,
                "the raft thread runs late: an election waits a tick for heartbeats on their way"
            );
            ticks = election - 1;
            clock.skip_to(until);
            turn.held = true;
        }
        turn.beat |= self.core.is_leader() && ticks >= self.core.ticks_until_heartbeat();
        for _ in 0..ticks {
            self.core.tick();
        }
    }

    fn handle(&mut self, input: Input) {
        if self.removed {
            match input {
                Input::Propose { reply, .. } | Input::Membership { reply, .. } => {
                    reply(Err(NodeError::NotMember), self.core.state());
                }
                Input::Read { f, .. } => f(Err(NodeError::NotMember)),
                _ => {}
            }
            return;
        }
        match input {
            Input::Propose { kind, check, reply } => {
                // A follower would hand it to the leader, which takes
                // these from nobody but itself (`crate::trust`).
                if trust::leader_only(&kind) && !self.core.is_leader() {
                    let leader = self.status.borrow().leader.clone();
                    let error = if leader.is_some() { NodeError::NotLeader { leader } } else { NodeError::NoLeader };
                    reply(Err(error), self.core.state());
                    return;
                }
                if let Some(rejection) = check.and_then(|check| check(self.core.state())) {
                    reply(Err(NodeError::Rejected(rejection)), self.core.state());
                    return;
                }
                let command = Command { at_unix_ms: now_unix_ms(), kind };
                match self.core.propose(&command) {
                    Ok(id) => {
                        self.proposals.insert(id, (reply, Instant::now() + self.options.request_timeout));
                    }
                    Err(e) => reply(Err(self.propose_error(e)), self.core.state()),
                }
            }
            Input::Membership { change, reply } => self.propose_membership(change, reply),
            Input::Read { linearizable: false, f } => {
                let status = self.core.status();
                f(Ok((self.core.state(), &status)));
            }
            Input::Read { linearizable: true, f } => {
                if self.core.leader().is_none() {
                    f(Err(NodeError::NoLeader));
                    return;
                }
                self.next_read += 1;
                let ctx = self.next_read;
                self.core.read_index(ctx.to_le_bytes().to_vec());
                let now = Instant::now();
                self.reads.insert(ctx, PendingRead { f, deadline: now + self.options.request_timeout, asked: now });
            }
            Input::Raft { from, sent_at_ms, messages, confirmation, .. } => {
                let now_ms = crate::clock::monotonic_ms();
                if let Some(sent_at_ms) = sent_at_ms {
                    self.rounds.heard(from, sent_at_ms);
                }
                let mut view = self.trust_view();
                for message in messages {
                    // Exact: each message is judged after the ones before it.
                    self.core.refresh_trust_view(&mut view);
                    match trust::raft_message(&view, from, &message) {
                        trust::Verdict::Step => {}
                        trust::Verdict::Drop(why) => {
                            tracing::debug!(from, why, "dropped a peer message");
                            continue;
                        }
                        trust::Verdict::Refuse(refusal) => {
                            self.options.metrics.peer_messages_refused.inc();
                            tracing::warn!(from, kind = ?message.get_msg_type(), %refusal, "refused a peer message");
                            continue;
                        }
                    }
                    self.duties.heard_from(message.from, now_ms);
                    if let Err(e) = self.core.step(message) {
                        tracing::debug!(error = %e, "dropped a peer message");
                    }
                }
                if let Some(contact) = confirmation {
                    self.on_confirmation(from, contact, now_ms);
                }
            }
            Input::SnapshotReport { peer, delivered } => self.core.report_snapshot(peer, delivered),
            Input::Unreachable(peer) => self.core.report_unreachable(peer),
            Input::TransferLeader(to) => self.core.transfer_leader(to),
            Input::StepDown => {
                if self.core.is_leader() {
                    match self.successor() {
                        Some(to) => {
                            tracing::info!(to, "stopping: handing leadership to the most up-to-date voter");
                            self.core.transfer_leader(to);
                        }
                        None => tracing::info!("stopping as leader: no other active voter to hand leadership to"),
                    }
                }
            }
            Input::Shutdown => {}
        }
    }

    /// A peer confirmed this host's quorum contact. The fence trusts it only
    /// from the leader of this node's current term (after the frame that
    /// carried it was stepped: its heartbeat may have just made the sender
    /// leader), never for a time later than this host's own clock (the
    /// time is this host's own send time echoed back: a later one is
    /// forged), and never for a removed member.
    fn on_confirmation(&mut self, from: NodeId, contact: Contact, now_ms: u64) {
        let leader = self.core.leader();
        if self.removed || leader != Some(from) || from == self.identity.id {
            tracing::debug!(from, ?leader, "ignored a contact confirmation from a member that is not the leader");
            return;
        }
        if contact.sent_at_ms > now_ms {
            tracing::warn!(
                from,
                sent_at_ms = contact.sent_at_ms,
                now_ms,
                "ignored a contact confirmation for a time later than this host's clock"
            );
            return;
        }
        raise_contact(&self.contact, contact);
    }

    fn propose_membership(&mut self, change: MembershipChange, reply: ProposalReply) {
        // The leader does not remove itself: it hands leadership to the
        // most up-to-date voter first and the request is retried there.
        if let MembershipChange::Remove { id } = change
            && id == self.identity.id
            && self.core.is_leader()
        {
            match self.successor() {
                Some(to) => {
                    tracing::info!(to, "transferring leadership before removing this member");
                    self.core.transfer_leader(to);
                    reply(Err(NodeError::NotLeader { leader: None }), self.core.state());
                }
                None => {
                    reply(Err(NodeError::Rejected(Rejection::LastVoter(id))), self.core.state());
                }
            }
            return;
        }
        let deadline = Instant::now() + self.options.request_timeout;
        // raft-rs takes one membership change at a time and drops another
        // proposed before it applies: a host joining while others do (a
        // fleet booting at once) would be refused and back off. The leader
        // queues them instead and proposes each once the one before applied.
        if self.core.is_leader() && (self.core.has_pending_conf() || !self.waiting_changes.is_empty()) {
            if self.waiting_changes.len() >= WAITING_CHANGES_MAX {
                reply(Err(NodeError::Overloaded), self.core.state());
            } else {
                self.waiting_changes.push_back((change, reply, deadline));
            }
            return;
        }
        self.propose_membership_now(&change, reply, deadline);
    }

    fn propose_membership_now(&mut self, change: &MembershipChange, reply: ProposalReply, deadline: Instant) {
        match self.core.propose_membership(change, now_unix_ms()) {
            Ok(id) => {
                self.proposals.insert(id, (reply, deadline));
            }
            Err(e) => reply(Err(self.propose_error(e)), self.core.state()),
        }
    }

    /// Proposes the first waiting membership change once none is in
    /// flight; a member that no longer leads sends them all back (their
    /// proposers ask the new leader). Whether it proposed one.
    fn propose_waiting_change(&mut self) -> bool {
        if self.waiting_changes.is_empty() {
            return false;
        }
        if !self.core.is_leader() {
            for (_, reply, _) in std::mem::take(&mut self.waiting_changes) {
                reply(
                    Err(self.propose_error(ProposeError::NotLeader { leader: self.core.leader() })),
                    self.core.state(),
                );
            }
            return false;
        }
        if self.core.has_pending_conf() {
            return false;
        }
        let Some((change, reply, deadline)) = self.waiting_changes.pop_front() else { return false };
        self.propose_membership_now(&change, reply, deadline);
        true
    }

    /// The voter a leader hands leadership to: the most up-to-date other
    /// voter it heard from recently.
    fn successor(&self) -> Option<NodeId> {
        let me = self.identity.id;
        let status = self.core.status();
        let voters = status.progress.iter().filter(|p| p.id != me && !p.learner);
        // raft-rs clears `recent_active` at every quorum check until each
        // peer's next answer (up to a heartbeat later): an active voter
        // first, else the most up-to-date voter at all.
        voters
            .clone()
            .filter(|p| p.recent_active)
            .max_by_key(|p| p.matched)
            .map(|p| p.id)
            .or_else(|| voters.max_by_key(|p| p.matched).map(|p| p.id))
    }

    fn propose_error(&self, e: ProposeError) -> NodeError {
        match e {
            ProposeError::NotLeader { leader: None } => NodeError::NoLeader,
            ProposeError::NotLeader { .. } => NodeError::NotLeader { leader: self.status.borrow().leader.clone() },
            ProposeError::TooLarge { .. } => NodeError::TooLarge(e.to_string()),
            ProposeError::Dropped => NodeError::Dropped,
        }
    }

    /// Fails requests whose deadline passed.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<ProposalId> =
            self.proposals.iter().filter(|(_, (_, deadline))| *deadline <= now).map(|(id, _)| *id).collect();
        for id in expired {
            if let Some((reply, _)) = self.proposals.remove(&id) {
                self.core.forget(id);
                reply(Err(NodeError::Timeout), self.core.state());
            }
        }
        // Never proposed: not applied.
        while let Some((_, _, deadline)) = self.waiting_changes.front()
            && *deadline <= now
        {
            if let Some((_, reply, _)) = self.waiting_changes.pop_front() {
                reply(Err(NodeError::Overloaded), self.core.state());
            }
        }
        let expired: Vec<u64> = self.reads.iter().filter(|(_, r)| r.deadline <= now).map(|(k, _)| *k).collect();
        for key in expired {
            if let Some(read) = self.reads.remove(&key) {
                (read.f)(Err(NodeError::Timeout));
            }
        }
        if self.core.leader().is_some() {
            let stale: Vec<u64> =
                self.reads.iter().filter(|(_, r)| r.asked + READ_RETRY <= now).map(|(k, _)| *k).collect();
            for key in stale {
                if let Some(mut read) = self.reads.remove(&key) {
                    self.next_read += 1;
                    let ctx = self.next_read;
                    self.core.read_index(ctx.to_le_bytes().to_vec());
                    read.asked = now;
                    self.reads.insert(ctx, read);
                }
            }
        }
    }

    /// What this member knows for the trust table: its configuration (a
    /// joiner before its first snapshot: the members its admission named,
    /// in the address book) and, exactly, its term, leader and log.
    fn trust_view(&self) -> trust::View {
        let mut view = self.core.trust_view();
        if view.configuration.is_empty() {
            view.configuration.extend(self.addresses.read().unwrap_or_else(|e| e.into_inner()).keys());
        }
        view
    }

    fn leader_duties(&mut self) {
        self.duties.check(&mut self.core, crate::clock::monotonic_ms(), now_unix_ms());
    }

    fn process_ready(&mut self) -> Result<(), StorageError> {
        let mut changed = false;
        while self.core.has_ready() {
            changed = true;
            let out = {
                let mut transport = SenderTransport { sender: self.sender.as_mut() };
                self.core.handle_ready(&mut transport)
            };
            let out = match out {
                Ok(out) => out,
                Err(e) => {
                    tracing::error!(error = %e, "storage failed; stopping this member (systemd restarts it)");
                    self.options.metrics.disk_error("store");
                    return Err(e);
                }
            };
            if let Some(role) = out.role {
                let leader = role
                    .leader
                    .map(|id| self.core.state().member(id).map_or_else(|| id.to_string(), |m| m.name.clone()));
                tracing::info!(
                    role = role.role.as_str(),
                    leader = leader.as_deref().unwrap_or("none"),
                    term = role.term,
                    "raft role changed"
                );
                if let Some(leader) = role.leader
                    && role.leader != self.last_leader
                {
                    self.last_leader = role.leader;
                    self.options.metrics.leader_changes.inc();
                    // The event comes from the new leader's `LeaderElected`
                    // entry, the same on every member (`Duties::check`).
                    tracing::debug!(leader, term = role.term, "observed a new leader");
                }
                if role.role == Role::Leader {
                    self.duties.became_leader(crate::clock::monotonic_ms());
                } else {
                    self.duties.lost_leadership();
                    self.rounds.lost_leadership();
                }
            }
            if let Some(index) = out.snapshot_installed {
                tracing::info!(index, "installed a snapshot from the leader");
            }
            let mut members_changed = out.snapshot_installed.is_some();
            for applied in out.applied {
                if let Outcome::Applied(Ok(effect)) = &applied.outcome {
                    members_changed |= matches!(
                        effect,
                        Effect::MemberAdded { .. } | Effect::MemberRemoved { .. } | Effect::MemberChanged { .. }
                    );
                    if let Effect::MemberRemoved { node, .. } = effect {
                        self.rounds.forget(*node);
                        if *node == self.identity.id {
                            tracing::warn!("this member was removed from the cluster; it stops taking part");
                            self.removed = true;
                        }
                    }
                    // The entry's own time, not this member's clock now: a
                    // member catching up stamps what happened when it did.
                    let at_unix_ms = applied.at_unix_ms;
                    for event in events::events_of(effect, self.core.state()) {
                        self.events.record(applied.index, at_unix_ms, event);
                    }
                    let _ =
                        self.effects.send(AppliedEffect { index: applied.index, at_unix_ms, effect: effect.clone() });
                }
                if let Some(id) = applied.proposal
                    && self.duties.resolved(id, &applied.outcome)
                {
                    continue;
                }
                if let Some(id) = applied.proposal
                    && let Some((reply, _)) = self.proposals.remove(&id)
                {
                    let result = match applied.outcome {
                        Outcome::Applied(Ok(effect)) => Ok(effect),
                        Outcome::Applied(Err(rejection)) => Err(NodeError::Rejected(rejection)),
                        Outcome::Dropped => Err(NodeError::Dropped),
                        Outcome::Unknown => Err(NodeError::Unknown),
                    };
                    reply(result, self.core.state());
                }
            }
            for (ctx, index) in out.reads {
                if let Some(round) = contact::round_of(&ctx) {
                    if let Some((own, confirmed)) = self.rounds.resolved(round, index) {
                        for (peer, contact) in confirmed {
                            self.sender.confirm_contact(peer, contact);
                        }
                        raise_contact(&self.contact, own);
                    }
                    continue;
                }
                let Ok(bytes) = <[u8; 8]>::try_from(ctx.as_slice()) else { continue };
                if let Some(read) = self.reads.remove(&u64::from_le_bytes(bytes)) {
                    self.waiting_reads.push_back((index, read));
                }
            }
            if members_changed {
                let mut book = self.addresses.write().unwrap_or_else(|e| e.into_inner());
                for member in self.core.state().members().values() {
                    book.insert(member.id, member.address.clone());
                }
            }
        }
        // Serve reads whose index has been applied.
        let applied = self.core.store().applied();
        if !self.waiting_reads.is_empty() {
            let status = self.core.status();
            let mut still = VecDeque::new();
            while let Some((index, read)) = self.waiting_reads.pop_front() {
                if index <= applied {
                    (read.f)(Ok((self.core.state(), &status)));
                } else {
                    still.push_back((index, read));
                }
            }
            self.waiting_reads = still;
        }
        if changed {
            let heard = self.duties.heard_recently(crate::clock::monotonic_ms());
            let status = status_of(&self.core, &self.identity, &self.addresses, self.removed, heard);
            // The status last published holds the learners `sender` was last given.
            if self.status.borrow().learners != status.learners {
                self.sender.set_learners(&status.learners);
            }
            self.status.send_if_modified(|old| {
                if *old == status {
                    false
                } else {
                    *old = status;
                    true
                }
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_clock_takes_whole_ticks_keeps_the_fraction_and_drops_long_stalls() {
        let start = Instant::now();
        let tick = Duration::from_millis(25);
        let mut clock = TickClock { tick, last: start };
        assert_eq!(clock.take(start + Duration::from_millis(24)), 0);
        assert_eq!(clock.take(start + Duration::from_millis(60)), 2);
        // The 10 ms past the second tick count towards the third.
        assert_eq!(clock.take(start + Duration::from_millis(75)), 1);
        // An earlier instant (a frame queued before the last tick) takes none.
        assert_eq!(clock.take(start + Duration::from_millis(30)), 0);
        // A stall of more than CATCH_UP_TICKS_MAX ticks: that many, the rest dropped.
        let late = start + tick * (CATCH_UP_TICKS_MAX as u32 + 50);
        assert_eq!(clock.take(late), CATCH_UP_TICKS_MAX);
        assert_eq!(clock.take(late + Duration::from_millis(24)), 0);
        // Held back: the time so far is dropped, the next tick ends a tick later.
        clock.skip_to(late + Duration::from_millis(40));
        assert_eq!(clock.take(late + Duration::from_millis(64)), 0);
        assert_eq!(clock.take(late + Duration::from_millis(65)), 1);
    }
}

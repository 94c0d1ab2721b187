//! Peer traffic between members: the transport the raft thread sends
//! through ([`PeerTransport`], a [`PeerSender`]) and the `Peer` service that
//! receives it ([`PeerService`]).
//!
//! Sending never blocks the raft thread: [`PeerSender::send`] only appends
//! to a per-peer queue, and one task per peer drains it, several messages
//! to one batch. Batches go as frames on one long-lived `Peer.RaftStream`
//! call per peer (a call per batch costs several times more CPU, which at
//! rest is most of what an agent does); to a member that predates that
//! call, one `Peer.Raft` call per batch. A queue holds at most
//! [`PEER_QUEUE_MAX`] messages and drops the oldest beyond that: Raft
//! retransmits whatever still matters, and a peer that is down must not
//! make us hold unbounded memory. A stream that breaks (or a failed call)
//! loses what was in it, tells Raft the peer is unreachable (so the leader
//! stops pipelining to it) and backs off before the next.
//!
//! The small, loss-tolerant messages (heartbeats and their answers, votes,
//! append acknowledgements, read-index traffic) and the quorum-contact
//! confirmations also go as QUIC datagrams when this agent has a datagram
//! path (`api::datagram`): one task per peer drains a second queue onto its
//! QUIC connection, so a TCP stream stalled by packet loss delays neither
//! heartbeats nor contact.
//!
//! Snapshots travel separately, streamed in [`SNAPSHOT_CHUNK_BYTES`] chunks
//! through `Peer.Snapshot`, and their outcome is always reported with
//! `report_snapshot`: a leader that never hears back keeps the follower in
//! snapshot state forever and never replicates to it again.
//!
//! The receiving side trusts nothing it is sent: the sender is bound to
//! its certificate, every message is judged by the trust table
//! (`crate::trust`) before anything is stepped, cluster id and batch
//! sizes are checked, and a snapshot is received only from the leader, one
//! at a time, within deadlines, its total size bounded, each chunk's
//! CRC-32C checked before it is assembled and the whole snapshot's SHA-256
//! before it is handed to Raft.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::context::{ApiError, Context, Dialer, GRPC_MESSAGE_BYTES_MAX, Membership, Remote, is_forwarded};
use super::datagram::{self, DatagramPath};
use super::gate::speaker;
use super::pb;
use super::pb::peer_client::PeerClient;
use super::status::from_rejection;
use crate::names;
use crate::node::{AddressBook, Contact, NodeHandle, PeerSender};
use crate::state::{CommandKind, MembershipChange, NodeId, codec, limits};
use crate::trust::{self, Speaker, Verdict};

/// Messages queued for one peer before the oldest are dropped.
pub const PEER_QUEUE_MAX: usize = 4096;
/// Raft messages in one `Peer.Raft` call, sent or accepted.
pub const RAFT_BATCH_MESSAGES_MAX: usize = 1024;
/// Encoded bytes of messages in one `Peer.Raft` call the sender aims for;
/// stays well below [`GRPC_MESSAGE_BYTES_MAX`] (one append message carries
/// at most 1 MiB of entries).
const RAFT_BATCH_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Bytes of snapshot data per `SnapshotChunk`.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;
/// The largest snapshot a member accepts.
pub const SNAPSHOT_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;
/// Memory reserved up front for an incoming snapshot, whatever size it
/// claims; beyond this the buffer grows as data really arrives.
const SNAPSHOT_PREALLOC_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Transfers of one snapshot while the receiver finds it damaged.
pub const SNAPSHOT_SEND_ATTEMPTS_MAX: usize = 3;
/// Batches waiting to go onto a peer's stream; beyond this, messages wait
/// in the peer's queue (where the oldest are dropped when it is full).
const STREAM_BATCHES_QUEUED: usize = 4;
/// One `Peer.Raft` call, or one batch waiting to go onto a peer's stream;
/// Raft's own timeouts are longer than this.
const RAFT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// One snapshot transfer, all chunks.
const SNAPSHOT_CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// A snapshot being received is dropped when the whole takes longer than
/// the sender would wait ...
const SNAPSHOT_RECEIVE_TIMEOUT: Duration = SNAPSHOT_CALL_TIMEOUT;
/// ... or when its next chunk takes longer than this (a stalled sender
/// must not hold the one slot for snapshots).
const SNAPSHOT_CHUNK_TIMEOUT: Duration = Duration::from_secs(15);
/// Messages queued for one peer's datagrams before the oldest are dropped
/// (they are copies: the gRPC queue has them too).
const DATAGRAM_QUEUE_MAX: usize = 1024;
/// Pause after a failed QUIC dial, doubled up to the max while failures go
/// on (what is queued meanwhile is dropped: gRPC carries it).
const DATAGRAM_REDIAL_MIN: Duration = Duration::from_millis(200);
const DATAGRAM_REDIAL_MAX: Duration = Duration::from_secs(5);
/// A peer unreachable over UDP for this long while TCP reaches it is warned
/// about once (a peer still starting, or down, is not).
const DATAGRAM_WARN_AFTER: Duration = Duration::from_secs(10);
/// The shortest time between two batches to a learner: what is queued
/// for it meanwhile goes in one batch, and its appends are merged into one
/// message, so that under load a learner decodes, syncs and answers once
/// per pace rather than once per commit (nothing waits on a learner's
/// acknowledgement; its contact confirmation is this much later at most,
/// against a `fence_after` of seconds). A batch after a quiet spell goes at
/// once.
pub const LEARNER_PACE: Duration = Duration::from_millis(20);
/// The most entry bytes merged into one append message: raft-rs's own
/// bound per message (`max_size_per_msg`), so a receiver sees nothing
/// larger than it would anyway.
const MERGED_APPEND_BYTES_MAX: usize = 1024 * 1024;
/// Pause after a failed send, doubled up to the max while failures go on.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Short: a restarted peer hears nothing from us until the pause ends (at
/// 1 s it cost a restarted member of 100,000 VMs 0.6 s of its restart), and
/// a failed attempt costs one connection attempt.
const BACKOFF_MAX: Duration = Duration::from_millis(200);

/// Who sends: stamped on every batch and chunk.
#[derive(Debug, Clone)]
pub struct Sender {
    pub id: NodeId,
    pub cluster_id: u64,
    pub address: String,
}

struct PeerQueue {
    messages: Mutex<VecDeque<Message>>,
    /// A confirmation of the peer's quorum contact, to ride the next batch.
    confirmation: Mutex<Option<Contact>>,
    ready: Notify,
    /// Copies of the messages that also go as datagrams, and the
    /// confirmation for the next datagram.
    datagrams: Mutex<VecDeque<Message>>,
    datagram_confirmation: Mutex<Option<Contact>>,
    datagram_ready: Notify,
    /// When a batch last went onto the gRPC path (monotonic ms).
    tcp_sent_at_ms: AtomicU64,
    /// The least time between two batches on the gRPC path, ms (0: none;
    /// [`LEARNER_PACE`] for a learner).
    pace_ms: AtomicU64,
}

struct Shared {
    me: Sender,
    addresses: AddressBook,
    dialer: Dialer,
    /// The second path for small messages, if this agent has one.
    datagrams: Option<Arc<DatagramPath>>,
    /// [`DATAGRAM_WARN_AFTER`] (tests shorten it), ms.
    datagram_warn_after_ms: AtomicU64,
    /// The node to report to; set once it runs (the raft thread may send
    /// before `Node::start` has returned its handle).
    node: watch::Receiver<Option<NodeHandle>>,
    closed: AtomicBool,
}

impl Shared {
    fn address_of(&self, peer: NodeId) -> Option<String> {
        self.addresses.read().unwrap_or_else(|e| e.into_inner()).get(&peer).cloned()
    }

    fn report_unreachable(&self, peer: NodeId) {
        if let Some(node) = self.node.borrow().as_ref() {
            node.report_unreachable(peer);
        }
    }

    /// Reports a snapshot's outcome, waiting for the node if it is not
    /// attached yet: this report must never be lost.
    async fn report_snapshot(&self, peer: NodeId, delivered: bool) {
        let mut node = self.node.clone();
        if let Ok(node) = node.wait_for(Option::is_some).await
            && let Some(node) = node.as_ref()
        {
            node.report_snapshot(peer, delivered);
        }
    }
}

/// The raft thread's [`PeerSender`]: per-peer queues drained by tokio tasks.
pub struct PeerTransport {
    shared: Arc<Shared>,
    peers: BTreeMap<NodeId, Arc<PeerQueue>>,
    /// The members that do not vote, paced ([`LEARNER_PACE`]).
    learners: BTreeSet<NodeId>,
    /// The pace for learners (tests change it).
    learner_pace: Duration,
    runtime: tokio::runtime::Handle,
}

/// Attaches the running node to a [`PeerTransport`] for its reports.
pub struct TransportLink(watch::Sender<Option<NodeHandle>>);

impl TransportLink {
    pub fn attach(&self, node: NodeHandle) {
        self.0.send_replace(Some(node));
    }
}

impl PeerTransport {
    /// A transport whose tasks run on `runtime`; small messages go as
    /// datagrams on `datagrams` too, if given.
    pub fn new(
        me: Sender,
        addresses: AddressBook,
        dialer: Dialer,
        datagrams: Option<Arc<DatagramPath>>,
        runtime: tokio::runtime::Handle,
    ) -> (Self, TransportLink) {
        let (node_tx, node_rx) = watch::channel(None);
        let shared = Arc::new(Shared {
            me,
            addresses,
            dialer,
            datagrams,
            datagram_warn_after_ms: AtomicU64::new(DATAGRAM_WARN_AFTER.as_millis() as u64),
            node: node_rx,
            closed: AtomicBool::new(false),
        });
        let transport = PeerTransport {
            shared,
            peers: BTreeMap::new(),
            learners: BTreeSet::new(),
            learner_pace: LEARNER_PACE,
            runtime,
        };
        (transport, TransportLink(node_tx))
    }

    /// The least time between two batches to a learner (default [`LEARNER_PACE`]).
    pub fn with_learner_pace(mut self, pace: Duration) -> Self {
        self.learner_pace = pace;
        self
    }

    fn pace_of(&self, peer: NodeId) -> u64 {
        if self.learners.contains(&peer) { self.learner_pace.as_millis() as u64 } else { 0 }
    }

    fn queue(&mut self, peer: NodeId) -> Arc<PeerQueue> {
        let pace_ms = self.pace_of(peer);
        let queue = self.peers.entry(peer).or_insert_with(|| {
            let queue = Arc::new(PeerQueue {
                messages: Mutex::new(VecDeque::new()),
                confirmation: Mutex::new(None),
                ready: Notify::new(),
                datagrams: Mutex::new(VecDeque::new()),
                datagram_confirmation: Mutex::new(None),
                datagram_ready: Notify::new(),
                tcp_sent_at_ms: AtomicU64::new(0),
                pace_ms: AtomicU64::new(pace_ms),
            });
            self.runtime.spawn(run_peer(self.shared.clone(), peer, queue.clone()));
            if let Some(path) = &self.shared.datagrams {
                self.runtime.spawn(run_datagrams(self.shared.clone(), path.clone(), peer, queue.clone()));
            }
            queue
        });
        queue.clone()
    }
}

impl PeerSender for PeerTransport {
    fn send(&mut self, to: NodeId, messages: Vec<Message>) {
        let mut plain = Vec::with_capacity(messages.len());
        for message in messages {
            if message.get_msg_type() == MessageType::MsgSnapshot {
                self.runtime.spawn(send_snapshot(self.shared.clone(), to, message));
            } else {
                plain.push(message);
            }
        }
        if plain.is_empty() {
            return;
        }
        let queue = self.queue(to);
        if self.shared.datagrams.is_some() {
            let small: Vec<Message> = plain.iter().filter(|m| datagram::rides_datagrams(m)).cloned().collect();
            if !small.is_empty() {
                let mut queued = queue.datagrams.lock().unwrap_or_else(|e| e.into_inner());
                queued.extend(small);
                let excess = queued.len().saturating_sub(DATAGRAM_QUEUE_MAX);
                queued.drain(..excess);
                drop(queued);
                queue.datagram_ready.notify_one();
            }
        }
        {
            let mut queued = queue.messages.lock().unwrap_or_else(|e| e.into_inner());
            queued.extend(plain);
            let excess = queued.len().saturating_sub(PEER_QUEUE_MAX);
            if excess > 0 {
                queued.drain(..excess);
                tracing::debug!(peer = to, dropped = excess, "peer queue full; dropped the oldest messages");
            }
        }
        queue.ready.notify_one();
    }

    /// Waits for the next batch to `to` (normally the next heartbeat): a
    /// frame of its own would cost what confirming saves.
    fn confirm_contact(&mut self, to: NodeId, contact: Contact) {
        let queue = self.queue(to);
        for slot in [&queue.confirmation, &queue.datagram_confirmation] {
            let mut confirmation = slot.lock().unwrap_or_else(|e| e.into_inner());
            *confirmation = Some(confirmation.map_or(contact, |v| v.max(contact)));
        }
    }

    fn set_learners(&mut self, learners: &[NodeId]) {
        self.learners = learners.iter().copied().collect();
        for (&peer, queue) in &self.peers {
            queue.pace_ms.store(self.pace_of(peer), Ordering::Relaxed);
        }
    }
}

impl Drop for PeerTransport {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        for queue in self.peers.values() {
            queue.ready.notify_one();
            queue.datagram_ready.notify_one();
        }
    }
}

pub(crate) fn peer_client(channel: Channel) -> PeerClient<Channel> {
    PeerClient::new(channel)
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
}

/// Takes the next batch off `queue`: up to the message and byte bounds,
/// consecutive appends merged ([`merge_appends`]).
fn next_batch(queue: &PeerQueue) -> Vec<Vec<u8>> {
    let mut queued = queue.messages.lock().unwrap_or_else(|e| e.into_inner());
    let mut batch = Vec::new();
    let mut bytes = 0;
    while batch.len() < RAFT_BATCH_MESSAGES_MAX {
        let Some(message) = queued.front() else { break };
        let size = message.compute_size() as usize;
        if !batch.is_empty() && bytes + size > RAFT_BATCH_BYTES_MAX {
            break;
        }
        let mut message = queued.pop_front().expect("peeked above");
        let mut merged_bytes = entry_bytes(&message);
        while let Some(next) = queued.front()
            && merge_appends(&mut message, &mut merged_bytes, next)
        {
            queued.pop_front();
        }
        match message.write_to_bytes() {
            Ok(encoded) => {
                bytes += encoded.len();
                batch.push(encoded);
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a raft message; dropped it"),
        }
    }
    batch
}

/// Appends `next` to `first` when both are appends of one term and `next`
/// continues exactly where `first` ends (its previous index and term are
/// `first`'s last entry, or `first`'s own when it carries none), within
/// [`MERGED_APPEND_BYTES_MAX`]: the follower then takes one message for
/// two, and answers once, for the last index, which acknowledges both to
/// the leader's progress tracking. Anything else is left as it is.
/// `first_bytes` is `first`'s [`entry_bytes`], kept up to date here (a
/// backlog of thousands of appends must not be summed again per merge).
fn merge_appends(first: &mut Message, first_bytes: &mut usize, next: &Message) -> bool {
    if first.get_msg_type() != MessageType::MsgAppend
        || next.get_msg_type() != MessageType::MsgAppend
        || first.term != next.term
        || first.from != next.from
        || first.to != next.to
    {
        return false;
    }
    let (last_index, last_term) = match first.entries.last() {
        Some(entry) => (entry.index, entry.term),
        None => (first.index, first.log_term),
    };
    if next.index != last_index || next.log_term != last_term {
        return false;
    }
    let next_bytes = entry_bytes(next);
    if !first.entries.is_empty() && !next.entries.is_empty() && *first_bytes + next_bytes > MERGED_APPEND_BYTES_MAX {
        return false;
    }
    *first_bytes += next_bytes;
    first.entries.extend(next.entries.iter().cloned());
    if next.commit >= first.commit {
        first.commit = next.commit;
        first.commit_term = next.commit_term;
    }
    true
}

/// The encoded size of `message`'s entries.
fn entry_bytes(message: &Message) -> usize {
    message.entries.iter().map(|e| e.compute_size() as usize).sum()
}

/// An open `Peer.RaftStream` call: batches go into `batches`, and the call
/// itself runs in its own task until the stream breaks or is dropped.
struct OpenStream {
    address: String,
    batches: mpsc::Sender<pb::RaftBatch>,
    call: JoinHandle<Result<(), Status>>,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.call.abort();
    }
}

/// Why a batch could not go onto a stream.
enum StreamFailure {
    /// The peer predates `RaftStream`; the batch comes back to be sent by
    /// a `Raft` call.
    Unimplemented(pb::RaftBatch),
    Failed(String),
}

/// Sends `peer`'s queued messages until the transport is dropped: on one
/// long-lived `RaftStream` call, or one `Raft` call per batch to a peer
/// that predates it.
async fn run_peer(shared: Arc<Shared>, peer: NodeId, queue: Arc<PeerQueue>) {
    let mut connection: Option<(String, PeerClient<Channel>)> = None;
    let mut stream: Option<OpenStream> = None;
    let mut unary_only = false;
    let mut backoff = BACKOFF_MIN;
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        // A paced peer (a learner) waits out its pace since the last batch,
        // and what comes meanwhile goes with the next one.
        let pace_ms = queue.pace_ms.load(Ordering::Relaxed);
        if pace_ms > 0 {
            let since_ms = crate::clock::monotonic_ms().saturating_sub(queue.tcp_sent_at_ms.load(Ordering::Relaxed));
            if since_ms < pace_ms {
                tokio::time::sleep(Duration::from_millis(pace_ms - since_ms)).await;
            }
        }
        let batch = next_batch(&queue);
        if batch.is_empty() {
            queue.ready.notified().await;
            continue;
        }
        let Some(address) = shared.address_of(peer) else {
            tracing::debug!(peer, "no address known for this peer; dropped its messages");
            shared.report_unreachable(peer);
            continue;
        };
        let client = match &connection {
            Some((known, client)) if *known == address => client.clone(),
            _ => match shared.dialer.endpoint(&address) {
                Ok(endpoint) => {
                    let client = peer_client(endpoint.connect_lazy());
                    connection = Some((address.clone(), client.clone()));
                    unary_only = false;
                    client
                }
                Err(e) => {
                    tracing::warn!(peer, address, error = %e.message(), "bad peer address");
                    shared.report_unreachable(peer);
                    continue;
                }
            },
        };
        let confirmed = queue.confirmation.lock().unwrap_or_else(|e| e.into_inner()).take();
        let request = pb::RaftBatch {
            cluster_id: shared.me.cluster_id,
            from: shared.me.id,
            from_address: shared.me.address.clone(),
            messages: batch,
            sent_at_ms: crate::clock::monotonic_ms(),
            confirmation: confirmed.map(|v| pb::ContactConfirmation { sent_at_ms: v.sent_at_ms, commit: v.commit }),
        };
        let sent = if unary_only {
            send_unary(client, request).await
        } else {
            match send_on_stream(&mut stream, &address, &client, request).await {
                Ok(()) => Ok(()),
                Err(StreamFailure::Unimplemented(batch)) => {
                    tracing::info!(peer, address, "this peer predates Peer.RaftStream; sending it one call per batch");
                    unary_only = true;
                    send_unary(client, batch).await
                }
                Err(StreamFailure::Failed(error)) => Err(error),
            }
        };
        match sent {
            Ok(()) => {
                backoff = BACKOFF_MIN;
                queue.tcp_sent_at_ms.store(crate::clock::monotonic_ms(), Ordering::Relaxed);
            }
            Err(error) => {
                // Logged at debug: a peer that is down fails every
                // heartbeat, and Raft's own role changes say more.
                tracing::debug!(peer, address, error, "sending to a peer failed");
                shared.report_unreachable(peer);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Sends `peer`'s queued datagram copies until the transport is dropped, on
/// one QUIC connection, dialled again when it closes. Best effort: what
/// cannot go now is dropped (gRPC carries it), and a peer unreachable over
/// UDP for [`DATAGRAM_WARN_AFTER`] while gRPC reaches it is warned about
/// once until it answers.
async fn run_datagrams(shared: Arc<Shared>, path: Arc<DatagramPath>, peer: NodeId, queue: Arc<PeerQueue>) {
    let mut connection: Option<(String, quinn::Connection)> = None;
    let mut redial_at: Option<tokio::time::Instant> = None;
    let mut backoff = DATAGRAM_REDIAL_MIN;
    let mut failing_since_ms: Option<u64> = None;
    let mut warned = false;
    let drop_queued = |queue: &PeerQueue| {
        queue.datagrams.lock().unwrap_or_else(|e| e.into_inner()).clear();
        queue.datagram_confirmation.lock().unwrap_or_else(|e| e.into_inner()).take();
    };
    loop {
        if shared.closed.load(Ordering::SeqCst) {
            return;
        }
        if queue.datagrams.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
            queue.datagram_ready.notified().await;
            continue;
        }
        let Some(address) = shared.address_of(peer) else {
            drop_queued(&queue);
            continue;
        };
        if connection.as_ref().is_some_and(|(known, c)| *known != address || c.close_reason().is_some()) {
            connection = None;
        }
        if connection.is_none() {
            if redial_at.is_some_and(|at| tokio::time::Instant::now() < at) {
                drop_queued(&queue);
                continue;
            }
            let dialled_at_ms = crate::clock::monotonic_ms();
            match path.connect(&address).await {
                Ok(c) => {
                    if warned {
                        tracing::info!(peer, address, "the datagram path to this peer is up again");
                    }
                    tracing::debug!(peer, address, "datagram path up");
                    (warned, failing_since_ms, redial_at, backoff) = (false, None, None, DATAGRAM_REDIAL_MIN);
                    connection = Some((address.clone(), c));
                }
                Err(error) => {
                    let now_ms = crate::clock::monotonic_ms();
                    let since_ms = *failing_since_ms.get_or_insert(dialled_at_ms);
                    let tcp_works = queue.tcp_sent_at_ms.load(Ordering::Relaxed) >= since_ms;
                    let warn_after_ms = shared.datagram_warn_after_ms.load(Ordering::Relaxed);
                    if !warned && tcp_works && now_ms - since_ms >= warn_after_ms {
                        tracing::warn!(
                            peer,
                            address,
                            error,
                            "no datagram path (QUIC over UDP) to this peer, which TCP reaches: its peer traffic goes \
                             over TCP alone, which packet loss delays more; open UDP to its gRPC port"
                        );
                        warned = true;
                    } else {
                        tracing::debug!(peer, address, error, "cannot open the datagram path to this peer");
                    }
                    redial_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(DATAGRAM_REDIAL_MAX);
                    drop_queued(&queue);
                    continue;
                }
            }
        }
        let Some(open) = connection.as_ref().map(|(_, c)| c.clone()) else { continue };
        let Some(size_max) = open.max_datagram_size() else {
            tracing::debug!(peer, address, "this peer takes no datagrams");
            connection = None;
            redial_at = Some(tokio::time::Instant::now() + DATAGRAM_REDIAL_MAX);
            continue;
        };
        let messages: Vec<Vec<u8>> = {
            let mut queued = queue.datagrams.lock().unwrap_or_else(|e| e.into_inner());
            queued.drain(..).filter_map(|m| m.write_to_bytes().ok()).collect()
        };
        let confirmed = queue.datagram_confirmation.lock().unwrap_or_else(|e| e.into_inner()).take();
        let template = pb::RaftBatch {
            cluster_id: shared.me.cluster_id,
            from: shared.me.id,
            from_address: shared.me.address.clone(),
            messages: Vec::new(),
            sent_at_ms: crate::clock::monotonic_ms(),
            confirmation: None,
        };
        let confirmation = confirmed.map(|v| pb::ContactConfirmation { sent_at_ms: v.sent_at_ms, commit: v.commit });
        for bytes in datagram::pack(&template, messages, confirmation, size_max) {
            match open.send_datagram(bytes) {
                Ok(()) => {}
                // The path's size shrank since it was read: this one is lost.
                Err(quinn::SendDatagramError::TooLarge) => {}
                Err(e) => {
                    tracing::debug!(peer, address, error = %e, "sending a datagram failed");
                    connection = None;
                    break;
                }
            }
        }
    }
}

/// Sends one batch as its own `Raft` call (to a peer that predates
/// `RaftStream`).
async fn send_unary(mut client: PeerClient<Channel>, request: pb::RaftBatch) -> Result<(), String> {
    match tokio::time::timeout(RAFT_CALL_TIMEOUT, client.raft(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(status.message().to_string()),
        Err(_) => Err("timed out".to_string()),
    }
}

/// Puts one batch on the open stream to `address`, opening one first if
/// there is none (or the last one ended). A stream that ended with an
/// error, or that takes no batch for [`RAFT_CALL_TIMEOUT`] (a peer that
/// stopped reading), is a failure: the batches in it may be lost, which
/// Raft's retransmission covers once it is told the peer was unreachable.
async fn send_on_stream(
    stream: &mut Option<OpenStream>,
    address: &str,
    client: &PeerClient<Channel>,
    batch: pb::RaftBatch,
) -> Result<(), StreamFailure> {
    if let Some(open) = stream.as_mut()
        && (open.address != address || open.call.is_finished())
    {
        let ended = stream.take().expect("checked above");
        if ended.call.is_finished()
            && let Err(status) = ended_call(ended).await
        {
            return Err(failure(status, batch));
        }
    }
    let open = stream.get_or_insert_with(|| {
        let (batches, receiver) = mpsc::channel(STREAM_BATCHES_QUEUED);
        let mut client = client.clone();
        let call = tokio::spawn(async move {
            client.raft_stream(tokio_stream::wrappers::ReceiverStream::new(receiver)).await.map(|_| ())
        });
        OpenStream { address: address.to_string(), batches, call }
    });
    match tokio::time::timeout(RAFT_CALL_TIMEOUT, open.batches.send(batch)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(mpsc::error::SendError(batch))) => {
            let ended = stream.take().expect("used above");
            Err(match ended_call(ended).await {
                Err(status) => failure(status, batch),
                Ok(()) => StreamFailure::Failed("the peer ended the stream".to_string()),
            })
        }
        Err(_) => {
            *stream = None;
            Err(StreamFailure::Failed("timed out".to_string()))
        }
    }
}

/// The outcome of a stream's call, which has ended or is about to (its
/// batch receiver is gone).
async fn ended_call(mut ended: OpenStream) -> Result<(), Status> {
    match (&mut ended.call).await {
        Ok(outcome) => outcome,
        Err(e) => Err(Status::unavailable(format!("the stream's task failed: {e}"))),
    }
}

fn failure(status: Status, batch: pb::RaftBatch) -> StreamFailure {
    if status.code() == tonic::Code::Unimplemented {
        StreamFailure::Unimplemented(batch)
    } else {
        StreamFailure::Failed(status.message().to_string())
    }
}

/// Streams one `MsgSnapshot` to `peer` and always reports the outcome.
async fn send_snapshot(shared: Arc<Shared>, peer: NodeId, message: Message) {
    let started = Instant::now();
    let outcome = tokio::time::timeout(SNAPSHOT_CALL_TIMEOUT, stream_snapshot(&shared, peer, message)).await;
    let delivered = match outcome {
        Ok(Ok(size)) => {
            tracing::info!(peer, bytes = size, ms = started.elapsed().as_millis() as u64, "sent a snapshot");
            true
        }
        Ok(Err(e)) => {
            tracing::warn!(peer, error = %e, "sending a snapshot failed");
            false
        }
        Err(_) => {
            tracing::warn!(peer, "sending a snapshot timed out");
            false
        }
    };
    shared.report_snapshot(peer, delivered).await;
}

/// The chunks of one snapshot message: the header (the message without
/// its data) and total size on the first, the SHA-256 on the last.
pub fn snapshot_chunks(me: &Sender, message: Message) -> Result<Vec<pb::SnapshotChunk>, String> {
    snapshot_chunks_sized(me, message, SNAPSHOT_CHUNK_BYTES)
}

/// [`snapshot_chunks`] of `chunk_bytes` each (at least 1).
pub fn snapshot_chunks_sized(
    me: &Sender,
    mut message: Message,
    chunk_bytes: usize,
) -> Result<Vec<pb::SnapshotChunk>, String> {
    let chunk_bytes = chunk_bytes.max(1);
    let data = message.mut_snapshot().take_data();
    let header = message.write_to_bytes().map_err(|e| format!("cannot encode the snapshot header: {e}"))?;
    let sha256 = Sha256::digest(&data).to_vec();
    let count = data.len().div_ceil(chunk_bytes).max(1);
    let mut chunks = Vec::with_capacity(count);
    for i in 0..count {
        let start = i * chunk_bytes;
        let end = (start + chunk_bytes).min(data.len());
        let bytes = data.slice(start..end).to_vec();
        let first = i == 0;
        let last = i + 1 == count;
        chunks.push(pb::SnapshotChunk {
            cluster_id: me.cluster_id,
            from: me.id,
            from_address: me.address.clone(),
            header: if first { header.clone() } else { Vec::new() },
            total_size: if first { data.len() as u64 } else { 0 },
            crc32c: crc32c::crc32c(&bytes),
            data: bytes,
            sha256: if last { sha256.clone() } else { Vec::new() },
            last,
        });
    }
    Ok(chunks)
}

async fn stream_snapshot(shared: &Shared, peer: NodeId, message: Message) -> Result<usize, String> {
    let address = shared.address_of(peer).ok_or("no address known for this peer")?;
    let size = message.get_snapshot().get_data().len();
    let chunks = snapshot_chunks(&shared.me, message)?;
    send_chunks(&shared.dialer, &address, chunks).await?;
    Ok(size)
}

/// Streams `chunks` to the member at `address`. A receiver that finds a
/// chunk damaged on the way (`DataLoss`: a CRC-32C or SHA-256 mismatch)
/// installs nothing, and the whole transfer is sent again, up to
/// [`SNAPSHOT_SEND_ATTEMPTS_MAX`] times. Returns the attempts it took.
pub async fn send_chunks(dialer: &Dialer, address: &str, chunks: Vec<pb::SnapshotChunk>) -> Result<usize, String> {
    let endpoint = dialer.endpoint(address).map_err(|e| e.message().to_string())?;
    let channel = endpoint.connect().await.map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let chunks = Arc::new(chunks);
    let mut attempt = 1;
    loop {
        // Chunks are cloned one at a time as the stream is polled, so a
        // retry never holds a second copy of the snapshot.
        let stream = {
            let chunks = chunks.clone();
            tokio_stream::iter((0..chunks.len()).map(move |i| chunks[i].clone()))
        };
        match peer_client(channel.clone()).snapshot(stream).await {
            Ok(_) => return Ok(attempt),
            Err(s) if s.code() == tonic::Code::DataLoss && attempt < SNAPSHOT_SEND_ATTEMPTS_MAX => {
                tracing::warn!(address, attempt, error = %s.message(), "a snapshot arrived damaged; sending it again");
                attempt += 1;
            }
            Err(s) => return Err(format!("{address} refused it: {}", s.message())),
        }
    }
}

/// Assembles and checks an incoming snapshot stream's chunks.
#[derive(Debug, Default)]
pub struct SnapshotAssembler {
    header: Option<Message>,
    total_size: u64,
    data: Vec<u8>,
    hasher: Sha256,
}

impl SnapshotAssembler {
    /// The snapshot's message without its data, once the first chunk came.
    pub fn header(&self) -> Option<&Message> {
        self.header.as_ref()
    }

    /// The bytes of snapshot data held so far.
    pub fn buffered(&self) -> usize {
        self.data.len()
    }

    /// Adds one chunk; returns the complete message after the last one.
    pub fn push(&mut self, chunk: pb::SnapshotChunk) -> Result<Option<Message>, Status> {
        if self.header.is_none() {
            let header = Message::parse_from_bytes(&chunk.header)
                .map_err(|e| Status::invalid_argument(format!("the snapshot header does not decode: {e}")))?;
            if header.get_msg_type() != MessageType::MsgSnapshot {
                return Err(Status::invalid_argument("the snapshot header is not a snapshot message"));
            }
            if chunk.total_size > SNAPSHOT_BYTES_MAX {
                return Err(Status::invalid_argument(format!(
                    "the snapshot is {} bytes; the limit is {SNAPSHOT_BYTES_MAX}",
                    chunk.total_size
                )));
            }
            self.total_size = chunk.total_size;
            self.data = Vec::with_capacity(chunk.total_size.min(SNAPSHOT_PREALLOC_BYTES_MAX) as usize);
            self.header = Some(header);
        } else if !chunk.header.is_empty() {
            return Err(Status::invalid_argument("a snapshot chunk after the first carries a header"));
        }
        if crc32c::crc32c(&chunk.data) != chunk.crc32c {
            return Err(Status::data_loss("a snapshot chunk failed its CRC-32C check"));
        }
        if self.data.len() as u64 + chunk.data.len() as u64 > self.total_size {
            return Err(Status::invalid_argument("the snapshot chunks exceed the announced total size"));
        }
        self.hasher.update(&chunk.data);
        self.data.extend_from_slice(&chunk.data);
        if !chunk.last {
            return Ok(None);
        }
        if self.data.len() as u64 != self.total_size {
            return Err(Status::invalid_argument(format!(
                "the snapshot ended after {} of {} bytes",
                self.data.len(),
                self.total_size
            )));
        }
        let digest = std::mem::take(&mut self.hasher).finalize();
        if digest.as_slice() != chunk.sha256.as_slice() {
            return Err(Status::data_loss("the snapshot failed its SHA-256 check"));
        }
        let mut message = self.header.take().expect("set by the first chunk");
        message.mut_snapshot().set_data(std::mem::take(&mut self.data).into());
        Ok(Some(message))
    }
}

/// The `Peer` service.
pub struct PeerService {
    context: Arc<Context>,
    /// The one snapshot being received at a time (see [`PeerService::snapshot`]).
    snapshot_slot: Arc<Semaphore>,
}

impl PeerService {
    pub fn new(context: Arc<Context>) -> Self {
        PeerService { context, snapshot_slot: Arc::new(Semaphore::new(1)) }
    }

    /// The running member, after checking the sender's cluster id.
    fn member_for(&self, cluster_id: u64) -> Result<Membership, Status> {
        let member = self.context.member()?;
        if cluster_id != member.cluster_id {
            return Err(Status::failed_precondition(format!(
                "this agent belongs to cluster {:016x}, not {cluster_id:016x}",
                member.cluster_id
            )));
        }
        Ok(member)
    }

    /// Binds the sender a request names (`from`) to its certificate: with
    /// TLS, the replicated state must name `from` as the certificate's
    /// member; without, a peer is whoever it claims to be (`insecure`).
    async fn bind_sender(&self, member: &Membership, speaker: &Speaker, from: NodeId) -> Result<(), Status> {
        match speaker {
            Speaker::Member(cert_name) => self.context.check_sender(member, cert_name, from).await,
            Speaker::Unauthenticated => Ok(()),
            other => Err(Status::permission_denied(format!("{other} cannot send peer traffic"))),
        }
    }

    /// Remembers where a peer listens, so that a new member can answer the
    /// leader before it has the member list.
    fn learn_address(&self, member: &Membership, from: NodeId, address: &str) {
        if from == 0 || from == member.id || address.is_empty() || address.len() > limits::ADDRESS_LEN_MAX {
            return;
        }
        let book = member.node.addresses();
        let known = book.read().unwrap_or_else(|e| e.into_inner()).get(&from).is_some_and(|a| a == address);
        if !known {
            book.write().unwrap_or_else(|e| e.into_inner()).insert(from, address.to_string());
        }
    }

    /// Checks one batch of raft messages (sender, cluster, size, and each
    /// message by the trust table) and steps them all, or none.
    pub(crate) async fn accept_batch(&self, speaker: &Speaker, batch: pb::RaftBatch) -> Result<(), Status> {
        let member = self.member_for(batch.cluster_id)?;
        self.bind_sender(&member, speaker, batch.from).await?;
        let messages = judge_batch(&published_view(&member), &batch)?;
        self.learn_address(&member, batch.from, &batch.from_address);
        let confirmation = batch.confirmation.map(|c| Contact { sent_at_ms: c.sent_at_ms, commit: c.commit });
        // The node judges the confirmation (only the current leader's, never
        // in the future): the transport only carries it.
        member.node.step_frame(batch.from, batch.sent_at_ms, messages, confirmation);
        Ok(())
    }
}

/// What the gRPC layer knows of the receiver for the trust table: its
/// status as published after the raft thread's last loop turn (the raft
/// thread judges every message again with its exact view).
pub fn published_view(member: &Membership) -> trust::View {
    let watch = member.node.watch_status();
    let (term, leader, mut configuration) = {
        let status = watch.borrow();
        let configuration: BTreeSet<NodeId> = status.voters.iter().chain(&status.learners).copied().collect();
        (status.term, status.leader.as_ref().map(|l| l.id), configuration)
    };
    if configuration.is_empty() {
        // A joiner before its first snapshot: the members its admission named.
        configuration.extend(member.node.addresses().read().unwrap_or_else(|e| e.into_inner()).keys());
    }
    trust::View { me: member.id, term, leader, configuration, exact: None }
}

/// Decodes a batch's messages and judges each by the trust table: the
/// messages to step, or the refusal of the whole batch.
pub fn judge_batch(view: &trust::View, batch: &pb::RaftBatch) -> Result<Vec<Message>, Status> {
    // Whatever the batch holds: its messages would be refused anyway, and
    // an empty one must not refresh a stranger's address or its contact (a
    // removed member's certificate stays valid).
    if !view.configuration.contains(&batch.from) {
        return Err(Status::permission_denied(format!("member {} is not in this member's configuration", batch.from)));
    }
    if batch.messages.len() > RAFT_BATCH_MESSAGES_MAX {
        return Err(Status::invalid_argument(format!(
            "{} raft messages in one batch; the limit is {RAFT_BATCH_MESSAGES_MAX}",
            batch.messages.len()
        )));
    }
    let mut messages = Vec::with_capacity(batch.messages.len());
    for bytes in &batch.messages {
        let message = Message::parse_from_bytes(bytes)
            .map_err(|e| Status::invalid_argument(format!("a raft message does not decode: {e}")))?;
        match trust::raft_message(view, batch.from, &message) {
            Verdict::Step => messages.push(message),
            Verdict::Drop(why) => tracing::debug!(from = batch.from, why, "dropped a raft message"),
            Verdict::Refuse(refusal) => return Err(Status::permission_denied(refusal.0)),
        }
    }
    Ok(messages)
}

/// Decodes a proposed command and judges it by the trust table
/// (`proposer`: the member the caller is, if known).
pub fn judge_proposal(proposer: Option<NodeId>, bytes: &[u8]) -> Result<CommandKind, Status> {
    let command = codec::decode_command(bytes)
        .map_err(|e| Status::invalid_argument(format!("the command does not decode: {e}")))?;
    trust::may_propose(proposer, &command.kind).map_err(|r| Status::permission_denied(r.0))?;
    Ok(command.kind)
}

/// Waits for the next chunk of a snapshot stream, at most `chunk_timeout`
/// and never past the stream's `deadline`.
async fn next_chunk(
    stream: &mut Streaming<pb::SnapshotChunk>,
    deadline: tokio::time::Instant,
    chunk_timeout: Duration,
) -> Result<pb::SnapshotChunk, Status> {
    let until = deadline.min(tokio::time::Instant::now() + chunk_timeout);
    match tokio::time::timeout_at(until, stream.message()).await {
        Ok(Ok(Some(chunk))) => Ok(chunk),
        Ok(Ok(None)) => Err(Status::invalid_argument("the snapshot stream ended early")),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::deadline_exceeded("the snapshot stream stalled or took too long; dropped it")),
    }
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn raft(&self, request: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        let speaker = speaker(&request);
        self.accept_batch(&speaker, request.into_inner()).await?;
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn raft_stream(&self, request: Request<Streaming<pb::RaftBatch>>) -> Result<Response<pb::RaftAck>, Status> {
        let speaker = speaker(&request);
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            self.accept_batch(&speaker, batch).await?;
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    /// One snapshot at a time, only from the leader this member knows,
    /// each chunk within [`SNAPSHOT_CHUNK_TIMEOUT`] and the whole within
    /// [`SNAPSHOT_RECEIVE_TIMEOUT`]; the bytes buffered never exceed the
    /// total the first chunk announced, at most [`SNAPSHOT_BYTES_MAX`].
    async fn snapshot(&self, request: Request<Streaming<pb::SnapshotChunk>>) -> Result<Response<pb::RaftAck>, Status> {
        let speaker = speaker(&request);
        let member = self.context.member()?;
        // Before reading (or holding the slot): a member certificate that
        // is not the known leader's is refused at once.
        if let Speaker::Member(cert_name) = &speaker
            && let Some(from) = self.context.member_id_by_name(&member, cert_name).await?
        {
            trust::may_stream_snapshot(&published_view(&member), from).map_err(|r| Status::permission_denied(r.0))?;
        }
        let _slot = self.snapshot_slot.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("this member is receiving another snapshot; one is received at a time")
        })?;
        let deadline = tokio::time::Instant::now() + SNAPSHOT_RECEIVE_TIMEOUT;
        let mut stream = request.into_inner();
        let first = next_chunk(&mut stream, deadline, SNAPSHOT_CHUNK_TIMEOUT).await?;
        let member = self.member_for(first.cluster_id)?;
        let (from, from_address) = (first.from, first.from_address.clone());
        self.bind_sender(&member, &speaker, from).await?;
        let mut assembler = SnapshotAssembler::default();
        let mut done = assembler.push(first)?;
        // The header is judged before any more of the data is read (a
        // snapshot of one chunk is complete already).
        let view = published_view(&member);
        trust::may_stream_snapshot(&view, from).map_err(|r| Status::permission_denied(r.0))?;
        let header = done.as_ref().or(assembler.header()).ok_or_else(|| Status::internal("no snapshot header"))?;
        match trust::raft_message(&view, from, header) {
            Verdict::Step => {}
            Verdict::Drop(why) => return Err(Status::permission_denied(why)),
            Verdict::Refuse(refusal) => return Err(Status::permission_denied(refusal.0)),
        }
        let message = loop {
            if let Some(message) = done {
                break message;
            }
            done = assembler.push(next_chunk(&mut stream, deadline, SNAPSHOT_CHUNK_TIMEOUT).await?)?;
        };
        self.learn_address(&member, from, &from_address);
        let metadata = message.get_snapshot().get_metadata();
        tracing::info!(from, index = metadata.index, term = metadata.term, "received a snapshot");
        member.node.step(from, vec![message]);
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn admit(&self, request: Request<pb::AdmitRequest>) -> Result<Response<pb::AdmitResponse>, Status> {
        // A host joining with a token and no certificate yet: the gate lets
        // such a connection reach this call alone (`trust::may_call`), and
        // refuses it the forwarded header.
        let speaker = speaker(&request);
        let joiner = speaker == Speaker::Joiner;
        let mut issuer = None;
        {
            let admit = request.get_ref();
            names::validate(&admit.name).map_err(|e| {
                Status::invalid_argument(format!("invalid node name {}: {e}", super::service::quoted(&admit.name)))
            })?;
            if admit.id == 0 {
                return Err(Status::invalid_argument("member id 0 is reserved"));
            }
            if admit.token.len() > super::service::JOIN_TOKEN_LEN_MAX {
                return Err(Status::invalid_argument("the join token is too long"));
            }
            if admit.address.is_empty() || admit.address.len() > limits::ADDRESS_LEN_MAX {
                return Err(Status::invalid_argument(format!("{:?} is not a HOST:PORT address", admit.address)));
            }
            // With a member certificate the certificate is the admission (a
            // token given anyway is checked too); without one, a one-time
            // join token. Forwarded or not: a member never forwards an
            // admission (the joiner is sent to the leader), so no header can
            // vouch for it.
            trust::may_admit(&speaker, &admit.name, !admit.token.trim().is_empty())
                .map_err(|r| Status::permission_denied(r.0))?;
            if joiner {
                // Checked before anything is proposed: a refusal here uses
                // no token.
                let credentials = self.context.dialer.credentials().expect("TLS is on");
                let ca = credentials.issuer.clone().ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "{} joined without the cluster secret and cannot issue certificates; join through a \
                         member that has `cluster_secret_file`",
                        self.context.name
                    ))
                })?;
                crate::pki::parse_request(&admit.csr).map_err(|e| Status::invalid_argument(e.to_string()))?;
                issuer = Some((ca, credentials.ca_pem.clone()));
            } else if !admit.csr.is_empty() {
                return Err(Status::invalid_argument(
                    "a certificate signing request is only for a host that joins without a certificate",
                ));
            }
        }
        let (name, address, csr) =
            (request.get_ref().name.clone(), request.get_ref().address.clone(), request.get_ref().csr.clone());
        let mut response = self
            .context
            .write_routed(
                request,
                |member, admit| {
                    Box::pin(async move {
                        // Never a member again: a valid token (or certificate)
                        // cannot rewrite an existing member's address. Checked
                        // before the token is touched: a token is used up
                        // only by a join that succeeds.
                        let (id, name, address) = (admit.id, admit.name.clone(), admit.address.clone());
                        let conflict = member
                            .node
                            .read_local(move |state, _| state.admission_conflict(id, &name, &address))
                            .await?;
                        if let Some(rejection) = conflict {
                            return Err(ApiError::Status(from_rejection(&rejection)));
                        }
                        // The token first: marked used by this host, so no
                        // other host can join with it.
                        if !admit.token.trim().is_empty() {
                            let hash = crate::join_token::hash(&admit.token);
                            member.node.propose(CommandKind::UseJoinToken { hash, node: admit.id }).await?;
                        }
                        let change =
                            MembershipChange::AddLearner { id: admit.id, name: admit.name, address: admit.address };
                        member.node.propose_membership(change).await?;
                        let members = member
                            .node
                            .read_local(|state, _| {
                                state
                                    .members()
                                    .values()
                                    .map(|m| pb::PeerAddress {
                                        id: m.id,
                                        name: m.name.clone(),
                                        address: m.address.clone(),
                                    })
                                    .collect::<Vec<_>>()
                            })
                            .await?;
                        Ok::<_, ApiError>(pb::AdmitResponse {
                            cluster_id: member.cluster_id,
                            members,
                            ..Default::default()
                        })
                    })
                },
                Remote::Redirect,
            )
            .await?;
        if let Some((ca, trusted)) = issuer {
            // Admitted: its certificate, for the key of its request.
            let identity = super::tls::CertIdentity::member(&name);
            let sans = crate::pki::member_sans(&address, &name);
            let certificate = ca
                .sign_request(&identity, &csr, &sans, crate::pki::LEAF_VALID_DAYS_DEFAULT)
                .map_err(|e| Status::internal(e.to_string()))?;
            tracing::info!(name, address, "issued a member certificate to a host joining with a token");
            let body = response.get_mut();
            body.certificate_pem = certificate;
            body.ca_pem = String::from_utf8_lossy(&trusted).into_owned();
        }
        Ok(response)
    }

    async fn renew(&self, request: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        // The gate admits only members here (`trust::may_call`): a member
        // renews its own certificate, never another's.
        let name = match speaker(&request) {
            Speaker::Member(name) => name,
            Speaker::Unauthenticated => {
                return Err(Status::failed_precondition("this agent runs with `insecure`: it has no certificates"));
            }
            other => return Err(Status::permission_denied(format!("{other} cannot renew a member certificate"))),
        };
        let member = self.member_for(request.get_ref().cluster_id)?;
        let lookup = name.clone();
        let address = member
            .node
            .read_local(move |state, _| state.member_by_name(&lookup).map(|m| m.address.clone()))
            .await?
            .ok_or_else(|| Status::permission_denied(format!("{name:?} is not a member of this cluster")))?;
        let credentials = self.context.dialer.credentials().expect("TLS is on: the caller has a certificate");
        let ca = credentials.issuer.as_ref().ok_or_else(|| {
            Status::failed_precondition(format!(
                "{} holds no cluster secret and cannot issue certificates",
                self.context.name
            ))
        })?;
        let identity = super::tls::CertIdentity::member(&name);
        let sans = crate::pki::member_sans(&address, &name);
        let certificate_pem = ca
            .sign_request(&identity, &request.get_ref().csr, &sans, crate::pki::LEAF_VALID_DAYS_DEFAULT)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(name, "renewed the certificate of a member that joined with a token");
        Ok(Response::new(pb::RenewResponse {
            certificate_pem,
            ca_pem: String::from_utf8_lossy(&credentials.ca_pem).into_owned(),
        }))
    }

    /// The legacy path of a member's proposal (this version hands them to
    /// the leader in a Raft message): judged by the same table.
    async fn propose(&self, request: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeResponse>, Status> {
        let speaker = speaker(&request);
        let member = self.member_for(request.get_ref().cluster_id)?;
        let proposer = match &speaker {
            Speaker::Member(name) => Some(self.context.member_id_by_name(&member, name).await?.ok_or_else(|| {
                Status::permission_denied(format!("member {name:?} is not in this member's member list"))
            })?),
            _ => None,
        };
        let kind = judge_proposal(proposer, &request.get_ref().command)?;
        if is_forwarded(&request) {
            // Forwarded to us because we lead: propose here, never again
            // elsewhere.
            return match member.node.propose(kind).await {
                Ok(_) => Ok(Response::new(pb::ProposeResponse {})),
                Err(e) => Err(e.into()),
            };
        }
        self.context.propose(kind).await.map(|()| Response::new(pb::ProposeResponse {}))
    }
}

/// Asks the member at `seed` to admit this host as a learner; returns the
/// cluster id and the current members. A member that does not lead
/// answers with the leader's address, which is asked next.
pub async fn admit(dialer: &Dialer, seed: &str, request: pb::AdmitRequest) -> Result<pb::AdmitResponse, Status> {
    let request = &request;
    super::context::following_redirects(seed, |target| async move {
        let endpoint = dialer.endpoint(&target)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach {target}: {}", transport_cause(&e))))?;
        let mut call = Request::new(request.clone());
        call.set_timeout(super::context::LEADER_WAIT + Duration::from_secs(2));
        peer_client(channel).admit(call).await.map(Response::into_inner)
    })
    .await
}

/// How long renewing a joined member's certificate at start may take, all
/// members tried.
const RENEW_TIMEOUT: Duration = Duration::from_secs(5);

/// A member that joined with a token renews its certificate and learns the
/// CAs the cluster trusts now from any member `addresses` names that holds
/// the cluster secret (`Peer.Renew`), so that it follows a rotation. On
/// success the new files are written (`pki::JoinedFiles`) and returned as
/// credentials; `None` when no member could renew it (it runs on with the
/// certificate it has).
pub async fn renew_joined(
    credentials: &super::tls::Credentials,
    files: &crate::pki::JoinedFiles,
    cluster_id: u64,
    addresses: &[String],
) -> Option<super::tls::Credentials> {
    let name = credentials.identity.name.clone();
    let key = files.key_or_create().ok()?;
    let csr = crate::pki::request_for(&key, &name).ok()?;
    let dialer = Dialer::tls(Arc::new(credentials.clone()));
    let attempt = async {
        for address in addresses {
            let Ok(endpoint) = dialer.endpoint(address) else { continue };
            let renewed = async {
                let channel = endpoint.connect().await.map_err(|e| Status::unavailable(transport_cause(&e)))?;
                let request = pb::RenewRequest { cluster_id, csr: csr.clone() };
                peer_client(channel).renew(request).await.map(Response::into_inner)
            };
            match renewed.await {
                Ok(renewed) => {
                    let identity = super::tls::CertIdentity::member(&name);
                    if let Err(e) = crate::pki::check_issued(
                        renewed.certificate_pem.as_bytes(),
                        &key,
                        &identity,
                        renewed.ca_pem.as_bytes(),
                    ) {
                        tracing::warn!(address, error = %e, "a member renewed this host's certificate badly");
                        continue;
                    }
                    if let Err(e) = files.write_issued(renewed.certificate_pem.as_bytes(), renewed.ca_pem.as_bytes()) {
                        tracing::warn!(error = %e, "cannot keep the renewed certificate");
                        return None;
                    }
                    tracing::info!(address, "renewed this host's certificate and the cluster's CAs");
                    return super::tls::Credentials::load_joined(files, &name).ok();
                }
                Err(status) => {
                    tracing::debug!(address, error = %status.message(), "renewing through this member failed")
                }
            }
        }
        None
    };
    match tokio::time::timeout(RENEW_TIMEOUT, attempt).await {
        Ok(Some(renewed)) => Some(renewed),
        _ => {
            tracing::warn!("no member renewed this host's certificate; running on with the one it has");
            None
        }
    }
}

/// The innermost cause of a transport error ("Connection refused"), which
/// is what an operator needs, rather than tonic's "transport error".
pub fn transport_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &(dyn std::error::Error + 'static) = error;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_message(data_len: usize) -> Message {
        let mut message = Message::default();
        message.set_msg_type(MessageType::MsgSnapshot);
        message.to = 2;
        message.from = 1;
        let data: Vec<u8> = (0..data_len).map(|i| (i % 251) as u8).collect();
        message.mut_snapshot().set_data(data.into());
        message.mut_snapshot().mut_metadata().index = 42;
        message
    }

    fn me() -> Sender {
        Sender { id: 1, cluster_id: 7, address: "127.0.0.1:7000".into() }
    }

    #[test]
    fn snapshots_round_trip_through_chunks() {
        for len in [0, 1, SNAPSHOT_CHUNK_BYTES, 2 * SNAPSHOT_CHUNK_BYTES + 5] {
            let message = snapshot_message(len);
            let chunks = snapshot_chunks(&me(), message.clone()).unwrap();
            assert_eq!(chunks.len(), len.div_ceil(SNAPSHOT_CHUNK_BYTES).max(1));
            let mut assembler = SnapshotAssembler::default();
            let mut out = None;
            for chunk in chunks {
                assert!(out.is_none());
                out = assembler.push(chunk).unwrap();
            }
            assert_eq!(out.unwrap(), message);
        }
    }

    /// A sender outside the receiver's configuration (a member removed by
    /// `cluster leave`, whose certificate stays valid) is refused even with
    /// an empty batch, which would otherwise refresh its address and the
    /// time the leader last heard from it.
    #[test]
    fn a_batch_from_outside_the_configuration_is_refused_even_when_empty() {
        let view = trust::View { me: 1, term: 3, leader: Some(1), configuration: [1, 2].into(), exact: None };
        let empty = |from| pb::RaftBatch { cluster_id: 7, from, sent_at_ms: 1 << 40, ..Default::default() };
        assert!(judge_batch(&view, &empty(2)).unwrap().is_empty());
        let refused = judge_batch(&view, &empty(3)).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains("member 3 is not in this member's configuration"), "{refused:?}");
    }

    #[test]
    fn corrupt_or_oversized_snapshots_are_refused() {
        let chunks = snapshot_chunks(&me(), snapshot_message(SNAPSHOT_CHUNK_BYTES + 10)).unwrap();

        let mut flipped = chunks.clone();
        flipped[1].data[3] ^= 1;
        let mut assembler = SnapshotAssembler::default();
        assembler.push(flipped[0].clone()).unwrap();
        assert_eq!(assembler.push(flipped[1].clone()).unwrap_err().code(), tonic::Code::DataLoss);

        let mut bad_sha = chunks.clone();
        bad_sha[1].sha256[0] ^= 1;
        let mut assembler = SnapshotAssembler::default();
        assembler.push(bad_sha[0].clone()).unwrap();
        assert_eq!(assembler.push(bad_sha[1].clone()).unwrap_err().code(), tonic::Code::DataLoss);

        let mut huge = chunks.clone();
        huge[0].total_size = SNAPSHOT_BYTES_MAX + 1;
        assert_eq!(
            SnapshotAssembler::default().push(huge[0].clone()).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );

        let mut short = chunks;
        short[0].total_size = 10;
        assert_eq!(
            SnapshotAssembler::default().push(short[0].clone()).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    /// A `Peer` server that damages the first `damaged` snapshot streams
    /// it receives (as a bad link would), and checks every stream with the
    /// real [`SnapshotAssembler`].
    struct Flaky {
        damaged: std::sync::atomic::AtomicUsize,
        received: Mutex<Vec<Message>>,
        /// Reads chunks as the real handler does, with short deadlines,
        /// and assembles nothing.
        deadlines: bool,
    }

    #[tonic::async_trait]
    impl pb::peer_server::Peer for Arc<Flaky> {
        async fn raft(&self, _: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn raft_stream(&self, _: Request<Streaming<pb::RaftBatch>>) -> Result<Response<pb::RaftAck>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn snapshot(
            &self,
            request: Request<Streaming<pb::SnapshotChunk>>,
        ) -> Result<Response<pb::RaftAck>, Status> {
            let damage = self.damaged.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
            let mut stream = request.into_inner();
            if self.deadlines {
                let deadline = tokio::time::Instant::now() + Duration::from_millis(600);
                loop {
                    next_chunk(&mut stream, deadline, Duration::from_millis(200)).await?;
                }
            }
            let mut assembler = SnapshotAssembler::default();
            let mut first = true;
            while let Some(mut chunk) = stream.message().await? {
                if damage && first && !chunk.data.is_empty() {
                    chunk.data[0] ^= 0x40;
                }
                first = false;
                if let Some(message) = assembler.push(chunk)? {
                    self.received.lock().unwrap().push(message);
                    return Ok(Response::new(pb::RaftAck {}));
                }
            }
            Err(Status::invalid_argument("ended early"))
        }
        async fn admit(&self, _: Request<pb::AdmitRequest>) -> Result<Response<pb::AdmitResponse>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn propose(&self, _: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeResponse>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn renew(&self, _: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
            Err(Status::unimplemented("test"))
        }
    }

    async fn flaky_server(damaged: usize) -> (Arc<Flaky>, String) {
        test_server(Flaky { damaged: damaged.into(), received: Mutex::new(Vec::new()), deadlines: false }).await
    }

    async fn test_server(flaky: Flaky) -> (Arc<Flaky>, String) {
        let flaky = Arc::new(flaky);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let service = pb::peer_server::PeerServer::new(flaky.clone()).max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (flaky, address)
    }

    /// A sender that stalls, or trickles chunks past the stream's
    /// deadline, is dropped: it cannot hold the one snapshot slot.
    #[tokio::test]
    async fn a_stalled_or_endless_snapshot_stream_is_dropped() {
        let flaky = Flaky { damaged: 0.into(), received: Mutex::new(Vec::new()), deadlines: true };
        let (_, address) = test_server(flaky).await;
        let channel = Dialer::plain().endpoint(&address).unwrap().connect().await.unwrap();
        // One chunk, then nothing.
        let (chunks, stalled) = mpsc::channel(4);
        chunks.send(pb::SnapshotChunk::default()).await.unwrap();
        let started = Instant::now();
        let status = peer_client(channel.clone())
            .snapshot(tokio_stream::wrappers::ReceiverStream::new(stalled))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // A chunk every 100 ms, forever: the whole stream's deadline ends it.
        let endless = futures_util::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((pb::SnapshotChunk::default(), ()))
        });
        let status = peer_client(channel).snapshot(endless).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        drop(chunks);
    }

    #[tokio::test]
    async fn a_damaged_snapshot_is_refused_and_sent_again() {
        let message = snapshot_message(2 * SNAPSHOT_CHUNK_BYTES + 3);
        let (flaky, address) = flaky_server(1).await;
        let chunks = snapshot_chunks(&me(), message.clone()).unwrap();
        let attempts = send_chunks(&Dialer::plain(), &address, chunks).await.unwrap();
        assert_eq!(attempts, 2, "the damaged first transfer is refused, the second installs");
        assert_eq!(*flaky.received.lock().unwrap(), vec![message.clone()]);

        // A link that damages every transfer: refused after the bounded
        // attempts, nothing assembled.
        let (flaky, address) = flaky_server(usize::MAX).await;
        let chunks = snapshot_chunks(&me(), message).unwrap();
        let error = send_chunks(&Dialer::plain(), &address, chunks).await.unwrap_err();
        assert!(error.contains("CRC-32C"), "{error}");
        assert!(flaky.received.lock().unwrap().is_empty());
    }
}

#[cfg(test)]
mod transport_tests {
    use std::collections::BTreeSet;

    use super::*;

    /// A `Peer` server that records each batch's messages and how they
    /// came; `streams` says whether it has `RaftStream` (a member that
    /// predates it answers `Unimplemented`).
    struct Recorder {
        streams: bool,
        batches: Mutex<Vec<Received>>,
    }

    /// How a batch came ("stream" or "call") and its encoded messages.
    type Received = (&'static str, Vec<Vec<u8>>);

    #[tonic::async_trait]
    impl pb::peer_server::Peer for Arc<Recorder> {
        async fn raft(&self, request: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
            self.batches.lock().unwrap().push(("call", request.into_inner().messages));
            Ok(Response::new(pb::RaftAck {}))
        }
        async fn raft_stream(
            &self,
            request: Request<Streaming<pb::RaftBatch>>,
        ) -> Result<Response<pb::RaftAck>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("not in this version"));
            }
            let mut stream = request.into_inner();
            while let Some(batch) = stream.message().await? {
                self.batches.lock().unwrap().push(("stream", batch.messages));
            }
            Ok(Response::new(pb::RaftAck {}))
        }
        async fn snapshot(&self, _: Request<Streaming<pb::SnapshotChunk>>) -> Result<Response<pb::RaftAck>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn admit(&self, _: Request<pb::AdmitRequest>) -> Result<Response<pb::AdmitResponse>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn propose(&self, _: Request<pb::ProposeRequest>) -> Result<Response<pb::ProposeResponse>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn renew(&self, _: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
            Err(Status::unimplemented("test"))
        }
    }

    async fn recorder(streams: bool) -> (Arc<Recorder>, PeerTransport) {
        recorder_with(streams, None).await
    }

    async fn recorder_with(streams: bool, datagrams: Option<Arc<DatagramPath>>) -> (Arc<Recorder>, PeerTransport) {
        let recorder = Arc::new(Recorder { streams, batches: Mutex::new(Vec::new()) });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::peer_server::PeerServer::new(recorder.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let addresses: AddressBook = Arc::default();
        addresses.write().unwrap().insert(2, address);
        let me = Sender { id: 1, cluster_id: 7, address: "127.0.0.1:7000".into() };
        let (transport, _link) =
            PeerTransport::new(me, addresses, Dialer::plain(), datagrams, tokio::runtime::Handle::current());
        (recorder, transport)
    }

    fn heartbeat(commit: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = 1;
        m.to = 2;
        m.commit = commit;
        m
    }

    /// The commits of the heartbeats `recorder` received, and how they came.
    fn received(recorder: &Recorder) -> (Vec<u64>, BTreeSet<&'static str>) {
        let batches = recorder.batches.lock().unwrap();
        let commits = batches
            .iter()
            .flat_map(|(_, messages)| messages.iter().map(|m| Message::parse_from_bytes(m).unwrap().commit))
            .collect();
        (commits, batches.iter().map(|(how, _)| *how).collect())
    }

    async fn wait_for(recorder: &Recorder, commit: u64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if received(recorder).0.contains(&commit) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// Sends heartbeats `1..=n` one at a time: each arrives exactly once,
    /// in order, on the stream.
    async fn heartbeats_arrive_on_the_stream(recorder: &Recorder, transport: &mut PeerTransport, n: u64) {
        for commit in 1..=n {
            transport.send(2, vec![heartbeat(commit)]);
            assert!(wait_for(recorder, commit, Duration::from_secs(10)).await, "heartbeat {commit} never arrived");
        }
        let (commits, how) = received(recorder);
        assert_eq!(commits, (1..=n).collect::<Vec<_>>(), "each exactly once, in order");
        assert_eq!(how, BTreeSet::from(["stream"]));
    }

    /// An append from leader 1 (term 3) to 2: after `index` (of `log_term`),
    /// entries `first..=last` of term 3, leader commit `commit`.
    fn append(index: u64, log_term: u64, entries: std::ops::RangeInclusive<u64>, commit: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = 2;
        m.term = 3;
        m.index = index;
        m.log_term = log_term;
        m.commit = commit;
        m.commit_term = 3;
        for i in entries {
            m.entries.push(raft::eraftpb::Entry {
                index: i,
                term: 3,
                data: vec![i as u8; 16].into(),
                ..Default::default()
            });
        }
        m
    }

    /// [`merge_appends`] with `first`'s entry bytes counted afresh.
    fn merge(first: &mut Message, next: &Message) -> bool {
        let mut bytes = entry_bytes(first);
        merge_appends(first, &mut bytes, next)
    }

    fn indexes(m: &Message) -> Vec<u64> {
        m.entries.iter().map(|e| e.index).collect()
    }

    #[test]
    fn consecutive_appends_merge_and_nothing_else_does() {
        // 5..=6 then 7..=9: one message, the later commit.
        let mut first = append(4, 3, 5..=6, 4);
        assert!(merge(&mut first, &append(6, 3, 7..=9, 6)));
        assert_eq!(indexes(&first), vec![5, 6, 7, 8, 9]);
        assert_eq!((first.index, first.log_term, first.commit), (4, 3, 6));
        // A commit-only append (no entries) continues from its own index.
        let mut only_commit = append(9, 3, 1..=1, 7);
        only_commit.entries.clear();
        assert!(merge(&mut only_commit, &append(9, 3, 10..=10, 9)));
        assert_eq!((indexes(&only_commit), only_commit.commit), (vec![10], 9));
        // An older commit does not move the merged one back.
        let mut newer = append(4, 3, 5..=5, 5);
        assert!(merge(&mut newer, &append(5, 3, 6..=6, 4)));
        assert_eq!(newer.commit, 5);

        let base = append(4, 3, 5..=6, 4);
        let refused = [
            ("a gap", append(7, 3, 8..=8, 4)),
            ("an overlap", append(5, 3, 6..=7, 4)),
            ("another previous term", append(6, 2, 7..=7, 4)),
            ("another term", {
                let mut m = append(6, 3, 7..=7, 4);
                m.term = 4;
                m
            }),
            ("a heartbeat", heartbeat(6)),
            ("another receiver", {
                let mut m = append(6, 3, 7..=7, 4);
                m.to = 3;
                m
            }),
        ];
        for (what, next) in refused {
            let mut first = base.clone();
            assert!(!merge(&mut first, &next), "{what} merged");
            assert_eq!(first, base, "{what} changed the first message");
        }
        let mut heartbeat_first = heartbeat(6);
        assert!(!merge(&mut heartbeat_first, &append(6, 3, 7..=7, 4)));

        // Within raft-rs's own bound per message.
        let mut big = append(0, 0, 1..=1, 0);
        big.entries[0].data = vec![0; MERGED_APPEND_BYTES_MAX].into();
        assert!(!merge(&mut big, &append(1, 3, 2..=2, 0)));
    }

    #[tokio::test]
    async fn a_learner_gets_what_was_queued_in_its_pace_as_one_merged_append() {
        let pace = Duration::from_secs(1);
        let (recorder, transport) = recorder(true).await;
        let mut transport = transport.with_learner_pace(pace);
        transport.set_learners(&[2]);
        let arrived = |recorder: &Recorder| -> Vec<Message> {
            let batches = recorder.batches.lock().unwrap();
            batches.iter().flat_map(|(_, ms)| ms.iter().map(|m| Message::parse_from_bytes(m).unwrap())).collect()
        };
        let wait_entry = async |index: u64| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !arrived(&recorder).iter().any(|m| m.entries.iter().any(|e| e.index == index)) {
                assert!(Instant::now() < deadline, "entry {index} never arrived");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        // After a quiet spell the first goes at once.
        transport.send(2, vec![append(0, 0, 1..=1, 0)]);
        wait_entry(1).await;
        let first_seen = Instant::now();
        for i in 2..=10 {
            transport.send(2, vec![append(i - 1, 3, i..=i, i - 1)]);
        }
        wait_entry(10).await;
        let gap = first_seen.elapsed();
        assert!(gap >= pace / 2, "the second batch came {gap:?} after the first; the pace is {pace:?}");
        let messages = arrived(&recorder);
        assert_eq!(messages.len(), 2, "one message per batch: {messages:?}");
        assert_eq!(indexes(&messages[1]), (2..=10).collect::<Vec<_>>());
        assert_eq!((messages[1].index, messages[1].commit), (1, 9));
        assert_eq!(recorder.batches.lock().unwrap().len(), 2);

        // A learner promoted to voter is paced no more.
        transport.set_learners(&[]);
        assert_eq!(transport.peers[&2].pace_ms.load(Ordering::Relaxed), 0);
        transport.set_learners(&[2, 5]);
        assert_eq!(transport.peers[&2].pace_ms.load(Ordering::Relaxed), pace.as_millis() as u64);
    }

    #[tokio::test]
    async fn batches_go_as_frames_on_one_stream() {
        let (recorder, mut transport) = recorder(true).await;
        heartbeats_arrive_on_the_stream(&recorder, &mut transport, 20).await;
    }

    #[tokio::test]
    async fn a_peer_without_streams_gets_one_call_per_batch() {
        let (recorder, mut transport) = recorder(false).await;
        for commit in 1..=5 {
            // Resent like Raft would: what went onto the refused stream
            // before its refusal came back is lost.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                transport.send(2, vec![heartbeat(commit)]);
                if wait_for(&recorder, commit, Duration::from_millis(200)).await {
                    break;
                }
                assert!(Instant::now() < deadline, "heartbeat {commit} never arrived");
            }
        }
        let (commits, how) = received(&recorder);
        assert!((1..=5).all(|c| commits.contains(&c)), "{commits:?}");
        assert_eq!(how, BTreeSet::from(["call"]));
    }

    /// Heartbeats and quorum contact still get through as datagrams while
    /// the peer's TCP is stalled (a listener that takes connections and
    /// never reads them); appends with entries never go that way.
    #[tokio::test]
    async fn heartbeats_and_contact_go_as_datagrams_while_tcp_stalls() {
        use crate::api::datagram::tests::{member, recorder as datagram_recorder, wait_until};
        let secret = crate::pki::ClusterSecret::generate().unwrap();
        // The peer: its datagram path, and a stalled TCP listener on the
        // same port number.
        let (at, received, _stop, stalled) = loop {
            let (udp, received, stop) = datagram_recorder(&member(&secret, "h2"), "127.0.0.1:0");
            let at = udp.local_addr().unwrap();
            if let Ok(stalled) = tokio::net::TcpListener::bind(at).await {
                break (at, received, stop, stalled);
            }
        };
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = stalled.accept().await {
                held.push(socket);
            }
        });
        let addresses: AddressBook = Arc::default();
        addresses.write().unwrap().insert(2, at.to_string());
        let path = DatagramPath::bind("127.0.0.1:0".parse().unwrap(), &member(&secret, "h1")).unwrap();
        let me = Sender { id: 1, cluster_id: 7, address: "127.0.0.1:7000".into() };
        let (mut transport, _link) =
            PeerTransport::new(me, addresses, Dialer::plain(), Some(Arc::new(path)), tokio::runtime::Handle::current());
        let mut append = heartbeat(100);
        append.set_msg_type(MessageType::MsgAppend);
        append.set_entries(vec![raft::eraftpb::Entry::default()].into());
        transport.send(2, vec![append]);
        transport.confirm_contact(2, Contact { sent_at_ms: 42, commit: 9 });
        let commits = || -> Vec<u64> {
            let batches = received.lock().unwrap();
            batches
                .iter()
                .flat_map(|(_, b)| b.messages.iter().map(|m| Message::parse_from_bytes(m).unwrap().commit))
                .collect()
        };
        for commit in 1..=5 {
            transport.send(2, vec![heartbeat(commit)]);
            wait_until("a heartbeat as a datagram", || commits().contains(&commit)).await;
        }
        let batches = received.lock().unwrap();
        assert!(batches.iter().all(|(speaker, b)| *speaker == Speaker::Member("h1".into()) && b.from == 1));
        let confirmed: Vec<_> = batches.iter().filter_map(|(_, b)| b.confirmation).collect();
        assert_eq!(confirmed, vec![pb::ContactConfirmation { sent_at_ms: 42, commit: 9 }]);
        drop(batches);
        assert!(!commits().contains(&100), "an append with entries went as a datagram");
    }

    /// A peer whose UDP port takes nothing (blocked, or an older agent)
    /// gets everything over its stream all the same.
    #[tokio::test]
    async fn a_peer_without_udp_gets_everything_over_tcp() {
        use crate::api::datagram::tests::member;
        let secret = crate::pki::ClusterSecret::generate().unwrap();
        let path = DatagramPath::bind("127.0.0.1:0".parse().unwrap(), &member(&secret, "h1")).unwrap();
        let (recorder, mut transport) = recorder_with(true, Some(Arc::new(path))).await;
        transport.shared.datagram_warn_after_ms.store(0, Ordering::Relaxed);
        let logs = Captured::default();
        let subscriber =
            tracing_subscriber::fmt().with_writer(logs.clone()).with_max_level(tracing::Level::WARN).finish();
        // This test's runtime runs the transport's tasks on this thread.
        let _logging = tracing::subscriber::set_default(subscriber);
        heartbeats_arrive_on_the_stream(&recorder, &mut transport, 10).await;
        // The dial times out (nothing answers on UDP) while TCP works: one
        // warning, which names the remedy.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !logs.text().contains("no datagram path") {
            assert!(Instant::now() < deadline, "no warning: {}", logs.text());
            transport.send(2, vec![heartbeat(11)]);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(logs.text().matches("no datagram path").count(), 1, "{}", logs.text());
        assert!(logs.text().contains("open UDP to its gRPC port"), "{}", logs.text());
    }

    /// Log lines written by a test's subscriber.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }
}

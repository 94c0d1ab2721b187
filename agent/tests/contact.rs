//! Quorum contact confirmed by the leader's heartbeat rounds, with real
//! nodes in one process and a transport that carries send times and
//! confirmations as the gRPC one does: every host's contact stays fresh
//! with no read of its own, and a host the leader cannot hear gets none.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blixard::clock::monotonic_ms;
use blixard::config::InitialMember;
use blixard::node::{self, AddressBook, Contact, Node, NodeHandle, NodeOptions, PeerSender, Start};
use blixard::state::NodeId;
use raft::eraftpb::{Message, MessageType};

#[derive(Default)]
struct Net {
    peers: BTreeMap<NodeId, NodeHandle>,
    /// Hosts whose frames are lost on the way out (they still receive).
    muted: BTreeSet<NodeId>,
    /// Confirmations waiting for the next frame to their host.
    confirmations: BTreeMap<NodeId, Contact>,
    read_requests: usize,
}

type Shared = Arc<Mutex<Net>>;

struct LocalSender {
    from: NodeId,
    net: Shared,
}

impl PeerSender for LocalSender {
    fn send(&mut self, to: NodeId, messages: Vec<Message>) {
        let mut net = self.net.lock().unwrap();
        net.read_requests += messages.iter().filter(|m| m.get_msg_type() == MessageType::MsgReadIndex).count();
        if net.muted.contains(&self.from) {
            return;
        }
        let Some(peer) = net.peers.get(&to).cloned() else { return };
        let confirmation = net.confirmations.remove(&to);
        drop(net);
        peer.step_frame(self.from, monotonic_ms(), messages, confirmation);
    }

    fn confirm_contact(&mut self, to: NodeId, contact: Contact) {
        let mut net = self.net.lock().unwrap();
        let newest = net.confirmations.get(&to).map_or(contact, |c| c.max(contact));
        net.confirmations.insert(to, newest);
    }
}

struct Cluster {
    net: Shared,
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<InitialMember> =
            (1..=n).map(|i| InitialMember { name: format!("h{i}"), address: format!("127.0.0.{i}:7000") }).collect();
        let net = Shared::default();
        let mut nodes = Vec::new();
        for member in &members {
            let mut store = node::open_store(&dir.path().join(&member.name)).unwrap();
            let identity = node::prepare_store(&mut store, &member.name, &Start::InitialMembers(&members)).unwrap();
            let sender = Box::new(LocalSender { from: identity.id, net: net.clone() });
            let node =
                Node::start(store, NodeOptions::new(identity.id), sender, AddressBook::default(), BTreeMap::new())
                    .unwrap();
            net.lock().unwrap().peers.insert(identity.id, node.handle());
            nodes.push(node);
        }
        Cluster { net, nodes, _dir: dir }
    }

    fn leader(&self) -> Option<usize> {
        self.nodes.iter().position(|n| n.handle().status().role == blixard::consensus::Role::Leader)
    }

    fn contact(&self, i: usize) -> Option<Contact> {
        *self.nodes[i].handle().watch_contact().borrow()
    }

    fn wait_until(&self, what: &str, mut ok: impl FnMut(&Cluster) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Contact at or after `since_ms`.
fn fresh(contact: Option<Contact>, since_ms: u64) -> bool {
    contact.is_some_and(|c| c.sent_at_ms >= since_ms)
}

#[test]
fn every_host_gets_quorum_contact_from_the_leaders_heartbeats_without_reading() {
    let c = Cluster::start(3);
    c.wait_until("a leader", |c| c.leader().is_some());
    let since = monotonic_ms();
    c.wait_until("every host's contact to be renewed", |c| (0..3).all(|i| fresh(c.contact(i), since)));
    // And it keeps being renewed, each time to a send time of the host's
    // own after the last, with the commit index of the leader's read.
    let again = monotonic_ms();
    c.wait_until("every host's contact to be renewed again", |c| (0..3).all(|i| fresh(c.contact(i), again)));
    let leader_commit = c.nodes[c.leader().unwrap()].handle().status().commit;
    for i in 0..3 {
        let contact = c.contact(i).unwrap();
        assert!(contact.sent_at_ms <= monotonic_ms());
        assert!(contact.commit > 0 && contact.commit <= leader_commit, "{contact:?} vs commit {leader_commit}");
    }
    assert_eq!(c.net.lock().unwrap().read_requests, 0, "nobody had to read its contact");
}

#[test]
fn a_host_the_leader_cannot_hear_gets_no_contact_even_though_it_hears_the_leader() {
    let c = Cluster::start(3);
    c.wait_until("a leader", |c| c.leader().is_some());
    let leader = c.leader().unwrap();
    let cut = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let cut_id = c.nodes[cut].handle().status().id;
    let since = monotonic_ms();
    c.wait_until("every host's contact to be renewed", |c| (0..3).all(|i| fresh(c.contact(i), since)));

    // One-way partition: the cut host still receives the leader's
    // heartbeats (and would accept any confirmation), but nothing it sends
    // arrives. (Muted hosts also do not campaign anywhere, so the leader
    // stays.)
    let muted_at = monotonic_ms();
    c.net.lock().unwrap().muted.insert(cut_id);
    let later = muted_at + 1_000;
    c.wait_until("the others' contact to pass the cut by a second", |c| {
        fresh(c.contact(other), later) && fresh(c.contact(leader), later)
    });
    let contact = c.contact(cut).unwrap();
    assert!(
        // A frame sent in the millisecond of the cut, before it, may count.
        contact.sent_at_ms <= muted_at,
        "the cut host got contact for {} ms after it was cut at {muted_at}",
        contact.sent_at_ms
    );
    assert_eq!(c.leader(), Some(leader));
}

#[test]
fn only_the_current_leaders_confirmations_count_and_never_for_the_future() {
    let c = Cluster::start(3);
    c.wait_until("a leader", |c| c.leader().is_some());
    let leader = c.leader().unwrap();
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let (leader_id, other_id) = (c.nodes[leader].handle().status().id, c.nodes[other].handle().status().id);
    c.wait_until("the follower's first contact", |c| c.contact(follower).is_some());
    // Every host is muted: no real confirmation arrives from here on.
    for node in &c.nodes {
        c.net.lock().unwrap().muted.insert(node.handle().status().id);
    }
    let before = c.contact(follower).unwrap();
    let target = c.nodes[follower].handle();
    let forged = |sent_at_ms| Contact { sent_at_ms, commit: before.commit };
    c.wait_until("some time to pass since the last contact", |_| monotonic_ms() > before.sent_at_ms + 50);
    // Times in the follower's past, newer than anything it had: `newest`
    // from a member that is not the leader, `genuine` (older) from the leader.
    let newest = monotonic_ms();
    let genuine = newest - 20;
    target.step_frame(other_id, newest, Vec::new(), Some(forged(newest)));
    // From the leader, but for a time later than the follower's clock
    // (what a forged confirmation of u64::MAX did before: no fence ever).
    target.step_frame(leader_id, newest, Vec::new(), Some(forged(u64::MAX)));
    target.step_frame(leader_id, newest, Vec::new(), Some(forged(monotonic_ms() + 60_000)));
    // Frames are handled in order: the genuine one last shows the others
    // were looked at.
    target.step_frame(leader_id, genuine, Vec::new(), Some(forged(genuine)));
    c.wait_until("the genuine confirmation", |c| fresh(c.contact(follower), genuine));
    let contact = c.contact(follower).unwrap();
    assert_eq!(contact.sent_at_ms, genuine, "a forged confirmation counted: {contact:?}");
}

/// `NodeHandle::stopped` ends when the raft thread ends, and not at the
/// commits that change the node's status on the way (which is why the
/// daemon waits on it rather than on the status: it woke at every commit).
#[test]
fn stopped_ends_with_the_raft_thread_and_not_at_a_commit() {
    use blixard::state::{Capacity, CommandKind};
    use futures_util::FutureExt as _;

    let mut c = Cluster::start(1);
    c.wait_until("a leader", |c| c.leader().is_some());
    let handle = c.nodes[0].handle();
    let id = handle.status().id;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let stopped = handle.stopped();
        tokio::pin!(stopped);
        let mut status = handle.watch_status();
        status.borrow_and_update();
        for vcpu in 1..=3 {
            let capacity = Capacity { vcpu, memory_mib: 4096, ..Capacity::default() };
            handle.propose(CommandKind::SetCapacity { node: id, capacity }).await.unwrap();
        }
        assert!(status.has_changed().unwrap(), "the commits changed the status");
        assert!(stopped.as_mut().now_or_never().is_none(), "stopped() ended while the raft thread runs");
        let node = c.nodes.pop().unwrap();
        let shutdown = std::thread::spawn(move || node.shutdown());
        tokio::time::timeout(Duration::from_secs(20), stopped).await.expect("stopped() never ended");
        shutdown.join().unwrap().unwrap();
    });
}

//! Benchmark: proposals per second and commit latency of a 3-node
//! in-process cluster with real redb files and fsync on.
//!
//! Three `node::Node`s (each with its raft thread and its own redb file in
//! a temporary directory) exchange messages through in-memory channels;
//! clients keep 1, 16 or 64 `CreateVm` proposals in flight at the leader
//! and time each from submission to its applied outcome. What Raft hands
//! over in one `Ready` is written in one redb transaction, so more
//! proposals in flight share each fsync.
//!
//! Run: `cargo bench -p blixard-agent --bench consensus`
//! (`BLIXARD_BENCH_SECONDS` sets the time per level, default 5;
//! `BLIXARD_BENCH_DIR` the directory for the redb files, default the
//! system temp dir — put it on the disk you want to measure).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blixard::config::InitialMember;
use blixard::node::{self, AddressBook, Node, NodeHandle, NodeOptions, PeerSender, Start, member_id_of};
use blixard::state::{CommandKind, NodeId, VmSpec};
use raft::eraftpb::{Message, MessageType};

/// Delivers messages straight into the destination node's queue.
struct LocalSender {
    from: NodeId,
    peers: Arc<Mutex<BTreeMap<NodeId, NodeHandle>>>,
}

impl PeerSender for LocalSender {
    fn send(&mut self, to: NodeId, messages: Vec<Message>) {
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let Some(peer) = peers.get(&to) else { return };
        let snapshot = messages.iter().any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        peer.step(self.from, messages);
        if snapshot && let Some(me) = peers.get(&self.from) {
            me.report_snapshot(to, true);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn run_level(
    leader: NodeHandle,
    in_flight: usize,
    seconds: f64,
    level: usize,
) -> (f64, Duration, Duration, usize) {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for client in 0..in_flight {
        let leader = leader.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let name = format!("l{level}-c{client}-{i}");
                i += 1;
                let spec = VmSpec { vcpu: 1, memory_mib: 128, ..VmSpec::default() };
                let started = Instant::now();
                leader.propose(CommandKind::CreateVm { name, spec }).await.expect("proposal applied");
                latencies.push(started.elapsed());
            }
            latencies
        }));
    }
    let started = Instant::now();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("client task"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    (all.len() as f64 / elapsed, percentile(&all, 50.0), percentile(&all, 99.0), all.len())
}

fn main() {
    let seconds: f64 = std::env::var("BLIXARD_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let base = std::env::var_os("BLIXARD_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");

    let members: Vec<InitialMember> =
        (1..=3).map(|i| InitialMember { name: format!("b{i}"), address: format!("127.0.0.{i}:7000") }).collect();
    let peers: Arc<Mutex<BTreeMap<NodeId, NodeHandle>>> = Arc::default();
    let mut nodes = Vec::new();
    for member in &members {
        let mut store = node::open_store(&dir.path().join(&member.name)).expect("store");
        let identity =
            node::prepare_store(&mut store, &member.name, &Start::InitialMembers(&members)).expect("bootstrap");
        let options = NodeOptions { request_timeout: Duration::from_secs(30), ..NodeOptions::new(identity.id) };
        let sender = Box::new(LocalSender { from: identity.id, peers: peers.clone() });
        let book: AddressBook = AddressBook::default();
        let node = Node::start(store, options, sender, book, BTreeMap::new()).expect("node starts");
        peers.lock().unwrap_or_else(|e| e.into_inner()).insert(identity.id, node.handle());
        nodes.push(node);
    }

    let leader = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(node) = nodes.iter().find(|n| n.handle().status().role == blixard::consensus::Role::Leader) {
                return node.handle();
            }
            assert!(Instant::now() < deadline, "no leader within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert!(members.iter().any(|m| member_id_of(&m.name) == leader.status().id));

    println!("3-node in-process cluster, redb files with fsync in {}", dir.path().display());
    println!("{:>9} {:>12} {:>10} {:>10} {:>9}", "in flight", "proposals/s", "p50 ms", "p99 ms", "samples");
    for (level, in_flight) in [1usize, 16, 64].into_iter().enumerate() {
        let (rate, p50, p99, samples) = runtime.block_on(run_level(leader.clone(), in_flight, seconds, level));
        println!(
            "{:>9} {:>12.0} {:>10.2} {:>10.2} {:>9}",
            in_flight,
            rate,
            p50.as_secs_f64() * 1000.0,
            p99.as_secs_f64() * 1000.0,
            samples
        );
    }
    peers.lock().unwrap_or_else(|e| e.into_inner()).clear();
    for node in nodes {
        node.shutdown().expect("clean shutdown");
    }
}

//! The reconciler with the process runtime and real nodes in one process:
//! VMs start where they are placed, stop when they should, report their
//! state, and fail over when their host is lost.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blixard::config::InitialMember;
use blixard::node::{self, AddressBook, Node, NodeError, NodeHandle, NodeOptions, PeerSender, Start};
use blixard::reconciler::{BoxFuture, Proposer, Reconciler, ReconcilerConfig};
use blixard::runtime::Runtime;
use blixard::runtime::health::HealthPolicy;
use blixard::runtime::process::{ProcessConfig, ProcessRuntime};
use blixard::state::{Capacity, CommandKind, Desired, Effect, NodeId, State, VmSpec, VmState};
use raft::eraftpb::{Message, MessageType};

type Peers = Arc<Mutex<BTreeMap<NodeId, NodeHandle>>>;

struct LocalSender {
    from: NodeId,
    peers: Peers,
}

impl PeerSender for LocalSender {
    fn send(&mut self, to: NodeId, messages: Vec<Message>) {
        let peers = self.peers.lock().unwrap();
        let Some(peer) = peers.get(&to) else { return };
        let snapshot = messages.iter().any(|m| m.get_msg_type() == MessageType::MsgSnapshot);
        peer.step(self.from, messages);
        if snapshot && let Some(me) = peers.get(&self.from) {
            me.report_snapshot(to, true);
        }
    }
}

/// Proposes at whichever live node leads.
struct LeaderProposer {
    peers: Peers,
}

impl LeaderProposer {
    async fn propose_at_leader(&self, kind: CommandKind) -> Result<Effect, NodeError> {
        let leader = {
            let peers = self.peers.lock().unwrap();
            peers.values().find(|h| h.status().role == blixard::consensus::Role::Leader).cloned()
        };
        match leader {
            Some(leader) => leader.propose(kind).await,
            None => Err(NodeError::NoLeader),
        }
    }
}

impl Proposer for LeaderProposer {
    fn propose(&self, kind: CommandKind) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.propose_at_leader(kind).await.map(|_| ()).map_err(|e| e.to_string()) })
    }
}

fn install_guest(state_dir: &Path, name: &str) {
    let bin = state_dir.join(name).join("current").join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let runner = bin.join("microvm-run");
    std::fs::write(&runner, "#!/bin/sh\nexec sleep 1000\n").unwrap();
    std::fs::set_permissions(&runner, std::fs::Permissions::from_mode(0o755)).unwrap();
}

struct Host {
    id: NodeId,
    node: Option<Node>,
    reconciler: Option<tokio::task::JoinHandle<()>>,
    runtime: Option<Arc<ProcessRuntime>>,
}

struct Cluster {
    peers: Peers,
    hosts: Vec<Host>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(n: usize, guests: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<InitialMember> =
            (1..=n).map(|i| InitialMember { name: format!("h{i}"), address: format!("127.0.0.{i}:7000") }).collect();
        let peers: Peers = Arc::default();
        let mut hosts = Vec::new();
        for member in &members {
            let root = dir.path().join(&member.name);
            let state_dir = root.join("microvms");
            for guest in guests {
                install_guest(&state_dir, guest);
            }
            let mut store = node::open_store(&root.join("data")).unwrap();
            let identity = node::prepare_store(&mut store, &member.name, &Start::InitialMembers(&members)).unwrap();
            let options = NodeOptions::new(identity.id);
            let sender = Box::new(LocalSender { from: identity.id, peers: peers.clone() });
            let node = Node::start(store, options, sender, AddressBook::default(), BTreeMap::new()).unwrap();
            let handle = node.handle();
            peers.lock().unwrap().insert(identity.id, handle.clone());
            let runtime = Arc::new(ProcessRuntime::new(ProcessConfig::new(&state_dir)).unwrap());
            let config = ReconcilerConfig {
                timing: options_timing(),
                health: HealthPolicy::default(),
                contact_file: None,
                exempt_file: None,
                metrics: handle.metrics(),
                runners: None,
            };
            let reconciler = Reconciler::new(
                identity.id,
                handle,
                runtime.clone() as Arc<dyn Runtime>,
                Arc::new(LeaderProposer { peers: peers.clone() }),
                config,
            );
            let task = tokio::spawn(async move {
                reconciler.run(std::future::pending()).await.unwrap();
            });
            hosts.push(Host { id: identity.id, node: Some(node), reconciler: Some(task), runtime: Some(runtime) });
        }
        let cluster = Cluster { peers, hosts, _dir: dir };
        // Every host offers 4 vcpu and 4 GiB.
        for host in &cluster.hosts {
            let capacity = Capacity { vcpu: 4, memory_mib: 4096, ..Capacity::default() };
            cluster.propose(CommandKind::SetCapacity { node: host.id, capacity }).await;
        }
        cluster
    }

    async fn propose(&self, kind: CommandKind) -> Effect {
        let proposer = LeaderProposer { peers: self.peers.clone() };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match proposer.propose_at_leader(kind.clone()).await {
                Ok(effect) => return effect,
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{kind:?}: {e}"),
            }
        }
    }

    /// Reads the state on any live node.
    async fn state(&self) -> State {
        let handle = self.peers.lock().unwrap().values().next().cloned().unwrap();
        handle.read_local(|state, _| state.clone()).await.unwrap()
    }

    /// Waits until `f` holds of the state (with a deadline, polling).
    async fn wait_until(&self, what: &str, timeout: Duration, f: impl Fn(&State) -> bool) -> State {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.state().await;
            if f(&state) {
                return state;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; state: {state:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Loses host `i` as a power cut would: its node and reconciler stop and
    /// its guests die with its runtime.
    fn power_off(&mut self, i: usize) {
        let host = &mut self.hosts[i];
        self.peers.lock().unwrap().remove(&host.id);
        host.reconciler.take().unwrap().abort();
        drop(host.node.take());
        drop(host.runtime.take());
    }

    async fn running_on(&self, i: usize, vm: &str) -> bool {
        match &self.hosts[i].runtime {
            Some(runtime) => runtime.state(vm).await.is_ok_and(|s| s.phase == blixard::runtime::Phase::Active),
            None => false,
        }
    }
}

fn options_timing() -> blixard::failure::Timing {
    blixard::failure::Timing::default()
}

fn spec() -> VmSpec {
    VmSpec { vcpu: 1, memory_mib: 256, ..VmSpec::default() }
}

fn running_where(state: &State, vm: &str) -> Option<NodeId> {
    let vm = state.vm(vm)?;
    (vm.observed.state == VmState::Running).then(|| vm.placement.map(|p| p.node)).flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_start_stop_and_report_on_the_host_they_are_placed_on() {
    let cluster = Cluster::start(1, &["web", "db"]).await;
    cluster.propose(CommandKind::CreateVm { name: "web".into(), spec: spec() }).await;
    let state = cluster.wait_until("web running", Duration::from_secs(20), |s| running_where(s, "web").is_some()).await;
    assert_eq!(running_where(&state, "web"), Some(cluster.hosts[0].id));
    assert!(cluster.running_on(0, "web").await);

    cluster.propose(CommandKind::SetDesired { name: "web".into(), desired: Desired::Stopped }).await;
    cluster
        .wait_until("web stopped", Duration::from_secs(20), |s| {
            s.vm("web").is_some_and(|v| v.observed.state == VmState::Stopped)
        })
        .await;
    assert!(!cluster.running_on(0, "web").await);

    cluster.propose(CommandKind::SetDesired { name: "web".into(), desired: Desired::Running }).await;
    cluster.wait_until("web running again", Duration::from_secs(20), |s| running_where(s, "web").is_some()).await;
    cluster.propose(CommandKind::DeleteVm { name: "web".into() }).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.running_on(0, "web").await {
        assert!(Instant::now() < deadline, "a deleted VM kept running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_hosts_vm_runs_on_a_survivor_and_never_on_two() {
    let mut cluster = Cluster::start(3, &["web"]).await;
    cluster.propose(CommandKind::CreateVm { name: "web".into(), spec: spec() }).await;
    let state = cluster.wait_until("web running", Duration::from_secs(20), |s| running_where(s, "web").is_some()).await;
    let first = running_where(&state, "web").unwrap();
    let lost = cluster.hosts.iter().position(|h| h.id == first).unwrap();
    cluster.power_off(lost);
    let state = cluster
        .wait_until("web running on a survivor", Duration::from_secs(30), |s| {
            running_where(s, "web").is_some_and(|n| n != first)
        })
        .await;
    let second = running_where(&state, "web").unwrap();
    let mut copies = 0;
    for i in 0..cluster.hosts.len() {
        if cluster.running_on(i, "web").await {
            copies += 1;
            assert_eq!(cluster.hosts[i].id, second);
        }
    }
    assert_eq!(copies, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_stops_on_the_source_before_starting_on_the_target() {
    let cluster = Cluster::start(2, &["web"]).await;
    cluster.propose(CommandKind::CreateVm { name: "web".into(), spec: spec() }).await;
    let state = cluster.wait_until("web running", Duration::from_secs(20), |s| running_where(s, "web").is_some()).await;
    let from = running_where(&state, "web").unwrap();
    let to = cluster.hosts.iter().map(|h| h.id).find(|id| *id != from).unwrap();
    // The target must have reported its runner before it can take the VM.
    let state = cluster
        .wait_until("the target reports its runner", Duration::from_secs(20), |s| {
            s.member(to).is_some_and(|m| m.runners.contains("web"))
        })
        .await;
    let generation = state.vm("web").unwrap().generation;
    cluster.propose(CommandKind::Place { vm: "web".into(), node: to, expected_generation: generation }).await;
    // Until the source released it, the target must not run it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let source = cluster.hosts.iter().position(|h| h.id == from).unwrap();
    let target = 1 - source;
    loop {
        let on_source = cluster.running_on(source, "web").await;
        let on_target = cluster.running_on(target, "web").await;
        assert!(!(on_source && on_target), "web ran on both hosts");
        if on_target && !on_source {
            break;
        }
        assert!(Instant::now() < deadline, "web never arrived on the target");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cluster
        .wait_until("web reported running on the target", Duration::from_secs(20), |s| {
            running_where(s, "web") == Some(to)
        })
        .await;
}

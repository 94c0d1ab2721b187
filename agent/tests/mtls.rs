//! Mutual TLS end to end: three real agents (`blixard-agent run`) with
//! certificates made by `blixard-agent certs`, driven through the CLI, and
//! hostile callers speaking gRPC to them directly with the wrong
//! certificate, no certificate, or a certificate from another CA.

mod cli_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blixard::api::pb;
use blixard::api::pb::blixard_client::BlixardClient;
use blixard::api::pb::peer_client::PeerClient;
use blixard::config::InitialMember;
use blixard::node::{cluster_id_of, member_id_of};
use cli_support::{BIN, Out, run};
use protobuf::Message as _;
use serde_json::Value;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const SETTLE: Duration = Duration::from_secs(40);

struct Agent {
    name: String,
    child: Child,
    /// The HTTP listener (`metrics_listen`).
    http: String,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    pki: PathBuf,
    members: Vec<InitialMember>,
    agents: Vec<Agent>,
}

fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").to_string()
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

impl Cluster {
    /// A CA and certificates made by `blixard-agent certs`, and `n` agents
    /// with `[tls]` forming one cluster through `initial_members`.
    fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        run(&["certs", "ca", "--dir", s(&pki)]).assert_ok();
        let members: Vec<InitialMember> =
            (1..=n).map(|i| InitialMember { name: format!("h{i}"), address: free_address() }).collect();
        for m in &members {
            run(&["certs", "host", &m.name, "--address", &m.address, "--dir", s(&pki)]).assert_ok();
        }
        run(&["certs", "client", "ops", "--dir", s(&pki)]).assert_ok();
        let mut cluster = Cluster { dir, pki, members: members.clone(), agents: Vec::new() };
        let initial: Vec<String> = members.iter().map(|m| format!("\"{}={}\"", m.name, m.address)).collect();
        for m in &members {
            cluster.spawn(&m.name, &m.address, &format!("initial_members = [{}]\n", initial.join(", ")));
        }
        cluster.wait_until("a leader and every member", |c| {
            let out = c.cli(&["cluster", "status", "--json"]);
            out.code == 0 && {
                let s = out.json();
                !s["leader"].is_null() && s["members"].as_array().is_some_and(|m| m.len() == n)
            }
        });
        cluster
    }

    fn file(&self, name: &str) -> PathBuf {
        self.pki.join(name)
    }

    fn spawn(&mut self, name: &str, address: &str, extra: &str) {
        let home = self.dir.path().join(name);
        std::fs::create_dir_all(home.join("vms")).unwrap();
        let http = free_address();
        let config = format!(
            "node_name = \"{name}\"\nlisten = \"{address}\"\nmetrics_listen = \"{http}\"\n\
             data_dir = \"{}\"\nlog_level = \"debug\"\n{extra}\
             [runtime]\nkind = \"process\"\nstate_dir = \"{}\"\n[capacity]\nvcpu = 8\nmemory_mib = 8192\n\
             [tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            home.join("data").display(),
            home.join("vms").display(),
            self.file("ca.pem").display(),
            self.file(&format!("{name}.pem")).display(),
            self.file(&format!("{name}.key")).display(),
        );
        let path = home.join("agent.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(home.join("agent.log")).unwrap())
            .spawn()
            .expect("spawn agent");
        self.agents.push(Agent { name: name.into(), child, http });
    }

    /// Agent `i`'s config file and data dir.
    fn home(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.agents[i].name)
    }

    /// Starts agent `i` again (after it stopped) with its config.
    fn restart(&mut self, i: usize) {
        let home = self.home(i);
        self.agents[i].child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(home.join("agent.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(home.join("agent.log")).unwrap())
            .spawn()
            .expect("spawn agent");
    }

    /// Waits for agent `i` to exit on its own; its exit code and log.
    fn exit_of(&mut self, i: usize) -> (Option<i32>, String) {
        let deadline = Instant::now() + SETTLE;
        loop {
            if let Some(status) = self.agents[i].child.try_wait().unwrap() {
                let log = std::fs::read_to_string(self.home(i).join("agent.log")).unwrap_or_default();
                return (status.code(), log);
            }
            assert!(Instant::now() < deadline, "agent {} kept running", self.agents[i].name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn address(&self, i: usize) -> &str {
        &self.members[i].address
    }

    /// The CLI against agent 0 as client "ops".
    fn cli(&self, args: &[&str]) -> Out {
        let (ca, cert, key) = (self.file("ca.pem"), self.file("ops.pem"), self.file("ops.key"));
        let mut all = args.to_vec();
        all.extend(["--endpoint", self.address(0), "--config", "/dev/null"]);
        all.extend(["--ca", s(&ca), "--cert", s(&cert), "--key", s(&key)]);
        run(&all)
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|a| std::fs::read_to_string(self.dir.path().join(&a.name).join("agent.log")).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn wait_until(&self, what: &str, mut ok: impl FnMut(&Cluster) -> bool) {
        let deadline = Instant::now() + SETTLE;
        while Instant::now() < deadline {
            if ok(self) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let logs = self.logs();
        let tail: Vec<&str> = logs.lines().rev().take(60).collect();
        panic!("timed out waiting for {what}\n{}", tail.join("\n"));
    }

    /// A gRPC channel to agent `i` presenting `cert`/`key` (file stems in
    /// the PKI dir), verifying the agent with `ca_pem`.
    async fn channel(&self, i: usize, ca_pem: &str, identity: Option<(&str, &str)>) -> Result<Channel, String> {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Endpoint::from_shared(format!("https://{}", self.address(i)))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.file(file)).unwrap()
    }

    async fn channel_as(&self, i: usize, who: &str) -> Channel {
        let (cert, key) = (self.read(&format!("{who}.pem")), self.read(&format!("{who}.key")));
        self.channel(i, &self.read("ca.pem"), Some((&cert, &key))).await.expect("connect")
    }

    fn cluster_id(&self) -> u64 {
        cluster_id_of(&self.members)
    }
}

fn vm_names(c: &Cluster) -> Vec<String> {
    let out = c.cli(&["vm", "list", "--json"]);
    out.assert_ok();
    out.json().as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// The README's three-agent example with TLS on, through the CLI; and
/// every way in without the right certificate refused.
#[test]
fn a_tls_cluster_works_through_the_cli_and_refuses_strangers() {
    let c = Cluster::start(3);
    // Retried like an operator would when the answer leaves the outcome open
    // (timed out on a loaded machine); "already exists" then means it landed.
    let create = ["vm", "create", "web", "--vcpu", "1", "--memory", "128", "--stopped"];
    let mut out = c.cli(&create);
    let deadline = Instant::now() + SETTLE;
    while out.code == 1 && Instant::now() < deadline {
        out = c.cli(&create);
        if out.code == 2 && out.stderr.contains("already exists") {
            break;
        }
    }
    assert!(out.code == 0 || out.stderr.contains("already exists"), "{out:?}");
    assert_eq!(vm_names(&c), ["web"]);
    let status: Value = c.cli(&["cluster", "status", "--json"]).json();
    assert_eq!(status["members"].as_array().unwrap().len(), 3);

    let endpoint = c.address(0).to_string();
    let ca = c.file("ca.pem");
    // Plain text to the TLS port.
    run(&["vm", "list", "--endpoint", &endpoint, "--config", "/dev/null", "--timeout", "5"])
        .assert_error(1, "cannot reach the agent");
    // TLS without a client certificate.
    run(&["vm", "list", "--endpoint", &endpoint, "--config", "/dev/null", "--timeout", "5", "--ca", s(&ca)])
        .assert_error(1, "cannot reach the agent");
    // A client certificate from another CA.
    let other = c.dir.path().join("other");
    run(&["certs", "ca", "--dir", s(&other)]).assert_ok();
    run(&["certs", "client", "ops", "--dir", s(&other)]).assert_ok();
    let (cert, key) = (other.join("ops.pem"), other.join("ops.key"));
    let args = ["vm", "list", "--endpoint", &endpoint, "--config", "/dev/null", "--timeout", "5"];
    let out = run(&[&args[..], &["--ca", s(&ca), "--cert", s(&cert), "--key", s(&key)]].concat());
    out.assert_error(1, "cannot reach the agent");
    // Trusting another CA: the agent's certificate is refused.
    let out = run(&[&args[..], &["--ca", s(&other.join("ca.pem")), "--cert", s(&cert), "--key", s(&key)]].concat());
    out.assert_error(1, "invalid peer certificate");

    // Nothing changed, and no key reached a log.
    assert_eq!(vm_names(&c), ["web"]);
    let logs = c.logs();
    assert!(logs.contains("tls=\"mutual\"") || logs.contains("tls=mutual"), "{logs}");
    for file in ["h1.key", "h2.key", "ca.key", "ops.key"] {
        let key = c.read(file);
        let body = key.lines().nth(1).expect("a PEM body line");
        assert!(!logs.contains(body), "{file} appears in a log");
    }
    assert!(!logs.contains("PRIVATE KEY"));
}

/// A fourth host joins through the CLI with its member certificate as its
/// admission, receives the leader's snapshot, and becomes a member.
#[test]
fn a_host_joins_with_its_member_certificate() {
    let mut c = Cluster::start(3);
    let address = free_address();
    run(&["certs", "host", "h4", "--address", &address, "--dir", s(&c.pki)]).assert_ok();
    c.spawn("h4", &address, "");
    c.wait_until("h4 to listen", |_| std::net::TcpStream::connect(&address).is_ok());
    let (ca, cert, key) = (c.file("ca.pem"), c.file("ops.pem"), c.file("ops.key"));
    let tls = ["--ca", s(&ca), "--cert", s(&cert), "--key", s(&key), "--config", "/dev/null", "--json"];
    // Through a follower: it forwards the admission to the leader.
    let leader = c.cli(&["cluster", "status", "--json"]).json()["leader"].as_str().unwrap().to_string();
    let seed = c.members.iter().find(|m| m.name != leader).unwrap().address.clone();
    // A token given anyway is checked too: a made-up one is refused, and
    // nothing changes.
    let bogus = c.pki.join("bogus-token");
    std::fs::write(&bogus, "blxjt_not-issued\n").unwrap();
    let join = ["cluster", "join", &seed, "--endpoint", &address];
    run(&[&join[..], &["--token-file", s(&bogus)], &tls].concat()).assert_error(1, "join token is not valid");
    // A client certificate may issue tokens; the token is printed, never logged.
    let issued = run(&[&["cluster", "join-token", "--endpoint", &seed][..], &tls].concat());
    issued.assert_ok();
    let token = issued.json()["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("blxjt_"), "{token}");
    let out = run(&[&join[..], &tls].concat());
    out.assert_ok();
    assert_eq!(out.json()["name"], "h4");
    assert!(!c.logs().contains(&token), "a join token appears in a log");
    c.wait_until("h4 to be a member everywhere", |_| {
        let out = run(&[&["cluster", "status", "--endpoint", &address][..], &tls].concat());
        out.code == 0 && out.json()["members"].as_array().is_some_and(|m| m.len() == 4)
    });
}

/// Peer traffic needs a member certificate, and a member's certificate
/// speaks only for that member.
#[test]
fn peer_traffic_is_bound_to_member_certificates() {
    let c = Cluster::start(3);
    let rt = runtime();
    rt.block_on(async {
        let h1 = member_id_of("h1");
        let h2 = member_id_of("h2");
        let h3 = member_id_of("h3");
        let batch = |from: u64, messages: Vec<Vec<u8>>| raft_batch(c.cluster_id(), from, messages);
        let heartbeat = |from: u64| {
            let mut m = raft::eraftpb::Message::default();
            m.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
            m.from = from;
            m.to = h1;
            m.term = 1_000_000;
            m.write_to_bytes().unwrap()
        };

        // h2's own certificate may speak as h2 (an empty batch: accepted,
        // nothing stepped).
        let mut as_h2 = PeerClient::new(c.channel_as(0, "h2").await);
        as_h2.raft(batch(h2, vec![])).await.expect("h2 speaks as h2");
        // ... but not as h3: a forged heartbeat with a huge term would
        // depose the leader if it were stepped.
        let status = as_h2.raft(batch(h3, vec![heartbeat(h3)])).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let mut chunk = pb::SnapshotChunk { cluster_id: c.cluster_id(), from: h3, ..Default::default() };
        chunk.last = true;
        let status = as_h2.snapshot(tokio_stream::iter(vec![chunk])).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        // Nor join as another host.
        let admit = pb::AdmitRequest { id: 77, name: "h9".into(), address: "127.0.0.1:1".into(), ..Default::default() };
        let status = as_h2.admit(admit.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

        // A client certificate: the client API only.
        let ops = c.channel_as(0, "ops").await;
        let mut as_client = PeerClient::new(ops.clone());
        let status = as_client.raft(batch(h2, vec![heartbeat(h2)])).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let status = as_client.admit(admit).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let propose = pb::ProposeRequest { cluster_id: c.cluster_id(), command: vec![] };
        let status = as_client.propose(propose).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        // The client API is open to clients (retried: a loaded machine may
        // be between leaders).
        let deadline = Instant::now() + SETTLE;
        let mut blixard = BlixardClient::new(ops);
        while let Err(status) = blixard.vm_list(pb::VmListRequest::default()).await {
            assert!(Instant::now() < deadline && status.code() != Code::PermissionDenied, "{status:?}");
        }

        // A certificate the cluster CA signed, but without a blixard
        // identity: not even the client API.
        let ca_key = rcgen::KeyPair::from_pem(&c.read("ca.key")).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&c.read("ca.pem"), ca_key).unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["nobody.example".to_string()]).unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap().pem();
        let anonymous = c.channel(0, &c.read("ca.pem"), Some((&cert, &key.serialize_pem()))).await.expect("connect");
        let status = BlixardClient::new(anonymous).vm_list(pb::VmListRequest::default()).await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

        // No certificate, or one from another CA: no connection at all.
        assert!(refused(c.channel(0, &c.read("ca.pem"), None).await).await);

        // The datagram path (QUIC on the gRPC port over UDP) binds the
        // sender to its certificate the same way: h2 speaking as h3 is
        // refused (its heartbeat's term would depose the leader: checked
        // below).
        let tls =
            blixard::config::Tls { ca_file: c.file("ca.pem"), cert_file: c.file("h2.pem"), key_file: c.file("h2.key") };
        let credentials = blixard::api::tls::Credentials::load_tls(&tls, "h2").unwrap();
        let path = blixard::api::datagram::DatagramPath::bind("127.0.0.1:0".parse().unwrap(), &credentials).unwrap();
        let quic = path.connect(c.address(0)).await.expect("h2 opens a datagram connection");
        quic.send_datagram(prost::Message::encode_to_vec(&batch(h3, vec![heartbeat(h3)])).into()).unwrap();
        // Awaited, not slept: the QUIC connection is driven on this runtime.
        let deadline = Instant::now() + SETTLE;
        while !c.logs().lines().any(|l| l.contains("refused a datagram batch") && l.contains("cannot speak for member"))
        {
            assert!(Instant::now() < deadline, "agent 0 never refused the forged datagram");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // The forged heartbeats deposed nobody: the cluster still answers,
    // still has its three members, and its term is not the forger's.
    let status: Value = c.cli(&["cluster", "status", "--json"]).json();
    assert_eq!(status["members"].as_array().unwrap().len(), 3, "{status}");
    assert!(status["term"].as_u64().unwrap() < 1_000_000, "{status}");
}

/// Whether a connection attempt failed, or its first call was refused
/// (TLS 1.3 reports a missing client certificate after the handshake).
async fn refused(connection: Result<Channel, String>) -> bool {
    match connection {
        Err(_) => true,
        Ok(channel) => BlixardClient::new(channel).vm_list(pb::VmListRequest::default()).await.is_err(),
    }
}

/// Oversized and malformed requests are refused and change nothing.
#[test]
fn hostile_requests_are_refused_without_a_state_change() {
    let c = Cluster::start(1);
    let rt = runtime();
    rt.block_on(async {
        let mut client = BlixardClient::new(c.channel_as(0, "ops").await);
        let create = |name: String, labels: Vec<(String, String)>| pb::VmCreateRequest {
            name,
            vcpu: 1,
            memory_mib: 128,
            labels: labels.into_iter().collect(),
            stopped: true,
            ..Default::default()
        };
        let cases = vec![
            ("a long name", create("a".repeat(10_000), vec![])),
            ("a name that escapes the state dir", create("../../etc".into(), vec![])),
            ("a unit-name injection", create("web@x.service".into(), vec![])),
            ("too many labels", create("web".into(), (0..10_000).map(|i| (format!("k{i}"), "v".into())).collect())),
            ("a huge label", create("web".into(), vec![("k".into(), "v".repeat(100_000))])),
            ("zero vcpu", pb::VmCreateRequest { vcpu: 0, ..create("web".into(), vec![]) }),
            ("absurd memory", pb::VmCreateRequest { memory_mib: u64::MAX, ..create("web".into(), vec![]) }),
        ];
        for (what, request) in cases {
            let status = client.vm_create(request).await.expect_err(what);
            assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        }
        // Beyond the decode limit: refused before any handler runs.
        let status = client.vm_create(create("web".into(), vec![("k".into(), "v".repeat(20 << 20))])).await;
        let status = status.expect_err("a 20 MiB message");
        assert!(matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted | Code::Internal), "{status:?}");

        // Malformed peer traffic from a real member certificate.
        let mut peer = PeerClient::new(c.channel_as(0, "h1").await);
        let batch = pb::RaftBatch {
            cluster_id: c.cluster_id(),
            from: member_id_of("h1"),
            from_address: String::new(),
            messages: vec![vec![0xff; 64]],
            ..Default::default()
        };
        assert_eq!(peer.raft(batch).await.unwrap_err().code(), Code::InvalidArgument);
        let propose = pb::ProposeRequest { cluster_id: c.cluster_id(), command: vec![0xff; 64] };
        assert_eq!(peer.propose(propose).await.unwrap_err().code(), Code::InvalidArgument);
    });
    assert!(vm_names(&c).is_empty(), "a refused request changed the state");
}

/// Creates a stopped VM through the CLI, retried like an operator would
/// when the answer leaves the outcome open ("already exists" then means it
/// landed).
fn create_vm(c: &Cluster, name: &str) {
    let create = ["vm", "create", name, "--vcpu", "1", "--memory", "128", "--stopped"];
    let deadline = Instant::now() + SETTLE;
    loop {
        let out = c.cli(&create);
        if out.code == 0 || (out.code == 2 && out.stderr.contains("already exists")) {
            return;
        }
        assert!(out.code == 1 && Instant::now() < deadline, "{out:?}");
    }
}

/// The value of the unlabelled (or `kind="self"`) sample `name` on agent
/// `i`'s `/metrics`; 0 when absent.
fn metric(c: &Cluster, i: usize, name: &str) -> f64 {
    // HTTPS: the listener of an agent with TLS speaks it (issue 20).
    let (code, body) = cli_support::https_get(&c.agents[i].http, "/metrics", &c.file("ca.pem"));
    assert_eq!(code, 200, "{body}");
    body.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = rest.strip_prefix(' ').or_else(|| rest.strip_prefix("{kind=\"self\"} "))?;
            value.trim().parse().ok()
        })
        .unwrap_or(0.0)
}

/// Resident memory of agent `i`, in KiB.
fn rss_kib(c: &Cluster, i: usize) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", c.agents[i].child.id())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn raft_message(kind: raft::eraftpb::MessageType, from: u64, to: u64, term: u64) -> raft::eraftpb::Message {
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(kind);
    (m.from, m.to, m.term) = (from, to, term);
    m
}

fn raft_batch(cluster_id: u64, from: u64, messages: Vec<Vec<u8>>) -> pb::RaftBatch {
    pb::RaftBatch { cluster_id, from, from_address: String::new(), messages, ..Default::default() }
}

fn encoded(m: &raft::eraftpb::Message) -> Vec<u8> {
    m.write_to_bytes().unwrap()
}

/// A follower's proposal of `kind`, as member `proposer` names itself in
/// the entry's context.
fn proposal(from: u64, to: u64, proposer: u64, term: u64, kind: blixard::state::CommandKind) -> Vec<u8> {
    use prost::Message as _;
    let mut entry = raft::eraftpb::Entry::default();
    let command = blixard::state::Command { at_unix_ms: 1, kind };
    entry.set_data(blixard::state::codec::encode_command(&command).into());
    let context = blixard::state::codec::pb::ProposalContext { proposer, seq: 1, term };
    entry.set_context(context.encode_to_vec().into());
    let mut m = raft_message(raft::eraftpb::MessageType::MsgPropose, from, to, 0);
    m.set_entries(vec![entry].into());
    encoded(&m)
}

#[track_caller]
fn assert_denied<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
}

/// The forgeries, each sent with a real member certificate to real
/// agents: every one is refused, and the cluster's leader, term, members,
/// hosts and VMs, every host's fencing and every agent are as before; a
/// flood of snapshot streams leaves memory bounded.
#[test]
fn forgeries_with_a_member_certificate_are_refused_and_change_nothing() {
    use blixard::state::{Capacity, CommandKind, MemberStatus, VmState};
    use raft::eraftpb::MessageType::*;
    let mut c = Cluster::start(3);
    create_vm(&c, "web");
    c.wait_until("every host to report its capacity", |c| {
        let out = c.cli(&["node", "list", "--json"]);
        out.code == 0 && out.json().as_array().unwrap().iter().all(|n| n["vcpu_total"] == 8)
    });
    let status: Value = c.cli(&["cluster", "status", "--json"]).json();
    let (leader, term) = (status["leader"].as_str().unwrap().to_string(), status["term"].as_u64().unwrap());
    let nodes_before: Value = c.cli(&["node", "list", "--json"]).json();
    let index_of = |name: &str| c.agents.iter().position(|a| a.name == name).unwrap();
    let l = index_of(&leader);
    let followers: Vec<usize> = (0..3).filter(|i| *i != l).collect();
    let (a, v) = (followers[0], followers[1]);
    let name = |i: usize| c.agents[i].name.clone();
    let (l_id, a_id, v_id) = (member_id_of(&name(l)), member_id_of(&name(a)), member_id_of(&name(v)));
    let rss_before = rss_kib(&c, v);
    let refused_before = metric(&c, l, "blixard_peer_messages_refused_total");
    // (A host may have fenced while the cluster formed.)
    let fenced_before: Vec<f64> = (0..3).map(|i| metric(&c, i, "blixard_fencing_events_total")).collect();
    let token = c.cli(&["cluster", "join-token", "--json"]).json()["token"].as_str().unwrap().to_string();
    let rt = runtime();
    rt.block_on(async {
        let batch = |from: u64, messages: Vec<Vec<u8>>| raft_batch(c.cluster_id(), from, messages);
        let mut a_to_l = PeerClient::new(c.channel_as(l, &name(a)).await);
        let mut a_to_v = PeerClient::new(c.channel_as(v, &name(a)).await);

        // A vote request at term u64::MAX (which panicked every agent on
        // every restart), to the leader and the other follower.
        let mut vote = raft_message(MsgRequestVote, a_id, l_id, u64::MAX);
        vote.set_context(raft::CAMPAIGN_TRANSFER.to_vec().into());
        assert_denied(a_to_l.raft(batch(a_id, vec![encoded(&vote)])).await, "a vote at u64::MAX");
        vote.to = v_id;
        assert_denied(a_to_v.raft(batch(a_id, vec![encoded(&vote)])).await, "a vote at u64::MAX");

        // Posing as the leader of this term: an append of a VM and a
        // learner "evil", a heartbeat, a leadership hand-over.
        let mut append = raft_message(MsgAppend, a_id, v_id, term);
        let mut vm = raft::eraftpb::Entry::default();
        let create = CommandKind::CreateVm { name: "evil".into(), spec: Default::default() };
        vm.set_data(
            blixard::state::codec::encode_command(&blixard::state::Command { at_unix_ms: 1, kind: create }).into(),
        );
        let mut learner = raft::eraftpb::Entry::default();
        learner.set_entry_type(raft::eraftpb::EntryType::EntryConfChange);
        let mut cc = raft::eraftpb::ConfChange::default();
        cc.set_change_type(raft::eraftpb::ConfChangeType::AddLearnerNode);
        cc.node_id = 666;
        let info = blixard::state::codec::MemberInfo {
            name: "evil".into(),
            address: "127.0.0.1:1".into(),
            at_unix_ms: 1,
            demote: false,
        };
        cc.set_context(blixard::state::codec::encode_member_info(&info).into());
        learner.set_data(cc.write_to_bytes().unwrap().into());
        append.set_entries(vec![vm, learner].into());
        append.commit = 1 << 40;
        assert_denied(a_to_v.raft(batch(a_id, vec![encoded(&append)])).await, "an append posing as the leader");
        let mut heartbeat = raft_message(MsgHeartbeat, a_id, v_id, term);
        heartbeat.commit = 1 << 40;
        assert_denied(a_to_v.raft(batch(a_id, vec![encoded(&heartbeat)])).await, "a heartbeat posing as the leader");
        let timeout_now = raft_message(MsgTimeoutNow, a_id, v_id, term);
        assert_denied(a_to_v.raft(batch(a_id, vec![encoded(&timeout_now)])).await, "a hand-over from a non-leader");
        let transfer = raft_message(MsgTransferLeader, a_id, l_id, term);
        assert_denied(a_to_l.raft(batch(a_id, vec![encoded(&transfer)])).await, "asking the leader to hand over");
        // ... and of a later term while the leader is live: the leader's
        // raft thread refuses it (and counts it).
        append.to = l_id;
        append.term = term + 1;
        a_to_l.raft(batch(a_id, vec![encoded(&append)])).await.expect("the gRPC layer cannot tell a lease");
        // Rising terms (which kept the cluster leaderless): vote requests
        // forced past raft-rs's lease with the hand-over context, and
        // answers of a later term, which would make a leader step down at
        // once. The gRPC layer takes them; the raft threads refuse them.
        for round in 1..=5 {
            let at = term + round;
            let mut forced = raft_message(MsgRequestVote, a_id, l_id, at);
            forced.set_context(raft::CAMPAIGN_TRANSFER.to_vec().into());
            (forced.index, forced.log_term) = (1 << 40, at - 1);
            let answers = [MsgHeartbeatResponse, MsgAppendResponse, MsgRequestVoteResponse]
                .map(|kind| encoded(&raft_message(kind, a_id, l_id, at)));
            let mut to_l = vec![encoded(&forced)];
            to_l.extend(answers);
            a_to_l.raft(batch(a_id, to_l)).await.expect("the gRPC layer cannot tell a lease");
            forced.to = v_id;
            a_to_v.raft(batch(a_id, vec![encoded(&forced)])).await.expect("the gRPC layer cannot tell a lease");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // A quorum-contact confirmation in the future, from a member that
        // does not lead: it must never keep the receiver from fencing.
        let contact = blixard::guard::record::ContactFile::new(c.home(v).join("data").join("fence-contact"));
        let before = contact.read(blixard::clock::monotonic_ms()).expect("a contact recorded");
        let mut forged = batch(a_id, vec![]);
        forged.confirmation = Some(pb::ContactConfirmation { sent_at_ms: u64::MAX, commit: 1 << 40 });
        a_to_v.raft(forged).await.expect("an empty batch is taken; its confirmation is judged by the node");
        let deadline = Instant::now() + SETTLE;
        loop {
            // Once the receiver recorded a newer contact: one in the past.
            match contact.read(blixard::clock::monotonic_ms()) {
                Ok(now) if now > before => break,
                Ok(_) => {}
                Err(e) => panic!("the forged confirmation counted: {e}"),
            }
            assert!(Instant::now() < deadline, "no newer contact recorded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Speaking as another member, or as none.
        for from in [v_id, 999] {
            let m = raft_message(MsgHeartbeatResponse, from, l_id, term);
            assert_denied(a_to_l.raft(batch(from, vec![encoded(&m)])).await, "a batch as another member");
            assert_denied(a_to_l.raft(batch(a_id, vec![encoded(&m)])).await, "a message unlike its batch");
        }

        // Reports about other members, and the leader's own commands, as
        // Raft proposals and through Peer.Propose.
        let forged = [
            CommandKind::Report {
                node: v_id,
                vm: "web".into(),
                generation: 0,
                state: VmState::Running,
                last_error: None,
            },
            CommandKind::Released { node: l_id, vm: "web".into(), generation: 0 },
            CommandKind::SetCapacity {
                node: v_id,
                capacity: Capacity { vcpu: 1, memory_mib: 1, ..Capacity::default() },
            },
            CommandKind::SetAddress { node: l_id, address: "127.0.0.1:1".into(), protocol: 1 },
            CommandKind::SetRunners { node: v_id, runners: vec![] },
            CommandKind::SetLabels { node: v_id, labels: [("evil".to_string(), "1".to_string())].into() },
            CommandKind::SetStatus { node: v_id, status: MemberStatus::Down },
            CommandKind::SetDrain { node: v_id, drain: true },
            CommandKind::Place { vm: "web".into(), node: a_id, expected_generation: 0 },
            CommandKind::AddJoinToken { hash: [7; 32], ttl_ms: 60_000 },
            CommandKind::UseJoinToken { hash: [7; 32], node: 666 },
        ];
        for kind in forged {
            let what = format!("{kind:?}");
            let m = proposal(a_id, l_id, a_id, term, kind.clone());
            assert_denied(a_to_l.raft(batch(a_id, vec![m])).await, &what);
            let command = blixard::state::codec::encode_command(&blixard::state::Command { at_unix_ms: 1, kind });
            let propose = pb::ProposeRequest { cluster_id: c.cluster_id(), command };
            assert_denied(a_to_v.propose(propose).await, &what);
        }
        // A proposal in another member's name, about that member.
        let about_v = CommandKind::SetRunners { node: v_id, runners: vec![] };
        assert_denied(a_to_l.raft(batch(a_id, vec![proposal(a_id, l_id, v_id, term, about_v)])).await, "in v's name");

        // Admission: another name, even marked as forwarded; a valid token
        // cannot rewrite a member's address, with its own certificate.
        for target in [l, v] {
            let mut admit = tonic::Request::new(pb::AdmitRequest {
                id: 666,
                name: "evil".into(),
                address: "127.0.0.1:1".into(),
                token: token.clone(),
                ..Default::default()
            });
            admit.metadata_mut().insert("x-blixard-forwarded", "1".parse().unwrap());
            let mut peer = PeerClient::new(c.channel_as(target, &name(a)).await);
            assert_denied(peer.admit(admit).await, "admitting evil as forwarded");
        }
        let rewrite = pb::AdmitRequest {
            id: v_id,
            name: name(v),
            address: "127.0.0.1:1".into(),
            token: token.clone(),
            ..Default::default()
        };
        let status = PeerClient::new(c.channel_as(l, &name(v)).await).admit(rewrite).await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

        // A client marking its write as forwarded.
        let mut create = tonic::Request::new(pb::VmCreateRequest {
            name: "evil".into(),
            vcpu: 1,
            memory_mib: 128,
            stopped: true,
            ..Default::default()
        });
        create.metadata_mut().insert("x-blixard-forwarded", "1".parse().unwrap());
        assert_denied(
            BlixardClient::new(c.channel_as(v, "ops").await).vm_create(create).await,
            "forwarded by a client",
        );

        // Snapshots: from a member that does not lead, eight at once, each
        // announcing 3 GiB, refused before anything is read.
        let cluster_id = c.cluster_id();
        let chunk = move |from: u64, to: u64| {
            let mut header = raft_message(MsgSnapshot, from, to, term);
            header.mut_snapshot().mut_metadata().index = 1;
            header.mut_snapshot().mut_metadata().term = 1;
            header
                .mut_snapshot()
                .mut_metadata()
                .set_conf_state(raft::eraftpb::ConfState::from((vec![l_id, a_id, v_id], vec![])));
            let data = vec![0x5a; 1 << 20];
            pb::SnapshotChunk {
                cluster_id,
                from,
                header: encoded(&header),
                total_size: 3 << 30,
                crc32c: crc32c::crc32c(&data),
                data,
                ..Default::default()
            }
        };
        let flood = (0..8).map(|_| {
            let mut a_to_v = a_to_v.clone();
            let chunks = (0..16).map(move |i| {
                let mut next = chunk(a_id, v_id);
                if i > 0 {
                    next.header.clear();
                    next.total_size = 0;
                }
                next
            });
            async move { a_to_v.snapshot(tokio_stream::iter(chunks)).await }
        });
        for result in futures_util::future::join_all(flood).await {
            assert_denied(result, "a snapshot from a member that does not lead");
        }
        // From the leader's certificate: one snapshot at a time. The
        // first holds the one slot (it never completes); the others are
        // refused while it does.
        let mut l_to_v = PeerClient::new(c.channel_as(v, &name(l)).await);
        let deadline = Instant::now() + SETTLE;
        let (first, holding) = 'held: loop {
            let (first, held) = tokio::sync::mpsc::channel(1);
            first.send(chunk(l_id, v_id)).await.unwrap();
            let mut holder = l_to_v.clone();
            let holding =
                tokio::spawn(async move { holder.snapshot(tokio_stream::wrappers::ReceiverStream::new(held)).await });
            // Until the first chunk is on its way.
            drop(first.reserve().await.unwrap());
            loop {
                let second = l_to_v.snapshot(tokio_stream::iter(vec![chunk(l_id, v_id)])).await.unwrap_err();
                if second.code() == Code::ResourceExhausted {
                    break 'held (first, holding);
                }
                assert!(Instant::now() < deadline, "a second snapshot was never refused: {second:?}");
                // The probe took the slot first, and the holder was
                // refused: start again.
                if holding.is_finished() {
                    break;
                }
            }
        };
        drop(first);
        let ended = holding.await.unwrap().unwrap_err();
        assert_eq!(ended.code(), Code::InvalidArgument, "{ended:?}");
    });
    assert!(rss_kib(&c, v) < rss_before + 64 * 1024, "memory grew from {rss_before} KiB to {} KiB", rss_kib(&c, v));

    // Nothing changed: the same leader in the same term, the same members
    // at their addresses, hosts and VMs; nobody fenced; every agent alive.
    let after: Value = c.cli(&["cluster", "status", "--json"]).json();
    assert_eq!(
        (after["leader"].as_str().unwrap(), after["term"].as_u64().unwrap()),
        (leader.as_str(), term),
        "{after}"
    );
    let members = |s: &Value| -> Vec<(String, String, String)> {
        let field = |m: &Value, k: &str| m[k].as_str().unwrap().to_string();
        s["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (field(m, "name"), field(m, "address"), field(m, "role")))
            .collect()
    };
    assert_eq!(members(&after), members(&status), "{after}");
    assert_eq!(c.cli(&["node", "list", "--json"]).json(), nodes_before);
    assert_eq!(vm_names(&c), ["web"]);
    for (i, fenced) in fenced_before.iter().enumerate() {
        let name = c.agents[i].name.clone();
        assert_eq!(c.agents[i].child.try_wait().unwrap(), None, "agent {name} died");
        assert_eq!(metric(&c, i, "blixard_fencing_events_total"), *fenced, "agent {name} fenced");
    }
    assert!(metric(&c, l, "blixard_peer_messages_refused_total") > refused_before, "the leader refused the later term");
    let logs = c.logs();
    assert!(!logs.contains("panicked"), "an agent panicked");
    assert!(!logs.contains(&token), "a join token appears in a log");
}

/// A member whose store is lost (its redb file deleted or emptied, or its
/// whole data dir) refuses to start, saying what to do, rather than coming
/// back as a new member with a forgotten vote and log; given its store
/// back, it rejoins with every acknowledged write.
#[test]
fn a_member_whose_store_is_lost_refuses_to_start() {
    let mut c = Cluster::start(3);
    create_vm(&c, "web");
    let leader = c.cli(&["cluster", "status", "--json"]).json()["leader"].as_str().unwrap().to_string();
    // A follower the CLI does not talk to (it talks to agent 0).
    let v = (1..3).find(|i| c.agents[*i].name != leader).unwrap();
    // Taken part: its capacity report is in the cluster.
    let name = c.agents[v].name.clone();
    c.wait_until("the follower to report its capacity", |c| {
        let out = c.cli(&["node", "list", "--json"]);
        out.code == 0 && out.json().as_array().unwrap().iter().any(|n| n["name"] == name && n["vcpu_total"] == 8)
    });
    let _ = c.agents[v].child.kill();
    let _ = c.agents[v].child.wait();
    // Acknowledged by the other two while it is down.
    create_vm(&c, "db");
    let data = c.home(v).join("data");
    let saved = c.dir.path().join("saved-data");
    std::fs::create_dir_all(&saved).unwrap();
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, saved.join(path.file_name().unwrap())).unwrap();
    }
    let store = data.join(blixard::node::STORE_FILE);

    // Deleted, then emptied: the data dir's member record tells.
    std::fs::remove_file(&store).unwrap();
    for case in ["deleted", "emptied"] {
        c.restart(v);
        let (code, log) = c.exit_of(v);
        assert_eq!(code, Some(1), "{case}: {log}");
        assert!(log.contains("is missing or empty") && log.contains("cluster leave"), "{case}: {log}");
        std::fs::write(&store, b"").unwrap();
    }
    // The whole data dir gone: the other initial members tell.
    std::fs::remove_dir_all(&data).unwrap();
    c.restart(v);
    let (code, log) = c.exit_of(v);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("past its bootstrap") && log.contains("store is lost"), "{log}");

    // Nothing was lost, and with its store back it rejoins.
    assert_eq!(vm_names(&c), ["db", "web"]);
    std::fs::remove_dir_all(&data).unwrap_or_default();
    std::fs::create_dir_all(&data).unwrap();
    for entry in std::fs::read_dir(&saved).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, data.join(path.file_name().unwrap())).unwrap();
    }
    c.restart(v);
    let address = c.address(v).to_string();
    c.wait_until("the member to be back with both VMs", |c| {
        let (ca, cert, key) = (c.file("ca.pem"), c.file("ops.pem"), c.file("ops.key"));
        let out = run(&[
            "vm",
            "list",
            "--json",
            "--endpoint",
            &address,
            "--config",
            "/dev/null",
            "--ca",
            s(&ca),
            "--cert",
            s(&cert),
            "--key",
            s(&key),
        ]);
        out.code == 0 && out.json().as_array().is_some_and(|vms| vms.len() == 2)
    });
}

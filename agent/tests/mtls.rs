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
        let config = format!(
            "node_name = \"{name}\"\nlisten = \"{address}\"\ndata_dir = \"{}\"\nlog_level = \"debug\"\n{extra}\
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
        self.agents.push(Agent { name: name.into(), child });
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
        let batch = |from: u64, messages: Vec<Vec<u8>>| pb::RaftBatch {
            cluster_id: c.cluster_id(),
            from,
            from_address: String::new(),
            messages,
            ..Default::default()
        };
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
    });
    // The forged heartbeat deposed nobody: the cluster still answers and
    // still has its three members.
    let status: Value = c.cli(&["cluster", "status", "--json"]).json();
    assert_eq!(status["members"].as_array().unwrap().len(), 3, "{status}");
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

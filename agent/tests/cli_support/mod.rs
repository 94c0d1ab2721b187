//! Support for the CLI's process-level tests: running the built
//! `blixard-agent` binary, and a fake agent — a tonic server implementing
//! service Blixard over a tiny in-memory model — that records every call,
//! so a test can check that bad input sent nothing, and that can be told
//! to answer every call with a given status or after a delay.

#![allow(dead_code)]
// Each test crate uses a different part.
// The proto only grows; `..Default::default()` keeps the fake compiling when it does.
#![allow(clippy::needless_update)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blixard::api::pb;
use blixard::api::pb::blixard_server::{Blixard, BlixardServer};
use tonic::{Code, Request, Response, Status};

pub const BIN: &str = env!("CARGO_BIN_EXE_blixard-agent");

/// What the configs of agents on loopback in these tests say about
/// authentication: plain text, which only a loopback `listen` accepts
/// (`mtls.rs` covers TLS; the system tests in `tests/` run with the cluster
/// secret).
pub const LOOPBACK_INSECURE: &str = "insecure = true\n";

/// What a run of the binary left behind.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// Exit `code`, nothing on stdout, and exactly one line on stderr that
    /// starts with `error: ` and contains `needle`.
    #[track_caller]
    pub fn assert_error(&self, code: i32, needle: &str) {
        assert_eq!(self.code, code, "{self:?}");
        assert_eq!(self.stdout, "", "{self:?}");
        assert!(self.stderr.starts_with("error: "), "{self:?}");
        assert!(self.stderr.ends_with('\n') && self.stderr.lines().count() == 1, "one line: {self:?}");
        assert!(self.stderr.contains(needle), "expected {needle:?} in {self:?}");
    }

    #[track_caller]
    pub fn assert_ok(&self) {
        assert_eq!(self.code, 0, "{self:?}");
        assert_eq!(self.stderr, "", "{self:?}");
    }
}

/// A plain HTTP/1.1 GET of `path` from the agent's HTTP listener at
/// `address`: the status code and the body.
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    get(connect(address), address, path)
}

/// [`http_get`] over HTTPS (the listener of an agent with TLS), verifying
/// the agent's certificate against the CA certificates in `ca_pem`.
pub fn https_get(address: &str, path: &str, ca_pem: &std::path::Path) -> (u16, String) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(ca_pem).expect("the CA file") {
        roots.add(ca.expect("a CA certificate")).expect("a usable CA certificate");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = address.rsplit_once(':').expect("HOST:PORT").0.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string()).expect("a server name");
    let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("a TLS client");
    get(rustls::StreamOwned::new(connection, connect(address)), address, path)
}

fn connect(address: &str) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(address).expect("connect to the HTTP listener");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream
}

fn get(mut stream: impl std::io::Read + std::io::Write, address: &str, path: &str) -> (u16, String) {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").unwrap();
    let mut bytes = Vec::new();
    if let Err(e) = stream.read_to_end(&mut bytes) {
        // A TLS peer that closes without close_notify, after the response.
        assert!(e.kind() == std::io::ErrorKind::UnexpectedEof && !bytes.is_empty(), "read the HTTP response: {e}");
    }
    let response = String::from_utf8_lossy(&bytes);
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    (code, body.to_string())
}

/// Runs the binary with `args`, in a clean environment.
pub fn run(args: &[&str]) -> Out {
    let output = Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("COMPLETE")
        .env_remove("BLIXARD_ENDPOINT")
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
    Out {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[derive(Debug, Default)]
pub struct Model {
    pub vms: BTreeMap<String, pb::VmInfo>,
    pub nodes: BTreeMap<String, pb::NodeInfo>,
    /// Every call received, as `Method(argument)`.
    pub calls: Vec<String>,
    /// Answer every call with this status instead.
    pub fail: Option<(Code, String)>,
    /// Wait this long before answering.
    pub delay: Option<Duration>,
    /// What `Events` streams.
    pub events: Vec<pb::Event>,
}

pub const SINCE_UNIX_MS: u64 = 1_735_787_045_678;

fn node(name: &str, id: u64) -> pb::NodeInfo {
    pb::NodeInfo {
        name: name.into(),
        id,
        address: format!("127.0.0.{id}:7000"),
        status: "up".into(),
        role: if id == 1 { "leader" } else { "follower" }.into(),
        vcpu_total: 8,
        vcpu_used: 0,
        memory_mib_total: 16384,
        memory_mib_used: 0,
        vms: 0,
        ..Default::default()
    }
}

impl Model {
    fn new() -> Self {
        let nodes = [node("h1", 1), node("h2", 2), node("h3", 3)].into_iter().map(|n| (n.name.clone(), n)).collect();
        Model { nodes, ..Model::default() }
    }

    fn vm(&self, name: &str) -> Result<pb::VmInfo, Status> {
        self.vms.get(name).cloned().ok_or_else(|| Status::not_found(format!("no VM named {name:?}")))
    }

    fn node(&self, name: &str) -> Result<pb::NodeInfo, Status> {
        self.nodes.get(name).cloned().ok_or_else(|| Status::not_found(format!("no node named {name:?}")))
    }
}

/// The fake agent. Dropping it stops the server.
pub struct Fake {
    pub addr: SocketAddr,
    pub model: Arc<Mutex<Model>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Fake {
    pub fn start() -> Fake {
        Self::start_with(|builder| builder)
    }

    /// Starts with a customised server builder (TLS).
    pub fn start_with(configure: impl FnOnce(tonic::transport::Server) -> tonic::transport::Server) -> Fake {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let model = Arc::new(Mutex::new(Model::new()));
        let service = BlixardServer::new(Service { model: model.clone() });
        let server = configure(tonic::transport::Server::builder())
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        runtime.spawn(server);
        Fake { addr, model, runtime: Some(runtime) }
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Runs the binary with `args` then `--endpoint` this fake and no config.
    pub fn cli(&self, args: &[&str]) -> Out {
        let endpoint = self.endpoint();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--endpoint", &endpoint, "--config", "/dev/null"]);
        run(&all)
    }

    pub fn calls(&self) -> Vec<String> {
        self.model.lock().unwrap().calls.clone()
    }

    pub fn fail_with(&self, code: Code, message: &str) {
        self.model.lock().unwrap().fail = Some((code, message.to_string()));
    }

    pub fn delay(&self, delay: Duration) {
        self.model.lock().unwrap().delay = Some(delay);
    }

    pub fn vms(&self) -> BTreeMap<String, pb::VmInfo> {
        self.model.lock().unwrap().vms.clone()
    }

    /// Adds `count` running VMs named `{prefix}{i:06}` on h1.
    pub fn insert_many(&self, prefix: &str, count: usize) {
        let mut m = self.model.lock().unwrap();
        for i in 0..count {
            let name = format!("{prefix}{i:06}");
            let vm = pb::VmInfo {
                name: name.clone(),
                node: "h1".into(),
                desired: "running".into(),
                state: "running".into(),
                vcpu: 1,
                memory_mib: 64,
                generation: 1,
                ..Default::default()
            };
            m.vms.insert(name, vm);
        }
    }

    pub fn insert_vm(&self, name: &str, node: &str) {
        let vm = pb::VmInfo {
            name: name.into(),
            node: node.into(),
            desired: "running".into(),
            state: if node.is_empty() { "pending" } else { "running" }.into(),
            vcpu: 2,
            memory_mib: 1024,
            since_unix_ms: SINCE_UNIX_MS,
            generation: 1,
            pending_reason: if node.is_empty() { "no host has the runner installed".into() } else { String::new() },
            ..Default::default()
        };
        self.model.lock().unwrap().vms.insert(name.into(), vm);
    }
}

struct Service {
    model: Arc<Mutex<Model>>,
}

impl Service {
    /// Records the call, then applies the canned failure or delay, then `f`.
    async fn handle<T>(
        &self,
        call: String,
        f: impl FnOnce(&mut Model) -> Result<T, Status>,
    ) -> Result<Response<T>, Status> {
        let delay = {
            let mut m = self.model.lock().unwrap();
            m.calls.push(call);
            if let Some((code, message)) = &m.fail {
                return Err(Status::new(*code, message.clone()));
            }
            m.delay
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        let mut m = self.model.lock().unwrap();
        f(&mut m).map(Response::new)
    }
}

#[tonic::async_trait]
impl Blixard for Service {
    async fn cluster_status(
        &self,
        _: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        self.handle("ClusterStatus".into(), |m| {
            Ok(pb::ClusterStatusResponse {
                leader: "h1".into(),
                term: 3,
                members: m
                    .nodes
                    .values()
                    .map(|n| pb::MemberStatus {
                        id: n.id,
                        name: n.name.clone(),
                        address: n.address.clone(),
                        role: n.role.clone(),
                        healthy: true,
                        ..Default::default()
                    })
                    .collect(),
                commit_index: 7,
                applied_index: 7,
                ..Default::default()
            })
        })
        .await
    }

    async fn cluster_join(
        &self,
        r: Request<pb::ClusterJoinRequest>,
    ) -> Result<Response<pb::ClusterJoinResponse>, Status> {
        let r = r.into_inner();
        self.handle(format!("ClusterJoin({},{})", r.seed, r.token), |m| {
            let n = node("h4", 4);
            m.nodes.insert(n.name.clone(), n);
            Ok(pb::ClusterJoinResponse { name: "h4".into(), id: 4 })
        })
        .await
    }

    async fn cluster_join_token(
        &self,
        r: Request<pb::ClusterJoinTokenRequest>,
    ) -> Result<Response<pb::ClusterJoinTokenResponse>, Status> {
        let r = r.into_inner();
        self.handle(format!("ClusterJoinToken({})", r.ttl_seconds), |_| {
            Ok(pb::ClusterJoinTokenResponse { token: "blxjt_0123".into(), expires_unix_ms: 1_700_000_000_000 })
        })
        .await
    }

    async fn cluster_issue_client(
        &self,
        r: Request<pb::ClusterIssueClientRequest>,
    ) -> Result<Response<pb::ClusterIssueClientResponse>, Status> {
        let r = r.into_inner();
        self.handle(format!("ClusterIssueClient({},{})", r.name, r.role), |_| {
            Err(Status::failed_precondition("the fake agent holds no cluster CA"))
        })
        .await
    }

    async fn cluster_leave(
        &self,
        r: Request<pb::ClusterLeaveRequest>,
    ) -> Result<Response<pb::ClusterLeaveResponse>, Status> {
        let r = r.into_inner();
        self.handle(format!("ClusterLeave({})", r.node), |m| {
            let name = if r.node.is_empty() { "h1".to_string() } else { r.node };
            m.node(&name)?;
            m.nodes.remove(&name);
            Ok(pb::ClusterLeaveResponse { name })
        })
        .await
    }

    async fn node_list(&self, _: Request<pb::NodeListRequest>) -> Result<Response<pb::NodeListResponse>, Status> {
        self.handle("NodeList".into(), |m| Ok(pb::NodeListResponse { nodes: m.nodes.values().cloned().collect() }))
            .await
    }

    async fn node_drain(&self, r: Request<pb::NodeRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        let name = r.into_inner().name;
        self.handle(format!("NodeDrain({name})"), |m| {
            m.node(&name)?;
            let n = m.nodes.get_mut(&name).expect("checked");
            n.status = "draining".into();
            Ok(n.clone())
        })
        .await
    }

    async fn node_undrain(&self, r: Request<pb::NodeRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        let name = r.into_inner().name;
        self.handle(format!("NodeUndrain({name})"), |m| {
            m.node(&name)?;
            let n = m.nodes.get_mut(&name).expect("checked");
            n.status = "up".into();
            Ok(n.clone())
        })
        .await
    }

    async fn vm_create(&self, r: Request<pb::VmCreateRequest>) -> Result<Response<pb::VmInfo>, Status> {
        let r = r.into_inner();
        self.handle(format!("VmCreate({})", r.name), |m| {
            if m.vms.contains_key(&r.name) {
                return Err(Status::already_exists(format!("VM {:?} already exists", r.name)));
            }
            if !r.node.is_empty() {
                m.node(&r.node)?;
            }
            let node = if r.node.is_empty() { "h1".to_string() } else { r.node.clone() };
            let vm = pb::VmInfo {
                name: r.name.clone(),
                node: if r.stopped { String::new() } else { node },
                desired: if r.stopped { "stopped" } else { "running" }.into(),
                state: if r.stopped { "stopped" } else { "starting" }.into(),
                vcpu: r.vcpu,
                memory_mib: r.memory_mib,
                since_unix_ms: SINCE_UNIX_MS,
                labels: r.labels,
                pinned_node: r.node,
                anti_affinity: r.anti_affinity,
                generation: 1,
                ..Default::default()
            };
            m.vms.insert(r.name, vm.clone());
            Ok(vm)
        })
        .await
    }

    async fn vm_start(&self, r: Request<pb::VmRequest>) -> Result<Response<pb::VmInfo>, Status> {
        let name = r.into_inner().name;
        self.handle(format!("VmStart({name})"), |m| {
            m.vm(&name)?;
            let vm = m.vms.get_mut(&name).expect("checked");
            vm.desired = "running".into();
            Ok(vm.clone())
        })
        .await
    }

    async fn vm_stop(&self, r: Request<pb::VmRequest>) -> Result<Response<pb::VmInfo>, Status> {
        let name = r.into_inner().name;
        self.handle(format!("VmStop({name})"), |m| {
            m.vm(&name)?;
            let vm = m.vms.get_mut(&name).expect("checked");
            vm.desired = "stopped".into();
            Ok(vm.clone())
        })
        .await
    }

    async fn vm_delete(&self, r: Request<pb::VmRequest>) -> Result<Response<pb::VmDeleteResponse>, Status> {
        let name = r.into_inner().name;
        self.handle(format!("VmDelete({name})"), |m| {
            m.vm(&name)?;
            m.vms.remove(&name);
            Ok(pb::VmDeleteResponse { name })
        })
        .await
    }

    async fn vm_migrate(&self, r: Request<pb::VmMigrateRequest>) -> Result<Response<pb::VmInfo>, Status> {
        let r = r.into_inner();
        self.handle(format!("VmMigrate({},{})", r.name, r.to), |m| {
            m.vm(&r.name)?;
            m.node(&r.to)?;
            let vm = m.vms.get_mut(&r.name).expect("checked");
            vm.node = r.to;
            vm.generation += 1;
            Ok(vm.clone())
        })
        .await
    }

    async fn vm_recover(&self, r: Request<pb::VmRecoverRequest>) -> Result<Response<pb::VmInfo>, Status> {
        let r = r.into_inner();
        self.handle(format!("VmRecover({},{})", r.name, r.to), |m| {
            m.vm(&r.name)?;
            m.node(&r.to)?;
            let vm = m.vms.get_mut(&r.name).expect("checked");
            vm.node = r.to;
            vm.generation += 1;
            Ok(vm.clone())
        })
        .await
    }

    /// Pages as the agent does: names after the token, at most
    /// `page_size` (0: all), filtered.
    async fn vm_list(&self, r: Request<pb::VmListRequest>) -> Result<Response<pb::VmListResponse>, Status> {
        let r = r.into_inner();
        let call = format!(
            "VmList(token={},size={},node={},state={},labels={},prefix={})",
            r.page_token,
            r.page_size,
            r.node,
            r.state,
            r.labels.len(),
            r.name_prefix
        );
        self.handle(call, |m| {
            let size = if r.page_size == 0 { usize::MAX } else { r.page_size as usize };
            let matching: Vec<&pb::VmInfo> = m
                .vms
                .values()
                .filter(|v| r.page_token.is_empty() || v.name > r.page_token)
                .filter(|v| v.name.starts_with(&r.name_prefix))
                .filter(|v| r.node.is_empty() || v.node == r.node)
                .filter(|v| r.state.is_empty() || v.state == r.state)
                .filter(|v| r.labels.iter().all(|(k, value)| v.labels.get(k) == Some(value)))
                .collect();
            let vms: Vec<pb::VmInfo> = matching.iter().take(size).map(|v| (*v).clone()).collect();
            let next_page_token = if matching.len() > size {
                vms.last().map(|v| v.name.clone()).unwrap_or_default()
            } else {
                String::new()
            };
            Ok(pb::VmListResponse { vms, next_page_token })
        })
        .await
    }

    async fn vm_update(&self, r: Request<pb::VmUpdateRequest>) -> Result<Response<pb::VmUpdateResponse>, Status> {
        let r = r.into_inner();
        self.handle(format!("VmUpdate({})", r.name), |m| {
            m.vm(&r.name)?;
            if let Some(node) = &r.node {
                m.node(node)?;
            }
            let vm = m.vms.get_mut(&r.name).expect("checked");
            let mut changed = Vec::new();
            if let Some(vcpu) = r.vcpu.filter(|v| *v != vm.vcpu) {
                vm.vcpu = vcpu;
                changed.push("vcpu".to_string());
            }
            if let Some(memory) = r.memory_mib.filter(|v| *v != vm.memory_mib) {
                vm.memory_mib = memory;
                changed.push("memory_mib".to_string());
            }
            let labels_before = vm.labels.clone();
            for key in &r.remove_labels {
                vm.labels.remove(key);
            }
            vm.labels.extend(r.set_labels.clone());
            if vm.labels != labels_before {
                changed.push("labels".to_string());
            }
            let moved = r.node.as_ref().is_some_and(|n| *n != vm.node);
            if let Some(node) = &r.node {
                vm.pinned_node = node.clone();
                vm.node = node.clone();
                changed.push("node".to_string());
            }
            Ok(pb::VmUpdateResponse { vm: Some(vm.clone()), changed, moved })
        })
        .await
    }

    type ClusterBackupStream = blixard::api::service::BackupStream;

    async fn cluster_backup(
        &self,
        _: Request<pb::ClusterBackupRequest>,
    ) -> Result<Response<Self::ClusterBackupStream>, Status> {
        self.handle("ClusterBackup".into(), |_| Ok(())).await?;
        let state = blixard::state::State::with_members([blixard::state::Member::new(1, "h1", "127.0.0.1:7000")]);
        let bytes = blixard::state::codec::encode_snapshot(&state);
        let header = blixard::backup::Header::of(&state, &bytes, 7, 42, 3, "h1");
        let chunks = vec![
            Ok(pb::BackupChunk { header: header.encode(), data: Vec::new() }),
            Ok(pb::BackupChunk { header: Vec::new(), data: bytes }),
        ];
        Ok(Response::new(Box::pin(futures_util::stream::iter(chunks))))
    }

    async fn vm_status(&self, r: Request<pb::VmRequest>) -> Result<Response<pb::VmInfo>, Status> {
        let name = r.into_inner().name;
        self.handle(format!("VmStatus({name})"), |m| m.vm(&name)).await
    }

    type EventsStream = blixard::api::service::EventStream;
    type VmLogsStream = blixard::api::service::LogStream;

    async fn vm_logs(&self, r: Request<pb::VmLogsRequest>) -> Result<Response<Self::VmLogsStream>, Status> {
        let r = r.into_inner();
        let call = format!("VmLogs({}, follow={}, lines={})", r.name, r.follow, r.lines);
        let response = self.handle(call, |m| m.vm(&r.name)).await?;
        let line =
            pb::LogLine { line: format!("log of {}", response.get_ref().name), node: response.get_ref().node.clone() };
        Ok(Response::new(Box::pin(futures_util::stream::iter([Ok(line)]))))
    }

    async fn events(&self, r: Request<pb::EventsRequest>) -> Result<Response<Self::EventsStream>, Status> {
        let r = r.into_inner();
        let response =
            self.handle(format!("Events(follow={}, limit={})", r.follow, r.limit), |m| Ok(m.events.clone())).await?;
        let events: Vec<Result<pb::Event, Status>> = response.into_inner().into_iter().map(Ok).collect();
        Ok(Response::new(Box::pin(futures_util::stream::iter(events))))
    }
}

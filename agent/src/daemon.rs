//! The daemon: `blixard-agent run`. Opens the store, serves the one gRPC
//! port, starts (or waits to start) the node, and keeps this host's own
//! facts in the cluster state.
//!
//! How an agent comes to be a member, decided once at start:
//!
//! | store            | config               | start                                      |
//! |------------------|----------------------|--------------------------------------------|
//! | has an identity  | anything             | restart as that member                     |
//! | empty            | `initial_members`    | bootstrap with the others (same config)    |
//! | empty            | `join` seeds         | ask a seed to admit us, retrying, then run |
//! | empty            | neither              | uninitialised until `ClusterJoin`          |
//!
//! An uninitialised agent serves the client API (status says "not a
//! member"; everything else is `Unavailable`) and never forms a cluster of
//! its own: a typo in the config must not split a cluster in two.
//!
//! Shutdown: the `shutdown` future resolves (SIGTERM/SIGINT in the CLI),
//! systemd is told STOPPING=1, the server stops accepting, the raft thread
//! finishes its current batch (every write is durable when its transaction
//! commits, so there is nothing else to flush) and `run` returns.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic::transport::Server;

use crate::api::context::{Context, ContextControl, Dialer, GRPC_MESSAGE_BYTES_MAX, JoinRequest, Membership};
use crate::api::datagram::{self, DatagramPath};
use crate::api::gate::Gate;
use crate::api::handshake::Handshaken;
use crate::api::pb;
use crate::api::peer::{self, PeerService, PeerTransport, Sender};
use crate::api::service::BlixardService;
use crate::api::tls::{AgentAuth, Credentials};
use crate::config::{Config, RuntimeKind};
use crate::consensus::CoreConfig;
use crate::guard::GuardConfig;
use crate::metrics::Metrics;
use crate::node::events::EventLog;
use crate::node::{self, AddressBook, Node, NodeOptions, Start};
use crate::reconciler::{BoxFuture, ContactFile, ExemptFile, Proposer, Reconciler, ReconcilerConfig, RunnerWatch};
use crate::runtime::health::HealthPolicy;
use crate::state::{Capacity, CommandKind, NodeId, PROTOCOL, VmSpec};
use crate::storage::{StorageError, Store};

/// How long a proposal or read may wait inside the node.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between two admission attempts with `join` seeds, doubled up to
/// the max while they fail.
const ADMIT_BACKOFF_MIN: Duration = Duration::from_millis(500);
const ADMIT_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often a member re-checks that the cluster holds its capacity,
/// labels, address and the declared VMs (cheap when nothing differs).
const SELF_REPORT_INTERVAL: Duration = Duration::from_secs(30);
const SELF_REPORT_RETRY_MAX: Duration = Duration::from_secs(5);
/// A stopping leader waits this long for a successor to take over.
const STEP_DOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// Graceful server shutdown waits this long for requests in flight. Short:
/// the peers' Raft streams never end on their own (they are cut, and the
/// peers reconnect), clients retry, and a restart must be back within
/// `fence_after` or every guest of this host is fenced (`failure`).
const SERVER_DRAIN_TIMEOUT: Duration = Duration::from_millis(300);

/// Installs the stderr logger (journald picks it up): `log_level` as an
/// `EnvFilter`, which `RUST_LOG` overrides. Does nothing if a global
/// subscriber is already installed (tests, or a caller that set its own).
pub fn init_tracing(log_level: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| tracing_subscriber::EnvFilter::try_new(v).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(log_level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).try_init();
}

/// Tells systemd (when it started us with `Type=notify`) how we are.
fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(false, &[state]) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Runs the agent until `shutdown` resolves. Returns `Err` with one
/// sentence on a fatal error: the store cannot be opened or fails, the
/// port is taken, the configuration cannot be served.
pub async fn run(
    config: Config,
    auth: AgentAuth,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    init_tracing(&config.log_level);
    let mut shutdown: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(shutdown);
    let config = Arc::new(config);
    let mut store = open_store(&config).await?;
    let listener =
        TcpListener::bind(config.listen).await.map_err(|e| anyhow!("cannot listen on {}: {e}", config.listen))?;
    let mut known_peers = BTreeMap::new();
    let mut known_names = Vec::new();
    let credentials = match auth {
        AgentAuth::Insecure => {
            tracing::warn!(
                listen = %config.listen,
                "insecure = true: peers and clients are not authenticated and nothing is encrypted; \
                 for a cluster on this machine only"
            );
            None
        }
        AgentAuth::Tls(credentials) => {
            // A host that joined with a token follows rotations of the
            // cluster secret: a new certificate and trust at every start.
            let renewed = match (&credentials.joined, store.identity()) {
                (Some(files), Some(identity)) => {
                    let addresses: Vec<String> = store
                        .state()
                        .members()
                        .values()
                        .filter(|m| m.id != identity.id)
                        .map(|m| m.address.clone())
                        .collect();
                    peer::renew_joined(&credentials, files, identity.cluster_id, &addresses).await
                }
                _ => None,
            };
            Some(Arc::new(renewed.unwrap_or(credentials)))
        }
        AgentAuth::TokenJoin { files, token_file, pin } => {
            let Some(admitted) = token_join(&config, &files, &token_file, pin, &mut shutdown).await? else {
                tracing::info!("stopped before this host was admitted");
                return Ok(());
            };
            let id = admitted.id;
            let response = admitted.admitted.response;
            let peers: BTreeMap<NodeId, String> =
                response.members.iter().filter(|m| m.id != id).map(|m| (m.id, m.address.clone())).collect();
            let start = Start::Joined { id, cluster_id: response.cluster_id, peers: peers.clone() };
            node::prepare_store(&mut store, &config.node_name, &start)
                .map_err(|e| anyhow!("cannot record the new identity: {e}"))?;
            tracing::info!(id, cluster_id = format!("{:016x}", response.cluster_id), "admitted as a learner");
            known_peers = peers;
            known_names = response.members.iter().map(|m| (m.id, m.name.clone())).collect();
            Some(Arc::new(admitted.admitted.credentials))
        }
    };
    let dialer = credentials.clone().map_or_else(Dialer::plain, Dialer::tls);
    let datagrams = credentials.as_deref().and_then(|credentials| bind_datagrams(&listener, credentials));
    let runtime = crate::runtime::open(config.runtime, &config.state_dir, config.start_timeout).await.map_err(|e| {
        anyhow!(
            "cannot start the {} runtime: {e}",
            if config.runtime == RuntimeKind::Systemd { "systemd" } else { "process" }
        )
    })?;
    if config.runtime == RuntimeKind::Systemd && std::env::var_os("INVOCATION_ID").is_some() {
        check_own_unit(&config.timing).await;
    }
    let address = advertised(config.listen);
    let (context, control) = Context::new(config.node_name.clone(), address.clone(), dialer);
    context.set_runtime(runtime.clone());
    // Before it has the member list, a new member knows its peers' names
    // from the admission answer (their certificates are checked by them).
    for (id, name) in &known_names {
        context.remember_member_name(*id, name);
    }
    let metrics = Arc::new(Metrics::new());
    let events = Arc::new(EventLog::with_metrics(metrics.clone()));

    let (stop_server, server_stopped) = watch::channel(false);
    if let Some(address) = config.metrics_listen {
        let http = crate::http::bind(address).await?;
        // With authentication on, the dashboard is HTTPS with this
        // member's certificate (a bad one stops the agent here).
        let http_tls = match credentials.as_deref() {
            None => None,
            Some(credentials) => Some(Arc::new(
                credentials.http_server_config().map_err(|e| anyhow!("cannot serve the dashboard over HTTPS: {e}"))?,
            )),
        };
        let state = crate::http::HttpState {
            context: context.clone(),
            metrics: metrics.clone(),
            events: events.clone(),
            tls: http_tls,
        };
        let stopped = server_stopped.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(http, state, stopped).await {
                tracing::error!(error = %e, "the HTTP listener failed");
            }
        });
        tracing::info!(%address, "serving health, metrics and the dashboard over HTTP");
    }
    let builder = server_builder();
    // With credentials, TLS only (a plaintext connection fails its
    // handshake, and so does one without a client certificate unless the
    // cluster accepts joiners), with our rustls config: no resumption.
    let grpc_tls = match credentials.as_deref() {
        None => None,
        Some(credentials) => Some(Arc::new(
            credentials
                .grpc_server_config()
                .map_err(|e| anyhow!("invalid configuration: the certificate or key cannot be used: {e}"))?,
        )),
    };
    if let Some(path) = &datagrams {
        let service = Arc::new(PeerService::new(context.clone()));
        let metrics = metrics.clone();
        let accept: datagram::Accept = Arc::new(move |speaker, batch| {
            let (service, metrics) = (service.clone(), metrics.clone());
            Box::pin(async move {
                service.accept_batch(&speaker, batch).await?;
                metrics.peer_datagram_batches.inc();
                Ok(())
            })
        });
        tokio::spawn(datagram::serve(path.clone(), accept, server_stopped.clone()));
    }
    let mut server = tokio::spawn(serve(builder, listener, grpc_tls, context.clone(), server_stopped));
    tracing::info!(
        name = %config.node_name,
        listen = %config.listen,
        data_dir = %config.data_dir.display(),
        tls = match &credentials {
            None => "off",
            Some(c) if c.issuer.is_some() => "mutual, certificates from the cluster secret",
            Some(_) => "mutual",
        },
        "serving"
    );

    let mut agent = Agent {
        config: config.clone(),
        context,
        control,
        member: None,
        reporter: None,
        runtime,
        metrics,
        events,
        datagrams,
    };
    let outcome = agent.run(store, known_peers, &mut server, shutdown).await;

    notify(sd_notify::NotifyState::Stopping);
    tracing::info!("stopping");
    let _ = stop_server.send(true);
    let node_result = agent.stop_member().await;
    if !server.is_finished() && tokio::time::timeout(SERVER_DRAIN_TIMEOUT, &mut server).await.is_err() {
        server.abort();
    }
    outcome?;
    node_result.map_err(|e| anyhow!("the store failed while stopping: {e}"))?;
    tracing::info!("stopped");
    Ok(())
}

/// The peers' datagram path on the gRPC listener's port over UDP
/// (`api::datagram`); `None`, with one warning, when it cannot be set up:
/// peer traffic then goes over TCP alone.
fn bind_datagrams(listener: &TcpListener, credentials: &Credentials) -> Option<Arc<DatagramPath>> {
    let at = listener.local_addr().ok()?;
    match DatagramPath::bind(at, credentials) {
        Ok(path) => Some(Arc::new(path)),
        Err(error) => {
            tracing::warn!(
                error,
                "no datagram path for peer traffic: it goes over TCP alone, which packet loss delays more"
            );
            None
        }
    }
}

/// What an agent's start takes until it renews its quorum contact, at most,
/// on a healthy host (the store opening with 100,000 VMs is ~0.4 s; then a
/// heartbeat round): what `Timing::validate_unit` needs to fit.
const START_BUDGET_MS: u64 = 800;

/// Warns when this agent's own systemd unit would make a restart stop the
/// host's guests (`Timing::validate_unit`): a `RestartSec` too long for
/// `fence_after`, no restart at all, or a watchdog out of range.
async fn check_own_unit(timing: &crate::failure::Timing) {
    match crate::runtime::systemd::own_unit_restart().await {
        Ok(unit) => {
            if unit.restart == "no" {
                tracing::warn!(
                    unit = unit.unit,
                    "this agent's unit has Restart=no: a crashed agent is not restarted \
                    (its guests are stopped by the fence guard, and nothing runs here until it is started again)"
                );
            }
            if let Err(problem) = timing.validate_unit(unit.restart_sec_ms, unit.watchdog_sec_ms, START_BUDGET_MS) {
                tracing::warn!(unit = unit.unit, "{problem}");
            }
        }
        Err(e) => tracing::debug!(error = %e, "cannot read this agent's own unit settings"),
    }
}

/// `host:port` as peers reach this agent.
fn advertised(listen: SocketAddr) -> String {
    listen.to_string()
}

async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let data_dir = config.data_dir.clone();
    let store = tokio::task::spawn_blocking(move || node::open_store(&data_dir))
        .await
        .context("opening the store")?
        .map_err(|e| match e {
            StorageError::Open { source: redb::DatabaseError::DatabaseAlreadyOpen, .. } => anyhow!(
                "the data dir {} is in use by another blixard-agent ({} is locked)",
                config.data_dir.display(),
                node::STORE_FILE
            ),
            e => anyhow!("cannot open the store in {}: {e}", config.data_dir.display()),
        })?;
    // A host that left its cluster set its old store aside on purpose
    // (`Agent::set_removed_store_aside`): it is not a lost one.
    if !config.data_dir.join(REJOIN_MARKER).exists() {
        node::record::check(&config.data_dir, store.identity().is_some()).map_err(|e| anyhow!(e))?;
    }
    if let Some(identity) = store.identity()
        && identity.name != config.node_name
    {
        bail!(
            "the data dir {} belongs to member {:?}, not {:?}; give this host its own data dir or its old node_name",
            config.data_dir.display(),
            identity.name,
            config.node_name
        );
    }
    Ok(store)
}

async fn serve(
    builder: Server,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    context: Arc<Context>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let context_tls = context.dialer.is_tls();
    let peer = pb::peer_server::PeerServer::new(PeerService::new(context.clone()))
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    let blixard = pb::blixard_server::BlixardServer::new(BlixardService::new(context.clone()))
        .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX);
    // Every call passes the trust table first (`api::gate`): with TLS, a
    // certificate the CA signed for something else reaches no handler.
    let tls_on = context_tls;
    let peer = Gate::new(peer, tls_on);
    let blixard = Gate::new(blixard, tls_on);
    // Standard gRPC tooling: health checking (grpc.health.v1) and server
    // reflection (v1, and v1alpha for older grpcurl).
    let (reporter, health) = tonic_health::server::health_reporter();
    let health_task = tokio::spawn(report_health(reporter, context, stop.clone()));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().expect("our descriptor sets are valid");
    let reflection_v1alpha = reflection().build_v1alpha().expect("our descriptor sets are valid");
    // A peer that vanished (power loss, a cut cable) leaves a half-open
    // connection: TCP keepalive ends it (HTTP/2 keepalive pings, set in
    // `server_builder`, end one whose peer stopped answering; the TLS
    // handshake has a deadline of its own, `api::handshake`).
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(crate::api::context::TCP_KEEPALIVE))
        .with_keepalive_interval(Some(crate::api::context::TCP_KEEPALIVE_INTERVAL))
        .with_keepalive_retries(Some(crate::api::context::TCP_KEEPALIVE_RETRIES));
    let mut builder = builder;
    let router = builder
        .add_service(peer)
        .add_service(blixard)
        .add_service(Gate::new(health, tls_on))
        .add_service(Gate::new(reflection_v1, tls_on))
        .add_service(Gate::new(reflection_v1alpha, tls_on));
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let result = match tls {
        None => router.serve_with_incoming_shutdown(incoming, stopped).await,
        Some(config) => {
            let incoming = Handshaken::start("gRPC", incoming, config, |tls, _| tls).map(Ok::<_, std::io::Error>);
            router.serve_with_incoming_shutdown(incoming, stopped).await
        }
    };
    health_task.abort();
    result
}

/// How often the gRPC health status is brought up to date.
const HEALTH_INTERVAL: Duration = Duration::from_millis(500);

/// The gRPC health of the server (`""`) is SERVING while it serves; that of
/// `blixard.v1.Blixard` is SERVING when this agent is a member that knows a
/// leader (as `/readyz`), else NOT_SERVING.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    context: Arc<Context>,
    stop: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    const BLIXARD: &str = "blixard.v1.Blixard";
    reporter.set_service_status("", ServingStatus::Serving).await;
    let mut last = None;
    let mut tick = tokio::time::interval(HEALTH_INTERVAL);
    loop {
        tick.tick().await;
        let ready = !*stop.borrow()
            && context.membership().is_some_and(|m| {
                let status = m.node.status();
                !status.removed && status.leader.is_some()
            });
        if last != Some(ready) {
            let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
            reporter.set_service_status(BLIXARD, status).await;
            last = Some(ready);
        }
    }
}

/// The server's transport settings (TLS is `serve`'s, over our own
/// accept loop: `api::handshake`).
fn server_builder() -> Server {
    Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        // Bounds the work one connection can queue on us.
        .concurrency_limit_per_connection(256)
        .max_concurrent_streams(Some(256))
}

/// What a join with a token left.
struct TokenJoined {
    id: NodeId,
    admitted: crate::api::join::Admitted,
}

/// A host with neither the cluster secret nor a certificate: asks the
/// `join` seeds in turn to admit it with the token (which pins the
/// cluster's CA, `api::join`) until one does, backing off between rounds.
/// `None` if `shutdown` came first. A refusal that retrying cannot change
/// (the wrong cluster, a used token) is fatal.
async fn token_join(
    config: &Config,
    files: &crate::pki::JoinedFiles,
    token_file: &std::path::Path,
    pin: crate::pki::Fingerprint,
    shutdown: &mut Pin<Box<dyn Future<Output = ()> + Send>>,
) -> anyhow::Result<Option<TokenJoined>> {
    // systemd waits for READY=1 (`Type=notify`): admission may take long,
    // and this agent serves nothing until it is over.
    notify(sd_notify::NotifyState::Ready);
    let mut watchdog = watchdog_interval();
    let id = crate::pki::join_id_or_create(&config.data_dir, node::random_member_id)
        .map_err(|e| anyhow!("cannot keep this host's member id: {e}"))?;
    let key = files.key_or_create().map_err(|e| anyhow!("cannot keep this host's key: {e}"))?;
    crate::failpoint::hit("join-before-admit");
    let address = advertised(config.listen);
    let mut backoff = ADMIT_BACKOFF_MIN;
    tracing::info!(id, pin = %pin, "joining with a token; this host serves nothing until it is admitted");
    loop {
        for seed in &config.join {
            let token = crate::join_token::read_file("the join token", token_file)
                .map_err(|e| anyhow!("invalid configuration: `join_token_file`: {e}"))?;
            let request = pb::AdmitRequest {
                id,
                name: config.node_name.clone(),
                address: address.clone(),
                token,
                ..Default::default()
            };
            tracing::info!(seed, id, "asking to be admitted to the cluster");
            let attempt = crate::api::join::attempt(seed, request, &key, pin, files);
            tokio::select! {
                () = &mut *shutdown => return Ok(None),
                outcome = attempt => match outcome {
                    Ok(admitted) => return Ok(Some(TokenJoined { id, admitted })),
                    Err(status) if is_final(&status) => {
                        return Err(anyhow!("{seed} refused to admit this host: {}", status.message()));
                    }
                    Err(status) => tracing::warn!(seed, error = %status.message(), "admission failed; retrying"),
                },
            }
        }
        let pause = tokio::time::sleep(backoff);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut *shutdown => return Ok(None),
                () = &mut pause => break,
                _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                    notify(sd_notify::NotifyState::Watchdog);
                }
            }
        }
        backoff = (backoff * 2).min(ADMIT_BACKOFF_MAX);
    }
}

struct Running {
    node: Node,
    reconciler: JoinHandle<()>,
}

struct Agent {
    config: Arc<Config>,
    context: Arc<Context>,
    control: ContextControl,
    member: Option<Running>,
    reporter: Option<JoinHandle<()>>,
    /// Opened once at start: the systemd runtime re-adopts running guests.
    runtime: Arc<dyn crate::runtime::Runtime>,
    metrics: Arc<Metrics>,
    events: Arc<EventLog>,
    /// The peers' second path for small messages, if UDP could be bound.
    datagrams: Option<Arc<DatagramPath>>,
}

impl Agent {
    async fn run(
        &mut self,
        store: Store,
        known_peers: BTreeMap<NodeId, String>,
        server: &mut JoinHandle<Result<(), tonic::transport::Error>>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut store = Some(store);
        let identity = store.as_ref().and_then(|s| s.identity().cloned());
        // A host that left (was removed) and set its old store aside to join
        // again never bootstraps from `initial_members`: it is not one of a
        // new cluster's first members any more.
        let rejoining = self.config.data_dir.join(REJOIN_MARKER).exists();
        if identity.is_none() && rejoining {
            tracing::info!(
                "this host left its cluster and waits to join again: `blixard-agent cluster join ADDRESS` (or `join` \
                 seeds in the config)"
            );
        } else if identity.is_some() || !self.config.initial_members.is_empty() {
            let mut store = store.take().expect("not taken yet");
            let mode = if identity.is_some() { "restarting as a member" } else { "bootstrapping" };
            if identity.is_none() {
                self.check_bootstrap().await?;
            }
            node::prepare_store(
                &mut store,
                &self.config.node_name,
                &Start::InitialMembers(&self.config.initial_members),
            )
            .map_err(|e| anyhow!("cannot prepare the store: {e}"))?;
            tracing::info!(mode, "starting the node");
            self.start_member(store, known_peers)?;
        } else if self.config.join.is_empty() {
            tracing::info!("not a member of any cluster; waiting for `blixard-agent cluster join ADDRESS`");
        }
        // Ready once serving, member or not: admission may take long.
        notify(sd_notify::NotifyState::Ready);
        let mut watchdog = watchdog_interval();

        // A joiner keeps one id across its admission attempts and its
        // restarts (`DATA_DIR/join-id`), so an attempt that landed but
        // whose answer was lost is recognised.
        let mut join_id = None;
        let mut admit_backoff = ADMIT_BACKOFF_MIN;
        let mut next_admit = tokio::time::Instant::now();
        // The running node, to notice its raft thread ending.
        let mut node = self.member.as_ref().map(|m| m.node.handle());
        loop {
            let admitting = store.is_some() && !self.config.join.is_empty();
            tokio::select! {
                () = &mut shutdown => {
                    // Still serving: the successor's messages reach us, so we
                    // see the handover complete.
                    if let Some(member) = &self.member {
                        member.node.handle().step_down(STEP_DOWN_TIMEOUT).await;
                    }
                    return Ok(());
                }
                result = &mut *server => {
                    return match result {
                        Ok(Ok(())) => Err(anyhow!("the gRPC server stopped unexpectedly")),
                        Ok(Err(e)) => Err(anyhow!("the gRPC server failed: {}", peer::transport_cause(&e))),
                        Err(e) => Err(anyhow!("the gRPC server task failed: {e}")),
                    };
                }
                () = async { node.as_ref().expect("guarded").stopped().await }, if node.is_some() => {
                    // The raft thread ended on its own: a storage failure.
                    let running = self.member.take().expect("a handle implies a node");
                    let result = tokio::task::spawn_blocking(move || running.node.shutdown()).await;
                    return match result {
                        Ok(Err(e)) => Err(anyhow!("the store failed: {e}")),
                        _ => Err(anyhow!("the raft thread stopped unexpectedly")),
                    };
                }
                request = self.control.joins.recv(), if store.is_some() || self.removed() => {
                    let Some(request) = request else { continue };
                    let JoinRequest { seed, token, reply } = request;
                    if store.is_none() {
                        // Removed from its cluster: the old store goes aside
                        // (never deleted), and the host joins as a new member.
                        match self.set_removed_store_aside().await {
                            Ok(fresh) => {
                                store = Some(fresh);
                                node = None;
                                // A new member: a new id too.
                                join_id = None;
                            }
                            Err(e) => {
                                let _ = reply.send(Err(tonic::Status::internal(format!("{e:#}"))));
                                continue;
                            }
                        }
                    }
                    let outcome = match self.join_id(&mut join_id) {
                        Ok(id) => self.join(&mut store, id, &seed, token).await,
                        Err(e) => Err(tonic::Status::internal(e.to_string())),
                    };
                    if outcome.is_ok() {
                        node = self.member.as_ref().map(|m| m.node.handle());
                    }
                    let _ = reply.send(outcome);
                }
                () = tokio::time::sleep_until(next_admit), if admitting => {
                    let seeds = self.config.join.clone();
                    let token = self.join_token()?;
                    let id = self.join_id(&mut join_id)?;
                    let mut joined = false;
                    for seed in &seeds {
                        match self.join(&mut store, id, seed, token.clone()).await {
                            Ok(_) => { joined = true; break; }
                            Err(status) if is_final(&status) => {
                                return Err(anyhow!("{seed} refused to admit this host: {}", status.message()));
                            }
                            Err(status) => tracing::warn!(seed, error = %status.message(), "admission failed; retrying"),
                        }
                    }
                    if joined {
                        node = self.member.as_ref().map(|m| m.node.handle());
                    } else {
                        next_admit = tokio::time::Instant::now() + admit_backoff;
                        admit_backoff = (admit_backoff * 2).min(ADMIT_BACKOFF_MAX);
                    }
                }
                _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                    // Only a working agent pets the watchdog: a dead raft
                    // thread is caught above, a wedged runtime never gets here.
                    notify(sd_notify::NotifyState::Watchdog);
                }
            }
        }
    }

    /// The member id this host asks to be admitted as (see `pki::join_id_or_create`).
    fn join_id(&self, cached: &mut Option<NodeId>) -> anyhow::Result<NodeId> {
        if let Some(id) = cached {
            return Ok(*id);
        }
        let id = crate::pki::join_id_or_create(&self.config.data_dir, node::random_member_id)
            .map_err(|e| anyhow!("cannot keep this host's member id: {e}"))?;
        *cached = Some(id);
        Ok(id)
    }

    fn join_token(&self) -> anyhow::Result<String> {
        match &self.config.join_token_file {
            None => Ok(String::new()),
            Some(path) => crate::join_token::read_file("the join token", path)
                .map_err(|e| anyhow!("invalid configuration: `join_token_file`: {e}")),
        }
    }

    /// Whether this agent's node was removed from its cluster.
    fn removed(&self) -> bool {
        self.member.as_ref().is_some_and(|m| m.node.handle().status().removed)
    }

    /// A removed member's way back: stops its node, renames its store to
    /// `blixard.redb.removed-<unix ms>` (kept for inspection, never
    /// deleted), marks the data dir as rejoining and opens a new, empty
    /// store to join with.
    async fn set_removed_store_aside(&mut self) -> anyhow::Result<Store> {
        self.stop_member().await.map_err(|e| anyhow!("the store failed while stopping: {e}"))?;
        let data_dir = self.config.data_dir.clone();
        let old = node::store_path(&data_dir);
        let aside = data_dir.join(format!("{}.removed-{}", node::STORE_FILE, node::now_unix_ms()));
        std::fs::write(data_dir.join(REJOIN_MARKER), "this host left its cluster; it joins again as a new member\n")
            .with_context(|| format!("cannot mark {} as rejoining", data_dir.display()))?;
        std::fs::rename(&old, &aside)
            .with_context(|| format!("cannot set the old store {} aside as {}", old.display(), aside.display()))?;
        // The id it joined with goes too: it joins as a new member.
        let join_id = data_dir.join(crate::pki::JOIN_ID_FILE);
        if join_id.exists() {
            let id_aside = data_dir.join(format!("{}.removed-{}", crate::pki::JOIN_ID_FILE, node::now_unix_ms()));
            std::fs::rename(&join_id, &id_aside)
                .with_context(|| format!("cannot set the old member id {} aside", join_id.display()))?;
        }
        node::record::forget(&data_dir)
            .with_context(|| format!("cannot remove {} from {}", node::record::MEMBER_FILE, data_dir.display()))?;
        tracing::warn!(
            old = %aside.display(),
            "left the cluster earlier: its old store is set aside, and this host joins as a new member"
        );
        open_store(&self.config).await
    }

    /// Asks `seed` to admit this host, then starts the node. On success the
    /// store has been moved into the node.
    async fn join(
        &mut self,
        store: &mut Option<Store>,
        id: NodeId,
        seed: &str,
        token: String,
    ) -> Result<pb::ClusterJoinResponse, tonic::Status> {
        if store.is_none() {
            return Err(tonic::Status::failed_precondition("this agent is already a member"));
        }
        tracing::info!(seed, id, "asking to be admitted to the cluster");
        let request = pb::AdmitRequest {
            id,
            name: self.config.node_name.clone(),
            address: self.context.address.clone(),
            token,
            ..Default::default()
        };
        let admitted = peer::admit(&self.context.dialer, seed, request).await?;
        for m in &admitted.members {
            self.context.remember_member_name(m.id, &m.name);
        }
        let peers: BTreeMap<NodeId, String> =
            admitted.members.iter().filter(|m| m.id != id).map(|m| (m.id, m.address.clone())).collect();
        let mut prepared = store.take().expect("checked above");
        let start = Start::Joined { id, cluster_id: admitted.cluster_id, peers: peers.clone() };
        if let Err(e) = node::prepare_store(&mut prepared, &self.config.node_name, &start) {
            *store = Some(prepared);
            return Err(tonic::Status::internal(format!("cannot record the new identity: {e}")));
        }
        // The identity is on disk: from here a failure is fatal for the
        // store (a restart resumes as this member).
        let _ = std::fs::remove_file(self.config.data_dir.join(REJOIN_MARKER));
        self.start_member(prepared, peers).map_err(|e| tonic::Status::internal(e.to_string()))?;
        tracing::info!(seed, id, cluster_id = format!("{:016x}", admitted.cluster_id), "admitted as a learner");
        Ok(pb::ClusterJoinResponse { name: self.config.node_name.clone(), id })
    }

    /// Before bootstrapping a new cluster from `initial_members`: no other
    /// initial member may hold a cluster that is past the bootstrap point
    /// and has heard from this host (its capacity, which only this host
    /// may report, `crate::trust`): then this host's store was lost, and
    /// bootstrapping again would make it a voter with a forgotten vote and
    /// log. A late first start (the others formed the cluster without it)
    /// is fine, and so is a peer that cannot be reached (nothing to tell).
    async fn check_bootstrap(&self) -> anyhow::Result<()> {
        let me = self.config.node_name.clone();
        let cluster_id = node::cluster_id_of(&self.config.initial_members);
        let checks = self.config.initial_members.iter().filter(|m| m.name != me).map(|peer| {
            let (dialer, me, peer) = (self.context.dialer.clone(), me.clone(), peer.clone());
            async move {
                let knows =
                    tokio::time::timeout(BOOTSTRAP_CHECK_TIMEOUT, peer_knows(&dialer, &peer.address, cluster_id, &me));
                (peer.name, knows.await.unwrap_or(None))
            }
        });
        for (peer, knows) in futures_util::future::join_all(checks).await {
            if let Some(applied) = knows {
                bail!(
                    "initial member {peer} holds this cluster at index {applied}, past its bootstrap, and this host \
                     {me} has taken part in it, but this host's data dir {} is empty: its store is lost; remove the \
                     old member (`blixard-agent cluster leave {me}` on another member) and join this host as a new \
                     member (docs/replacing-a-disk.md)",
                    self.config.data_dir.display()
                );
            }
        }
        Ok(())
    }

    /// Starts the node over a prepared store and publishes it to the API.
    fn start_member(&mut self, store: Store, known_peers: BTreeMap<NodeId, String>) -> anyhow::Result<()> {
        let identity = store.identity().cloned().ok_or_else(|| anyhow!("the store has no identity"))?;
        node::record::write(&self.config.data_dir, &identity).map_err(|e| {
            anyhow!("cannot write {} in {}: {e}", node::record::MEMBER_FILE, self.config.data_dir.display())
        })?;
        let addresses = AddressBook::default();
        let me = Sender { id: identity.id, cluster_id: identity.cluster_id, address: self.context.address.clone() };
        let (transport, link) = PeerTransport::new(
            me,
            addresses.clone(),
            self.context.dialer.clone(),
            self.datagrams.clone(),
            tokio::runtime::Handle::current(),
        );
        let raft = &self.config.raft;
        let options = NodeOptions {
            tick: Duration::from_millis(raft.tick_ms),
            core: CoreConfig {
                election_tick: raft.election_ticks,
                heartbeat_tick: raft.heartbeat_ticks,
                log_compact_entries_max: raft.log_compact_entries_max,
                ..CoreConfig::new(identity.id)
            },
            request_timeout: REQUEST_TIMEOUT,
            timing: self.config.timing,
            policy: crate::scheduler::Policy { strategy: self.config.strategy, ..crate::scheduler::Policy::default() },
            metrics: self.metrics.clone(),
            events: self.events.clone(),
            voters: self.config.voters,
        };
        let node = Node::start(store, options, Box::new(transport), addresses, known_peers)
            .map_err(|e| anyhow!("cannot start the node: {e}"))?;
        link.attach(node.handle());
        self.control.membership.send_replace(Some(Membership {
            node: node.handle(),
            id: identity.id,
            cluster_id: identity.cluster_id,
        }));
        tracing::info!(id = identity.id, cluster_id = format!("{:016x}", identity.cluster_id), "member running");
        self.reporter = Some(tokio::spawn(report_self(self.context.clone(), self.config.clone())));
        let reconciler = Reconciler::new(
            identity.id,
            node.handle(),
            self.runtime.clone(),
            Arc::new(ContextProposer(self.context.clone())),
            ReconcilerConfig {
                timing: self.config.timing,
                health: HealthPolicy::default(),
                contact_file: Some(ContactFile::in_dir(&self.config.data_dir)),
                exempt_file: Some(ExemptFile::in_dir(&self.config.data_dir)),
                metrics: self.metrics.clone(),
                // Only microvm.nix's units link `booted`: the process runtime
                // starts `current` itself and has nothing to roll.
                runners: (self.config.runtime == RuntimeKind::Systemd)
                    .then(|| RunnerWatch::new(&self.config.state_dir)),
            },
        );
        let guard =
            GuardConfig::new(&self.config.data_dir, &self.config.state_dir, self.config.runtime, &self.config.timing);
        let runtime = self.runtime.clone();
        let reconciler = tokio::spawn(async move {
            // The guard runs before the first guest may start (with the
            // systemd runtime no guest starts without it).
            let keeper = match std::env::current_exe() {
                Ok(exe) => {
                    let spec = guard.spec(exe);
                    ensure_guard(runtime.as_ref(), &spec, &mut None).await;
                    Some(tokio::spawn(keep_guard(runtime, spec)))
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot find this agent's binary to run the fence guard with; \
                        guests stop only while this agent runs");
                    None
                }
            };
            let _keeper = AbortOnDrop(keeper);
            if let Err(e) = reconciler.run(std::future::pending()).await {
                tracing::error!(error = %e, "the reconciler stopped; guests on this host are no longer managed");
            }
        });
        self.member = Some(Running { node, reconciler });
        Ok(())
    }

    /// Stops the node (if any), waiting for the raft thread to finish.
    async fn stop_member(&mut self) -> Result<(), StorageError> {
        if let Some(reporter) = self.reporter.take() {
            reporter.abort();
        }
        self.control.membership.send_replace(None);
        let Some(running) = self.member.take() else { return Ok(()) };
        running.reconciler.abort();
        tokio::task::spawn_blocking(move || running.node.shutdown())
            .await
            .unwrap_or_else(|_| Err(StorageError::Redb("the raft thread panicked".into())))
    }
}

/// In the data dir while a host that left its cluster waits to join again
/// (see `Agent::set_removed_store_aside`).
pub const REJOIN_MARKER: &str = "rejoin-pending";

/// How often the agent makes sure the fence guard runs.
const GUARD_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Aborts a task when dropped (the guard keeper ends with the reconciler).
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// One look at the fence guard (see `guard`): starts it when it does not
/// run, and logs what it found when that differs from `last`.
async fn ensure_guard(
    runtime: &dyn crate::runtime::Runtime,
    spec: &crate::runtime::GuardSpec,
    last: &mut Option<String>,
) {
    use crate::runtime::GuardStatus;
    let found = match runtime.ensure_guard(spec).await {
        Ok(GuardStatus::Running) => None,
        Ok(GuardStatus::Unsupported) => None,
        Ok(GuardStatus::Started(how)) => {
            tracing::info!("fence guard: {how}");
            None
        }
        Ok(GuardStatus::Degraded(why)) => Some(format!("fence guard: {why}")),
        Err(e) => Some(format!(
            "fence guard: cannot make sure it runs ({e}); guests stop without quorum contact only while this agent runs"
        )),
    };
    if found != *last
        && let Some(problem) = &found
    {
        tracing::error!("{problem}");
    }
    *last = found;
}

/// Keeps the fence guard running while this agent is a member.
async fn keep_guard(runtime: Arc<dyn crate::runtime::Runtime>, spec: crate::runtime::GuardSpec) {
    let mut last = None;
    loop {
        tokio::time::sleep(GUARD_CHECK_INTERVAL).await;
        ensure_guard(runtime.as_ref(), &spec, &mut last).await;
    }
}

/// The reconciler proposes through the API context: locally on the
/// leader, else forwarded to it.
struct ContextProposer(Arc<Context>);

impl Proposer for ContextProposer {
    fn propose(&self, kind: CommandKind) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.propose(kind).await.map_err(|status| status.message().to_string()) })
    }
}

/// How long the check before bootstrapping waits for each other initial
/// member (one that does not answer in time tells nothing).
const BOOTSTRAP_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether the initial member at `address` holds cluster `cluster_id` past
/// its bootstrap point with a report from member `me` in it: the index it
/// has applied, if so.
async fn peer_knows(dialer: &Dialer, address: &str, cluster_id: u64, me: &str) -> Option<u64> {
    let channel = dialer.endpoint(address).ok()?.connect().await.ok()?;
    let mut client = Context::blixard_client(channel);
    let status = client.cluster_status(pb::ClusterStatusRequest {}).await.ok()?.into_inner();
    if !status.member || status.cluster_id != cluster_id || status.applied_index <= crate::consensus::BOOTSTRAP_INDEX {
        return None;
    }
    let nodes = client.node_list(pb::NodeListRequest {}).await.ok()?.into_inner().nodes;
    let mine = nodes.iter().find(|n| n.name == me)?;
    (mine.vcpu_total > 0 || mine.memory_mib_total > 0).then_some(status.applied_index)
}

/// Errors after which retrying admission cannot help.
fn is_final(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::AlreadyExists
            | Code::FailedPrecondition
            | Code::PermissionDenied
            | Code::NotFound
    )
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), halved. As
/// `sd_watchdog_enabled(3)`: `WATCHDOG_PID`, when set, must be our pid
/// (the `sd-notify` crate insists on it being set at all).
fn watchdog_interval() -> Option<tokio::time::Interval> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    if usec == 0 {
        return None;
    }
    let mut interval = tokio::time::interval(Duration::from_micros(usec / 2));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    Some(interval)
}

/// What the cluster should hold about this host and its declared VMs.
#[derive(Debug, Clone)]
struct Desired {
    capacity: Capacity,
    labels: crate::state::Labels,
    address: String,
}

/// Keeps this host's capacity, labels and address, and the declared VMs,
/// in the cluster state: at start, then every [`SELF_REPORT_INTERVAL`].
async fn report_self(context: Arc<Context>, config: Arc<Config>) {
    let desired = Desired {
        capacity: config.capacity_or_detected(),
        labels: config.labels.clone(),
        address: context.address.clone(),
    };
    let mut retry = Duration::from_millis(200);
    loop {
        match report_once(&context, &config, &desired).await {
            Ok(()) => {
                retry = Duration::from_millis(200);
                tokio::time::sleep(SELF_REPORT_INTERVAL).await;
            }
            Err(e) => {
                tracing::debug!(error = %e.message(), "reporting this host to the cluster failed; retrying");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(SELF_REPORT_RETRY_MAX);
            }
        }
    }
}

/// The cluster's view of this host and of the declared VMs, as far as it
/// differs from the config.
#[derive(Debug, Default)]
struct Differences {
    commands: Vec<CommandKind>,
}

fn differences(
    state: &crate::state::State,
    id: NodeId,
    desired: &Desired,
    declared: &[crate::config::DeclaredVm],
) -> Option<Differences> {
    let me = state.member(id)?;
    let mut out = Differences::default();
    if me.capacity != desired.capacity {
        out.commands.push(CommandKind::SetCapacity { node: id, capacity: desired.capacity });
    }
    if me.labels != desired.labels {
        out.commands.push(CommandKind::SetLabels { node: id, labels: desired.labels.clone() });
    }
    // With its address, which entries this agent applies: the leader waits
    // for every member's before it proposes one an older agent cannot apply
    // (a demotion).
    if me.address != desired.address || me.protocol != PROTOCOL {
        out.commands.push(CommandKind::SetAddress { node: id, address: desired.address.clone(), protocol: PROTOCOL });
    }
    for vm in declared {
        match state.vm(&vm.name) {
            None => out.commands.push(CommandKind::CreateVm { name: vm.name.clone(), spec: vm.spec.clone() }),
            Some(current) => {
                // `desired` is the initial state only: `vm stop` must
                // survive an agent restart, so it is never overwritten.
                let spec = VmSpec { desired: current.spec.desired, ..vm.spec.clone() };
                if current.spec != spec {
                    out.commands.push(CommandKind::UpdateVm { name: vm.name.clone(), spec });
                }
            }
        }
    }
    Some(out)
}

async fn report_once(context: &Context, config: &Config, desired: &Desired) -> Result<(), tonic::Status> {
    let member = context.membership().ok_or_else(|| tonic::Status::unavailable("not a member"))?;
    let id = member.id;
    let (want, declared) = (desired.clone(), config.vms.clone());
    let differences = member
        .node
        .read(move |state, _| differences(state, id, &want, &declared))
        .await
        .map_err(tonic::Status::from)?
        .ok_or_else(|| tonic::Status::unavailable("this member is not in the member list yet"))?;
    for command in differences.commands {
        match context.propose(command.clone()).await {
            Ok(()) => tracing::info!(command = %command, "reported to the cluster"),
            // Another agent declared the same VM first.
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) if is_final(&s) => {
                tracing::warn!(command = %command, error = %s.message(), "the cluster refused a report")
            }
            Err(s) => return Err(s),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DeclaredVm;
    use crate::state::{Command, Desired as VmDesired, Member, State};

    #[test]
    fn only_differences_are_reported_and_desired_is_kept() {
        let mut state = State::with_members([Member::new(1, "h1", "127.0.0.1:7000")]);
        let desired = Desired {
            capacity: Capacity { vcpu: 4, memory_mib: 4096, ..Capacity::default() },
            labels: [("rack".to_string(), "r1".to_string())].into(),
            address: "127.0.0.1:7000".into(),
        };
        let web = DeclaredVm { name: "web".into(), spec: VmSpec { vcpu: 1, memory_mib: 128, ..VmSpec::default() } };
        let diff = differences(&state, 1, &desired, std::slice::from_ref(&web)).unwrap();
        // Capacity, labels, the declared VM, and (same address) the protocol.
        assert_eq!(diff.commands.len(), 4, "{diff:?}");
        assert!(diff.commands.contains(&CommandKind::SetAddress {
            node: 1,
            address: "127.0.0.1:7000".into(),
            protocol: PROTOCOL
        }));
        for kind in diff.commands {
            state.apply(&Command { at_unix_ms: 1, kind }).unwrap();
        }
        assert!(differences(&state, 1, &desired, std::slice::from_ref(&web)).unwrap().commands.is_empty());
        assert_eq!(state.member(1).unwrap().protocol, PROTOCOL);
        let stop = CommandKind::SetDesired { name: "web".into(), desired: VmDesired::Stopped };
        state.apply(&Command { at_unix_ms: 2, kind: stop }).unwrap();
        assert!(differences(&state, 1, &desired, std::slice::from_ref(&web)).unwrap().commands.is_empty());
        let bigger = DeclaredVm { name: "web".into(), spec: VmSpec { vcpu: 2, ..web.spec.clone() } };
        let diff = differences(&state, 1, &desired, &[bigger]).unwrap();
        assert!(
            matches!(&diff.commands[..], [CommandKind::UpdateVm { spec, .. }] if spec.vcpu == 2 && spec.desired == VmDesired::Stopped)
        );
        assert!(differences(&state, 9, &desired, &[]).is_none());
    }
}

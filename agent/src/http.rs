//! The agent's HTTP listener (`metrics_listen`): health and readiness for
//! load balancers and systemd-style probes, Prometheus metrics and the
//! dashboard. It is separate from the gRPC port so that it can be bound to
//! a management network (or loopback).
//!
//! With authentication on (`[tls]`), it speaks HTTPS with this agent's
//! member certificate and asks browsers for a client certificate of the
//! cluster CA, verified when given but not required: probes and
//! Prometheus need none, and the dashboard decides what each connection
//! may see and do from it (`dashboard::access`). Without authentication it
//! is plain HTTP and the dashboard is read-only. Nothing here writes to
//! the cluster but the dashboard's actions, which go through the client
//! API's handlers.
//!
//! Each concern contributes an `axum::Router`; this module only merges them
//! and serves. Routes:
//!
//! - `GET /healthz`: 200 while the process serves at all.
//! - `GET /readyz`: 200 when this agent is a cluster member that knows a
//!   leader (it can answer linearizable reads and forward writes), else 503
//!   with the reason.
//! - `GET /metrics`: OpenMetrics text (see `metrics` for the names).
//! - The dashboard (`/`, `/dashboard`, `/api/...`): see `crate::dashboard`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;

use crate::api::context::Context;
use crate::api::handshake::{Handshaken, TlsConnection};
use crate::metrics::{self, Metrics};
use crate::node::events::EventLog;

/// `prometheus-client` writes the OpenMetrics text format (which
/// Prometheus scrapes natively).
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Fills the gauges that mirror the node (from its status and its local
/// state, which needs no leader) and encodes every metric.
async fn metrics_text(State(state): State<HttpState>) -> impl IntoResponse {
    if let Some(member) = state.context.membership() {
        state.metrics.set_status(&member.node.status());
        state.metrics.set_contact(member.node.has_quorum_contact(), member.node.contact_age_ms());
        if let Ok((counts, hosts)) = member.node.read_local(|s, _| (metrics::vm_counts(s), metrics::host_rows(s))).await
        {
            state.metrics.set_vms(&counts);
            state.metrics.set_hosts(&hosts);
        }
    }
    ([(header::CONTENT_TYPE, OPENMETRICS_TEXT)], state.metrics.encode())
}
use crate::dashboard::Dashboard;
use crate::dashboard::access::{Access, Peer, access_of};

/// What the HTTP handlers can see.
#[derive(Clone)]
pub struct HttpState {
    pub context: Arc<Context>,
    pub metrics: Arc<Metrics>,
    /// The cluster events this agent derived: `events.recent(n)` for a
    /// page, `events.follow(n)` for a live view (see `node::events`).
    pub events: Arc<EventLog>,
    /// HTTPS with the cluster's certificates (authentication on); `None`:
    /// plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<HttpState>) -> (StatusCode, String) {
    let Some(member) = state.context.membership() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "not a member of a cluster yet\n".into());
    };
    let status = member.node.status();
    if status.removed {
        return (StatusCode::SERVICE_UNAVAILABLE, "removed from the cluster\n".into());
    }
    match status.leader {
        Some(leader) => (StatusCode::OK, format!("ready: leader {} term {}\n", leader.name, status.term)),
        None => (StatusCode::SERVICE_UNAVAILABLE, format!("no leader known in term {}\n", status.term)),
    }
}

/// Every route of the listener.
pub fn router(state: HttpState, dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
        .merge(crate::dashboard::router(dashboard))
}

/// Binds `address` (before the agent reports ready, so a taken port is an
/// error at start, not a warning later).
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|e| anyhow::anyhow!("cannot listen on {address} (metrics_listen): {e}"))
}

/// Serves until `stop` turns true.
pub async fn serve(listener: TcpListener, state: HttpState, mut stop: watch::Receiver<bool>) -> std::io::Result<()> {
    let dashboard = Dashboard::start(state.context.clone(), state.metrics.clone(), state.events.clone(), stop.clone());
    let tls = state.tls.clone();
    let app = router(state, dashboard).into_make_service_with_connect_info::<Peer>();
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    match tls {
        None => axum::serve(listener, app).with_graceful_shutdown(stopped).await,
        Some(config) => axum::serve(TlsListener::new(listener, config), app).with_graceful_shutdown(stopped).await,
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TcpListener>) -> Peer {
        Peer { address: *stream.remote_addr(), access: Access::Open }
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Peer {
        stream.remote_addr().clone()
    }
}

/// The listener over TLS: connections come out of it handshaken
/// (`api::handshake`: concurrently, with a deadline), with what their
/// client certificate allows.
pub struct TlsListener {
    ready: Handshaken<(TlsConnection, Peer)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> TlsListener {
        let local = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let ready = Handshaken::start("HTTP", incoming, config, |tls, address| {
            let leaf = tls.get_ref().1.peer_certificates().and_then(|certs| certs.first()).map(|c| c.to_vec());
            let peer = Peer { address, access: access_of(leaf.as_deref()) };
            (tls, peer)
        });
        TlsListener { ready, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConnection;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.next().await {
            Some(connection) => connection,
            // The acceptor ended (its listener failed for good): no more
            // connections, as a closed listener.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(Peer { address: self.local, access: Access::Anonymous })
    }
}

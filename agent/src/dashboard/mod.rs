//! The web dashboard, served by every agent on its HTTP listener
//! (`metrics_listen`; HTTPS with the cluster's certificates when
//! authentication is on): a problems-first view of the members, every VM
//! with why it is not running, detail views, graphs over the last hour, the
//! cluster's event history and, for an admin client certificate, actions.
//! See docs/dashboard.md.
//!
//! One sampler per agent takes an [`Overview`] from the locally applied
//! state (a local read: it works without a leader, which is when an
//! operator needs the page most), at most every [`SAMPLE_INTERVAL`] and
//! only when something it shows changed ([`Signature`]) and someone looks
//! (a live stream is open, or a request came within [`VIEWER_IDLE`]). Each
//! new [`Snapshot`] has a version and a delta from the one before (the VMs
//! that changed, the ones removed, the events added), encoded once and
//! shared by every live stream: a change of one VM among 10,000 sends that
//! VM, not 10,000, and the cost does not grow with the number of viewers.
//! The full JSON is encoded only when a page load or a stream that fell
//! behind needs it.
//!
//! The events are the agent's own event log (`node::events`), the one
//! history of the cluster that `blixard-agent events` shows too.
//!
//! - `overview`: the wire types and the pure function from state to overview.
//! - `history`: the samples behind the graphs.
//! - `access`: who may see and who may act.
//! - `actions`: start, stop, migrate, drain, undrain through the client API.
//! - `page`: the server-rendered HTML; `assets/` the script and style
//!   sheet, embedded in the binary: nothing is fetched from outside the agent.
//!
//! Routes (all but the bundle need view access, see `access`):
//!
//! - `GET /`, `GET /dashboard`: the page (its data embedded).
//! - `GET /api/overview`: the latest snapshot as JSON.
//! - `GET /api/overview/stream`: `text/event-stream`: `clock` (the agent's
//!   time, Unix ms), then `overview` (the full snapshot) or the `delta`s
//!   since the version in `Last-Event-ID` or `?since=`, then a `delta` per
//!   change and a `sample` per history sample. Each event's id is the
//!   snapshot version it brings the page to.
//! - `GET /api/history`: the samples of the last hour.
//! - `GET /api/events?vm=&node=&level=problems&limit=`: the event log, newest first.
//! - `GET /api/vms/{name}`, `GET /api/vms/{name}/logs?lines=N`, `GET /api/hosts/{name}`: details.
//! - `POST /api/actions`: see `actions`.
//! - `GET /dashboard/app.js`, `GET /dashboard/app.css`: the bundle.

pub mod access;
pub mod actions;
pub mod history;
pub mod overview;
pub mod page;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

use crate::api::context::Context;
use crate::consensus::Role;
use crate::metrics::Metrics;
use crate::node::events::{EVENTS_MAX, Event, EventKind, EventLog, Level};
use access::{Access, Peer};
use history::History;
use overview::{Overview, VmView};

/// How often the sampler looks at the state (while someone looks).
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// Without a live stream, sampling goes on this long after a request.
pub const VIEWER_IDLE: Duration = Duration::from_secs(30);
/// Events in a full snapshot, newest first (the log keeps more).
pub const EVENTS_SHOWN: usize = 200;
/// Warning and error events in a full snapshot, newest first, so that a
/// burst of ordinary events cannot push them out of view.
pub const PROBLEMS_SHOWN: usize = 50;
/// Concurrent live streams per agent; more get 503.
pub const STREAMS_MAX: usize = 64;
/// Deltas kept for a stream that reconnects a few versions behind.
pub const DELTAS_KEPT: usize = 32;
/// Events in a detail view.
pub const DETAIL_EVENTS_MAX: usize = 100;
/// Guest log lines a detail view shows by default, and at most.
pub const LOG_LINES_DEFAULT: u32 = 50;
pub const LOG_LINES_MAX: u32 = 1000;
/// How long reading a guest's log may take.
const LOG_TIMEOUT: Duration = Duration::from_secs(5);
/// Comment lines that keep idle streams open through proxies.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(15);

const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
/// The page loads only its own bundle and talks only to its own agent.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// An event as the page and `/api/events` show it: the shape of
/// `blixard-agent events --json`, plus its `level` and its `subject` (the
/// VM, else the host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventView {
    pub seq: u64,
    pub index: u64,
    pub at_unix_ms: u64,
    pub kind: &'static str,
    pub level: &'static str,
    pub vm: Option<String>,
    pub node: Option<String>,
    pub from: Option<String>,
    pub subject: String,
    pub message: String,
}

impl From<&Event> for EventView {
    fn from(e: &Event) -> EventView {
        EventView {
            seq: e.seq,
            index: e.index,
            at_unix_ms: e.at_unix_ms,
            kind: e.kind.as_str(),
            level: e.kind.level().as_str(),
            vm: e.vm.clone(),
            node: e.node.clone(),
            from: e.from.clone(),
            subject: e.vm.clone().or_else(|| e.node.clone()).unwrap_or_default(),
            message: e.message.clone(),
        }
    }
}

/// What the page shows depends on only these; while they stay the same,
/// nothing is sampled (the state at one applied index never changes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signature {
    member: bool,
    applied: u64,
    term: u64,
    leader: Option<u64>,
    role: Option<Role>,
    active_peers: Vec<u64>,
    quorum: bool,
    fenced: bool,
    last_event: u64,
}

/// One published view of the cluster.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    signature: Signature,
    pub overview: Overview,
    /// Newest first.
    pub events: Vec<EventView>,
    /// Warnings and errors, newest first.
    pub problems: Vec<EventView>,
    last_event_seq: u64,
    pub generated_unix_ms: u64,
    json: OnceLock<String>,
}

#[derive(Serialize)]
struct FullWire<'a> {
    #[serde(flatten)]
    overview: &'a Overview,
    version: u64,
    generated_unix_ms: u64,
    events: &'a [EventView],
    problems: &'a [EventView],
}

#[derive(Serialize)]
struct DeltaWire<'a> {
    #[serde(flatten)]
    head: &'a overview::Head,
    base: u64,
    version: u64,
    generated_unix_ms: u64,
    vms_changed: Vec<&'a VmView>,
    vms_removed: Vec<&'a str>,
    /// Newest first.
    events_added: &'a [EventView],
}

/// The change from version `base` to `version`, as JSON.
#[derive(Debug)]
struct Delta {
    base: u64,
    version: u64,
    json: String,
}

impl Snapshot {
    fn new(version: u64, signature: Signature, overview: Overview, events: Vec<EventView>, now: u64) -> Snapshot {
        let problems =
            events.iter().filter(|e| e.level != Level::Info.as_str()).take(PROBLEMS_SHOWN).cloned().collect();
        let last_event_seq = events.first().map_or(0, |e| e.seq);
        let events = events.into_iter().take(EVENTS_SHOWN).collect();
        Snapshot {
            version,
            signature,
            overview,
            events,
            problems,
            last_event_seq,
            generated_unix_ms: now,
            json: OnceLock::new(),
        }
    }

    /// The whole snapshot as JSON (`GET /api/overview`), encoded once.
    pub fn json(&self) -> &str {
        self.json.get_or_init(|| {
            let wire = FullWire {
                overview: &self.overview,
                version: self.version,
                generated_unix_ms: self.generated_unix_ms,
                events: &self.events,
                problems: &self.problems,
            };
            serde_json::to_string(&wire).expect("an overview always encodes")
        })
    }

    /// The change from `before` to this snapshot.
    fn delta_from(&self, before: &Snapshot) -> Delta {
        let (changed, removed) = diff_vms(&before.overview.vms, &self.overview.vms);
        let added = self.events.iter().take_while(|e| e.seq > before.last_event_seq).count();
        let wire = DeltaWire {
            head: &self.overview.head,
            base: before.version,
            version: self.version,
            generated_unix_ms: self.generated_unix_ms,
            vms_changed: changed,
            vms_removed: removed,
            events_added: &self.events[..added],
        };
        let json = serde_json::to_string(&wire).expect("a delta always encodes");
        Delta { base: before.version, version: self.version, json }
    }
}

/// The VMs of `after` that are new or differ from `before`, and the names
/// gone from it (both lists sorted by name).
fn diff_vms<'a>(before: &'a [VmView], after: &'a [VmView]) -> (Vec<&'a VmView>, Vec<&'a str>) {
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < before.len() || j < after.len() {
        match (before.get(i), after.get(j)) {
            (Some(b), Some(a)) if b.name == a.name => {
                if b != a {
                    changed.push(a);
                }
                i += 1;
                j += 1;
            }
            (Some(b), Some(a)) if b.name < a.name => {
                removed.push(b.name.as_str());
                i += 1;
            }
            (Some(b), None) => {
                removed.push(b.name.as_str());
                i += 1;
            }
            (_, Some(a)) => {
                changed.push(a);
                j += 1;
            }
            (None, None) => unreachable!("the loop condition"),
        }
    }
    (changed, removed)
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The dashboard of one agent: its sampler's output, its history and its
/// viewers.
pub struct Dashboard {
    context: Arc<Context>,
    metrics: Arc<Metrics>,
    events: Arc<EventLog>,
    policy: crate::scheduler::Policy,
    latest: watch::Sender<Arc<Snapshot>>,
    deltas: Mutex<VecDeque<Arc<Delta>>>,
    history: Mutex<History>,
    /// The newest history sample, as JSON, for live streams.
    sample: watch::Sender<Option<Arc<String>>>,
    streams: Arc<Semaphore>,
    /// Monotonic ms of the last request (keeps the sampler going).
    last_request_ms: AtomicU64,
    refreshing: tokio::sync::Mutex<()>,
    stop: watch::Receiver<bool>,
}

/// Counts a live stream in `dashboard_streams` while it lasts.
struct StreamGuard {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.metrics.dashboard_streams.dec();
    }
}

impl Dashboard {
    /// Starts the sampler and the history; they end when `stop` turns
    /// true, and so do the live streams (an open browser must not hold up
    /// shutdown).
    pub fn start(
        context: Arc<Context>,
        metrics: Arc<Metrics>,
        events: Arc<EventLog>,
        stop: watch::Receiver<bool>,
    ) -> Arc<Dashboard> {
        let first = Snapshot::new(0, Signature::default(), overview::not_member(&context.name), Vec::new(), 0);
        let dashboard = Arc::new(Dashboard {
            context,
            metrics,
            events,
            policy: crate::scheduler::Policy::default(),
            latest: watch::Sender::new(Arc::new(first)),
            deltas: Mutex::new(VecDeque::new()),
            history: Mutex::new(History::default()),
            sample: watch::Sender::new(None),
            streams: Arc::new(Semaphore::new(STREAMS_MAX)),
            last_request_ms: AtomicU64::new(0),
            refreshing: tokio::sync::Mutex::new(()),
            stop,
        });
        tokio::spawn(dashboard.clone().sample_until_stopped());
        tokio::spawn(dashboard.clone().record_history_until_stopped());
        dashboard
    }

    /// The latest snapshot (it may be behind; see [`Dashboard::fresh`]).
    pub fn latest(&self) -> Arc<Snapshot> {
        self.latest.borrow().clone()
    }

    fn signature(&self) -> Signature {
        let Some(member) = self.context.membership() else { return Signature::default() };
        let status = member.node.status();
        Signature {
            member: !status.removed,
            applied: status.applied,
            term: status.term,
            leader: status.leader.map(|l| l.id),
            role: Some(status.role),
            active_peers: status.active_peers,
            quorum: member.node.has_quorum_contact(),
            fenced: self.metrics.is_fenced(),
            last_event: self.events.last_seq(),
        }
    }

    /// The snapshot of the cluster as this agent has it now: the latest,
    /// or a new one if anything it shows changed.
    pub async fn fresh(&self) -> Arc<Snapshot> {
        self.last_request_ms.store(crate::clock::monotonic_ms(), Ordering::Relaxed);
        self.refresh().await
    }

    async fn refresh(&self) -> Arc<Snapshot> {
        let latest = self.latest();
        if latest.signature == self.signature() {
            return latest;
        }
        let _one_at_a_time = self.refreshing.lock().await;
        let latest = self.latest();
        let signature = self.signature();
        if latest.signature == signature {
            return latest;
        }
        let Some(mut overview) = self.take().await else { return latest };
        let now = now_unix_ms();
        let head = &mut overview.head;
        head.quorum = signature.quorum;
        head.fenced = signature.fenced;
        // When the view froze: the last quorum contact, fixed once lost
        // (recomputed each time it would jitter by the clocks' ms).
        head.frozen_unix_ms = if signature.quorum {
            None
        } else {
            latest.overview.head.frozen_unix_ms.filter(|_| !latest.overview.head.quorum).or_else(|| {
                let age = self.context.membership()?.node.contact_age_ms()?;
                Some(now.saturating_sub(age))
            })
        };
        let events: Vec<EventView> = self.events.recent(EVENTS_MAX).iter().rev().map(EventView::from).collect();
        let snapshot = Snapshot::new(latest.version + 1, signature, overview, events, now);
        let delta = Arc::new(snapshot.delta_from(&latest));
        {
            let mut deltas = self.deltas.lock().unwrap_or_else(|e| e.into_inner());
            if deltas.len() == DELTAS_KEPT {
                deltas.pop_front();
            }
            deltas.push_back(delta);
        }
        let snapshot = Arc::new(snapshot);
        self.latest.send_replace(snapshot.clone());
        snapshot
    }

    /// The deltas from version `since` to the latest, if all are kept.
    fn deltas_since(&self, since: u64) -> Option<Vec<Arc<Delta>>> {
        let deltas = self.deltas.lock().unwrap_or_else(|e| e.into_inner());
        let first = deltas.iter().position(|d| d.base == since)?;
        Some(deltas.iter().skip(first).cloned().collect())
    }

    /// The overview now, from the locally applied state; `None` when the
    /// node is stopping.
    async fn take(&self) -> Option<Overview> {
        let Some(member) = self.context.membership() else {
            return Some(overview::not_member(&self.context.name));
        };
        let node = member.node.status();
        let policy = self.policy.clone();
        member.node.read_local(move |state, core| overview::build(state, core, &node, &policy)).await.ok()
    }

    fn watched(&self) -> bool {
        let idle_ms = crate::clock::monotonic_ms().saturating_sub(self.last_request_ms.load(Ordering::Relaxed));
        self.streams.available_permits() < STREAMS_MAX || idle_ms < VIEWER_IDLE.as_millis() as u64
    }

    async fn sample_until_stopped(self: Arc<Self>) {
        let mut stop = self.stop.clone();
        let mut interval = tokio::time::interval(SAMPLE_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            if self.watched() {
                self.refresh().await;
            }
        }
    }

    async fn record_history_until_stopped(self: Arc<Self>) {
        let mut stop = self.stop.clone();
        let mut interval = tokio::time::interval(history::HISTORY_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let Some(member) = self.context.membership() else { continue };
            let now = now_unix_ms();
            let Ok(mut sample) = member.node.read_local(move |state, _| history::take(state, now)).await else {
                continue;
            };
            sample.events = self.events.counts_by_level().into_iter().map(|(level, n)| (level.as_str(), n)).collect();
            let json = Arc::new(serde_json::to_string(&sample).expect("a sample always encodes"));
            self.history.lock().unwrap_or_else(|e| e.into_inner()).push(sample);
            self.sample.send_replace(Some(json));
        }
    }

    fn history_json(&self) -> String {
        self.history.lock().unwrap_or_else(|e| e.into_inner()).to_json()
    }
}

/// The dashboard's routes. Every one but the bundle asks `access` first.
pub fn router(dashboard: Arc<Dashboard>) -> Router {
    let guarded = Router::new()
        .route("/", get(page))
        .route("/dashboard", get(page))
        .route("/api/overview", get(overview_json))
        .route("/api/overview/stream", get(stream))
        .route("/api/history", get(history_json))
        .route("/api/events", get(events_json))
        .route("/api/vms/{name}", get(vm_json))
        .route("/api/vms/{name}/logs", get(vm_logs))
        .route("/api/hosts/{name}", get(host_json))
        .route("/api/actions", post(action))
        .layer(axum::middleware::from_fn(require_view));
    Router::new()
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/app.css", get(app_css))
        .merge(guarded)
        .with_state(dashboard)
}

/// Refuses a connection that may not see the dashboard (`access`), with
/// one sentence.
async fn require_view(ConnectInfo(peer): ConnectInfo<Peer>, request: Request, next: Next) -> Response {
    match peer.access.may_view() {
        Ok(()) => next.run(request).await,
        Err(message) => {
            let status = match peer.access {
                Access::Anonymous => StatusCode::UNAUTHORIZED,
                _ => StatusCode::FORBIDDEN,
            };
            with_type(status, "text/plain; charset=utf-8", format!("{message}\n"))
        }
    }
}

fn with_type(status: StatusCode, content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    let mut response = (status, body.into()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

fn json_response(status: StatusCode, body: String) -> Response {
    with_type(status, "application/json", body)
}

fn error_json(status: StatusCode, message: &str) -> Response {
    json_response(status, serde_json::json!({ "error": message }).to_string())
}

async fn page(State(dashboard): State<Arc<Dashboard>>, ConnectInfo(peer): ConnectInfo<Peer>) -> Response {
    let snapshot = dashboard.fresh().await;
    let context = page::PageContext {
        access: &peer.access,
        endpoint: &dashboard.context.address,
        history_json: &dashboard.history_json(),
    };
    let html = page::render(&snapshot, &context, now_unix_ms());
    let mut response = with_type(StatusCode::OK, "text/html; charset=utf-8", html);
    response.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    response.headers_mut().insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

async fn app_js() -> Response {
    with_type(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> Response {
    with_type(StatusCode::OK, "text/css; charset=utf-8", APP_CSS)
}

async fn overview_json(State(dashboard): State<Arc<Dashboard>>) -> Response {
    let snapshot = dashboard.fresh().await;
    json_response(StatusCode::OK, snapshot.json().to_string())
}

async fn history_json(State(dashboard): State<Arc<Dashboard>>) -> Response {
    dashboard.last_request_ms.store(crate::clock::monotonic_ms(), Ordering::Relaxed);
    json_response(StatusCode::OK, dashboard.history_json())
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    vm: Option<String>,
    node: Option<String>,
    /// `problems`: warnings and errors only.
    level: Option<String>,
    limit: Option<usize>,
}

/// Events of the log, newest first, that concern `vm` or `node` (as the
/// VM, the host or the host a VM moved from), at most `limit`.
fn events_matching(
    log: &EventLog,
    vm: Option<&str>,
    node: Option<&str>,
    problems: bool,
    limit: usize,
) -> Vec<EventView> {
    log.recent(EVENTS_MAX)
        .iter()
        .rev()
        .filter(|e| vm.is_none_or(|vm| e.vm.as_deref() == Some(vm)))
        .filter(|e| node.is_none_or(|n| e.node.as_deref() == Some(n) || e.from.as_deref() == Some(n)))
        .filter(|e| !problems || e.kind.level() != Level::Info)
        .take(limit)
        .map(EventView::from)
        .collect()
}

async fn events_json(State(dashboard): State<Arc<Dashboard>>, Query(query): Query<EventsQuery>) -> Response {
    let problems = match query.level.as_deref() {
        None | Some("all") => false,
        Some("problems") => true,
        Some(other) => {
            let message = format!("level must be \"all\" or \"problems\", not {}", crate::api::service::quoted(other));
            return error_json(StatusCode::BAD_REQUEST, &message);
        }
    };
    let limit = query.limit.unwrap_or(EVENTS_MAX).min(EVENTS_MAX);
    let events = events_matching(&dashboard.events, query.vm.as_deref(), query.node.as_deref(), problems, limit);
    json_response(StatusCode::OK, serde_json::to_string(&events).expect("events encode"))
}

/// A VM in full, for its detail view.
#[derive(Serialize)]
struct VmDetail {
    #[serde(flatten)]
    vm: VmView,
    generation: u64,
    labels: std::collections::BTreeMap<String, String>,
    pinned_node: Option<String>,
    anti_affinity: Option<String>,
    /// The host that may still run its old copy (a move in progress).
    handoff_from: Option<String>,
    /// Hosts it kept failing on (the scheduler avoids them).
    failed_on: Vec<String>,
    /// Why it is where it is, or is not running (`vm status`).
    explanation: String,
    /// Its placements, newest first: placed, moved, unplaced, lost, fenced.
    placements: Vec<EventView>,
    /// Every event about it, newest first.
    events: Vec<EventView>,
}

/// The answer to a request for an invalid name (`None`: the name is valid).
fn name_refusal(what: &str, name: &str) -> Option<Response> {
    crate::names::validate(name).err().map(|e| {
        error_json(StatusCode::BAD_REQUEST, &format!("invalid {what} name {}: {e}", crate::api::service::quoted(name)))
    })
}

async fn vm_json(State(dashboard): State<Arc<Dashboard>>, Path(name): Path<String>) -> Response {
    if let Some(refused) = name_refusal("VM", &name) {
        return refused;
    }
    let Some(member) = dashboard.context.membership() else {
        return error_json(StatusCode::SERVICE_UNAVAILABLE, "this agent is not a member of a cluster yet");
    };
    let policy = dashboard.policy.clone();
    let lookup = name.clone();
    let read = member
        .node
        .read_local(move |state, _| {
            let vm = state.vm(&lookup)?;
            let host = |id| state.member(id).map_or_else(|| format!("member {id}"), |m| m.name.clone());
            let mut explainer = crate::scheduler::Explainer::new(state, &policy);
            let mut explained = 0;
            let mut view = overview::vm_view(state, vm, &mut explainer, &mut explained);
            let explanation = explainer.explain(&vm.name);
            if view.reason.is_none() && view.state != "running" && view.state != "stopped" {
                view.reason = Some(explanation.clone());
            }
            Some(VmDetail {
                vm: view,
                generation: vm.generation,
                labels: vm.spec.labels.clone().into_iter().collect(),
                pinned_node: vm.spec.node.clone(),
                anti_affinity: vm.spec.anti_affinity.clone(),
                handoff_from: vm.handoff.map(|h| host(h.from)),
                failed_on: vm.failed_on.iter().map(|&id| host(id)).collect(),
                explanation,
                placements: Vec::new(),
                events: Vec::new(),
            })
        })
        .await;
    let mut detail = match read {
        Ok(Some(detail)) => detail,
        Ok(None) => {
            let message = format!("no VM named {}", crate::api::service::quoted(&name));
            return error_json(StatusCode::NOT_FOUND, &message);
        }
        Err(e) => return error_json(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    detail.events = events_matching(&dashboard.events, Some(&name), None, false, DETAIL_EVENTS_MAX);
    detail.placements = detail
        .events
        .iter()
        .filter(|e| {
            [EventKind::VmPlaced, EventKind::VmMoved, EventKind::VmUnplaced, EventKind::VmLost, EventKind::VmFenced]
                .iter()
                .any(|k| k.as_str() == e.kind)
        })
        .cloned()
        .collect();
    json_response(StatusCode::OK, serde_json::to_string(&detail).expect("a VM encodes"))
}

#[derive(Debug, Deserialize)]
struct LogsQuery {
    lines: Option<u32>,
}

/// The last lines of a guest's log, through the client API's `VmLogs`
/// (served by the VM's host; any other member forwards it there).
async fn vm_logs(
    State(dashboard): State<Arc<Dashboard>>,
    Path(name): Path<String>,
    Query(query): Query<LogsQuery>,
) -> Response {
    use crate::api::pb::blixard_server::Blixard as _;
    if let Some(refused) = name_refusal("VM", &name) {
        return refused;
    }
    let lines = query.lines.unwrap_or(LOG_LINES_DEFAULT).clamp(1, LOG_LINES_MAX);
    let service = crate::api::service::BlixardService::new(dashboard.context.clone());
    let request = tonic::Request::new(crate::api::pb::VmLogsRequest { name, follow: false, lines });
    let read = async {
        let mut stream = service.vm_logs(request).await?.into_inner();
        let (mut node, mut out) = (String::new(), Vec::new());
        while let Some(line) = stream.next().await {
            let line = line?;
            node = line.node;
            out.push(line.line);
        }
        Ok::<_, tonic::Status>((node, out))
    };
    match tokio::time::timeout(LOG_TIMEOUT, read).await {
        Ok(Ok((node, lines))) => {
            json_response(StatusCode::OK, serde_json::json!({ "node": node, "lines": lines }).to_string())
        }
        Ok(Err(status)) => {
            let error = crate::api::client::server_error(&status);
            json_response(StatusCode::OK, serde_json::json!({ "error": error.message }).to_string())
        }
        Err(_) => error_json(StatusCode::GATEWAY_TIMEOUT, "the guest's log did not come within 5 s"),
    }
}

/// A host in full, for its detail view.
#[derive(Serialize)]
struct HostDetail {
    #[serde(flatten)]
    host: overview::MemberView,
    runners: Vec<String>,
    vcpu_overcommit_pct: u32,
    memory_overcommit_pct: u32,
    /// Its VMs: name and state, by name.
    vms: Vec<(String, &'static str)>,
    /// Events about it, newest first.
    events: Vec<EventView>,
}

/// VMs listed in a host's detail view; the rest are counted by the page.
const HOST_VMS_LISTED_MAX: usize = 1000;

async fn host_json(State(dashboard): State<Arc<Dashboard>>, Path(name): Path<String>) -> Response {
    if let Some(refused) = name_refusal("node", &name) {
        return refused;
    }
    let snapshot = dashboard.fresh().await;
    let Some(host) = snapshot.overview.head.members.iter().find(|m| m.name == name).cloned() else {
        let message = format!("no host named {}", crate::api::service::quoted(&name));
        return error_json(StatusCode::NOT_FOUND, &message);
    };
    let Some(member) = dashboard.context.membership() else {
        return error_json(StatusCode::SERVICE_UNAVAILABLE, "this agent is not a member of a cluster yet");
    };
    let id = host.id;
    let read = member
        .node
        .read_local(move |state, _| {
            let member = state.member(id)?;
            let mut vms: Vec<(String, &'static str)> =
                state.vms_on(id).map(|vm| (vm.name.clone(), state.vm_state(vm).as_str())).collect();
            vms.sort();
            vms.truncate(HOST_VMS_LISTED_MAX);
            Some((member.runners.iter().cloned().collect::<Vec<_>>(), member.capacity, vms))
        })
        .await;
    let Ok(Some((runners, capacity, vms))) = read else {
        return error_json(StatusCode::SERVICE_UNAVAILABLE, "the host's state cannot be read now");
    };
    let events = events_matching(&dashboard.events, None, Some(&name), false, DETAIL_EVENTS_MAX);
    let detail = HostDetail {
        host,
        runners,
        vcpu_overcommit_pct: capacity.vcpu_overcommit_pct,
        memory_overcommit_pct: capacity.memory_overcommit_pct,
        vms,
        events,
    };
    json_response(StatusCode::OK, serde_json::to_string(&detail).expect("a host encodes"))
}

/// Whether a request comes from the page itself: a JSON body (which a
/// cross-site form cannot send without a preflight this agent never
/// answers) and, when the browser says, the same origin.
fn same_origin(headers: &HeaderMap) -> Result<(), &'static str> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !content_type.starts_with("application/json") {
        return Err("an action is a JSON request (Content-Type: application/json)");
    }
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
    {
        return Err("an action must come from this agent's own page");
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
        if origin_host != host {
            return Err("an action must come from this agent's own page");
        }
    }
    Ok(())
}

async fn action(
    State(dashboard): State<Arc<Dashboard>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = |status: StatusCode, result: actions::ActionResult| {
        json_response(status, serde_json::to_string(&result).expect("a result encodes"))
    };
    if let Err(message) = same_origin(&headers) {
        return answer(StatusCode::FORBIDDEN, actions::ActionResult::refused("forbidden", message.into(), None));
    }
    if body.len() > actions::ACTION_BODY_BYTES_MAX {
        let message =
            format!("the request is {} bytes; an action is at most {}", body.len(), actions::ACTION_BODY_BYTES_MAX);
        return answer(StatusCode::PAYLOAD_TOO_LARGE, actions::ActionResult::refused("rejected", message, None));
    }
    let request: actions::ActionRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            let message = format!("the request is not an action: {e}");
            return answer(StatusCode::BAD_REQUEST, actions::ActionResult::refused("rejected", message, None));
        }
    };
    dashboard.last_request_ms.store(crate::clock::monotonic_ms(), Ordering::Relaxed);
    let result = actions::perform(dashboard.context.clone(), &peer.access, request).await;
    let status = match result.class {
        None => StatusCode::OK,
        Some("forbidden") => StatusCode::FORBIDDEN,
        Some("rejected") => StatusCode::BAD_REQUEST,
        Some(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    answer(status, result)
}

#[derive(Debug, Deserialize)]
struct StreamQuery {
    since: Option<u64>,
}

fn full_event(snapshot: &Snapshot) -> SseEvent {
    SseEvent::default().event("overview").id(snapshot.version.to_string()).data(snapshot.json())
}

fn delta_event(delta: &Delta) -> SseEvent {
    SseEvent::default().event("delta").id(delta.version.to_string()).data(delta.json.as_str())
}

/// What brings a page at version `since` (`None`: nothing yet) to
/// `snapshot`: nothing, the deltas in between, or the whole snapshot.
fn catch_up(dashboard: &Dashboard, since: Option<u64>, snapshot: &Snapshot) -> Vec<SseEvent> {
    match since {
        Some(v) if v == snapshot.version => Vec::new(),
        Some(v) => match dashboard.deltas_since(v) {
            Some(deltas) if deltas.last().is_some_and(|d| d.version == snapshot.version) => {
                deltas.iter().map(|d| delta_event(d)).collect()
            }
            _ => vec![full_event(snapshot)],
        },
        None => vec![full_event(snapshot)],
    }
}

async fn stream(
    State(dashboard): State<Arc<Dashboard>>,
    headers: HeaderMap,
    Query(query): Query<StreamQuery>,
) -> Response {
    let Ok(permit) = dashboard.streams.clone().try_acquire_owned() else {
        return with_type(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            "too many dashboard streams open on this agent\n",
        );
    };
    dashboard.metrics.dashboard_streams.inc();
    let guard = StreamGuard { _permit: permit, metrics: dashboard.metrics.clone() };
    // A reconnecting EventSource says where it was.
    let since = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()).or(query.since);
    let snapshot = dashboard.fresh().await;
    let first = catch_up(&dashboard, since, &snapshot);
    let sent = snapshot.version;
    let updates = dashboard.latest.subscribe();
    let mut samples = dashboard.sample.subscribe();
    samples.mark_unchanged();
    let stop = dashboard.stop.clone();
    // The snapshot's own time is when the cluster last changed; the
    // browser needs the agent's clock now to count times in state.
    let clock = SseEvent::default().event("clock").data(now_unix_ms().to_string());
    let head = futures_util::stream::iter(std::iter::once(clock).chain(first));
    let live = futures_util::stream::unfold(
        (dashboard, updates, samples, stop, guard, sent),
        |(dashboard, mut updates, mut samples, mut stop, guard, sent)| async move {
            if *stop.borrow() {
                return None;
            }
            enum Woke {
                Update,
                Sample,
                Stop,
            }
            let woke = tokio::select! {
                changed = updates.changed() => if changed.is_ok() { Woke::Update } else { Woke::Stop },
                changed = samples.changed() => if changed.is_ok() { Woke::Sample } else { Woke::Stop },
                _ = stop.wait_for(|stop| *stop) => Woke::Stop,
            };
            let (events, sent) = match woke {
                Woke::Stop => return None,
                Woke::Update => {
                    let snapshot = updates.borrow_and_update().clone();
                    (catch_up(&dashboard, Some(sent), &snapshot), snapshot.version)
                }
                Woke::Sample => {
                    let sample = samples.borrow_and_update().clone();
                    let events = sample.map(|json| SseEvent::default().event("sample").data(json.as_str()));
                    (events.into_iter().collect(), sent)
                }
            };
            Some((events, (dashboard, updates, samples, stop, guard, sent)))
        },
    )
    .flat_map(futures_util::stream::iter);
    let events = head.chain(live).map(Ok::<_, Infallible>);
    let mut response = Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE_INTERVAL)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, state: &'static str) -> VmView {
        VmView {
            name: name.into(),
            node: None,
            desired: "running".into(),
            state,
            vcpu: 1,
            memory_mib: 64,
            since_unix_ms: 0,
            last_error: None,
            reason: None,
            failover: "auto",
        }
    }

    #[test]
    fn a_delta_carries_only_what_changed() {
        let before = [vm("a", "running"), vm("b", "pending"), vm("d", "running")];
        let after = [vm("a", "running"), vm("b", "running"), vm("c", "pending")];
        let (changed, removed) = diff_vms(&before, &after);
        let names: Vec<_> = changed.iter().map(|v| (v.name.as_str(), v.state)).collect();
        assert_eq!(names, [("b", "running"), ("c", "pending")]);
        assert_eq!(removed, ["d"]);
        assert_eq!(diff_vms(&after, &after), (vec![], vec![]));
        let (changed, removed) = diff_vms(&[], &after);
        assert_eq!((changed.len(), removed.len()), (3, 0));
        let (changed, removed) = diff_vms(&after, &[]);
        assert_eq!((changed.len(), removed), (0, vec!["a", "b", "c"]));

        let event = |seq| EventView {
            seq,
            index: seq,
            at_unix_ms: seq,
            kind: "vm_created",
            level: "info",
            vm: None,
            node: None,
            from: None,
            subject: String::new(),
            message: String::new(),
        };
        let one = Snapshot::new(
            1,
            Signature::default(),
            Overview { vms: before.to_vec(), ..Overview::default() },
            vec![event(2), event(1)],
            10,
        );
        let two = Snapshot::new(
            2,
            Signature::default(),
            Overview { vms: after.to_vec(), ..Overview::default() },
            vec![event(4), event(3), event(2), event(1)],
            20,
        );
        let delta: serde_json::Value = serde_json::from_str(&two.delta_from(&one).json).unwrap();
        assert_eq!((delta["base"].as_u64(), delta["version"].as_u64()), (Some(1), Some(2)));
        assert_eq!(delta["vms_changed"].as_array().unwrap().len(), 2);
        assert_eq!(delta["vms_removed"], serde_json::json!(["d"]));
        let added: Vec<u64> =
            delta["events_added"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(added, [4, 3]);
        assert!(delta.get("vms").is_none(), "a delta never carries every VM");
        let full: serde_json::Value = serde_json::from_str(two.json()).unwrap();
        assert_eq!(full["vms"].as_array().unwrap().len(), 3);
        assert_eq!(full["version"], 2);
    }

    #[test]
    fn actions_come_only_from_the_page() {
        let mut headers = HeaderMap::new();
        assert!(same_origin(&headers).is_err(), "no JSON content type");
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(same_origin(&headers).is_ok());
        headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9464"));
        headers.insert(header::ORIGIN, HeaderValue::from_static("https://127.0.0.1:9464"));
        assert!(same_origin(&headers).is_ok());
        headers.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(same_origin(&headers).is_err());
        headers.remove(header::ORIGIN);
        headers.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(same_origin(&headers).is_err());
    }
}

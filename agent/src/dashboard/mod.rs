//! The read-only web dashboard, served by every agent on its HTTP listener
//! (`metrics_listen`): members, leader, capacity, every VM and the recent
//! events, kept live in the browser over server-sent events.
//!
//! One sampler task per agent takes an [`Overview`] from the locally
//! applied state every [`SAMPLE_INTERVAL`] (a local read: it works without
//! a leader, which is when an operator needs the page most). When the
//! overview changed, it records the differences as events and publishes a
//! [`Snapshot`] whose JSON is encoded once and shared by every viewer, so
//! the cost of the dashboard does not grow with the number of viewers and
//! nothing is sent while the cluster is quiet. Times in state are counted
//! in the browser from `since_unix_ms`.
//!
//! - `overview`: the wire types and the pure function from state to overview.
//! - `events`: the recent-events feed (derived from successive overviews).
//! - `page`: the server-rendered HTML; `assets/` the script and style sheet,
//!   embedded in the binary: nothing is fetched from outside the agent.
//!
//! Routes:
//!
//! - `GET /`, `GET /dashboard`: the page.
//! - `GET /api/overview`: the latest snapshot as JSON.
//! - `GET /api/overview/stream`: `text/event-stream`; an `overview` event
//!   with the same JSON at once and after every change, preceded by a
//!   `clock` event (the agent's time, in Unix ms).
//! - `GET /dashboard/app.js`, `GET /dashboard/app.css`: the bundle.

pub mod events;
pub mod overview;
pub mod page;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt as _;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};

use crate::api::context::Context;
use events::{Event, EventLog};
use overview::Overview;

/// How often the sampler looks at the state.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);
/// Events sent with each snapshot (the log keeps more, `events::EVENTS_MAX`).
pub const EVENTS_SHOWN: usize = 50;
/// Concurrent live streams per agent; more get 503.
pub const STREAMS_MAX: usize = 64;
/// Comment lines that keep idle streams open through proxies.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(15);

const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
/// The page loads only its own bundle and talks only to its own agent.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// One published view of the cluster, its JSON encoded once.
#[derive(Debug)]
pub struct Snapshot {
    pub overview: Overview,
    /// Newest first.
    pub events: Vec<Event>,
    pub generated_unix_ms: u64,
    pub json: String,
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(flatten)]
    overview: &'a Overview,
    generated_unix_ms: u64,
    events: &'a [Event],
}

impl Snapshot {
    pub fn new(overview: Overview, events: Vec<Event>, generated_unix_ms: u64) -> Snapshot {
        let wire = Wire { overview: &overview, generated_unix_ms, events: &events };
        let json = serde_json::to_string(&wire).expect("an overview always encodes");
        Snapshot { overview, events, generated_unix_ms, json }
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The dashboard of one agent: its sampler's output and its viewers.
pub struct Dashboard {
    context: Arc<Context>,
    events: EventLog,
    latest: watch::Sender<Arc<Snapshot>>,
    streams: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
}

impl Dashboard {
    /// Starts the sampler; it ends when `stop` turns true, and so do the
    /// live streams (an open browser must not hold up shutdown).
    pub fn start(context: Arc<Context>, stop: watch::Receiver<bool>) -> Arc<Dashboard> {
        let first = Snapshot::new(overview::not_member(&context.name), Vec::new(), now_unix_ms());
        let dashboard = Arc::new(Dashboard {
            context,
            events: EventLog::default(),
            latest: watch::Sender::new(Arc::new(first)),
            streams: Arc::new(Semaphore::new(STREAMS_MAX)),
            stop,
        });
        tokio::spawn(dashboard.clone().sample_until_stopped());
        dashboard
    }

    /// The latest snapshot.
    pub fn latest(&self) -> Arc<Snapshot> {
        self.latest.borrow().clone()
    }

    /// The overview now, from the locally applied state; `None` when the
    /// node is stopping.
    async fn take(&self) -> Option<Overview> {
        let Some(member) = self.context.membership() else {
            return Some(overview::not_member(&self.context.name));
        };
        let node = member.node.status();
        member.node.read_local(move |state, core| overview::build(state, core, &node)).await.ok()
    }

    async fn sample_until_stopped(self: Arc<Self>) {
        let mut stop = self.stop.clone();
        let mut interval = tokio::time::interval(SAMPLE_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut previous: Option<Overview> = None;
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.wait_for(|stop| *stop) => return,
            }
            let Some(overview) = self.take().await else { continue };
            if previous.as_ref() == Some(&overview) {
                continue;
            }
            let now = now_unix_ms();
            // Becoming a member is the start of the history, not a burst
            // of "joined" and "created" events.
            self.events.observe(previous.as_ref().filter(|p| p.member), &overview, now);
            let snapshot = Snapshot::new(overview.clone(), self.events.recent(EVENTS_SHOWN), now);
            self.latest.send_replace(Arc::new(snapshot));
            previous = Some(overview);
        }
    }
}

/// The dashboard's routes.
pub fn router(dashboard: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/dashboard", get(page))
        .route("/dashboard/app.js", get(app_js))
        .route("/dashboard/app.css", get(app_css))
        .route("/api/overview", get(overview_json))
        .route("/api/overview/stream", get(stream))
        .with_state(dashboard)
}

fn with_type(content_type: &'static str, body: String) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

async fn page(State(dashboard): State<Arc<Dashboard>>) -> Response {
    let mut response = with_type("text/html; charset=utf-8", page::render(&dashboard.latest(), now_unix_ms()));
    response.headers_mut().insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    response
}

async fn app_js() -> Response {
    with_type("text/javascript; charset=utf-8", APP_JS.to_string())
}

async fn app_css() -> Response {
    with_type("text/css; charset=utf-8", APP_CSS.to_string())
}

async fn overview_json(State(dashboard): State<Arc<Dashboard>>) -> Response {
    with_type("application/json", dashboard.latest().json.clone())
}

async fn stream(State(dashboard): State<Arc<Dashboard>>) -> Response {
    let Ok(permit) = dashboard.streams.clone().try_acquire_owned() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "too many dashboard streams open on this agent\n").into_response();
    };
    let updates = dashboard.latest.subscribe();
    let stop = dashboard.stop.clone();
    // The first item is the current snapshot; then one per change, until
    // the agent stops. The permit lives as long as the stream.
    let events = futures_util::stream::unfold(
        (updates, stop, permit, true),
        |(mut updates, mut stop, permit, first)| async move {
            if !first {
                tokio::select! {
                    changed = updates.changed() => changed.ok()?,
                    _ = stop.wait_for(|stop| *stop) => return None,
                }
            }
            if *stop.borrow() {
                return None;
            }
            let snapshot = updates.borrow_and_update().clone();
            let event = SseEvent::default().event("overview").data(snapshot.json.as_str());
            Some((Ok::<_, Infallible>(event), (updates, stop, permit, false)))
        },
    );
    // The snapshot's own time is when the cluster last changed; the
    // browser needs the agent's clock now to count times in state.
    let clock = SseEvent::default().event("clock").data(now_unix_ms().to_string());
    let events = futures_util::stream::once(async move { Ok(clock) }).chain(events);
    let mut response = Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE_INTERVAL)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

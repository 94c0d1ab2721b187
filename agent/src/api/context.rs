//! What both gRPC services share: who this agent is, whether it is a member
//! yet, connections to other agents, and the routing of requests to the
//! leader.
//!
//! An agent is not always a member: one started with neither
//! `initial_members` nor `join` serves the client API from the start and
//! becomes a member only when `ClusterJoin` admits it. So the node is not a
//! fixed field but a [`watch`] the daemon publishes into once the node runs.
//!
//! Routing ("users never see not-leader", design decision 9): a write of
//! plain commands (VM create, start, stop, delete; a member's reports) is
//! proposed on the member that took it, and a follower hands the proposal
//! to the leader in a Raft message ([`Context::write_anywhere`]). Any other
//! write is handled locally on the leader; any other member forwards it
//! once to the leader, marked with the [`FORWARDED_HEADER`] metadata so
//! that it is never forwarded again. While there is no leader the request
//! waits for one, up to [`LEADER_WAIT`]. Only errors that mean "not
//! applied" (`Unavailable`, not-leader, dropped) are retried.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use super::pb;
use super::pb::blixard_client::BlixardClient;
use super::status::{from_node_error, not_member};
use super::tls::{Credentials, Kind};
use crate::consensus::Role;
use crate::node::{LeaderInfo, NodeError, NodeHandle, NodeStatus};
use crate::state::{CommandKind, NodeId};

/// Marks a request one agent forwarded to another (to the leader): the
/// receiver handles it itself and never forwards it again.
pub const FORWARDED_HEADER: &str = "x-blixard-forwarded";
/// Request metadata: answer from this member's own state, on purpose,
/// even without a quorum (`--stale`).
pub const STALE_HEADER: &str = "x-blixard-stale";
/// Response metadata of a `--stale` read: how old the answering member's
/// last quorum contact is, in ms (`never` if it had none since it started).
pub const STALE_FOR_HEADER: &str = "x-blixard-stale-for-ms";

/// Whether a request asks for this member's own (possibly stale) view.
pub fn wants_stale<T>(request: &tonic::Request<T>) -> bool {
    request.metadata().contains_key(STALE_HEADER)
}
/// Carries the leader's address on a refusal from a member that does not
/// lead, for a call only the leader serves and nobody forwards (`Admit`),
/// and on a write's answer from a member that does not lead: a client that
/// sends it its next writes spares each two trips between members (see
/// [`hint_leader`]).
pub const LEADER_HEADER: &str = "x-blixard-leader";
/// How long a request waits for a leader (an election, a leadership
/// transfer) before failing with `Unavailable`.
pub const LEADER_WAIT: Duration = Duration::from_secs(8);
/// Upper bound on one gRPC message in either direction; a peer's or a
/// client's claimed length is never trusted beyond it.
pub const GRPC_MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// TCP keepalive on every connection, both ways: probes after this long
/// idle, every [`TCP_KEEPALIVE_INTERVAL`], and the connection is closed
/// after [`TCP_KEEPALIVE_RETRIES`] unanswered ones (a half-open connection
/// to a vanished peer ends within about 25 s).
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(10);
pub const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
pub const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// Connection attempts to another agent give up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Cached channels to other agents; the cache is cleared beyond this
/// (members are few; this bounds what stray addresses can pin).
const CHANNELS_MAX: usize = 256;
/// Cached member id -> name bindings (members are few).
const MEMBER_NAMES_MAX: usize = 1024;
/// Pause between two routing attempts while the status does not change.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// A running member: its node and identity.
#[derive(Clone)]
pub struct Membership {
    pub node: NodeHandle,
    pub id: NodeId,
    pub cluster_id: u64,
}

/// `ClusterJoin` on an uninitialised agent, handed to the daemon (which
/// owns the store and starts the node).
#[derive(Debug)]
pub struct JoinRequest {
    pub seed: String,
    pub token: String,
    pub reply: oneshot::Sender<Result<pb::ClusterJoinResponse, Status>>,
}

/// The daemon's side of a [`Context`]: publishes the membership and
/// receives join requests.
pub struct ContextControl {
    pub membership: watch::Sender<Option<Membership>>,
    pub joins: mpsc::Receiver<JoinRequest>,
}

pub struct Context {
    /// This agent's `node_name`.
    pub name: String,
    /// Where this agent listens, as peers reach it (`host:port`).
    pub address: String,
    /// How we reach other agents (plain or mutual TLS).
    pub dialer: Dialer,
    membership: watch::Receiver<Option<Membership>>,
    joins: mpsc::Sender<JoinRequest>,
    channels: Mutex<HashMap<String, Channel>>,
    /// This host's runtime, for reading guest logs (set once by the daemon).
    runtime: std::sync::OnceLock<Arc<dyn crate::runtime::Runtime>>,
    /// Member id -> name, as the replicated state (or the admission
    /// answer) binds them: a binding never changes once made (ids are not
    /// reused), so it is cached for checking senders' certificates.
    member_names: Mutex<HashMap<NodeId, String>>,
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How [`Context::write`] forwards a request to the leader.
type RemoteWrite<'a, Req, Resp> =
    dyn Fn(Channel, Request<Req>) -> BoxFuture<Result<tonic::Response<Resp>, Status>> + Sync + 'a;

/// What [`Context::write_routed`] does with a request the leader must
/// serve, on a member that does not lead.
pub(crate) enum Remote<'a, Req, Resp> {
    /// Nothing: it runs anywhere.
    Anywhere,
    /// Forwards it once to the leader.
    Forward(&'a RemoteWrite<'a, Req, Resp>),
    /// Refuses it with the leader's address ([`LEADER_HEADER`]), for the
    /// caller to ask the leader itself: a call that speaks for its
    /// caller's certificate, which a forwarding member cannot present.
    Redirect,
}

/// The refusal that sends a caller to `leader`.
fn redirect(leader: &LeaderInfo) -> Status {
    let mut status =
        Status::unavailable(format!("this member does not lead; ask the leader {} at {}", leader.name, leader.address));
    if let Ok(value) = leader.address.parse() {
        status.metadata_mut().insert(LEADER_HEADER, value);
    }
    status
}

/// Names the leader ([`LEADER_HEADER`]) on a write's answer from a member
/// that does not lead. A write taken by a follower crosses four trips
/// between members (its proposal to the leader, the append, the ack, the
/// commit back to it) where the leader's takes two; a client that sends
/// many writes may send the next ones to the leader. Nothing else changes:
/// the answer is the same, and a stale hint costs one write the four trips.
fn hint_leader<T>(mut response: tonic::Response<T>, member: &Membership) -> tonic::Response<T> {
    let status = member.node.watch_status();
    let status = status.borrow();
    if status.role != Role::Leader
        && let Some(leader) = status.leader.as_ref().filter(|l| l.id != member.id && !l.address.is_empty())
        && let Ok(value) = leader.address.parse()
    {
        response.metadata_mut().insert(LEADER_HEADER, value);
    }
    response
}

/// The leader a write's answer names (see [`hint_leader`]), or the
/// leader's address a redirect names (see [`Remote::Redirect`]).
pub fn leader_hint<T>(response: &tonic::Response<T>) -> Option<String> {
    leader_of_metadata(response.metadata())
}

/// The leader's address a redirect names (see [`Remote::Redirect`]).
pub fn leader_of_redirect(status: &Status) -> Option<String> {
    leader_of_metadata(status.metadata())
}

fn leader_of_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    let value = metadata.get(LEADER_HEADER)?.to_str().ok()?;
    (!value.is_empty() && value.len() <= crate::state::limits::ADDRESS_LEN_MAX).then(|| value.to_string())
}

/// How many leader redirections [`following_redirects`] follows.
const REDIRECTS_MAX: usize = 3;

/// Runs `call` at `seed`, and again at the leader a refusal redirects it to
/// (see [`Remote::Redirect`]), at most [`REDIRECTS_MAX`] times.
pub async fn following_redirects<T, F, Fut>(seed: &str, mut call: F) -> Result<T, Status>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut target = seed.to_string();
    let mut redirects = 0;
    loop {
        match call(target.clone()).await {
            Err(status) => match leader_of_redirect(&status) {
                Some(leader) if redirects < REDIRECTS_MAX && leader != target => {
                    tracing::debug!(from = target, to = leader, "redirected to the leader");
                    target = leader;
                    redirects += 1;
                }
                _ => return Err(status),
            },
            done => return done,
        }
    }
}

/// Where a request is handled.
pub(crate) enum Route {
    Local(Membership),
    Leader(LeaderInfo, Channel),
}

/// The error of a request handled locally: either final, or a node error
/// that may be retried (after forwarding, or waiting for a leader).
#[derive(Debug)]
pub(crate) enum ApiError {
    Node(NodeError),
    Status(Status),
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        ApiError::Node(e)
    }
}

impl From<Status> for ApiError {
    fn from(s: Status) -> Self {
        ApiError::Status(s)
    }
}

impl ApiError {
    /// Not applied, and may succeed elsewhere or a little later.
    fn is_retryable(&self) -> bool {
        match self {
            ApiError::Node(e) => e.is_retryable(),
            ApiError::Status(_) => false,
        }
    }

    fn into_status(self) -> Status {
        match self {
            ApiError::Node(e) => from_node_error(&e),
            ApiError::Status(s) => s,
        }
    }
}

/// Whether another agent forwarded `request` to us. With TLS on, only a
/// member may say so: a client setting the header itself must not make a
/// follower skip routing.
pub(crate) fn is_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED_HEADER)
        && !request.peer_certs().is_some_and(|certs| {
            certs
                .first()
                .is_none_or(|leaf| !super::tls::identity_of_der(leaf.as_ref()).is_ok_and(|id| id.kind == Kind::Member))
        })
}

fn mark_forwarded<T>(request: &mut Request<T>, deadline: Instant) {
    request.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    request.set_timeout(deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100)));
}

impl Context {
    pub fn new(name: String, address: String, dialer: Dialer) -> (Arc<Context>, ContextControl) {
        let (membership_tx, membership_rx) = watch::channel(None);
        // One join at a time; a second concurrent one is refused.
        let (joins_tx, joins_rx) = mpsc::channel(1);
        let context = Context {
            name,
            address,
            dialer,
            membership: membership_rx,
            joins: joins_tx,
            channels: Mutex::new(HashMap::new()),
            runtime: std::sync::OnceLock::new(),
            member_names: Mutex::new(HashMap::new()),
        };
        (Arc::new(context), ContextControl { membership: membership_tx, joins: joins_rx })
    }

    /// Gives the API this host's runtime (once; later calls are ignored).
    pub fn set_runtime(&self, runtime: Arc<dyn crate::runtime::Runtime>) {
        let _ = self.runtime.set(runtime);
    }

    pub(crate) fn runtime(&self) -> Option<Arc<dyn crate::runtime::Runtime>> {
        self.runtime.get().cloned()
    }

    /// The running member, if this agent is one.
    pub fn membership(&self) -> Option<Membership> {
        self.membership.borrow().clone()
    }

    pub(crate) fn member(&self) -> Result<Membership, Status> {
        self.membership().ok_or_else(not_member)
    }

    pub(crate) async fn request_join(&self, seed: String, token: String) -> Result<pb::ClusterJoinResponse, Status> {
        let (reply, rx) = oneshot::channel();
        self.joins.try_send(JoinRequest { seed, token, reply }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Status::unavailable("a join is already in progress on this agent"),
            mpsc::error::TrySendError::Closed(_) => Status::unavailable("the agent is shutting down"),
        })?;
        rx.await.map_err(|_| Status::unavailable("the agent is shutting down"))?
    }

    /// Records that member `id` is named `name` (from the admission
    /// answer, before this agent has the replicated member list).
    pub fn remember_member_name(&self, id: NodeId, name: &str) {
        let mut names = self.member_names.lock().unwrap_or_else(|e| e.into_inner());
        if names.len() >= MEMBER_NAMES_MAX {
            names.clear();
        }
        names.insert(id, name.to_string());
    }

    /// Checks that a certificate for member `cert_name` may speak as
    /// member `from`: the replicated state (or the admission answer) must
    /// bind `from` to that very name. One member can never send Raft
    /// traffic as another.
    pub(crate) async fn check_sender(&self, member: &Membership, cert_name: &str, from: NodeId) -> Result<(), Status> {
        let known = self.member_names.lock().unwrap_or_else(|e| e.into_inner()).get(&from).cloned();
        let known = match known {
            Some(name) => Some(name),
            None => {
                let name = member
                    .node
                    .read_local(move |state, _| state.member(from).map(|m| m.name.clone()))
                    .await
                    .map_err(|e| from_node_error(&e))?;
                if let Some(name) = &name {
                    self.remember_member_name(from, name);
                }
                name
            }
        };
        match known {
            Some(name) if name == cert_name => Ok(()),
            Some(name) => Err(Status::permission_denied(format!(
                "the certificate of member {cert_name:?} cannot speak for member {from} ({name:?})"
            ))),
            None => Err(Status::permission_denied(format!(
                "member {from} is unknown here; the certificate of {cert_name:?} cannot speak for it"
            ))),
        }
    }

    /// The id of the member named `name`, as the replicated state (or the
    /// admission answer) binds them; `None` for a name it does not know.
    pub(crate) async fn member_id_by_name(&self, member: &Membership, name: &str) -> Result<Option<NodeId>, Status> {
        let cached = {
            let names = self.member_names.lock().unwrap_or_else(|e| e.into_inner());
            names.iter().find(|(_, n)| *n == name).map(|(id, _)| *id)
        };
        if cached.is_some() {
            return Ok(cached);
        }
        let name = name.to_string();
        member
            .node
            .read_local(move |state, _| state.member_by_name(&name).map(|m| m.id))
            .await
            .map_err(|e| from_node_error(&e))
    }

    /// A (lazily connecting) channel to the agent at `address`.
    pub fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = self.dialer.endpoint(address)?.connect_lazy();
        if channels.len() >= CHANNELS_MAX {
            channels.clear();
        }
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }

    pub(crate) fn blixard_client(channel: Channel) -> BlixardClient<Channel> {
        BlixardClient::new(channel)
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
    }

    /// Decides where a request runs: here on the leader (or when it was
    /// forwarded to us, or when it may run `anywhere` and some leader is
    /// known), else on the leader; waits for a leader up to `deadline`.
    pub(crate) async fn route(&self, forwarded: bool, anywhere: bool, deadline: Instant) -> Result<Route, Status> {
        let member = self.member()?;
        if forwarded {
            return Ok(Route::Local(member));
        }
        let mut status = member.node.watch_status();
        loop {
            let current = status.borrow_and_update().clone();
            if current.removed {
                return Err(not_member());
            }
            if current.role == Role::Leader || (anywhere && current.leader.is_some()) {
                return Ok(Route::Local(member));
            }
            if let Some(leader) = current.leader.as_ref().filter(|l| l.id != member.id && !l.address.is_empty()) {
                let channel = self.channel(&leader.address)?;
                return Ok(Route::Leader(leader.clone(), channel));
            }
            wait_for_change(&mut status, deadline).await.map_err(|()| no_leader(&current))?;
        }
    }

    /// Runs a write: locally on the leader, else forwarded once to it.
    pub(crate) async fn write<Req, Resp>(
        &self,
        request: Request<Req>,
        local: impl Fn(Membership, Req) -> BoxFuture<Result<Resp, ApiError>>,
        remote: impl Fn(Channel, Request<Req>) -> BoxFuture<Result<tonic::Response<Resp>, Status>> + Sync,
    ) -> Result<tonic::Response<Resp>, Status>
    where
        Req: Clone,
    {
        self.write_routed(request, local, Remote::Forward(&remote)).await
    }

    /// Runs a write that proposes plain commands (no membership change) on
    /// this member, whatever its role: a follower hands its proposal to
    /// the leader in a Raft message and answers once it applied it itself
    /// (`Core::propose`), so the leader serves no request for it. `local`
    /// may read this member's state beforehand to refuse early what apply
    /// would refuse; on a follower that state may lag, and apply is the
    /// judge. Waits for a leader up to [`LEADER_WAIT`].
    pub(crate) async fn write_anywhere<Req, Resp>(
        &self,
        request: Request<Req>,
        local: impl Fn(Membership, Req) -> BoxFuture<Result<Resp, ApiError>>,
    ) -> Result<tonic::Response<Resp>, Status>
    where
        Req: Clone,
    {
        self.write_routed(request, local, Remote::Anywhere).await
    }

    /// [`Context::write`] (forwarding), [`Context::write_anywhere`] and
    /// the leader-only calls (redirecting): runs `local` where
    /// [`Context::route`] says, retrying a retryable failure until
    /// [`LEADER_WAIT`] has passed.
    pub(crate) async fn write_routed<Req, Resp>(
        &self,
        request: Request<Req>,
        local: impl Fn(Membership, Req) -> BoxFuture<Result<Resp, ApiError>>,
        remote: Remote<'_, Req, Resp>,
    ) -> Result<tonic::Response<Resp>, Status>
    where
        Req: Clone,
    {
        // A forwarded request is served here and not retried: the member
        // that forwarded it retries (an older agent may forward writes that
        // this version runs anywhere).
        let forwarded = is_forwarded(&request);
        let deadline = Instant::now() + LEADER_WAIT;
        let request = request.into_inner();
        loop {
            match self.route(forwarded, matches!(remote, Remote::Anywhere), deadline).await? {
                Route::Local(member) => match local(member.clone(), request.clone()).await {
                    Ok(response) if forwarded => return Ok(tonic::Response::new(response)),
                    Ok(response) => return Ok(hint_leader(tonic::Response::new(response), &member)),
                    Err(e) if e.is_retryable() && !forwarded && Instant::now() < deadline => {
                        pause_for_change(&member.node, deadline).await;
                    }
                    Err(e) => return Err(e.into_status()),
                },
                Route::Leader(leader, channel) => {
                    let remote = match &remote {
                        Remote::Forward(remote) => *remote,
                        Remote::Redirect => return Err(redirect(&leader)),
                        Remote::Anywhere => unreachable!("route() runs a write that runs anywhere locally"),
                    };
                    let mut forward = Request::new(request.clone());
                    mark_forwarded(&mut forward, deadline);
                    match remote(channel, forward).await {
                        Ok(mut response) => {
                            // The leader's answer names no leader: this
                            // member names the one it forwarded to.
                            if let Ok(value) = leader.address.parse() {
                                response.metadata_mut().insert(LEADER_HEADER, value);
                            }
                            return Ok(response);
                        }
                        // `Unavailable` from an agent means "not applied";
                        // from the transport, the leader could not be
                        // reached. Either way: wait for news, try again.
                        Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                            tracing::debug!(leader = %leader.name, error = %s.message(), "forwarding failed; retrying");
                            let member = self.member()?;
                            pause_for_change(&member.node, deadline).await;
                        }
                        Err(s) => return Err(s),
                    }
                }
            }
        }
    }

    /// Runs a linearizable read on the local node, waiting for a leader
    /// (read index needs one) up to [`LEADER_WAIT`].
    pub(crate) async fn read<T: Send + 'static>(
        &self,
        f: impl Fn(&crate::state::State, &crate::consensus::CoreStatus) -> T + Send + Sync + Clone + 'static,
    ) -> Result<T, Status> {
        let member = self.member()?;
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            match member.node.read(f.clone()).await {
                Ok(value) => return Ok(value),
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    pause_for_change(&member.node, deadline).await
                }
                Err(e) if e.is_retryable() && !member.node.has_quorum_contact() => {
                    return Err(Status::unavailable(format!(
                        "{} cannot reach a quorum ({}), so it cannot answer with the cluster's current state; add \
                         --stale to see what it last knew",
                        self.name,
                        match member.node.contact_age_ms() {
                            Some(age) => format!("its last quorum contact was {:.1} s ago", age as f64 / 1000.0),
                            None => "it has had no quorum contact since it started".into(),
                        }
                    )));
                }
                Err(e) => return Err(from_node_error(&e)),
            }
        }
    }

    /// [`Context::read`], or with `stale` this member's own state as it
    /// is, quorum or not; then also how old its last quorum contact is
    /// (`Some(None)`: it never had one), for [`STALE_FOR_HEADER`].
    pub(crate) async fn read_maybe_stale<T: Send + 'static>(
        &self,
        stale: bool,
        f: impl Fn(&crate::state::State, &crate::consensus::CoreStatus) -> T + Send + Sync + Clone + 'static,
    ) -> Result<(T, Option<Option<u64>>), Status> {
        if !stale {
            return Ok((self.read(f).await?, None));
        }
        let member = self.member()?;
        let value = member.node.read_local(f).await.map_err(|e| from_node_error(&e))?;
        Ok((value, Some(member.node.contact_age_ms())))
    }

    /// Proposes `kind` through Raft from this member, whatever its role
    /// ([`Context::write_anywhere`]), and waits until it is applied here.
    /// Waits for a leader up to [`LEADER_WAIT`]. This is how a member
    /// reports about itself (capacity, labels, address, runners, VM
    /// states); the status codes are those of the client API.
    pub async fn propose(&self, kind: CommandKind) -> Result<(), Status> {
        self.write_anywhere(Request::new(()), move |member, ()| {
            let kind = kind.clone();
            Box::pin(async move { member.node.propose(kind).await.map(|_| ()).map_err(ApiError::from) })
        })
        .await
        .map(|_| ())
    }
}

/// How this agent connects to other agents: plain, or with mutual TLS
/// (the cluster CA verifies them, our member certificate is presented).
#[derive(Debug, Clone, Default)]
pub struct Dialer {
    tls: Option<ClientTlsConfig>,
    credentials: Option<Arc<Credentials>>,
}

impl Dialer {
    pub fn plain() -> Dialer {
        Dialer { tls: None, credentials: None }
    }

    pub fn tls(credentials: Arc<Credentials>) -> Dialer {
        Dialer { tls: Some(credentials.client()), credentials: Some(credentials) }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// This agent's certificate and CAs (none without TLS).
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_deref()
    }

    /// An endpoint for `address` (`host:port`).
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, Status> {
        let bad = || Status::invalid_argument(format!("{address:?} is not a HOST:PORT address"));
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map(|e| {
                e.connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .tcp_keepalive(Some(TCP_KEEPALIVE))
                    .tcp_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL))
                    .tcp_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES))
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(5))
            })
            .map_err(|_| bad())?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| Status::internal(format!("cannot use TLS to reach {address}: {e}")))?;
        }
        Ok(endpoint)
    }
}

/// What a member that has known no leader for [`LEADER_WAIT`] can honestly
/// say: not that the cluster has none (it may be this member that is cut
/// off, or too slow to follow: a stalled disk), only that it knows none.
fn no_leader(status: &NodeStatus) -> Status {
    Status::unavailable(format!(
        "{} has known no leader for {} s (term {}): it cannot reach a quorum, or it is too slow to follow the leader \
         (a stalled disk); other members may still answer",
        status.name,
        LEADER_WAIT.as_secs(),
        status.term
    ))
}

/// Waits until the node's status changes or `deadline` passes (`Err`).
async fn wait_for_change(status: &mut watch::Receiver<NodeStatus>, deadline: Instant) -> Result<(), ()> {
    let now = Instant::now();
    if now >= deadline {
        return Err(());
    }
    match tokio::time::timeout(deadline - now, status.changed()).await {
        Ok(Ok(())) => Ok(()),
        // The node stopped: its status never changes again.
        Ok(Err(_)) | Err(_) => Err(()),
    }
}

/// Before a retry: wait for the node's status to change (a new leader),
/// but no longer than a short pause, so that a retry also happens when the
/// status already changed before we looked.
async fn pause_for_change(node: &NodeHandle, deadline: Instant) {
    let mut status = node.watch_status();
    status.mark_unchanged();
    let until = deadline.min(Instant::now() + RETRY_PAUSE);
    let _ = wait_for_change(&mut status, until).await;
}

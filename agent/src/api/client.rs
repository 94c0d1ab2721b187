//! The client side of service Blixard: connecting to an agent, plain or
//! with TLS, and calling it with a deadline.
//!
//! Every failure becomes a [`ClientError`]: one sentence and a class.
//! [`ErrorClass::Rejected`] means the cluster refused the request as
//! invalid (bad value, unknown VM or node, name taken, a pin that cannot
//! fit) and sending it again will not help; [`ErrorClass::Failed`] means
//! the operation did not happen (unreachable, timed out, no quorum) and
//! may work later. The CLI maps them to exit codes 2 and 1.

use std::future::Future;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use super::pb;
use super::pb::blixard_client::BlixardClient;

/// Longest message taken from a server or a transport error; a misbehaving
/// server cannot flood the terminal.
const MESSAGE_LEN_MAX: usize = 1024;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `host:port` (IPv6 in brackets).
    pub authority: String,
    /// `None`: plain HTTP/2.
    pub tls: Option<TlsOptions>,
    /// Bound on connecting and on each request.
    pub timeout: Duration,
}

/// Client TLS: the CA that signed the agents' certificates, and optionally
/// this client's own certificate and key (mTLS).
#[derive(Debug, Clone)]
pub struct TlsOptions {
    pub ca_pem: Vec<u8>,
    /// (certificate PEM, private key PEM)
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the agent's certificate must carry: the endpoint's host.
    pub server_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request is invalid; exit 2.
    Rejected,
    /// The operation failed; exit 1.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ClientError {
    pub class: ErrorClass,
    pub message: String,
}

impl ClientError {
    fn failed(message: impl Into<String>) -> Self {
        ClientError { class: ErrorClass::Failed, message: message.into() }
    }

    fn rejected(message: impl Into<String>) -> Self {
        ClientError { class: ErrorClass::Rejected, message: message.into() }
    }
}

/// Which gRPC codes mean "the request is invalid". Everything else —
/// Unavailable, DeadlineExceeded, Aborted, Internal, transport errors —
/// means the operation failed.
pub fn class_of(code: Code) -> ErrorClass {
    match code {
        Code::InvalidArgument | Code::NotFound | Code::AlreadyExists | Code::FailedPrecondition => ErrorClass::Rejected,
        _ => ErrorClass::Failed,
    }
}

/// A connected client of service Blixard.
#[derive(Debug, Clone)]
pub struct Client {
    inner: BlixardClient<Channel>,
    authority: String,
    timeout: Duration,
    tls: TlsUse,
}

/// What TLS the client used, to explain a connection the agent closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsUse {
    Plain,
    ServerOnly,
    Mutual,
}

impl TlsUse {
    /// A likely reason for an agent to drop the connection at once.
    fn hint(self) -> &'static str {
        match self {
            TlsUse::Plain => "; the agent may require TLS",
            TlsUse::ServerOnly => "; the agent may require a client certificate",
            TlsUse::Mutual => "",
        }
    }
}

impl Client {
    /// Connects, failing within `options.timeout`. A TLS configuration
    /// that cannot be used (bad PEM) is [`ErrorClass::Rejected`]: it is a
    /// usage error, found before any traffic.
    pub async fn connect(options: ConnectOptions) -> Result<Client, ClientError> {
        let ConnectOptions { authority, tls, timeout } = options;
        let tls_use = match &tls {
            None => TlsUse::Plain,
            Some(t) if t.identity.is_none() => TlsUse::ServerOnly,
            Some(_) => TlsUse::Mutual,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{authority}"))
            .map_err(|e| ClientError::rejected(format!("{authority} is not a usable address: {}", deepest(&e))))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            let mut config = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(tls.ca_pem))
                .domain_name(tls.server_name)
                .timeout(timeout);
            if let Some((cert, key)) = tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| ClientError::rejected(format!("the TLS files cannot be used: {}", deepest(&e))))?;
        }
        let channel = match tokio::time::timeout(timeout, endpoint.connect()).await {
            Err(_) => return Err(timed_out(&authority, timeout)),
            Ok(Err(e)) => return Err(unreachable(&authority, timeout, tls_use, &e)),
            Ok(Ok(channel)) => channel,
        };
        Ok(Client { inner: BlixardClient::new(channel), authority, timeout, tls: tls_use })
    }

    pub async fn cluster_status(&self) -> Result<pb::ClusterStatusResponse, ClientError> {
        self.call(pb::ClusterStatusRequest {}, |mut c, r| async move { c.cluster_status(r).await }).await
    }

    pub async fn cluster_join(&self, req: pb::ClusterJoinRequest) -> Result<pb::ClusterJoinResponse, ClientError> {
        self.call(req, |mut c, r| async move { c.cluster_join(r).await }).await
    }

    pub async fn cluster_join_token(
        &self,
        req: pb::ClusterJoinTokenRequest,
    ) -> Result<pb::ClusterJoinTokenResponse, ClientError> {
        self.call(req, |mut c, r| async move { c.cluster_join_token(r).await }).await
    }

    pub async fn cluster_issue_client(
        &self,
        req: pb::ClusterIssueClientRequest,
    ) -> Result<pb::ClusterIssueClientResponse, ClientError> {
        self.call(req, |mut c, r| async move { c.cluster_issue_client(r).await }).await
    }

    pub async fn cluster_leave(&self, req: pb::ClusterLeaveRequest) -> Result<pb::ClusterLeaveResponse, ClientError> {
        self.call(req, |mut c, r| async move { c.cluster_leave(r).await }).await
    }

    pub async fn node_list(&self) -> Result<pb::NodeListResponse, ClientError> {
        self.call(pb::NodeListRequest {}, |mut c, r| async move { c.node_list(r).await }).await
    }

    pub async fn node_drain(&self, name: String) -> Result<pb::NodeInfo, ClientError> {
        self.call(pb::NodeRequest { name }, |mut c, r| async move { c.node_drain(r).await }).await
    }

    pub async fn node_undrain(&self, name: String) -> Result<pb::NodeInfo, ClientError> {
        self.call(pb::NodeRequest { name }, |mut c, r| async move { c.node_undrain(r).await }).await
    }

    pub async fn vm_create(&self, req: pb::VmCreateRequest) -> Result<pb::VmInfo, ClientError> {
        self.call(req, |mut c, r| async move { c.vm_create(r).await }).await
    }

    pub async fn vm_start(&self, name: String) -> Result<pb::VmInfo, ClientError> {
        self.call(pb::VmRequest { name }, |mut c, r| async move { c.vm_start(r).await }).await
    }

    pub async fn vm_stop(&self, name: String) -> Result<pb::VmInfo, ClientError> {
        self.call(pb::VmRequest { name }, |mut c, r| async move { c.vm_stop(r).await }).await
    }

    pub async fn vm_delete(&self, name: String) -> Result<pb::VmDeleteResponse, ClientError> {
        self.call(pb::VmRequest { name }, |mut c, r| async move { c.vm_delete(r).await }).await
    }

    pub async fn vm_migrate(&self, req: pb::VmMigrateRequest) -> Result<pb::VmInfo, ClientError> {
        self.call(req, |mut c, r| async move { c.vm_migrate(r).await }).await
    }

    pub async fn vm_recover(&self, req: pb::VmRecoverRequest) -> Result<pb::VmInfo, ClientError> {
        self.call(req, |mut c, r| async move { c.vm_recover(r).await }).await
    }

    /// One page of VMs.
    pub async fn vm_list(&self, req: pb::VmListRequest) -> Result<pb::VmListResponse, ClientError> {
        self.call(req, |mut c, r| async move { c.vm_list(r).await }).await
    }

    /// Every VM `req` selects, page after page, handing each page to
    /// `each` as it arrives (so a million VMs are never all in memory at
    /// once unless the caller keeps them). Each page is one linearizable
    /// read: a VM created or deleted while paging may or may not be
    /// listed, and none is listed twice. With `stale`, each page is read
    /// from the agent's own state (`--stale`), and the staleness of the
    /// first page is returned.
    pub async fn vm_list_each(
        &self,
        mut req: pb::VmListRequest,
        stale: bool,
        mut each: impl FnMut(Vec<pb::VmInfo>) -> std::ops::ControlFlow<()>,
    ) -> Result<Option<Staleness>, ClientError> {
        let mut staleness = None;
        loop {
            let page = if stale {
                let (page, how) = self.vm_list_stale(req.clone()).await?;
                staleness.get_or_insert(how);
                page
            } else {
                self.vm_list(req.clone()).await?
            };
            if each(page.vms).is_break() || page.next_page_token.is_empty() {
                return Ok(staleness);
            }
            if page.next_page_token <= req.page_token {
                return Err(ClientError::failed(format!(
                    "the agent at {} sent a page token that does not move forward",
                    self.authority
                )));
            }
            req.page_token = page.next_page_token;
        }
    }

    /// Every VM `req` selects (see [`Client::vm_list_each`]).
    pub async fn vm_list_all(&self, req: pb::VmListRequest) -> Result<Vec<pb::VmInfo>, ClientError> {
        let mut all = Vec::new();
        self.vm_list_each(req, false, |page| {
            all.extend(page);
            std::ops::ControlFlow::Continue(())
        })
        .await?;
        Ok(all)
    }

    pub async fn vm_update(&self, req: pb::VmUpdateRequest) -> Result<pb::VmUpdateResponse, ClientError> {
        self.call(req, |mut c, r| async move { c.vm_update(r).await }).await
    }

    /// The backup stream. The deadline covers the first chunk (the header,
    /// which the agent sends once it has the state); the caller bounds
    /// the wait for each later chunk.
    pub async fn cluster_backup(
        &self,
    ) -> Result<impl futures_util::Stream<Item = Result<pb::BackupChunk, ClientError>> + use<>, ClientError> {
        use futures_util::StreamExt;
        let mut client = self.inner.clone().max_decoding_message_size(4 * 1024 * 1024);
        let stream = match tokio::time::timeout(self.timeout, client.cluster_backup(pb::ClusterBackupRequest {})).await
        {
            Err(_) => return Err(timed_out(&self.authority, self.timeout)),
            Ok(Err(status)) => return Err(from_status(&self.authority, self.timeout, self.tls, &status)),
            Ok(Ok(response)) => response.into_inner(),
        };
        let (authority, timeout, tls) = (self.authority.clone(), self.timeout, self.tls);
        Ok(stream.map(move |item| item.map_err(|status| from_status(&authority, timeout, tls, &status))))
    }

    /// How long this client waits for one answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub async fn vm_status(&self, name: String) -> Result<pb::VmInfo, ClientError> {
        self.call(pb::VmRequest { name }, |mut c, r| async move { c.vm_status(r).await }).await
    }

    /// [`Client::node_list`] from the agent's own state (`--stale`), and how
    /// old its last quorum contact is.
    pub async fn node_list_stale(&self) -> Result<(pb::NodeListResponse, Staleness), ClientError> {
        self.call_stale(pb::NodeListRequest {}, |mut c, r| async move { c.node_list(r).await }).await
    }

    /// [`Client::vm_list`] from the agent's own state (`--stale`).
    pub async fn vm_list_stale(&self, req: pb::VmListRequest) -> Result<(pb::VmListResponse, Staleness), ClientError> {
        self.call_stale(req, |mut c, r| async move { c.vm_list(r).await }).await
    }

    /// [`Client::vm_status`] from the agent's own state (`--stale`).
    pub async fn vm_status_stale(&self, name: String) -> Result<(pb::VmInfo, Staleness), ClientError> {
        self.call_stale(pb::VmRequest { name }, |mut c, r| async move { c.vm_status(r).await }).await
    }

    /// A unary call that asks for the agent's own view (quorum or not).
    async fn call_stale<Req, Resp, Fut>(
        &self,
        message: Req,
        f: impl FnOnce(BlixardClient<Channel>, tonic::Request<Req>) -> Fut,
    ) -> Result<(Resp, Staleness), ClientError>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        request
            .metadata_mut()
            .insert(crate::api::context::STALE_HEADER, tonic::metadata::MetadataValue::from_static("1"));
        match tokio::time::timeout(self.timeout, f(self.inner.clone(), request)).await {
            Err(_) => Err(timed_out(&self.authority, self.timeout)),
            Ok(Err(status)) => Err(from_status(&self.authority, self.timeout, self.tls, &status)),
            Ok(Ok(response)) => {
                let header = response.metadata().get(crate::api::context::STALE_FOR_HEADER);
                let staleness = match header.and_then(|v| v.to_str().ok()) {
                    Some("never") => Staleness::NeverHadContact,
                    Some(ms) => ms.parse().map_or(Staleness::Unknown, Staleness::ContactAgeMs),
                    None => Staleness::Unknown,
                };
                Ok((response.into_inner(), staleness))
            }
        }
    }

    /// The agent's events. Without `follow` the whole call has the
    /// deadline; with it only connecting does, and the stream stays open.
    /// Each item is an event or the error that ended the stream.
    pub async fn events(
        &self,
        req: pb::EventsRequest,
    ) -> Result<impl futures_util::Stream<Item = Result<pb::Event, ClientError>> + use<>, ClientError> {
        use futures_util::StreamExt;
        let follow = req.follow;
        let mut request = tonic::Request::new(req);
        if !follow {
            request.set_timeout(self.timeout);
        }
        let mut client = self.inner.clone();
        let stream = match tokio::time::timeout(self.timeout, client.events(request)).await {
            Err(_) => return Err(timed_out(&self.authority, self.timeout)),
            Ok(Err(status)) => return Err(from_status(&self.authority, self.timeout, self.tls, &status)),
            Ok(Ok(response)) => response.into_inner(),
        };
        let (authority, timeout, tls) = (self.authority.clone(), self.timeout, self.tls);
        Ok(stream.map(move |item| item.map_err(|status| from_status(&authority, timeout, tls, &status))))
    }

    /// A guest's log lines; with `follow` only connecting has the deadline.
    pub async fn vm_logs(
        &self,
        req: pb::VmLogsRequest,
    ) -> Result<impl futures_util::Stream<Item = Result<pb::LogLine, ClientError>> + use<>, ClientError> {
        use futures_util::StreamExt;
        let follow = req.follow;
        let mut request = tonic::Request::new(req);
        if !follow {
            request.set_timeout(self.timeout);
        }
        let mut client = self.inner.clone();
        let stream = match tokio::time::timeout(self.timeout, client.vm_logs(request)).await {
            Err(_) => return Err(timed_out(&self.authority, self.timeout)),
            Ok(Err(status)) => return Err(from_status(&self.authority, self.timeout, self.tls, &status)),
            Ok(Ok(response)) => response.into_inner(),
        };
        let (authority, timeout, tls) = (self.authority.clone(), self.timeout, self.tls);
        Ok(stream.map(move |item| item.map_err(|status| from_status(&authority, timeout, tls, &status))))
    }

    /// One unary call with the deadline both sent to the server
    /// (`grpc-timeout`) and enforced here.
    async fn call<Req, Resp, Fut>(
        &self,
        message: Req,
        f: impl FnOnce(BlixardClient<Channel>, tonic::Request<Req>) -> Fut,
    ) -> Result<Resp, ClientError>
    where
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        match tokio::time::timeout(self.timeout, f(self.inner.clone(), request)).await {
            Err(_) => Err(timed_out(&self.authority, self.timeout)),
            Ok(Err(status)) => Err(from_status(&self.authority, self.timeout, self.tls, &status)),
            Ok(Ok(response)) => Ok(response.into_inner()),
        }
    }
}

/// How old the view of a `--stale` answer may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    /// The agent's last quorum contact was this many ms before it answered.
    ContactAgeMs(u64),
    /// It has had no quorum contact since it started.
    NeverHadContact,
    /// It did not say (an older agent).
    Unknown,
}

/// The sentence and class the CLI gives a status that an agent answered
/// (the dashboard's actions show the same).
pub fn server_error(status: &Status) -> ClientError {
    let message = clip(status.message().trim());
    let message =
        if message.is_empty() { format!("the agent answered {:?} with no message", status.code()) } else { message };
    ClientError { class: class_of(status.code()), message }
}

/// A status from the server keeps its message; one made by the client for
/// a transport failure (it has a source) says the agent cannot be reached.
fn from_status(authority: &str, timeout: Duration, tls: TlsUse, status: &Status) -> ClientError {
    if let Some(source) = std::error::Error::source(status) {
        return unreachable(authority, timeout, tls, source);
    }
    // An HTTP server that is not gRPC answered (tonic maps its status).
    if status.message().starts_with("grpc-status header missing") {
        return ClientError::failed(format!(
            "{authority} answered in plain HTTP, not gRPC: it is not an agent's gRPC port (is it its \
             metrics_listen? the gRPC port is its `listen`)"
        ));
    }
    let message = clip(status.message().trim());
    let message = if message.is_empty() {
        format!("the agent at {authority} answered {:?} with no message", status.code())
    } else {
        message
    };
    match (status.code(), class_of(status.code())) {
        (Code::DeadlineExceeded | Code::Cancelled, _) if status.message().is_empty() => timed_out(authority, timeout),
        (_, class) => ClientError { class, message },
    }
}

fn timed_out(authority: &str, timeout: Duration) -> ClientError {
    ClientError::failed(format!("timed out after {} s waiting for the agent at {authority}", timeout.as_secs()))
}

fn unreachable(
    authority: &str,
    timeout: Duration,
    tls: TlsUse,
    error: &(dyn std::error::Error + 'static),
) -> ClientError {
    let cause = deepest(error);
    let lower = cause.to_ascii_lowercase();
    if lower.contains("timed out") || lower.contains("deadline has elapsed") || lower.contains("timeout expired") {
        return timed_out(authority, timeout);
    }
    // Refused means nothing listens; closed or reset right away is what a
    // TLS port does to plain text, or an mTLS port to a client without a
    // certificate.
    // ("frame with invalid size" is HTTP/2 reading a TLS alert as a frame.)
    const DROPPED: &[&str] =
        &["connection closed", "connection reset", "broken pipe", "unexpected eof", "frame with invalid size"];
    let dropped = DROPPED.iter().any(|s| lower.contains(s));
    let hint = if dropped { tls.hint() } else { "" };
    ClientError::failed(format!("cannot reach the agent at {authority}: {cause}{hint}"))
}

/// The innermost cause of `error`, which is the one that says what
/// happened ("connection refused"); the outer ones say "transport error".
fn deepest(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    if let Some(io) = current.downcast_ref::<std::io::Error>() {
        let text = match io.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
            std::io::ErrorKind::ConnectionReset => "connection reset".to_string(),
            std::io::ErrorKind::TimedOut => "timed out".to_string(),
            _ => io.to_string(),
        };
        return clip(strip_os_error(&text));
    }
    clip(strip_os_error(&current.to_string()))
}

/// "Connection refused (os error 111)" -> "Connection refused"
fn strip_os_error(text: &str) -> &str {
    match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => &text[..at],
        _ => text,
    }
}

fn clip(text: &str) -> String {
    if text.len() <= MESSAGE_LEN_MAX {
        return text.to_string();
    }
    let mut end = MESSAGE_LEN_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_classes() {
        for code in [Code::InvalidArgument, Code::NotFound, Code::AlreadyExists, Code::FailedPrecondition] {
            assert_eq!(class_of(code), ErrorClass::Rejected, "{code:?}");
        }
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::Internal,
            Code::Unknown,
            Code::Cancelled,
            Code::ResourceExhausted,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::Unimplemented,
            Code::OutOfRange,
            Code::DataLoss,
        ] {
            assert_eq!(class_of(code), ErrorClass::Failed, "{code:?}");
        }
    }

    #[test]
    fn server_messages_are_kept() {
        let t = Duration::from_secs(10);
        let e = from_status("h:1", t, TlsUse::Plain, &Status::already_exists("VM \"web\" already exists"));
        assert_eq!(e, ClientError::rejected("VM \"web\" already exists"));
        let e = from_status("h:1", t, TlsUse::Plain, &Status::unavailable("no quorum: 1 of 3 members reachable"));
        assert_eq!(e.class, ErrorClass::Failed);
        let e = from_status("h:1", t, TlsUse::Plain, &Status::internal(""));
        assert_eq!(e.message, "the agent at h:1 answered Internal with no message");
        let http = Status::unimplemented("grpc-status header missing, mapped from HTTP status code 404");
        let e = from_status("h:1", t, TlsUse::Plain, &http);
        assert_eq!(e.class, ErrorClass::Failed);
        assert!(e.message.starts_with("h:1 answered in plain HTTP, not gRPC"), "{e}");
        let e = from_status("h:1", t, TlsUse::Plain, &Status::deadline_exceeded(""));
        assert_eq!(e.message, "timed out after 10 s waiting for the agent at h:1");
        let e = from_status("h:1", t, TlsUse::Plain, &Status::invalid_argument("x".repeat(5000)));
        assert!(e.message.len() <= MESSAGE_LEN_MAX + '…'.len_utf8());
    }

    #[test]
    fn transport_errors_name_the_innermost_cause() {
        let io = std::io::Error::from_raw_os_error(111);
        let status = Status::from_error(Box::new(io));
        let e = from_status("127.0.0.1:1", Duration::from_secs(1), TlsUse::Plain, &status);
        assert_eq!(e, ClientError::failed("cannot reach the agent at 127.0.0.1:1: connection refused"));
        let reset = Status::from_error(Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset)));
        let e = from_status("h:1", Duration::from_secs(1), TlsUse::ServerOnly, &reset);
        assert_eq!(
            e.message,
            "cannot reach the agent at h:1: connection reset; the agent may require a client certificate"
        );
        assert_eq!(strip_os_error("No route to host (os error 113)"), "No route to host");
    }
}

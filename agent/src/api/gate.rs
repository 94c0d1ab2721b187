//! The gate every gRPC request passes before any handler runs: it tells
//! who speaks (the connection's certificate, [`Caller`] -> [`Speaker`]),
//! names the call from its path ([`rpc_of_path`]), asks
//! [`trust::may_call`], and hands the handler the [`Speaker`] in the
//! request's extensions ([`speaker`]). A call the gate does not know is
//! answered `Unimplemented` (as a server without it would: a newer peer
//! falls back the way it does with an older agent); a refused one
//! `PermissionDenied`, and its handler never runs.

use std::task::{Context as TaskContext, Poll};

use futures_util::future::Either;
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};

use super::context::FORWARDED_HEADER;
use super::tls::{Caller, Role};
use crate::trust::{self, ClientRole, Rpc, Speaker};

/// The call a gRPC path names; `None` for a path this agent does not serve.
pub fn rpc_of_path(path: &str) -> Option<Rpc> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let rpc = match (service, method) {
        ("blixard.v1.Peer", "Raft") => Rpc::Raft,
        ("blixard.v1.Peer", "RaftStream") => Rpc::RaftStream,
        ("blixard.v1.Peer", "Snapshot") => Rpc::Snapshot,
        ("blixard.v1.Peer", "Propose") => Rpc::Propose,
        ("blixard.v1.Peer", "Admit") => Rpc::Admit,
        ("blixard.v1.Peer", "Renew") => Rpc::Renew,
        ("blixard.v1.Blixard", "ClusterStatus") => Rpc::ClusterStatus,
        ("blixard.v1.Blixard", "ClusterJoin") => Rpc::ClusterJoin,
        ("blixard.v1.Blixard", "ClusterLeave") => Rpc::ClusterLeave,
        ("blixard.v1.Blixard", "ClusterJoinToken") => Rpc::ClusterJoinToken,
        ("blixard.v1.Blixard", "ClusterIssueClient") => Rpc::ClusterIssueClient,
        ("blixard.v1.Blixard", "ClusterBackup") => Rpc::ClusterBackup,
        ("blixard.v1.Blixard", "NodeList") => Rpc::NodeList,
        ("blixard.v1.Blixard", "NodeDrain") => Rpc::NodeDrain,
        ("blixard.v1.Blixard", "NodeUndrain") => Rpc::NodeUndrain,
        ("blixard.v1.Blixard", "VmCreate") => Rpc::VmCreate,
        ("blixard.v1.Blixard", "VmStart") => Rpc::VmStart,
        ("blixard.v1.Blixard", "VmStop") => Rpc::VmStop,
        ("blixard.v1.Blixard", "VmDelete") => Rpc::VmDelete,
        ("blixard.v1.Blixard", "VmMigrate") => Rpc::VmMigrate,
        ("blixard.v1.Blixard", "VmRecover") => Rpc::VmRecover,
        ("blixard.v1.Blixard", "VmList") => Rpc::VmList,
        ("blixard.v1.Blixard", "VmStatus") => Rpc::VmStatus,
        ("blixard.v1.Blixard", "VmUpdate") => Rpc::VmUpdate,
        ("blixard.v1.Blixard", "Events") => Rpc::Events,
        ("blixard.v1.Blixard", "VmLogs") => Rpc::VmLogs,
        ("grpc.health.v1.Health", "Check" | "Watch") => Rpc::Health,
        (
            "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection",
            "ServerReflectionInfo",
        ) => Rpc::Reflection,
        _ => return None,
    };
    Some(rpc)
}

/// Who a caller is, for the trust table.
pub fn speaker_of(caller: &Caller) -> Speaker {
    match caller {
        Caller::Anonymous => Speaker::Unauthenticated,
        Caller::Uncertified => Speaker::Joiner,
        Caller::Member { name } => Speaker::Member(name.clone()),
        Caller::Client { name, role } => Speaker::Client {
            name: name.clone(),
            role: match role {
                Role::ReadOnly => ClientRole::ReadOnly,
                Role::Admin => ClientRole::Admin,
            },
        },
    }
}

/// The speaker the gate found for `request`; a request that did not pass
/// the gate speaks for nobody.
pub fn speaker<T>(request: &Request<T>) -> Speaker {
    request.extensions().get::<Speaker>().cloned().unwrap_or(Speaker::Outsider)
}

/// Wraps one gRPC service in the gate.
#[derive(Debug, Clone)]
pub struct Gate<S> {
    inner: S,
    tls_on: bool,
}

impl<S> Gate<S> {
    pub fn new(inner: S, tls_on: bool) -> Self {
        Gate { inner, tls_on }
    }
}

/// The gate's decision on one request: its speaker, or the refusal.
fn judge(request: &http::Request<Body>, tls_on: bool) -> Result<Speaker, Status> {
    let path = request.uri().path();
    let rpc = rpc_of_path(path).ok_or_else(|| Status::unimplemented(format!("this agent serves no call {path}")))?;
    let certs = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|info| info.peer_certs());
    let speaker = match Caller::of_certs(certs.as_ref().map(|c| c.as_slice()), tls_on) {
        Ok(caller) => speaker_of(&caller),
        Err(status) if status.code() == tonic::Code::Unauthenticated => return Err(status),
        // A certificate of the cluster CA that names no blixard identity.
        Err(_) => Speaker::Outsider,
    };
    let forwarded = request.headers().contains_key(FORWARDED_HEADER);
    trust::may_call(&speaker, rpc, forwarded).map_err(|refusal| match speaker {
        // Who it is is what is missing.
        Speaker::Joiner => Status::unauthenticated(refusal.0),
        _ => Status::permission_denied(refusal.0),
    })?;
    Ok(speaker)
}

impl<S> Service<http::Request<Body>> for Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, std::future::Ready<Result<http::Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match judge(&request, self.tls_on) {
            Ok(speaker) => {
                request.extensions_mut().insert(speaker);
                Either::Left(self.inner.call(request))
            }
            Err(status) => {
                tracing::debug!(path = request.uri().path(), error = %status.message(), "refused a call");
                Either::Right(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `rpc` of the proto is a call the gate knows, and every call
    /// of the trust table has a path.
    #[test]
    fn every_rpc_of_the_proto_is_in_the_table() {
        let proto = include_str!("../../proto/blixard/v1/api.proto");
        let mut service = "";
        let mut seen = Vec::new();
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().unwrap();
            }
            if let Some(rest) = line.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap().trim();
                let path = format!("/blixard.v1.{service}/{method}");
                let rpc = rpc_of_path(&path).unwrap_or_else(|| panic!("{path} is not in the trust table"));
                seen.push(rpc);
            }
        }
        seen.extend([Rpc::Health, Rpc::Reflection]);
        seen.sort();
        assert_eq!(seen, Rpc::ALL.to_vec(), "the proto's calls and the table's differ");
        assert_eq!(rpc_of_path("/grpc.health.v1.Health/Check"), Some(Rpc::Health));
        assert_eq!(rpc_of_path("/blixard.v1.Peer/Nothing"), None);
        assert_eq!(rpc_of_path("nonsense"), None);
    }

    /// The callers certificates make (17a's roles) reach the table as the
    /// speakers it judges: a read-only client reads and is refused every
    /// write and the export; a connection without a certificate may only
    /// ask to join.
    #[test]
    fn certificates_speak_to_the_table() {
        let may = |caller: Caller, rpc: Rpc| trust::may_call(&speaker_of(&caller), rpc, false).is_ok();
        let reader = || Caller::Client { name: "ro".into(), role: Role::ReadOnly };
        assert!(may(reader(), Rpc::VmList));
        assert!(may(reader(), Rpc::ClusterStatus));
        for rpc in [Rpc::VmCreate, Rpc::VmUpdate, Rpc::ClusterIssueClient, Rpc::ClusterBackup, Rpc::Admit] {
            assert!(!may(reader(), rpc), "{rpc:?}");
        }
        let admin = || Caller::Client { name: "ops".into(), role: Role::Admin };
        assert!(may(admin(), Rpc::VmUpdate) && may(admin(), Rpc::ClusterBackup));
        assert!(!may(admin(), Rpc::Raft) && !may(admin(), Rpc::Renew));
        assert!(may(Caller::Member { name: "h1".into() }, Rpc::Renew));
        assert!(may(Caller::Uncertified, Rpc::Admit));
        assert!(!may(Caller::Uncertified, Rpc::VmList) && !may(Caller::Uncertified, Rpc::Renew));
        assert!(trust::may_call(&speaker_of(&Caller::Uncertified), Rpc::Admit, true).is_err());
        assert!(may(Caller::Anonymous, Rpc::VmCreate));
    }
}

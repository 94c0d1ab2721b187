//! Mutual TLS on the one gRPC port: who a certificate speaks for, where
//! this agent's own certificate comes from, and the gate every request
//! passes.
//!
//! A certificate carries its blixard identity as URI subject alternative
//! names:
//!
//! - `urn:blixard:member:NAME` — the agent whose `node_name` is NAME. It
//!   may send peer traffic (Raft, snapshots, proposals), ask to be
//!   admitted as NAME, and use the client API (as an admin).
//! - `urn:blixard:client:NAME` — an operator or tool: the client API only,
//!   with the role of a second URI name, `urn:blixard:role:read-only` or
//!   `urn:blixard:role:admin`. A client certificate without a role name is
//!   an admin's: certificates made by `blixard-agent certs client` before
//!   roles existed keep working.
//!
//! A certificate with no identity, with several, with a role on a member
//! certificate, or with an unknown role, speaks for nobody and is refused.
//! The kind is in the name rather than only in the extended key usages
//! because an agent's certificate must be usable as a client certificate
//! too (it dials its peers with it).
//!
//! Where an agent's certificate comes from ([`AgentAuth::load`], once at
//! start; a problem is a configuration error, exit 2):
//!
//! | config                   | certificate                          | trusts                     |
//! |--------------------------|--------------------------------------|----------------------------|
//! | `cluster_secret_file`    | issued here at start, from the secret | the secret's CA (and `cluster_secret_accepted_file`'s) |
//! | `[tls]`                  | `tls.cert_file` (an operator CA's)    | `tls.ca_file`              |
//! | neither, joined before   | `DATA_DIR/tls/member.pem` (the cluster issued it) | `DATA_DIR/tls/ca.pem` |
//! | neither, `join` + token  | none yet: obtained by joining (`api::join`) |                     |
//! | `insecure = true`        | none: plain text, loopback only       | everybody                  |
//!
//! Anything else refuses to start. A member whose cluster can issue
//! certificates (the secret's) accepts a TLS connection without a client
//! certificate, so that a host with a join token can ask to be admitted;
//! `api::gate` lets such a connection call `Peer.Admit` and nothing else.
//!
//! Nothing here logs or formats a private key: [`Credentials`]' `Debug`
//! leaves it out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::{Certificate, CertificateDer, ClientTlsConfig, Identity};
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

use crate::config::{Auth, Config, ConfigError, Tls};
use crate::pki::{self, ClusterCa, ClusterSecret, Fingerprint, JoinedFiles};

/// The scheme and namespace of a blixard identity URI.
pub const IDENTITY_URI_PREFIX: &str = "urn:blixard:";
/// The namespace of a client's role URI.
pub const ROLE_URI_PREFIX: &str = "urn:blixard:role:";

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An agent of the cluster.
    Member,
    /// A user of the client API.
    Client,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Member => "member",
            Kind::Client => "client",
        }
    }
}

/// What a client may do with the client API. Members are admins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads only: status, lists, events, logs.
    ReadOnly,
    /// Everything the client API offers.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "read-only" => Some(Role::ReadOnly),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// The identity a certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub kind: Kind,
    pub name: String,
    /// Always [`Role::Admin`] for a member.
    pub role: Role,
}

impl CertIdentity {
    pub fn member(name: &str) -> CertIdentity {
        CertIdentity { kind: Kind::Member, name: name.to_string(), role: Role::Admin }
    }

    pub fn client(name: &str, role: Role) -> CertIdentity {
        CertIdentity { kind: Kind::Client, name: name.to_string(), role }
    }

    /// `urn:blixard:KIND:NAME`
    pub fn uri(&self) -> String {
        format!("{IDENTITY_URI_PREFIX}{}:{}", self.kind.as_str(), self.name)
    }

    /// `urn:blixard:role:ROLE`
    pub fn role_uri(&self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.role.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Read { what: &'static str, path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Parses `urn:blixard:KIND:NAME`; `None` for a URI outside the
/// namespace or a role URI.
pub fn parse_identity_uri(uri: &str) -> Option<Result<(Kind, String), String>> {
    let rest = uri.strip_prefix(IDENTITY_URI_PREFIX)?;
    if uri.starts_with(ROLE_URI_PREFIX) {
        return None;
    }
    let parsed = (|| {
        let (kind, name) = rest.split_once(':').ok_or_else(|| format!("{uri:?} has no kind"))?;
        let kind = match kind {
            "member" => Kind::Member,
            "client" => Kind::Client,
            other => return Err(format!("{uri:?} names an unknown kind {other:?}")),
        };
        crate::names::validate(name).map_err(|e| format!("{uri:?} names no valid name: {e}"))?;
        Ok((kind, name.to_string()))
    })();
    Some(parsed)
}

/// The blixard identity of a DER certificate.
pub fn identity_of_der(der: &[u8]) -> Result<CertIdentity, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("the certificate does not parse: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("the certificate's subject alternative names do not parse: {e}"))?;
    let mut found = None;
    let mut role = None;
    for name in san.iter().flat_map(|san| san.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else { continue };
        if let Some(text) = uri.strip_prefix(ROLE_URI_PREFIX) {
            if role.is_some() {
                return Err("the certificate carries more than one role".into());
            }
            role = Some(Role::parse(text).ok_or_else(|| format!("{uri:?} names an unknown role"))?);
            continue;
        }
        let Some(identity) = parse_identity_uri(uri) else { continue };
        if found.is_some() {
            return Err("the certificate carries more than one blixard identity".into());
        }
        found = Some(identity?);
    }
    let (kind, name) = found
        .ok_or_else(|| format!("the certificate carries no blixard identity (a URI name {IDENTITY_URI_PREFIX}...)"))?;
    match (kind, role) {
        (Kind::Member, Some(_)) => Err("a member certificate carries no role (members are admins)".into()),
        (Kind::Member, None) => Ok(CertIdentity::member(&name)),
        // No role: an admin's (certificates from before roles).
        (Kind::Client, role) => Ok(CertIdentity::client(&name, role.unwrap_or(Role::Admin))),
    }
}

/// The blixard identity of the first certificate in a PEM text.
pub fn identity_of_pem(pem: &[u8]) -> Result<CertIdentity, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("no PEM certificate: {e}"))?;
    identity_of_der(&block.contents)
}

/// The certificate this agent presents, the CAs it trusts, and, when the
/// cluster secret is configured, the CA it issues certificates from.
#[derive(Clone)]
pub struct Credentials {
    /// Every CA whose certificates are accepted (PEM, one or more).
    pub ca_pem: Vec<u8>,
    /// This agent's certificate, followed by the CA that issued it.
    pub cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    /// Who `cert_pem` speaks for.
    pub identity: CertIdentity,
    /// The fingerprint join tokens issued here pin: the CA of `cert_pem`.
    pub pin: Fingerprint,
    /// The CA this agent issues from (joiners', clients' certificates).
    pub issuer: Option<Arc<ClusterCa>>,
    /// Whether a connection without a client certificate is accepted (to
    /// call `Peer.Admit` with a join token): the cluster can issue
    /// certificates, so a host without one may ask for one.
    pub accepts_joiners: bool,
    /// Where the files are, for a host that joined with a token (it renews
    /// them at start: `peer::renew_joined`).
    pub joined: Option<JoinedFiles>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("identity", &self.identity)
            .field("pin", &self.pin)
            .field("issues", &self.issuer.is_some())
            .finish_non_exhaustive()
    }
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let text = pki::read_small(what, path).map_err(|e| TlsError::Invalid(e.to_string()))?;
    if !String::from_utf8_lossy(&text).contains("-----BEGIN") {
        return Err(TlsError::Read { what, path: path.display().to_string(), reason: "it is not PEM".into() });
    }
    Ok(text)
}

impl Credentials {
    /// Files from an operator CA (`[tls]`, or what a joined host keeps in
    /// its data dir), checked: the certificate must be a member
    /// certificate for `node_name` signed by a CA of `ca_pem` (an agent
    /// that every peer would refuse should not start).
    fn from_files(
        ca_pem: Vec<u8>,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
        node_name: &str,
        cert_key: &str,
        remedy: &str,
    ) -> Result<Credentials, TlsError> {
        let identity = identity_of_pem(&cert_pem).map_err(|e| TlsError::Invalid(format!("`{cert_key}`: {e}")))?;
        let expected = CertIdentity::member(node_name);
        if identity != expected {
            return Err(TlsError::Invalid(format!(
                "`{cert_key}` is for {}, but this agent is {}; {remedy}",
                identity.uri(),
                expected.uri()
            )));
        }
        let leaf = pki::certs_of_pem(&cert_pem).map_err(|e| TlsError::Invalid(format!("`{cert_key}`: {e}")))?.remove(0);
        let ca = pki::issuer_in(&leaf, &ca_pem).ok_or_else(|| {
            TlsError::Invalid(format!("`{cert_key}` is not signed by any CA certificate it is to be checked with"))
        })?;
        let pin = Fingerprint::of_cert_der(&ca).map_err(|e| TlsError::Invalid(e.to_string()))?;
        let mut chain = pki::pem_of_cert(&leaf).into_bytes();
        chain.extend_from_slice(pki::pem_of_cert(&ca).as_bytes());
        Ok(Credentials {
            ca_pem,
            cert_pem: chain,
            key_pem,
            identity,
            pin,
            issuer: None,
            accepts_joiners: false,
            joined: None,
        })
    }

    /// `[tls]`: the configured files.
    pub fn load_tls(tls: &Tls, node_name: &str) -> Result<Credentials, TlsError> {
        let ca_pem = read_pem("the CA certificate", &tls.ca_file)?;
        let cert_pem = read_pem("the certificate", &tls.cert_file)?;
        let key_pem = read_pem("the private key", &tls.key_file)?;
        let remedy = format!("make it with `blixard-agent certs host {node_name}`");
        Credentials::from_files(ca_pem, cert_pem, key_pem, node_name, "tls.cert_file", &remedy)
    }

    /// What a host that joined with a token keeps in its data dir.
    pub fn load_joined(files: &JoinedFiles, node_name: &str) -> Result<Credentials, TlsError> {
        let ca_pem = read_pem("the cluster's CA certificates", &files.ca())?;
        let cert_pem = read_pem("the member certificate", &files.cert())?;
        let key_pem = read_pem("the private key", &files.key())?;
        let mut credentials = Credentials::from_files(
            ca_pem,
            cert_pem,
            key_pem,
            node_name,
            &files.cert().display().to_string(),
            "this data dir belongs to another host",
        )?;
        credentials.accepts_joiners = true;
        credentials.joined = Some(files.clone());
        Ok(credentials)
    }

    /// `cluster_secret_file`: a member certificate for this agent, with a
    /// new key, issued here from the secret's CA; the CA of `accepted` (a
    /// rotation in progress) is trusted too.
    pub fn from_secret(
        secret: &ClusterSecret,
        accepted: Option<&ClusterSecret>,
        node_name: &str,
        address: &str,
    ) -> Result<Credentials, TlsError> {
        let ca = ClusterCa::from_secret(secret);
        let identity = CertIdentity::member(node_name);
        let sans = pki::member_sans(address, node_name);
        let issued = ca
            .issue_with_new_key(&identity, &sans, pki::LEAF_VALID_DAYS_DEFAULT)
            .map_err(|e| TlsError::Invalid(e.to_string()))?;
        let mut ca_pem = ca.cert_pem().as_bytes().to_vec();
        if let Some(accepted) = accepted {
            ca_pem.extend_from_slice(ClusterCa::from_secret(accepted).cert_pem().as_bytes());
        }
        let mut cert_pem = issued.cert.into_bytes();
        cert_pem.extend_from_slice(ca.cert_pem().as_bytes());
        Ok(Credentials {
            ca_pem,
            cert_pem,
            key_pem: issued.key.into_bytes(),
            identity,
            pin: ca.fingerprint(),
            issuer: Some(Arc::new(ca)),
            accepts_joiners: true,
            joined: None,
        })
    }

    /// This agent's certificate chain and key (PEM), to present as a client.
    pub fn identity_pems(&self) -> (Vec<u8>, Vec<u8>) {
        (self.cert_pem.clone(), self.key_pem.clone())
    }

    fn identity_pem(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// The gRPC listener (served over `api::handshake`): our certificate,
    /// client certificates verified against the trusted CAs (required,
    /// unless joiners are accepted, whom `api::gate` then confines to
    /// `Peer.Admit`), TLS 1.2 and 1.3, HTTP/2.
    pub fn grpc_server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        self.rustls_server_config(!self.accepts_joiners, rustls::DEFAULT_VERSIONS, b"h2")
    }

    /// Our certificate chain and key, the trusted CAs as a root store, and
    /// the ring provider: what every rustls config below is built from.
    fn rustls_parts(&self) -> Result<RustlsParts, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let invalid = |what: &str, e: &dyn std::fmt::Display| TlsError::Invalid(format!("{what}: {e}"));
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| invalid("`tls.cert_file`", &e))?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| invalid("`tls.key_file`", &e))?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&self.ca_pem) {
            roots.add(ca.map_err(|e| invalid("`tls.ca_file`", &e))?).map_err(|e| invalid("`tls.ca_file`", &e))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(RustlsParts { chain, key, roots: Arc::new(roots), provider })
    }

    /// The HTTP listener over HTTPS (the dashboard): our certificate, and
    /// client certificates of the cluster CA verified when presented but
    /// not required (health probes and Prometheus need none; the
    /// dashboard itself asks for one, `dashboard::access`). HTTP/1.1 only.
    pub fn http_server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        self.rustls_server_config(false, rustls::DEFAULT_VERSIONS, b"http/1.1")
    }

    /// The peers' datagram path (`api::datagram`), serving: TLS 1.3 only,
    /// our certificate, and a client certificate of a trusted CA required
    /// (no joiners: only members send there). No early data: nothing
    /// replayable is accepted.
    pub fn datagram_server_config(&self, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = self.rustls_server_config(true, &[&rustls::version::TLS13], alpn)?;
        config.max_early_data_size = 0;
        Ok(config)
    }

    /// Every listener of ours (gRPC, HTTPS, datagrams): our certificate,
    /// client certificates of the trusted CAs verified (and, if
    /// `client_cert_required`, required), `versions`, one ALPN protocol.
    /// No resumption: a resumed session is not verified again, so a
    /// certificate that expired since (or a CA no longer trusted) would
    /// pass.
    fn rustls_server_config(
        &self,
        client_cert_required: bool,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[u8],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let invalid = |what: &str, e: &dyn std::fmt::Display| TlsError::Invalid(format!("{what}: {e}"));
        let RustlsParts { chain, key, roots, provider } = self.rustls_parts()?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
        let verifier = if client_cert_required { verifier } else { verifier.allow_unauthenticated() };
        let verifier = verifier.build().map_err(|e| invalid("`tls.ca_file`", &e))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .map_err(|e| invalid("TLS", &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| invalid("`tls.cert_file` and `tls.key_file`", &e))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(config)
    }

    /// The peers' datagram path, dialing: the peer's certificate verified
    /// against the trusted CAs and the address dialled (as gRPC's
    /// [`Credentials::client`]), ours presented; TLS 1.3 only.
    pub fn datagram_client_config(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let invalid = |what: &str, e: &dyn std::fmt::Display| TlsError::Invalid(format!("{what}: {e}"));
        let RustlsParts { chain, key, roots, provider } = self.rustls_parts()?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| invalid("TLS", &e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| invalid("`tls.cert_file` and `tls.key_file`", &e))?;
        config.alpn_protocols = vec![alpn.to_vec()];
        config.enable_early_data = false;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }

    /// Dialing peers: their certificate verified against the trusted CAs
    /// (and the address dialled), ours presented.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem)).identity(self.identity_pem())
    }
}

/// What [`Credentials::rustls_parts`] gives.
struct RustlsParts {
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// How this agent authenticates, decided once at start.
#[derive(Debug)]
pub enum AgentAuth {
    /// `insecure = true`: plain text on loopback.
    Insecure,
    Tls(Credentials),
    /// No certificate yet: join through a `join` seed with the token of
    /// `join_token_file`, which pins the cluster's CA, and obtain one.
    TokenJoin {
        files: JoinedFiles,
        token_file: PathBuf,
        pin: Fingerprint,
    },
}

/// The one sentence an agent with no way to authenticate refuses to start with.
pub const NO_CREDENTIALS: &str = "this agent has no credentials: give `cluster_secret_file` (one secret every member \
     shares; make it with `blixard-agent cluster new-secret FILE`) or a `[tls]` section (certificates from an \
     operator CA, `blixard-agent certs`); a host joining without either gives `join` seeds and a `join_token_file`, \
     and `insecure = true` is for a loopback `listen` only";

fn config_error(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.to_string(), message: message.into() }
}

impl AgentAuth {
    /// Reads and checks this agent's credentials (see the module doc).
    /// Nothing is written: bad input changes nothing.
    pub fn load(config: &Config) -> Result<AgentAuth, ConfigError> {
        let address = config.listen.to_string();
        match &config.auth {
            Auth::Insecure => Ok(AgentAuth::Insecure),
            Auth::Tls(tls) => Credentials::load_tls(tls, &config.node_name)
                .map(AgentAuth::Tls)
                .map_err(|e| config_error("tls", e.to_string())),
            Auth::Secret { file, accepted } => {
                let secret =
                    ClusterSecret::read(file).map_err(|e| config_error("cluster_secret_file", e.to_string()))?;
                let accepted = accepted
                    .as_ref()
                    .map(|path| ClusterSecret::read(path))
                    .transpose()
                    .map_err(|e| config_error("cluster_secret_accepted_file", e.to_string()))?;
                Credentials::from_secret(&secret, accepted.as_ref(), &config.node_name, &address)
                    .map(AgentAuth::Tls)
                    .map_err(|e| config_error("cluster_secret_file", e.to_string()))
            }
            Auth::None => {
                let files = JoinedFiles::in_data_dir(&config.data_dir);
                if files.admitted() {
                    return Credentials::load_joined(&files, &config.node_name)
                        .map(AgentAuth::Tls)
                        .map_err(|e| config_error("data_dir", e.to_string()));
                }
                match (&config.join_token_file, config.join.is_empty()) {
                    (Some(token_file), false) => {
                        let token = crate::join_token::read_file("the join token", token_file)
                            .map_err(|e| config_error("join_token_file", e))?;
                        let pin = crate::join_token::pin_of(&token).ok_or_else(|| {
                            config_error(
                                "join_token_file",
                                "the join token names no cluster CA to check (it comes from a cluster running \
                                 with `insecure`), so this host cannot tell the real cluster from a man in the \
                                 middle; issue a token on a member of a cluster with `cluster_secret_file`",
                            )
                        })?;
                        Ok(AgentAuth::TokenJoin { files, token_file: token_file.clone(), pin })
                    }
                    _ => Err(config_error("cluster_secret_file", NO_CREDENTIALS)),
                }
            }
        }
    }
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `insecure = true`: nobody is authenticated (and nothing is checked).
    Anonymous,
    /// TLS, without a client certificate: a host joining with a token
    /// (`api::gate` lets it reach `Peer.Admit` alone).
    Uncertified,
    /// An agent of the cluster, by its member certificate.
    Member { name: String },
    /// An operator or tool, by its client certificate.
    Client { name: String, role: Role },
}

impl Caller {
    /// The sender of `request`. With TLS on, a request without a
    /// certificate is [`Caller::Uncertified`] (`api::gate` lets it reach
    /// `Peer.Admit` alone).
    pub fn of<T>(request: &Request<T>, tls_on: bool) -> Result<Caller, Status> {
        Caller::of_certs(request.peer_certs().as_ref().map(|certs| certs.as_slice()), tls_on)
    }

    /// [`Caller::of`] from the connection's peer certificates (`None`: no
    /// TLS, or none presented).
    pub fn of_certs(certs: Option<&[CertificateDer<'static>]>, tls_on: bool) -> Result<Caller, Status> {
        if !tls_on {
            return Ok(Caller::Anonymous);
        }
        let Some(leaf) = certs.and_then(|certs| certs.first()) else {
            // The handshake let it in without one: only an agent that can
            // issue certificates does (`Credentials::accepts_joiners`).
            return Ok(Caller::Uncertified);
        };
        let identity = identity_of_der(leaf.as_ref()).map_err(Status::permission_denied)?;
        Ok(match identity.kind {
            Kind::Member => Caller::Member { name: identity.name },
            Kind::Client => Caller::Client { name: identity.name, role: identity.role },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uris_parse_strictly() {
        assert_eq!(parse_identity_uri("urn:blixard:member:h1").unwrap().unwrap(), (Kind::Member, "h1".into()));
        assert_eq!(CertIdentity::member("h1").uri(), "urn:blixard:member:h1");
        assert_eq!(parse_identity_uri("urn:blixard:client:ops").unwrap().unwrap().0, Kind::Client);
        assert!(parse_identity_uri("https://example.com").is_none());
        assert!(parse_identity_uri("urn:blixard:role:admin").is_none());
        for bad in ["urn:blixard:member", "urn:blixard:admin:h1", "urn:blixard:member:H1", "urn:blixard:member:../x"] {
            assert!(parse_identity_uri(bad).unwrap().is_err(), "{bad}");
        }
        assert_eq!(CertIdentity::client("ops", Role::ReadOnly).role_uri(), "urn:blixard:role:read-only");
        assert_eq!(Role::parse("admin"), Some(Role::Admin));
        assert_eq!(Role::parse("root"), None);
    }

    /// A certificate with exactly these URI names, from a throwaway CA.
    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        for uri in uris {
            params.subject_alt_names.push(rcgen::SanType::URI((*uri).try_into().unwrap()));
        }
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn roles_parse_and_a_client_without_one_is_an_admin() {
        let cases: &[(&[&str], Result<CertIdentity, &str>)] = &[
            (&["urn:blixard:member:h1"], Ok(CertIdentity::member("h1"))),
            (&["urn:blixard:client:ops"], Ok(CertIdentity::client("ops", Role::Admin))),
            (&["urn:blixard:client:ops", "urn:blixard:role:admin"], Ok(CertIdentity::client("ops", Role::Admin))),
            (&["urn:blixard:role:read-only", "urn:blixard:client:ro"], Ok(CertIdentity::client("ro", Role::ReadOnly))),
            (&["urn:blixard:member:h1", "urn:blixard:role:admin"], Err("carries no role")),
            (&["urn:blixard:client:ops", "urn:blixard:role:root"], Err("unknown role")),
            (
                &["urn:blixard:client:ops", "urn:blixard:role:admin", "urn:blixard:role:admin"],
                Err("more than one role"),
            ),
            (&["urn:blixard:client:a", "urn:blixard:client:b"], Err("more than one blixard identity")),
            (&["urn:blixard:role:admin"], Err("no blixard identity")),
        ];
        for (uris, expected) in cases {
            let got = identity_of_der(&cert_with_uris(uris));
            match (expected, got) {
                (Ok(want), Ok(got)) => assert_eq!(&got, want, "{uris:?}"),
                (Err(needle), Err(e)) => assert!(e.contains(needle), "{uris:?}: {e}"),
                (expected, got) => panic!("{uris:?}: expected {expected:?}, got {got:?}"),
            }
        }
    }
}

//! Mutual TLS on the one gRPC port, and who a certificate speaks for.
//!
//! With `[tls]` configured, the server accepts only TLS connections whose
//! client certificate is signed by the cluster CA (`ca_file`), and the
//! agent dials its peers with its own certificate. A certificate carries
//! its blixard identity as one URI subject alternative name:
//!
//! - `urn:blixard:member:NAME` — the agent whose `node_name` is NAME. It
//!   may send peer traffic (Raft, snapshots, proposals), ask to be
//!   admitted as NAME, and use the client API.
//! - `urn:blixard:client:NAME` — an operator or tool: the client API only.
//!
//! A certificate with no such name, or with several, speaks for nobody and
//! is refused. The role is in the name rather than only in the extended
//! key usages because an agent's certificate must be usable as a client
//! certificate too (it dials its peers with it).
//!
//! Nothing here logs or formats a private key: [`TlsFiles`]' `Debug`
//! leaves it out.

use std::path::Path;

use tonic::transport::{Certificate, CertificateDer, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

use crate::config::Tls;

/// The scheme and namespace of a blixard identity URI.
pub const IDENTITY_URI_PREFIX: &str = "urn:blixard:";
/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest PEM file read (a certificate chain or a key); anything longer
/// is the wrong file.
const PEM_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// What a certificate allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// An agent of the cluster.
    Member,
    /// A user of the client API.
    Client,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Client => "client",
        }
    }
}

/// The identity a certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub role: Role,
    pub name: String,
}

impl CertIdentity {
    /// `urn:blixard:ROLE:NAME`
    pub fn uri(&self) -> String {
        format!("{IDENTITY_URI_PREFIX}{}:{}", self.role.as_str(), self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Read { what: &'static str, path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Parses `urn:blixard:ROLE:NAME`; `None` for any other URI.
pub fn parse_identity_uri(uri: &str) -> Option<Result<CertIdentity, String>> {
    let rest = uri.strip_prefix(IDENTITY_URI_PREFIX)?;
    let parsed = (|| {
        let (role, name) = rest.split_once(':').ok_or_else(|| format!("{uri:?} has no role"))?;
        let role = match role {
            "member" => Role::Member,
            "client" => Role::Client,
            other => return Err(format!("{uri:?} names an unknown role {other:?}")),
        };
        crate::names::validate(name).map_err(|e| format!("{uri:?} names no valid name: {e}"))?;
        Ok(CertIdentity { role, name: name.to_string() })
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
    for name in san.iter().flat_map(|san| san.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else { continue };
        let Some(identity) = parse_identity_uri(uri) else { continue };
        if found.is_some() {
            return Err("the certificate carries more than one blixard identity".into());
        }
        found = Some(identity?);
    }
    found.ok_or_else(|| format!("the certificate carries no blixard identity (a URI name {IDENTITY_URI_PREFIX}...)"))
}

/// The blixard identity of the first certificate in a PEM text.
pub fn identity_of_pem(pem: &[u8]) -> Result<CertIdentity, String> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("no PEM certificate: {e}"))?;
    identity_of_der(&block.contents)
}

/// The CA, certificate and key an agent serves and dials with.
#[derive(Clone)]
pub struct TlsFiles {
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    /// Who `cert_pem` speaks for.
    pub identity: CertIdentity,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles").field("identity", &self.identity).finish_non_exhaustive()
    }
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_error = |reason: String| TlsError::Read { what, path: path.display().to_string(), reason };
    let len = std::fs::metadata(path).map_err(|e| read_error(e.to_string()))?.len();
    if len > PEM_FILE_BYTES_MAX {
        return Err(read_error(format!("it is {len} bytes, larger than a PEM file can be")));
    }
    let text = std::fs::read(path).map_err(|e| read_error(e.to_string()))?;
    if !text.starts_with(b"-----BEGIN") && !String::from_utf8_lossy(&text).contains("-----BEGIN") {
        return Err(read_error("it is not PEM".into()));
    }
    Ok(text)
}

impl TlsFiles {
    /// Reads the configured files and checks that the certificate is a
    /// member certificate for `node_name`: an agent that would be refused
    /// by every peer should not start.
    pub fn load(tls: &Tls, node_name: &str) -> Result<TlsFiles, TlsError> {
        let ca_pem = read_pem("the CA certificate", &tls.ca_file)?;
        let cert_pem = read_pem("the certificate", &tls.cert_file)?;
        let key_pem = read_pem("the private key", &tls.key_file)?;
        let identity = identity_of_pem(&cert_pem)
            .map_err(|e| TlsError::Invalid(format!("`tls.cert_file` {}: {e}", tls.cert_file.display())))?;
        let expected = CertIdentity { role: Role::Member, name: node_name.to_string() };
        if identity != expected {
            return Err(TlsError::Invalid(format!(
                "`tls.cert_file` {} is for {}, but this agent is {}; make it with `blixard-agent certs host {node_name}`",
                tls.cert_file.display(),
                identity.uri(),
                expected.uri()
            )));
        }
        Ok(TlsFiles { ca_pem, cert_pem, key_pem, identity })
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// Serving: our certificate, and client certificates required and
    /// verified against the cluster CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(false)
            // A handshake that stalls must not hold a connection forever.
            .timeout(TLS_HANDSHAKE_TIMEOUT)
    }

    /// Dialing peers: their certificate verified against the cluster CA
    /// (and the address dialled), ours presented.
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem)).identity(self.identity())
    }
}

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// TLS is off: nobody is authenticated (and nothing is checked).
    Anonymous,
    Authenticated(CertIdentity),
}

impl Caller {
    /// The sender of `request`. With TLS on, a request without a
    /// certificate cannot reach us (the handshake requires one), so its
    /// absence is refused rather than treated as anonymous.
    pub fn of<T>(request: &Request<T>, tls_on: bool) -> Result<Caller, Status> {
        Caller::of_certs(request.peer_certs().as_ref().map(|certs| certs.as_slice()), tls_on)
    }

    /// [`Caller::of`] from the connection's peer certificates (`None`: no
    /// TLS, or none presented).
    pub fn of_certs(certs: Option<&[CertificateDer<'static>]>, tls_on: bool) -> Result<Caller, Status> {
        if !tls_on {
            return Ok(Caller::Anonymous);
        }
        let leaf = certs
            .and_then(|certs| certs.first())
            .ok_or_else(|| Status::unauthenticated("this agent requires a client certificate"))?;
        identity_of_der(leaf.as_ref()).map(Caller::Authenticated).map_err(Status::permission_denied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_uris_parse_strictly() {
        let member = parse_identity_uri("urn:blixard:member:h1").unwrap().unwrap();
        assert_eq!(member, CertIdentity { role: Role::Member, name: "h1".into() });
        assert_eq!(member.uri(), "urn:blixard:member:h1");
        assert_eq!(parse_identity_uri("urn:blixard:client:ops").unwrap().unwrap().role, Role::Client);
        assert!(parse_identity_uri("https://example.com").is_none());
        for bad in ["urn:blixard:member", "urn:blixard:admin:h1", "urn:blixard:member:H1", "urn:blixard:member:../x"] {
            assert!(parse_identity_uri(bad).unwrap().is_err(), "{bad}");
        }
    }
}

//! The joiner's side of a join with a token, for a host that has neither
//! the cluster secret nor an operator CA's certificate: it verifies the
//! cluster against the token's CA fingerprint before it sends anything,
//! and obtains its member certificate for a key that never leaves it.
//!
//! One attempt ([`attempt`]):
//!
//! 1. **Discovery.** A TLS handshake with the seed that only reads the
//!    certificates it presents (members send their certificate and the CA
//!    that issued it). One of them must carry the public key whose SHA-256
//!    is the token's pin; that one is the cluster's CA. Nothing is sent on
//!    this connection but the handshake: a man in the middle, or the wrong
//!    address, presents no such CA, and the joiner stops with one sentence.
//! 2. **Admission.** A second TLS connection that verifies the seed's
//!    certificate against that CA (ordinary certificate verification: only
//!    a holder of a key the CA certified gets through) carries `Peer.Admit`
//!    with the token and a certificate signing request for this host's key
//!    (made once and kept in the data dir: `pki::JoinedFiles`).
//! 3. **Certificate.** The answer holds the certificate the seed issued
//!    and the CAs the cluster trusts; both are checked (the certificate is
//!    for this host's name and key, signed by the pinned CA) and written to
//!    the data dir before the store records the membership.
//!
//! Every step may be interrupted (a crash, a lost answer) and the whole
//! attempt run again: the id and key are the same, the token is already
//! this host's (`UseJoinToken` accepts its own user again) and admitting
//! the same id and name again changes nothing but the address.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::KeyPair;
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tonic::Status;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use super::pb;
use super::tls::{CertIdentity, Credentials};
use crate::pki::{self, Fingerprint, JoinedFiles};

/// Connecting to the seed, and the discovery handshake.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// What a successful admission left: the cluster's answer (id, members)
/// and this host's credentials, already on disk.
#[derive(Debug)]
pub struct Admitted {
    pub response: pb::AdmitResponse,
    pub credentials: Credentials,
}

/// Records the certificates a server presents, accepting any: the
/// discovery handshake reads them and sends nothing.
#[derive(Debug)]
struct ReadChain {
    chain: Mutex<Vec<Vec<u8>>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ReadChain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        chain.push(end_entity.to_vec());
        chain.extend(intermediates.iter().map(|c| c.to_vec()));
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The host part of `host:port` (IPv6 without brackets).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Step 1: the CA certificate (DER) the seed presents whose public key
/// `pin` names. `PermissionDenied` (final) when it presents none.
pub async fn discover_ca(seed: &str, pin: Fingerprint) -> Result<Vec<u8>, Status> {
    let provider = rustls::crypto::ring::default_provider();
    let verifier =
        Arc::new(ReadChain { chain: Mutex::new(Vec::new()), algorithms: provider.signature_verification_algorithms });
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Status::internal(format!("cannot set up TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let server_name = ServerName::try_from(host_of(seed).to_string())
        .map_err(|_| Status::invalid_argument(format!("{seed:?} is not a HOST:PORT address")))?;
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(seed).await?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(server_name, tcp).await?;
        drop(tls);
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(DISCOVERY_TIMEOUT, handshake).await {
        Err(_) => return Err(Status::unavailable(format!("{seed} did not complete a TLS handshake in time"))),
        Ok(Err(e)) => return Err(Status::unavailable(format!("cannot reach {seed} over TLS: {e}"))),
        Ok(Ok(())) => {}
    }
    let chain = verifier.chain.lock().unwrap_or_else(|e| e.into_inner()).clone();
    chain.into_iter().find(|der| Fingerprint::of_cert_der(der).is_ok_and(|f| f == pin)).ok_or_else(|| {
        Status::permission_denied(format!(
            "{seed} presented no certificate of the CA the join token names ({pin}): it is not a member of \
             that cluster (a man in the middle, or the wrong address); nothing was sent to it"
        ))
    })
}

/// One attempt at steps 1 to 3 (see the module doc) through `seed`.
/// `request` carries this host's id, name, address and token; its
/// certificate signing request is added here, for `key`. Only the leader
/// admits: a member that does not lead answers with the leader's address
/// (`context::leader_of_redirect`), and the steps run again there, the
/// leader checked against the pin like any seed.
pub async fn attempt(
    seed: &str,
    request: pb::AdmitRequest,
    key: &KeyPair,
    pin: Fingerprint,
    files: &JoinedFiles,
) -> Result<Admitted, Status> {
    let request = &request;
    super::context::following_redirects(seed, |target| async move {
        attempt_at(&target, request.clone(), key, pin, files).await
    })
    .await
}

/// [`attempt`] at one member, without following a redirection.
async fn attempt_at(
    seed: &str,
    mut request: pb::AdmitRequest,
    key: &KeyPair,
    pin: Fingerprint,
    files: &JoinedFiles,
) -> Result<Admitted, Status> {
    let ca_der = discover_ca(seed, pin).await?;
    let ca_pem = pki::pem_of_cert(&ca_der);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .domain_name(host_of(seed).to_string())
        .timeout(DISCOVERY_TIMEOUT);
    let endpoint = Endpoint::from_shared(format!("https://{seed}"))
        .map_err(|_| Status::invalid_argument(format!("{seed:?} is not a HOST:PORT address")))?
        .connect_timeout(DISCOVERY_TIMEOUT)
        .tls_config(tls)
        .map_err(|e| Status::internal(format!("cannot use TLS to reach {seed}: {e}")))?;
    let channel = endpoint.connect().await.map_err(|e| {
        Status::unavailable(format!("cannot reach {seed} with the cluster's CA: {}", super::peer::transport_cause(&e)))
    })?;
    let name = request.name.clone();
    request.csr = pki::request_for(key, &name).map_err(|e| Status::internal(e.to_string()))?;
    let mut call = tonic::Request::new(request);
    call.set_timeout(super::context::LEADER_WAIT + Duration::from_secs(2));
    let response = super::peer::peer_client(channel).admit(call).await?.into_inner();
    crate::failpoint::hit("join-after-admit");
    if response.certificate_pem.is_empty() {
        return Err(Status::failed_precondition(format!(
            "{seed} admitted this host but issued it no certificate; join through a member that has \
             `cluster_secret_file`"
        )));
    }
    let trusted = pki::certs_of_pem(response.ca_pem.as_bytes()).map_err(|e| Status::internal(e.to_string()))?;
    if !trusted.iter().any(|der| Fingerprint::of_cert_der(der).is_ok_and(|f| f == pin)) {
        return Err(Status::permission_denied(format!(
            "{seed} answered with CA certificates that do not include the one the join token names ({pin})"
        )));
    }
    let identity = CertIdentity::member(&name);
    pki::check_issued(response.certificate_pem.as_bytes(), key, &identity, response.ca_pem.as_bytes())
        .map_err(|e| Status::internal(format!("{seed} issued a certificate this host cannot use: {e}")))?;
    files
        .write_issued(response.certificate_pem.as_bytes(), response.ca_pem.as_bytes())
        .map_err(|e| Status::internal(e.to_string()))?;
    crate::failpoint::hit("join-after-certificate");
    let credentials = Credentials::load_joined(files, &name).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Admitted { response, credentials })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("10.0.0.1:7000"), "10.0.0.1");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("h1.example:7000"), "h1.example");
    }
}

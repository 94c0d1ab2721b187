//! TLS over our own accept loop, for the TCP listeners that serve a rustls
//! config of ours (`Credentials::grpc_server_config` for gRPC,
//! `Credentials::http_server_config` for HTTPS): what tonic's built-in TLS
//! would do, but with our config, which resumes no session (a resumed
//! session is not verified again: a client certificate that expired, or
//! whose CA is no longer trusted, would pass).
//!
//! Each handshake runs in a task of its own with a deadline
//! ([`HANDSHAKE_TIMEOUT`]), at most [`HANDSHAKES_MAX`] at once (more
//! connections wait in the kernel's backlog) and at most
//! [`HANDSHAKES_PER_ADDRESS_MAX`] from one IP address (more from it are
//! closed at once), so a slow or hostile client holds up nobody else: one
//! address that opens connections and never speaks cannot fill the
//! listener's slots; a handshake that fails is logged (debug) and dropped,
//! and the listener goes on. Dropping [`Handshaken`] closes the
//! listener and ends the handshakes in progress.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::{Stream, StreamExt as _};

/// TLS handshakes in progress at once on one listener.
pub const HANDSHAKES_MAX: usize = 1024;
/// TLS handshakes in progress at once from one IP address (the members of
/// a cluster on one machine share 127.0.0.1: a joining storm of a hundred
/// agents there stays within it).
pub const HANDSHAKES_PER_ADDRESS_MAX: usize = 64;
/// How long a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long accepting pauses after the listener fails (out of descriptors
/// and the like), rather than spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// A connection after its handshake.
pub type TlsConnection = tokio_rustls::server::TlsStream<TcpStream>;

/// The connections of a listener, handshaken, each as `label` made it.
pub struct Handshaken<T> {
    ready: mpsc::Receiver<T>,
    acceptor: JoinHandle<()>,
}

impl<T> Drop for Handshaken<T> {
    fn drop(&mut self) {
        // The task owns the listener and the handshakes in progress.
        self.acceptor.abort();
    }
}

impl<T: Send + 'static> Handshaken<T> {
    /// Accepts the connections of `incoming` (the `what` listener, for
    /// logs), handshakes each with `config`, and hands out
    /// `label(connection, its remote address)`.
    pub fn start<S, F>(what: &'static str, incoming: S, config: Arc<rustls::ServerConfig>, label: F) -> Handshaken<T>
    where
        S: Stream<Item = std::io::Result<TcpStream>> + Send + Unpin + 'static,
        F: Fn(TlsConnection, SocketAddr) -> T + Send + Sync + 'static,
    {
        let (tx, ready) = mpsc::channel(HANDSHAKES_MAX);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let acceptor = tokio::spawn(accept(what, incoming, acceptor, Arc::new(label), tx));
        Handshaken { ready, acceptor }
    }
}

impl<T> Stream for Handshaken<T> {
    type Item = T;

    /// `None` once the listener failed for good.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.ready.poll_recv(cx)
    }
}

async fn accept<S, F, T>(
    what: &'static str,
    mut incoming: S,
    acceptor: tokio_rustls::TlsAcceptor,
    label: Arc<F>,
    ready: mpsc::Sender<T>,
) where
    S: Stream<Item = std::io::Result<TcpStream>> + Unpin,
    F: Fn(TlsConnection, SocketAddr) -> T + Send + Sync + 'static,
    T: Send + 'static,
{
    let mut handshakes = JoinSet::new();
    let per_address = PerAddress::new(HANDSHAKES_PER_ADDRESS_MAX);
    loop {
        // At the cap, the next connection waits until a handshake ends.
        while handshakes.len() >= HANDSHAKES_MAX {
            handshakes.join_next().await;
        }
        let accepted = tokio::select! {
            accepted = incoming.next() => accepted,
            Some(_) = handshakes.join_next(), if !handshakes.is_empty() => continue,
            () = ready.closed() => return,
        };
        let tcp = match accepted {
            Some(Ok(tcp)) => tcp,
            Some(Err(e)) => {
                tracing::debug!(listener = what, error = %e, "cannot accept a connection");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
            None => return,
        };
        let Ok(address) = tcp.peer_addr() else { continue };
        let Some(slot) = per_address.take(address.ip()) else {
            tracing::debug!(listener = what, %address, "too many TLS handshakes from one address: connection closed");
            continue;
        };
        let (acceptor, label, ready) = (acceptor.clone(), label.clone(), ready.clone());
        handshakes.spawn(async move {
            let _slot = slot;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = ready.send(label(tls, address)).await;
                }
                Ok(Err(e)) => tracing::debug!(listener = what, %address, error = %e, "a TLS handshake failed"),
                Err(_) => tracing::debug!(listener = what, %address, "a TLS handshake did not finish in time"),
            }
        });
    }
}

/// How many handshakes each IP address has in progress, at most `max`
/// each: [`PerAddress::take`] hands out a slot, given back when dropped.
#[derive(Clone)]
pub struct PerAddress {
    max: usize,
    taken: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

/// One handshake's place in its address's count, until dropped.
pub struct AddressSlot {
    ip: IpAddr,
    taken: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
}

impl PerAddress {
    pub fn new(max: usize) -> PerAddress {
        PerAddress { max, taken: Arc::default() }
    }

    /// A slot for one more handshake from `ip`, or `None` if it has `max`.
    pub fn take(&self, ip: IpAddr) -> Option<AddressSlot> {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let count = taken.entry(ip).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot { ip, taken: self.taken.clone() })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = taken.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                taken.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::api::tls::{CertIdentity, Credentials, Role};
    use crate::pki::{ClusterCa, ClusterSecret};

    /// The server's clock: the real one, `ahead` seconds later.
    #[derive(Debug, Default)]
    struct Clock {
        ahead: AtomicU64,
    }

    impl rustls::time_provider::TimeProvider for Clock {
        fn current_time(&self) -> Option<UnixTime> {
            let now = UnixTime::now().as_secs() + self.ahead.load(Ordering::Relaxed);
            Some(UnixTime::since_unix_epoch(Duration::from_secs(now)))
        }
    }

    /// A client config that resumes sessions (rustls' default), with a
    /// client certificate valid for one day, speaking `version` only.
    fn client_config(ca: &ClusterCa, version: &'static rustls::SupportedProtocolVersion) -> Arc<rustls::ClientConfig> {
        let issued = ca.issue_with_new_key(&CertIdentity::client("ops", Role::Admin), &[], 1).unwrap();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(issued.cert.as_bytes()).collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.cert_der().to_vec())).unwrap();
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// Connects with `config`: how the handshake went, once the server
    /// accepted the connection (its HTTP/2 settings arrived), or `None`
    /// if it refused it.
    async fn connect(at: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Option<rustls::HandshakeKind> {
        let tcp = TcpStream::connect(at).await.unwrap();
        let name = ServerName::IpAddress(at.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await.ok()?;
        let mut first = [0u8; 1];
        // TLS 1.3 refuses a client certificate after the client's last
        // handshake message: the refusal arrives as the first read.
        match tokio::time::timeout(Duration::from_secs(10), tls.read(&mut first)).await.expect("no answer") {
            Ok(n) if n > 0 => Some(tls.get_ref().1.handshake_kind().expect("handshaken")),
            _ => None,
        }
    }

    /// A tonic server (the health service) behind this accept loop with
    /// `config`, on a loopback port: its address and its task.
    async fn serve(
        config: rustls::ServerConfig,
    ) -> (SocketAddr, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let at = listener.local_addr().unwrap();
        let incoming = Handshaken::start(
            "gRPC",
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            Arc::new(config),
            |tls, _| tls,
        );
        let (_, health) = tonic_health::server::health_reporter();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(incoming.map(Ok::<_, std::io::Error>)),
        );
        (at, server)
    }

    /// Through the gRPC listener's config and accept loop: a client that
    /// would resume gets a full handshake every time (TLS 1.2 and 1.3), so
    /// a certificate that expired since its first connection is refused on
    /// the next; a client that never finishes its handshake holds up
    /// nobody. With tonic's own TLS (a session cache) the second
    /// connection was resumed and the expired certificate accepted.
    #[tokio::test]
    async fn the_grpc_listener_resumes_no_session() {
        let secret = ClusterSecret::generate().unwrap();
        let credentials = Credentials::from_secret(&secret, None, "h1", "127.0.0.1:7000").unwrap();
        let ca = ClusterCa::from_secret(&secret);
        let clock = Arc::new(Clock::default());
        let mut config = credentials.grpc_server_config().unwrap();
        config.time_provider = clock.clone();
        let (at, server) = serve(config).await;
        // Connected, silent: its handshake waits, the others go on.
        let _silent = TcpStream::connect(at).await.unwrap();

        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client = client_config(&ca, version);
            assert_eq!(connect(at, &client).await, Some(rustls::HandshakeKind::Full), "{version:?}");
            assert_eq!(connect(at, &client).await, Some(rustls::HandshakeKind::Full), "{version:?} again");
            clock.ahead.store(2 * 24 * 3600, Ordering::Relaxed);
            assert_eq!(connect(at, &client).await, None, "{version:?}: the expired certificate was accepted");
            clock.ahead.store(0, Ordering::Relaxed);
        }
        assert!(!server.is_finished(), "the listener survives refused handshakes");
        server.abort();
    }

    #[test]
    fn per_address_slots_are_counted_by_ip_and_given_back() {
        let limit = PerAddress::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = limit.take(a).expect("first");
        let _second = limit.take(a).expect("second");
        assert!(limit.take(a).is_none(), "a third from one address");
        assert!(limit.take(b).is_some(), "another address is not held up");
        drop(first);
        assert!(limit.take(a).is_some(), "a dropped slot is given back");
        assert!(limit.taken.lock().unwrap().get(&b).is_none(), "an address with none in progress is forgotten");
    }

    /// One address that opens connections and never speaks holds at most
    /// [`HANDSHAKES_PER_ADDRESS_MAX`] handshakes: its next connection is
    /// closed at once, and a client from another address is served.
    #[tokio::test]
    async fn one_silent_address_cannot_fill_the_listener() {
        let secret = ClusterSecret::generate().unwrap();
        let credentials = Credentials::from_secret(&secret, None, "h1", "127.0.0.1:7000").unwrap();
        let ca = ClusterCa::from_secret(&secret);
        let (at, server) = serve(credentials.grpc_server_config().unwrap()).await;
        let from = |ip: &str| {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
            socket.connect(at)
        };
        let mut silent = Vec::new();
        for _ in 0..HANDSHAKES_PER_ADDRESS_MAX {
            silent.push(from("127.0.0.2").await.unwrap());
        }
        // The accept loop takes connections in order: once the one past
        // the cap is closed, the silent ones before it are all counted.
        let mut past_the_cap = from("127.0.0.2").await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), past_the_cap.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the connection past the cap was not closed: {read:?}");
        let client = client_config(&ca, &rustls::version::TLS13);
        assert_eq!(connect(at, &client).await, Some(rustls::HandshakeKind::Full), "another address was not served");
        // The silent ones still wait (none was closed).
        for mut tcp in silent {
            assert!(
                tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut byte)).await.is_err(),
                "a silent connection within the cap was closed"
            );
        }
        server.abort();
    }
}

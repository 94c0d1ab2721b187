//! The peers' second path: QUIC datagrams beside the gRPC peer channel,
//! for the small frames that must get through a lossy network quickly.
//!
//! One TCP connection per peer pair stalls under packet loss and
//! reordering: a lost segment blocks every frame behind it until it is
//! retransmitted, and retransmission timeouts back off (links silent for
//! seconds at 10% loss with 100 ms of jitter, longer than `fence_after`).
//! Raft tolerates lost, duplicated and reordered messages, so the small
//! ones (heartbeats and their answers, votes, append acknowledgements,
//! read-index traffic: [`rides_datagrams`]) and the quorum-contact
//! confirmations go twice: on the gRPC stream as before, and as unreliable
//! QUIC datagrams (RFC 9221), where a lost packet delays nothing else.
//! Appends with entries and snapshots stay on gRPC.
//!
//! Authentication is the gRPC channel's: the same member certificate, the
//! same CAs, TLS 1.3 with a client certificate required (no joiners), on
//! the gRPC port number over UDP. The sender of a datagram is the member
//! whose verified certificate opened the QUIC connection it came on, and
//! its batch goes through the same checks as a `RaftStream` frame (the
//! trust table's call check, the sender bound to its certificate, every
//! message judged: `PeerService::accept_batch`). QUIC's packet protection
//! (AEAD) and packet numbers refuse a forged or replayed datagram before
//! it is read; there is no early data (0-RTT), which could be replayed.
//!
//! The path is best effort: a member whose UDP port cannot be bound, or a
//! peer it cannot reach over UDP (a firewall), keeps working over TCP
//! alone, with one warning. `insecure` agents have no datagram path (QUIC
//! needs TLS).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use prost::Message as _;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use raft::eraftpb::{Message, MessageType};
use tokio::sync::watch;
use tonic::Status;
use tonic::transport::CertificateDer;

use super::gate::speaker_of;
use super::pb;
use super::tls::{Caller, Credentials};
use crate::trust::{self, Rpc, Speaker};

/// The application protocol both ends name in the handshake.
pub const ALPN: &[u8] = b"blixard-peer-datagrams/1";
/// A QUIC handshake (dialing or accepting) takes at most this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that hears nothing for this long is closed (the peer is
/// down or its UDP is blocked now); the sender dials again.
const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Keeps a connection that carries nothing for a while alive.
const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// The congestion window of every datagram connection, fixed (see
/// [`FixedWindow`]).
const WINDOW_BYTES: u64 = 256 * 1024;
/// Bytes of datagrams queued on one connection before the oldest are dropped.
const SEND_BUFFER_BYTES: usize = 256 * 1024;
/// Bytes of received datagrams a connection holds before dropping the oldest.
const RECEIVE_BUFFER_BYTES: usize = 256 * 1024;

/// Whether `message` also travels as a datagram: the small, loss-tolerant
/// kinds. Appends (with entries or not), snapshots, proposals and
/// leadership hand-overs go on gRPC only.
pub fn rides_datagrams(message: &Message) -> bool {
    use MessageType::*;
    matches!(
        message.get_msg_type(),
        MsgHeartbeat
            | MsgHeartbeatResponse
            | MsgRequestVote
            | MsgRequestVoteResponse
            | MsgRequestPreVote
            | MsgRequestPreVoteResponse
            | MsgAppendResponse
            | MsgReadIndex
            | MsgReadIndexResp
    )
}

/// A congestion controller with a fixed window. What goes on this path is
/// bounded by Raft's ticks (a few small frames per peer per heartbeat
/// interval, far below the window), and its point is to get through a
/// lossy link: a loss-based controller would shrink the window to two
/// packets at 10% loss and queue heartbeats behind it. Nothing lost is
/// resent, so losses cost nothing to back off from.
#[derive(Debug, Clone)]
struct FixedWindow;

impl quinn::congestion::Controller for FixedWindow {
    fn on_congestion_event(&mut self, _: std::time::Instant, _: std::time::Instant, _: bool, _: u64) {}

    fn on_mtu_update(&mut self, _: u16) {}

    fn window(&self) -> u64 {
        WINDOW_BYTES
    }

    fn clone_box(&self) -> Box<dyn quinn::congestion::Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        WINDOW_BYTES
    }

    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

impl quinn::congestion::ControllerFactory for FixedWindow {
    fn build(self: Arc<Self>, _: std::time::Instant, _: u16) -> Box<dyn quinn::congestion::Controller> {
        Box::new(FixedWindow)
    }
}

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("5 s is a valid idle timeout")))
        .keep_alive_interval(Some(KEEP_ALIVE))
        // Datagrams only: no streams either way.
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .datagram_receive_buffer_size(Some(RECEIVE_BUFFER_BYTES))
        .datagram_send_buffer_size(SEND_BUFFER_BYTES)
        .congestion_controller_factory(Arc::new(FixedWindow));
    Arc::new(transport)
}

/// This agent's QUIC endpoint: it accepts its peers' connections and dials
/// its own, from the one UDP socket on the gRPC port number.
pub struct DatagramPath {
    endpoint: quinn::Endpoint,
}

impl DatagramPath {
    /// Binds UDP `listen` (the gRPC listener's address) with `credentials`.
    pub fn bind(listen: SocketAddr, credentials: &Credentials) -> Result<DatagramPath, String> {
        let server = credentials.datagram_server_config(ALPN).map_err(|e| e.to_string())?;
        let server = QuicServerConfig::try_from(server).map_err(|e| e.to_string())?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server));
        server.transport_config(transport_config()).migration(false);
        let client = credentials.datagram_client_config(ALPN).map_err(|e| e.to_string())?;
        let client = QuicClientConfig::try_from(client).map_err(|e| e.to_string())?;
        let mut client = quinn::ClientConfig::new(Arc::new(client));
        client.transport_config(transport_config());
        let mut endpoint =
            quinn::Endpoint::server(server, listen).map_err(|e| format!("cannot bind UDP {listen}: {e}"))?;
        endpoint.set_default_client_config(client);
        Ok(DatagramPath { endpoint })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// A connection to the member listening at `address` (`HOST:PORT`, its
    /// gRPC address), its certificate verified for HOST.
    pub async fn connect(&self, address: &str) -> Result<quinn::Connection, String> {
        let to = tokio::net::lookup_host(address)
            .await
            .map_err(|e| format!("cannot resolve {address}: {e}"))?
            .next()
            .ok_or_else(|| format!("{address} resolves to no address"))?;
        let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let connecting = self.endpoint.connect(to, host).map_err(|e| e.to_string())?;
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no QUIC handshake within {HANDSHAKE_TIMEOUT:?}")),
        }
    }

    /// Closes every connection (the agent stops).
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"stopping");
    }
}

/// What a received batch is handed to: checks it and steps it (the
/// `Peer` service's `accept_batch`), or says why not.
pub type Accept = Arc<dyn Fn(Speaker, pb::RaftBatch) -> BoxFuture<'static, Result<(), Status>> + Send + Sync>;

/// The speaker of a connection, by the certificate its handshake verified,
/// judged as a `RaftStream` call would be (members only).
pub fn speaker_of_connection(connection: &quinn::Connection) -> Result<Speaker, String> {
    let certs = connection
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("the connection has no client certificate")?;
    let caller = Caller::of_certs(Some(certs.as_slice()), true).map_err(|status| status.message().to_string())?;
    let speaker = speaker_of(&caller);
    trust::may_call(&speaker, Rpc::RaftStream, false).map_err(|refusal| refusal.0)?;
    Ok(speaker)
}

/// Handshakes an endpoint serves at once; a connection attempt beyond
/// them is refused (its sender dials again). Members need one each.
const HANDSHAKES_MAX: usize = 256;
/// Handshakes an endpoint serves at once from one IP address (members of a
/// cluster on one machine share 127.0.0.1), so one address that completes
/// the Retry and abandons its handshakes cannot take every slot.
const HANDSHAKES_PER_ADDRESS_MAX: usize = 64;

/// Accepts peers' connections until `stop`, each batch of each to `accept`.
///
/// Before any handshake work, an attempt from an address that has not
/// shown it receives this endpoint's packets is answered with a Retry (a
/// stateless packet; one round trip for a real peer): a flood of Initials,
/// from spoofed or many source addresses, then costs no key exchange, no
/// state and no amplified answer. At most [`HANDSHAKES_MAX`] handshakes run
/// at once, [`HANDSHAKES_PER_ADDRESS_MAX`] from one IP address, each for at
/// most `HANDSHAKE_TIMEOUT`.
pub async fn serve(path: Arc<DatagramPath>, accept: Accept, mut stop: watch::Receiver<bool>) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    let per_address = crate::api::handshake::PerAddress::new(HANDSHAKES_PER_ADDRESS_MAX);
    loop {
        let incoming = tokio::select! {
            incoming = path.endpoint.accept() => incoming,
            _ = stop.wait_for(|stop| *stop) => None,
        };
        let Some(incoming) = incoming else {
            path.close();
            return;
        };
        if !incoming.remote_address_validated() {
            if incoming.retry().is_err() {
                tracing::debug!("dropped a datagram connection attempt that may not be retried");
            }
            continue;
        }
        let Some(slot) = per_address.take(incoming.remote_address().ip()) else {
            tracing::debug!(from = %incoming.remote_address(), "refused a datagram connection: too many handshakes from its address");
            incoming.refuse();
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::debug!(from = %incoming.remote_address(), "refused a datagram connection: too many handshakes at once");
            incoming.refuse();
            continue;
        };
        let accept = accept.clone();
        tokio::spawn(async move {
            let from = incoming.remote_address();
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming).await;
            drop((permit, slot));
            let connection = match handshake {
                Ok(Ok(connection)) => connection,
                Ok(Err(e)) => {
                    tracing::debug!(%from, error = %e, "a datagram connection failed its handshake");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%from, "a datagram connection did not finish its handshake in time");
                    return;
                }
            };
            let speaker = match speaker_of_connection(&connection) {
                Ok(speaker) => speaker,
                Err(why) => {
                    tracing::debug!(%from, why, "refused a datagram connection");
                    connection.close(1u32.into(), b"not a member");
                    return;
                }
            };
            receive(connection, speaker, accept).await;
        });
    }
}

/// Hands each datagram of `connection` to `accept` until it closes.
async fn receive(connection: quinn::Connection, speaker: Speaker, accept: Accept) {
    let from = connection.remote_address();
    loop {
        let datagram = match connection.read_datagram().await {
            Ok(datagram) => datagram,
            Err(e) => {
                tracing::debug!(%from, %speaker, error = %e, "a datagram connection closed");
                return;
            }
        };
        let batch = match pb::RaftBatch::decode(datagram) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::debug!(%from, %speaker, error = %e, "dropped a datagram that does not decode");
                continue;
            }
        };
        if let Err(status) = accept(speaker.clone(), batch).await {
            tracing::debug!(%from, %speaker, error = %status.message(), "refused a datagram batch");
        }
    }
}

/// Packs `messages` (encoded) into batches of at most `size_max` encoded
/// bytes each, `template` giving the other fields; `confirmation` rides
/// the first. A message too large for a datagram alone is left out (it
/// goes on gRPC anyway).
pub fn pack(
    template: &pb::RaftBatch,
    messages: Vec<Vec<u8>>,
    mut confirmation: Option<pb::ContactConfirmation>,
    size_max: usize,
) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut batch = pb::RaftBatch { confirmation: confirmation.take(), ..template.clone() };
    for message in messages {
        batch.messages.push(message);
        if batch.encoded_len() <= size_max {
            continue;
        }
        let message = batch.messages.pop().expect("pushed above");
        if !batch.messages.is_empty() || batch.confirmation.is_some() {
            out.push(Bytes::from(batch.encode_to_vec()));
            batch = template.clone();
        }
        batch.messages.push(message);
        if batch.encoded_len() > size_max {
            batch.messages.pop();
            tracing::debug!("a raft message is too large for a datagram; it goes on gRPC only");
        }
    }
    if !batch.messages.is_empty() || batch.confirmation.is_some() {
        out.push(Bytes::from(batch.encode_to_vec()));
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;
    use crate::api::tls::{CertIdentity, Role};
    use crate::pki::{ClusterCa, ClusterSecret};

    pub(crate) fn member(secret: &ClusterSecret, name: &str) -> Credentials {
        Credentials::from_secret(secret, None, name, "127.0.0.1:7000").unwrap()
    }

    pub(crate) type Received = Arc<Mutex<Vec<(Speaker, pb::RaftBatch)>>>;

    /// A path on loopback `at` (port 0: any) serving into a record of what
    /// it accepted; serves until the returned sender is dropped.
    pub(crate) fn recorder(credentials: &Credentials, at: &str) -> (Arc<DatagramPath>, Received, watch::Sender<bool>) {
        let path = Arc::new(DatagramPath::bind(at.parse().unwrap(), credentials).unwrap());
        let received: Received = Arc::default();
        let sink = received.clone();
        let accept: Accept = Arc::new(move |speaker, batch| {
            sink.lock().unwrap().push((speaker, batch));
            Box::pin(async { Ok(()) })
        });
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(path.clone(), accept, stopped));
        (path, received, stop)
    }

    pub(crate) async fn wait_until(what: &str, ok: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn batch(from: u64, sent_at_ms: u64) -> Bytes {
        let batch = pb::RaftBatch { cluster_id: 7, from, sent_at_ms, ..Default::default() };
        Bytes::from(batch.encode_to_vec())
    }

    fn sent_times(received: &Received) -> Vec<u64> {
        received.lock().unwrap().iter().map(|(_, b)| b.sent_at_ms).collect()
    }

    /// A connection from a certificate of the cluster CA that is not a
    /// member's (an operator's client certificate).
    async fn client_connection(ca: &ClusterCa, to: SocketAddr) -> quinn::Connection {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let issued = ca.issue_with_new_key(&CertIdentity::client("ops", Role::Admin), &[], 30).unwrap();
        let chain = CertificateDer::pem_slice_iter(issued.cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(issued.key.as_bytes()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint
            .set_default_client_config(quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).unwrap())));
        endpoint.connect(to, "127.0.0.1").unwrap().await.unwrap()
    }

    /// A member's datagrams arrive as that member's; a client certificate of
    /// the same CA is refused the connection, a member of another CA the
    /// handshake, and nothing of theirs is accepted.
    #[tokio::test]
    async fn a_members_datagrams_arrive_as_its_own_and_strangers_are_refused() {
        let secret = ClusterSecret::generate().unwrap();
        let (h1, received, _stop) = recorder(&member(&secret, "h1"), "127.0.0.1:0");
        let to = h1.local_addr().unwrap();
        let h2 = DatagramPath::bind("127.0.0.1:0".parse().unwrap(), &member(&secret, "h2")).unwrap();
        let connection = h2.connect(&to.to_string()).await.unwrap();
        for at in 1..=5 {
            connection.send_datagram(batch(2, at)).unwrap();
        }
        wait_until("h2's five batches", || received.lock().unwrap().len() == 5).await;
        assert!(received.lock().unwrap().iter().all(|(speaker, _)| *speaker == Speaker::Member("h2".into())));

        let ops = client_connection(&ClusterCa::from_secret(&secret), to).await;
        let _ = ops.send_datagram(batch(2, 100));
        let closed = tokio::time::timeout(Duration::from_secs(10), ops.closed()).await.expect("refused");
        assert!(
            matches!(closed, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == quinn::VarInt::from_u32(1)),
            "{closed:?}"
        );

        // Another cluster's member, even trusting this cluster's CA.
        let other = ClusterSecret::generate().unwrap();
        let h9 = Credentials::from_secret(&other, Some(&secret), "h9", "127.0.0.1:7000").unwrap();
        let h9 = DatagramPath::bind("127.0.0.1:0".parse().unwrap(), &h9).unwrap();
        if let Ok(connection) = h9.connect(&to.to_string()).await {
            let _ = connection.send_datagram(batch(2, 200));
            tokio::time::timeout(Duration::from_secs(10), connection.closed()).await.expect("refused");
        }
        assert_eq!(sent_times(&received), vec![1, 2, 3, 4, 5]);
    }

    /// Relays UDP to `to`, sending every packet from the client three
    /// times: as it is, again (a replay), and with its last byte changed
    /// (a forgery).
    async fn replaying_relay(to: SocketAddr) -> SocketAddr {
        let front = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
        back.connect(to).await.unwrap();
        let at = front.local_addr().unwrap();
        let client = Arc::new(Mutex::new(None::<SocketAddr>));
        let (f, b, c) = (front.clone(), back.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                *c.lock().unwrap() = Some(from);
                let _ = b.send(&buf[..n]).await;
                let _ = b.send(&buf[..n]).await;
                buf[n - 1] ^= 0x55;
                let _ = b.send(&buf[..n]).await;
            }
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = back.recv(&mut buf).await {
                let to = *client.lock().unwrap();
                if let Some(to) = to {
                    let _ = front.send_to(&buf[..n], to).await;
                }
            }
        });
        at
    }

    #[tokio::test]
    async fn replayed_and_forged_packets_are_refused_and_change_nothing() {
        let secret = ClusterSecret::generate().unwrap();
        let (h1, received, _stop) = recorder(&member(&secret, "h1"), "127.0.0.1:0");
        let relay = replaying_relay(h1.local_addr().unwrap()).await;
        let h2 = DatagramPath::bind("127.0.0.1:0".parse().unwrap(), &member(&secret, "h2")).unwrap();
        let connection = h2.connect(&relay.to_string()).await.unwrap();
        for at in 1..=20 {
            connection.send_datagram(batch(2, at)).unwrap();
        }
        wait_until("the twenty batches", || sent_times(&received).len() >= 20).await;
        // The relay sent each packet's copies right after it: once this
        // marker is in, every copy of the batches before it was read.
        connection.send_datagram(batch(2, 1_000)).unwrap();
        wait_until("the marker", || sent_times(&received).contains(&1_000)).await;
        let mut times = sent_times(&received);
        times.sort();
        let mut expected: Vec<u64> = (1..=20).collect();
        expected.push(1_000);
        assert_eq!(times, expected, "each batch exactly once: no replay, no forgery");
    }

    fn message(kind: MessageType, context: usize) -> Vec<u8> {
        use protobuf::Message as _;
        let mut m = Message::default();
        m.set_msg_type(kind);
        m.set_context(vec![7u8; context].into());
        m.write_to_bytes().unwrap()
    }

    /// No session is resumed on this path: a resumed session skips the
    /// certificate checks (an expired certificate would pass).
    #[test]
    fn sessions_are_never_resumed() {
        let secret = ClusterSecret::generate().unwrap();
        let credentials = member(&secret, "h1");
        let server = credentials.datagram_server_config(ALPN).unwrap();
        assert_eq!(server.send_tls13_tickets, 0);
        assert!(!server.session_storage.put(vec![1], vec![2]), "the server keeps no sessions");
        assert!(!server.ticketer.enabled());
        let client = credentials.datagram_client_config(ALPN).unwrap();
        assert_eq!(format!("{:?}", client.resumption), format!("{:?}", rustls::client::Resumption::disabled()));
    }

    #[test]
    fn only_small_loss_tolerant_kinds_ride_datagrams() {
        use MessageType::*;
        let of = |kind| {
            let mut m = Message::default();
            m.set_msg_type(kind);
            rides_datagrams(&m)
        };
        for kind in [MsgHeartbeat, MsgHeartbeatResponse, MsgRequestPreVote, MsgRequestVoteResponse, MsgAppendResponse] {
            assert!(of(kind), "{kind:?}");
        }
        for kind in [MsgAppend, MsgSnapshot, MsgPropose, MsgTimeoutNow, MsgTransferLeader] {
            assert!(!of(kind), "{kind:?}");
        }
    }

    #[test]
    fn batches_are_packed_under_the_datagram_size() {
        let template =
            pb::RaftBatch { cluster_id: 7, from: 1, from_address: "10.0.0.1:7000".into(), ..Default::default() };
        let confirmation = Some(pb::ContactConfirmation { sent_at_ms: 5, commit: 9 });
        let messages: Vec<Vec<u8>> = (0..40).map(|_| message(MessageType::MsgHeartbeat, 60)).collect();
        let packed = pack(&template, messages, confirmation, 1_000);
        assert!(packed.len() > 1);
        let batches: Vec<pb::RaftBatch> = packed.iter().map(|b| pb::RaftBatch::decode(b.clone()).unwrap()).collect();
        assert!(packed.iter().all(|b| b.len() <= 1_000));
        assert_eq!(batches.iter().map(|b| b.messages.len()).sum::<usize>(), 40);
        assert_eq!(batches.iter().filter(|b| b.confirmation.is_some()).count(), 1, "the confirmation once");
        assert!(batches.iter().all(|b| b.from == 1 && b.cluster_id == 7));
        // Too large alone: left out; a confirmation alone still goes.
        let packed = pack(&template, vec![message(MessageType::MsgHeartbeat, 2_000)], confirmation, 1_000);
        let batch = pb::RaftBatch::decode(packed[0].clone()).unwrap();
        assert!(batch.messages.is_empty() && batch.confirmation.is_some());
        assert!(pack(&template, vec![], None, 1_000).is_empty());
    }
}

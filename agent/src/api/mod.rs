//! The gRPC surface: generated types, the peer transport and the client
//! API service. Only this module knows tonic and protobuf wire types.
//!
//! - `context`: what both services share; routing of requests to the leader.
//! - `datagram`: the peers' second path, QUIC datagrams for small Raft messages.
//! - `gate`: every request's speaker and call, judged by `trust` before any handler runs.
//! - `handshake`: TLS over our own accept loop, with our rustls config (no resumption).
//! - `peer`: the raft transport (client and `Peer` service), admission.
//! - `service`: the client API (`Blixard` service).
//! - `status`: agent errors -> gRPC status codes.
//! - `tls`: mutual TLS settings, and the identity a certificate carries.

pub mod context;
pub mod datagram;
pub mod gate;
pub mod handshake;
pub mod join;
pub mod peer;
pub mod service;
pub mod status;
pub mod tls;

pub mod client;

/// Generated code for `proto/blixard/v1/api.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("blixard.v1");

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("blixard_descriptor");
}

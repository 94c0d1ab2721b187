//! The gRPC surface: generated types, the peer transport and the client
//! API service. Only this module knows tonic and protobuf wire types.

pub mod client;

/// Generated code for `proto/blixard/v1/api.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("blixard.v1");

    /// The encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("blixard_descriptor");
}

//! Generates the protobuf and gRPC code without a system `protoc`: `protox`
//! parses the .proto files in Rust and `tonic-prost-build` generates from the
//! resulting descriptor set.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/blixard/state/v1/state.proto", "proto/blixard/v1/api.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // For gRPC server reflection.
    std::fs::write(out.join("blixard_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}

//! Generates the protobuf and gRPC code without a system `protoc`: `protox`
//! parses the .proto files in Rust and `tonic-prost-build` generates from the
//! resulting descriptor set.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/blixard/state/v1/state.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .file_descriptor_set_path(out.join("blixard_descriptor.bin"))
        .compile_fds(fds)?;
    Ok(())
}

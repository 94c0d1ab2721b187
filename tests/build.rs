//! Generates the etcd client (the subset in `proto/etcd/kv.proto`) for the
//! load client, without a system `protoc`, the same way the agent does.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/etcd/kv.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().build_server(false).build_client(true).compile_fds(fds)?;
    Ok(())
}

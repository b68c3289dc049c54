//! Compiles the vendored etcd v3.7 protos with protox (pure Rust), so a fresh machine needs no
//! system `protoc` to build Keyhold.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/etcd/api/etcdserverpb/rpc.proto",
    "proto/etcd/api/mvccpb/kv.proto",
    "proto/etcd/api/authpb/auth.proto",
    "proto/etcd/server/etcdserver/api/v3election/v3electionpb/v3election.proto",
    "proto/etcd/server/etcdserver/api/v3lock/v3lockpb/v3lock.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("etcd_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .generate_default_stubs(true)
        .type_attribute(".", "#[allow(clippy::all, missing_docs)]")
        .compile_fds(fds)?;
    Ok(())
}

//! Compiles `feed.proto`, `cluster.proto` and `admin.proto` with `protox` (pure Rust: no system
//! `protoc`) and generates the tonic client and server code. The encoded
//! descriptor set of the public API (`feed.proto` alone: the internal `Cluster`
//! service is not advertised on the public port) is written beside it for gRPC
//! server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["feed.proto", "cluster.proto", "admin.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let public = protox::compile(["feed.proto"], ["."])?;
    fs::write(out.join("tickshard_feed_descriptor.bin"), public.encode_to_vec())?;
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}

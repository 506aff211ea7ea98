//! Generates the registration API's client and server from proto/sockmesh/v1/agent.proto, with
//! the protoc Cargo vendors.
use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let proto = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .compile_protos(&[proto.join("sockmesh/v1/agent.proto")], &[proto])?;
    Ok(())
}

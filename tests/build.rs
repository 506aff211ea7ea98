//! The registration API's client, generated from the same proto the agent serves, so the attack
//! tests speak to the agent as any other program on the node would.

use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let proto = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&[proto.join("sockmesh/v1/agent.proto")], &[proto])?;
    Ok(())
}

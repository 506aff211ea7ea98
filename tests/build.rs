//! The registration API's client, generated from the same proto the agent serves, so the attack
//! tests speak to the agent as any other program on the node would (and a server of it, used
//! as a gRPC upstream in the proxy tests).

use std::{env, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let proto = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    // The server too: the testkit serves it as a gRPC upstream behind the proxy.
    tonic_prost_build::configure()
        .compile_protos(&[proto.join("sockmesh/v1/agent.proto")], &[proto])?;
    Ok(())
}

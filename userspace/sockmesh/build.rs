//! Builds the kernel programs (ebpf/sockmesh-ebpf) with nightly for bpfel-unknown-none and puts
//! the object in OUT_DIR. With AYA_BUILD_SKIP=1 (clippy, docs) an empty stub stands in.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(out.join("sockmesh-ebpf"), [])?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
        .join("../../ebpf/sockmesh-ebpf")
        .canonicalize()?;
    let common = root.join("../sockmesh-common").canonicalize()?;
    println!("cargo:rerun-if-changed={}", common.display());
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "sockmesh-ebpf",
            root_dir: root.to_str().expect("utf-8 path"),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

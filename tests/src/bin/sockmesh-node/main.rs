//! `sockmesh-node` (run by `cargo xtask node`): sockmesh on a real node. containerd and runc
//! run the agent's DaemonSet pod, install-cni, and workload pods as Istio's injector renders
//! them, with this program playing kubelet over CRI. Each scenario prints its name and
//! outcome; the last line is `N passed, N failed`.
//!
//! The images come from `cargo xtask image` (the folder in `SOCKMESH_IMAGES`).

mod scenarios;
mod workloads;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use sockmesh_tests::node::{cri::Cri, Node, PAUSE_IMAGE};

use scenarios::Suite;

fn main() -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run()) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sockmesh-node: {e:#}");
            println!("0 passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}

/// Start the node, run every scenario, stop the node; the number of failures.
async fn run() -> Result<usize> {
    let images = PathBuf::from(std::env::var_os("SOCKMESH_IMAGES").context(
        "SOCKMESH_IMAGES is not set: run the node suite with `cargo xtask node`, which builds \
         the images first",
    )?);
    let node = Node::start().context("starting containerd")?;
    println!(
        "node {}: containerd started ({})",
        node.name,
        node.dir.display()
    );
    for image in ["sockmesh", "sockmesh-proxy", "testkit", "pause"] {
        node.import(&images.join(format!("{image}.tar")))?;
    }
    node.tag(workloads::SOCKMESH_IMAGE, workloads::SOCKMESH_IMAGE_NEXT)?;
    let mut cri = Cri::connect(&node.socket).await?;
    println!("node: {} over CRI v1", cri.version().await?);
    for image in [
        workloads::SOCKMESH_IMAGE,
        workloads::PROXY_IMAGE,
        workloads::TESTKIT_IMAGE,
        PAUSE_IMAGE,
    ] {
        anyhow::ensure!(
            cri.has_image(image).await?,
            "the runtime does not hold {image} after the import"
        );
    }
    let mut suite = Suite::new(node, cri)?;
    let failed = suite.run_all().await;
    suite.tear_down().await;
    Ok(failed)
}

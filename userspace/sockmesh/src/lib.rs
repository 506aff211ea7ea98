//! `sockmesh`: the node agent, the init container, the CNI plugin and the CLI of the sockmesh
//! capture, one binary by role:
//!
//! - [`core`]: the pod model, the maps and the loader, which every role shares;
//! - [`agent`]: `sockmesh agent`, the DaemonSet;
//! - [`init`]: `sockmesh init istio|linkerd`, also run as `istio-iptables`;
//! - [`cni`]: `sockmesh cni` (the chained plugin) and `sockmesh install-cni`;
//! - [`cli`]: `sockmesh dump` and `sockmesh explain`.
//!
//! The agent's API lives in the `sockmesh-api` crate; the decisions in `sockmesh-common`.

pub mod agent;
pub mod cli;
pub mod cni;
pub mod core;
pub mod init;

//! The CNI path: [`plugin`], the chained plugin a container runtime runs for every pod, and
//! [`install`], which puts it in the node's CNI configuration (the DaemonSet's job).

pub mod install;
pub mod plugin;

//! Shared pieces of sockmesh's integration and conformance suites: the netns lab (`lab`), the
//! standard pods and their probes (`pods`), the test programs run inside them with their typed
//! launchers (`kit`, and `accel` for socket acceleration), istio-iptables' reference rules
//! (`profiles`), a test xDS control plane (`xds`), the registration API's client (`api`), and
//! the removal of what an interrupted lab left (`leftovers`).
//! The demo and the benchmark are the `sockmesh-testkit` binary's own (src/bin).

pub mod accel;
pub mod api;
pub mod kit;
pub mod lab;
pub mod leftovers;
pub mod node;
pub mod pods;
pub mod profiles;
pub mod xds;

//! Shared pieces of sockmesh's integration and conformance suites: the netns lab, the test
//! programs run inside it, istio-iptables' reference rules, and the demo.

pub mod accel;
pub mod api;
pub mod bench;
pub mod demo;
pub mod hop;
pub mod kit;
pub mod lab;
pub mod pods;
pub mod profiles;
pub mod xds;

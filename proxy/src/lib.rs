//! sockmesh-proxy: a sidecar proxy that works the same under iptables and under sockmesh.
//!
//! It learns each connection's original destination on its outbound (15001) and inbound
//! (15006) listeners, routes HTTP/1.1 and HTTP/2 by virtual host and route to clusters of
//! endpoints, balances across them, and relays anything else as TCP.

pub mod admin;
pub mod alloc;
pub mod cluster;
pub mod config;
pub mod control;
pub mod exec;
pub mod fxhash;
pub mod http;
pub mod listener;
pub mod random;
pub mod restart;
pub mod router;
pub mod snapshot;
pub mod stats;
pub mod tcp;
pub mod transport;
pub mod upstream;
pub mod xds;

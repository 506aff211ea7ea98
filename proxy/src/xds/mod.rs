//! Dynamic configuration from a control plane: Envoy's xDS v3 over ADS, state of the world.
//!
//! Clusters (CDS) and listeners (LDS) are asked for by wildcard; the endpoints (EDS) of the
//! EDS clusters and the route configurations (RDS) the listeners name follow. Each response
//! is translated into the proxy's own configuration, merged with the file's and installed
//! whole; it is acknowledged when it is in force and refused (NACK, with the reason) when it
//! cannot be, the previous resources staying in force.
//!
//! The subset understood is the one the proxy can honour; anything else that would change
//! behaviour is refused by name rather than ignored. See proxy/README.md.

mod ads;
mod cluster;
mod error;
mod kind;
mod listener;
mod merge;
mod proto;
mod resources;
mod route;
#[cfg(test)]
mod tests;

pub use ads::{run, Install};
pub use error::Error;
pub use kind::Kind;
pub use merge::merge;
pub use resources::Resources;

//! Where an attempt goes, and why one produced no response.

use std::{net::SocketAddr, time::Duration};

use crate::config::Direction;

/// Where an attempt goes, and how.
#[derive(Clone, Copy, Debug)]
pub struct Upstream {
    /// An endpoint of a cluster, or the original destination.
    pub addr: SocketAddr,
    /// Inbound connections come from the passthrough source, and are pooled apart.
    pub direction: Direction,
    /// HTTP/2 (h2c), else HTTP/1.1.
    pub http2: bool,
    pub connect_timeout: Duration,
}

impl Upstream {
    /// The pools' key: the endpoint, and whether the connection is inbound.
    pub fn pool_key(&self) -> (SocketAddr, bool) {
        (self.addr, self.direction == Direction::Inbound)
    }
}

/// Why an attempt produced no response.
#[derive(Debug)]
pub enum Failure {
    /// No connection: it could not be opened (in time), or its handshake failed.
    Connect(String),
    /// The connection failed or closed before the response's head.
    Reset(String),
    /// The attempt's own time limit ran out.
    Timeout,
}

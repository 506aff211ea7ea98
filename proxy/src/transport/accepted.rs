//! What the proxy knows of an accepted connection before reading it.

use super::addr::{ClientAddr, OrigDstAddr};
use crate::config::Direction;

/// An accepted connection's peer, original destination, and its listener's direction.
#[derive(Clone, Copy, Debug)]
pub struct Accepted {
    pub client: ClientAddr,
    pub orig: OrigDstAddr,
    pub direction: Direction,
}

//! Connections below HTTP: addresses, original destination, protocol, SNI, sockets.

mod accepted;
mod addr;
mod conn;
mod detect;
mod orig_dst;
mod relay;
mod sni;
mod sniffed;
mod socket;

pub use accepted::Accepted;
pub use addr::{ClientAddr, ListenAddr, LocalAddr, OrigDstAddr};
pub use conn::{Conn, Listener};
pub use detect::{detect_partial, sniff, Protocol};
pub use orig_dst::original_dst;
pub use relay::relay;
pub use sni::{client_hello, client_hello_sni, sni};
pub use sniffed::Sniffed;
pub use socket::{bind, connect, listen, ORIG_DST_CONNECT_TIMEOUT};

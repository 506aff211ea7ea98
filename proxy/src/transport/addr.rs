//! The roles a socket address plays for a connection, as types that cannot be mixed up.

use std::{fmt, net::SocketAddr};

/// Declares a newtype for one role of a socket address, with read-only accessors.
macro_rules! address_role {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name(SocketAddr);

        impl $name {
            /// The address in this role, v4-mapped IPv6 written as the IPv4 address it is.
            pub fn new(addr: SocketAddr) -> $name {
                $name(unmapped(addr))
            }

            /// The socket address itself.
            pub fn addr(self) -> SocketAddr {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

address_role!(
    /// The downstream peer of a connection.
    ClientAddr
);

address_role!(
    /// Where the client meant to connect: the address before capture rewrote it.
    OrigDstAddr
);

address_role!(
    /// The local address of an accepted connection (the listener's, for a redirected one).
    LocalAddr
);

address_role!(
    /// The address a listener is bound to.
    ListenAddr
);

/// `a` with a v4-mapped IPv6 address written as the IPv4 address it is.
fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapped_addresses_are_written_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:80".parse().unwrap();
        assert_eq!(ClientAddr::new(mapped).to_string(), "10.0.0.1:80");
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(OrigDstAddr::new(v6).addr(), v6);
    }
}

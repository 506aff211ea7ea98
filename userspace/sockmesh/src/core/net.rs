//! Addresses on the host side: IP prefixes ([`Cidr`]), conversions to and from the maps'
//! [`Addr`] form, and port ranges as prefixes of the port space.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use sockmesh_common::{is_v4_mapped, v4_mapped, v4_octets, Addr};

/// An IP prefix, host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - prefix as u32)
                };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
            }
            IpAddr::V6(a) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - prefix as u32)
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
            }
        };
        Cidr { addr, prefix }
    }

    /// `ADDR/LEN` with a prefix length that fits the family, or `None`.
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, len) = s.split_once('/')?;
        let addr: IpAddr = addr.parse().ok()?;
        let len: u8 = len.parse().ok()?;
        (len <= max_prefix(addr)).then(|| Cidr::new(addr, len))
    }

    /// The address as given (before masking, for the loopback check it is the same class).
    pub fn ip(&self) -> IpAddr {
        self.addr
    }

    pub fn is_v6(&self) -> bool {
        self.addr.is_ipv6()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Cidr::new(ip, self.prefix).addr == self.addr
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The longest prefix of `addr`'s family: 32 or 128.
pub fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv6() {
        128
    } else {
        32
    }
}

/// [`Addr`] (IPv6 form, v4-mapped for IPv4) to a std address of the right family.
pub fn addr_to_ip(a: &Addr) -> IpAddr {
    if is_v4_mapped(a) {
        IpAddr::V4(Ipv4Addr::from(v4_octets(a)))
    } else {
        IpAddr::V6(Ipv6Addr::from(*a))
    }
}

pub fn ip_to_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The prefixes of the 16-bit port space that exactly cover `lo..=hi`: (first port, prefix
/// length in bits).
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (lo as u32, hi as u32);
    while lo <= hi {
        // The largest aligned block starting at lo that ends at or before hi.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, (16 - size.trailing_zeros()) as u8));
        lo += size;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_become_exact_prefixes() {
        assert_eq!(port_prefixes(4567, 4567), vec![(4567, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(4566, 4569), vec![(4566, 15), (4568, 15)]);
        for (lo, hi) in [
            (1, 1000),
            (4190, 4191),
            (30000, 32767),
            (65535, 65535),
            (7, 9),
        ] {
            let mut covered = Vec::new();
            for (start, bits) in port_prefixes(lo, hi) {
                let size = 1u32 << (16 - bits);
                assert_eq!(start as u32 % size, 0, "unaligned block");
                covered.extend(start as u32..start as u32 + size);
            }
            assert_eq!(
                covered,
                (lo as u32..=hi as u32).collect::<Vec<_>>(),
                "{lo}-{hi}"
            );
        }
    }

    #[test]
    fn cidrs_parse_with_a_prefix_that_fits() {
        assert_eq!(
            Cidr::parse("10.1.2.3/16"),
            Some(Cidr::new("10.1.0.0".parse().unwrap(), 16))
        );
        assert_eq!(Cidr::parse("10.0.0.0/33"), None);
        assert!(Cidr::parse("fd00::/128").is_some());
        assert_eq!(Cidr::parse("fd00::"), None);
    }
}

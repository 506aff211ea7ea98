//! Socket addresses as the kernel hands them over, and what a proxy asks of an accepted socket:
//! its original destination (SO_ORIGINAL_DST, as Envoy asks), and the getsockopt answers that
//! capture must leave alone. Written here on purpose rather than shared with sockmesh's own
//! probe, so the suites check the product against an independent reader.

use std::{
    fmt, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::RawFd,
};

/// SO_ORIGINAL_DST (and IP6T_SO_ORIGINAL_DST): option 80 at SOL_IP / SOL_IPV6.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// A `sockaddr_in` / `sockaddr_in6` in `storage`, if it holds one.
pub(crate) fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: family is AF_INET.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: family is AF_INET6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// `addr` as a sockaddr for bind(2) and connect(2), with its length.
pub(crate) fn std_to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: plain data.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: storage is large enough for sockaddr_in.
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: storage is large enough for sockaddr_in6.
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Why SO_ORIGINAL_DST gave no address. Its text is what the listeners report in place of the
/// address (`errno:N`), compared as is between iptables and sockmesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrigDstError {
    /// getsockopt failed with this errno.
    Errno(i32),
    /// It answered an address of neither IPv4 nor IPv6.
    BadFamily,
}

impl fmt::Display for OrigDstError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrigDstError::Errno(e) => write!(f, "errno:{e}"),
            OrigDstError::BadFamily => write!(f, "bad family"),
        }
    }
}

impl std::error::Error for OrigDstError {}

/// Whether a connection whose peer is `peer` is an IPv4 flow (a v4 socket, or a v6 socket whose
/// peer is v4-mapped).
fn is_v4_flow(peer: SocketAddr) -> bool {
    match peer {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    }
}

/// SO_ORIGINAL_DST the way Envoy asks: SOL_IP for IPv4 flows (v4 sockets, and v6 sockets whose
/// peer is v4-mapped), SOL_IPV6 for IPv6 flows.
pub fn original_dst(fd: RawFd, peer: SocketAddr) -> Result<SocketAddr, OrigDstError> {
    let level = if is_v4_flow(peer) {
        libc::SOL_IP
    } else {
        libc::SOL_IPV6
    };
    // SAFETY: plain data.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: ss/len are valid for the advertised size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(OrigDstError::Errno(e.raw_os_error().unwrap_or(0)));
    }
    sockaddr_to_std(&ss).ok_or(OrigDstError::BadFamily)
}

/// [`original_dst`] as the listeners report it: the address unmapped, or the error's text.
pub(crate) fn original_dst_text(fd: RawFd, peer: SocketAddr) -> String {
    match original_dst(fd, peer) {
        Ok(a) => unmap(a).to_string(),
        Err(e) => e.to_string(),
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for; any other as it is.
pub fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        a => a,
    }
}

/// getsockopt results a capture must leave alone, as one token: option 80 at the level that
/// does not match the flow, option 80 at SOL_TCP, SO_ORIGINAL_DST with a short buffer, SO_TYPE,
/// and the TTL / hop limit.
pub fn other_sockopts(fd: RawFd, peer: SocketAddr) -> String {
    let (wrong_level, own_level) = if is_v4_flow(peer) {
        (libc::SOL_IPV6, libc::SOL_IP)
    } else {
        (libc::SOL_IP, libc::SOL_IPV6)
    };
    let ttl = if peer.is_ipv6() {
        (libc::SOL_IPV6, libc::IPV6_UNICAST_HOPS, 4)
    } else {
        (libc::SOL_IP, libc::IP_TTL, 4)
    };
    let queries = [
        (wrong_level, SO_ORIGINAL_DST, 128),
        (libc::SOL_TCP, SO_ORIGINAL_DST, 128),
        (own_level, SO_ORIGINAL_DST, 8),
        (libc::SOL_SOCKET, libc::SO_TYPE, 4),
        ttl,
    ];
    queries
        .into_iter()
        .map(|(level, name, len)| sockopt_token(fd, level, name, len))
        .collect::<Vec<_>>()
        .join(",")
}

/// One getsockopt with a `len`-byte buffer: `LEVEL/NAME:lenL:VALUE` or `LEVEL/NAME:errnoE`.
fn sockopt_token(fd: RawFd, level: libc::c_int, name: libc::c_int, len: usize) -> String {
    let mut buf = [0u8; 128];
    let mut l = len as libc::socklen_t;
    // SAFETY: buf is 128 bytes and l <= 128.
    let rc = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut l) };
    if rc == 0 {
        let n = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
        format!("{level}/{name}:len{l}:{n}")
    } else {
        let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        format!("{level}/{name}:errno{e}")
    }
}

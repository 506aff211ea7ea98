//! A redirected connection's original destination: `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
};

use super::{
    addr::{ClientAddr, OrigDstAddr},
    socket::{sockaddr_v4, sockaddr_v6},
};

/// `SO_ORIGINAL_DST`, and `IP6T_SO_ORIGINAL_DST` (the same number at the IPv6 level).
const SO_ORIGINAL_DST: libc::c_int = 80;

/// `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6); `None` for a connection that was
/// not redirected. The level is the connection's family, read from the client's address (both
/// ends of a connection have one family), so no `getsockname` is needed on this path. An IPv4
/// connection accepted by a dual-stack IPv6 listener (a v4-mapped address) is an IPv4
/// connection to conntrack, so it is asked at the IPv4 level: `client` is unmapped, and its
/// family picks the level.
pub fn original_dst(s: &impl AsRawFd, client: ClientAddr) -> Option<OrigDstAddr> {
    let fd = s.as_raw_fd();
    // SAFETY: both are C sockaddr structs, valid when zeroed.
    let asked = match client.addr() {
        SocketAddr::V4(_) => unsafe { original_dst_at::<libc::sockaddr_in>(fd, libc::SOL_IP) }
            .map(|a| sockaddr_v4(&a).into()),
        SocketAddr::V6(_) => unsafe { original_dst_at::<libc::sockaddr_in6>(fd, libc::SOL_IPV6) }
            .map(|a| {
                let a = sockaddr_v6(&a);
                let ip = a
                    .ip()
                    .to_ipv4_mapped()
                    .map_or(IpAddr::V6(*a.ip()), IpAddr::V4);
                SocketAddr::new(ip, a.port())
            }),
    };
    asked.map(OrigDstAddr::new)
}

/// The original destination asked at `level`, as the `sockaddr` type of that level; `None`
/// when the socket has none there (it was not redirected).
///
/// # Safety
/// `A` must be a C `sockaddr_*` struct: plain data, valid when zeroed.
unsafe fn original_dst_at<A>(fd: libc::c_int, level: libc::c_int) -> Option<A> {
    // SAFETY: `A` is valid when zeroed (the caller's promise), and the buffer passed is
    // exactly its size.
    unsafe {
        let mut a: A = std::mem::zeroed();
        let mut len = std::mem::size_of::<A>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            level,
            SO_ORIGINAL_DST,
            (&mut a as *mut A).cast(),
            &mut len,
        );
        (rc == 0).then_some(a)
    }
}

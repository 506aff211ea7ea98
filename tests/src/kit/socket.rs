//! Raw sockets for what std does not offer: a socket made before it is bound or connected, so
//! that options (IP_TRANSPARENT, SO_REUSEPORT, IPV6_V6ONLY, SO_MARK, timeouts) can be set first.

use std::{
    mem,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use anyhow::{bail, Result};

use super::sockaddr::std_to_sockaddr;

/// The value of a boolean socket option that turns it on.
const ONE: libc::c_int = 1;

/// A new socket of `kind` in `addr`'s family, closed on exec.
pub(crate) fn new_socket(addr: SocketAddr, kind: libc::c_int) -> Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// setsockopt(2) of a plain value; `what` names the option if it fails.
pub(crate) fn set_opt<T>(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
    what: &str,
) -> Result<()> {
    // SAFETY: the pointer and size describe `value`.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A boolean socket option turned on.
pub(crate) fn turn_on(fd: RawFd, level: libc::c_int, name: libc::c_int, what: &str) -> Result<()> {
    set_opt(fd, level, name, &ONE, what)
}

/// IPV6_V6ONLY for a socket that will be bound to an IPv6 `addr` (so v4 and v6 can share a
/// port); nothing for an IPv4 one.
pub(crate) fn v6_only(fd: RawFd, addr: SocketAddr) -> Result<()> {
    if addr.is_ipv6() {
        turn_on(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, "IPV6_V6ONLY")?;
    }
    Ok(())
}

/// IP_TRANSPARENT (IPV6_TRANSPARENT) on `fd`: listen for or connect from non-local addresses.
pub(crate) fn set_transparent(fd: RawFd, v6: bool) -> Result<()> {
    let (level, name) = if v6 {
        (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
    } else {
        (libc::SOL_IP, libc::IP_TRANSPARENT)
    };
    turn_on(fd, level, name, "IP_TRANSPARENT")
}

/// SO_SNDTIMEO and SO_RCVTIMEO of `timeout`.
pub(crate) fn set_timeouts(fd: RawFd, timeout: std::time::Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    set_opt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv, "SO_SNDTIMEO")?;
    set_opt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv, "SO_RCVTIMEO")
}

/// bind(2) to `addr`.
pub(crate) fn bind_to(fd: RawFd, addr: SocketAddr) -> Result<()> {
    let (ss, len) = std_to_sockaddr(addr);
    // SAFETY: a valid sockaddr of `len` bytes.
    if unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        bail!("bind {addr}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// connect(2) to `addr`: the OS error as it is, for callers that tell refusal from timeout.
pub(crate) fn connect_to(fd: RawFd, addr: SocketAddr) -> std::io::Result<()> {
    let (ss, len) = std_to_sockaddr(addr);
    // SAFETY: valid sockaddr.
    if unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP listener on `addr` (SO_REUSEADDR; IPv6-only for an IPv6 address), transparent
/// (IP_TRANSPARENT) and sharing its port (SO_REUSEPORT) if asked.
pub(crate) fn bind_listener(
    addr: SocketAddr,
    transparent: bool,
    reuseport: bool,
) -> Result<TcpListener> {
    let sock = new_socket(addr, libc::SOCK_STREAM)?;
    let fd = sock.as_raw_fd();
    turn_on(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, "SO_REUSEADDR")?;
    v6_only(fd, addr)?;
    if transparent {
        set_transparent(fd, addr.is_ipv6())?;
    }
    if reuseport {
        turn_on(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, "SO_REUSEPORT")?;
    }
    bind_to(fd, addr)?;
    // SAFETY: bound socket.
    if unsafe { libc::listen(fd, 128) } != 0 {
        bail!("listen: {}", std::io::Error::last_os_error());
    }
    Ok(TcpListener::from(sock))
}

/// Connect to `dst` from `src`; with `mark`, transparently (a non-local `src`) and marked.
pub(crate) fn connect_from(src: IpAddr, dst: SocketAddr, mark: Option<u32>) -> Result<TcpStream> {
    let sock = new_socket(dst, libc::SOCK_STREAM)?;
    let fd = sock.as_raw_fd();
    if let Some(mark) = mark {
        set_transparent(fd, dst.is_ipv6())?;
        set_opt(fd, libc::SOL_SOCKET, libc::SO_MARK, &mark, "SO_MARK")?;
    }
    bind_to(fd, SocketAddr::new(src, 0))?;
    if let Err(e) = connect_to(fd, dst) {
        bail!("connect {dst}: {e}");
    }
    Ok(TcpStream::from(sock))
}

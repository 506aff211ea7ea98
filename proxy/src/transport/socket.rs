//! TCP sockets: the proxy's listeners, and connections out (inbound from the passthrough source).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::RawFd,
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};

use super::Listener;
use crate::config::{Direction, DEFAULT_CONNECT_TIMEOUT_MS};

/// The source of inbound passthrough connections to the app, as Istio's Envoy uses: the
/// capture rules let traffic from these addresses through.
const INBOUND_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
const INBOUND_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// How long a connection to an original destination may take to open (Envoy's default
/// `connect_timeout`; a cluster's endpoints have the cluster's).
pub const ORIG_DST_CONNECT_TIMEOUT: Duration = Duration::from_millis(DEFAULT_CONNECT_TIMEOUT_MS);

/// The listen backlog of the proxy's listeners.
const BACKLOG: u32 = 1024;

/// A TCP socket of `addr`'s family.
fn socket_for(addr: SocketAddr) -> io::Result<TcpSocket> {
    match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
}

/// Bind a listener's address (SO_REUSEADDR, backlog 1024).
pub fn bind(address: SocketAddr) -> io::Result<Listener> {
    Listener::new(listen(address)?)
}

/// A listening socket on `address` (SO_REUSEADDR, backlog 1024) that nothing accepts on yet:
/// connections wait in its backlog.
pub fn listen(address: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket_for(address)?;
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(BACKLOG)?.into_std()
}

/// Set `TCP_NODELAY` on a socket.
pub(super) fn set_nodelay(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: an int-sized option from an int, on a descriptor the caller owns.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "setsockopt(TCP_NODELAY): {}",
            io::Error::last_os_error()
        )))
    }
}

/// The address in a C `sockaddr_in`.
pub(super) fn sockaddr_v4(a: &libc::sockaddr_in) -> SocketAddrV4 {
    let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
    SocketAddrV4::new(ip, u16::from_be(a.sin_port))
}

/// The address in a C `sockaddr_in6`, flow label and scope included.
pub(super) fn sockaddr_v6(a: &libc::sockaddr_in6) -> SocketAddrV6 {
    let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
    SocketAddrV6::new(
        ip,
        u16::from_be(a.sin6_port),
        a.sin6_flowinfo,
        a.sin6_scope_id,
    )
}

/// Connect to `target`, from the inbound passthrough source for inbound traffic, within
/// `timeout`.
pub async fn connect(
    target: SocketAddr,
    direction: Direction,
    timeout: Duration,
) -> io::Result<TcpStream> {
    tokio::time::timeout(timeout, connect_untimed(target, direction))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

async fn connect_untimed(target: SocketAddr, direction: Direction) -> io::Result<TcpStream> {
    let socket = socket_for(target)?;
    match direction {
        Direction::Inbound => socket.bind(SocketAddr::new(inbound_source(target), 0))?,
        Direction::Outbound => {}
    }
    socket.set_nodelay(true)?;
    socket.connect(target).await
}

/// The passthrough source of `target`'s family.
fn inbound_source(target: SocketAddr) -> IpAddr {
    match target {
        SocketAddr::V4(_) => INBOUND_SOURCE_V4.into(),
        SocketAddr::V6(_) => INBOUND_SOURCE_V6.into(),
    }
}

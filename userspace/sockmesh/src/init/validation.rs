//! `--run-validation`: istio-iptables' self-test (its validation mode), so sockmesh can stand in for
//! istio-cni's validation container. Listen on localhost at the outbound and inbound capture
//! ports, dial 127.0.0.6:PROBE (::6 on an IPv6 pod) from 127.0.0.1 (::1) every second, and
//! succeed once a listener reads the probe port back with SO_ORIGINAL_DST.

use std::{
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::mpsc,
    time::{Duration, Instant},
};

/// The original destination port of an accepted connection, as a proxy asks for it.
fn original_port(s: &TcpStream, v6: bool) -> io::Result<u16> {
    // SAFETY: plain data.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let level = if v6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    // SAFETY: ss and len are valid for len bytes.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            level,
            80,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // sin_port and sin6_port sit at the same offset, in network order.
    // SAFETY: ss holds a sockaddr_in or sockaddr_in6.
    let port =
        unsafe { (*(&ss as *const libc::sockaddr_storage as *const libc::sockaddr_in)).sin_port };
    Ok(u16::from_be(port))
}

/// Why the validation probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(
        "no connection to {probe} reached {localhost}:{ports:?} within {timeout:?}: capture is \
         not in force in this pod"
    )]
    NotCaptured {
        probe: SocketAddr,
        localhost: IpAddr,
        ports: [u16; 2],
        timeout: Duration,
    },
}

/// Probe until a listener on `listen_ports` (the capture ports) reads `probe_port` back as a
/// connection's original destination, or `timeout` passes.
pub fn run(
    listen_ports: [u16; 2],
    probe_port: u16,
    timeout: Duration,
    v6: bool,
) -> Result<(), ValidationError> {
    let (localhost, target): (IpAddr, IpAddr) = if v6 {
        (Ipv6Addr::LOCALHOST.into(), Ipv6Addr::from(6u128).into())
    } else {
        (
            Ipv4Addr::LOCALHOST.into(),
            Ipv4Addr::new(127, 0, 0, 6).into(),
        )
    };
    let (tx, rx) = mpsc::channel();
    for port in listen_ports {
        let addr = SocketAddr::new(localhost, port);
        let l =
            TcpListener::bind(addr).map_err(|source| ValidationError::Listen { addr, source })?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                if original_port(&s, v6).is_ok_and(|p| p == probe_port) {
                    let _ = tx.send(port);
                }
            }
        });
    }
    let deadline = Instant::now() + timeout;
    let probe = SocketAddr::new(target, probe_port);
    loop {
        // Dial from localhost, as istio's validator does.
        if let Ok(sock) = bind_and_connect(localhost, probe) {
            drop(sock);
        }
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(_) => return Ok(()),
            Err(_) if Instant::now() >= deadline => {
                return Err(ValidationError::NotCaptured {
                    probe,
                    localhost,
                    ports: listen_ports,
                    timeout,
                })
            }
            Err(_) => {}
        }
    }
}

fn bind_and_connect(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let family = if dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd.
    let stream = unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let (ss, len) = sockaddr(SocketAddr::new(src, 0));
    // SAFETY: ss is a valid sockaddr of len bytes.
    if unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (ss, len) = sockaddr(dst);
    // SAFETY: as above.
    if unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: plain data.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match a {
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

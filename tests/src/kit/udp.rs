//! UDP: the listener that answers each datagram with its name and the sender's address (DNS
//! servers and the DNS proxy of the suites), and the probe's one datagram and its answer.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::{AsRawFd, OwnedFd},
};

use anyhow::Result;

use super::{
    sockaddr::unmap,
    socket::{bind_to, new_socket, v6_only},
    Outcome, UdpMode,
};

/// A UDP socket on `addr` (IPv6-only for IPv6 addresses, so v4 and v6 can share a port).
pub(crate) fn bind(addr: SocketAddr) -> Result<UdpSocket> {
    let sock = new_socket(addr, libc::SOCK_DGRAM)?;
    let fd = sock.as_raw_fd();
    v6_only(fd, addr)?;
    bind_to(fd, addr)?;
    Ok(UdpSocket::from(sock))
}

/// Answer every datagram with the listener's name and the sender's address.
pub(crate) fn serve(sock: UdpSocket, name: String) {
    let mut buf = [0u8; 512];
    loop {
        let Ok((_, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let line = format!("listener={name} orig=udp peer={}\n", unmap(from));
        let _ = sock.send_to(line.as_bytes(), from);
    }
}

/// One UDP query and its answer: where it landed, and the address the answer came from.
pub(crate) fn exchange(sock: OwnedFd, dst: SocketAddr, mode: UdpMode) -> Result<Outcome> {
    let sock = UdpSocket::from(sock);
    let sent = match mode {
        UdpMode::Connected => sock.connect(dst).and_then(|()| sock.send(b"q")),
        UdpMode::Unconnected => sock.send_to(b"q", dst),
    };
    if let Err(e) = sent {
        return Ok(Outcome::Error {
            error: format!("send: {e}"),
        });
    }
    let mut buf = [0u8; 512];
    let (n, from) = match sock.recv_from(&mut buf) {
        Ok(r) => r,
        Err(e) => return Ok(failed_receive(e)),
    };
    // The UDP listener's report has no `other=`: a datagram has no socket options to compare.
    let report = String::from_utf8_lossy(&buf[..n]);
    Ok(Outcome::from_report(&report, unmap(from).to_string()))
}

/// The outcome of a receive that failed.
fn failed_receive(e: std::io::Error) -> Outcome {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Outcome::Timeout,
        std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
        _ => Outcome::Error {
            error: format!("recv: {e}"),
        },
    }
}

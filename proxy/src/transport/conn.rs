//! Accepting without registering: a connection joins tokio's reactor (epoll) only once one of
//! its reads or writes would block.
//!
//! tokio registers every socket it accepts (`epoll_ctl(ADD)`) and removes it when dropped
//! (`epoll_ctl(DEL)`). A client that opens a connection for one request has usually sent that
//! request by the time it is accepted, and the response usually fits in the socket's buffer:
//! read, write and close then never wait, and the two calls (and the readiness event the ADD
//! brings) are pure cost. So an accepted socket is read and written directly while that works;
//! the first read or write that would block registers it, and from then on it is an ordinary
//! tokio `TcpStream`. A read shorter than its buffer is taken to mean the socket is drained, as
//! tokio takes it: the next read registers without trying (no `recvfrom` that returns EAGAIN).
//!
//! hyper's HTTP/1.1 server is set not to read while a request is out only to notice a close
//! (`half_close`, see `http::serve_http1`): that read would register every connection.

use std::{
    io::{self, Write},
    mem,
    net::{Shutdown, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, RawFd},
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::{
    io::{unix::AsyncFd, AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};

use super::socket::{set_nodelay, sockaddr_v4, sockaddr_v6};

/// A listening socket whose accepted connections are [`Conn`]s.
pub struct Listener(AsyncFd<std::net::TcpListener>);

impl Listener {
    /// Take over a bound, listening socket (made non-blocking here). Its connections send
    /// without Nagle's delay, as upstream connections do: `TCP_NODELAY` is set on the
    /// listener, and Linux gives it to every socket accepted from it (no system call per
    /// connection). An HTTP/2 response's frames go out in more than one write; with Nagle's
    /// algorithm the second waited for the client's delayed ACK.
    pub fn new(listener: std::net::TcpListener) -> io::Result<Listener> {
        listener.set_nonblocking(true)?;
        set_nodelay(listener.as_raw_fd())?;
        // SAFETY: the listener owns its descriptor, which stays open as long as it does, and
        // the AsyncFd owns the listener.
        unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
            .map(Listener)
            .map_err(|e| e.into_parts().1)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }

    /// The next connection, and its peer's address.
    pub async fn accept(&self) -> io::Result<(Conn, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            if let Ok(accepted) = ready.try_io(|l| accept4(l.as_raw_fd())) {
                return accepted;
            }
        }
    }
}

/// `accept4(2)`, the new socket non-blocking and close-on-exec.
fn accept4(listener: RawFd) -> io::Result<(Conn, SocketAddr)> {
    // SAFETY: sockaddr_storage is plain data, valid when zeroed; the length passed is its size.
    let mut peer: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of_val(&peer) as libc::socklen_t;
    // SAFETY: `peer` and `len` are valid for writes of the sizes given.
    let fd = unsafe {
        libc::accept4(
            listener,
            (&mut peer as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let socket = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let peer = socket_addr(&peer).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "accept4: peer is not IPv4 or IPv6",
        )
    })?;
    Ok((Conn::new(socket), peer))
}

/// The address in a `sockaddr_storage` that the kernel filled, if it is IPv4 or IPv6.
fn socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is big and
            // aligned enough for.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(sockaddr_v4(a).into())
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(sockaddr_v6(a).into())
        }
        _ => None,
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.0.get_ref().as_raw_fd()
    }
}

/// An accepted connection, used directly until it would block, then through tokio.
pub struct Conn(State);

enum State {
    /// Not registered; `drained` once a read came back short.
    Direct {
        socket: std::net::TcpStream,
        drained: bool,
    },
    Registered(TcpStream),
    /// Registration failed (the error went to the caller then).
    Failed,
}

impl Conn {
    /// A connected, non-blocking socket.
    pub fn new(socket: std::net::TcpStream) -> Conn {
        Conn(State::Direct {
            socket,
            drained: false,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.0 {
            State::Direct { socket, .. } => socket.local_addr(),
            State::Registered(s) => s.local_addr(),
            State::Failed => Err(failed()),
        }
    }

    /// Whether reads and writes now go through tokio's reactor.
    #[cfg(test)]
    fn is_registered(&self) -> bool {
        matches!(self.0, State::Registered(_))
    }

    /// The tokio stream, registering the socket first if it is not yet.
    fn registered(&mut self) -> io::Result<&mut TcpStream> {
        if let State::Direct { .. } = self.0 {
            let State::Direct { socket, .. } = mem::replace(&mut self.0, State::Failed) else {
                unreachable!("matched above");
            };
            self.0 = State::Registered(TcpStream::from_std(socket)?);
        }
        match &mut self.0 {
            State::Registered(s) => Ok(s),
            State::Direct { .. } | State::Failed => Err(failed()),
        }
    }
}

fn failed() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "this connection could not be registered with the reactor",
    )
}

impl AsRawFd for Conn {
    /// -1 once registration failed (the socket is closed then).
    fn as_raw_fd(&self) -> RawFd {
        match &self.0 {
            State::Direct { socket, .. } => socket.as_raw_fd(),
            State::Registered(s) => s.as_raw_fd(),
            State::Failed => -1,
        }
    }
}

/// What a direct attempt came to: done, or the socket must be registered and polled.
fn would_block<T>(r: io::Result<T>) -> Option<io::Result<T>> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
        r => Some(r),
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Direct { socket, drained } = &mut this.0 {
            if !*drained {
                let wanted = buf.remaining();
                if let Some(read) = would_block(recv(socket.as_raw_fd(), buf)) {
                    *drained = read.as_ref().is_ok_and(|&n| n < wanted);
                    return Poll::Ready(read.map(drop));
                }
            }
        }
        Pin::new(this.registered()?).poll_read(cx, buf)
    }
}

/// One `recv(2)` into `buf`'s unfilled part; the bytes read.
fn recv(fd: RawFd, buf: &mut ReadBuf<'_>) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `unfilled.len()` bytes there, never reads them; the
    // ones it wrote are then marked initialized and filled.
    unsafe {
        let unfilled = buf.unfilled_mut();
        let n = libc::recv(fd, unfilled.as_mut_ptr().cast(), unfilled.len(), 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        buf.assume_init(n);
        buf.advance(n);
        Ok(n)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let State::Direct { socket, .. } = &mut this.0 {
            if let Some(written) = would_block(socket.write(data)) {
                return Poll::Ready(written);
            }
        }
        Pin::new(this.registered()?).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let State::Direct { socket, .. } = &mut this.0 {
            if let Some(written) = would_block(socket.write_vectored(bufs)) {
                return Poll::Ready(written);
            }
        }
        Pin::new(this.registered()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.0 {
            State::Direct { socket, .. } => Poll::Ready(socket.shutdown(Shutdown::Write)),
            State::Registered(s) => {
                ready!(Pin::new(s).poll_shutdown(cx))?;
                Poll::Ready(Ok(()))
            }
            State::Failed => Poll::Ready(Err(failed())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv6Addr, SocketAddrV6};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair() -> (Conn, SocketAddr, tokio::net::TcpStream) {
        let l = Listener::new(std::net::TcpListener::bind("127.0.0.1:0").unwrap()).unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (conn, peer) = l.accept().await.unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        (conn, peer, client)
    }

    #[tokio::test]
    async fn accepted_connections_send_without_nagles_delay() {
        let (conn, _, _client) = pair().await;
        // SAFETY: a view of the connection's descriptor, never closed through (ManuallyDrop).
        let view =
            mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(conn.as_raw_fd()) });
        assert!(
            view.nodelay().unwrap(),
            "TCP_NODELAY is not set on the accepted socket"
        );
    }

    #[tokio::test]
    async fn a_request_there_at_accept_is_answered_without_registering() {
        let (mut conn, _, mut client) = pair().await;
        client.write_all(b"ping").await.unwrap();
        // Arrived (loopback): the first read takes it directly, and comes back short.
        let mut buf = [0u8; 64];
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(conn.read(&mut buf).await.unwrap(), 4);
        conn.write_all(b"pong").await.unwrap();
        conn.shutdown().await.unwrap();
        assert!(!conn.is_registered());
        drop(conn);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong");
    }

    #[tokio::test]
    async fn a_read_that_would_wait_registers_and_then_waits() {
        let (mut conn, _, mut client) = pair().await;
        let writer = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            client.write_all(b"late").await.unwrap();
            client
        });
        let mut buf = [0u8; 64];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 4);
        assert!(conn.is_registered());
        let mut client = writer.await.unwrap();
        // Drained after a short read, so the next read waits through the reactor too.
        client.write_all(b"more").await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"more");
    }

    #[tokio::test]
    async fn a_short_read_registers_the_next_read_without_trying() {
        let (mut conn, _, mut client) = pair().await;
        client.write_all(b"one").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut buf = [0u8; 64];
        assert_eq!(conn.read(&mut buf).await.unwrap(), 3);
        assert!(!conn.is_registered());
        let next = tokio::time::timeout(std::time::Duration::from_millis(20), conn.read(&mut buf));
        assert!(next.await.is_err(), "nothing was sent: the read waits");
        assert!(conn.is_registered());
    }

    #[tokio::test]
    async fn a_write_that_would_wait_registers_and_completes_when_read() {
        let (mut conn, _, mut client) = pair().await;
        // More than the socket buffers hold while the client reads nothing.
        let big = vec![7u8; 16 << 20];
        let reader = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let mut all = Vec::new();
            client.read_to_end(&mut all).await.unwrap();
            all.len()
        });
        conn.write_all(&big).await.unwrap();
        assert!(conn.is_registered());
        conn.shutdown().await.unwrap();
        drop(conn);
        assert_eq!(reader.await.unwrap(), big.len());
    }

    #[test]
    fn ipv6_peers_keep_their_scope() {
        // SAFETY: plain data, valid when zeroed.
        let mut s: libc::sockaddr_storage = unsafe { mem::zeroed() };
        // SAFETY: sockaddr_storage is big and aligned enough for sockaddr_in6.
        let a =
            unsafe { &mut *(&mut s as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
        a.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        a.sin6_port = 8080u16.to_be();
        a.sin6_addr.s6_addr = Ipv6Addr::LOCALHOST.octets();
        a.sin6_scope_id = 3;
        let want = SocketAddrV6::new(Ipv6Addr::LOCALHOST, 8080, 0, 3);
        assert_eq!(socket_addr(&s), Some(want.into()));
        s.ss_family = libc::AF_UNIX as libc::sa_family_t;
        assert_eq!(socket_addr(&s), None);
    }
}

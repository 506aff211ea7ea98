//! Hot restart: a new proxy takes the running one's listening sockets, so no connection is
//! refused or reset while one replaces the other.
//!
//! Both are started with the same `--hot-restart PATH`. The new one connects to PATH, where the
//! running one answers with every listening socket it has (SCM_RIGHTS) and their addresses.
//! The new one serves on those very sockets (their accept queues go on: nothing is lost), says
//! so with one byte, then takes PATH over for its own successor. The old one stops accepting,
//! lets the connections it has finish (`--drain-timeout`), and exits.

use std::{
    collections::HashMap,
    io::{self, Write},
    net::{SocketAddr, TcpListener},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::Path,
    time::Duration,
};

use tokio::{io::AsyncReadExt, io::Interest, net::UnixListener};

/// The most listening sockets one hand-over carries.
const MAX_FDS: usize = 64;

/// The running proxy's listening sockets, taken over: by address.
pub type Inherited = HashMap<SocketAddr, TcpListener>;

/// Ask the proxy serving `path` for its listening sockets. None when no proxy serves it (a
/// first start); then `path` is free for this one.
pub fn take_over(path: &Path) -> io::Result<Option<(Inherited, UnixStream)>> {
    let mut s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"?")?;
    let (text, fds) = recv_with_fds(&s)?;
    let addrs: Vec<SocketAddr> = text
        .lines()
        .map(|l| l.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("hand-over: {e}")))?;
    if addrs.len() != fds.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "hand-over: {} addresses, {} sockets",
                addrs.len(),
                fds.len()
            ),
        ));
    }
    let inherited = addrs
        .into_iter()
        .zip(fds)
        .map(|(a, fd)| (a, TcpListener::from(fd)))
        .collect();
    Ok(Some((inherited, s)))
}

/// Tell the old proxy that this one serves now.
pub fn taken(mut old: UnixStream) -> io::Result<()> {
    old.write_all(b"!")
}

/// Take `path` for this proxy's own successor (a predecessor that served it has been
/// answered already, on its own connection). Within a tokio runtime.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

/// Serve a successor on `l`: hand it the listening sockets `current` gives (called once one
/// asks) and return once it has taken over. A task on the proxy's runtime, not a thread of its
/// own: the proxy keeps to one thread (see `--workers`).
pub async fn wait_for_successor(
    l: &UnixListener,
    current: impl Fn() -> Vec<(SocketAddr, RawFd)>,
) -> io::Result<()> {
    loop {
        let (mut s, _) = l.accept().await?;
        let mut ask = [0u8; 1];
        if s.read_exact(&mut ask).await.is_err() || ask != *b"?" {
            continue;
        }
        let list = current();
        let text: String = list.iter().map(|(a, _)| format!("{a}\n")).collect();
        let fds: Vec<RawFd> = list.iter().map(|(_, fd)| *fd).collect();
        s.async_io(Interest::WRITABLE, || {
            send_with_fds(&s, text.as_bytes(), &fds)
        })
        .await?;
        let mut done = [0u8; 1];
        if s.read_exact(&mut done).await.is_ok() && done == *b"!" {
            // The successor binds the path anew for its own successor.
            return Ok(());
        }
    }
}

/// Send `bytes` with `fds` attached.
fn send_with_fds(s: &impl AsRawFd, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::other(format!("more than {MAX_FDS} listeners")));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of_val(fds) as u32) } as usize;
    let mut control = vec![0u8; space.max(1)];
    // SAFETY: msghdr of plain data, pointing at buffers that outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer has room for one header and the fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of_val(fds) as u32) as usize;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(c),
                std::mem::size_of_val(fds),
            );
        }
    }
    // SAFETY: a valid socket and message.
    if unsafe { libc::sendmsg(s.as_raw_fd(), &msg, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receive one message and the fds attached to it.
fn recv_with_fds(s: &UnixStream) -> io::Result<(String, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u8; space as usize];
    // SAFETY: msghdr of plain data, pointing at buffers that outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    // SAFETY: a valid socket and message; received fds are closed on exec.
    let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    buf.truncate(n as usize);
    Ok((String::from_utf8_lossy(&buf).into_owned(), fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-over between two ends in this process: the socket that comes out is the one that
    /// went in (a connection made to it before is accepted from it after).
    #[tokio::test]
    async fn listeners_are_handed_over_with_their_queues() {
        let dir =
            std::env::temp_dir().join(format!("sockmesh-proxy-restart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("restart.sock");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let fd = l.as_raw_fd();
        let ul = bind(&path).unwrap();
        let server =
            tokio::spawn(async move { wait_for_successor(&ul, || vec![(addr, fd)]).await });
        // Queued before the hand-over.
        let _early = std::net::TcpStream::connect(addr).unwrap();
        // The successor's side blocks: off the runtime, which serves the running side.
        let asked = path.clone();
        let (inherited, old) = tokio::task::spawn_blocking(move || take_over(&asked))
            .await
            .unwrap()
            .unwrap()
            .expect("a proxy serves the path");
        taken(old).unwrap();
        server.await.unwrap().unwrap();
        drop(l);
        let got = &inherited[&addr];
        got.set_nonblocking(false).unwrap();
        let (_conn, _) = got.accept().unwrap();
        assert!(take_over(&dir.join("none.sock")).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

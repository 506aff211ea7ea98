//! The agent's registration API: gRPC (`proto/sockmesh/v1/agent.proto`) on the agent's Unix
//! socket, shared by the agent, `init`, the CNI plugin and the tests.
//!
//! Identity is the caller's network namespace, passed as a file descriptor, never named in a
//! message: before HTTP/2 starts, the client sends one preamble byte ([`PREAMBLE`]) with
//! `SCM_RIGHTS` carrying the fd of its namespace (or no fd, for node-wide calls such as
//! `List`). The agent derives the netns cookie from that fd, so a caller can only register,
//! change or remove a namespace it can open. Every RPC of a connection acts on the namespace of
//! its preamble.

use std::{
    io,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    sync::Arc,
};

pub mod pb {
    //! The generated messages, client and server.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sockmesh.v1");
}

/// A client of the agent.
pub type Client = pb::agent_client::AgentClient<tonic::transport::Channel>;

/// The preamble byte of protocol version 1.
pub const PREAMBLE: u8 = 0x01;

/// Most file descriptors [`recv_preamble`] takes in (and closes) so that extra ones are not
/// leaked; more than one is refused.
const FDS_RECEIVED: usize = 4;

/// Why a client could not reach the agent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("copying the network namespace's file descriptor: {0}")]
    DupNetns(#[source] io::Error),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Send the preamble `byte` on `stream` with `fds` attached (`SCM_RIGHTS`). A caller sends
/// [`PREAMBLE`] and its netns, or nothing for node-wide calls; the tests send anything.
pub fn send_preamble(stream: &UnixStream, byte: u8, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let raw: Vec<libc::c_int> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let data = [byte];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let payload = std::mem::size_of_val(raw.as_slice()) as u32;
    // SAFETY: pure computation.
    let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the buffer holds one header with `payload` bytes of data.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(c),
                payload as usize,
            );
        }
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    match unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) } {
        1 => Ok(()),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::other("preamble not sent")),
    }
}

/// What a connection's first read brought: the preamble byte (`None`: closed before it) and
/// the file descriptor that came with it.
#[derive(Debug)]
pub struct Preamble {
    pub byte: Option<u8>,
    pub fd: Option<OwnedFd>,
}

/// Read the preamble byte and the fd that came with it from `sock` (non-blocking: `WouldBlock`
/// until it has arrived). More than one fd is refused.
pub fn recv_preamble(sock: BorrowedFd<'_>) -> io::Result<Preamble> {
    let mut byte = [0u8; 1];
    let mut fds = Vec::new();
    // SAFETY: pure computation.
    let space =
        unsafe { libc::CMSG_SPACE((FDS_RECEIVED * std::mem::size_of::<libc::c_int>()) as u32) }
            as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: buffers outlive the call.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: walk the control messages the kernel wrote; each fd is owned from here on.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if fds.len() > 1 || msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "several file descriptors came with the preamble: send one, the network namespace",
        ));
    }
    Ok(Preamble {
        byte: (n == 1).then_some(byte[0]),
        fd: fds.pop(),
    })
}

/// A client of the agent at `sock`, speaking for the network namespace `netns` (none for
/// node-wide calls).
pub async fn connect(sock: &Path, netns: Option<BorrowedFd<'_>>) -> Result<Client, ConnectError> {
    let fds = match netns {
        Some(fd) => vec![fd.try_clone_to_owned().map_err(ConnectError::DupNetns)?],
        None => Vec::new(),
    };
    connect_with(sock, PREAMBLE, fds).await
}

/// A client whose connections start with the preamble `byte` and `fds`. The connector may be
/// called again on reconnect, so it keeps the fds for the client's life.
pub async fn connect_with(
    sock: &Path,
    byte: u8,
    fds: Vec<OwnedFd>,
) -> Result<Client, ConnectError> {
    let sock: PathBuf = sock.to_owned();
    let fds = Arc::new(fds);
    // The URI is required by the builder and ignored by the connector.
    let channel = tonic::transport::Endpoint::from_static("http://sockmesh-agent")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let (sock, fds) = (sock.clone(), fds.clone());
            async move {
                let stream = UnixStream::connect(&sock)?;
                let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                send_preamble(&stream, byte, &borrowed)?;
                stream.set_nonblocking(true)?;
                let io = tokio::net::UnixStream::from_std(stream)?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(io))
            }
        }))
        .await?;
    Ok(pb::agent_client::AgentClient::new(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preamble_carries_its_byte_and_one_fd() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        send_preamble(&a, PREAMBLE, &[file.as_fd()]).unwrap();
        let p = recv_preamble(b.as_fd()).unwrap();
        assert_eq!(p.byte, Some(PREAMBLE));
        assert!(p.fd.is_some());
    }

    #[test]
    fn several_fds_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let file = std::fs::File::open("/proc/self/ns/net").unwrap();
        send_preamble(&a, PREAMBLE, &[file.as_fd(), file.as_fd()]).unwrap();
        let e = recv_preamble(b.as_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_closed_connection_has_no_byte() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        let p = recv_preamble(b.as_fd()).unwrap();
        assert_eq!(p.byte, None);
        assert!(p.fd.is_none());
    }
}

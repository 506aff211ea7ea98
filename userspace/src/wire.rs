//! The registration API on the agent's Unix socket.
//!
//! One request per connection: a JSON object ended by a newline, sent with the caller's network
//! namespace as an `SCM_RIGHTS` file descriptor. The namespace is the pod identity: a caller can
//! only name a namespace it can open, and the agent derives the cookie from the fd itself, so no
//! cookie or path in the request is trusted. The answer is one JSON line.

use std::{
    io::{self, Read, Write},
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::net::UnixStream,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::spec::PodSpec;

/// Largest request accepted.
pub const MAX_REQUEST: usize = 256 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Capture the namespace passed along with these settings (replacing earlier ones).
    Register { spec: Box<PodSpec> },
    /// Stop capturing the namespace passed along.
    Unregister,
    /// Is the agent up, and is the namespace passed along (if any) registered?
    Status,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_cookie: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered: Option<bool>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            netns_cookie: None,
            registered: None,
            message: message.into(),
        }
    }
}

/// Send `req` with `fd` attached, and read the answer.
pub fn call(
    sock: &std::path::Path,
    req: &Request,
    fd: Option<BorrowedFd<'_>>,
    timeout: Duration,
) -> io::Result<Response> {
    let stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut body = serde_json::to_vec(req).map_err(io::Error::other)?;
    body.push(b'\n');
    send_with_fd(&stream, &body, fd)?;
    let mut answer = Vec::new();
    (&stream)
        .take(MAX_REQUEST as u64)
        .read_to_end(&mut answer)?;
    serde_json::from_slice(&answer).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the agent's answer is not valid: {e}"),
        )
    })
}

fn send_with_fd(stream: &UnixStream, body: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: body.as_ptr() as *mut libc::c_void,
        iov_len: body.len(),
    };
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    // SAFETY: msghdr is plain data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: the control buffer is CMSG_SPACE(sizeof(int)) bytes, enough for one header.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd.as_raw_fd());
        }
    }
    // SAFETY: msg points at valid iov and control buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if n < body.len() {
        (&*stream).write_all(&body[n..])?;
    }
    Ok(())
}

/// Read one request (up to its newline) and the fd that came with its first bytes, if any.
pub fn receive(stream: &UnixStream) -> io::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut body = Vec::new();
    let mut fd = None;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Room for a few fds so that extra ones are received (and closed) rather than leaked.
        // SAFETY: pure computation.
        let space =
            unsafe { libc::CMSG_SPACE((4 * std::mem::size_of::<libc::c_int>()) as u32) } as usize;
        let mut cbuf = vec![0u8; space];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: plain data.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: buffers outlive the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: walk the control messages the kernel wrote.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                    let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<libc::c_int>();
                    for i in 0..count {
                        let raw = std::ptr::read_unaligned(data.add(i));
                        let owned = OwnedFd::from_raw_fd(raw);
                        if fd.is_none() {
                            fd = Some(owned);
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n as usize]);
        if body.len() > MAX_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request larger than {MAX_REQUEST} bytes"),
            ));
        }
        if body.contains(&b'\n') {
            break;
        }
    }
    Ok((body, fd))
}

pub fn answer(mut stream: &UnixStream, resp: &Response) -> io::Result<()> {
    let mut body = serde_json::to_vec(resp).map_err(io::Error::other)?;
    body.push(b'\n');
    stream.write_all(&body)
}

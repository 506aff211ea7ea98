//! A client of the agent's registration API written from the protocol's description (one
//! preamble byte with the caller's netns as an `SCM_RIGHTS` fd, then gRPC), with the knobs an
//! attacker would turn: no fd, another fd, several fds, another preamble, raw bytes.

use std::{
    io::Write,
    os::{
        fd::{AsRawFd, BorrowedFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
};

use anyhow::{bail, Result};

pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sockmesh.v1");
}

pub type Client = pb::agent_client::AgentClient<tonic::transport::Channel>;

/// Protocol version 1's preamble byte.
pub const PREAMBLE: u8 = 0x01;

/// Send `byte` with `fds` attached.
pub fn send_with_fds(stream: &UnixStream, byte: u8, fds: &[BorrowedFd<'_>]) -> Result<()> {
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
    // SAFETY: msg points at live buffers.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n != 1 {
        bail!("sendmsg: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// A gRPC client whose connection starts with `byte` and `fds`.
pub async fn client(sock: &Path, byte: u8, fds: Vec<std::os::fd::OwnedFd>) -> Result<Client> {
    let sock: PathBuf = sock.to_owned();
    let fds = std::sync::Arc::new(fds);
    let channel = tonic::transport::Endpoint::from_static("http://agent")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let (sock, fds) = (sock.clone(), fds.clone());
            async move {
                let s = UnixStream::connect(&sock)?;
                let borrowed: Vec<_> = fds
                    .iter()
                    .map(|f| {
                        use std::os::fd::AsFd;
                        f.as_fd()
                    })
                    .collect();
                send_with_fds(&s, byte, &borrowed).map_err(std::io::Error::other)?;
                s.set_nonblocking(true)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::from_std(s)?,
                ))
            }
        }))
        .await?;
    Ok(pb::agent_client::AgentClient::new(channel))
}

/// A client speaking for the network namespace at `netns` (a /var/run/netns path or
/// /proc/PID/ns/net).
pub async fn pod_client(sock: &Path, netns: &Path) -> Result<Client> {
    client(sock, PREAMBLE, vec![std::fs::File::open(netns)?.into()]).await
}

/// Connect and write `bytes` as they are, then read what comes back until the agent closes or
/// a second passes.
pub fn raw(sock: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Ok(out)
}

/// The settings `sockmesh init istio` sends for istio's default sidecar argv
/// (`-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020`).
pub fn default_settings() -> pb::PodSettings {
    use sockmesh_common::{flags, MemberKind};
    pb::PodSettings {
        flags: flags::OUTBOUND_ALL | flags::INBOUND_ALL,
        outbound_port: 15001,
        inbound_port: 15006,
        tunnel_port: 15008,
        uids: vec![1337],
        gids: vec![1337],
        loopback_v4: vec![127, 0, 0, 6],
        loopback_v4_prefix: 32,
        members: [15090, 15021, 15020]
            .into_iter()
            .map(|p| pb::Member {
                kind: MemberKind::InboundExcludePort as u32,
                value: p,
            })
            .collect(),
        ..Default::default()
    }
}

/// Raise this process's open-file limit to its hard limit (for many concurrent clients).
pub fn raise_nofile() -> Result<u64> {
    // SAFETY: plain data in and out.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        r.rlim_cur = r.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
        Ok(r.rlim_cur)
    }
}

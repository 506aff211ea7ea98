//! The registration API: gRPC (`proto/sockmesh/v1/agent.proto`) on the agent's Unix socket.
//!
//! Identity is the caller's network namespace, passed as a file descriptor, never named in a
//! message: before HTTP/2 starts, the client sends one preamble byte with `SCM_RIGHTS` carrying
//! the fd of its namespace (or no fd, for node-wide calls such as `List`). The agent derives the
//! netns cookie from that fd, so a caller can only register, change or remove a namespace it
//! can open. Every RPC of a connection acts on the namespace of its preamble.

use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use sockmesh_common::{CidrKind, MemberKind, PodConfig, MAX_OWNERS};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::UnixStream,
};

use crate::spec::{Cidr, PodSpec};

pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sockmesh.v1");
}

/// The preamble byte of protocol version 1.
pub const PREAMBLE: u8 = 0x01;

/// What a connection's preamble established: the caller's namespace (if it sent one) and who
/// the peer is, for logs.
#[derive(Clone, Debug)]
pub struct Caller {
    pub netns: Option<Arc<OwnedFd>>,
    pub peer: String,
}

/// An accepted connection whose preamble has been read.
pub struct PodStream {
    io: UnixStream,
    caller: Caller,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for PodStream {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for PodStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PodStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Most connections served at once; further callers wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 4096;
/// Time a caller has to send its preamble.
pub const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Accept connections on `listener`, read each preamble (without holding up the others), and
/// yield the connections that sent a valid one. Bad preambles are logged and closed.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<PodStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let io = match listener.accept().await {
                Ok((io, _)) => io,
                Err(e) => {
                    // EMFILE and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let peer = peer_of(&io);
                match tokio::time::timeout(PREAMBLE_TIMEOUT, read_preamble(&io)).await {
                    Ok(Ok(netns)) => {
                        let caller = Caller {
                            netns: netns.map(Arc::new),
                            peer,
                        };
                        let _ = tx
                            .send(Ok(PodStream {
                                io,
                                caller,
                                _permit: permit,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::warn!(peer, error = %e, "connection refused"),
                    Err(_) => tracing::warn!(peer, "connection refused: no preamble in time"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn peer_of(io: &UnixStream) -> String {
    // SAFETY: the fd is owned by `io`, which outlives the borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(io.as_raw_fd()) };
    crate::sys::peer_cred(fd)
        .map(|c| format!("pid={} uid={} gid={}", c.pid, c.uid, c.gid))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Read the one preamble byte and the fd that came with it (at most one).
async fn read_preamble(io: &UnixStream) -> io::Result<Option<OwnedFd>> {
    let (byte, fd) = io
        .async_io(Interest::READABLE, || recv_with_fd(io.as_raw_fd()))
        .await?;
    match byte {
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before the preamble",
        )),
        Some(PREAMBLE) => Ok(fd),
        Some(b) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "preamble byte {b:#04x} is not sockmesh's ({PREAMBLE:#04x}): speak the sockmesh \
                 registration protocol (sockmesh init, or api::connect)"
            ),
        )),
    }
}

fn recv_with_fd(raw: libc::c_int) -> io::Result<(Option<u8>, Option<OwnedFd>)> {
    let mut byte = [0u8; 1];
    let mut fds = Vec::new();
    // Room for a few fds so that extra ones are received (and closed) rather than leaked.
    // SAFETY: pure computation.
    let space =
        unsafe { libc::CMSG_SPACE((4 * std::mem::size_of::<libc::c_int>()) as u32) } as usize;
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
    let n = unsafe { libc::recvmsg(raw, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
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
    Ok(((n == 1).then_some(byte[0]), fds.pop()))
}

fn send_preamble(
    stream: &std::os::unix::net::UnixStream,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let byte = [PREAMBLE];
    let mut iov = libc::iovec {
        iov_base: byte.as_ptr() as *mut libc::c_void,
        iov_len: 1,
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
    match n {
        1 => Ok(()),
        n if n < 0 => Err(io::Error::last_os_error()),
        _ => Err(io::Error::other("preamble not sent")),
    }
}

/// A client of the agent at `sock`, speaking for the network namespace `netns` (none for
/// node-wide calls).
pub async fn connect(
    sock: &Path,
    netns: Option<BorrowedFd<'_>>,
) -> Result<
    pb::agent_client::AgentClient<tonic::transport::Channel>,
    Box<dyn std::error::Error + Send + Sync>,
> {
    let sock: PathBuf = sock.to_owned();
    // The connector may be called again on reconnect: it needs its own copy of the fd.
    let netns = netns.map(|fd| fd.try_clone_to_owned()).transpose()?;
    let netns = Arc::new(netns);
    // The URI is required by the builder and ignored by the connector.
    let channel = tonic::transport::Endpoint::from_static("http://sockmesh-agent")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let sock = sock.clone();
            let netns = netns.clone();
            async move {
                let std_stream = std::os::unix::net::UnixStream::connect(&sock)?;
                send_preamble(
                    &std_stream,
                    netns.as_ref().as_ref().map(|f| {
                        use std::os::fd::AsFd;
                        f.as_fd()
                    }),
                )?;
                std_stream.set_nonblocking(true)?;
                let io = UnixStream::from_std(std_stream)?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(io))
            }
        }))
        .await?;
    Ok(pb::agent_client::AgentClient::new(channel))
}

impl From<&PodSpec> for pb::PodSettings {
    fn from(s: &PodSpec) -> Self {
        let c = &s.config;
        pb::PodSettings {
            flags: c.flags,
            outbound_port: c.outbound_port.into(),
            inbound_port: c.inbound_port.into(),
            tunnel_port: c.tunnel_port.into(),
            uids: c.uids[..(c.n_uids as usize).min(MAX_OWNERS)].to_vec(),
            gids: c.gids[..(c.n_gids as usize).min(MAX_OWNERS)].to_vec(),
            loopback_v4: c.loopback_v4.to_vec(),
            loopback_v4_prefix: c.loopback_v4_prefix.into(),
            tproxy_mark: c.tproxy_mark,
            tproxy_table: c.tproxy_table,
            members: s
                .members
                .iter()
                .map(|(k, v)| pb::Member {
                    kind: *k as u32,
                    value: *v,
                })
                .collect(),
            prefixes: s
                .cidrs
                .iter()
                .map(|(k, c)| pb::Prefix {
                    kind: *k as u32,
                    cidr: c.to_string(),
                })
                .collect(),
            port_ranges: s
                .ranges
                .iter()
                .map(|(k, a, b)| pb::PortRange {
                    kind: *k as u32,
                    first: (*a).into(),
                    last: (*b).into(),
                })
                .collect(),
            exclude_interfaces: s.exclude_ifaces.clone(),
            kube_virt_interfaces: s.kube_virt_ifaces.clone(),
        }
    }
}

/// Most entries of each repeated field accepted (a pod's lists are far shorter).
pub const MAX_ENTRIES: usize = 65536;

fn port(field: &str, v: u32) -> Result<u16, String> {
    u16::try_from(v).map_err(|_| format!("{field}: {v} is not a port (0-65535)"))
}

/// The settings of a request as a [`PodSpec`]; structural problems are named by field. The
/// meaning is checked afterwards by [`PodSpec::validate`].
impl TryFrom<pb::PodSettings> for PodSpec {
    type Error = String;

    fn try_from(s: pb::PodSettings) -> Result<Self, String> {
        if s.uids.len() > MAX_OWNERS || s.gids.len() > MAX_OWNERS {
            return Err(format!("uids, gids: at most {MAX_OWNERS} of each"));
        }
        for (name, len) in [
            ("members", s.members.len()),
            ("prefixes", s.prefixes.len()),
            ("port_ranges", s.port_ranges.len()),
            ("exclude_interfaces", s.exclude_interfaces.len()),
            ("kube_virt_interfaces", s.kube_virt_interfaces.len()),
        ] {
            if len > MAX_ENTRIES {
                return Err(format!("{name}: {len} entries, at most {MAX_ENTRIES}"));
            }
        }
        let loopback_v4: [u8; 4] = s.loopback_v4.as_slice().try_into().map_err(|_| {
            format!(
                "loopback_v4: {} bytes, want the 4 bytes of an IPv4 address",
                s.loopback_v4.len()
            )
        })?;
        let mut uids = [0; MAX_OWNERS];
        uids[..s.uids.len()].copy_from_slice(&s.uids);
        let mut gids = [0; MAX_OWNERS];
        gids[..s.gids.len()].copy_from_slice(&s.gids);
        let config = PodConfig {
            flags: s.flags,
            outbound_port: port("outbound_port", s.outbound_port)?,
            inbound_port: port("inbound_port", s.inbound_port)?,
            tunnel_port: port("tunnel_port", s.tunnel_port)?,
            loopback_v4_prefix: u8::try_from(s.loopback_v4_prefix)
                .map_err(|_| format!("loopback_v4_prefix: {} is not 0-32", s.loopback_v4_prefix))?,
            n_uids: s.uids.len() as u8,
            n_gids: s.gids.len() as u8,
            _pad: [0; 3],
            loopback_v4,
            uids,
            gids,
            src_v4: [0; 4],
            src_v6: [0; 16],
            tproxy_mark: s.tproxy_mark,
            tproxy_table: s.tproxy_table,
        };
        let members = s
            .members
            .iter()
            .map(|m| {
                MemberKind::from_u32(m.kind)
                    .map(|k| (k, m.value))
                    .ok_or_else(|| format!("members: unknown kind {}", m.kind))
            })
            .collect::<Result<_, _>>()?;
        let cidrs = s
            .prefixes
            .iter()
            .map(|p| {
                let kind = CidrKind::from_u32(p.kind)
                    .ok_or_else(|| format!("prefixes: unknown kind {}", p.kind))?;
                Ok((kind, parse_cidr(&p.cidr)?))
            })
            .collect::<Result<_, String>>()?;
        let ranges = s
            .port_ranges
            .iter()
            .map(|r| {
                let kind = CidrKind::from_u32(r.kind)
                    .ok_or_else(|| format!("port_ranges: unknown kind {}", r.kind))?;
                let (first, last) = (port("port_ranges", r.first)?, port("port_ranges", r.last)?);
                if first > last {
                    return Err(format!("port_ranges: {first}-{last} is empty"));
                }
                Ok((kind, first, last))
            })
            .collect::<Result<_, String>>()?;
        Ok(PodSpec {
            config,
            members,
            cidrs,
            ranges,
            exclude_ifaces: s.exclude_interfaces,
            kube_virt_ifaces: s.kube_virt_interfaces,
            routes: Vec::new(),
            route_sources: Vec::new(),
        })
    }
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let bad = || format!("prefixes: {s:?} is not an address/prefix-length");
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if len > if addr.is_ipv6() { 128 } else { 32 } {
        return Err(bad());
    }
    Ok(Cidr::new(addr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rich_spec() -> PodSpec {
        crate::istio::tests::spec(
            &[
                "-p",
                "15001",
                "-z",
                "15006",
                "-u",
                "1337",
                "-g",
                "1337",
                "-i",
                "10.0.0.0/8,fd00::/8",
                "-x",
                "10.1.0.0/16",
                "-b",
                "*",
                "-d",
                "15090,15021",
                "-o",
                "9000",
                "-q",
                "7000",
                "-c",
                "eth9",
                "-k",
                "eth8",
            ],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS", "1,2")],
        )
        .unwrap()
    }

    #[test]
    fn settings_round_trip() {
        let spec = rich_spec();
        assert!(!spec.cidrs.is_empty() && !spec.members.is_empty());
        let back = PodSpec::try_from(pb::PodSettings::from(&spec)).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn structural_errors_name_the_field() {
        let spec = rich_spec();
        let mut s = pb::PodSettings::from(&spec);
        s.outbound_port = 70000;
        assert!(PodSpec::try_from(s).unwrap_err().contains("outbound_port"));
        let mut s = pb::PodSettings::from(&spec);
        s.loopback_v4 = vec![127];
        assert!(PodSpec::try_from(s).unwrap_err().contains("loopback_v4"));
        let mut s = pb::PodSettings::from(&spec);
        s.members.push(pb::Member { kind: 99, value: 1 });
        assert!(PodSpec::try_from(s).unwrap_err().contains("members"));
        let mut s = pb::PodSettings::from(&spec);
        s.prefixes.push(pb::Prefix {
            kind: CidrKind::ExcludeV4 as u32,
            cidr: "10.0.0.0/33".into(),
        });
        assert!(PodSpec::try_from(s).unwrap_err().contains("10.0.0.0/33"));
        let mut s = pb::PodSettings::from(&spec);
        s.uids = vec![1; MAX_OWNERS + 1];
        assert!(PodSpec::try_from(s).unwrap_err().contains("uids"));
    }
}

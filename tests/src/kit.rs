//! The test programs run inside lab namespaces: listeners that report what a proxy would see
//! (which listener accepted, SO_ORIGINAL_DST, the peer), and a client that connects with given
//! credentials and reports where it landed.

use std::{
    io::{Read, Write},
    mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// What a connection attempt observed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// Accepted by `listener`, which read `orig` with SO_ORIGINAL_DST (or an error name) and
    /// saw the client at `client_ip`; the client's getpeername() said `peername`. `other`
    /// holds getsockopt answers that capture must not change (see `other_sockopts`).
    Ok {
        listener: String,
        orig: String,
        peername: String,
        client_ip: String,
        other: String,
    },
    Refused,
    Timeout,
    Error {
        error: String,
    },
}

fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: family is AF_INET.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: family is AF_INET6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

fn std_to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: plain data.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
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

/// SO_ORIGINAL_DST the way Envoy asks: SOL_IP for IPv4 flows (v4 sockets, and v6 sockets whose
/// peer is v4-mapped), SOL_IPV6 for IPv6 flows.
pub fn original_dst(fd: RawFd, peer: SocketAddr) -> Result<SocketAddr, String> {
    let level = match peer {
        SocketAddr::V4(_) => libc::SOL_IP,
        SocketAddr::V6(a) if a.ip().to_ipv4_mapped().is_some() => libc::SOL_IP,
        SocketAddr::V6(_) => libc::SOL_IPV6,
    };
    // SAFETY: plain data.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: ss/len are valid for the advertised size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            level,
            80,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(format!("errno:{}", e.raw_os_error().unwrap_or(0)));
    }
    sockaddr_to_std(&ss).ok_or_else(|| "bad family".to_string())
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        a => a,
    }
}

/// getsockopt results a capture must leave alone, as one token: option 80 at the level that
/// does not match the flow, option 80 at SOL_TCP, SO_ORIGINAL_DST with a short buffer, SO_TYPE,
/// and the TTL / hop limit.
pub fn other_sockopts(fd: RawFd, peer: SocketAddr) -> String {
    let v4_flow = match peer {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let (wrong_level, own_level) = if v4_flow {
        (libc::SOL_IPV6, libc::SOL_IP)
    } else {
        (libc::SOL_IP, libc::SOL_IPV6)
    };
    let is_v6_socket = matches!(peer, SocketAddr::V6(_));
    let ttl = if is_v6_socket {
        (libc::SOL_IPV6, libc::IPV6_UNICAST_HOPS, 4)
    } else {
        (libc::SOL_IP, libc::IP_TTL, 4)
    };
    let queries = [
        (wrong_level, 80, 128),
        (libc::SOL_TCP, 80, 128),
        (own_level, 80, 8),
        (libc::SOL_SOCKET, libc::SO_TYPE, 4),
        ttl,
    ];
    let mut out = Vec::new();
    for (level, name, len) in queries {
        let mut buf = [0u8; 128];
        let mut l = len as libc::socklen_t;
        // SAFETY: buf is 128 bytes and l <= 128.
        let rc = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &mut l) };
        if rc == 0 {
            let n = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            out.push(format!("{level}/{name}:len{l}:{n}"));
        } else {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            out.push(format!("{level}/{name}:errno{e}"));
        }
    }
    out.join(",")
}

/// Serve `name@addr:port` listeners until killed; prints "ready" once all are bound. Name
/// prefixes: `udp/` (a UDP socket), `t/` (IP_TRANSPARENT), `r/` (SO_REUSEPORT), `b/` (the
/// benchmark's lean listener, see `serve_lean`).
pub fn listen(specs: &[String]) -> Result<()> {
    let mut threads = Vec::new();
    for spec in specs {
        let (name, addr) = spec
            .split_once('@')
            .with_context(|| format!("listener spec {spec}: want name@addr:port"))?;
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("listener spec {spec}"))?;
        if let Some(name) = name.strip_prefix("udp/") {
            let sock = bind_udp(addr).with_context(|| format!("binding udp {addr}"))?;
            let name = name.to_string();
            threads.push(std::thread::spawn(move || serve_udp(sock, name)));
            continue;
        }
        let (name, transparent) = match name.strip_prefix("t/") {
            Some(n) => (n, true),
            None => (name, false),
        };
        let (name, reuseport) = match name.strip_prefix("r/") {
            Some(n) => (n, true),
            None => (name, false),
        };
        let (name, lean) = match name.strip_prefix("b/") {
            Some(n) => (n, true),
            None => (name, false),
        };
        let listener = bind_listener(addr, transparent, reuseport)
            .with_context(|| format!("binding {addr}"))?;
        let name = name.to_string();
        if lean {
            threads.push(std::thread::spawn(move || serve_lean(listener, name)));
        } else {
            threads.push(std::thread::spawn(move || serve(listener, name)));
        }
    }
    println!("ready");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// A UDP socket on `addr` (IPv6-only for IPv6 addresses, so v4 and v6 can share a port).
fn bind_udp(addr: SocketAddr) -> Result<UdpSocket> {
    let sock = new_socket(addr, libc::SOCK_DGRAM)?;
    let fd = sock.as_raw_fd();
    v6_only(fd, addr)?;
    bind_to(fd, addr)?;
    Ok(UdpSocket::from(sock))
}

/// A new socket of `kind` in `addr`'s family, closed on exec.
fn new_socket(addr: SocketAddr, kind: libc::c_int) -> Result<OwnedFd> {
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

/// The value of a boolean socket option that turns it on.
const ONE: libc::c_int = 1;

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

/// IPV6_V6ONLY for a socket that will be bound to an IPv6 `addr` (so v4 and v6 can share a
/// port); nothing for an IPv4 one.
fn v6_only(fd: RawFd, addr: SocketAddr) -> Result<()> {
    if addr.is_ipv6() {
        set_opt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            &ONE,
            "IPV6_V6ONLY",
        )?;
    }
    Ok(())
}

/// bind(2) to `addr`.
fn bind_to(fd: RawFd, addr: SocketAddr) -> Result<()> {
    let (ss, len) = std_to_sockaddr(addr);
    // SAFETY: a valid sockaddr of `len` bytes.
    if unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        bail!("bind {addr}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Answer every datagram with the listener's name and the sender's address.
fn serve_udp(sock: UdpSocket, name: String) {
    let mut buf = [0u8; 512];
    loop {
        let Ok((_, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let line = format!("listener={name} orig=udp peer={}\n", unmap(from));
        let _ = sock.send_to(line.as_bytes(), from);
    }
}

/// IP_TRANSPARENT (IPV6_TRANSPARENT) on `fd`: listen for or connect from non-local addresses.
fn set_transparent(fd: RawFd, v6: bool) -> Result<()> {
    let (level, name) = if v6 {
        (libc::SOL_IPV6, libc::IPV6_TRANSPARENT)
    } else {
        (libc::SOL_IP, libc::IP_TRANSPARENT)
    };
    set_opt(fd, level, name, &ONE, "IP_TRANSPARENT")
}

fn bind_listener(addr: SocketAddr, transparent: bool, reuseport: bool) -> Result<TcpListener> {
    let sock = new_socket(addr, libc::SOCK_STREAM)?;
    let fd = sock.as_raw_fd();
    set_opt(
        fd,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        &ONE,
        "SO_REUSEADDR",
    )?;
    v6_only(fd, addr)?;
    if transparent {
        set_transparent(fd, addr.is_ipv6())?;
    }
    if reuseport {
        set_opt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            &ONE,
            "SO_REUSEPORT",
        )?;
    }
    bind_to(fd, addr)?;
    // SAFETY: bound socket.
    if unsafe { libc::listen(fd, 128) } != 0 {
        bail!("listen: {}", std::io::Error::last_os_error());
    }
    Ok(TcpListener::from(sock))
}

fn serve(listener: TcpListener, name: String) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let peer = match conn.peer_addr() {
            Ok(p) => p,
            Err(_) => continue,
        };
        let orig = match original_dst(conn.as_raw_fd(), peer) {
            Ok(a) => unmap(a).to_string(),
            Err(e) => e,
        };
        let local = conn
            .local_addr()
            .map(|a| unmap(a).to_string())
            .unwrap_or_default();
        let other = other_sockopts(conn.as_raw_fd(), peer);
        let line = format!(
            "listener={name} orig={orig} peer={} local={local} other={other}\n",
            unmap(peer)
        );
        if std::env::var_os("SOCKMESH_TESTKIT_LOG").is_some() {
            eprintln!(
                "  [{name}] accepted: original destination {orig}, peer {}, local {local}",
                unmap(peer)
            );
        }
        let _ = conn.write_all(line.as_bytes());
    }
}

/// A listener that does per connection what a transparent proxy does before it routes (the
/// benchmark's, `b/`): accept, read the original destination once (as Envoy's original_dst
/// listener filter), answer one line and close. No other socket calls, so a capture's hooks
/// are charged for what a proxy meets, not for the conformance checks `serve` makes.
fn serve_lean(listener: TcpListener, name: String) {
    loop {
        let Ok((mut conn, peer)) = listener.accept() else {
            continue;
        };
        let orig = match original_dst(conn.as_raw_fd(), peer) {
            Ok(a) => unmap(a).to_string(),
            Err(e) => e,
        };
        let _ = conn.write_all(format!("listener={name} orig={orig}\n").as_bytes());
    }
}

/// Settings of one client connection.
#[derive(Clone, Debug, Default)]
pub struct ConnectSpec {
    pub dst: Option<SocketAddr>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub bind: Option<IpAddr>,
    /// Create an AF_INET6 socket and dial an IPv4 destination as ::ffff:a.b.c.d.
    pub v4_mapped: bool,
    pub timeout: Duration,
    /// Keep the connection open this long after the listener's report (to see live state).
    pub hold: Duration,
    /// Create the socket first (as the caller we start as, root) and only then take on
    /// `uid`/`gid`: iptables matches the socket's creator, not the caller of connect().
    pub creds_after_socket: bool,
    /// Send one UDP datagram instead of connecting over TCP.
    pub udp: Option<UdpMode>,
}

/// Who a test client connects as: `--uid`/`--gid` of every testkit client (root's when not
/// given). Capture tells the app (1000 here) from the proxy (1337) by these.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct Identity {
    #[arg(long)]
    pub uid: Option<u32>,
    #[arg(long)]
    pub gid: Option<u32>,
}

impl ConnectSpec {
    /// Connections as `id` (to a destination given elsewhere), with a 5 s timeout and nothing
    /// else set.
    pub fn by(id: Identity) -> Self {
        ConnectSpec {
            uid: id.uid,
            gid: id.gid,
            timeout: Duration::from_secs(5),
            ..Default::default()
        }
    }

    /// A connection to `dst` as `id`, with a 5 s timeout and nothing else set.
    pub fn to(dst: SocketAddr, id: Identity) -> Self {
        ConnectSpec {
            dst: Some(dst),
            ..ConnectSpec::by(id)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpMode {
    /// connect() then send(), as glibc's resolver does.
    Connected,
    /// sendto() on an unconnected socket.
    Unconnected,
}

/// Drop to `gid`/`uid` (before any socket exists, so the socket's owner is that user, as with a
/// real app), connect, read the listener's report.
pub fn connect(spec: &ConnectSpec) -> Outcome {
    match connect_inner(spec) {
        Ok(o) => o,
        Err(e) => Outcome::Error {
            error: format!("{e:#}"),
        },
    }
}

fn connect_inner(spec: &ConnectSpec) -> Result<Outcome> {
    let dst = spec.dst.context("no destination")?;
    if !spec.creds_after_socket {
        take_credentials(spec)?;
    }
    let dial = match (dst, spec.v4_mapped) {
        (SocketAddr::V4(v4), true) => {
            SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
        }
        (a, _) => a,
    };
    let kind = if spec.udp.is_some() {
        libc::SOCK_DGRAM
    } else {
        libc::SOCK_STREAM
    };
    let sock = new_socket(dial, kind)?;
    let fd = sock.as_raw_fd();
    if let Some(b) = spec.bind {
        let b = match (b, dial) {
            (IpAddr::V4(v4), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
            (b, _) => b,
        };
        bind_to(fd, SocketAddr::new(b, 0))?;
    }
    let tv = libc::timeval {
        tv_sec: spec.timeout.as_secs() as libc::time_t,
        tv_usec: spec.timeout.subsec_micros() as libc::suseconds_t,
    };
    set_opt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, &tv, "SO_SNDTIMEO")?;
    set_opt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv, "SO_RCVTIMEO")?;
    if spec.creds_after_socket {
        take_credentials(spec)?;
    }
    if let Some(mode) = spec.udp {
        return udp_exchange(sock, dial, mode);
    }
    let (ss, len) = std_to_sockaddr(dial);
    // SAFETY: valid sockaddr.
    if unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        let e = std::io::Error::last_os_error();
        return Ok(match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => Outcome::Refused,
            Some(libc::EINPROGRESS) | Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) => {
                Outcome::Timeout
            }
            _ => Outcome::Error {
                error: format!("connect: {e}"),
            },
        });
    }
    let mut stream = TcpStream::from(sock);
    let peername = stream
        .peer_addr()
        .map(|a| unmap(a).to_string())
        .unwrap_or_else(|e| format!("error {e}"));
    let mut buf = String::new();
    if let Err(e) = stream.read_to_string(&mut buf) {
        return Ok(match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Outcome::Timeout,
            _ => Outcome::Error {
                error: format!("read: {e}"),
            },
        });
    }
    std::thread::sleep(spec.hold);
    let field = |k: &str| {
        buf.split_whitespace()
            .find_map(|f| f.strip_prefix(k).map(str::to_string))
            .unwrap_or_default()
    };
    let peer = field("peer=");
    let client_ip = peer
        .parse::<SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or(peer);
    Ok(Outcome::Ok {
        listener: field("listener="),
        orig: field("orig="),
        peername,
        client_ip,
        other: field("other="),
    })
}

/// Become `spec.gid`/`spec.uid` for good (no supplementary groups).
pub fn take_credentials(spec: &ConnectSpec) -> Result<()> {
    // SAFETY: credential changes of this single-threaded process.
    unsafe {
        if (spec.gid.is_some() || spec.uid.is_some()) && libc::setgroups(0, std::ptr::null()) != 0 {
            bail!("setgroups: {}", std::io::Error::last_os_error());
        }
        if let Some(g) = spec.gid {
            if libc::setresgid(g, g, g) != 0 {
                bail!("setresgid({g}): {}", std::io::Error::last_os_error());
            }
        }
        if let Some(u) = spec.uid {
            if libc::setresuid(u, u, u) != 0 {
                bail!("setresuid({u}): {}", std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Connect as `spec` describes and return everything the server sent.
pub fn fetch(spec: &ConnectSpec) -> Result<String> {
    let dst = spec.dst.context("no destination")?;
    take_credentials(spec)?;
    let mut s =
        TcpStream::connect_timeout(&dst, spec.timeout).with_context(|| format!("connect {dst}"))?;
    s.set_read_timeout(Some(spec.timeout))?;
    let mut body = String::new();
    s.read_to_string(&mut body).context("read")?;
    Ok(body)
}

/// A minimal transparent proxy, as a sidecar would run it: on the outbound port it forwards to
/// the original destination; on the inbound port it forwards to the original destination from
/// the inbound passthrough source (127.0.0.6 / ::6), as Istio's Envoy does. Before relaying, it
/// tells the client which hop it is and what original destination it saw.
///
/// With `tproxy_mark`, the proxy works as Istio's Envoy in TPROXY mode: its inbound listener is
/// transparent and its upstream connection to the app keeps the client's address as source
/// (IP_TRANSPARENT, SO_MARK).
pub fn proxy(name: &str, outbound: u16, inbound: u16, tproxy_mark: Option<u32>) -> Result<()> {
    let mut threads = Vec::new();
    for (port, dir) in [(outbound, "outbound"), (inbound, "inbound")] {
        for addr in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
            let transparent = dir == "inbound" && tproxy_mark.is_some();
            let listener = bind_listener(addr.parse()?, transparent, false)
                .with_context(|| format!("binding {addr}"))?;
            let hop = format!("{name}-{dir}");
            threads.push(std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    let hop = hop.clone();
                    let mode = match (dir, tproxy_mark) {
                        ("outbound", _) => Upstream::Direct,
                        (_, Some(mark)) => Upstream::OriginalSource(mark),
                        _ => Upstream::Passthrough,
                    };
                    std::thread::spawn(move || relay(conn, &hop, mode));
                }
            }));
        }
    }
    println!("ready");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// How the proxy connects upstream.
#[derive(Clone, Copy)]
enum Upstream {
    /// Outbound: straight to the original destination.
    Direct,
    /// Inbound (REDIRECT mode): from 127.0.0.6 / ::6.
    Passthrough,
    /// Inbound (TPROXY mode): from the client's own address, with this mark.
    OriginalSource(u32),
}

fn relay(mut client: TcpStream, hop: &str, mode: Upstream) {
    let Ok(peer) = client.peer_addr() else { return };
    let orig = match original_dst(client.as_raw_fd(), peer) {
        Ok(o) => unmap(o),
        Err(e) => {
            let _ = writeln!(client, "hop={hop} orig={e}");
            return;
        }
    };
    let upstream = match mode {
        Upstream::Passthrough => {
            let src: IpAddr = if orig.is_ipv4() {
                Ipv4Addr::new(127, 0, 0, 6).into()
            } else {
                Ipv6Addr::from(6u128).into()
            };
            connect_from(src, orig, None)
        }
        Upstream::OriginalSource(mark) => connect_from(unmap(peer).ip(), orig, Some(mark)),
        Upstream::Direct => {
            TcpStream::connect_timeout(&orig, Duration::from_secs(2)).map_err(anyhow::Error::from)
        }
    };
    let _ = writeln!(client, "hop={hop} orig={orig} client={}", unmap(peer).ip());
    let Ok(upstream) = upstream else {
        let _ = writeln!(client, "hop={hop} upstream-error");
        return;
    };
    let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(std::net::Shutdown::Write);
    });
    let mut upstream = upstream;
    let _ = std::io::copy(&mut upstream, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

/// Connect to `dst` from `src`; with `mark`, transparently (a non-local `src`) and marked.
fn connect_from(src: IpAddr, dst: SocketAddr, mark: Option<u32>) -> Result<TcpStream> {
    let sock = new_socket(dst, libc::SOCK_STREAM)?;
    let fd = sock.as_raw_fd();
    if let Some(mark) = mark {
        set_transparent(fd, dst.is_ipv6())?;
        set_opt(fd, libc::SOL_SOCKET, libc::SO_MARK, &mark, "SO_MARK")?;
    }
    bind_to(fd, SocketAddr::new(src, 0))?;
    let (ss, len) = std_to_sockaddr(dst);
    // SAFETY: valid sockaddr.
    if unsafe { libc::connect(fd, (&ss as *const libc::sockaddr_storage).cast(), len) } != 0 {
        bail!("connect {dst}: {}", std::io::Error::last_os_error());
    }
    Ok(TcpStream::from(sock))
}

/// One UDP query and its answer: where it landed, and the address the answer came from.
fn udp_exchange(sock: OwnedFd, dst: SocketAddr, mode: UdpMode) -> Result<Outcome> {
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
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Ok(Outcome::Timeout)
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(Outcome::Refused),
        Err(e) => {
            return Ok(Outcome::Error {
                error: format!("recv: {e}"),
            })
        }
    };
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    let field = |k: &str| {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(k).map(str::to_string))
            .unwrap_or_default()
    };
    let peer = field("peer=");
    Ok(Outcome::Ok {
        listener: field("listener="),
        orig: field("orig="),
        peername: unmap(from).to_string(),
        client_ip: peer
            .parse::<SocketAddr>()
            .map(|a| a.ip().to_string())
            .unwrap_or(peer),
        other: String::new(),
    })
}

/// What a load run saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Connections that landed on the expected listener.
    pub captured: u64,
    /// Connections that landed elsewhere (escaped capture).
    pub escaped: u64,
    /// Connections that failed (refused, timed out, errors).
    pub failed: u64,
    /// The first few unexpected outcomes.
    pub samples: Vec<String>,
}

/// Open connections to `spec.dst` one after another until `stop` exists (or `max` elapses),
/// checking that each lands on `expect`.
pub fn load(spec: &ConnectSpec, expect: &str, stop: &std::path::Path, max: Duration) -> LoadReport {
    let mut report = LoadReport::default();
    if let Err(e) = take_credentials(spec) {
        report.failed = 1;
        report.samples.push(format!("{e:#}"));
        return report;
    }
    let one = ConnectSpec {
        uid: None,
        gid: None,
        ..spec.clone()
    };
    let deadline = std::time::Instant::now() + max;
    while !stop.exists() && std::time::Instant::now() < deadline {
        let outcome = connect(&one);
        match &outcome {
            Outcome::Ok { listener, .. } if listener == expect => report.captured += 1,
            Outcome::Ok { .. } => report.escaped += 1,
            _ => report.failed += 1,
        }
        if !matches!(&outcome, Outcome::Ok { listener, .. } if listener == expect)
            && report.samples.len() < 5
        {
            report.samples.push(format!("{outcome:?}"));
        }
    }
    report
}

/// Minimal HTTP/1.1 upstreams, given as `name@addr:port[!status]`: each request is answered
/// (with `status`, 200 by default) with `name METHOD PATH host=HOST from=PEER-IP` and an
/// `x-upstream: name` header, then closed; `/sleep/MS` answers after MS milliseconds. With `log`, each request is appended to that file as
/// `name METHOD PATH host=HOST`. Prints "ready" once every address is bound.
pub fn http_server(specs: &[String], log: Option<std::path::PathBuf>) -> Result<()> {
    let mut threads = Vec::new();
    let log = std::sync::Arc::new(log);
    for spec in specs {
        let (name, rest) = spec
            .split_once('@')
            .with_context(|| format!("{spec}: want name@addr:port[!status]"))?;
        let (addr, status) = match rest.split_once('!') {
            Some((a, s)) => (
                a,
                s.parse::<u16>()
                    .with_context(|| format!("{spec}: status"))?,
            ),
            None => (rest, 200),
        };
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        let name = name.to_string();
        let log = log.clone();
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let name = name.clone();
                let log = log.clone();
                std::thread::spawn(move || {
                    let _ = answer_http(conn, &name, status, log.as_ref().as_deref());
                });
            }
        }));
    }
    println!("ready");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn answer_http(
    mut conn: TcpStream,
    name: &str,
    status: u16,
    log: Option<&std::path::Path>,
) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let peer = conn.peer_addr()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or_default().split(' ');
    let (method, path) = (first.next().unwrap_or("?"), first.next().unwrap_or("?"));
    let host = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map_or("", |(_, v)| v.trim());
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let upgrade = header("upgrade");
    // /headers answers the names of the request's headers, sorted (what a proxy forwarded).
    if path == "/headers" {
        let mut names: Vec<String> = head
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, _)| k.trim().to_ascii_lowercase())
            .collect();
        names.sort();
        let body = format!("{name} headers: {}\n", names.join(","));
        write!(
            conn,
            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    // A request body is read in full and summed; /bytes/N answers N pattern bytes.
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if length > 0 {
        let mut body = vec![0u8; length];
        conn.read_exact(&mut body)?;
        let text = format!("{name} got {length} bytes sum={:016x}\n", checksum(&body));
        write!(
            conn,
            "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
            text.len()
        )?;
        return Ok(());
    }
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        write!(
            conn,
            "HTTP/1.1 {status} X\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n"
        )?;
        let data = pattern(n);
        for chunk in data.chunks(64 * 1024) {
            conn.write_all(chunk)?;
        }
        return Ok(());
    }
    if let Some(proto) = upgrade {
        // Switch, then echo every byte back until the client half-closes; then say goodbye.
        write!(
            conn,
            "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {proto}\r\n\r\n{name} echoes: "
        )?;
        let mut buf = [0u8; 4096];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            conn.write_all(&buf[..n])?;
        }
        write!(conn, " (client closed its side; {name} says bye)")?;
        return Ok(());
    }
    // /stream/N answers N chunks 200 ms apart (chunked), to see that they are not buffered.
    if let Some(n) = path
        .strip_prefix("/stream/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        write!(
            conn,
            "HTTP/1.1 {status} X\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        )?;
        for i in 0..n {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            let line = format!("{name} chunk {i}\n");
            write!(conn, "{:x}\r\n{line}\r\n", line.len())?;
            conn.flush()?;
        }
        write!(conn, "0\r\n\r\n")?;
        return Ok(());
    }
    // /sleep/MS answers after MS milliseconds (a slow upstream).
    if let Some(ms) = path
        .strip_prefix("/sleep/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if let Some(file) = log {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)?;
        // One write per line: threads append to the same file at once.
        f.write_all(format!("{name} {method} {path} host={host}\n").as_bytes())?;
    }
    let body = format!("{name} {method} {path} host={host} from={}\n", peer.ip());
    write!(
        conn,
        "HTTP/1.1 {status} X\r\nx-upstream: {name}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// One HTTP/1.1 GET as `spec` describes (credentials taken first); the whole response.
pub fn http_get(spec: &ConnectSpec, path: &str, host: &str, headers: &[String]) -> Result<String> {
    let dst = spec.dst.context("no destination")?;
    take_credentials(spec)?;
    let mut s =
        TcpStream::connect_timeout(&dst, spec.timeout).with_context(|| format!("connect {dst}"))?;
    s.set_read_timeout(Some(spec.timeout))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out).context("read")?;
    Ok(out)
}

/// An HTTP/1.1 upgrade (`Upgrade: echo`) as `spec` describes; after the 101, sends `message`,
/// half-closes, and returns everything that came after the response head.
pub fn http_upgrade(spec: &ConnectSpec, host: &str, message: &str) -> Result<String> {
    let dst = spec.dst.context("no destination")?;
    take_credentials(spec)?;
    let mut s =
        TcpStream::connect_timeout(&dst, spec.timeout).with_context(|| format!("connect {dst}"))?;
    s.set_read_timeout(Some(spec.timeout))?;
    write!(
        s,
        "GET /ws HTTP/1.1\r\nhost: {host}\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n"
    )?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            bail!(
                "closed before the response head: {}",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    if !head.starts_with("HTTP/1.1 101") {
        bail!("no upgrade: {head}");
    }
    s.write_all(message.as_bytes())?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = String::new();
    s.read_to_string(&mut rest)?;
    Ok(rest)
}

/// A gRPC upstream (the agent's API, answering Status with the number of connections it has
/// accepted as the cookie), for HTTP/2, trailers and upstream connection reuse through the
/// proxy. Prints "ready" once bound.
pub fn grpc_server(addr: SocketAddr) -> Result<()> {
    use crate::api::pb;
    use std::sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    };
    struct Upstream(Arc<AtomicU64>);
    #[tonic::async_trait]
    impl pb::agent_server::Agent for Upstream {
        async fn register(
            &self,
            _: tonic::Request<pb::RegisterRequest>,
        ) -> Result<tonic::Response<pb::PodReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("test upstream"))
        }
        async fn update(
            &self,
            _: tonic::Request<pb::RegisterRequest>,
        ) -> Result<tonic::Response<pb::PodReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("test upstream"))
        }
        async fn unregister(
            &self,
            _: tonic::Request<pb::UnregisterRequest>,
        ) -> Result<tonic::Response<pb::PodReply>, tonic::Status> {
            // An error travels in the trailers: the proxy must pass them on.
            Err(tonic::Status::permission_denied("trailers arrived"))
        }
        async fn status(
            &self,
            _: tonic::Request<pb::StatusRequest>,
        ) -> Result<tonic::Response<pb::PodReply>, tonic::Status> {
            Ok(tonic::Response::new(pb::PodReply {
                netns_cookie: self.0.load(Ordering::Relaxed),
                registered: true,
            }))
        }
        async fn list(
            &self,
            _: tonic::Request<pb::ListRequest>,
        ) -> Result<tonic::Response<pb::ListReply>, tonic::Status> {
            Err(tonic::Status::unimplemented("test upstream"))
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("ready");
        std::io::stdout().flush()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        let incoming = tokio_stream::StreamExt::map(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            move |c| {
                counter.fetch_add(1, Ordering::Relaxed);
                c
            },
        );
        tonic::transport::Server::builder()
            .add_service(pb::agent_server::AgentServer::new(Upstream(accepted)))
            .serve_with_incoming(incoming)
            .await?;
        anyhow::Ok(())
    })
}

/// gRPC calls through `dst` with `authority` (as `spec` describes): Status, then Unregister
/// (which fails with a status carried in trailers). Prints both outcomes.
pub fn grpc_call(spec: &ConnectSpec, authority: &str) -> Result<String> {
    use crate::api::pb;
    let dst = spec.dst.context("no destination")?;
    take_credentials(spec)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{dst}"))?
            .origin(format!("http://{authority}").parse()?)
            .connect()
            .await?;
        let mut c = pb::agent_client::AgentClient::new(channel);
        let s = c.status(pb::StatusRequest {}).await?.into_inner();
        let u = c.unregister(pb::UnregisterRequest {}).await.unwrap_err();
        Ok(format!(
            "status cookie={} registered={}; unregister {:?}: {}",
            s.netns_cookie,
            s.registered,
            u.code(),
            u.message()
        ))
    })
}

/// `n` gRPC clients through `dst` with `authority`: all connect first, then all call Status
/// at once (their requests reach the proxy together). "N of N calls succeeded".
pub fn grpc_calls_together(spec: &ConnectSpec, authority: &str, n: usize) -> Result<String> {
    use crate::api::pb;
    let dst = spec.dst.context("no destination")?;
    take_credentials(spec)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut clients = Vec::new();
        for _ in 0..n {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{dst}"))?
                .origin(format!("http://{authority}").parse()?)
                .connect()
                .await?;
            clients.push(pb::agent_client::AgentClient::new(channel));
        }
        let go = std::sync::Arc::new(tokio::sync::Barrier::new(n));
        let mut calls = tokio::task::JoinSet::new();
        for mut c in clients {
            let go = go.clone();
            calls.spawn(async move {
                go.wait().await;
                c.status(pb::StatusRequest {}).await
            });
        }
        let mut ok = 0;
        while let Some(r) = calls.join_next().await {
            ok += usize::from(matches!(r, Ok(Ok(_))));
        }
        anyhow::Ok(format!("{ok} of {n} calls succeeded"))
    })
}

/// Send a TLS ClientHello naming `server` (as `spec` describes) and return what the far end
/// sends back: the proxy passes TLS through by server name, without terminating it.
pub fn tls_hello(spec: &ConnectSpec, server: &str) -> Result<String> {
    let dst = spec.dst.context("no destination")?;
    take_credentials(spec)?;
    let name = server.as_bytes();
    // server_name extension: list length, host_name entry (type 0), name.
    let mut ext = ((name.len() + 3) as u16).to_be_bytes().to_vec();
    ext.push(0);
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name);
    let mut exts = vec![0, 0];
    exts.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    exts.extend_from_slice(&ext);
    // ClientHello: version, random, empty session id, one suite, null compression, extensions.
    let mut hello = vec![0x03, 0x03];
    hello.extend_from_slice(&[42u8; 32]);
    hello.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    hello.extend_from_slice(&exts);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&((hello.len() + 4) as u16).to_be_bytes());
    record.push(0x01);
    record.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    record.extend_from_slice(&hello);
    let mut s =
        TcpStream::connect_timeout(&dst, spec.timeout).with_context(|| format!("connect {dst}"))?;
    s.set_read_timeout(Some(spec.timeout))?;
    s.write_all(&record)?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Ok(out)
}

/// Keep-alive HTTP/1.1 upstreams on `addrs`: every request gets `200 ok`. Prints "ready".
pub fn http_keepalive_server(addrs: &[SocketAddr]) -> Result<()> {
    let mut threads = Vec::new();
    for addr in addrs {
        let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        threads.push(std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = keepalive_conn(conn);
                });
            }
        }));
    }
    println!("ready");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Answer "ok" to each request on `conn` until the client closes it or asks to; the
/// `x-request-on-connection` header counts the connection's requests (1, 2, ...).
fn keepalive_conn(conn: TcpStream) -> Result<()> {
    use std::io::BufRead;
    conn.set_nodelay(true)?;
    let mut reader = std::io::BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let mut served = 0u64;
    loop {
        let mut close = false;
        let mut length = 0usize;
        let mut line = String::new();
        // Request line and headers.
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
                    close = true;
                }
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        served += 1;
        write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-request-on-connection: {served}\r\n\r\nok"
        )?;
        if close {
            return Ok(());
        }
    }
}

/// Open and close connections to `dst` for `secs` (as `spec` describes, reading until the
/// listener closes); the number completed.
pub fn bench_connect(spec: &ConnectSpec, secs: f64) -> Result<u64> {
    let dst = spec.dst.context("no destination")?;
    take_credentials(spec)?;
    let end = std::time::Instant::now() + Duration::from_secs_f64(secs);
    let mut n = 0;
    let mut sink = Vec::new();
    while std::time::Instant::now() < end {
        let mut s = TcpStream::connect(dst).with_context(|| format!("connect {dst}"))?;
        sink.clear();
        s.read_to_end(&mut sink)?;
        n += 1;
    }
    Ok(n)
}

/// Requests per second and latency of HTTP/1.1 GETs to `dst` from `conns` clients for `secs`:
/// (requests, p50 µs, p99 µs). Each client keeps one connection alive, or (`new_conn`) opens a
/// connection per request, asks with `connection: close` and closes it after the answer; its
/// latency includes the connect.
pub fn bench_http(
    spec: &ConnectSpec,
    host: &str,
    conns: usize,
    secs: f64,
    new_conn: bool,
) -> Result<(u64, u64, u64)> {
    let dst = spec.dst.context("no destination")?;
    take_credentials(spec)?;
    let end = std::time::Instant::now() + Duration::from_secs_f64(secs);
    let close = if new_conn {
        "connection: close\r\n"
    } else {
        ""
    };
    let request = format!("GET / HTTP/1.1\r\nhost: {host}\r\n{close}\r\n");
    let connect = move || -> Result<(std::io::BufReader<TcpStream>, TcpStream)> {
        let s = TcpStream::connect(dst).with_context(|| format!("connect {dst}"))?;
        s.set_nodelay(true)?;
        Ok((std::io::BufReader::new(s.try_clone()?), s))
    };
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let request = request.clone();
            std::thread::spawn(move || -> Result<Vec<u32>> {
                let mut conn = if new_conn { None } else { Some(connect()?) };
                let mut lat = Vec::new();
                let mut line = String::new();
                let mut body = Vec::new();
                while std::time::Instant::now() < end {
                    let t = std::time::Instant::now();
                    let (reader, out) = match &mut conn {
                        Some(c) => c,
                        slot => slot.insert(connect()?),
                    };
                    out.write_all(request.as_bytes())?;
                    read_response(reader, &mut line, &mut body)?;
                    if new_conn {
                        conn = None;
                    }
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(
            w.join()
                .map_err(|_| anyhow::anyhow!("a client thread panicked"))??,
        );
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0) as u64
    };
    Ok((all.len() as u64, pct(0.5), pct(0.99)))
}

/// Read one HTTP/1.1 response with a content-length (head into `line`, body into `body`).
fn read_response(
    reader: &mut std::io::BufReader<TcpStream>,
    line: &mut String,
    body: &mut Vec<u8>,
) -> Result<()> {
    use std::io::BufRead;
    let mut length = 0usize;
    loop {
        line.clear();
        if reader.read_line(line)? == 0 {
            bail!("the server closed the connection");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    body.resize(length, 0);
    reader.read_exact(body)?;
    Ok(())
}

/// `n` bytes of a fixed pattern, for large bodies.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// FNV-1a over `b`: the same bytes, the same sum.
pub fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ *x as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A POST of `n` pattern bytes (written in pieces, as a stream), or with `n` = 0 a GET; returns
/// "status=S len=L sum=X" of the response body.
/// GET `/stream/N` (as `spec` describes) and watch the chunks arrive: how many, and whether
/// the last came at least 100 ms per gap after the first (sent 200 ms apart: a proxy that
/// buffered the body would deliver them together).
pub fn http_stream(spec: &ConnectSpec, n: usize, host: &str) -> Result<String> {
    let dst = spec.dst.context("no destination")?;
    take_credentials(spec)?;
    let mut s =
        TcpStream::connect_timeout(&dst, spec.timeout).with_context(|| format!("connect {dst}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /stream/{n} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )?;
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    let (mut first, mut last) = (None, None);
    loop {
        let got = s.read(&mut buf)?;
        if got == 0 {
            break;
        }
        all.extend_from_slice(&buf[..got]);
        let text = String::from_utf8_lossy(&all);
        if first.is_none() && text.contains(" chunk 0\n") {
            first = Some(std::time::Instant::now());
        }
        if last.is_none() && text.contains(&format!(" chunk {}\n", n.saturating_sub(1))) {
            last = Some(std::time::Instant::now());
        }
    }
    let text = String::from_utf8_lossy(&all);
    let chunks = text.matches(" chunk ").count();
    let spread = match (first, last) {
        (Some(f), Some(l)) => l.duration_since(f) >= Duration::from_millis(100 * (n as u64 - 1)),
        _ => false,
    };
    Ok(format!("chunks={chunks} streamed={spread}"))
}

pub fn http_transfer(spec: &ConnectSpec, path: &str, host: &str, n: usize) -> Result<String> {
    let dst = spec.dst.context("no destination")?;
    take_credentials(spec)?;
    let mut s =
        TcpStream::connect_timeout(&dst, spec.timeout).with_context(|| format!("connect {dst}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let method = if n > 0 { "POST" } else { "GET" };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n"
    )?;
    for chunk in pattern(n).chunks(7919) {
        s.write_all(chunk)?;
    }
    let mut all = Vec::new();
    s.read_to_end(&mut all)?;
    let split = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no response head")?;
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let body = &all[split + 4..];
    let status = head.split(' ').nth(1).unwrap_or("?");
    Ok(format!(
        "status={status} len={} sum={:016x}",
        body.len(),
        checksum(body)
    ))
}

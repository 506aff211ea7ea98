//! TCP: the reporting listeners (`listen`, which also starts the UDP ones of `udp`), the probe
//! client that connects as a given caller and reports where it landed (`connect`, UDP included),
//! and a client that prints whatever the server says (`fetch`).

use std::{
    fmt,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    str::FromStr,
    time::Duration,
};

use anyhow::{Context, Result};

use super::{
    sockaddr::{original_dst_text, other_sockopts, unmap},
    socket::{bind_listener, bind_to, connect_to, new_socket, set_timeouts, turn_on},
    take_credentials, udp, Args, ConnectSpec, Identity, Launch, Outcome, UdpMode,
};

/// What a listener of `listen` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// A TCP listener that reports what it saw of each connection (see `serve`).
    Report,
    /// [`ListenerKind::Report`] with IP_TRANSPARENT (TPROXY only hands connections to
    /// transparent listeners, as Envoy's with `transparent: true`).
    Transparent,
    /// [`ListenerKind::Report`] with SO_REUSEPORT (proxy workers sharing a port).
    ReusePort,
    /// The benchmark's lean listener (see `serve_lean`).
    Lean,
    /// A UDP socket answering each datagram (see `udp::serve`).
    Udp,
}

impl ListenerKind {
    /// Its prefix in a listener's spec.
    fn prefix(self) -> &'static str {
        match self {
            ListenerKind::Report => "",
            ListenerKind::Transparent => "t/",
            ListenerKind::ReusePort => "r/",
            ListenerKind::Lean => "b/",
            ListenerKind::Udp => "udp/",
        }
    }
}

/// One listener of `listen`: `[KIND/]name@addr:port` on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub kind: ListenerKind,
    /// What it reports as `listener=`.
    pub name: String,
    pub addr: SocketAddr,
}

impl Listener {
    pub fn new(kind: ListenerKind, name: impl Into<String>, addr: SocketAddr) -> Listener {
        Listener {
            kind,
            name: name.into(),
            addr,
        }
    }

    /// A reporting TCP listener.
    pub fn report(name: impl Into<String>, addr: SocketAddr) -> Listener {
        Listener::new(ListenerKind::Report, name, addr)
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}@{}", self.kind.prefix(), self.name, self.addr)
    }
}

impl FromStr for Listener {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<Listener> {
        let (name, addr) = spec
            .split_once('@')
            .with_context(|| format!("listener spec {spec}: want [KIND/]name@addr:port"))?;
        let addr = addr
            .parse()
            .with_context(|| format!("listener spec {spec}"))?;
        let kinds = [
            ListenerKind::Udp,
            ListenerKind::Transparent,
            ListenerKind::ReusePort,
            ListenerKind::Lean,
        ];
        let (kind, name) = kinds
            .into_iter()
            .find_map(|k| name.strip_prefix(k.prefix()).map(|n| (k, n)))
            .unwrap_or((ListenerKind::Report, name));
        Ok(Listener::new(kind, name, addr))
    }
}

/// `listen`: serve the listeners until killed; prints "ready" once all are bound.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct Listen {
    pub listeners: Vec<Listener>,
}

impl Launch for Listen {
    const NAME: &'static str = "listen";

    fn args(&self) -> Args {
        self.listeners.iter().fold(Args::new(), Args::arg)
    }
}

impl Listen {
    pub fn run(self) -> Result<()> {
        let mut threads = Vec::new();
        for l in self.listeners {
            threads.push(start_listener(l)?);
        }
        super::say_ready()?;
        super::join_all(threads);
        Ok(())
    }
}

/// Bind `l` and serve it on a thread of its own.
fn start_listener(l: Listener) -> Result<std::thread::JoinHandle<()>> {
    let Listener { kind, name, addr } = l;
    if kind == ListenerKind::Udp {
        let sock = udp::bind(addr).with_context(|| format!("binding udp {addr}"))?;
        return Ok(std::thread::spawn(move || udp::serve(sock, name)));
    }
    let transparent = kind == ListenerKind::Transparent;
    let reuseport = kind == ListenerKind::ReusePort;
    let listener =
        bind_listener(addr, transparent, reuseport).with_context(|| format!("binding {addr}"))?;
    Ok(if kind == ListenerKind::Lean {
        std::thread::spawn(move || serve_lean(listener, name))
    } else {
        std::thread::spawn(move || serve(listener, name))
    })
}

/// Tell each client what this listener saw: its name, the original destination, the peer, the
/// local address and the getsockopt answers capture must leave alone.
fn serve(listener: TcpListener, name: String) {
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let Ok(peer) = conn.peer_addr() else { continue };
        let orig = original_dst_text(conn.as_raw_fd(), peer);
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
        let orig = original_dst_text(conn.as_raw_fd(), peer);
        let _ = conn.write_all(format!("listener={name} orig={orig}\n").as_bytes());
    }
}

/// `connect`: connect once (or send one datagram) and print the outcome as JSON.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub dst: SocketAddr,
    #[command(flatten)]
    pub id: Identity,
    #[arg(long)]
    pub bind: Option<IpAddr>,
    /// Dial an IPv4 destination from an AF_INET6 socket as ::ffff:a.b.c.d.
    #[arg(long)]
    pub v4_mapped: bool,
    #[arg(long, default_value = "2000")]
    pub timeout_ms: u64,
    /// Keep the connection open this long after reading the listener's report.
    #[arg(long, default_value = "0")]
    pub hold_ms: u64,
    /// Create the socket before taking on --uid/--gid.
    #[arg(long)]
    pub creds_after_socket: bool,
    /// Send one UDP datagram (connected or unconnected socket) instead of TCP.
    #[arg(long, value_enum)]
    pub udp: Option<UdpMode>,
    /// First connect the socket here, which must fail before its SYN (EADDRNOTAVAIL), then go
    /// on to the destination.
    #[arg(long)]
    pub first: Option<SocketAddr>,
    /// Connect with TCP_FASTOPEN_CONNECT (the pod's `net.ipv4.tcp_fastopen` 5: the SYN waits
    /// for the first write), connect another socket here from the same thread meanwhile, then
    /// send the SYN.
    #[arg(long)]
    pub fastopen_behind: Option<SocketAddr>,
}

impl Connect {
    /// A TCP connection to `dst` as `id`, with the defaults of the command line.
    pub fn new(dst: SocketAddr, id: Identity) -> Connect {
        Connect {
            dst,
            id,
            bind: None,
            v4_mapped: false,
            timeout_ms: 2000,
            hold_ms: 0,
            creds_after_socket: false,
            udp: None,
            first: None,
            fastopen_behind: None,
        }
    }

    pub fn run(self) -> Result<()> {
        let outcome = connect(&ConnectSpec {
            bind: self.bind,
            v4_mapped: self.v4_mapped,
            timeout: Duration::from_millis(self.timeout_ms),
            hold: Duration::from_millis(self.hold_ms),
            creds_after_socket: self.creds_after_socket,
            udp: self.udp,
            first: self.first,
            fastopen_behind: self.fastopen_behind,
            ..ConnectSpec::to(self.dst, self.id)
        });
        println!("{}", serde_json::to_string(&outcome)?);
        Ok(())
    }
}

impl Launch for Connect {
    const NAME: &'static str = "connect";

    fn args(&self) -> Args {
        Args::new()
            .arg(self.dst)
            .id(self.id)
            .opt_some("--bind", self.bind)
            .switch("--v4-mapped", self.v4_mapped)
            .opt("--timeout-ms", self.timeout_ms)
            .opt("--hold-ms", self.hold_ms)
            .switch("--creds-after-socket", self.creds_after_socket)
            .opt_some("--udp", self.udp.map(UdpMode::name))
            .opt_some("--first", self.first)
            .opt_some("--fastopen-behind", self.fastopen_behind)
    }
}

/// Drop to `gid`/`uid` (before any socket exists, so the socket's owner is that user, as with a
/// real app), connect, read the listener's report.
pub fn connect(spec: &ConnectSpec) -> Outcome {
    connect_inner(spec).unwrap_or_else(|e| Outcome::Error {
        error: format!("{e:#}"),
    })
}

fn connect_inner(spec: &ConnectSpec) -> Result<Outcome> {
    let dst = spec.dst()?;
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
    set_timeouts(fd, spec.timeout)?;
    if spec.creds_after_socket {
        take_credentials(spec)?;
    }
    if let Some(mode) = spec.udp {
        return udp::exchange(sock, dial, mode);
    }
    if let Some(first) = spec.first {
        match connect_to(fd, first) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
            other => {
                return Ok(Outcome::Error {
                    error: format!("first connect to {first}: {other:?}, not EADDRNOTAVAIL"),
                })
            }
        }
    }
    if spec.fastopen_behind.is_some() {
        turn_on(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN_CONNECT,
            "TCP_FASTOPEN_CONNECT",
        )?;
    }
    if let Err(e) = connect_to(fd, dial) {
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
    if let Some(other) = spec.fastopen_behind {
        fastopen_behind(fd, other, spec.timeout)?;
    }
    let mut stream = TcpStream::from(sock);
    let peername = stream
        .peer_addr()
        .map(|a| unmap(a).to_string())
        .unwrap_or_else(|e| format!("error {e}"));
    let mut report = String::new();
    if let Err(e) = stream.read_to_string(&mut report) {
        return Ok(match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Outcome::Timeout,
            _ => Outcome::Error {
                error: format!("read: {e}"),
            },
        });
    }
    std::thread::sleep(spec.hold);
    Ok(Outcome::from_report(&report, peername))
}

/// With socket `fd`'s SYN deferred by TCP Fast Open: connect to `other` from this thread and
/// read it to the end, then write nothing to `fd`, which sends its SYN.
fn fastopen_behind(fd: libc::c_int, other: SocketAddr, timeout: Duration) -> Result<()> {
    let mut s = TcpStream::connect_timeout(&other, timeout)
        .with_context(|| format!("connect {other} while the SYN waits"))?;
    s.set_read_timeout(Some(timeout))?;
    let mut report = String::new();
    s.read_to_string(&mut report)
        .with_context(|| format!("read {other}"))?;
    // SAFETY: a send of no bytes on an fd this function's caller owns.
    if unsafe { libc::send(fd, std::ptr::null(), 0, 0) } < 0 {
        anyhow::bail!(
            "send of nothing (the deferred SYN): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `fetch`: connect once and print everything the server sends.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct Fetch {
    pub dst: SocketAddr,
    #[command(flatten)]
    pub id: Identity,
}

impl Fetch {
    pub fn new(dst: SocketAddr, id: Identity) -> Fetch {
        Fetch { dst, id }
    }

    pub fn run(self) -> Result<()> {
        let body = fetch(&ConnectSpec {
            timeout: Duration::from_secs(3),
            ..ConnectSpec::to(self.dst, self.id)
        })?;
        print!("{body}");
        Ok(())
    }
}

impl Launch for Fetch {
    const NAME: &'static str = "fetch";

    fn args(&self) -> Args {
        Args::new().arg(self.dst).id(self.id)
    }
}

/// Connect as `spec` describes and return everything the server sent.
pub fn fetch(spec: &ConnectSpec) -> Result<String> {
    let mut s = spec.open()?;
    let mut body = String::new();
    s.read_to_string(&mut body).context("read")?;
    Ok(body)
}

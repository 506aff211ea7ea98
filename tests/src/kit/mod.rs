//! The test programs run inside lab namespaces (the `sockmesh-testkit` binary's subcommands),
//! by protocol: listeners that report what a proxy would see (which listener accepted,
//! SO_ORIGINAL_DST, the peer) and clients that connect with given credentials and report where
//! they landed (`tcp`, `udp`), a minimal transparent proxy (`proxy`), HTTP, gRPC and TLS peers
//! for the proxy suite, and load generators (`load`). Each program is a typed launcher too
//! (see `launch`): the suites build its command line from its fields.

pub mod churn;
pub mod crowd;
pub mod grpc;
pub mod h2c;
pub mod http;
pub mod launch;
pub mod load;
pub mod proxy;
pub mod sockaddr;
pub(crate) mod socket;
pub mod tcp;
pub mod tls;
pub mod udp;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

pub use churn::{Churn, ChurnReport};
pub use crowd::{Crowd, CrowdReport};
pub use grpc::{GrpcCall, GrpcServe};
pub use h2c::H2cKeepalive;
pub use http::{
    HttpGet, HttpKeepalive, HttpServe, HttpStream, HttpTransfer, HttpUpgrade, HttpUpstream,
};
pub use launch::{Args, Launch, Program};
pub use load::{BenchConnect, BenchHttp, Hold, HoldReport, Load, LoadReport, Wire};
pub use proxy::Proxy;
pub use tcp::{Connect, Fetch, Listen, Listener, ListenerKind};
pub use tls::TlsHello;

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

impl Outcome {
    /// The listener that accepted, if one did.
    pub fn listener(&self) -> Option<&str> {
        match self {
            Outcome::Ok { listener, .. } => Some(listener),
            _ => None,
        }
    }

    /// Where it landed: the listener, or the whole outcome when no listener accepted.
    pub fn landed(&self) -> String {
        match self.listener() {
            Some(l) => l.to_string(),
            None => format!("{self:?}"),
        }
    }

    /// `Ok` from a listener's report line (`listener=.. orig=.. peer=.. other=..`), as seen by
    /// a client whose getpeername() said `peername`.
    fn from_report(report: &str, peername: String) -> Outcome {
        let field = |k: &str| {
            report
                .split_whitespace()
                .find_map(|f| f.strip_prefix(k).map(str::to_string))
                .unwrap_or_default()
        };
        let peer = field("peer=");
        let client_ip = peer
            .parse::<SocketAddr>()
            .map(|a| a.ip().to_string())
            .unwrap_or(peer);
        Outcome::Ok {
            listener: field("listener="),
            orig: field("orig="),
            peername,
            client_ip,
            other: field("other="),
        }
    }
}

/// How a probe sends its one UDP datagram.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdpMode {
    /// connect() then send(), as glibc's resolver does.
    Connected,
    /// sendto() on an unconnected socket.
    Unconnected,
}

impl UdpMode {
    /// Its value of `--udp`.
    pub fn name(self) -> &'static str {
        match self {
            UdpMode::Connected => "connected",
            UdpMode::Unconnected => "unconnected",
        }
    }
}

/// Who a test client connects as: `--uid`/`--gid` of every testkit client (root's when not
/// given). Capture tells the app (1000 here) from the proxy (1337) by these.
#[derive(clap::Args, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    #[arg(long)]
    pub uid: Option<u32>,
    #[arg(long)]
    pub gid: Option<u32>,
}

impl Identity {
    /// The app of the suites' pods.
    pub const APP: Identity = Identity::both(1000);
    /// The sidecar proxy's user and group.
    pub const PROXY: Identity = Identity::both(1337);
    /// Root, as the program starts.
    pub const ROOT: Identity = Identity {
        uid: None,
        gid: None,
    };

    /// Uid and gid `id`.
    pub const fn both(id: u32) -> Identity {
        Identity {
            uid: Some(id),
            gid: Some(id),
        }
    }

    /// Uid `uid` and gid `gid`.
    pub const fn of(uid: u32, gid: u32) -> Identity {
        Identity {
            uid: Some(uid),
            gid: Some(gid),
        }
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
    /// First connect the same socket here, which must fail before its SYN (EADDRNOTAVAIL: no
    /// local port free for it), then go on to `dst`.
    pub first: Option<SocketAddr>,
    /// Connect with TCP_FASTOPEN_CONNECT and TCP Fast Open without a cookie (the pod's
    /// `net.ipv4.tcp_fastopen` 5), so the SYN waits for the first write; meanwhile connect
    /// another socket here from the same thread (and read it to the end); then write nothing,
    /// which sends the SYN.
    pub fastopen_behind: Option<SocketAddr>,
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

    /// [`ConnectSpec::by`], to `dst`.
    pub fn to(dst: SocketAddr, id: Identity) -> Self {
        ConnectSpec {
            dst: Some(dst),
            ..ConnectSpec::by(id)
        }
    }

    /// The destination, which every client but the hop's needs.
    pub fn dst(&self) -> Result<SocketAddr> {
        self.dst.context("no destination")
    }

    /// Take on the credentials, then open a TCP connection to the destination with the
    /// timeout for the connect and for reads.
    pub fn open(&self) -> Result<std::net::TcpStream> {
        let dst = self.dst()?;
        take_credentials(self)?;
        let s = std::net::TcpStream::connect_timeout(&dst, self.timeout)
            .with_context(|| format!("connect {dst}"))?;
        s.set_read_timeout(Some(self.timeout))?;
        Ok(s)
    }
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

/// Print "ready" (what the lab waits for once a server is bound), flushed.
pub(crate) fn say_ready() -> Result<()> {
    use std::io::Write;
    println!("ready");
    std::io::stdout().flush()?;
    Ok(())
}

/// Wait for every server thread (they serve until the program is killed).
pub(crate) fn join_all(threads: Vec<std::thread::JoinHandle<()>>) {
    for t in threads {
        let _ = t.join();
    }
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

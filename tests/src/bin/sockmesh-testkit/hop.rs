//! The app-to-proxy hop of the benchmark: a minimal forwarder standing where the proxy stands
//! (on the outbound port, and on a Unix socket for the Unix-socket baseline), an event loop as
//! proxies are, an upstream that echoes or sinks, and a client that measures round trips and
//! bulk throughput through them.

use std::{
    fmt,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::PathBuf,
    str::FromStr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sockmesh_tests::{
    accel::Patient,
    kit::{take_credentials, Args, ConnectSpec, Identity, Launch},
};

/// The hop's programs, subcommands of the testkit.
#[derive(clap::Subcommand, Clone, Debug, PartialEq)]
pub enum Program {
    /// The benchmark's minimal forwarder: LISTEN (and --unix PATH) relayed to --upstream.
    #[command(name = HopForward::NAME)]
    Forward(HopForward),
    /// The benchmark's upstream (echo or sink) on ADDR.
    #[command(name = HopUpstream::NAME)]
    Upstream(HopUpstream),
    /// Round trips of --size bytes through DST (ip:port or unix:PATH) for --secs.
    #[command(name = HopRr::NAME)]
    Rr(HopRr),
    /// --bytes through DST (ip:port or unix:PATH) to the sink; bytes per second.
    #[command(name = HopBulk::NAME)]
    Bulk(HopBulk),
}

impl Program {
    pub fn run(self) -> Result<()> {
        match self {
            Program::Forward(p) => forward(p.listen, p.unix, p.upstream),
            Program::Upstream(p) => upstream(p.addr),
            Program::Rr(p) => {
                let spec = ConnectSpec::by(p.id);
                println!("{}", round_trips(&p.dst, &spec, p.size, p.secs)?);
                Ok(())
            }
            Program::Bulk(p) => {
                let spec = ConnectSpec::by(p.id);
                println!("{}", bulk(&p.dst, &spec, p.bytes)?);
                Ok(())
            }
        }
    }
}

/// `hop-forward`: the forwarder on `listen` (and on the Unix socket `unix`) to `upstream`.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct HopForward {
    pub listen: SocketAddr,
    #[arg(long)]
    pub unix: Option<PathBuf>,
    #[arg(long)]
    pub upstream: SocketAddr,
}

impl Launch for HopForward {
    const NAME: &'static str = "hop-forward";

    fn args(&self) -> Args {
        let args = Args::new().arg(self.listen);
        let args = match &self.unix {
            Some(path) => args.path("--unix", path),
            None => args,
        };
        args.opt("--upstream", self.upstream)
    }
}

/// `hop-upstream`: the upstream (echo or sink) on `addr`.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct HopUpstream {
    pub addr: SocketAddr,
}

impl Launch for HopUpstream {
    const NAME: &'static str = "hop-upstream";

    fn args(&self) -> Args {
        Args::new().arg(self.addr)
    }
}

/// Where a hop client connects: the forwarder's TCP port (`ip:port`, which capture may send
/// elsewhere) or its Unix socket (`unix:PATH`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HopDst {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for HopDst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HopDst::Tcp(a) => write!(f, "{a}"),
            HopDst::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl FromStr for HopDst {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<HopDst> {
        match s.strip_prefix("unix:") {
            Some(path) => Ok(HopDst::Unix(path.into())),
            None => Ok(HopDst::Tcp(
                s.parse().with_context(|| format!("{s}: address"))?,
            )),
        }
    }
}

/// `hop-rr`: round trips of `size` bytes through `dst` for `secs`.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct HopRr {
    pub dst: HopDst,
    #[arg(long)]
    pub size: usize,
    #[arg(long)]
    pub secs: f64,
    #[command(flatten)]
    pub id: Identity,
}

impl Launch for HopRr {
    const NAME: &'static str = "hop-rr";

    fn args(&self) -> Args {
        Args::new()
            .arg(&self.dst)
            .opt("--size", self.size)
            .opt("--secs", self.secs)
            .id(self.id)
    }
}

/// `hop-bulk`: `bytes` through `dst` to the sink.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct HopBulk {
    pub dst: HopDst,
    #[arg(long)]
    pub bytes: usize,
    #[command(flatten)]
    pub id: Identity,
}

impl Launch for HopBulk {
    const NAME: &'static str = "hop-bulk";

    fn args(&self) -> Args {
        Args::new()
            .arg(&self.dst)
            .opt("--bytes", self.bytes)
            .id(self.id)
    }
}

/// Relay `down` to a new connection to `upstream`, both ways, each side half-closed when the
/// other has, until both have closed.
async fn relay<S>(mut down: S, upstream: SocketAddr)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, 64 << 10, 64 << 10).await;
}

/// Say why an accept failed (out of file descriptors, say) and give it a moment.
async fn accept_failed(e: std::io::Error) {
    eprintln!("hop-forward: accept: {e}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Forward connections on `listen` (and on the Unix socket `unix`) to `upstream` as a proxy
/// does: one thread running an event loop (tokio's current-thread runtime) over nonblocking
/// sockets. epoll reports data that sk_msg redirected to a socket as readable (tcp_bpf's
/// `sock_is_readable`, Linux 5.16 and later). Prints "ready" once bound.
fn forward(listen: SocketAddr, unix: Option<PathBuf>, upstream: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let tcp = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        if let Some(path) = unix {
            let _ = std::fs::remove_file(&path);
            let l = tokio::net::UnixListener::bind(&path)
                .with_context(|| format!("binding {}", path.display()))?;
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
            tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((c, _)) => drop(tokio::spawn(relay(c, upstream))),
                        Err(e) => accept_failed(e).await,
                    }
                }
            });
        }
        println!("ready");
        std::io::stdout().flush()?;
        loop {
            match tcp.accept().await {
                Ok((c, _)) => {
                    let _ = c.set_nodelay(true);
                    tokio::spawn(relay(c, upstream));
                }
                Err(e) => accept_failed(e).await,
            }
        }
    })
}

/// The upstream: a first byte `r` makes a connection an echo; `b` a sink that answers "ok"
/// with the byte count at EOF. Prints "ready" once bound.
fn upstream(addr: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    for c in l.incoming().flatten() {
        std::thread::spawn(move || -> Result<()> {
            c.set_nodelay(true)?;
            let mut c = c;
            let mut kind = [0u8; 1];
            c.read_exact(&mut kind)?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = c.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if kind[0] == b'r' {
                    c.write_all(&buf[..n])?;
                }
            }
            if kind[0] == b'b' {
                writeln!(c, "ok {total}")?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// A TCP or Unix-socket client stream.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn open(dst: &HopDst, spec: &ConnectSpec) -> Result<Conn> {
        match dst {
            HopDst::Unix(path) => Ok(Conn::Unix(
                UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?,
            )),
            HopDst::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, spec.timeout)
                    .with_context(|| format!("connect {addr}"))?;
                s.set_nodelay(true)?;
                Ok(Conn::Tcp(s))
            }
        }
    }

    fn write_all(&mut self, b: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.write_all(b),
            Conn::Unix(s) => s.write_all(b),
        }
    }

    fn shutdown_write(&self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => Patient(s).read(b),
            Conn::Unix(s) => s.read(b),
        }
    }
}

/// Round trips of `size` bytes for `secs` on one connection to `dst` (`ip:port` or
/// `unix:PATH`): "ROUND_TRIPS P50_US P99_US".
fn round_trips(dst: &HopDst, spec: &ConnectSpec, size: usize, secs: f64) -> Result<String> {
    take_credentials(spec)?;
    let mut c = Conn::open(dst, spec)?;
    c.write_all(b"r")?;
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut lat = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        let t = Instant::now();
        c.write_all(&msg)?;
        c.read_exact(&mut back)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let at = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Ok(format!("{} {:.1} {:.1}", lat.len(), at(0.5), at(0.99)))
}

/// `total` bytes in 64 KiB writes to `dst` and the upstream's count back: "BYTES_PER_SECOND".
fn bulk(dst: &HopDst, spec: &ConnectSpec, total: usize) -> Result<String> {
    take_credentials(spec)?;
    let mut c = Conn::open(dst, spec)?;
    let chunk = vec![9u8; 64 * 1024];
    let t = Instant::now();
    c.write_all(b"b")?;
    let mut sent = 0;
    while sent < total {
        let n = chunk.len().min(total - sent);
        c.write_all(&chunk[..n])?;
        sent += n;
    }
    c.shutdown_write()?;
    let mut answer = Vec::new();
    c.read_to_end(&mut answer)?;
    let secs = t.elapsed().as_secs_f64();
    let answer = String::from_utf8_lossy(&answer);
    if answer.trim() != format!("ok {total}") {
        bail!("the upstream answered {answer:?}, want \"ok {total}\"");
    }
    Ok(format!("{:.0}", total as f64 / secs))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Testkit {
        #[command(subcommand)]
        program: Program,
    }

    /// What `program` writes parses back into `program`.
    fn round_trip<P: Launch>(program: P, as_program: Program) {
        let argv: Vec<OsString> = std::iter::once(OsString::from("sockmesh-testkit"))
            .chain(program.argv())
            .collect();
        let parsed = Testkit::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{argv:?} does not parse: {e}"))
            .program;
        assert_eq!(parsed, as_program, "{argv:?}");
    }

    #[test]
    fn hop_launchers_parse_back() {
        let forward = HopForward {
            listen: "0.0.0.0:15001".parse().unwrap(),
            unix: Some("/tmp/hop/hop.sock".into()),
            upstream: "192.0.2.20:18100".parse().unwrap(),
        };
        round_trip(forward.clone(), Program::Forward(forward));
        let up = HopUpstream {
            addr: "192.0.2.20:18100".parse().unwrap(),
        };
        round_trip(up.clone(), Program::Upstream(up));
        for dst in [
            HopDst::Tcp("192.0.2.20:18100".parse().unwrap()),
            HopDst::Unix("/tmp/hop/hop.sock".into()),
        ] {
            let rr = HopRr {
                dst: dst.clone(),
                size: 64,
                secs: 0.3,
                id: Identity::APP,
            };
            round_trip(rr.clone(), Program::Rr(rr));
            let bulk = HopBulk {
                dst,
                bytes: 4 << 20,
                id: Identity::APP,
            };
            round_trip(bulk.clone(), Program::Bulk(bulk));
        }
    }
}

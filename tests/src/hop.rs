//! The app-to-proxy hop of the benchmark: a minimal forwarder standing where the proxy stands
//! (on the outbound port, and on a Unix socket for the Unix-socket baseline), an event loop as
//! proxies are, an upstream that echoes or sinks, and a client that measures round trips and
//! bulk throughput through them.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    accel::Patient,
    kit::{take_credentials, ConnectSpec},
};

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
pub fn forward(listen: SocketAddr, unix: Option<PathBuf>, upstream: SocketAddr) -> Result<()> {
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
pub fn upstream(addr: SocketAddr) -> Result<()> {
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
    fn open(dst: &str, spec: &ConnectSpec) -> Result<Conn> {
        if let Some(path) = dst.strip_prefix("unix:") {
            return Ok(Conn::Unix(
                UnixStream::connect(path).with_context(|| format!("connect {path}"))?,
            ));
        }
        let addr: SocketAddr = dst.parse().with_context(|| format!("{dst}: address"))?;
        let s = TcpStream::connect_timeout(&addr, spec.timeout)
            .with_context(|| format!("connect {addr}"))?;
        s.set_nodelay(true)?;
        Ok(Conn::Tcp(s))
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
pub fn round_trips(dst: &str, spec: &ConnectSpec, size: usize, secs: f64) -> Result<String> {
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
pub fn bulk(dst: &str, spec: &ConnectSpec, total: usize) -> Result<String> {
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

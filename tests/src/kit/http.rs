//! HTTP/1.1: the upstreams of the proxy suite (`http-serve`: each answer says who answered; and
//! `http-keepalive`, which counts requests per connection) and its clients (`http-get`,
//! `http-upgrade`, `http-transfer`, `http-stream`).

use std::{
    fmt,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{checksum, pattern, Args, ConnectSpec, Identity, Launch};

/// One upstream of `http-serve`: `name@addr:port[!status]` on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpUpstream {
    pub name: String,
    pub addr: SocketAddr,
    /// The status of every answer.
    pub status: u16,
}

impl HttpUpstream {
    /// An upstream answering 200.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> HttpUpstream {
        HttpUpstream::failing(name, addr, 200)
    }

    /// An upstream answering `status` to everything.
    pub fn failing(name: impl Into<String>, addr: SocketAddr, status: u16) -> HttpUpstream {
        HttpUpstream {
            name: name.into(),
            addr,
            status,
        }
    }
}

impl fmt::Display for HttpUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}!{}", self.name, self.addr, self.status)
    }
}

impl FromStr for HttpUpstream {
    type Err = anyhow::Error;

    fn from_str(spec: &str) -> Result<HttpUpstream> {
        let (name, rest) = spec
            .split_once('@')
            .with_context(|| format!("{spec}: want name@addr:port[!status]"))?;
        let (addr, status) = match rest.split_once('!') {
            Some((a, s)) => (a, s.parse().with_context(|| format!("{spec}: status"))?),
            None => (rest, 200),
        };
        let addr = addr.parse().with_context(|| format!("{spec}: address"))?;
        Ok(HttpUpstream::failing(name, addr, status))
    }
}

/// `http-serve`: minimal HTTP/1.1 upstreams. Each request is answered (with the upstream's
/// status) with `name METHOD PATH host=HOST from=PEER-IP` and an `x-upstream: name` header,
/// then closed; `/sleep/MS` answers after MS milliseconds, `/headers` with the request's
/// header names, `/bytes/N` with N pattern bytes, `/stream/N` with N chunks 200 ms apart; a
/// request body is summed; an `Upgrade` switches to an echo. With `log`, each plain request is
/// appended to that file as `name METHOD PATH host=HOST`. Prints "ready" once every address is
/// bound.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct HttpServe {
    pub upstreams: Vec<HttpUpstream>,
    /// Append each request to this file.
    #[arg(long)]
    pub log: Option<PathBuf>,
}

impl HttpServe {
    pub fn new(upstreams: impl IntoIterator<Item = HttpUpstream>) -> HttpServe {
        HttpServe {
            upstreams: upstreams.into_iter().collect(),
            log: None,
        }
    }

    pub fn run(self) -> Result<()> {
        let log = Arc::new(self.log);
        let mut threads = Vec::new();
        for up in self.upstreams {
            let listener =
                TcpListener::bind(up.addr).with_context(|| format!("binding {}", up.addr))?;
            let log = log.clone();
            threads.push(std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    let (name, log) = (up.name.clone(), log.clone());
                    std::thread::spawn(move || {
                        let _ = answer(conn, &name, up.status, log.as_deref());
                    });
                }
            }));
        }
        super::say_ready()?;
        super::join_all(threads);
        Ok(())
    }
}

impl Launch for HttpServe {
    const NAME: &'static str = "http-serve";

    fn args(&self) -> Args {
        let args = self.upstreams.iter().fold(Args::new(), Args::arg);
        match &self.log {
            Some(log) => args.path("--log", log),
            None => args,
        }
    }
}

/// A request's head as `http-serve` reads it.
struct Head {
    method: String,
    path: String,
    /// Header lines, `name: value`.
    headers: Vec<(String, String)>,
}

impl Head {
    /// Read up to the blank line; None if the client closed first.
    fn read(conn: &mut TcpStream) -> Result<Option<Head>> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if conn.read(&mut byte)? == 0 {
                return Ok(None);
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        let mut lines = head.lines();
        let mut first = lines.next().unwrap_or_default().split(' ');
        let (method, path) = (first.next().unwrap_or("?"), first.next().unwrap_or("?"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect();
        Ok(Some(Head {
            method: method.to_string(),
            path: path.to_string(),
            headers,
        }))
    }

    /// The value of header `name`.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// N of a path `PREFIX/N`.
    fn number_after<T: FromStr>(&self, prefix: &str) -> Option<T> {
        self.path.strip_prefix(prefix).and_then(|n| n.parse().ok())
    }
}

/// Answer one request on `conn` as upstream `name`.
fn answer(mut conn: TcpStream, name: &str, status: u16, log: Option<&Path>) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let peer = conn.peer_addr()?;
    let Some(head) = Head::read(&mut conn)? else {
        return Ok(());
    };
    if head.path == "/headers" {
        return answer_header_names(&mut conn, &head, name, status);
    }
    let length: usize = head
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if length > 0 {
        return answer_body_sum(&mut conn, name, status, length);
    }
    if let Some(n) = head.number_after("/bytes/") {
        return answer_bytes(&mut conn, status, n);
    }
    if let Some(proto) = head.header("upgrade") {
        return echo_after_upgrade(&mut conn, name, proto);
    }
    if let Some(n) = head.number_after("/stream/") {
        return answer_stream(&mut conn, name, status, n);
    }
    // /sleep/MS answers after MS milliseconds (a slow upstream).
    if let Some(ms) = head.number_after("/sleep/") {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let host = head.header("host").unwrap_or_default();
    let (method, path) = (&head.method, &head.path);
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

/// A closing answer with `body`.
fn answer_text(conn: &mut TcpStream, status: u16, body: &str) -> Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// /headers: the names of the request's headers, sorted (what a proxy forwarded).
fn answer_header_names(conn: &mut TcpStream, head: &Head, name: &str, status: u16) -> Result<()> {
    let mut names: Vec<String> = head
        .headers
        .iter()
        .map(|(k, _)| k.trim().to_ascii_lowercase())
        .collect();
    names.sort();
    answer_text(
        conn,
        status,
        &format!("{name} headers: {}\n", names.join(",")),
    )
}

/// A request body, read in full and summed.
fn answer_body_sum(conn: &mut TcpStream, name: &str, status: u16, length: usize) -> Result<()> {
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)?;
    let text = format!("{name} got {length} bytes sum={:016x}\n", checksum(&body));
    answer_text(conn, status, &text)
}

/// /bytes/N: N pattern bytes.
fn answer_bytes(conn: &mut TcpStream, status: u16, n: usize) -> Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status} X\r\ncontent-length: {n}\r\nconnection: close\r\n\r\n"
    )?;
    for chunk in pattern(n).chunks(64 * 1024) {
        conn.write_all(chunk)?;
    }
    Ok(())
}

/// Switch to `proto`, then echo every byte back until the client half-closes; then say goodbye.
fn echo_after_upgrade(conn: &mut TcpStream, name: &str, proto: &str) -> Result<()> {
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
    Ok(())
}

/// /stream/N: N chunks 200 ms apart (chunked), to see that they are not buffered.
fn answer_stream(conn: &mut TcpStream, name: &str, status: u16, n: usize) -> Result<()> {
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
    Ok(())
}

/// `http-keepalive`: keep-alive HTTP/1.1 upstreams on `addrs`; every request gets `200 ok`.
/// Prints "ready".
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct HttpKeepalive {
    pub addrs: Vec<SocketAddr>,
}

impl HttpKeepalive {
    pub fn run(self) -> Result<()> {
        let mut threads = Vec::new();
        for addr in self.addrs {
            let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            threads.push(std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    std::thread::spawn(move || {
                        let _ = keepalive_conn(conn);
                    });
                }
            }));
        }
        super::say_ready()?;
        super::join_all(threads);
        Ok(())
    }
}

impl Launch for HttpKeepalive {
    const NAME: &'static str = "http-keepalive";

    fn args(&self) -> Args {
        self.addrs.iter().fold(Args::new(), Args::arg)
    }
}

/// What a keep-alive server needs of a request's headers.
#[derive(Default)]
struct Framing {
    /// The client asked to close after this request.
    close: bool,
    content_length: usize,
}

/// Read head lines up to the blank one, noting the framing; None if the peer closed first.
fn read_framing(reader: &mut impl BufRead, line: &mut String) -> Result<Option<Framing>> {
    let mut framing = Framing::default();
    loop {
        line.clear();
        if reader.read_line(line)? == 0 {
            return Ok(None);
        }
        let l = line.trim_end();
        if l.is_empty() {
            return Ok(Some(framing));
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
                framing.close = true;
            }
            if k.eq_ignore_ascii_case("content-length") {
                framing.content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
}

/// Answer "ok" to each request on `conn` until the client closes it or asks to; the
/// `x-request-on-connection` header counts the connection's requests (1, 2, ...).
fn keepalive_conn(conn: TcpStream) -> Result<()> {
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    let mut line = String::new();
    for served in 1u64.. {
        let Some(framing) = read_framing(&mut reader, &mut line)? else {
            return Ok(());
        };
        let mut body = vec![0u8; framing.content_length];
        reader.read_exact(&mut body)?;
        write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-request-on-connection: {served}\r\n\r\nok"
        )?;
        if framing.close {
            return Ok(());
        }
    }
    Ok(())
}

/// Read one HTTP/1.1 response with a content-length (head into `line`, body into `body`).
pub(crate) fn read_response(
    reader: &mut impl BufRead,
    line: &mut String,
    body: &mut Vec<u8>,
) -> Result<()> {
    let Some(framing) = read_framing(reader, line)? else {
        bail!("the server closed the connection");
    };
    body.resize(framing.content_length, 0);
    reader.read_exact(body)?;
    Ok(())
}

/// `http-get`: one HTTP/1.1 GET, or with `--h2c` one HTTP/2 GET with prior knowledge
/// (credentials taken first); prints the whole response (h2c's as "HTTP/2 <status>", a blank
/// line and the body).
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct HttpGet {
    pub dst: SocketAddr,
    #[arg(long, default_value = "/")]
    pub path: String,
    #[arg(long)]
    pub host: String,
    /// Extra request headers, "name: value".
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Shut the write side once the request is sent (as `nc -N` does), then read the response.
    #[arg(long)]
    pub half_close: bool,
    /// HTTP/2 with prior knowledge (no extra headers, no half-close).
    #[arg(long, conflicts_with_all = ["headers", "half_close"])]
    pub h2c: bool,
    #[command(flatten)]
    pub id: Identity,
}

impl HttpGet {
    /// A GET of `path` from `host` at `dst`, as `id`, with no extra header.
    pub fn new(dst: SocketAddr, path: &str, host: &str, id: Identity) -> HttpGet {
        HttpGet {
            dst,
            path: path.into(),
            host: host.into(),
            headers: Vec::new(),
            half_close: false,
            h2c: false,
            id,
        }
    }

    pub fn run(self) -> Result<()> {
        let mut s = ConnectSpec::to(self.dst, self.id).open()?;
        if self.h2c {
            print!("{}", super::h2c::get(s, &self.host, &self.path)?);
            return Ok(());
        }
        let mut req = format!(
            "GET {} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n",
            self.path, self.host
        );
        for h in &self.headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        if self.half_close {
            s.shutdown(std::net::Shutdown::Write).context("shutdown")?;
        }
        let mut out = String::new();
        s.read_to_string(&mut out).context("read")?;
        print!("{out}");
        Ok(())
    }
}

impl Launch for HttpGet {
    const NAME: &'static str = "http-get";

    fn args(&self) -> Args {
        let args = Args::new()
            .arg(self.dst)
            .opt("--path", &self.path)
            .opt("--host", &self.host);
        let mut args = self.headers.iter().fold(args, |a, h| a.opt("--header", h));
        if self.half_close {
            args = args.arg("--half-close");
        }
        if self.h2c {
            args = args.arg("--h2c");
        }
        args.id(self.id)
    }
}

/// `http-upgrade`: an HTTP/1.1 upgrade (`Upgrade: echo`); after the 101, sends `message`,
/// half-closes, and prints everything that came after the response head.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct HttpUpgrade {
    pub dst: SocketAddr,
    #[arg(long)]
    pub host: String,
    #[arg(long)]
    pub message: String,
    #[command(flatten)]
    pub id: Identity,
}

impl HttpUpgrade {
    pub fn new(dst: SocketAddr, host: &str, message: &str, id: Identity) -> HttpUpgrade {
        HttpUpgrade {
            dst,
            host: host.into(),
            message: message.into(),
            id,
        }
    }

    pub fn run(self) -> Result<()> {
        let mut s = ConnectSpec::to(self.dst, self.id).open()?;
        write!(
            s,
            "GET /ws HTTP/1.1\r\nhost: {}\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n",
            self.host
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
        s.write_all(self.message.as_bytes())?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut rest = String::new();
        s.read_to_string(&mut rest)?;
        print!("{rest}");
        Ok(())
    }
}

impl Launch for HttpUpgrade {
    const NAME: &'static str = "http-upgrade";

    fn args(&self) -> Args {
        Args::new()
            .arg(self.dst)
            .opt("--host", &self.host)
            .opt("--message", &self.message)
            .id(self.id)
    }
}

/// `http-transfer`: a POST of `bytes` pattern bytes (written in pieces, as a stream), or with
/// 0 a GET; prints "status=S len=L sum=X" of the response body.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct HttpTransfer {
    pub dst: SocketAddr,
    #[arg(long, default_value = "/")]
    pub path: String,
    #[arg(long)]
    pub host: String,
    #[arg(long, default_value = "0")]
    pub bytes: usize,
    #[command(flatten)]
    pub id: Identity,
}

impl HttpTransfer {
    pub fn new(dst: SocketAddr, path: &str, host: &str, bytes: usize, id: Identity) -> Self {
        HttpTransfer {
            dst,
            path: path.into(),
            host: host.into(),
            bytes,
            id,
        }
    }

    pub fn run(self) -> Result<()> {
        let mut s = ConnectSpec::to(self.dst, self.id).open()?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let (n, path, host) = (self.bytes, &self.path, &self.host);
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
        println!(
            "status={status} len={} sum={:016x}",
            body.len(),
            checksum(body)
        );
        Ok(())
    }
}

impl Launch for HttpTransfer {
    const NAME: &'static str = "http-transfer";

    fn args(&self) -> Args {
        Args::new()
            .arg(self.dst)
            .opt("--path", &self.path)
            .opt("--host", &self.host)
            .opt("--bytes", self.bytes)
            .id(self.id)
    }
}

/// `http-stream`: GET `/stream/N` and watch the chunks arrive; prints how many, and whether
/// the last came at least 100 ms per gap after the first (sent 200 ms apart: a proxy that
/// buffered the body would deliver them together).
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct HttpStream {
    pub dst: SocketAddr,
    #[arg(long, default_value = "4")]
    pub chunks: usize,
    #[arg(long)]
    pub host: String,
    #[command(flatten)]
    pub id: Identity,
}

impl HttpStream {
    /// Four chunks from `host` at `dst`, as `id`.
    pub fn new(dst: SocketAddr, host: &str, id: Identity) -> HttpStream {
        HttpStream {
            dst,
            chunks: 4,
            host: host.into(),
            id,
        }
    }

    pub fn run(self) -> Result<()> {
        let n = self.chunks;
        let mut s = ConnectSpec::to(self.dst, self.id).open()?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            s,
            "GET /stream/{n} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            self.host
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
                first = Some(Instant::now());
            }
            if last.is_none() && text.contains(&format!(" chunk {}\n", n.saturating_sub(1))) {
                last = Some(Instant::now());
            }
        }
        let text = String::from_utf8_lossy(&all);
        let chunks = text.matches(" chunk ").count();
        let spread = match (first, last) {
            (Some(f), Some(l)) => {
                l.duration_since(f) >= Duration::from_millis(100 * (n as u64 - 1))
            }
            _ => false,
        };
        println!("chunks={chunks} streamed={spread}");
        Ok(())
    }
}

impl Launch for HttpStream {
    const NAME: &'static str = "http-stream";

    fn args(&self) -> Args {
        Args::new()
            .arg(self.dst)
            .opt("--chunks", self.chunks)
            .opt("--host", &self.host)
            .id(self.id)
    }
}

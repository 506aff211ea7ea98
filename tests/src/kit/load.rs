//! Load: connections one after another while the agent is killed and replaced (`load`, which
//! counts those that escaped capture), and the benchmark's load generators (`bench-connect`:
//! short connections per second; `bench-http`: requests per second and latency, over HTTP/1.1,
//! h2c or plain TCP exchanges).

use std::{
    io::{BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::{
    http::read_response, take_credentials, tcp::connect, Args, ConnectSpec, Identity, Launch,
    Outcome,
};

/// `load`: connect to `dst` over and over until the file `stop` exists, checking each lands on
/// `expect` (and, with `--from`, that the listener saw the client at that address); print a
/// JSON [`LoadReport`].
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct Load {
    pub dst: SocketAddr,
    #[arg(long)]
    pub expect: String,
    #[arg(long)]
    pub stop: PathBuf,
    #[command(flatten)]
    pub id: Identity,
    #[arg(long, default_value = "60000")]
    pub max_ms: u64,
    /// The client address the listener must see (a proxy's, when one is in the path).
    #[arg(long)]
    pub from: Option<String>,
}

impl Load {
    /// Connections as `id` to `dst` that should land on `expect`, until `stop` exists (a
    /// minute at the most).
    pub fn new(dst: SocketAddr, expect: &str, stop: PathBuf, id: Identity) -> Load {
        Load {
            dst,
            expect: expect.into(),
            stop,
            id,
            max_ms: 60_000,
            from: None,
        }
    }

    pub fn run(self) -> Result<()> {
        let spec = ConnectSpec {
            timeout: Duration::from_secs(2),
            ..ConnectSpec::to(self.dst, self.id)
        };
        let max = Duration::from_millis(self.max_ms);
        let expect = Expect {
            listener: &self.expect,
            from: self.from.as_deref(),
        };
        let report = load(&spec, &expect, &self.stop, max);
        println!("{}", serde_json::to_string(&report)?);
        Ok(())
    }
}

impl Launch for Load {
    const NAME: &'static str = "load";

    fn args(&self) -> Args {
        Args::new()
            .arg(self.dst)
            .opt("--expect", &self.expect)
            .path("--stop", &self.stop)
            .id(self.id)
            .opt("--max-ms", self.max_ms)
            .opt_some("--from", self.from.as_ref())
    }
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

/// Where a load's connections must land.
pub struct Expect<'a> {
    pub listener: &'a str,
    /// The client address the listener must see.
    pub from: Option<&'a str>,
}

impl LoadReport {
    /// Count `outcome`, keeping the first few that did not land as `expect` says.
    fn count(&mut self, outcome: &Outcome, expect: &Expect<'_>) {
        match outcome {
            Outcome::Ok {
                listener,
                client_ip,
                ..
            } if listener == expect.listener && expect.from.is_none_or(|f| f == client_ip) => {
                self.captured += 1;
                return;
            }
            Outcome::Ok { .. } => self.escaped += 1,
            _ => self.failed += 1,
        }
        if self.samples.len() < 5 {
            self.samples.push(format!("{outcome:?}"));
        }
    }
}

/// Open connections to `spec.dst` one after another until `stop` exists (or `max` elapses),
/// checking that each lands as `expect` says.
pub fn load(spec: &ConnectSpec, expect: &Expect<'_>, stop: &Path, max: Duration) -> LoadReport {
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
    let deadline = Instant::now() + max;
    while !stop.exists() && Instant::now() < deadline {
        report.count(&connect(&one), expect);
    }
    report
}

/// `bench-connect`: open and close connections to `dst` for `secs` (reading until the listener
/// closes); prints the number completed.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct BenchConnect {
    pub dst: SocketAddr,
    #[arg(long)]
    pub secs: f64,
    #[command(flatten)]
    pub id: Identity,
}

impl BenchConnect {
    pub fn run(self) -> Result<()> {
        take_credentials(&ConnectSpec::to(self.dst, self.id))?;
        let end = Instant::now() + Duration::from_secs_f64(self.secs);
        let mut n = 0u64;
        let mut sink = Vec::new();
        while Instant::now() < end {
            let mut s =
                TcpStream::connect(self.dst).with_context(|| format!("connect {}", self.dst))?;
            sink.clear();
            s.read_to_end(&mut sink)?;
            n += 1;
        }
        println!("{n}");
        Ok(())
    }
}

impl Launch for BenchConnect {
    const NAME: &'static str = "bench-connect";

    fn args(&self) -> Args {
        Args::new()
            .arg(self.dst)
            .opt("--secs", self.secs)
            .id(self.id)
    }
}

/// What `bench-http`'s clients speak.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Wire {
    /// HTTP/1.1 GETs.
    #[default]
    Http1,
    /// HTTP/2 GETs with prior knowledge, one stream at a time per connection.
    H2c,
    /// 64-byte exchanges with an echo upstream (`hop-upstream`), a TCP relay's request.
    Tcp,
}

impl Wire {
    pub fn name(self) -> &'static str {
        match self {
            Wire::Http1 => "http1",
            Wire::H2c => "h2c",
            Wire::Tcp => "tcp",
        }
    }
}

/// The size of a TCP exchange, each way.
pub const EXCHANGE: usize = 64;

/// `bench-http`: requests to `dst` from `conns` clients for `secs`; prints "requests p50_us
/// p99_us". Each client keeps one connection alive, or (`new_conn`) opens a connection per
/// request (over HTTP/1.1 it asks with `connection: close`) and closes it after the answer; its
/// latency includes the connect. `wire`: HTTP/1.1 GETs of `host`, h2c GETs of `host`, or
/// 64-byte exchanges with an echo.
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct BenchHttp {
    pub dst: SocketAddr,
    #[arg(long)]
    pub host: String,
    #[arg(long, default_value = "4")]
    pub conns: usize,
    #[arg(long)]
    pub secs: f64,
    /// A new connection per request instead of keep-alive.
    #[arg(long)]
    pub new_conn: bool,
    #[arg(long, value_enum, default_value_t)]
    pub wire: Wire,
    #[command(flatten)]
    pub id: Identity,
}

impl Launch for BenchHttp {
    const NAME: &'static str = "bench-http";

    fn args(&self) -> Args {
        Args::new()
            .arg(self.dst)
            .opt("--host", &self.host)
            .opt("--conns", self.conns)
            .opt("--secs", self.secs)
            .switch("--new-conn", self.new_conn)
            .opt("--wire", self.wire.name())
            .id(self.id)
    }
}

/// A client's connection: a buffered reader and the writing half.
type HttpConn = (BufReader<TcpStream>, TcpStream);

impl BenchHttp {
    pub fn run(self) -> Result<()> {
        take_credentials(&ConnectSpec::to(self.dst, self.id))?;
        let end = Instant::now() + Duration::from_secs_f64(self.secs);
        let workers: Vec<_> = (0..self.conns)
            .map(|_| {
                let client = self.clone();
                std::thread::spawn(move || match client.wire {
                    Wire::Http1 => client.http1(end),
                    Wire::H2c => super::h2c::client(client.dst, &client.host, client.new_conn, end),
                    Wire::Tcp => client.tcp(end),
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
        println!("{} {} {}", all.len(), pct(0.5), pct(0.99));
        Ok(())
    }

    fn connect(&self) -> Result<TcpStream> {
        let s = TcpStream::connect(self.dst).with_context(|| format!("connect {}", self.dst))?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    fn connect_http(&self) -> Result<HttpConn> {
        let s = self.connect()?;
        Ok((BufReader::new(s.try_clone()?), s))
    }

    /// One HTTP/1.1 client's requests until `end`: each one's latency in µs.
    fn http1(&self, end: Instant) -> Result<Vec<u32>> {
        let close = if self.new_conn {
            "connection: close\r\n"
        } else {
            ""
        };
        let request = format!("GET / HTTP/1.1\r\nhost: {}\r\n{close}\r\n", self.host);
        let mut conn = if self.new_conn {
            None
        } else {
            Some(self.connect_http()?)
        };
        let mut lat = Vec::new();
        let mut line = String::new();
        let mut body = Vec::new();
        while Instant::now() < end {
            let t = Instant::now();
            let (reader, out) = match &mut conn {
                Some(c) => c,
                slot => slot.insert(self.connect_http()?),
            };
            out.write_all(request.as_bytes())?;
            read_response(reader, &mut line, &mut body)?;
            if self.new_conn {
                conn = None;
            }
            lat.push(micros(t));
        }
        Ok(lat)
    }

    /// One TCP client's exchanges until `end`: each one's latency in µs. A connection starts
    /// with `r`, which makes `hop-upstream` an echo; with `new_conn` it closes after one
    /// exchange.
    fn tcp(&self, end: Instant) -> Result<Vec<u32>> {
        let open = || -> Result<TcpStream> {
            let mut s = self.connect()?;
            s.write_all(b"r")?;
            Ok(s)
        };
        let mut conn = if self.new_conn { None } else { Some(open()?) };
        let msg = [7u8; EXCHANGE];
        let mut back = [0u8; EXCHANGE];
        let mut lat = Vec::new();
        while Instant::now() < end {
            let t = Instant::now();
            let s = match &mut conn {
                Some(c) => c,
                slot => slot.insert(open()?),
            };
            s.write_all(&msg)?;
            s.read_exact(&mut back)
                .context("reading the echo of an exchange")?;
            anyhow::ensure!(back == msg, "the echo differs from the exchange sent");
            if self.new_conn {
                conn = None;
            }
            lat.push(micros(t));
        }
        Ok(lat)
    }
}

/// µs since `t`, saturated to u32.
pub(crate) fn micros(t: Instant) -> u32 {
    t.elapsed().as_micros().min(u32::MAX as u128) as u32
}

/// `hold`: open `count` connections to `dst` and keep every one open until all are made, each
/// read for its listener's report; print how many reported each original destination. With
/// `--listen PORT` it is the proxy too: it listens on PORT first and accepts only once every
/// connection is made, then asks each for its original destination (a proxy that reads late).
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub dst: SocketAddr,
    #[arg(long)]
    pub count: usize,
    #[arg(long)]
    pub listen: Option<u16>,
    /// After printing, keep the connections open until killed.
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub id: Identity,
}

/// What `hold` saw: original destinations (as the listeners reported them) by count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReport {
    pub opened: usize,
    pub failed: usize,
    pub orig: std::collections::BTreeMap<String, usize>,
}

impl Launch for Hold {
    const NAME: &'static str = "hold";

    fn args(&self) -> Args {
        Args::new()
            .arg(self.dst)
            .opt("--count", self.count)
            .opt_some("--listen", self.listen)
            .switch("--keep", self.keep)
            .id(self.id)
    }
}

impl Hold {
    pub fn run(self) -> Result<()> {
        if let Some(port) = self.listen {
            return self.late(port);
        }
        take_credentials(&ConnectSpec::to(self.dst, self.id))?;
        let mut report = HoldReport::default();
        let mut open = Vec::with_capacity(self.count);
        for _ in 0..self.count {
            let line =
                TcpStream::connect_timeout(&self.dst, Duration::from_secs(2)).and_then(|s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    let mut line = String::new();
                    std::io::BufRead::read_line(&mut BufReader::new(&s), &mut line)?;
                    open.push(s);
                    Ok(line)
                });
            match line {
                Ok(l) => {
                    let orig = l
                        .split_whitespace()
                        .find_map(|f| f.strip_prefix("orig="))
                        .unwrap_or("-")
                        .to_string();
                    *report.orig.entry(orig).or_default() += 1;
                    report.opened += 1;
                }
                Err(_) => report.failed += 1,
            }
        }
        println!("{}", serde_json::to_string(&report)?);
        if self.keep {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        drop(open);
        Ok(())
    }

    /// Listen on `port` (0.0.0.0; its backlog holds them all), make every connection, then
    /// accept them and ask each for its original destination.
    fn late(self, port: u16) -> Result<()> {
        anyhow::ensure!(
            self.count <= 128,
            "--listen holds at most 128 (its backlog)"
        );
        let listener =
            super::socket::bind_listener(SocketAddr::from(([0, 0, 0, 0], port)), false, false)?;
        take_credentials(&ConnectSpec::to(self.dst, self.id))?;
        let mut report = HoldReport::default();
        let mut open = Vec::with_capacity(self.count);
        for _ in 0..self.count {
            match TcpStream::connect_timeout(&self.dst, Duration::from_secs(2)) {
                Ok(s) => open.push(s),
                Err(_) => report.failed += 1,
            }
        }
        for _ in 0..open.len() {
            let (conn, peer) = listener.accept()?;
            let orig =
                super::sockaddr::original_dst_text(std::os::fd::AsRawFd::as_raw_fd(&conn), peer);
            *report.orig.entry(orig).or_default() += 1;
            report.opened += 1;
        }
        println!("{}", serde_json::to_string(&report)?);
        Ok(())
    }
}

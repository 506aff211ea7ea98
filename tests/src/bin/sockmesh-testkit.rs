//! Test programs for the lab namespaces: `listen` and `connect` (see sockmesh_tests::kit), and
//! `lab`, the demo behind `cargo xtask lab`.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};
use sockmesh_tests::kit::{self, ConnectSpec, Identity};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve listeners given as name@addr:port until killed; prints "ready" when bound.
    Listen { specs: Vec<String> },
    /// Connect once and print the outcome as JSON.
    Connect {
        dst: SocketAddr,
        #[command(flatten)]
        id: Identity,
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
        /// Dial an IPv4 destination from an AF_INET6 socket as ::ffff:a.b.c.d.
        #[arg(long)]
        v4_mapped: bool,
        #[arg(long, default_value = "2000")]
        timeout_ms: u64,
        /// Keep the connection open this long after reading the listener's report.
        #[arg(long, default_value = "0")]
        hold_ms: u64,
        /// Create the socket before taking on --uid/--gid.
        #[arg(long)]
        creds_after_socket: bool,
        /// Send one UDP datagram (connected or unconnected socket) instead of TCP.
        #[arg(long)]
        udp: Option<String>,
    },
    /// Connect once (as --uid/--gid) and print everything the server sends.
    Fetch {
        dst: SocketAddr,
        #[command(flatten)]
        id: Identity,
    },
    /// A minimal transparent proxy on the outbound and inbound capture ports.
    Proxy {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "15001")]
        outbound: u16,
        #[arg(long, default_value = "15006")]
        inbound: u16,
        /// TPROXY mode: transparent inbound listener, original-source upstream with this mark.
        #[arg(long)]
        tproxy_mark: Option<u32>,
    },
    /// Connect to DST over and over (as --uid/--gid) until the file --stop exists, checking
    /// each lands on --expect; print a JSON report.
    Load {
        dst: SocketAddr,
        #[arg(long)]
        expect: String,
        #[arg(long)]
        stop: std::path::PathBuf,
        #[command(flatten)]
        id: Identity,
        #[arg(long, default_value = "60000")]
        max_ms: u64,
    },
    /// HTTP/1.1 upstreams `name@addr:port` that say who answered; prints "ready".
    HttpServe {
        specs: Vec<String>,
        /// Append each request to this file.
        #[arg(long)]
        log: Option<std::path::PathBuf>,
    },
    /// One HTTP/1.1 GET (as --uid/--gid); prints the whole response.
    HttpGet {
        dst: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long)]
        host: String,
        /// Extra request headers, "name: value".
        #[arg(long = "header")]
        headers: Vec<String>,
        #[command(flatten)]
        id: Identity,
    },
    /// An HTTP/1.1 upgrade to an echo protocol; sends MESSAGE, half-closes, prints the rest.
    HttpUpgrade {
        dst: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long)]
        message: String,
        #[command(flatten)]
        id: Identity,
    },
    /// A gRPC upstream on ADDR; prints "ready".
    GrpcServe { addr: SocketAddr },
    /// gRPC calls through DST with --authority; prints their outcomes.
    GrpcCall {
        dst: SocketAddr,
        #[arg(long)]
        authority: String,
        /// Instead: this many clients connect, then all call Status at once; prints the
        /// number of calls that succeeded.
        #[arg(long)]
        together: Option<usize>,
        #[command(flatten)]
        id: Identity,
    },
    /// Send a TLS ClientHello with --sni to DST; print what comes back.
    TlsHello {
        dst: SocketAddr,
        #[arg(long)]
        sni: String,
        #[command(flatten)]
        id: Identity,
    },
    /// Keep-alive HTTP/1.1 upstreams answering "ok"; prints "ready".
    HttpKeepalive { addrs: Vec<SocketAddr> },
    /// Connections opened and closed to DST for --secs; prints the count.
    BenchConnect {
        dst: SocketAddr,
        #[arg(long)]
        secs: f64,
        #[command(flatten)]
        id: Identity,
    },
    /// GETs to DST, keep-alive or (--new-conn) a connection each; prints "requests p50_us p99_us".
    BenchHttp {
        dst: SocketAddr,
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "4")]
        conns: usize,
        #[arg(long)]
        secs: f64,
        /// A new connection per request (`connection: close`) instead of keep-alive.
        #[arg(long)]
        new_conn: bool,
        #[command(flatten)]
        id: Identity,
    },
    /// The benchmark suite (run by `cargo xtask bench`): prints a Markdown report.
    Bench {
        /// Tiny sizes: checks that the suite runs, measures nothing worth quoting.
        #[arg(long)]
        smoke: bool,
        /// Write the report here as well.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// POST --bytes pattern bytes (or GET when 0) to DST; prints status, length and sum of the
    /// response body.
    HttpTransfer {
        dst: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long)]
        host: String,
        #[arg(long, default_value = "0")]
        bytes: usize,
        #[command(flatten)]
        id: Identity,
    },
    /// The benchmark's minimal forwarder: LISTEN (and --unix PATH) relayed to --upstream.
    HopForward {
        listen: SocketAddr,
        #[arg(long)]
        unix: Option<std::path::PathBuf>,
        #[arg(long)]
        upstream: SocketAddr,
    },
    /// The benchmark's upstream (echo or sink) on ADDR.
    HopUpstream { addr: SocketAddr },
    /// Round trips of --size bytes through DST (ip:port or unix:PATH) for --secs.
    HopRr {
        dst: String,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        secs: f64,
        #[command(flatten)]
        id: Identity,
    },
    /// --bytes through DST (ip:port or unix:PATH) to the sink; bytes per second.
    HopBulk {
        dst: String,
        #[arg(long)]
        bytes: usize,
        #[command(flatten)]
        id: Identity,
    },
    /// Serve socket-acceleration cases (see sockmesh_tests::accel) on ADDR.
    AccelServe {
        addr: SocketAddr,
        #[arg(long)]
        log: std::path::PathBuf,
    },
    /// Run one socket-acceleration case against DST; prints its outcome.
    AccelCase {
        dst: SocketAddr,
        case: String,
        #[command(flatten)]
        id: Identity,
    },
    /// GET /stream/N from DST; prints how many chunks came and whether they came spread out.
    HttpStream {
        dst: SocketAddr,
        #[arg(long, default_value = "4")]
        chunks: usize,
        #[arg(long)]
        host: String,
        #[command(flatten)]
        id: Identity,
    },
    /// The demo lab: pods in netns, the agent, a listener on 15001, real connections, dump.
    Lab,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Listen { specs } => kit::listen(&specs),
        Cmd::Connect {
            dst,
            id,
            bind,
            v4_mapped,
            timeout_ms,
            hold_ms,
            creds_after_socket,
            udp,
        } => {
            let udp = match udp.as_deref() {
                None => None,
                Some("connected") => Some(kit::UdpMode::Connected),
                Some("unconnected") => Some(kit::UdpMode::Unconnected),
                Some(other) => anyhow::bail!("--udp {other}: want connected or unconnected"),
            };
            let outcome = kit::connect(&ConnectSpec {
                bind,
                v4_mapped,
                timeout: Duration::from_millis(timeout_ms),
                hold: Duration::from_millis(hold_ms),
                creds_after_socket,
                udp,
                ..ConnectSpec::to(dst, id)
            });
            println!("{}", serde_json::to_string(&outcome)?);
            Ok(())
        }
        Cmd::Fetch { dst, id } => {
            let body = kit::fetch(&ConnectSpec {
                timeout: Duration::from_secs(3),
                ..ConnectSpec::to(dst, id)
            })?;
            print!("{body}");
            Ok(())
        }
        Cmd::HttpUpgrade {
            dst,
            host,
            message,
            id,
        } => {
            let out = kit::http_upgrade(&ConnectSpec::to(dst, id), &host, &message)?;
            print!("{out}");
            Ok(())
        }
        Cmd::GrpcServe { addr } => kit::grpc_server(addr),
        Cmd::HttpTransfer {
            dst,
            path,
            host,
            bytes,
            id,
        } => {
            let spec = ConnectSpec::to(dst, id);
            println!("{}", kit::http_transfer(&spec, &path, &host, bytes)?);
            Ok(())
        }
        Cmd::HttpStream {
            dst,
            chunks,
            host,
            id,
        } => {
            let spec = ConnectSpec::to(dst, id);
            println!("{}", kit::http_stream(&spec, chunks, &host)?);
            Ok(())
        }
        Cmd::HttpKeepalive { addrs } => kit::http_keepalive_server(&addrs),
        Cmd::HopForward {
            listen,
            unix,
            upstream,
        } => sockmesh_tests::hop::forward(listen, unix, upstream),
        Cmd::HopUpstream { addr } => sockmesh_tests::hop::upstream(addr),
        Cmd::HopRr {
            dst,
            size,
            secs,
            id,
        } => {
            let spec = ConnectSpec::by(id);
            println!(
                "{}",
                sockmesh_tests::hop::round_trips(&dst, &spec, size, secs)?
            );
            Ok(())
        }
        Cmd::HopBulk { dst, bytes, id } => {
            let spec = ConnectSpec::by(id);
            println!("{}", sockmesh_tests::hop::bulk(&dst, &spec, bytes)?);
            Ok(())
        }
        Cmd::AccelServe { addr, log } => sockmesh_tests::accel::serve(addr, log),
        Cmd::AccelCase { dst, case, id } => {
            let mut spec = ConnectSpec::to(dst, id);
            spec.timeout = std::time::Duration::from_secs(20);
            println!("{}", sockmesh_tests::accel::client(&spec, &case)?);
            let early =
                sockmesh_tests::accel::EARLY_EAGAIN.load(std::sync::atomic::Ordering::Relaxed);
            eprintln!("{case}: blocking reads that returned EAGAIN early: {early}");
            Ok(())
        }
        Cmd::BenchConnect { dst, secs, id } => {
            let spec = ConnectSpec::to(dst, id);
            println!("{}", kit::bench_connect(&spec, secs)?);
            Ok(())
        }
        Cmd::BenchHttp {
            dst,
            host,
            conns,
            secs,
            new_conn,
            id,
        } => {
            let spec = ConnectSpec::to(dst, id);
            let (n, p50, p99) = kit::bench_http(&spec, &host, conns, secs, new_conn)?;
            println!("{n} {p50} {p99}");
            Ok(())
        }
        Cmd::Bench { smoke, out } => {
            let report = sockmesh_tests::bench::run(smoke)?;
            print!("{report}");
            if let Some(path) = out {
                std::fs::write(&path, &report)?;
            }
            Ok(())
        }
        Cmd::TlsHello { dst, sni, id } => {
            let out = kit::tls_hello(&ConnectSpec::to(dst, id), &sni)?;
            print!("{out}");
            Ok(())
        }
        Cmd::GrpcCall {
            dst,
            authority,
            together,
            id,
        } => {
            let spec = ConnectSpec::to(dst, id);
            let out = match together {
                None => kit::grpc_call(&spec, &authority)?,
                Some(n) => kit::grpc_calls_together(&spec, &authority, n)?,
            };
            println!("{out}");
            Ok(())
        }
        Cmd::HttpServe { specs, log } => kit::http_server(&specs, log),
        Cmd::HttpGet {
            dst,
            path,
            host,
            headers,
            id,
        } => {
            let out = kit::http_get(&ConnectSpec::to(dst, id), &path, &host, &headers)?;
            print!("{out}");
            Ok(())
        }
        Cmd::Proxy {
            name,
            outbound,
            inbound,
            tproxy_mark,
        } => kit::proxy(&name, outbound, inbound, tproxy_mark),
        Cmd::Load {
            dst,
            expect,
            stop,
            id,
            max_ms,
        } => {
            let spec = ConnectSpec {
                timeout: Duration::from_secs(2),
                ..ConnectSpec::to(dst, id)
            };
            let report = kit::load(&spec, &expect, &stop, Duration::from_millis(max_ms));
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Cmd::Lab => sockmesh_tests::demo::run(),
    }
}

//! Typed launchers: each testkit program is a struct (its flags as fields) that the
//! `sockmesh-testkit` binary parses with clap and that a suite builds and turns back into a
//! command line with [`Launch::args`], so a suite names fields, never flags. The round-trip tests
//! at the bottom parse what every launcher writes and compare it with the launcher.

use std::{
    ffi::{OsStr, OsString},
    fmt::Display,
};

use anyhow::Result;

use super::{grpc, http, load, proxy, tcp, tls, Identity};
use crate::accel;

/// A testkit program that a suite can start: its subcommand's name and its arguments.
pub trait Launch {
    /// The subcommand's name, which [`Program`] (or the binary's own enum) gives clap.
    const NAME: &'static str;

    /// The arguments after the subcommand's name.
    fn args(&self) -> Args;

    /// The whole argument list: the subcommand's name, then its arguments.
    fn argv(&self) -> Vec<OsString> {
        let mut v = vec![OsString::from(Self::NAME)];
        v.extend(self.args().0);
        v
    }
}

/// A command line being written, flag by flag.
#[derive(Debug, Default)]
pub struct Args(Vec<OsString>);

impl Args {
    pub fn new() -> Args {
        Args::default()
    }

    /// A positional argument.
    pub fn arg(mut self, value: impl Display) -> Args {
        self.0.push(value.to_string().into());
        self
    }

    /// A positional path (or other OS string).
    pub fn os(mut self, value: impl AsRef<OsStr>) -> Args {
        self.0.push(value.as_ref().to_os_string());
        self
    }

    /// `flag value`.
    pub fn opt(self, flag: &str, value: impl Display) -> Args {
        self.arg(flag).arg(value)
    }

    /// `flag value` when there is a value.
    pub fn opt_some(self, flag: &str, value: Option<impl Display>) -> Args {
        match value {
            Some(v) => self.opt(flag, v),
            None => self,
        }
    }

    /// `flag path`.
    pub fn path(self, flag: &str, value: impl AsRef<OsStr>) -> Args {
        self.arg(flag).os(value)
    }

    /// `flag` alone, when `on`.
    pub fn switch(self, flag: &str, on: bool) -> Args {
        if on {
            self.arg(flag)
        } else {
            self
        }
    }

    /// `--uid`/`--gid` of `id`, those it has.
    pub fn id(self, id: Identity) -> Args {
        self.opt_some("--uid", id.uid).opt_some("--gid", id.gid)
    }
}

impl IntoIterator for Args {
    type Item = OsString;
    type IntoIter = std::vec::IntoIter<OsString>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// The testkit's programs shared by the suites (the binary adds the demo, the benchmark and the
/// benchmark's hop).
#[derive(clap::Subcommand, Clone, Debug, PartialEq)]
pub enum Program {
    /// Serve listeners given as [KIND/]name@addr:port until killed; prints "ready" when bound.
    #[command(name = tcp::Listen::NAME)]
    Listen(tcp::Listen),
    /// Connect once and print the outcome as JSON.
    #[command(name = tcp::Connect::NAME)]
    Connect(tcp::Connect),
    /// Connect once (as --uid/--gid) and print everything the server sends.
    #[command(name = tcp::Fetch::NAME)]
    Fetch(tcp::Fetch),
    /// A minimal transparent proxy on the outbound and inbound capture ports.
    #[command(name = proxy::Proxy::NAME)]
    Proxy(proxy::Proxy),
    /// Connect to DST over and over (as --uid/--gid) until the file --stop exists, checking
    /// each lands on --expect; print a JSON report.
    #[command(name = load::Load::NAME)]
    Load(load::Load),
    /// Connections (or --udp datagrams) to DST for --secs, ended every way a TCP connection
    /// ends; prints a JSON report.
    #[command(name = super::churn::Churn::NAME)]
    Churn(super::churn::Churn),
    /// COUNT connections to DST held open together; prints the original destinations their
    /// listeners reported.
    #[command(name = load::Hold::NAME)]
    Hold(load::Hold),
    /// Listen on --listen as a proxy, then open --count connections to DST (a port each) and
    /// hold them all until --release exists; writes a JSON report to --report.
    #[command(name = super::crowd::Crowd::NAME)]
    Crowd(super::crowd::Crowd),
    /// HTTP/1.1 upstreams `name@addr:port[!status]` that say who answered; prints "ready".
    #[command(name = http::HttpServe::NAME)]
    HttpServe(http::HttpServe),
    /// One HTTP/1.1 GET (as --uid/--gid); prints the whole response.
    #[command(name = http::HttpGet::NAME)]
    HttpGet(http::HttpGet),
    /// An HTTP/1.1 upgrade to an echo protocol; sends MESSAGE, half-closes, prints the rest.
    #[command(name = http::HttpUpgrade::NAME)]
    HttpUpgrade(http::HttpUpgrade),
    /// POST --bytes pattern bytes (or GET when 0) to DST; prints status, length and sum of the
    /// response body.
    #[command(name = http::HttpTransfer::NAME)]
    HttpTransfer(http::HttpTransfer),
    /// GET /stream/N from DST; prints how many chunks came and whether they came spread out.
    #[command(name = http::HttpStream::NAME)]
    HttpStream(http::HttpStream),
    /// Keep-alive HTTP/1.1 upstreams answering "ok"; prints "ready".
    #[command(name = http::HttpKeepalive::NAME)]
    HttpKeepalive(http::HttpKeepalive),
    /// Keep-alive h2c upstreams answering "ok"; prints "ready".
    #[command(name = super::h2c::H2cKeepalive::NAME)]
    H2cKeepalive(super::h2c::H2cKeepalive),
    /// A gRPC upstream on ADDR; prints "ready".
    #[command(name = grpc::GrpcServe::NAME)]
    GrpcServe(grpc::GrpcServe),
    /// gRPC calls through DST with --authority; prints their outcomes.
    #[command(name = grpc::GrpcCall::NAME)]
    GrpcCall(grpc::GrpcCall),
    /// Send a TLS ClientHello with --sni to DST; print what comes back.
    #[command(name = tls::TlsHello::NAME)]
    TlsHello(tls::TlsHello),
    /// Connections opened and closed to DST for --secs; prints the count.
    #[command(name = load::BenchConnect::NAME)]
    BenchConnect(load::BenchConnect),
    /// Requests to DST (HTTP/1.1, h2c or TCP exchanges), keep-alive or (--new-conn) a
    /// connection each; prints "requests p50_us p99_us".
    #[command(name = load::BenchHttp::NAME)]
    BenchHttp(load::BenchHttp),
    /// Serve socket-acceleration cases (see sockmesh_tests::accel) on ADDR.
    #[command(name = accel::AccelServe::NAME)]
    AccelServe(accel::AccelServe),
    /// Run one socket-acceleration case against DST; prints its outcome.
    #[command(name = accel::AccelCase::NAME)]
    AccelCase(accel::AccelCase),
}

impl Program {
    /// Run the program (servers until killed, clients once), printing what it reports.
    pub fn run(self) -> Result<()> {
        match self {
            Program::Listen(p) => p.run(),
            Program::Connect(p) => p.run(),
            Program::Fetch(p) => p.run(),
            Program::Proxy(p) => p.run(),
            Program::Load(p) => p.run(),
            Program::Churn(p) => p.run(),
            Program::Hold(p) => p.run(),
            Program::Crowd(p) => p.run(),
            Program::HttpServe(p) => p.run(),
            Program::HttpGet(p) => p.run(),
            Program::HttpUpgrade(p) => p.run(),
            Program::HttpTransfer(p) => p.run(),
            Program::HttpStream(p) => p.run(),
            Program::HttpKeepalive(p) => p.run(),
            Program::H2cKeepalive(p) => p.run(),
            Program::GrpcServe(p) => p.run(),
            Program::GrpcCall(p) => p.run(),
            Program::TlsHello(p) => p.run(),
            Program::BenchConnect(p) => p.run(),
            Program::BenchHttp(p) => p.run(),
            Program::AccelServe(p) => p.run(),
            Program::AccelCase(p) => p.run(),
        }
    }
}

/// Each program's launcher as a [`Program`].
macro_rules! into_program {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(impl From<$ty> for Program {
            fn from(p: $ty) -> Program {
                Program::$variant(p)
            }
        })*
    };
}

into_program!(
    Churn(super::churn::Churn),
    Hold(load::Hold),
    Crowd(super::crowd::Crowd),
    Listen(tcp::Listen),
    Connect(tcp::Connect),
    Fetch(tcp::Fetch),
    Proxy(proxy::Proxy),
    Load(load::Load),
    HttpServe(http::HttpServe),
    HttpGet(http::HttpGet),
    HttpUpgrade(http::HttpUpgrade),
    HttpTransfer(http::HttpTransfer),
    HttpStream(http::HttpStream),
    HttpKeepalive(http::HttpKeepalive),
    H2cKeepalive(super::h2c::H2cKeepalive),
    GrpcServe(grpc::GrpcServe),
    GrpcCall(grpc::GrpcCall),
    TlsHello(tls::TlsHello),
    BenchConnect(load::BenchConnect),
    BenchHttp(load::BenchHttp),
    AccelServe(accel::AccelServe),
    AccelCase(accel::AccelCase),
);

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use clap::Parser;

    use super::*;
    use crate::kit::{
        GrpcCall, GrpcServe, HttpGet, HttpKeepalive, HttpServe, HttpStream, HttpTransfer,
        HttpUpgrade, HttpUpstream, Listener, ListenerKind, UdpMode,
    };

    #[derive(Parser)]
    struct Testkit {
        #[command(subcommand)]
        program: Program,
    }

    /// What `program` writes parses back into `program`, under its own subcommand's name.
    fn round_trip<P: Launch + Clone + Into<Program>>(program: P) {
        let argv = std::iter::once(OsString::from("sockmesh-testkit")).chain(program.argv());
        let argv: Vec<OsString> = argv.collect();
        let parsed = Testkit::try_parse_from(&argv)
            .unwrap_or_else(|e| panic!("{argv:?} does not parse: {e}"))
            .program;
        assert_eq!(parsed, program.into(), "{argv:?}");
    }

    fn addr(s: &str) -> std::net::SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn tcp_and_udp_launchers_parse_back() {
        let kinds = [
            ListenerKind::Report,
            ListenerKind::Transparent,
            ListenerKind::ReusePort,
            ListenerKind::Lean,
            ListenerKind::Udp,
        ];
        round_trip(tcp::Listen {
            listeners: kinds
                .into_iter()
                .map(|kind| Listener::new(kind, "pod:53v6", addr("[::]:53")))
                .collect(),
        });
        round_trip(tcp::Connect::new(addr("192.0.2.20:80"), Identity::APP));
        round_trip(tcp::Connect {
            bind: Some("127.0.0.6".parse().unwrap()),
            v4_mapped: true,
            hold_ms: 3000,
            creds_after_socket: true,
            udp: Some(UdpMode::Unconnected),
            ..tcp::Connect::new(addr("192.0.2.20:53"), Identity::of(0, 1337))
        });
        round_trip(tcp::Connect {
            first: Some(addr("192.0.2.20:80")),
            ..tcp::Connect::new(addr("192.0.2.10:8080"), Identity::APP)
        });
        round_trip(tcp::Fetch::new(addr("192.0.2.11:8080"), Identity::APP));
        round_trip(tcp::Fetch::new(addr("192.0.2.11:8080"), Identity::ROOT));
        round_trip(proxy::Proxy::new("A"));
        round_trip(proxy::Proxy {
            tproxy_mark: Some(1337),
            ..proxy::Proxy::new("P")
        });
        round_trip(load::Load::new(
            addr("192.0.2.20:80"),
            "pod:15001",
            PathBuf::from("/tmp/stop"),
            Identity::APP,
        ));
        round_trip(load::Hold {
            dst: addr("192.0.2.20:80"),
            count: 3,
            listen: Some(15001),
            keep: true,
            id: Identity::APP,
        });
    }

    #[test]
    fn http_grpc_and_tls_launchers_parse_back() {
        round_trip(HttpServe::new([
            HttpUpstream::new("up1", addr("192.0.2.20:18081")),
            HttpUpstream::failing("bad", addr("192.0.2.20:18091"), 503),
        ]));
        round_trip(HttpServe {
            log: Some(PathBuf::from("/tmp/up.log")),
            ..HttpServe::new([HttpUpstream::new("app", addr("[::]:8080"))])
        });
        round_trip(HttpGet {
            headers: vec!["x-user: alice".into(), "te: trailers".into()],
            half_close: true,
            ..HttpGet::new(addr("10.96.0.10:80"), "/a", "reviews", Identity::APP)
        });
        round_trip(HttpGet {
            h2c: true,
            ..HttpGet::new(addr("10.96.0.10:80"), "/", "ratings", Identity::APP)
        });
        round_trip(HttpUpgrade::new(
            addr("10.96.0.10:80"),
            "reviews-v2",
            "hello",
            Identity::ROOT,
        ));
        round_trip(HttpTransfer::new(
            addr("10.96.0.10:80"),
            "/upload",
            "app",
            5_000_000,
            Identity::APP,
        ));
        round_trip(HttpStream::new(addr("10.96.0.10:80"), "app", Identity::APP));
        round_trip(HttpKeepalive {
            addrs: vec![addr("192.0.2.20:18081"), addr("192.0.2.20:18082")],
        });
        round_trip(GrpcServe {
            addr: addr("0.0.0.0:8096"),
        });
        round_trip(GrpcCall::new(
            addr("10.96.0.10:80"),
            "grpc-svc",
            Identity::APP,
        ));
        round_trip(GrpcCall {
            together: Some(8),
            ..GrpcCall::new(addr("10.96.0.10:80"), "grpc-svc", Identity::APP)
        });
        round_trip(tls::TlsHello {
            dst: addr("192.0.2.20:9091"),
            sni: "api.secure.example".into(),
            id: Identity::APP,
        });
    }

    #[test]
    fn load_and_acceleration_launchers_parse_back() {
        round_trip(load::BenchConnect {
            dst: addr("127.0.0.1:15001"),
            secs: 0.3,
            id: Identity::APP,
        });
        round_trip(load::BenchHttp {
            dst: addr("10.96.0.10:80"),
            host: "reviews".into(),
            conns: 2,
            secs: 0.3,
            new_conn: true,
            wire: load::Wire::Tcp,
            id: Identity::APP,
        });
        round_trip(load::BenchHttp {
            dst: addr("10.96.0.10:80"),
            host: "reviews".into(),
            conns: 4,
            secs: 2.0,
            new_conn: false,
            wire: load::Wire::H2c,
            id: Identity::APP,
        });
        round_trip(super::super::h2c::H2cKeepalive {
            addrs: vec![addr("192.0.2.20:18083")],
        });
        round_trip(accel::AccelServe {
            addr: addr("0.0.0.0:15001"),
            log: PathBuf::from("/tmp/accel.log"),
        });
        round_trip(accel::AccelCase {
            dst: addr("127.0.0.1:15001"),
            case: "big-write".into(),
            id: Identity::PROXY,
        });
    }
}

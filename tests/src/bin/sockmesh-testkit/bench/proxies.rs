//! Section 5, the proxy against HAProxy, in the roles a sidecar serves: HTTP/1.1 and h2c clients
//! in the sockmesh pod to a service VIP, and TCP clients to a TCP service's VIP, captured to the
//! proxy on 15001, round robin over two upstreams on the peer; sockmesh-proxy and HAProxy one
//! after the other in each round, one thread each.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use sockmesh_tests::{
    kit::{BenchHttp, H2cKeepalive, HttpGet, HttpKeepalive, Identity, Wire},
    lab::{sibling_bin, Lab, Place},
    pods::PEER_V4,
};

use super::{
    host::{CpuTime, SyscallCount},
    stats::{column, fmt, fmt2, in_order, ratio, ratio_of, stats, Spread},
    Bench,
};
use crate::hop::HopUpstream;

/// The two client modes: keep-alive, and a new connection per request.
pub const HTTP_MODES: [(&str, bool); 2] = [("keep-alive", false), ("new connections", true)];

/// The roles measured: (what the clients speak, its name in the report, client mode, a new
/// connection per request). h2c's clients keep their connections, as gRPC's do.
pub const ROLES: [(Wire, &str, &str, bool); 5] = [
    (Wire::Http1, "HTTP/1.1", "keep-alive", false),
    (Wire::Http1, "HTTP/1.1", "new connections", true),
    (Wire::H2c, "h2c", "keep-alive", false),
    (Wire::Tcp, "TCP relay", "keep-alive", false),
    (Wire::Tcp, "TCP relay", "new connections", true),
];

/// The wires, in the order each round starts the proxies for them.
const WIRES: [Wire; 3] = [Wire::Http1, Wire::H2c, Wire::Tcp];

/// The HTTP service's VIP, which capture sends to the proxy.
pub const VIP: &str = "10.96.0.10:80";

/// The TCP service's VIP; its port is the proxy's TCP route.
pub const TCP_VIP: &str = "10.96.0.11:9000";

/// The HTTP/1.1 service's host; the h2c service's.
const HTTP1_HOST: &str = "reviews";
const H2C_HOST: &str = "ratings";

/// (requests/s, p50 µs, p99 µs) of one round.
type HttpRound = (f64, f64, f64);

/// One proxy's figures: per role, each round's (requests/s, p50, p99), its CPU µs per request
/// (all, and of it in the kernel) and its system calls per request.
#[derive(Default)]
struct Runs {
    http: [Vec<HttpRound>; ROLES.len()],
    cpu: [Vec<f64>; ROLES.len()],
    system: [Vec<f64>; ROLES.len()],
    syscalls: [Vec<f64>; ROLES.len()],
}

/// The spreads of requests/s, p50 and p99.
pub type Http = (Spread, Spread, Spread);

pub struct Proxies {
    proxy_yaml: PathBuf,
    /// HAProxy's configuration per wire, in [`WIRES`]' order: mode http; mode http with h2 on
    /// both sides; mode tcp.
    haproxy_cfgs: [PathBuf; 3],
    ours: Runs,
    theirs: Runs,
}

impl Proxies {
    /// The upstreams on the sockmesh pod's peer, and both proxies' configurations.
    pub fn new(b: &mut Bench) -> Result<Proxies> {
        let ups = |ports: [u16; 2]| -> Result<Vec<SocketAddr>> {
            Ok(vec![
                format!("{PEER_V4}:{}", ports[0]).parse()?,
                format!("{PEER_V4}:{}", ports[1]).parse()?,
            ])
        };
        b.lab.start(
            b.sm.peer_place(),
            &HttpKeepalive {
                addrs: ups([18081, 18082])?,
            },
        )?;
        b.lab.start(
            b.sm.peer_place(),
            &H2cKeepalive {
                addrs: ups([18083, 18084])?,
            },
        )?;
        for addr in ups([18091, 18092])? {
            b.lab.start(b.sm.peer_place(), &HopUpstream { addr })?;
        }
        let proxy_yaml = b.lab.dir.join("proxy.yaml");
        let tcp_port = TCP_VIP.parse::<SocketAddr>()?.port();
        std::fs::write(
            &proxy_yaml,
            format!(
                "listeners:\n  - {{name: outbound, address: \"0.0.0.0:15001\", direction: outbound}}\n\
                 virtual_hosts:\n  - {{name: {HTTP1_HOST}, domains: [{HTTP1_HOST}], routes: [{{route: {{cluster: {HTTP1_HOST}}}}}]}}\n\
                 \x20 - {{name: {H2C_HOST}, domains: [{H2C_HOST}], routes: [{{route: {{cluster: {H2C_HOST}}}}}]}}\n\
                 tcp_routes:\n  - {{destination: \"{tcp_port}\", cluster: echo}}\n\
                 clusters:\n  - {{name: {HTTP1_HOST}, endpoints: [{{address: \"{PEER_V4}:18081\"}}, {{address: \"{PEER_V4}:18082\"}}]}}\n\
                 \x20 - {{name: {H2C_HOST}, endpoints: [{{address: \"{PEER_V4}:18083\"}}, {{address: \"{PEER_V4}:18084\"}}]}}\n\
                 \x20 - {{name: echo, endpoints: [{{address: \"{PEER_V4}:18091\"}}, {{address: \"{PEER_V4}:18092\"}}]}}\n"
            ),
        )?;
        let global = "global\n  maxconn 4096\n  uid 1337\n  gid 1337\n  nbthread 1\n\
                      defaults\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n";
        let http = |bind: &str, server: &str, ports: [u16; 2]| {
            format!(
                "{global}  mode http\n  option http-keep-alive\n  http-reuse always\n\
                 frontend out\n  bind 0.0.0.0:15001{bind}\n  default_backend up\n\
                 backend up\n  balance roundrobin\n  server up1 {PEER_V4}:{}{server}\n  server up2 {PEER_V4}:{}{server}\n",
                ports[0], ports[1]
            )
        };
        let configs = [
            http("", "", [18081, 18082]),
            http(" proto h2", " proto h2", [18083, 18084]),
            format!(
                "{global}  mode tcp\n\
                 frontend out\n  bind 0.0.0.0:15001\n  default_backend up\n\
                 backend up\n  balance roundrobin\n  server up1 {PEER_V4}:18091\n  server up2 {PEER_V4}:18092\n"
            ),
        ];
        let mut haproxy_cfgs: [PathBuf; 3] = Default::default();
        for ((path, text), wire) in haproxy_cfgs.iter_mut().zip(configs).zip(WIRES) {
            *path = b.lab.dir.join(format!("haproxy-{}.cfg", wire.name()));
            std::fs::write(&*path, text)?;
        }
        Ok(Proxies {
            proxy_yaml,
            haproxy_cfgs,
            ours: Runs::default(),
            theirs: Runs::default(),
        })
    }

    /// sockmesh-proxy's arguments and environment, after its program's name in `cmd`: one
    /// configuration serves every wire.
    pub fn ours(&self, cmd: &mut Command) {
        cmd.arg("--config")
            .arg(&self.proxy_yaml)
            .env("SOCKMESH_PROXY_LOG", "warn");
    }

    /// HAProxy's arguments for `wire`'s clients, after its program's name in `cmd`.
    pub fn theirs(&self, wire: Wire, cmd: &mut Command) {
        // In WIRES' order.
        let i = match wire {
            Wire::Http1 => 0,
            Wire::H2c => 1,
            Wire::Tcp => 2,
        };
        cmd.arg("-db").arg("-f").arg(&self.haproxy_cfgs[i]);
    }

    /// One round: per wire, sockmesh-proxy, then HAProxy, on the same pod and upstreams
    /// (HAProxy first every other round).
    pub fn round(&mut self, b: &mut Bench) -> Result<()> {
        let proxy = sibling_bin("sockmesh-proxy", "SOCKMESH_PROXY_BIN")?;
        let round = self.ours.cpu[0].len();
        for wire in WIRES {
            for (_, theirs) in in_order([false, true], round) {
                if theirs {
                    let mut cmd = b.lab.command_at(b.sm.place(), "haproxy")?;
                    self.theirs(wire, &mut cmd);
                    proxy_round(b, wire, cmd, None, &mut self.theirs)?;
                } else {
                    let mut cmd = b.lab.command_at(b.sm.place(), &proxy)?;
                    self.ours(&mut cmd);
                    proxy_round(b, wire, cmd, Some("ready"), &mut self.ours)?;
                }
            }
        }
        Ok(())
    }

    /// Per role: (sockmesh-proxy's figures, HAProxy's).
    pub fn figures(&self) -> Vec<(Http, Http)> {
        let three = |v: &[HttpRound]| -> Http {
            (column(v, |x| x.0), column(v, |x| x.1), column(v, |x| x.2))
        };
        (0..ROLES.len())
            .map(|k| (three(&self.ours.http[k]), three(&self.theirs.http[k])))
            .collect()
    }

    /// Per role, sockmesh-proxy against HAProxy round by round: requests/s, p50, p99, CPU per
    /// request, system calls per request.
    pub fn ratios(&self, k: usize) -> [Spread; 5] {
        let (o, h) = (&self.ours, &self.theirs);
        [
            ratio_of(&o.http[k], &h.http[k], |x| x.0),
            ratio_of(&o.http[k], &h.http[k], |x| x.1),
            ratio_of(&o.http[k], &h.http[k], |x| x.2),
            ratio(&o.cpu[k], &h.cpu[k]),
            ratio(&o.syscalls[k], &h.syscalls[k]),
        ]
    }

    /// Per role, sockmesh-proxy's CPU per request against HAProxy's round by round, in user
    /// space and in the kernel.
    pub fn cpu_ratios(&self, k: usize) -> [Spread; 2] {
        let (o, h) = (&self.ours, &self.theirs);
        let user = |r: &Runs| -> Vec<f64> {
            r.cpu[k]
                .iter()
                .zip(&r.system[k])
                .map(|(all, sys)| all - sys)
                .collect()
        };
        [ratio(&user(o), &user(h)), ratio(&o.system[k], &h.system[k])]
    }

    /// Per role: (sockmesh-proxy's CPU µs per request, HAProxy's), each as (all, system).
    pub fn cpu(&self, k: usize) -> ((f64, f64), (f64, f64)) {
        let of = |r: &Runs| (stats(&r.cpu[k]).0, stats(&r.system[k]).0);
        (of(&self.ours), of(&self.theirs))
    }

    /// Per role: (sockmesh-proxy's system calls per request, HAProxy's).
    pub fn syscalls(&self, k: usize) -> (f64, f64) {
        (
            stats(&self.ours.syscalls[k]).0,
            stats(&self.theirs.syscalls[k]).0,
        )
    }

    pub fn report(&self, b: &Bench, r: &mut String) {
        r.push_str("## 5. The proxy against HAProxy\n\n");
        r.push_str(&format!(
            "Requests from the app by {} clients, captured by sockmesh to the proxy on 15001, \
             round robin over two upstreams on the peer host, in three roles: HTTP/1.1 GETs to a \
             service VIP (keep-alive HTTP/1.1 upstreams); h2c GETs to the same VIP with another \
             host (h2c upstreams, each proxy's upstream connections multiplexed, HAProxy with \
             `proto h2` on both sides); and a TCP relay, {}-byte exchanges with echo upstreams \
             through a TCP service's VIP (sockmesh-proxy's `tcp_routes`, HAProxy's `mode tcp`). \
             Client modes: each client keeps its connection alive, or opens a new connection per \
             request (HTTP/1.1 asks `connection: close`; its latency includes the connect); h2c \
             clients keep theirs, one stream at a time. Same pod, upstreams and capture for both \
             proxies, one after the other in each round. The pod reuses its ports' TIME_WAIT \
             connections for new ones (`net.ipv4.tcp_tw_reuse=1`, as on nodes that open many \
             short connections): each exchange of the TCP relay with new connections has its own \
             upstream connection, which the proxy closes first, so without it the pod's ports \
             toward the two upstreams run out within seconds on a fast enough machine and both \
             proxies' connects stall searching for one. Equal cores: each proxy serves on one \
             thread (sockmesh-proxy's default `--workers 1`, HAProxy's `nbthread 1`). CPU is the \
             proxy's time per request (user and system, all threads, from /proc), with the system \
             part (in the kernel: the proxy's system calls, and the network work done in its \
             context) in brackets; system calls are the proxy's per request (all threads), \
             counted by the kernel's `raw_syscalls:sys_enter` tracepoint (`perf stat`).\n\n",
            b.sizes.conns,
            sockmesh_tests::kit::load::EXCHANGE,
        ));
        r.push_str(
            "| protocol | clients | proxy | requests/s | p50 µs | p99 µs | CPU µs per request \
             (system) | system calls per request |\n|---|---|---|---|---|---|---|---|\n",
        );
        let proxies = self.figures();
        for (k, (_, proto, mode, _)) in ROLES.into_iter().enumerate() {
            let (o, h) = proxies[k];
            let (cpu_o, cpu_h) = self.cpu(k);
            let (sys_o, sys_h) = self.syscalls(k);
            for (name, (rps, p50, p99), (cpu, system), sys) in [
                ("HAProxy", h, cpu_h, sys_h),
                ("sockmesh-proxy", o, cpu_o, sys_o),
            ] {
                r.push_str(&format!(
                    "| {proto} | {mode} | {name} | {} | {} | {} | {cpu:.1} ({system:.1}) | \
                     {sys:.2} |\n",
                    fmt(rps),
                    fmt(p50),
                    fmt(p99),
                ));
            }
        }
        r.push('\n');
        for (k, (_, proto, mode, _)) in ROLES.into_iter().enumerate() {
            let [rps, p50, p99, cpu, sys] = self.ratios(k).map(fmt2);
            let [user_cpu, system_cpu] = self.cpu_ratios(k).map(fmt2);
            r.push_str(&format!(
                "sockmesh-proxy / HAProxy, {proto} {mode}: requests/s {rps}, p50 {p50}, p99 {p99} \
                 (below 1 is better for latency), CPU per request {cpu} (user {user_cpu}, \
                 system {system_cpu}), system calls per request {sys}.\n\n",
            ));
        }
        r.push_str(
            "The load generator and the upstreams share the same 2 cores, so the proxy that spends \
             less per request serves more.\n\n",
        );
    }
}

/// One round for one proxy and wire: start it (`cmd`, ready when it prints `ready`, if
/// given), measure each of the wire's roles through it (the figures, and its CPU µs per
/// request), stop it.
fn proxy_round(
    b: &mut Bench,
    wire: Wire,
    cmd: Command,
    ready: Option<&str>,
    runs: &mut Runs,
) -> Result<()> {
    let i = b.lab.spawn(cmd, ready)?;
    wait_for_requests(b, wire, Duration::from_secs(10))?;
    let pid = b.lab.pid(i).context("the proxy's pid")?;
    for (k, &(w, _, _, new_conn)) in ROLES.iter().enumerate() {
        if w != wire {
            continue;
        }
        let calls = SyscallCount::start(pid, &[], &b.lab.dir.join("perf-stat.txt"))?;
        let cpu0 = CpuTime::of(pid)?;
        let r = requests(b, wire, new_conn, b.sizes.secs);
        let cpu1 = CpuTime::of(pid)?;
        let calls = calls.stop()?;
        let r = r?;
        let n = r.0 * b.sizes.secs;
        runs.cpu[k].push((cpu1.total() - cpu0.total()) / n * 1e6);
        runs.system[k].push((cpu1.system - cpu0.system) / n * 1e6);
        runs.syscalls[k].push(calls["all"] / n);
        runs.http[k].push(r);
    }
    b.lab.kill(i)
}

/// Wait until a short run of `wire`'s requests through the sockmesh pod's 15001 gets answers
/// (the proxy has started), at most `within`.
pub fn wait_for_requests(b: &Bench, wire: Wire, within: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let r = requests(b, wire, false, 0.05);
        if r.is_ok() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "no {} answers through the proxy within {within:?}: {r:?}",
                wire.name()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (requests/s, p50 µs, p99 µs) of `wire`'s requests for `secs` through whatever listens on the
/// sockmesh pod's 15001; `new_conn`: a connection per request.
pub fn requests(b: &Bench, wire: Wire, new_conn: bool, secs: f64) -> Result<HttpRound> {
    let (dst, host) = match wire {
        Wire::Http1 => (VIP, HTTP1_HOST),
        Wire::H2c => (VIP, H2C_HOST),
        Wire::Tcp => (TCP_VIP, ""),
    };
    let program = BenchHttp {
        dst: dst.parse()?,
        host: host.into(),
        conns: b.sizes.conns,
        secs,
        new_conn,
        wire,
        id: Identity::APP,
    };
    let out = b.output(&b.sm, true, &program)?;
    let f: Vec<f64> = out.split(' ').filter_map(|x| x.parse().ok()).collect();
    if f.len() != 3 || f[0] == 0.0 {
        bail!("bench-http gave {out:?}");
    }
    Ok((f[0] / secs, f[1], f[2]))
}

/// Wait until the app's GET of the HTTP/1.1 service through the sockmesh pod's 15001 is
/// answered with a 200 (a proxy has started), at most `within`.
pub fn wait_for_http1(b: &Bench, within: Duration) -> Result<()> {
    wait_for_answer(&b.lab, b.sm.place(), VIP.parse()?, HTTP1_HOST, within)
}

/// Wait until one h2c GET of the h2c service through the sockmesh pod's 15001 is answered
/// with a 200 (a proxy has started), at most `within`: a single request, where
/// [`wait_for_requests`] makes as many as fit in its rounds.
pub fn wait_for_h2c(b: &Bench, within: Duration) -> Result<()> {
    let get = HttpGet {
        h2c: true,
        ..HttpGet::new(VIP.parse()?, "/", H2C_HOST, Identity::APP)
    };
    wait_for_get(&b.lab, b.sm.place(), &get, within)
}

/// Wait until the app's GET of `host` at `dst` from `place` is answered with a 200 (a proxy
/// has started), at most `within`.
pub fn wait_for_answer(
    lab: &Lab,
    place: Place,
    dst: SocketAddr,
    host: &str,
    within: Duration,
) -> Result<()> {
    let get = HttpGet::new(dst, "/", host, Identity::APP);
    wait_for_get(lab, place, &get, within)
}

/// Wait until `get` from `place` is answered with a 200, at most `within`.
fn wait_for_get(lab: &Lab, place: Place, get: &HttpGet, within: Duration) -> Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let out = lab.output(place, get);
        if out.as_ref().is_ok_and(|o| {
            let o = o.trim_start();
            o.starts_with("HTTP/1.1 200") || o.starts_with("HTTP/2 200")
        }) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "no answer from {} at {} within {within:?}: {out:?}",
                get.host,
                get.dst
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

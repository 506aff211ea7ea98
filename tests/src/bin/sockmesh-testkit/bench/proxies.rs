//! Section 5, the proxy against HAProxy: HTTP/1.1 clients in the sockmesh pod to a service
//! VIP, captured to the proxy on 15001, round robin over two keep-alive upstreams on the peer;
//! sockmesh-proxy and HAProxy one after the other in each round, one thread each.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use sockmesh_tests::{
    kit::{BenchHttp, HttpGet, HttpKeepalive, Identity},
    lab::{sibling_bin, Lab, Place},
    pods::PEER_V4,
};

use super::{
    host::cpu_secs,
    stats::{column, fmt, stats, Spread},
    Bench,
};

/// The two client modes: keep-alive, and a new connection per request.
pub const HTTP_MODES: [(&str, bool); 2] = [("keep-alive", false), ("new connections", true)];

/// The service's VIP, which capture sends to the proxy.
pub const VIP: &str = "10.96.0.10:80";

/// (requests/s, p50 µs, p99 µs) of one round.
type HttpRound = (f64, f64, f64);

/// One proxy's figures: per client mode, each round's (requests/s, p50, p99) and its CPU µs per
/// request.
#[derive(Default)]
struct Runs {
    http: [Vec<HttpRound>; 2],
    cpu: [Vec<f64>; 2],
}

/// The spreads of requests/s, p50 and p99.
pub type Http = (Spread, Spread, Spread);

pub struct Proxies {
    pub proxy_yaml: PathBuf,
    pub haproxy_cfg: PathBuf,
    ours: Runs,
    theirs: Runs,
}

impl Proxies {
    /// The upstreams on the sockmesh pod's peer, and both proxies' configurations.
    pub fn new(b: &mut Bench) -> Result<Proxies> {
        let ups: [SocketAddr; 2] = [
            format!("{PEER_V4}:18081").parse()?,
            format!("{PEER_V4}:18082").parse()?,
        ];
        let keepalive = HttpKeepalive {
            addrs: ups.to_vec(),
        };
        b.lab.start(b.sm.peer_place(), &keepalive)?;
        let proxy_yaml = b.lab.dir.join("proxy.yaml");
        std::fs::write(
            &proxy_yaml,
            format!(
                "listeners:\n  - {{name: outbound, address: \"0.0.0.0:15001\", direction: outbound}}\n\
                 virtual_hosts:\n  - {{name: reviews, domains: [reviews], routes: [{{route: {{cluster: reviews}}}}]}}\n\
                 clusters:\n  - {{name: reviews, endpoints: [{{address: \"{PEER_V4}:18081\"}}, {{address: \"{PEER_V4}:18082\"}}]}}\n"
            ),
        )?;
        let haproxy_cfg = b.lab.dir.join("haproxy.cfg");
        std::fs::write(
            &haproxy_cfg,
            format!(
                "global\n  maxconn 4096\n  uid 1337\n  gid 1337\n  nbthread 1\n\
                 defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\n\
                 frontend out\n  bind 0.0.0.0:15001\n  default_backend reviews\n\
                 backend reviews\n  balance roundrobin\n  server up1 {PEER_V4}:18081\n  server up2 {PEER_V4}:18082\n"
            ),
        )?;
        Ok(Proxies {
            proxy_yaml,
            haproxy_cfg,
            ours: Runs::default(),
            theirs: Runs::default(),
        })
    }

    /// One round: sockmesh-proxy, then HAProxy, on the same pod and upstreams.
    pub fn round(&mut self, b: &mut Bench) -> Result<()> {
        let proxy = sibling_bin("sockmesh-proxy", "SOCKMESH_PROXY_BIN")?;
        let mut cmd = b.lab.command_at(b.sm.place(), proxy)?;
        cmd.arg("--config")
            .arg(&self.proxy_yaml)
            .env("SOCKMESH_PROXY_LOG", "warn");
        proxy_round(b, cmd, Some("ready"), &mut self.ours)?;
        let mut cmd = b.lab.command_at(b.sm.place(), "haproxy")?;
        cmd.arg("-db").arg("-f").arg(&self.haproxy_cfg);
        proxy_round(b, cmd, None, &mut self.theirs)
    }

    /// Per client mode: (sockmesh-proxy's figures, HAProxy's).
    pub fn figures(&self) -> Vec<(Http, Http)> {
        let three = |v: &[HttpRound]| -> Http {
            (column(v, |x| x.0), column(v, |x| x.1), column(v, |x| x.2))
        };
        (0..2)
            .map(|k| (three(&self.ours.http[k]), three(&self.theirs.http[k])))
            .collect()
    }

    /// Per client mode: (sockmesh-proxy's CPU µs per request, HAProxy's).
    fn cpu(&self, k: usize) -> (f64, f64) {
        (stats(&self.ours.cpu[k]).0, stats(&self.theirs.cpu[k]).0)
    }

    pub fn report(&self, b: &Bench, r: &mut String) {
        r.push_str("## 5. The proxy against HAProxy\n\n");
        r.push_str(&format!(
            "HTTP/1.1 GETs from the app by {} clients to a service VIP, captured by sockmesh to \
             the proxy on 15001, round robin over two keep-alive upstreams on the peer host. Two \
             client modes: each client keeps its connection alive, or opens a new connection per \
             request (`connection: close`; its latency includes the connect). Same pod, upstreams \
             and capture for both proxies, one after the other in each round. Equal cores: each \
             proxy serves on one thread (sockmesh-proxy's default `--workers 1`, HAProxy's \
             `nbthread 1`). CPU is the proxy's time per request (user and system, all threads, \
             from /proc).\n\n",
            b.sizes.conns
        ));
        r.push_str(
            "| clients | proxy | requests/s | p50 µs | p99 µs | CPU µs per request |\n\
             |---|---|---|---|---|---|\n",
        );
        let proxies = self.figures();
        for (k, (mode, _)) in HTTP_MODES.into_iter().enumerate() {
            let (o, h) = proxies[k];
            let (cpu_o, cpu_h) = self.cpu(k);
            for (name, (rps, p50, p99), cpu) in
                [("HAProxy", h, cpu_h), ("sockmesh-proxy", o, cpu_o)]
            {
                r.push_str(&format!(
                    "| {mode} | {name} | {} | {} | {} | {cpu:.1} |\n",
                    fmt(rps),
                    fmt(p50),
                    fmt(p99),
                ));
            }
        }
        r.push('\n');
        for (k, (mode, _)) in HTTP_MODES.into_iter().enumerate() {
            let (o, h) = proxies[k];
            let (cpu_o, cpu_h) = self.cpu(k);
            r.push_str(&format!(
                "sockmesh-proxy / HAProxy, {mode}: requests/s {:.2}, p50 {:.2}, p99 {:.2} (below 1 \
                 is better for latency), CPU per request {:.2}.\n\n",
                o.0 .0 / h.0 .0,
                o.1 .0 / h.1 .0,
                o.2 .0 / h.2 .0,
                cpu_o / cpu_h,
            ));
        }
        r.push_str(
            "The load generator and the upstreams share the same 2 cores, so the proxy that spends \
             less per request serves more.\n\n",
        );
    }
}

/// One round for one proxy: start it (`cmd`, ready when it prints `ready`, if given), measure
/// each client mode through it (the figures, and its CPU µs per request), stop it.
fn proxy_round(b: &mut Bench, cmd: Command, ready: Option<&str>, runs: &mut Runs) -> Result<()> {
    let i = b.lab.spawn(cmd, ready)?;
    wait_for_answer(
        &b.lab,
        b.sm.place(),
        VIP.parse()?,
        "reviews",
        Duration::from_secs(10),
    )?;
    let pid = b.lab.pid(i).context("the proxy's pid")?;
    for (k, (_, new_conn)) in HTTP_MODES.into_iter().enumerate() {
        let cpu0 = cpu_secs(pid)?;
        let r = http(b, new_conn)?;
        runs.cpu[k].push((cpu_secs(pid)? - cpu0) / (r.0 * b.sizes.secs) * 1e6);
        runs.http[k].push(r);
    }
    b.lab.kill(i)
}

/// (requests/s, p50 µs, p99 µs) through whatever listens on the sockmesh pod's 15001;
/// `new_conn`: a connection per request.
pub fn http(b: &Bench, new_conn: bool) -> Result<HttpRound> {
    let program = BenchHttp {
        dst: VIP.parse()?,
        host: "reviews".into(),
        conns: b.sizes.conns,
        secs: b.sizes.secs,
        new_conn,
        id: Identity::APP,
    };
    let out = b.output(&b.sm, true, &program)?;
    let f: Vec<f64> = out.split(' ').filter_map(|x| x.parse().ok()).collect();
    if f.len() != 3 || f[0] == 0.0 {
        bail!("bench-http gave {out:?}");
    }
    Ok((f[0] / b.sizes.secs, f[1], f[2]))
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
    let deadline = std::time::Instant::now() + within;
    loop {
        let out = lab.output(place, &get);
        if out
            .as_ref()
            .is_ok_and(|o| o.trim().starts_with("HTTP/1.1 200"))
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("no answer from {host} at {dst} within {within:?}: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

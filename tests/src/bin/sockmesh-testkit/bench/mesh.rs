//! Section 6, the mesh request end to end: a client app pod calls a server app pod through
//! both sidecars (the client's outbound 15001, the server's inbound 15006), sockmesh-proxy on
//! both sides, under istio's iptables rules in both pods, under sockmesh, and under sockmesh
//! with acceleration (the proxies' sockets, sockmesh's default when the node has it on). The
//! pods sit on one node (a node netns routing between their veths), or on two lab nodes
//! joined by a veth.

use std::{net::SocketAddr, path::PathBuf, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use sockmesh_tests::{
    kit::{BenchHttp, HttpKeepalive, Identity, Wire},
    lab::{run as run_cmd, sibling_bin, Lab, Netns},
    pods::{self, Mode, Pod},
};

use super::{
    host::cpu_secs,
    proxies::{wait_for_answer, HTTP_MODES},
    stats::{column, fmt, fmt2, in_order, ratio_of, Spread},
    Bench,
};

/// Where the two pods are.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    SameNode,
    TwoNodes,
}

impl Topology {
    const ALL: [Topology; 2] = [Topology::SameNode, Topology::TwoNodes];

    fn name(self) -> &'static str {
        match self {
            Topology::SameNode => "same node",
            Topology::TwoNodes => "two nodes",
        }
    }
}

/// The capture paths, in the report's order.
pub const PATHS: [&str; 3] = [
    "iptables (istio rules)",
    "sockmesh",
    "sockmesh + acceleration",
];

/// The server app's port, and the name the client's proxy routes by.
const APP_PORT: u16 = 8080;
const HOST: &str = "server";

/// (requests/s, p50 µs, p99 µs, both proxies' CPU µs per request) of one round.
type MeshRound = [f64; 4];

/// A client pod and a server pod, captured one way.
struct Pair {
    client: Pod,
    server: Pod,
    server_ip: String,
    mode: Mode,
}

pub struct Mesh {
    config: PathBuf,
    /// Per topology: the iptables pair and the sockmesh pair (with and without acceleration).
    pairs: Vec<(Topology, Pair, Pair)>,
    /// Per topology, path and client mode, each round.
    rounds: Vec<Vec<MeshRound>>,
}

/// The index of (topology, path, client mode) in `Mesh::rounds`.
fn slot(t: usize, path: usize, k: usize) -> usize {
    (t * PATHS.len() + path) * HTTP_MODES.len() + k
}

impl Mesh {
    pub fn new(b: &mut Bench) -> Result<Mesh> {
        let mut pairs = Vec::new();
        // Addresses 10.<60 + n>.1.2 (client) and 10.<60 + n>.2.2 (server), one n per pair:
        // registered pods' addresses are unique on a node.
        let mut n = 0;
        for t in Topology::ALL {
            let ipt = pair(b, t, Mode::Iptables, n)?;
            let sm = pair(b, t, Mode::Sockmesh, n + 1)?;
            n += 2;
            pairs.push((t, ipt, sm));
        }
        let config = b.lab.dir.join("mesh-proxy.yaml");
        Ok(Mesh {
            config,
            pairs,
            rounds: vec![Vec::new(); Topology::ALL.len() * PATHS.len() * HTTP_MODES.len()],
        })
    }

    /// One round: every topology and path, each with fresh proxies, the paths in reverse order
    /// every other round.
    pub fn round(&mut self, b: &mut Bench) -> Result<()> {
        let round = self.rounds[0].len();
        for (t, (_, ipt, sm)) in self.pairs.iter().enumerate() {
            for (path, pair) in in_order([ipt, sm, sm], round) {
                if pair.mode == Mode::Sockmesh {
                    // sockmesh's default (the proxies' sockets), or off.
                    let accel = if path == 2 { "proxies" } else { "off" };
                    for pod in [&pair.client, &pair.server] {
                        b.register(pod, &b.profile, accel, true)?;
                    }
                }
                std::fs::write(&self.config, proxy_yaml(&pair.server_ip))?;
                let figures = measure(b, pair, &self.config)?;
                for (k, f) in figures.into_iter().enumerate() {
                    self.rounds[slot(t, path, k)].push(f);
                }
            }
        }
        Ok(())
    }

    /// Per topology, path and client mode: requests/s, p50, p99 and CPU per request.
    fn figure(&self, t: usize, path: usize, k: usize) -> [Spread; 4] {
        let v = &self.rounds[slot(t, path, k)];
        [
            column(v, |x| x[0]),
            column(v, |x| x[1]),
            column(v, |x| x[2]),
            column(v, |x| x[3]),
        ]
    }

    /// Path `a`'s figure `i` against path `b`'s (indices into [`PATHS`]), in topology `t` with
    /// client mode `k`, round by round.
    fn ratio(&self, t: usize, k: usize, a: usize, b: usize, i: usize) -> Spread {
        ratio_of(
            &self.rounds[slot(t, a, k)],
            &self.rounds[slot(t, b, k)],
            |x| x[i],
        )
    }

    /// sockmesh's requests/s against iptables' on one node with new connections (the target),
    /// and acceleration's against sockmesh's without, per client mode on one node.
    pub fn ratios(&self) -> (Spread, [Spread; 2]) {
        let new = HTTP_MODES.len() - 1;
        let sm = self.ratio(0, new, 1, 0, 0);
        let accel = [0, 1].map(|k| self.ratio(0, k, 2, 1, 0));
        (sm, accel)
    }

    pub fn report(&self, b: &Bench, r: &mut String) {
        r.push_str("## 6. The mesh request end to end\n\n");
        r.push_str(&format!(
            "HTTP/1.1 GETs by {} clients in a client app pod (uid 1000) to a server app pod's \
             address, through both sidecars: the client pod's outbound capture to its proxy on \
             15001, which routes by host to the server pod; the server pod's inbound capture to \
             its proxy on 15006, which passes the request to the app. sockmesh-proxy on both \
             sides (`--workers 1` each), keeping upstream connections alive. Paths: istio's \
             iptables rules in both pods (real iptables); sockmesh; sockmesh with acceleration \
             (the agent's `--acceleration on`, pods with sockmesh's default: the proxies' \
             sockets are accelerated, the apps' are not). Placements: both pods on one node (a \
             node netns routing between their veths), and each pod on its own lab node, the \
             two nodes joined by a veth. CPU is both proxies' time per request (user and \
             system, from /proc).\n\n",
            b.sizes.conns
        ));
        r.push_str(
            "| placement | clients | path | requests/s | p50 µs | p99 µs | proxies' CPU µs per request |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for (t, topo) in Topology::ALL.into_iter().enumerate() {
            for (k, (mode, _)) in HTTP_MODES.into_iter().enumerate() {
                for (path, name) in PATHS.into_iter().enumerate() {
                    let [rps, p50, p99, cpu] = self.figure(t, path, k);
                    r.push_str(&format!(
                        "| {} | {mode} | {name} | {} | {} | {} | {:.1} |\n",
                        topo.name(),
                        fmt(rps),
                        fmt(p50),
                        fmt(p99),
                        cpu.0
                    ));
                }
            }
        }
        r.push('\n');
        for (t, topo) in Topology::ALL.into_iter().enumerate() {
            for (k, (mode, _)) in HTTP_MODES.into_iter().enumerate() {
                let x = |a, i| fmt2(self.ratio(t, k, a, 0, i));
                r.push_str(&format!(
                    "{}, {mode}, against iptables: sockmesh requests/s {}, p99 {}, CPU {}; \
                     sockmesh + acceleration requests/s {}, p99 {}, CPU {}.\n\n",
                    topo.name(),
                    x(1, 0),
                    x(1, 2),
                    x(1, 3),
                    x(2, 0),
                    x(2, 2),
                    x(2, 3),
                ));
            }
        }
    }
}

/// Both pods' proxies read this: an outbound listener routing host `server` to the server
/// pod's app, and an inbound listener (its requests go to their original destination).
fn proxy_yaml(server_ip: &str) -> String {
    format!(
        "listeners:\n\
         \x20 - {{name: outbound, address: \"0.0.0.0:15001\", direction: outbound}}\n\
         \x20 - {{name: inbound, address: \"0.0.0.0:15006\", direction: inbound}}\n\
         virtual_hosts:\n\
         \x20 - {{name: {HOST}, domains: [{HOST}], routes: [{{route: {{cluster: {HOST}}}}}]}}\n\
         clusters:\n\
         \x20 - {{name: {HOST}, endpoints: [{{address: \"{server_ip}:{APP_PORT}\"}}]}}\n"
    )
}

/// A pod netns `tag` with `addr`/24 on eth0, its gateway `.1` on `node`'s interface `dev`.
fn pod_on(lab: &mut Lab, node: &Netns, tag: &str, dev: &str, net: &str) -> Result<Netns> {
    let ns = lab.netns(tag)?;
    lab.veth(&ns, "eth0", node, dev)?;
    ns.ip(&["addr", "add", &format!("{net}.2/24"), "dev", "eth0"])?;
    ns.ip(&["route", "add", "default", "via", &format!("{net}.1")])?;
    node.ip(&["addr", "add", &format!("{net}.1/24"), "dev", dev])?;
    Ok(ns)
}

/// Routing on: the node forwards between its pods (and the other node).
fn router(lab: &mut Lab, tag: &str) -> Result<Netns> {
    let node = lab.netns(tag)?;
    run_cmd(node.exec("sysctl").args(["-qw", "net.ipv4.ip_forward=1"]))?;
    Ok(node)
}

/// The client and server pods of pair `n`, placed by `t` and captured by `mode`, the server's
/// app listening, the pods' rules in place (sockmesh pods are registered each round).
fn pair(b: &mut Bench, t: Topology, mode: Mode, n: u32) -> Result<Pair> {
    let (client_net, server_net) = (format!("10.{}.1", 60 + n), format!("10.{}.2", 60 + n));
    let lab = &mut b.lab;
    let node = router(lab, &format!("m{n}n"))?;
    let client_ns = pod_on(lab, &node, &format!("m{n}c"), "c0", &client_net)?;
    let server_ns = match t {
        Topology::SameNode => pod_on(lab, &node, &format!("m{n}s"), "s0", &server_net)?,
        Topology::TwoNodes => {
            let other = router(lab, &format!("m{n}o"))?;
            lab.veth(&node, "n1", &other, "n0")?;
            let link = format!("10.{}.0", 60 + n);
            node.ip(&["addr", "add", &format!("{link}.1/30"), "dev", "n1"])?;
            other.ip(&["addr", "add", &format!("{link}.2/30"), "dev", "n0"])?;
            node.ip(&[
                "route",
                "add",
                &format!("{server_net}.0/24"),
                "via",
                &format!("{link}.2"),
            ])?;
            other.ip(&[
                "route",
                "add",
                &format!("{client_net}.0/24"),
                "via",
                &format!("{link}.1"),
            ])?;
            pod_on(lab, &other, &format!("m{n}s"), "s0", &server_net)?
        }
    };
    let in_cgroup = mode == Mode::Sockmesh;
    let pod = |ns: Netns| Pod {
        peer: node.clone(),
        ns,
        peer2: None,
        in_cgroup,
    };
    let (client, server) = (pod(client_ns), pod(server_ns));
    let app = HttpKeepalive {
        addrs: vec![pods::any_v4(APP_PORT)],
    };
    lab.start(server.place(), &app)?;
    if mode == Mode::Iptables {
        for p in [&client, &server] {
            pods::apply_iptables(p, &b.profile)?;
        }
    }
    Ok(Pair {
        client,
        server,
        server_ip: format!("{server_net}.2"),
        mode,
    })
}

/// Start both proxies, measure each client mode, stop them.
fn measure(b: &mut Bench, pair: &Pair, config: &std::path::Path) -> Result<Vec<MeshRound>> {
    let bin = sibling_bin("sockmesh-proxy", "SOCKMESH_PROXY_BIN")?;
    let mut procs = Vec::new();
    for pod in [&pair.server, &pair.client] {
        let mut cmd: Command = b.lab.command_at(pod.place(), &bin)?;
        cmd.arg("--config")
            .arg(config)
            .env("SOCKMESH_PROXY_LOG", "warn");
        procs.push(b.lab.spawn(cmd, Some("ready"))?);
    }
    let dst: SocketAddr = format!("{}:{APP_PORT}", pair.server_ip).parse()?;
    let result = (|| {
        wait_for_answer(
            &b.lab,
            pair.client.place(),
            dst,
            HOST,
            Duration::from_secs(10),
        )?;
        let pids: Vec<u32> = procs
            .iter()
            .map(|&i| b.lab.pid(i).context("a proxy's pid"))
            .collect::<Result<_>>()?;
        let cpu = || -> Result<f64> { pids.iter().map(|&p| cpu_secs(p)).sum() };
        let mut out = Vec::new();
        for (_, new_conn) in HTTP_MODES {
            let cpu0 = cpu()?;
            let program = BenchHttp {
                dst,
                host: HOST.into(),
                conns: b.sizes.conns,
                secs: b.sizes.secs,
                new_conn,
                wire: Wire::Http1,
                id: Identity::APP,
            };
            let text = b.lab.output(pair.client.place(), &program)?;
            let f: Vec<f64> = text
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if f.len() != 3 || f[0] == 0.0 {
                bail!("bench-http through the mesh gave {text:?}");
            }
            let requests = f[0];
            let cpu_us = (cpu()? - cpu0) / requests * 1e6;
            out.push([requests / b.sizes.secs, f[1], f[2], cpu_us]);
        }
        Ok(out)
    })();
    for i in procs {
        b.lab.kill(i)?;
    }
    result
}

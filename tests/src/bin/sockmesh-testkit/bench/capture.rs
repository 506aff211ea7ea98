//! Section 1, capture cost at connect time: short connections per second from an app to the
//! outbound port, directly (no capture), redirected by istio's rules (real iptables), and
//! redirected by sockmesh, with the kernel's run-time statistics of each sockmesh program; and
//! the same app in sockmesh's pod calling the port directly, which every program sees and none
//! redirects (what having them attached costs a connection). In a lab of its own, whose agent
//! runs as installed (its defaults: acceleration off for the node), not with the node setting
//! that sections 2 and 6 need.

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::Result;
use sockmesh_tests::{
    lab::Lab,
    pods::{self, Mode, Pod},
    profiles::Profile,
};

use super::{
    connects_in,
    host::{prog_stats, BpfStats, ProgStats},
    lean_listener, peer80,
    stats::{fmt, fmt2, in_order, ratio, stats, Spread},
};

/// Turns of each path in a round, of equal length.
const SLICES: usize = 4;

/// The paths of a round.
enum Path {
    Direct,
    Iptables,
    Sockmesh,
    Uncaptured,
}

pub struct Capture {
    /// The section's lab and its agent, with the agent's defaults.
    lab: Lab,
    /// Captured by sockmesh.
    sm: Pod,
    /// No capture: connections go straight to its 127.0.0.1:15001.
    direct: Pod,
    /// Captured by istio's iptables rules.
    ipt: Pod,
    /// Connections per second of each round, per path.
    direct_rate: Vec<f64>,
    ipt_rate: Vec<f64>,
    sm_rate: Vec<f64>,
    uncaptured_rate: Vec<f64>,
    /// Per sockmesh program, each round: runs per connection, ns per run.
    progs: BTreeMap<String, (Vec<f64>, Vec<f64>)>,
}

/// The section's sockmesh pod in `lab`: registered with profile `p`, its listener on 15001 in
/// the lab's cgroup (where the programs run).
pub fn sockmesh_pod(lab: &mut Lab, p: &Profile) -> Result<Pod> {
    let sm = pods::pod_with(lab, "s", p, Mode::Sockmesh, &[])?;
    pods::apply_sockmesh_env(lab, &sm, p, &[])?;
    lean_listener(lab, &sm, true)?;
    Ok(sm)
}

impl Capture {
    /// The section's lab, its agent started with no settings but the lab's own (cgroup,
    /// bpffs, socket), and its pods, each with its listener on 15001: with no capture, with
    /// istio's rules (`p`), and registered with sockmesh with the same profile.
    pub fn new(p: &Profile) -> Result<Capture> {
        let mut lab = Lab::with_agent("capture")?;
        let direct = pods::pod_with(&mut lab, "d", p, Mode::Iptables, &[])?;
        lean_listener(&mut lab, &direct, false)?;
        let ipt = pods::pod_with(&mut lab, "i", p, Mode::Iptables, &[])?;
        lean_listener(&mut lab, &ipt, false)?;
        pods::apply_iptables(&ipt, p)?;
        let sm = sockmesh_pod(&mut lab, p)?;
        Ok(Capture {
            lab,
            sm,
            direct,
            ipt,
            direct_rate: Vec::new(),
            ipt_rate: Vec::new(),
            sm_rate: Vec::new(),
            uncaptured_rate: Vec::new(),
            progs: BTreeMap::new(),
        })
    }

    /// One round of `secs` seconds of each path: [`SLICES`] turns of each, the paths in
    /// reverse order every other turn, so that what the machine does meanwhile falls on all of
    /// them alike.
    pub fn round(&mut self, secs: f64) -> Result<()> {
        let local: SocketAddr = "127.0.0.1:15001".parse()?;
        let turn_secs = secs / SLICES as f64;
        let connects = |pod: &Pod, in_cgroup: bool, dst: SocketAddr, secs: f64| {
            connects_in(&self.lab, pod, in_cgroup, dst, secs)
        };
        let mut sums = [0.0; 4];
        for turn in 0..SLICES {
            let paths = [
                Path::Direct,
                Path::Iptables,
                Path::Sockmesh,
                Path::Uncaptured,
            ];
            for (k, path) in in_order(paths, turn) {
                sums[k] += match path {
                    Path::Direct => connects(&self.direct, false, local, turn_secs)?,
                    Path::Iptables => connects(&self.ipt, false, peer80(), turn_secs)?,
                    Path::Sockmesh => connects(&self.sm, true, peer80(), turn_secs)?,
                    Path::Uncaptured => connects(&self.sm, true, local, turn_secs)?,
                };
            }
        }
        let n = SLICES as f64;
        self.direct_rate.push(sums[0] / n);
        self.ipt_rate.push(sums[1] / n);
        self.sm_rate.push(sums[2] / n);
        self.uncaptured_rate.push(sums[3] / n);
        // Where sockmesh's time goes: its connections once more, with the kernel's BPF
        // run-time statistics on. Only then: they cost every program run two clock reads,
        // which the rates above would pay and iptables' would not. The counts are every
        // sockmesh program's on the machine: the other sections' lab is idle meanwhile.
        let stats = BpfStats::on()?;
        let before = prog_stats()?;
        let rate = connects(&self.sm, true, peer80(), secs)?;
        let after = prog_stats()?;
        drop(stats);
        self.count_programs(&before, after, rate * secs);
        Ok(())
    }

    /// Add each program's runs per connection and ns per run between `before` and `after`,
    /// over `conns` connections.
    fn count_programs(&mut self, before: &ProgStats, after: ProgStats, conns: f64) {
        for (name, (runs, ns)) in after {
            let (r0, n0) = before.get(&name).copied().unwrap_or_default();
            if runs > r0 {
                let e = self.progs.entry(name).or_default();
                e.0.push((runs - r0) as f64 / conns);
                e.1.push((ns - n0) as f64 / (runs - r0) as f64);
            }
        }
    }

    /// Connections per second: direct, iptables, sockmesh.
    pub fn rates(&self) -> (Spread, Spread, Spread) {
        (
            stats(&self.direct_rate),
            stats(&self.ipt_rate),
            stats(&self.sm_rate),
        )
    }

    /// sockmesh's connections per second against a direct connection's (the target).
    pub fn to_direct(&self) -> Spread {
        ratio(&self.sm_rate, &self.direct_rate)
    }

    pub fn report(&self, r: &mut String) {
        let (d, i, m) = self.rates();
        r.push_str("## 1. Capture cost at connect time\n\n");
        r.push_str(&format!(
            "Short TCP connections (connect, read the listener's one line, close) per second, from \
             an app (uid 1000) to the outbound port: directly to 127.0.0.1:15001 with no capture, \
             and to a remote address redirected to 15001 by istio's rules (real iptables) or by \
             sockmesh. The listener is the same on every path and does per connection what a \
             transparent proxy does before routing: accept, read SO_ORIGINAL_DST once, then it \
             answers one line and closes. Last, the same app in sockmesh's pod calls its \
             127.0.0.1:15001 directly: every sockmesh program runs for it (connect, sock_ops, \
             sk_lookup, getpeername at accept, getsockopt) and none redirects it, so its ratio is \
             what the programs being there cost a connection, before any capture. These pods have \
             a lab of their own, whose agent runs with its defaults, as installed (acceleration \
             off for the node; the other sections' agent has it on, for sections 2 and 6). A \
             round gives each path {SLICES} turns of 1/{SLICES} of its time, the paths' order \
             reversed every other turn.\n\n",
        ));
        r.push_str("| path | connections/s | ratio to direct |\n|---|---|---|\n");
        for (name, v, rates) in [
            ("direct (no capture)", d, &self.direct_rate),
            ("iptables REDIRECT (istio rules)", i, &self.ipt_rate),
            ("sockmesh", m, &self.sm_rate),
            (
                "sockmesh, not captured (to 127.0.0.1:15001)",
                stats(&self.uncaptured_rate),
                &self.uncaptured_rate,
            ),
        ] {
            r.push_str(&format!(
                "| {name} | {} | {} |\n",
                fmt(v),
                fmt2(ratio(rates, &self.direct_rate))
            ));
        }
        r.push_str(&format!(
            "\nsockmesh / iptables: {}\n\n",
            fmt2(ratio(&self.sm_rate, &self.ipt_rate))
        ));
        r.push_str(
            "Where a sockmesh connection's time goes in the kernel's programs, from the kernel's \
             BPF run-time statistics, on only for one more run of sockmesh's connections after \
             each round's rates (they add two clock reads to every program run, which the rates \
             above do not pay):\n\n\
             | program | runs per connection | ns per run |\n|---|---|---|\n",
        );
        let mut per_conn_ns = 0.0;
        for (name, (runs, ns)) in &self.progs {
            let (k, n) = (stats(runs).0, stats(ns).0);
            per_conn_ns += k * n;
            r.push_str(&format!("| {name} | {k:.2} | {n:.0} |\n"));
        }
        r.push_str(&format!(
            "\nIn all {:.2} µs of programs per connection, of the {:.1} µs a sockmesh connection \
             takes here (1 / its rate) and the {:.1} µs more than a direct one.\n\n",
            per_conn_ns / 1000.0,
            1e6 / m.0,
            1e6 / m.0 - 1e6 / d.0
        ));
    }
}

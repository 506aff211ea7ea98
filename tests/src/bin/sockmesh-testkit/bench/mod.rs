//! The benchmark suite behind `cargo xtask bench`. Every figure is a ratio against baselines
//! measured in the same run, on the same machine: the median of interleaved rounds, with the
//! spread. The report is Markdown (docs/benchmarks.md).
//!
//! Measured (the numbers of issue #6), a module each:
//! 1. `capture`: capture cost at connect time: short connections per second to the outbound
//!    port, direct, through istio's iptables rules (real iptables), and through sockmesh, with
//!    the kernel's run-time statistics of each sockmesh program (in a lab of its own, its agent
//!    with the defaults);
//! 2. `hop`: the app-to-proxy hop through a minimal forwarder: round trips and bulk, under
//!    iptables, sockmesh, sockmesh with sk_msg, and over a Unix socket;
//! 3. `rules`: rule scale: 1 to 10,000 excluded CIDRs and ports, iptables against sockmesh;
//! 4. `pod_scale`: registering 1 to 1,000 pods, the agent's memory and CPU, capture with 1,000
//!    registered;
//! 5. `proxies`: sockmesh-proxy against HAProxy in the same role (HTTP/1.1 keep-alive clients,
//!    a round-robin cluster of two upstreams), under sockmesh capture, one thread each;
//! 6. `mesh`: the mesh request end to end, through a client pod's and a server pod's
//!    sockmesh-proxy, under iptables, sockmesh and sockmesh with acceleration, the pods on one
//!    node or on two.
//!
//! Then `targets`: each target against its figure, and why.

mod capture;
mod hop;
mod host;
mod mesh;
mod pod_scale;
pub mod profile;
pub mod programs;
mod proxies;
mod rules;
mod stats;
mod targets;

use std::net::SocketAddr;

use anyhow::{Context, Result};
use sockmesh_tests::{
    kit::{BenchConnect, Identity, Launch, Listen, Listener, ListenerKind},
    lab::{require_tools, run as run_cmd, Lab, Place},
    pods::{self, Mode, Pod, PEER_V4},
    profiles::Profile,
};

/// How long and how much: tiny for a smoke run, full for the figures.
pub struct Sizes {
    pub rounds: usize,
    pub secs: f64,
    pub conns: usize,
    /// Rule scale: exclusions of each kind.
    pub rules: &'static [usize],
    /// Pod scale: pods registered.
    pub pods: &'static [usize],
    /// Hop: bytes of the bulk transfer.
    pub bulk: usize,
}

impl Sizes {
    /// Tiny sizes if `smoke`, else the full ones.
    fn of(smoke: bool) -> Sizes {
        if smoke {
            Sizes::SMOKE
        } else {
            Sizes::FULL
        }
    }

    /// Tiny sizes: the suite runs, the figures mean nothing.
    const SMOKE: Sizes = Sizes {
        rounds: 1,
        secs: 0.3,
        conns: 2,
        rules: &[1, 100],
        pods: &[1, 10],
        bulk: 4 << 20,
    };

    const FULL: Sizes = Sizes {
        rounds: 7,
        secs: 2.0,
        conns: 4,
        rules: &[1, 100, 1000, 10_000],
        pods: &[1, 100, 1000],
        bulk: 256 << 20,
    };
}

/// What the sections after the first share: the lab and its agent (acceleration on for the
/// node; each pod says whether it wants it), the profile (istio's default sidecar), and the pod
/// captured by sockmesh, which every one of them measures.
pub struct Bench {
    pub lab: Lab,
    pub sizes: Sizes,
    pub smoke: bool,
    pub profile: Profile,
    pub sm: Pod,
}

impl Bench {
    fn new(smoke: bool) -> Result<Bench> {
        let mut lab = Lab::new("bench")?;
        lab.agent_args = vec!["--acceleration".into(), "on".into()];
        lab.start_agent()?;
        let profile = Profile::default_sidecar();
        let sm = pods::pod_with(&mut lab, "s", &profile, Mode::Sockmesh, &[])?;
        // The proxies' upstream connections made per exchange would otherwise use up the pod's
        // ports toward their upstreams within seconds (see section 5's text).
        sockmesh_tests::lab::run(
            sm.ns
                .exec("sysctl")
                .args(["-qw", "net.ipv4.tcp_tw_reuse=1"]),
        )?;
        let b = Bench {
            lab,
            sizes: Sizes::of(smoke),
            smoke,
            profile,
            sm,
        };
        b.register(&b.sm, &b.profile, "off", false)?;
        Ok(b)
    }

    /// Run the testkit's client `program` in `pod` (in the lab's cgroup if `in_cgroup`); what
    /// it printed, trimmed.
    pub fn output<P: Launch>(&self, pod: &Pod, in_cgroup: bool, program: &P) -> Result<String> {
        let out = self.lab.output(Place::new(&pod.ns, in_cgroup), program)?;
        Ok(out.trim().to_string())
    }

    /// Short connections per second from the app of `pod` to `dst` for the round's seconds.
    pub fn connects(&self, pod: &Pod, in_cgroup: bool, dst: SocketAddr) -> Result<f64> {
        self.connects_for(pod, in_cgroup, dst, self.sizes.secs)
    }

    /// [`Bench::connects`] for `secs` seconds.
    pub fn connects_for(
        &self,
        pod: &Pod,
        in_cgroup: bool,
        dst: SocketAddr,
        secs: f64,
    ) -> Result<f64> {
        connects_in(&self.lab, pod, in_cgroup, dst, secs)
    }

    /// Register `pod` with `prof` (after unregistering it, if `again`), with the pod's socket
    /// acceleration `accel` (`SOCKMESH_ACCELERATION`: `all`, `proxies` or `off`; the node's
    /// agent has it on).
    pub fn register(&self, pod: &Pod, prof: &Profile, accel: &str, again: bool) -> Result<()> {
        if again {
            run_cmd(
                self.lab
                    .sockmesh_in(&pod.ns)?
                    .args(["init", "istio", "--cleanup-only"]),
            )?;
        }
        pods::apply_sockmesh_env(&self.lab, pod, prof, &[("SOCKMESH_ACCELERATION", accel)])?;
        Ok(())
    }

    /// Register the sockmesh pod again with `prof`, acceleration off.
    pub fn reregister(&self, prof: &Profile) -> Result<()> {
        self.register(&self.sm, prof, "off", true)
    }
}

/// Short connections per second from the app of `pod` in `lab` (in the lab's cgroup if
/// `in_cgroup`) to `dst` for `secs` seconds.
pub fn connects_in(
    lab: &Lab,
    pod: &Pod,
    in_cgroup: bool,
    dst: SocketAddr,
    secs: f64,
) -> Result<f64> {
    let program = BenchConnect {
        dst,
        secs,
        id: Identity::APP,
    };
    let out = lab.output(Place::new(&pod.ns, in_cgroup), &program)?;
    let n: f64 = out.trim().parse().context("bench-connect output")?;
    Ok(n / secs)
}

/// The connection benchmarks' listener on the pod's 15001 (the testkit's lean one: it reads the
/// original destination once per connection, as a proxy does); the lab's process index.
pub fn lean_listener(lab: &mut Lab, pod: &Pod, in_cgroup: bool) -> Result<usize> {
    let listen = Listen {
        listeners: vec![Listener::new(
            ListenerKind::Lean,
            "pod:15001",
            pods::any_v4(15001),
        )],
    };
    lab.start(Place::new(&pod.ns, in_cgroup), &listen)
}

/// The peer host's port 80: the destination of the connection benchmarks.
fn peer80() -> SocketAddr {
    SocketAddr::new(PEER_V4.parse().expect("valid test address"), 80)
}

/// Run the suite; `smoke` uses tiny sizes (it checks that the suite runs, nothing more).
pub fn run(smoke: bool) -> Result<String> {
    require_tools(&["ip", "iptables-restore", "haproxy", "perf"])?;
    let mut b = Bench::new(smoke)?;
    let mut capture = capture::Capture::new(&b.profile)?;
    let mut hop = hop::Hop::new(&mut b)?;
    let mut proxies = proxies::Proxies::new(&mut b)?;
    let mut mesh = mesh::Mesh::new(&mut b)?;
    let mut rules = rules::Rules::new(&mut b)?;
    let mut pod_scale = pod_scale::PodScale::new(&b)?;
    for _ in 0..b.sizes.rounds {
        capture.round(b.sizes.secs)?;
        // The sockmesh pod's listener on 15001 serves sections 3 and 4; then the hop's
        // forwarder and the proxies take the port.
        let listener = lean_listener(&mut b.lab, &b.sm, true)?;
        rules.round(&b)?;
        pod_scale.round(&b)?;
        b.lab.kill(listener)?;
        hop.round(&mut b)?;
        proxies.round(&mut b)?;
        mesh.round(&mut b)?;
    }
    let mut r = header(smoke, &b.sizes);
    capture.report(&mut r);
    hop.report(&b, &mut r);
    rules.report(&mut r);
    pod_scale.report(&b, &mut r);
    proxies.report(&b, &mut r);
    mesh.report(&b, &mut r);
    targets::report(
        &targets::Figures {
            capture: &capture,
            hop: &hop,
            rules: &rules,
            pod_scale: &pod_scale,
            proxies: &proxies,
            mesh: &mesh,
        },
        &mut r,
    );
    Ok(r)
}

/// Section 1 alone, for working on the programs: capture's rounds and its report, no targets.
pub fn run_capture(smoke: bool) -> Result<String> {
    require_tools(&["ip", "iptables-restore"])?;
    let sizes = Sizes::of(smoke);
    let mut capture = capture::Capture::new(&Profile::default_sidecar())?;
    for _ in 0..sizes.rounds {
        capture.round(sizes.secs)?;
    }
    let mut r = header(smoke, &sizes);
    capture.report(&mut r);
    Ok(r)
}

/// Section 5 alone, for working on the proxy: the proxies' rounds and their report, no
/// targets. Its ratios against HAProxy compare one build of sockmesh-proxy with another
/// (`SOCKMESH_PROXY_BIN`) across runs.
pub fn run_proxies(smoke: bool) -> Result<String> {
    require_tools(&["ip", "iptables-restore", "haproxy", "perf"])?;
    let mut b = Bench::new(smoke)?;
    let mut proxies = proxies::Proxies::new(&mut b)?;
    for _ in 0..b.sizes.rounds {
        proxies.round(&mut b)?;
    }
    let mut r = header(smoke, &b.sizes);
    proxies.report(&b, &mut r);
    Ok(r)
}

/// The report's title and how to read it.
fn header(smoke: bool, sizes: &Sizes) -> String {
    format!(
        "# Benchmarks\n\nWritten by `cargo xtask bench`{}. Machine: {}. Each figure is the median \
         of {} interleaved rounds of {} s, with the spread (min–max) in brackets. A ratio of two \
         paths or proxies is the median of the rounds' own ratios, with their spread: in each \
         round both are measured one after the other (in reverse order every other round), so \
         a round that was slow for both moves the ratio less than either figure.\n\n",
        if smoke {
            " --smoke (tiny sizes: not figures to quote)"
        } else {
            ""
        },
        host::machine(),
        sizes.rounds,
        sizes.secs
    )
}

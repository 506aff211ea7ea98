//! The benchmark suite behind `cargo xtask bench`. Every figure is a ratio against baselines
//! measured in the same run, on the same machine: the median of interleaved rounds, with the
//! spread. The report is Markdown (docs/benchmarks.md).
//!
//! Measured (the numbers of issue #6):
//! 1. capture cost at connect time: short connections per second to the outbound port, direct,
//!    through istio's iptables rules (real iptables), and through sockmesh, with the kernel's
//!    run-time statistics of each sockmesh program;
//! 2. the app-to-proxy hop through a minimal forwarder: round trips and bulk, under iptables,
//!    sockmesh, sockmesh with sk_msg, and over a Unix socket;
//! 3. rule scale: 1 to 10,000 excluded CIDRs and ports, iptables against sockmesh;
//! 4. pod scale: registering 1 to 1,000 pods, the agent's memory and CPU, capture with 1,000
//!    registered;
//! 5. the proxy: sockmesh-proxy against HAProxy in the same role (HTTP/1.1 keep-alive clients,
//!    a round-robin cluster of two upstreams), under sockmesh capture, one thread each.

use std::{process::Command, time::Duration};

use anyhow::{bail, Context, Result};

use crate::{
    lab::{require_tools, run as run_cmd, sibling_bin, testkit_bin, Lab},
    pods::{self, Mode, Pod, PEER_V4},
    profiles::Profile,
};

struct Sizes {
    rounds: usize,
    secs: f64,
    conns: usize,
    /// Rule scale: exclusions of each kind.
    rules: &'static [usize],
    /// Pod scale: pods registered.
    pods: &'static [usize],
    /// Hop: bytes of the bulk transfer.
    bulk: usize,
}

/// One round of one hop path: 64 B p50 and p99 µs, 4 KiB p50 and p99 µs, bulk MB/s.
type HopRound = (f64, f64, f64, f64, f64);

/// Median, min and max.
type Spread = (f64, f64, f64);

/// Median and spread of a series.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    (mid, s[0], s[s.len() - 1])
}

fn fmt((mid, lo, hi): (f64, f64, f64)) -> String {
    format!("{mid:.0} [{lo:.0}–{hi:.0}]")
}

fn testkit(lab: &Lab, pod: &Pod, in_cgroup: bool, args: &[&str]) -> Result<String> {
    let mut cmd: Command = lab.command(&pod.ns, in_cgroup, testkit_bin()?)?;
    cmd.args(args).args(["--uid", "1000", "--gid", "1000"]);
    let out = run_cmd(&mut cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn connects(lab: &Lab, pod: &Pod, in_cgroup: bool, dst: &str, secs: f64) -> Result<f64> {
    let n: f64 = testkit(
        lab,
        pod,
        in_cgroup,
        &["bench-connect", dst, "--secs", &secs.to_string()],
    )?
    .parse()
    .context("bench-connect output")?;
    Ok(n / secs)
}

/// The connection benchmarks' listener on the pod's 15001 (the testkit's lean one: it reads
/// the original destination once per connection, as a proxy does); the lab's process index.
fn lean_listener(lab: &mut Lab, pod: &Pod, in_cgroup: bool) -> Result<usize> {
    let mut l = lab.command(&pod.ns, in_cgroup, testkit_bin()?)?;
    l.args(["listen", "b/pod:15001@0.0.0.0:15001"]);
    lab.spawn(l, Some("ready"))
}

/// The proxy benchmark's two client modes: keep-alive, and a new connection per request.
const HTTP_MODES: [(&str, bool); 2] = [("keep-alive", false), ("new connections", true)];

/// (requests/s, p50 µs, p99 µs) through whatever listens on the pod's 15001; `new_conn`: a
/// connection per request.
fn http(lab: &Lab, pod: &Pod, s: &Sizes, new_conn: bool) -> Result<(f64, f64, f64)> {
    let (conns, secs) = (s.conns.to_string(), s.secs.to_string());
    let mut args = vec![
        "bench-http",
        "10.96.0.10:80",
        "--host",
        "reviews",
        "--conns",
        &conns,
        "--secs",
        &secs,
    ];
    if new_conn {
        args.push("--new-conn");
    }
    let out = testkit(lab, pod, true, &args)?;
    let f: Vec<f64> = out.split(' ').filter_map(|x| x.parse().ok()).collect();
    if f.len() != 3 || f[0] == 0.0 {
        bail!("bench-http gave {out:?}");
    }
    Ok((f[0] / s.secs, f[1], f[2]))
}

/// One round of section 5 for one proxy: start it (`cmd`, ready when it prints `ready`, if
/// given), measure each client mode of `HTTP_MODES` through it (the figures, and its CPU µs
/// per request), stop it.
fn proxy_round(
    lab: &mut Lab,
    pod: &Pod,
    s: &Sizes,
    cmd: Command,
    ready: Option<&str>,
    runs: &mut [Vec<(f64, f64, f64)>; 2],
    cpu: &mut [Vec<f64>; 2],
) -> Result<()> {
    let i = lab.spawn(cmd, ready)?;
    wait_for_proxy(lab, pod)?;
    let pid = lab.pid(i).context("the proxy's pid")?;
    for (k, (_, new_conn)) in HTTP_MODES.into_iter().enumerate() {
        let cpu0 = cpu_secs(pid)?;
        let r = http(lab, pod, s, new_conn)?;
        cpu[k].push((cpu_secs(pid)? - cpu0) / (r.0 * s.secs) * 1e6);
        runs[k].push(r);
    }
    lab.kill(i)
}

/// Wait until an HTTP request through the pod's 15001 succeeds (a proxy has started).
fn wait_for_proxy(lab: &Lab, pod: &Pod) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ok = testkit(
            lab,
            pod,
            true,
            &["http-get", "10.96.0.10:80", "--host", "reviews"],
        )
        .is_ok_and(|o| o.starts_with("HTTP/1.1 200"));
        if ok {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the proxy did not answer within 10 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `n` excluded CIDRs (`-x`) and `n` excluded ports (`-o`), none of them the benchmark's
/// destination (peer:80).
fn exclusions(n: usize) -> (Vec<String>, Vec<u16>) {
    let cidrs = (0..n)
        .map(|i| format!("1.{}.{}.0/24", i / 100, i % 100))
        .collect();
    let ports = (0..n).map(|i| 20_000 + i as u16).collect();
    (cidrs, ports)
}

/// Register `pod` with `prof` (after unregistering it, if `again`), with socket acceleration
/// for all its sockets or off for it (the node's agent has it on).
fn register(lab: &Lab, pod: &Pod, prof: &Profile, accel: bool, again: bool) -> Result<()> {
    if again {
        run_cmd(
            lab.sockmesh_in(&pod.ns)?
                .args(["init", "istio", "--cleanup-only"]),
        )?;
    }
    // The hop's app writes to its forwarder (the proxy): acceleration for all the pod's sockets.
    let accel = if accel { "all" } else { "off" };
    pods::apply_sockmesh_env(lab, pod, prof, &[("SOCKMESH_ACCELERATION", accel)])?;
    Ok(())
}

fn reregister(lab: &Lab, pod: &Pod, prof: &Profile) -> Result<()> {
    register(lab, pod, prof, false, true)
}

/// (p50 µs, p99 µs) of `size`-byte round trips through `dst` from the pod's app.
fn round_trips(lab: &Lab, pod: &Pod, dst: &str, size: usize, secs: f64) -> Result<(f64, f64)> {
    let out = testkit(
        lab,
        pod,
        true,
        &[
            "hop-rr",
            dst,
            "--size",
            &size.to_string(),
            "--secs",
            &secs.to_string(),
        ],
    )?;
    let f: Vec<f64> = out.split(' ').filter_map(|x| x.parse().ok()).collect();
    if f.len() != 3 || f[0] == 0.0 {
        bail!("hop-rr gave {out:?}");
    }
    Ok((f[1], f[2]))
}

/// MB/s of `bytes` through `dst` to the upstream's sink, from the pod's app.
fn bulk(lab: &Lab, pod: &Pod, dst: &str, bytes: usize) -> Result<f64> {
    let out = testkit(
        lab,
        pod,
        true,
        &["hop-bulk", dst, "--bytes", &bytes.to_string()],
    )?;
    let bps: f64 = out
        .parse()
        .with_context(|| format!("hop-bulk gave {out:?}"))?;
    Ok(bps / 1e6)
}

/// The minimal forwarder on the pod's outbound port (and a Unix socket), as the proxy user.
fn forwarder(lab: &mut Lab, pod: &Pod, unix: &std::path::Path) -> Result<usize> {
    let mut cmd = pods::as_user(lab, pod, 1337, &testkit_bin()?)?;
    cmd.args(["hop-forward", "0.0.0.0:15001", "--unix"])
        .arg(unix)
        .args(["--upstream", &format!("{PEER_V4}:18100")]);
    lab.spawn(cmd, Some("ready"))
}

/// CPU time a process (all its threads) has used, in seconds.
fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After "(comm)": state is field 3; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("/proc/pid/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// The kernel's run counts and run times of the sockmesh programs (names start with
/// "sockmesh_"; the kernel keeps 15 characters), from bpftool; bpf_stats must be on.
fn prog_stats() -> Result<std::collections::BTreeMap<String, (u64, u64)>> {
    let out = run_cmd(Command::new("bpftool").args(["prog", "show", "--json"]))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    let mut m = std::collections::BTreeMap::new();
    for p in v.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default();
        if let Some(short) = name.strip_prefix("sockmesh_") {
            let e: &mut (u64, u64) = m.entry(short.to_string()).or_default();
            e.0 += p["run_cnt"].as_u64().unwrap_or(0);
            e.1 += p["run_time_ns"].as_u64().unwrap_or(0);
        }
    }
    Ok(m)
}

/// Turns the kernel's BPF run-time statistics on, and back as they were when dropped.
struct BpfStats(String);

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    fn on() -> Result<BpfStats> {
        let was = std::fs::read_to_string(Self::PATH).context(Self::PATH)?;
        std::fs::write(Self::PATH, "1").context(Self::PATH)?;
        Ok(BpfStats(was.trim().to_string()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// A new network namespace (made by a short-lived thread), kept alive by the returned fd.
fn new_netns() -> Result<std::os::fd::OwnedFd> {
    std::thread::spawn(|| -> Result<std::os::fd::OwnedFd> {
        // SAFETY: only this thread's namespace changes; it ends right after.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// What the pod-scale section asks of the agent for each namespace.
#[derive(Clone, Copy)]
enum PodCall {
    Register,
    Unregister,
}

/// Make `call` for `fds`' namespaces one after the other (as init containers do, each its own
/// connection); seconds taken.
fn call_each(
    rt: &tokio::runtime::Runtime,
    lab: &Lab,
    fds: &[std::os::fd::OwnedFd],
    call: PodCall,
) -> Result<f64> {
    use crate::api::pb;
    use std::os::fd::AsRawFd;
    let t = std::time::Instant::now();
    rt.block_on(async {
        for fd in fds {
            let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
            let mut c = crate::api::pod_client(&lab.socket, std::path::Path::new(&path)).await?;
            match call {
                PodCall::Register => c
                    .register(pb::RegisterRequest {
                        settings: Some(crate::api::default_settings()),
                    })
                    .await
                    .context("registering a pod")?,
                PodCall::Unregister => c
                    .unregister(pb::UnregisterRequest {})
                    .await
                    .context("unregistering a pod")?,
            };
        }
        anyhow::Ok(())
    })?;
    Ok(t.elapsed().as_secs_f64())
}

/// The agent's resident memory, MiB.
fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

/// Kernel memory of the BPF maps the agent holds (the `memlock` of each map, counted once
/// however many fds the agent has to it), MiB.
fn map_memory_mib(pid: u32) -> Result<f64> {
    let mut maps = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(e?.path()).unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(id), Some(bytes)) = (field("map_id:"), field("memlock:")) {
            maps.insert(id, bytes);
        }
    }
    Ok(maps.values().sum::<u64>() as f64 / (1024.0 * 1024.0))
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, kernel {}", kernel.trim())
}

/// Run the suite; `smoke` uses tiny sizes (it checks that the suite runs, nothing more).
pub fn run(smoke: bool) -> Result<String> {
    require_tools(&["ip", "iptables-restore", "haproxy"])?;
    let s = if smoke {
        Sizes {
            rounds: 1,
            secs: 0.3,
            conns: 2,
            rules: &[1, 100],
            pods: &[1, 10],
            bulk: 4 << 20,
        }
    } else {
        Sizes {
            rounds: 5,
            secs: 2.0,
            conns: 4,
            rules: &[1, 100, 1000, 10_000],
            pods: &[1, 100, 1000],
            bulk: 256 << 20,
        }
    };
    let mut lab = Lab::new("bench")?;
    // Acceleration on for the node; each pod says whether it wants it.
    lab.agent_args = vec!["--acceleration".into(), "on".into()];
    lab.start_agent()?;
    let p = Profile::default_sidecar();
    // Three pods: no capture, istio's iptables rules, sockmesh.
    let direct = pods::pod_with(&mut lab, "d", &p, Mode::Iptables, &[])?;
    lean_listener(&mut lab, &direct, false)?;
    let ipt = pods::pod_with(&mut lab, "i", &p, Mode::Iptables, &[])?;
    lean_listener(&mut lab, &ipt, false)?;
    pods::apply_iptables(&ipt, &p)?;
    let sm = pods::pod_with(&mut lab, "s", &p, Mode::Sockmesh, &[])?;
    register(&lab, &sm, &p, false, false)?;
    // 2. The hop: a pod with istio's rules and no listener (its forwarder comes and goes),
    // upstreams on both peers.
    let hop_ipt = pods::pod_with(&mut lab, "h", &p, Mode::Iptables, &[])?;
    pods::apply_iptables(&hop_ipt, &p)?;
    for peer in [&hop_ipt.peer, &sm.peer] {
        let mut up = lab.command(peer, false, testkit_bin()?)?;
        up.args(["hop-upstream", &format!("{PEER_V4}:18100")]);
        lab.spawn(up, Some("ready"))?;
    }
    let hop_dst = format!("{PEER_V4}:18100");
    // The forwarder (uid 1337) makes its Unix sockets here.
    let hop_dir = lab.dir.join("hop");
    std::fs::create_dir_all(&hop_dir)?;
    std::fs::set_permissions(
        &hop_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )?;
    let hop_sock = hop_dir.join("hop.sock");
    let hop_unix = format!("unix:{}", hop_sock.display());
    // Per path: 64 B (p50, p99), 4 KiB (p50, p99), bulk MB/s.
    let mut hops: Vec<Vec<HopRound>> = vec![Vec::new(); 4];
    // Upstreams of the proxy benchmark, on the sockmesh pod's peer.
    let mut up = lab.command(&sm.peer, false, testkit_bin()?)?;
    up.args([
        "http-keepalive",
        &format!("{PEER_V4}:18081"),
        &format!("{PEER_V4}:18082"),
    ]);
    lab.spawn(up, Some("ready"))?;
    let proxy_yaml = lab.dir.join("proxy.yaml");
    std::fs::write(
        &proxy_yaml,
        format!(
            "listeners:\n  - {{name: outbound, address: \"0.0.0.0:15001\", direction: outbound}}\n\
             virtual_hosts:\n  - {{name: reviews, domains: [reviews], routes: [{{route: {{cluster: reviews}}}}]}}\n\
             clusters:\n  - {{name: reviews, endpoints: [{{address: \"{PEER_V4}:18081\"}}, {{address: \"{PEER_V4}:18082\"}}]}}\n"
        ),
    )?;
    let haproxy_cfg = lab.dir.join("haproxy.cfg");
    std::fs::write(
        &haproxy_cfg,
        format!(
            "global\n  maxconn 4096\n  uid 1337\n  gid 1337\n  nbthread 1\n\
             defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  option http-keep-alive\n  http-reuse always\n\
             frontend out\n  bind 0.0.0.0:15001\n  default_backend reviews\n\
             backend reviews\n  balance roundrobin\n  server up1 {PEER_V4}:18081\n  server up2 {PEER_V4}:18082\n"
        ),
    )?;

    // 3. Rule scale: for each size, a pod with istio's iptables rules, n excluded CIDRs and n
    // excluded ports, and its own listener on 15001; sockmesh's side is the sockmesh pod,
    // registered again with the same exclusions (pod addresses are unique on a node).
    let mut scaled = Vec::new();
    for (k, &n) in s.rules.iter().enumerate() {
        let mut prof = p.clone();
        (prof.exclude, prof.outbound_exclude_ports) = exclusions(n);
        let i = pods::pod_with(&mut lab, &format!("ri{k}"), &prof, Mode::Iptables, &[])?;
        lean_listener(&mut lab, &i, false)?;
        pods::apply_iptables(&i, &prof)?;
        scaled.push((n, i, prof));
    }
    let mut c_rules: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); scaled.len()];
    // 4. Pod scale: namespaces registered and unregistered by the benchmark itself.
    let agent = lab.agent_pid().context("the agent's pid")?;
    let most = *s.pods.iter().max().unwrap_or(&1);
    let spare: Vec<std::os::fd::OwnedFd> = (0..most).map(|_| new_netns()).collect::<Result<_>>()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut reg: Vec<Vec<f64>> = vec![Vec::new(); s.pods.len()];
    let mut unreg: Vec<Vec<f64>> = vec![Vec::new(); s.pods.len()];
    let mut rss: Vec<Vec<f64>> = vec![Vec::new(); s.pods.len()];
    let mut mem: Vec<Vec<f64>> = vec![Vec::new(); s.pods.len()];
    let (mut cap_before, mut cap_after) = (Vec::new(), Vec::new());

    let (mut c_direct, mut c_ipt, mut c_sm) = (Vec::new(), Vec::new(), Vec::new());
    // Why: the programs' cost per connection (runs per connection, ns per run), the proxies'
    // and the agent's CPU time per request and per registration.
    let _stats = BpfStats::on()?;
    let mut progs: std::collections::BTreeMap<String, (Vec<f64>, Vec<f64>)> = Default::default();
    let mut cpu_reg = Vec::new();
    // Section 5, per client mode: (requests/s, p50, p99) and CPU µs per request, per proxy.
    let mut ours: [Vec<(f64, f64, f64)>; 2] = Default::default();
    let mut theirs: [Vec<(f64, f64, f64)>; 2] = Default::default();
    let mut cpu_ours: [Vec<f64>; 2] = Default::default();
    let mut cpu_theirs: [Vec<f64>; 2] = Default::default();
    let peer80 = format!("{PEER_V4}:80");
    for _ in 0..s.rounds {
        // 1. Connect-time capture cost. The sockmesh pod's listener on 15001 lives only for this.
        c_direct.push(connects(&lab, &direct, false, "127.0.0.1:15001", s.secs)?);
        c_ipt.push(connects(&lab, &ipt, false, &peer80, s.secs)?);
        let li = lean_listener(&mut lab, &sm, true)?;
        let before = prog_stats()?;
        let rate = connects(&lab, &sm, true, &peer80, s.secs)?;
        let after = prog_stats()?;
        c_sm.push(rate);
        let conns = rate * s.secs;
        for (name, (runs, ns)) in after {
            let (r0, n0) = before.get(&name).copied().unwrap_or_default();
            if runs > r0 {
                let e = progs.entry(name).or_default();
                e.0.push((runs - r0) as f64 / conns);
                e.1.push((ns - n0) as f64 / (runs - r0) as f64);
            }
        }

        // 3. Rule scale.
        for ((_, i, prof), (ci, cm)) in scaled.iter().zip(c_rules.iter_mut()) {
            ci.push(connects(&lab, i, false, &peer80, s.secs)?);
            reregister(&lab, &sm, prof)?;
            cm.push(connects(&lab, &sm, true, &peer80, s.secs)?);
        }
        reregister(&lab, &sm, &p)?;

        // 4. Pod scale: register n pods, read the agent's memory, (at the most) measure the
        // sockmesh pod's capture, unregister them.
        cap_before.push(connects(&lab, &sm, true, &peer80, s.secs)?);
        for (k, &n) in s.pods.iter().enumerate() {
            let cpu0 = cpu_secs(agent)?;
            reg[k].push(call_each(&rt, &lab, &spare[..n], PodCall::Register)? / n as f64);
            if n == most {
                cpu_reg.push((cpu_secs(agent)? - cpu0) / n as f64);
            }
            rss[k].push(rss_mib(agent)?);
            mem[k].push(map_memory_mib(agent)?);
            if n == most {
                cap_after.push(connects(&lab, &sm, true, &peer80, s.secs)?);
            }
            unreg[k].push(call_each(&rt, &lab, &spare[..n], PodCall::Unregister)? / n as f64);
        }
        lab.kill(li)?;

        // 2. The hop, path by path: iptables, sockmesh, sockmesh with sk_msg, a Unix socket.
        let ipt_sock = hop_dir.join("hop-ipt.sock");
        let fi = forwarder(&mut lab, &hop_ipt, &ipt_sock)?;
        let fs = forwarder(&mut lab, &sm, &hop_sock)?;
        for (k, (pod, dst, accel)) in [
            (&hop_ipt, &hop_dst, false),
            (&sm, &hop_dst, false),
            (&sm, &hop_dst, true),
            (&sm, &hop_unix, false),
        ]
        .into_iter()
        .enumerate()
        {
            if k == 2 || k == 3 {
                register(&lab, &sm, &p, accel, true)?;
            }
            let (a50, a99) = round_trips(&lab, pod, dst, 64, s.secs)?;
            let (b50, b99) = round_trips(&lab, pod, dst, 4096, s.secs)?;
            let mb = bulk(&lab, pod, dst, s.bulk)?;
            hops[k].push((a50, a99, b50, b99, mb));
        }
        lab.kill(fi)?;
        lab.kill(fs)?;

        // 5. The proxy against HAProxy, one after the other, on the same pod and upstreams.
        let mut cmd = lab.command(
            &sm.ns,
            true,
            sibling_bin("sockmesh-proxy", "SOCKMESH_PROXY_BIN")?,
        )?;
        cmd.arg("--config")
            .arg(&proxy_yaml)
            .env("SOCKMESH_PROXY_LOG", "warn");
        proxy_round(
            &mut lab,
            &sm,
            &s,
            cmd,
            Some("ready"),
            &mut ours,
            &mut cpu_ours,
        )?;
        let mut cmd = lab.command(&sm.ns, true, "haproxy")?;
        cmd.arg("-db").arg("-f").arg(&haproxy_cfg);
        proxy_round(&mut lab, &sm, &s, cmd, None, &mut theirs, &mut cpu_theirs)?;
    }

    let (d, i, m) = (stats(&c_direct), stats(&c_ipt), stats(&c_sm));
    let col = |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| {
        stats(&v.iter().map(f).collect::<Vec<_>>())
    };
    // Per client mode: ((requests/s, p50, p99) of sockmesh-proxy, the same of HAProxy).
    type Http = ((f64, f64, f64), (f64, f64, f64), (f64, f64, f64));
    let three =
        |v: &[(f64, f64, f64)]| -> Http { (col(v, |x| x.0), col(v, |x| x.1), col(v, |x| x.2)) };
    let proxies: Vec<(Http, Http)> = (0..2)
        .map(|k| (three(&ours[k]), three(&theirs[k])))
        .collect();
    let mut r = String::new();
    r.push_str("# Benchmarks\n\n");
    r.push_str(&format!(
        "Written by `cargo xtask bench`{}. Machine: {}. Each figure is the median of {} \
         interleaved rounds of {} s, with the spread (min–max) in brackets; ratios are of \
         medians measured in the same run.\n\n",
        if smoke {
            " --smoke (tiny sizes: not figures to quote)"
        } else {
            ""
        },
        machine(),
        s.rounds,
        s.secs
    ));
    r.push_str("## 1. Capture cost at connect time\n\n");
    r.push_str(
        "Short TCP connections (connect, read the listener's one line, close) per second, from \
         an app (uid 1000) to the outbound port: directly to 127.0.0.1:15001 with no capture, \
         and to a remote address redirected to 15001 by istio's rules (real iptables) or by \
         sockmesh. The listener is the same on every path and does per connection what a \
         transparent proxy does before routing: accept, read SO_ORIGINAL_DST once, then it \
         answers one line and closes.\n\n",
    );
    r.push_str("| path | connections/s | ratio to direct |\n|---|---|---|\n");
    for (name, v) in [
        ("direct (no capture)", d),
        ("iptables REDIRECT (istio rules)", i),
        ("sockmesh", m),
    ] {
        r.push_str(&format!("| {name} | {} | {:.2} |\n", fmt(v), v.0 / d.0));
    }
    r.push_str(&format!("\nsockmesh / iptables: {:.2}\n\n", m.0 / i.0));
    r.push_str(
        "Where a sockmesh connection's time goes in the kernel's programs (the kernel's BPF \
         run-time statistics, on during this run):\n\n\
         | program | runs per connection | ns per run |\n|---|---|---|\n",
    );
    let mut per_conn_ns = 0.0;
    for (name, (runs, ns)) in &progs {
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
    r.push_str("## 2. The app-to-proxy hop\n\n");
    r.push_str(&format!(
        "From the app (uid 1000) through a minimal forwarder on the outbound port (one \
         thread, an event loop as proxies are, as uid 1337) to an upstream on the peer host: round trips of 64 B and \
         4 KiB on one connection for {} s (latency per round trip), and {} MiB in 64 KiB \
         writes to a sink that answers with the count (throughput to the answer). Paths: \
         istio's iptables rules; sockmesh (its own pod settings: no sk_msg); sockmesh with \
         sk_msg acceleration for the pod; and the app reaching the same forwarder over a \
         Unix socket.\n\n\
         | path | 64 B p50 µs | 64 B p99 µs | 4 KiB p50 µs | 4 KiB p99 µs | bulk MB/s |\n\
         |---|---|---|---|---|---|\n",
        s.secs,
        s.bulk >> 20
    ));
    let hop: Vec<[Spread; 5]> = hops
        .iter()
        .map(|v| {
            [
                stats(&v.iter().map(|x| x.0).collect::<Vec<_>>()),
                stats(&v.iter().map(|x| x.1).collect::<Vec<_>>()),
                stats(&v.iter().map(|x| x.2).collect::<Vec<_>>()),
                stats(&v.iter().map(|x| x.3).collect::<Vec<_>>()),
                stats(&v.iter().map(|x| x.4).collect::<Vec<_>>()),
            ]
        })
        .collect();
    let one = |(mid, lo, hi): Spread| format!("{mid:.1} [{lo:.1}–{hi:.1}]");
    for (name, h) in [
        "iptables REDIRECT (istio rules)",
        "sockmesh",
        "sockmesh + sk_msg",
        "Unix socket",
    ]
    .iter()
    .zip(&hop)
    {
        r.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            one(h[0]),
            one(h[1]),
            one(h[2]),
            one(h[3]),
            fmt(h[4])
        ));
    }
    let (ipt_h, sm_h, msg_h, unix_h) = (&hop[0], &hop[1], &hop[2], &hop[3]);
    r.push_str(&format!(
        "\n64 B p50 against iptables: sockmesh {:.2}, sockmesh + sk_msg {:.2}, Unix socket \
         {:.2}; sockmesh + sk_msg against the Unix socket {:.2}. Bulk against iptables: \
         sockmesh {:.2}, sockmesh + sk_msg {:.2}, Unix socket {:.2}.\n\n",
        sm_h[0].0 / ipt_h[0].0,
        msg_h[0].0 / ipt_h[0].0,
        unix_h[0].0 / ipt_h[0].0,
        msg_h[0].0 / unix_h[0].0,
        sm_h[4].0 / ipt_h[4].0,
        msg_h[4].0 / ipt_h[4].0,
        unix_h[4].0 / ipt_h[4].0,
    ));
    r.push_str("## 3. Rule scale\n\n");
    r.push_str(
        "The same short connections from pods whose capture excludes n CIDRs (`-x`, /24s) and \
         n ports (`-o`), none of them the destination, so every exclusion is checked. \
         iptables holds one rule per exclusion; sockmesh an LPM trie entry per CIDR and a \
         hash entry per port.\n\n\
         | exclusions (each kind) | iptables conn/s | iptables vs 1 | sockmesh conn/s | sockmesh vs 1 |\n\
         |---|---|---|---|---|\n",
    );
    let rules: Vec<(Spread, Spread)> = c_rules
        .iter()
        .map(|(ci, cm)| (stats(ci), stats(cm)))
        .collect();
    for ((n, _, _), (ri, rm)) in scaled.iter().zip(&rules) {
        r.push_str(&format!(
            "| {n} | {} | {:.2} | {} | {:.2} |\n",
            fmt(*ri),
            ri.0 / rules[0].0 .0,
            fmt(*rm),
            rm.0 / rules[0].1 .0
        ));
    }
    r.push_str("\n## 4. Pod scale\n\n");
    r.push_str(&format!(
        "n network namespaces registered with the agent one after the other over its API (a \
         connection each, istio's default settings), then unregistered the same way; \
         the agent's resident memory and its BPF maps' kernel memory (memlock) with n \
         registered. Then the capture cost of a registered pod with {most} others registered, \
         against the same pod alone, in the same round.\n\n\
         | pods | ms per registration | ms per unregistration | agent RSS MiB | BPF map memory MiB |\n|---|---|---|---|---|\n"
    ));
    let ms = |v: &[f64]| stats(&v.iter().map(|x| x * 1000.0).collect::<Vec<_>>());
    let two = |(mid, lo, hi): (f64, f64, f64)| format!("{mid:.2} [{lo:.2}–{hi:.2}]");
    for (k, n) in s.pods.iter().enumerate() {
        r.push_str(&format!(
            "| {n} | {} | {} | {} | {} |\n",
            two(ms(&reg[k])),
            two(ms(&unreg[k])),
            two(stats(&rss[k])),
            two(stats(&mem[k]))
        ));
    }
    let (before, after) = (stats(&cap_before), stats(&cap_after));
    r.push_str(&format!(
        "\nCapture of one pod, connections/s: alone {}, with {most} others registered {} \
         (ratio {:.2}).\n\n",
        fmt(before),
        fmt(after),
        after.0 / before.0
    ));
    let reg_cpu = stats(&cpu_reg).0 * 1000.0;
    let reg_wall = stats(&reg[s.pods.len() - 1]).0 * 1000.0;
    r.push_str(&format!(
        "The agent's CPU time per registration (of {most}): {reg_cpu:.2} ms, of {reg_wall:.2} ms \
         from the caller's connect to its answer.\n\n"
    ));
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
        s.conns
    ));
    r.push_str(
        "| clients | proxy | requests/s | p50 µs | p99 µs | CPU µs per request |\n\
         |---|---|---|---|---|---|\n",
    );
    for (k, (mode, _)) in HTTP_MODES.into_iter().enumerate() {
        let (o, h) = proxies[k];
        for (name, (rps, p50, p99), cpu) in [
            ("HAProxy", h, &cpu_theirs[k]),
            ("sockmesh-proxy", o, &cpu_ours[k]),
        ] {
            r.push_str(&format!(
                "| {mode} | {name} | {} | {} | {} | {:.1} |\n",
                fmt(rps),
                fmt(p50),
                fmt(p99),
                stats(cpu).0
            ));
        }
    }
    r.push('\n');
    for (k, (mode, _)) in HTTP_MODES.into_iter().enumerate() {
        let (o, h) = proxies[k];
        r.push_str(&format!(
            "sockmesh-proxy / HAProxy, {mode}: requests/s {:.2}, p50 {:.2}, p99 {:.2} (below 1 \
             is better for latency), CPU per request {:.2}.\n\n",
            o.0 .0 / h.0 .0,
            o.1 .0 / h.1 .0,
            o.2 .0 / h.2 .0,
            stats(&cpu_ours[k]).0 / stats(&cpu_theirs[k]).0,
        ));
    }
    r.push_str(
        "The load generator and the upstreams share the same 2 cores, so the proxy that spends \
         less per request serves more.\n\n",
    );
    r.push_str("## Targets (issue #6)\n\n| target | measured | verdict |\n|---|---|---|\n");
    let verdict = |met: bool, by: String| {
        if met {
            "met".to_string()
        } else {
            format!("missed by {by}")
        }
    };
    // A ratio's miss, with a third decimal when two would round it to nothing.
    let miss = |x: f64| {
        if x < 0.005 {
            format!("{x:.3}")
        } else {
            format!("{x:.2}")
        }
    };
    let connect = m.0 / d.0;
    r.push_str(&format!(
        "| connect-time capture within 5% of direct (>= 0.95) | {connect:.2} | {} |\n",
        verdict(connect >= 0.95, miss(0.95 - connect))
    ));
    let p50 = msg_h[0].0 / ipt_h[0].0;
    r.push_str(&format!(
        "| hop round-trip p50 at most 0.8x iptables' (sockmesh + sk_msg, 64 B) | {p50:.2} | {} |\n",
        verdict(p50 <= 0.8, miss(p50 - 0.8))
    ));
    let vs_unix = msg_h[0].0 / unix_h[0].0;
    r.push_str(&format!(
        "| hop round-trip p50 within 1.25x of the Unix socket's | {vs_unix:.2} | {} |\n",
        verdict(vs_unix <= 1.25, miss(vs_unix - 1.25))
    ));
    let thr = msg_h[4].0 / ipt_h[4].0;
    r.push_str(&format!(
        "| hop bulk throughput at least 1.5x iptables' (sockmesh + sk_msg) | {thr:.2} | {} |\n",
        verdict(thr >= 1.5, miss(1.5 - thr))
    ));
    let last = rules.len() - 1;
    let scale = rules[last].1 .0 / rules[0].1 .0;
    r.push_str(&format!(
        "| per-connect cost with {} exclusions within 5% of 1 (>= 0.95) | {scale:.2} | {} |\n",
        s.rules[last],
        verdict(scale >= 0.95, miss(0.95 - scale))
    ));
    let k = s.pods.len() - 1;
    let total = stats(&reg[k]).0 * most as f64;
    r.push_str(&format!(
        "| registering {most} pods in under 2 s | {total:.2} s | {} |\n",
        verdict(total < 2.0, format!("{:.2} s", total - 2.0))
    ));
    let peak = stats(&rss[k]).0;
    r.push_str(&format!(
        "| agent under 30 MiB RSS with {most} pods | {peak:.1} MiB | {} |\n",
        verdict(peak < 30.0, format!("{:.1} MiB", peak - 30.0))
    ));
    for (k, (mode, _)) in HTTP_MODES.into_iter().enumerate() {
        let (o, h) = proxies[k];
        let rps = o.0 .0 / h.0 .0;
        r.push_str(&format!(
            "| proxy requests/s at least HAProxy's ({mode}, >= 1.00) | {rps:.2} | {} |\n",
            verdict(rps >= 1.0, miss(1.0 - rps))
        ));
        let p99 = o.2 .0 / h.2 .0;
        r.push_str(&format!(
            "| proxy p99 lower than HAProxy's ({mode}, < 1.00) | {p99:.2} | {} |\n",
            verdict(p99 < 1.0, miss(p99 - 1.0))
        ));
    }
    r.push('\n');
    r.push_str(
        "Why, from the figures above: capture at connect costs sockmesh its programs' time \
         per connection (section 1's program table) plus what any redirected connection pays \
         (iptables' path is as far from direct); a round trip through the hop has four legs \
         (app to forwarder, forwarder to upstream and back over the veth, forwarder to app) \
         and sk_msg shortcuts only the first (an app's socket never receives redirected data, \
         so the answer reaches it by TCP; the veth legs are not local; the Unix socket \
         skips TCP/IP on both legs between app and forwarder), while the forwarder's and the \
         upstream's wakeups take most of the time, so it changes latency little; in bulk the app outruns the forwarder (whose upstream is \
         slower than a local write), so sk_msg fills the forwarder's 1 MiB window, the rest \
         goes by TCP with TCP's back pressure, and bulk gains little (before sk_msg kept back \
         pressure, this hop measured 1.64x to 2.75x iptables by letting the app's writes pile \
         up unbounded in kernel memory); a registration's wall time against \
         the agent's CPU time in it (section 4) says how much is the agent's work and how \
         much the API round trip; the proxies' CPU time per request (section 5) is why one \
         serves more than the other on 2 shared cores.\n\n",
    );
    r.push_str(
        "Both proxies keep upstream connections alive (sockmesh-proxy pools HTTP/1.1 per \
         endpoint; HAProxy with `http-reuse always`). Both run as uid 1337, in the pod.\n\n\
         sk_msg acceleration is off by default: on this kernel it still differs from TCP where a \
         user can see it (splice readers of redirected data get none of it; on a socket in the \
         map, FIONREAD counts only redirected data and blocking reads can fail early with \
         EAGAIN; tests/tests/accel.rs pins these down). \
         The hop's pod has it for all its sockets (`SOCKMESH_ACCELERATION=all`), the app's \
         included. The hop's forwarder reads as \
         an event loop does, so the hop measures what it gives where it is safe.\n",
    );
    Ok(r)
}

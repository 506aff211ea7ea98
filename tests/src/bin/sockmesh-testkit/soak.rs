//! The soak (`cargo xtask soak`): a captured pod under churn for a while (outbound to a peer,
//! inbound from it, DNS over UDP; connections ended by the client, by the server, by RST and by
//! half-close), with a transparent proxy as its sidecar. The live entries of the maps and the
//! agent's memory and open files are sampled as it runs, and must be back at their baseline
//! once the churn stops.

use std::{
    fmt::Write,
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sockmesh_tests::{
    kit::{Churn, ChurnReport, Identity, Proxy},
    lab::Lab,
    pods::{self, Mode, PEER_V4, POD_V4},
    profiles::{Dns, Profile},
};

/// What is sampled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Sample {
    pub pods: usize,
    pub orig_dst: usize,
    pub accel_socks: usize,
    pub rss_kib: u64,
    pub fds: usize,
}

/// How much the agent's resident memory may grow over the run and still count as back at its
/// baseline: the allocator keeps some pages it once used.
const RSS_SLACK_KIB: u64 = 4096;

pub(crate) fn sample(lab: &Lab) -> Result<Sample> {
    let d = lab.dump()?;
    let len = |k: &str| d[k].as_array().map_or(0, Vec::len);
    let pid = lab.agent_pid().context("the agent is not running")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok(Sample {
        pods: len("pods"),
        orig_dst: len("original_destinations"),
        accel_socks: len("accelerated_sockets"),
        rss_kib,
        fds,
    })
}

/// Run the soak for `secs`; the report (Markdown), or an error naming what did not come back.
pub fn run(secs: f64, min_connections: u64) -> Result<String> {
    let mut lab = Lab::with_agent("soak")?;
    let profile = Profile {
        name: "soak",
        dns: Some(Dns {
            capture_all: true,
            servers: vec![],
        }),
        ..Profile::default_sidecar()
    };
    let pod = pods::captured(&mut lab, "s", &profile, Mode::Sockmesh, &[8080])?;
    lab.start(
        pod.place().as_user(1337).as_group(1337),
        &Proxy::new("side"),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let baseline = sample(&lab)?;

    let peer = |port: u16| -> SocketAddr { format!("{PEER_V4}:{port}").parse().unwrap() };
    let churns = [
        (
            "outbound",
            Churn {
                dst: peer(80),
                secs,
                udp: false,
                id: Identity::APP,
            },
            true,
        ),
        (
            "outbound",
            Churn {
                dst: peer(9090),
                secs,
                udp: false,
                id: Identity::APP,
            },
            true,
        ),
        (
            "inbound",
            Churn {
                dst: format!("{POD_V4}:8080").parse()?,
                secs,
                udp: false,
                id: Identity::default(),
            },
            false,
        ),
        (
            "dns",
            Churn {
                dst: peer(53),
                secs,
                udp: true,
                id: Identity::APP,
            },
            true,
        ),
    ];
    let mut children = Vec::new();
    for (what, c, in_pod) in &churns {
        let place = if *in_pod {
            pod.place()
        } else {
            pod.peer_place()
        };
        let child = lab
            .testkit(place, c)?
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {what} churn"))?;
        children.push((*what, child));
    }
    let started = Instant::now();
    let mut samples = vec![(0.0, baseline)];
    while started.elapsed().as_secs_f64() < secs {
        std::thread::sleep(Duration::from_secs_f64((secs / 6.0).clamp(1.0, 60.0)));
        samples.push((started.elapsed().as_secs_f64(), sample(&lab)?));
    }
    let mut reports = Vec::new();
    for (what, child) in children {
        let out = child.wait_with_output()?;
        let r: ChurnReport = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("{what}: {}", String::from_utf8_lossy(&out.stdout)))?;
        reports.push((what, r));
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The churn has stopped: everything it left must go within 30 s.
    let settled = Instant::now();
    let mut last = sample(&lab)?;
    while !back(&baseline, &last) && settled.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
        last = sample(&lab)?;
    }
    samples.push((started.elapsed().as_secs_f64(), last));

    let total: u64 = reports.iter().map(|(_, r)| r.done).sum();
    let connections: u64 = reports
        .iter()
        .filter(|(w, _)| *w != "dns")
        .map(|(_, r)| r.done)
        .sum();
    let failed: u64 = reports.iter().map(|(_, r)| r.failed).sum();
    let mut out = String::new();
    writeln!(out, "## Soak\n")?;
    writeln!(
        out,
        "{connections} TCP connections and {} DNS queries in {elapsed:.0} s ({:.0}/s in all), \
         {failed} failed.\n",
        total - connections,
        total as f64 / elapsed
    )?;
    writeln!(out, "| churn | done | failed |\n|---|---:|---:|")?;
    for (what, r) in &reports {
        writeln!(out, "| {what} | {} | {} |", r.done, r.failed)?;
    }
    writeln!(
        out,
        "\n| at (s) | pods | original destinations | accelerated sockets | agent RSS (KiB) | agent fds |\n|---:|---:|---:|---:|---:|---:|"
    )?;
    for (at, s) in &samples {
        writeln!(
            out,
            "| {at:.0} | {} | {} | {} | {} | {} |",
            s.pods, s.orig_dst, s.accel_socks, s.rss_kib, s.fds
        )?;
    }
    let mut problems = Vec::new();
    for (what, r) in &reports {
        if r.failed > 0 {
            problems.push(format!("{what}: {} failed, e.g. {:?}", r.failed, r.samples));
        }
    }
    if !back(&baseline, &last) {
        problems.push(format!(
            "not back at the baseline 30 s after the churn: {last:?}, baseline {baseline:?} \
             (RSS may exceed it by {RSS_SLACK_KIB} KiB)"
        ));
    }
    if connections < min_connections {
        problems.push(format!(
            "{connections} TCP connections, fewer than the {min_connections} asked for"
        ));
    }
    if problems.is_empty() {
        writeln!(out, "\nBack at the baseline after the churn: yes.")?;
        Ok(out)
    } else {
        bail!("{out}\n{}", problems.join("\n"))
    }
}

/// Whether `now` is back at `base`: the same live entries and open files, memory within the
/// slack.
fn back(base: &Sample, now: &Sample) -> bool {
    now.pods == base.pods
        && now.orig_dst == base.orig_dst
        && now.accel_socks == base.accel_socks
        && now.fds == base.fds
        && now.rss_kib <= base.rss_kib + RSS_SLACK_KIB
}

//! Scale (`cargo xtask scale`): many captured connections open at once on one node. Pods of the
//! default sidecar profile each run a crowd: a proxy on 15001 that reads every connection's
//! original destination as it accepts, and an app that opens its share of the connections, each
//! to its own destination port, and holds them. While all are open, the agent's map holds a
//! record for each, and a pod registered then is captured at once. Once they close, the map and
//! the agent are back at their baseline.

use std::{
    fmt::Write,
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use sockmesh_tests::{
    kit::{crowd::HELD, Crowd, CrowdReport, Hold, HoldReport, Identity},
    lab::Lab,
    pods::{self, Mode, Pod},
    profiles::Profile,
};

use crate::soak::{sample, Sample};

/// Destination ports of the crowds: clear of the capture and proxy ports (15000-15090).
const FIRST_PORT: u16 = 20000;

/// Pod i's address and its peer's: each pod has its own, as on a node.
fn pod_ip(i: usize) -> String {
    format!("10.{}.{}.2", 100 + i / 256, i % 256)
}

fn peer_ip(i: usize) -> String {
    format!("10.{}.{}.1", 100 + i / 256, i % 256)
}

/// Pod i: its own namespace and address, a peer host behind a veth, captured by sockmesh.
fn pod(lab: &mut Lab, i: usize, profile: &Profile) -> Result<Pod> {
    let ns = lab.netns(&format!("c{i}p"))?;
    let peer = lab.netns(&format!("c{i}q"))?;
    lab.veth(&ns, "eth0", &peer, "eth0")?;
    ns.ip(&["addr", "add", &format!("{}/24", pod_ip(i)), "dev", "eth0"])?;
    ns.ip(&["route", "add", "default", "via", &peer_ip(i)])?;
    peer.ip(&["addr", "add", &format!("{}/24", peer_ip(i)), "dev", "eth0"])?;
    let pod = Pod {
        ns,
        peer,
        peer2: None,
        in_cgroup: true,
    };
    pods::capture(lab, &pod, profile, Mode::Sockmesh)?;
    Ok(pod)
}

/// Run `pods` pods of `per_pod` connections each; the report (Markdown), or an error naming
/// what went wrong.
pub fn run(pods: usize, per_pod: usize) -> Result<String> {
    if usize::from(FIRST_PORT) + per_pod > 65536 {
        bail!(
            "--per-pod {per_pod}: at most {} per pod",
            65536 - usize::from(FIRST_PORT)
        );
    }
    let mut lab = Lab::with_agent("scale")?;
    let profile = Profile::default_sidecar();
    let baseline = sample(&lab)?;
    let release = lab.dir.join("release");
    let mut crowds = Vec::new();
    let started = Instant::now();
    for i in 0..pods {
        let pod = pod(&mut lab, i, &profile)?;
        let report = lab.dir.join(format!("crowd-{i}.json"));
        let crowd = Crowd {
            dst: peer_ip(i).parse()?,
            first_port: FIRST_PORT,
            count: per_pod,
            listen: 15001,
            report: report.clone(),
            release: release.clone(),
            id: Identity::APP,
        };
        let cmd = lab.testkit(pod.place(), &crowd)?;
        let child = lab
            .spawn(cmd, Some(HELD))
            .with_context(|| format!("crowd {i}"))?;
        let r: CrowdReport = serde_json::from_slice(&std::fs::read(&report)?)?;
        crowds.push((child, r, pod));
    }
    let open_secs = started.elapsed().as_secs_f64();
    let held: usize = crowds.iter().map(|(_, r, _)| r.opened).sum();
    let peak = sample(&lab)?;

    // A pod registered while they are all open is captured at once.
    let late = pod(&mut lab, pods, &profile)?;
    pods::listen(&mut lab, &late.ns, true, "pod", &[15001])?;
    let peer80: SocketAddr = format!("{}:80", peer_ip(pods)).parse()?;
    let hold = Hold {
        dst: peer80,
        count: 1,
        listen: None,
        keep: false,
        id: Identity::APP,
    };
    let late_report: HoldReport = serde_json::from_str(lab.output(late.place(), &hold)?.trim())?;
    let late_ok = late_report.orig.get(&peer80.to_string()) == Some(&1);

    std::fs::write(&release, b"")?;
    for (child, _, _) in &crowds {
        let status = lab.wait_exit(*child, Duration::from_secs(60))?;
        if !status.success() {
            bail!("a crowd exited {status}");
        }
    }
    let settled = Instant::now();
    let mut last = sample(&lab)?;
    while last.orig_dst > baseline.orig_dst && settled.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(500));
        last = sample(&lab)?;
    }
    let after_secs = settled.elapsed().as_secs_f64();

    let sum = |f: fn(&CrowdReport) -> usize| crowds.iter().map(|(_, r, _)| f(r)).sum::<usize>();
    let (failed, accepted, right, wrong) = (
        sum(|r| r.failed),
        sum(|r| r.accepted),
        sum(|r| r.right),
        sum(|r| r.wrong),
    );
    let mut out = String::new();
    writeln!(out, "## Scale\n")?;
    writeln!(
        out,
        "{held} captured connections open at once in {pods} pods ({per_pod} each), opened in \
         {open_secs:.0} s; {failed} failed to open, {accepted} accepted by the pods' proxies, \
         {right} with their own original destination, {wrong} with another or none.\n"
    )?;
    writeln!(
        out,
        "| when | registered pods | original destinations | agent RSS (KiB) | agent fds |\n|---|---:|---:|---:|---:|"
    )?;
    let row = |out: &mut String, when: &str, s: &Sample| {
        writeln!(
            out,
            "| {when} | {} | {} | {} | {} |",
            s.pods, s.orig_dst, s.rss_kib, s.fds
        )
    };
    row(&mut out, "before", &baseline)?;
    row(&mut out, "all open", &peak)?;
    row(
        &mut out,
        &format!("{after_secs:.0} s after they closed"),
        &last,
    )?;
    writeln!(
        out,
        "\nA pod registered while they were open: {}.",
        if late_ok {
            "captured at once (its connection reached its proxy with its original destination)"
        } else {
            "NOT captured as expected"
        }
    )?;
    let mut problems = Vec::new();
    if failed > 0 || accepted != held || right != held || wrong > 0 {
        let examples: Vec<&String> = crowds.iter().flat_map(|(_, r, _)| &r.examples).collect();
        problems.push(format!(
            "{failed} failed, {accepted} of {held} accepted, {right} right, {wrong} wrong: {examples:?}"
        ));
    }
    if peak.orig_dst < held {
        problems.push(format!(
            "the map held {} original destinations for {held} open connections",
            peak.orig_dst
        ));
    }
    if !late_ok {
        problems.push(format!("the late pod: {late_report:?}"));
    }
    if last.orig_dst > baseline.orig_dst {
        problems.push(format!(
            "{} original destinations left 30 s after every connection closed",
            last.orig_dst
        ));
    }
    if problems.is_empty() {
        writeln!(
            out,
            "\nEvery connection right, and the map back at its baseline: yes."
        )?;
        Ok(out)
    } else {
        bail!("{out}\n{}", problems.join("\n"))
    }
}

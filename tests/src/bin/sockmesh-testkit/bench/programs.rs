//! Where the capture programs' time goes, section by section (run by `cargo xtask profile`):
//! the capture section's connections (section 1 of the benchmark) from an app in a sockmesh
//! pod, captured and left alone, in a lab whose agent runs with `--section-timing`. The
//! programs then add each section's nanoseconds and runs to `SM_TIMING`, read here before and
//! after each path's connections (`bpftool`).

use std::{collections::BTreeMap, net::SocketAddr, process::Command};

use anyhow::{anyhow, bail, Context, Result};
use sockmesh_common::{
    names,
    timing::{Section, SECTIONS},
};
use sockmesh_tests::{
    lab::{require_tools, run as run_cmd, Lab},
    profiles::Profile,
};

use super::{capture::sockmesh_pod, connects_in, peer80};

/// Each section's nanoseconds and runs, summed over the CPUs.
type Totals = BTreeMap<u32, (u64, u64)>;

/// The report's section: both paths' tables.
pub fn run(smoke: bool) -> Result<String> {
    require_tools(&["ip", "bpftool"])?;
    let secs = if smoke { 0.3 } else { 10.0 };
    let mut lab = Lab::new("programs")?;
    lab.agent_args.push("--section-timing".into());
    lab.start_agent()?;
    let sm = sockmesh_pod(&mut lab, &Profile::default_sidecar())?;
    let local: SocketAddr = "127.0.0.1:15001".parse()?;
    let mut r = String::from(
        "## Where the capture programs' time goes\n\n\
         The benchmark's section 1 (capture at connect time) again: short connections from the \
         app (uid 1000) in a sockmesh pod, captured (to the peer host's port 80, redirected to \
         15001) and left alone (to its 127.0.0.1:15001), to the same listener, which reads \
         SO_ORIGINAL_DST once per connection. Its agent runs with `--section-timing`: the \
         programs read the clock around each section below and add its time and runs to a \
         per-CPU map (`SM_TIMING`). A section's time includes about one timer's (the first \
         row: two clock reads back to back), which the last column takes off; a whole \
         program's row includes the timing of its parts. The rows show where a connection's \
         program time goes, not its untimed total: section 1 of docs/benchmarks.md has that.\n\n",
    );
    for (path, dst) in [("captured", peer80()), ("left alone", local)] {
        let before = read(&lab)?;
        let conns = connects_in(&lab, &sm, true, dst, secs)? * secs;
        let after = read(&lab)?;
        if conns < 1.0 {
            bail!("no connections were made on the {path} path");
        }
        report(&mut r, path, &before, &after, conns);
    }
    Ok(r)
}

/// `SM_TIMING` of `lab`'s agent, per section.
fn read(lab: &Lab) -> Result<Totals> {
    let pin = lab.bpffs.join("maps").join(names::TIMING);
    let out = run_cmd(
        Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&pin)
            .arg("-j"),
    )?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("bpftool's JSON for SM_TIMING")?;
    let entries = v
        .as_array()
        .ok_or_else(|| anyhow!("SM_TIMING: not a list"))?;
    let mut sums = vec![0u64; 2 * SECTIONS as usize];
    for e in entries {
        let key = number(&e["key"]).ok_or_else(|| anyhow!("SM_TIMING: a key is not a number"))?;
        let values = e["values"]
            .as_array()
            .ok_or_else(|| anyhow!("SM_TIMING: no per-CPU values"))?;
        for c in values {
            let n =
                number(&c["value"]).ok_or_else(|| anyhow!("SM_TIMING: a value is not a number"))?;
            if let Some(s) = sums.get_mut(key as usize) {
                *s += n;
            }
        }
    }
    let n = SECTIONS as usize;
    Ok((0..n).map(|i| (i as u32, (sums[i], sums[i + n]))).collect())
}

/// A number as bpftool writes it: a plain number (with the map's BTF) or its bytes in hex,
/// little-endian (without).
fn number(v: &serde_json::Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let bytes = v.as_array()?;
    let mut n = 0u64;
    for (i, b) in bytes.iter().enumerate().take(8) {
        let b = u64::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok()?;
        n |= b << (8 * i);
    }
    Some(n)
}

/// One path's table: each section run between `before` and `after`, over `conns` connections.
fn report(r: &mut String, path: &str, before: &Totals, after: &Totals, conns: f64) {
    let delta = |s: Section| {
        let (ns0, runs0) = before.get(&(s as u32)).copied().unwrap_or_default();
        let (ns1, runs1) = after.get(&(s as u32)).copied().unwrap_or_default();
        (ns1.saturating_sub(ns0), runs1.saturating_sub(runs0))
    };
    let (timer_ns, timer_runs) = delta(Section::Timer);
    let timer = if timer_runs > 0 {
        timer_ns as f64 / timer_runs as f64
    } else {
        0.0
    };
    r.push_str(&format!(
        "### {path} ({conns:.0} connections)\n\n\
         | section | runs per connection | ns per run | ns per connection, less the timer's |\n\
         |---|---|---|---|\n"
    ));
    for s in Section::ALL {
        let (ns, runs) = delta(s);
        if runs == 0 {
            continue;
        }
        let per_run = ns as f64 / runs as f64;
        let per_conn = runs as f64 / conns;
        let net = if s == Section::Timer || s.is_whole() {
            "".to_string()
        } else {
            format!("{:.0}", per_conn * (per_run - timer).max(0.0))
        };
        r.push_str(&format!(
            "| {} | {per_conn:.2} | {per_run:.0} | {net} |\n",
            s.name()
        ));
    }
    r.push('\n');
}

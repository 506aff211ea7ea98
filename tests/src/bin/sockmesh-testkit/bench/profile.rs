//! Where a proxy's CPU goes, per request (run by `cargo xtask profile`): sockmesh-proxy and
//! HAProxy in section 5's role (the same pod, capture, upstreams and clients), each under
//! valgrind's callgrind, which counts the instructions a process runs in user space the same
//! way on every run (these machines' timings are noisy). Counting starts once the proxy
//! answers and covers one client mode at a time; instructions per request are the count over
//! the requests the clients made. For sockmesh-proxy the instructions are also shared out by
//! where they ran (the functions' crates and modules, from callgrind's symbols).
//!
//! Kernel time (system calls, TCP) is not counted here: section 5 of the benchmark measures
//! both proxies' whole CPU time.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use sockmesh_tests::{
    kit::{HttpGet, Identity},
    lab::{require_tools, run as run_cmd, sibling_bin},
};

use super::{
    proxies::{http, Proxies, HTTP_MODES, VIP},
    Bench,
};

/// One proxy's counts, per client mode: (requests, instructions, the dump's file).
struct Counted {
    name: &'static str,
    modes: Vec<(f64, f64, PathBuf)>,
}

/// Run the profile; the Markdown report.
pub fn run(smoke: bool) -> Result<String> {
    require_tools(&[
        "ip",
        "haproxy",
        "valgrind",
        "callgrind_control",
        "callgrind_annotate",
    ])?;
    let mut b = Bench::new(smoke)?;
    // Under valgrind a proxy runs some 50 times slower: longer rounds give enough requests.
    b.sizes.secs = if smoke { 1.0 } else { 5.0 };
    let proxies = Proxies::new(&mut b)?;
    let dir = b.lab.dir.join("callgrind");
    std::fs::create_dir_all(&dir)?;
    let ours = {
        let bin = sibling_bin("sockmesh-proxy", "SOCKMESH_PROXY_BIN")?;
        let mut cmd = valgrind(&b, &dir, "sockmesh-proxy")?;
        cmd.arg(bin)
            .arg("--config")
            .arg(&proxies.proxy_yaml)
            .env("SOCKMESH_PROXY_LOG", "warn");
        count(&mut b, cmd, "sockmesh-proxy", &dir)?
    };
    let theirs = {
        let mut cmd = valgrind(&b, &dir, "haproxy")?;
        cmd.arg("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&proxies.haproxy_cfg);
        count(&mut b, cmd, "HAProxy", &dir)?
    };
    report(&b, &ours, &theirs)
}

/// valgrind's callgrind in the sockmesh pod, writing its dumps under `dir` as `name`.
fn valgrind(b: &Bench, dir: &Path, name: &str) -> Result<Command> {
    let mut cmd = b.lab.command_at(b.sm.place(), "valgrind")?;
    cmd.arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}/{name}.out", dir.display()))
        .arg("--quiet");
    Ok(cmd)
}

/// Start the proxy under callgrind, then per client mode: zero its counts, make the requests,
/// dump the counts. Stops it.
fn count(b: &mut Bench, cmd: Command, name: &'static str, dir: &Path) -> Result<Counted> {
    let i = b.lab.spawn(cmd, None)?;
    let result = (|| {
        wait_slowly(b)?;
        let pid = b.lab.pid(i).context("the proxy's pid")?.to_string();
        let mut modes = Vec::new();
        for (_, new_conn) in HTTP_MODES {
            run_cmd(Command::new("callgrind_control").args(["-z", &pid]))?;
            let (rps, _, _) = http(b, new_conn)?;
            let before = dumps(dir, name)?;
            run_cmd(Command::new("callgrind_control").args(["-d", &pid]))?;
            let file = newest_dump(dir, name, &before)?;
            let ir = instructions(&file)?;
            modes.push((rps * b.sizes.secs, ir, file));
        }
        Ok(Counted { name, modes })
    })();
    b.lab.kill(i)?;
    result
}

/// Wait (up to a minute: valgrind starts slowly) until a request through the pod's 15001 is
/// answered.
fn wait_slowly(b: &Bench) -> Result<()> {
    let get = HttpGet::new(VIP.parse()?, "/", "reviews", Identity::APP);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = b.lab.output(b.sm.place(), &get);
        if out
            .as_ref()
            .is_ok_and(|o| o.trim().starts_with("HTTP/1.1 200"))
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("the proxy under valgrind did not answer within 60 s: {out:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The dump files of `name` so far.
fn dumps(dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let prefix = format!("{name}.out");
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// The dump `callgrind_control -d` just wrote (it returns once the file is written).
fn newest_dump(dir: &Path, name: &str, before: &[PathBuf]) -> Result<PathBuf> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(p) = dumps(dir, name)?.into_iter().find(|p| !before.contains(p)) {
            // Written whole once its totals line is there.
            if std::fs::read_to_string(&p)?.contains("\ntotals:") {
                return Ok(p);
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("callgrind wrote no new dump of {name} in {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The instructions counted in a dump (its `totals:` line).
fn instructions(file: &Path) -> Result<f64> {
    let text = std::fs::read_to_string(file)?;
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("totals:"))
        .with_context(|| format!("no totals in {}", file.display()))?;
    line.split_whitespace()
        .next()
        .context("an empty totals line")?
        .parse()
        .context("the totals line")
}

/// Self instructions per function of a dump, from callgrind_annotate.
fn functions(file: &Path) -> Result<Vec<(f64, String)>> {
    let out = run_cmd(
        Command::new("callgrind_annotate")
            .args([
                "--inclusive=no",
                "--threshold=100",
                "--auto=no",
                "--show-percs=no",
            ])
            .arg(file),
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = Vec::new();
    for l in text.lines() {
        let l = l.trim();
        let Some((count, rest)) = l.split_once(' ') else {
            continue;
        };
        let Ok(n) = count.replace(',', "").parse::<f64>() else {
            continue;
        };
        // "file:function [object]": the function, without its object.
        let f = rest.trim();
        let f = f.rsplit_once(" [").map_or(f, |(f, _)| f);
        let f = f.split_once(':').map_or(f, |(_, f)| f);
        if !f.is_empty() && !l.contains("PROGRAM TOTALS") {
            v.push((n, f.to_string()));
        }
    }
    Ok(v)
}

/// Where a function's instructions go in the report: the proxy's own modules by name, the
/// libraries by crate, the C library and the allocator apart.
fn part(function: &str) -> String {
    let f = function.trim_start_matches('<');
    let own = [
        ("sockmesh_proxy::stats", "stats (sockmesh-proxy)"),
        (
            "sockmesh_proxy::transport",
            "accept, SO_ORIGINAL_DST, detection (sockmesh-proxy)",
        ),
        (
            "sockmesh_proxy::listener",
            "accept, SO_ORIGINAL_DST, detection (sockmesh-proxy)",
        ),
        ("sockmesh_proxy::router", "routing (sockmesh-proxy)"),
        ("sockmesh_proxy::upstream", "upstream pool (sockmesh-proxy)"),
        ("sockmesh_proxy::cluster", "upstream pool (sockmesh-proxy)"),
        ("sockmesh_proxy::http", "request handling (sockmesh-proxy)"),
        ("sockmesh_proxy", "other (sockmesh-proxy)"),
        ("hyper_util", "hyper"),
        ("hyper", "hyper"),
        ("h2", "hyper"),
        ("http", "hyper"),
        ("tokio", "tokio (tasks, I/O, timers)"),
        ("mio", "tokio (tasks, I/O, timers)"),
        ("tracing", "logging (tracing)"),
        ("bytes", "bytes"),
    ];
    for (prefix, name) in own {
        if f.starts_with(prefix)
            && f[prefix.len()..]
                .chars()
                .next()
                .is_some_and(|c| c == ':' || c == '<' || c == ' ')
        {
            return name.to_string();
        }
    }
    if f.contains("alloc") || f.contains("malloc") || f.contains("free") || f.starts_with("_int_") {
        return "allocation".into();
    }
    if f.starts_with("core::") || f.starts_with("alloc::") || f.starts_with("std::") {
        return "Rust std".into();
    }
    if f.starts_with("0x") || f == "???" {
        return "unknown (no symbol)".into();
    }
    "C library and other".into()
}

fn report(b: &Bench, ours: &Counted, theirs: &Counted) -> Result<String> {
    let mut r = String::from("# Where the proxies' CPU goes\n\n");
    r.push_str(&format!(
        "Written by `cargo xtask profile`{}. Machine: {}. Section 5's setup ({} clients in the \
         sockmesh pod to a service VIP, captured to the proxy on 15001, round robin over two \
         keep-alive upstreams), each proxy under valgrind's callgrind for {} s per client mode \
         after it first answers. Instructions are the proxy's own, in user space, counted by \
         callgrind (the same on every run); system calls and the kernel's TCP work are not \
         counted (section 5 of benchmarks.md measures both proxies' whole CPU time).\n\n",
        if b.smoke { " --smoke" } else { "" },
        super::host::machine(),
        b.sizes.conns,
        b.sizes.secs
    ));
    r.push_str("| clients | proxy | requests | instructions per request | against HAProxy |\n|---|---|---|---|---|\n");
    for (k, (mode, _)) in HTTP_MODES.into_iter().enumerate() {
        let per = |c: &Counted| c.modes[k].1 / c.modes[k].0;
        let theirs_per = per(theirs);
        for c in [theirs, ours] {
            r.push_str(&format!(
                "| {mode} | {} | {:.0} | {:.0} | {:.2} |\n",
                c.name,
                c.modes[k].0,
                per(c),
                per(c) / theirs_per
            ));
        }
    }
    r.push('\n');
    for (k, (mode, _)) in HTTP_MODES.into_iter().enumerate() {
        let (requests, total, file) = &ours.modes[k];
        let mut parts: BTreeMap<String, f64> = BTreeMap::new();
        let fns = functions(file)?;
        for (n, f) in &fns {
            *parts.entry(part(f)).or_default() += n;
        }
        let mut parts: Vec<(String, f64)> = parts.into_iter().collect();
        parts.sort_by(|a, b| b.1.total_cmp(&a.1));
        r.push_str(&format!(
            "### sockmesh-proxy, {mode}: where the instructions go\n\n\
             | part | instructions per request | share |\n|---|---|---|\n"
        ));
        for (name, n) in &parts {
            r.push_str(&format!(
                "| {name} | {:.0} | {:.1}% |\n",
                n / requests,
                100.0 * n / total
            ));
        }
        r.push_str("\nThe functions that ran the most instructions of their own:\n\n| function | instructions per request |\n|---|---|\n");
        for (n, f) in fns.iter().take(15) {
            let f: String = f.chars().take(110).collect();
            r.push_str(&format!(
                "| `{}` | {:.0} |\n",
                f.replace('|', "\\|"),
                n / requests
            ));
        }
        r.push('\n');
    }
    Ok(r)
}

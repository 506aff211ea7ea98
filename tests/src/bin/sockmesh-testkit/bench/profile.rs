//! Where a proxy's CPU goes, per request (run by `cargo xtask profile`): sockmesh-proxy and
//! HAProxy in section 5's roles (the same pod, capture, upstreams and clients), each under
//! valgrind's callgrind, which counts the instructions a process runs in user space the same
//! way on every run (these machines' timings are noisy). A run per role counts from start to
//! exit, a baseline run for the role's wire (start, first answers, exit) is taken from it, and
//! instructions per request are what is left over the requests the clients made. For
//! sockmesh-proxy the instructions are also shared out by where they ran (the functions' crates
//! and modules, from callgrind's symbols).
//!
//! Kernel time (system calls, TCP) is not in those counts: section 5 of the benchmark measures
//! both proxies' whole CPU time. Their system calls per request are, by call: each proxy runs
//! again without valgrind, its calls counted by the kernel's tracepoints (`perf stat`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use sockmesh_tests::{
    kit::Wire,
    lab::{require_tools, run as run_cmd, sibling_bin},
};

use super::{
    host::{PerfRecord, SyscallCount},
    proxies::{requests, wait_for_h2c, wait_for_http1, wait_for_requests, Proxies, ROLES},
    Bench,
};

/// The roles profiled, all of section 5's: (name, what the clients speak, a new connection
/// per request).
fn roles() -> Vec<(String, Wire, bool)> {
    ROLES
        .iter()
        .map(|&(wire, protocol, mode, new_conn)| (format!("{protocol} {mode}"), wire, new_conn))
        .collect()
}

/// One role's run under callgrind.
struct Run {
    requests: f64,
    /// The run's counts beyond the baseline of the role's wire.
    beyond: Totals,
    /// The run's counts file; the baseline's.
    file: PathBuf,
    baseline: PathBuf,
}

/// One proxy's runs, per role.
struct Counted {
    name: &'static str,
    runs: Vec<Run>,
}

/// A proxy to run: its name in the report, its program and its arguments for a wire's
/// clients (after the program's name in a command).
struct Proxy<'a> {
    name: &'static str,
    program: PathBuf,
    args: &'a dyn Fn(Wire, &mut Command),
}

/// Run the profile; the Markdown report. The counts files (for `callgrind_annotate`) are
/// copied to `keep`, if given. With `perf_record`, each proxy's native run per role is also
/// sampled by [`PerfRecord`] into that folder.
pub fn run(smoke: bool, keep: Option<&Path>, perf_record: Option<&Path>) -> Result<String> {
    require_tools(&["ip", "haproxy", "valgrind", "callgrind_annotate", "perf"])?;
    let mut b = Bench::new(smoke)?;
    // Under valgrind a proxy runs some 50 times slower: longer rounds give enough requests.
    b.sizes.secs = if smoke { 1.0 } else { 5.0 };
    let proxies = Proxies::new(&mut b)?;
    let dir = b.lab.dir.join("callgrind");
    std::fs::create_dir_all(&dir)?;
    // The proxies write their counts there as uid 1337 (in files made for them, see
    // `valgrind`): their folder, not a sticky shared one, where the kernel would refuse them
    // a file root made.
    std::os::unix::fs::chown(&dir, Some(1337), Some(1337))?;
    let bin = sibling_bin("sockmesh-proxy", "SOCKMESH_PROXY_BIN")?;
    // One configuration of sockmesh-proxy serves every wire; HAProxy has one per wire.
    let ours = Proxy {
        name: "sockmesh-proxy",
        program: bin,
        args: &|_, cmd| proxies.ours(cmd),
    };
    let theirs = Proxy {
        name: "HAProxy",
        program: "haproxy".into(),
        args: &|wire, cmd| proxies.theirs(wire, cmd),
    };
    let our_counts = count(&mut b, &ours, &dir)?;
    let their_counts = count(&mut b, &theirs, &dir)?;
    if let Some(keep) = keep {
        std::fs::create_dir_all(keep)?;
        for e in std::fs::read_dir(&dir)?.flatten() {
            std::fs::copy(e.path(), keep.join(e.file_name()))?;
        }
    }
    if let Some(dir) = perf_record {
        std::fs::create_dir_all(dir)?;
    }
    let our_calls = syscalls(&mut b, &ours, perf_record)?;
    let their_calls = syscalls(&mut b, &theirs, perf_record)?;
    let mut r = report(&b, &our_counts, &their_counts)?;
    report_syscalls(&mut r, &our_calls, &their_calls);
    drop(b);
    r.push_str(&super::programs::run(smoke)?);
    Ok(r)
}

/// The system calls counted one by one; the rest are counted together.
const CALLS: [&str; 28] = [
    "read",
    "recvfrom",
    "recvmsg",
    "write",
    "writev",
    "sendto",
    "sendmsg",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_ctl",
    "accept4",
    "connect",
    "socket",
    "close",
    "shutdown",
    "getsockopt",
    "setsockopt",
    "getsockname",
    "getpeername",
    "futex",
    "sched_yield",
    "ioctl",
    "fcntl",
    "brk",
    "mmap",
    "munmap",
    "madvise",
];

/// Per role, a proxy's system calls per request by call ("all" for every call).
type Calls = Vec<BTreeMap<String, f64>>;

/// Run a proxy natively, once per role, and count its system calls per request.
fn syscalls(b: &mut Bench, proxy: &Proxy, perf_record: Option<&Path>) -> Result<Calls> {
    let mut per_role = Vec::new();
    for (role, wire, new_conn) in roles() {
        let mut cmd = b.lab.command_at(b.sm.place(), &proxy.program)?;
        (proxy.args)(wire, &mut cmd);
        let i = b.lab.spawn(cmd, None)?;
        let result = (|| -> Result<BTreeMap<String, f64>> {
            wait_for_wire(b, wire, Duration::from_secs(10))?;
            let pid = b.lab.pid(i).context("the proxy's pid")?;
            let count = SyscallCount::start(pid, &CALLS, &b.lab.dir.join("perf-calls.txt"))?;
            let record = match perf_record {
                Some(dir) => Some(PerfRecord::start(
                    pid,
                    &dir.join(record_name(proxy, &role)),
                )?),
                None => None,
            };
            let r = requests(b, wire, new_conn, b.sizes.secs);
            let counts = count.stop()?;
            if let Some(record) = record {
                record.stop()?;
            }
            let requests = r?.0 * b.sizes.secs;
            Ok(counts.into_iter().map(|(c, n)| (c, n / requests)).collect())
        })();
        b.lab.kill(i)?;
        per_role.push(result?);
    }
    Ok(per_role)
}

/// The file of `proxy`'s samples in `role`: `sockmesh-proxy-http-1-1-new-connections.data`.
fn record_name(proxy: &Proxy, role: &str) -> String {
    let slug: String = role
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("{}-{slug}.data", proxy.name.to_lowercase())
}

/// Wait until a proxy answers `wire`'s clients (HAProxy's h2c configuration serves no
/// HTTP/1.1), at most `within`. HTTP waits with single requests: a baseline run then makes as
/// many requests before its end as a role's run makes before its load.
fn wait_for_wire(b: &Bench, wire: Wire, within: Duration) -> Result<()> {
    match wire {
        Wire::Http1 => wait_for_http1(b, within),
        Wire::H2c => wait_for_h2c(b, within),
        Wire::Tcp => wait_for_requests(b, wire, within),
    }
}

/// The table of both proxies' system calls per request, by call.
fn report_syscalls(r: &mut String, ours: &Calls, theirs: &Calls) {
    r.push_str(
        "## System calls per request, by call\n\n\
         Each proxy again in the same roles without valgrind, its calls counted by the kernel's \
         tracepoints (`perf stat -e syscalls:sys_enter_<call>`, all threads) while the clients \
         make the same requests. A system call costs the proxy kernel time that the \
         instruction counts above leave out.\n\n\
         | call |",
    );
    let roles = roles();
    for (role, _, _) in &roles {
        r.push_str(&format!(" {role}: HAProxy | {role}: sockmesh-proxy |"));
    }
    r.push_str(&format!("\n|---|{}\n", "---|".repeat(2 * roles.len())));
    let at = |c: &Calls, k: usize, call: &str| c[k].get(call).copied().unwrap_or(0.0);
    for call in CALLS.iter().copied().chain(["other", "all"]) {
        // Per role, HAProxy's then sockmesh-proxy's.
        let v: Vec<f64> = (0..roles.len())
            .flat_map(|k| [theirs, ours].map(|c| (c, k)))
            .map(|(c, k)| {
                if call == "other" {
                    at(c, k, "all") - CALLS.iter().map(|n| at(c, k, n)).sum::<f64>()
                } else {
                    at(c, k, call)
                }
            })
            .collect();
        // Calls neither proxy makes once per hundred requests are left out.
        if call != "all" && call != "other" && v.iter().all(|x| *x < 0.01) {
            continue;
        }
        if call == "all" {
            r.push_str("| **all** |");
        } else {
            r.push_str(&format!("| `{call}` |"));
        }
        for x in v {
            r.push_str(&format!(" {x:.2} |"));
        }
        r.push('\n');
    }
    r.push('\n');
}

/// valgrind's callgrind in the sockmesh pod, started as root as the proxies are (they drop to
/// uid 1337 themselves; the binary may sit where only root can reach it), writing its counts
/// to `out` when the proxy exits: by then as uid 1337, so `out` is made beforehand as that
/// user's. No gdbserver (`--vgdb=no`): its pipes in /tmp, made as root, would outlive a
/// process that cannot remove them as uid 1337.
fn valgrind(b: &Bench, out: &Path) -> Result<Command> {
    std::fs::write(out, "")?;
    std::os::unix::fs::chown(out, Some(1337), Some(1337))?;
    let mut cmd = b.lab.command_at(b.sm.place(), "valgrind")?;
    cmd.arg("--tool=callgrind")
        .arg("--vgdb=no")
        // Its model of this machine's first-level caches, for the proxy alone: how much code
        // and data a request touches, not the time the real, shared caches cost it.
        .arg("--cache-sim=yes")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg("--quiet");
    Ok(cmd)
}

/// Run the proxy under callgrind: per wire of the roles, once only until it answers (the
/// wire's baseline: start-up and the first requests); then once per role with the role's
/// requests after it. A role's instructions are its run's less its wire's baseline's.
/// (valgrind's own control channel, `callgrind_control`, cannot reach a process running as
/// another user than the one that started it, so each count is taken when the proxy exits on
/// SIGTERM.)
fn count(b: &mut Bench, proxy: &Proxy, dir: &Path) -> Result<Counted> {
    let file = |run: &str| dir.join(format!("{}-{run}.out", proxy.name.replace(' ', "-")));
    let mut baselines: Vec<(Wire, PathBuf, Totals)> = Vec::new();
    let mut runs = Vec::new();
    for (k, (_, wire, new_conn)) in roles().into_iter().enumerate() {
        let (baseline, base) = match baselines.iter().find(|(w, _, _)| *w == wire) {
            Some((_, f, n)) => (f.clone(), *n),
            None => {
                let f = file(&format!("baseline-{}", wire.name()));
                counted_run(b, proxy, wire, &f, None)?;
                let n = Totals::of(&f)?;
                baselines.push((wire, f.clone(), n));
                (f, n)
            }
        };
        let f = file(&k.to_string());
        let requests = counted_run(b, proxy, wire, &f, Some(new_conn))?;
        runs.push(Run {
            requests,
            beyond: Totals::of(&f)?.less(base),
            file: f,
            baseline,
        });
    }
    Ok(Counted {
        name: proxy.name,
        runs,
    })
}

/// One run under callgrind for `wire`'s clients: start, wait until it answers, make `load`'s
/// requests (if any: a new connection per request or not), stop it with SIGTERM; the requests
/// made.
fn counted_run(
    b: &mut Bench,
    proxy: &Proxy,
    wire: Wire,
    out: &Path,
    load: Option<bool>,
) -> Result<f64> {
    let mut cmd = valgrind(b, out)?;
    (proxy.args)(wire, cmd.arg(&proxy.program));
    let i = b.lab.spawn(cmd, None)?;
    let result = (|| {
        // valgrind starts slowly.
        wait_for_wire(b, wire, Duration::from_secs(60))?;
        let requests = match load {
            Some(new_conn) => {
                let (rps, _, _) = requests(b, wire, new_conn, b.sizes.secs)?;
                rps * b.sizes.secs
            }
            None => 0.0,
        };
        let pid = b.lab.pid(i).context("the proxy's pid")?;
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(out).is_ok_and(|t| t.contains("\ntotals:")) {
            if std::time::Instant::now() > deadline {
                bail!(
                    "callgrind wrote no counts to {} within 60 s of SIGTERM",
                    out.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(requests)
    })();
    b.lab.kill(i)?;
    result
}

/// What a dump counted in all (its `events:` and `totals:` lines): instructions, and
/// first-level cache misses (data: reads and writes; instructions) as callgrind's cache
/// simulation counts them.
#[derive(Clone, Copy)]
struct Totals {
    instructions: f64,
    data_misses: f64,
    instruction_misses: f64,
}

impl Totals {
    /// What these counts have beyond `base`'s.
    fn less(self, base: Totals) -> Totals {
        Totals {
            instructions: self.instructions - base.instructions,
            data_misses: self.data_misses - base.data_misses,
            instruction_misses: self.instruction_misses - base.instruction_misses,
        }
    }

    fn of(file: &Path) -> Result<Totals> {
        let text = std::fs::read_to_string(file)?;
        let line = |prefix: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .with_context(|| format!("no {prefix} line in {}", file.display()))
        };
        let events: Vec<&str> = line("events:")?.split_whitespace().collect();
        let values: Vec<f64> = line("totals:")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("the totals line")?;
        let event = |name: &str| -> Result<f64> {
            events
                .iter()
                .position(|e| *e == name)
                .and_then(|i| values.get(i).copied())
                .with_context(|| format!("no {name} count in {}", file.display()))
        };
        Ok(Totals {
            instructions: event("Ir")?,
            data_misses: event("D1mr")? + event("D1mw")?,
            instruction_misses: event("I1mr")?,
        })
    }
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
                "--show=Ir",
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

/// [`functions`] of `file` less those of `baseline`, most first.
fn functions_beyond(file: &Path, baseline: &Path) -> Result<Vec<(f64, String)>> {
    let mut by_name: BTreeMap<String, f64> = BTreeMap::new();
    for (n, f) in functions(file)? {
        *by_name.entry(f).or_default() += n;
    }
    for (n, f) in functions(baseline)? {
        *by_name.entry(f).or_default() -= n;
    }
    let mut v: Vec<(f64, String)> = by_name.into_iter().map(|(f, n)| (n, f)).collect();
    v.sort_by(|a, b| b.0.total_cmp(&a.0));
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
        ("sockmesh_proxy::tcp", "TCP relay (sockmesh-proxy)"),
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
    // glibc's malloc (HAProxy) and mimalloc (sockmesh-proxy's global allocator: mi_*).
    let mimalloc = f.starts_with("mi_") || f.starts_with("_mi_");
    if mimalloc
        || f.contains("alloc")
        || f.contains("malloc")
        || f.contains("free")
        || f.starts_with("_int_")
    {
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
        "Written by `cargo xtask profile`{}. Machine: {}. Section 5's roles ({} clients in the \
         sockmesh pod to a service VIP, captured to the proxy on 15001, round robin over two \
         upstreams; HTTP/1.1 with keep-alive and with a new connection per request, h2c with \
         keep-alive, each with keep-alive upstreams; a TCP relay of 64-byte exchanges with \
         keep-alive and with a new connection per exchange, each client connection relayed on \
         a new upstream connection), each proxy under valgrind's callgrind, {} s of requests per role, \
         less a baseline run of the same wire with none (start-up, first answers, exit). \
         Instructions are the proxy's own, in user space, counted by callgrind (the same on \
         every run); system calls and the kernel's TCP work are not counted (section 5 of \
         benchmarks.md measures both proxies' whole CPU time, user and system). First-level \
         cache misses (data read and written; instructions) are callgrind's cache simulation, \
         its model of this machine's L1 caches for the proxy alone: how much code and data a \
         request touches, not what the real caches, shared with the clients, upstreams and \
         kernel, cost it. sockmesh-proxy's parts below go by the function each instruction ran \
         in as built (fat LTO, profile-guided as `cargo xtask profile` builds it, see \
         xtask/src/pgo.rs): code the compiler inlined counts to the function it was inlined \
         into (hyper's setup of a client's connection, for one, to the listener's, under \
         accept; much of tokio's task and I/O code, to its callers).\n\n",
        if b.smoke { " --smoke" } else { "" },
        super::host::machine(),
        b.sizes.conns,
        b.sizes.secs
    ));
    r.push_str(
        "| role | proxy | requests | instructions per request | against HAProxy | L1 data \
         misses per request | L1 instruction misses per request |\n|---|---|---|---|---|---|---|\n",
    );
    for (k, (role, _, _)) in roles().iter().enumerate() {
        let per = |c: &Counted| c.runs[k].beyond.instructions / c.runs[k].requests;
        let theirs_per = per(theirs);
        for c in [theirs, ours] {
            let run = &c.runs[k];
            r.push_str(&format!(
                "| {role} | {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.0} |\n",
                c.name,
                run.requests,
                per(c),
                per(c) / theirs_per,
                // A baseline with as many (start-up alone) is none per request.
                (run.beyond.data_misses / run.requests).max(0.0),
                (run.beyond.instruction_misses / run.requests).max(0.0),
            ));
        }
    }
    r.push('\n');
    for (k, (role, _, _)) in roles().iter().enumerate() {
        let Run {
            requests,
            beyond,
            file,
            baseline,
        } = &ours.runs[k];
        let total = beyond.instructions;
        let mut parts: BTreeMap<String, f64> = BTreeMap::new();
        let fns = functions_beyond(file, baseline)?;
        for (n, f) in &fns {
            *parts.entry(part(f)).or_default() += n;
        }
        let mut parts: Vec<(String, f64)> = parts.into_iter().collect();
        parts.sort_by(|a, b| b.1.total_cmp(&a.1));
        r.push_str(&format!(
            "### sockmesh-proxy, {role}: where the instructions go\n\n\
             | part | instructions per request | share |\n|---|---|---|\n"
        ));
        for (name, n) in &parts {
            // A part the baseline run did as much of (start-up work only) is none per request,
            // not a negative few instructions.
            let n = n.max(0.0);
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

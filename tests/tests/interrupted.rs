//! A run stopped by Ctrl-C leaves nothing: the testkit's signal handler removes its labs'
//! processes, namespaces, mounts, cgroups and folders before it exits with 128 + SIGINT.

use std::{
    os::unix::process::ExitStatusExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sockmesh_tests::{
    lab::{cgroup2_root, proc_stat, testkit_bin},
    leftovers::descendants,
};

/// Everything named after the labs of process `pid` (`smt-TAG-PID-N...`): namespaces, cgroups,
/// folders, mounts and processes started with such a name in their arguments.
fn left_by(pid: u32) -> Vec<String> {
    let tag = format!("-{pid}-");
    let ours = |n: &str| n.starts_with("smt-") && n.contains(&tag);
    let mut left = Vec::new();
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for l in String::from_utf8_lossy(&netns.stdout).lines() {
        let name = l.split_whitespace().next().unwrap_or("");
        if ours(name) {
            left.push(format!("network namespace {name}"));
        }
    }
    for dir in [cgroup2_root().unwrap(), std::env::temp_dir()] {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if ours(&e.file_name().to_string_lossy()) {
                left.push(format!("{}", e.path().display()));
            }
        }
    }
    for m in std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
    {
        if m.contains("/smt-") && m.contains(&tag) {
            left.push(format!("mount {m}"));
        }
    }
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let args = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args = String::from_utf8_lossy(&args);
        if args.contains("/smt-") && args.contains(&tag) {
            left.push(format!(
                "process {}: {args}",
                e.file_name().to_string_lossy()
            ));
        }
    }
    left
}

#[test]
fn a_benchmark_stopped_by_ctrl_c_leaves_nothing() {
    // Its output to a file: a process it left would hold a pipe open.
    let log = std::env::temp_dir().join(format!("sockmesh-interrupted-{}.log", std::process::id()));
    let mut run = Command::new(testkit_bin().unwrap())
        .args(["bench", "--smoke"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = run.id();
    // Until the run has its pods and their processes (more than its first namespace).
    let until = Instant::now() + Duration::from_secs(60);
    while left_by(pid).len() < 10 {
        assert!(run.try_wait().unwrap().is_none(), "the run ended early");
        assert!(Instant::now() < until, "the run made no lab in 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Its processes, some in namespaces without a name: each must be gone after (a zombie
    // is gone; a pid used again has another start time).
    let started = |p: i32| {
        let f = proc_stat(p)?;
        (f.first().is_some_and(|s| s != "Z")).then(|| f.get(19).cloned())?
    };
    let procs: Vec<(i32, Option<String>)> = descendants(pid as i32)
        .into_iter()
        .map(|p| (p, started(p)))
        .collect();
    assert!(!procs.is_empty(), "the run has no processes");
    // Its children start with the usual signal mask (perf stops on SIGINT, a proxy on
    // SIGTERM): none has SIGHUP blocked, which no program of the run blocks itself.
    for (p, _) in &procs {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) else {
            continue;
        };
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(
            blocked & (1 << (libc::SIGHUP - 1)),
            0,
            "process {p} of the run started with SIGHUP blocked"
        );
    }
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let status = run.wait().unwrap();
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert_eq!(
        status.code(),
        Some(128 + libc::SIGINT),
        "status {status:?}, signal {:?}: {stderr}",
        status.signal()
    );
    let mut left = left_by(pid);
    for (p, start) in procs {
        if start.is_some() && started(p) == start {
            left.push(format!("process {p} of the run"));
        }
    }
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
}

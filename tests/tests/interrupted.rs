//! A run stopped by Ctrl-C leaves nothing: the testkit's signal handler removes its labs'
//! processes, namespaces, mounts, cgroups and folders before it exits with 128 + SIGINT.

use std::{
    os::unix::process::ExitStatusExt,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sockmesh_tests::lab::{cgroup2_root, testkit_bin};

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
    let left = left_by(pid);
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
}

//! What a lab leaves when its process ends without unwinding (a signal, a kill): its
//! processes, network namespaces, mounts, cgroups and folder, found by name and removed.
//!
//! Every lab's name is `smt-TAG-PID-N` (its namespaces add `-SHORT`), PID being the process
//! that made it. [`remove_on_signal`] makes SIGINT, SIGTERM and SIGHUP remove this process's
//! labs before it exits; [`remove`] with [`Owner::Gone`] removes those of processes that no
//! longer run (`cargo xtask clean`).

use std::{
    fs,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use crate::lab::{cgroup2_root, proc_stat, PREFIX};

/// Whose labs to remove.
#[derive(Clone, Copy, Debug)]
pub enum Owner {
    /// The labs of this process id.
    Pid(u32),
    /// The labs of processes that are not running.
    Gone,
}

impl Owner {
    fn owns(self, name: &str) -> bool {
        match (self, owner_pid(name)) {
            (_, None) => false,
            (Owner::Pid(p), Some(q)) => p == q,
            (Owner::Gone, Some(q)) => !running(q),
        }
    }
}

/// Whether process `pid` runs (exists and is not a zombie).
fn running(pid: u32) -> bool {
    proc_stat(pid as i32).is_some_and(|f| f.first().is_some_and(|s| s != "Z"))
}

/// The process that made the lab of this name: the first of two numbers in a row after
/// `smt-TAG-`.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    let t: Vec<&str> = rest.split('-').collect();
    (1..t.len().saturating_sub(1)).find_map(|i| {
        let pid = t[i].parse::<u32>().ok()?;
        t[i + 1].parse::<u32>().ok().map(|_| pid)
    })
}

/// The lab's name in a path or argument: its component that starts with `smt-`.
fn lab_names(text: &str) -> impl Iterator<Item = &str> {
    text.split(['/', ' ', '=', ',', ':', '\0'])
        .filter(|c| c.starts_with(&format!("{PREFIX}-")))
}

/// Remove what `owner`'s labs left. Returns what was removed, one line each.
pub fn remove(owner: Owner) -> Vec<String> {
    let mut done = Vec::new();
    let netns: Vec<String> = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| owner.owns(n))
        .map(str::to_string)
        .collect();
    let cgroups: Vec<std::path::PathBuf> = cgroup2_root()
        .ok()
        .and_then(|root| fs::read_dir(root).ok())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| owner.owns(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .collect();

    // Processes first: in the namespaces, in the cgroups, or running from a lab's folder.
    let mut pids: Vec<i32> = Vec::new();
    for ns in &netns {
        if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
            pids.extend(
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    for cg in &cgroups {
        for procs in sub_cgroups(cg) {
            if let Ok(text) = fs::read_to_string(procs.join("cgroup.procs")) {
                pids.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<i32>().ok()),
                );
            }
        }
    }
    let me = std::process::id() as i32;
    // This process's own descendants: some run in namespaces without a name (a peer host
    // made by unshare), which no listing above finds.
    if matches!(owner, Owner::Pid(p) if p as i32 == me) {
        pids.extend(descendants(me));
    }
    if matches!(owner, Owner::Gone) {
        pids.extend(orphaned_kit_programs());
    }
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let args = fs::read(e.path().join("cmdline")).unwrap_or_default();
        if lab_names(&String::from_utf8_lossy(&args)).any(|n| owner.owns(n)) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids.dedup();
    // A zombie is gone already (this process reaps its own only when it ends).
    pids.retain(|p| *p != me && running(*p as u32));
    for p in &pids {
        // SAFETY: a signal to a process of the lab.
        unsafe { libc::kill(*p, libc::SIGKILL) };
        done.push(format!("process {p}"));
    }
    if !pids.is_empty() {
        std::thread::sleep(Duration::from_millis(200));
    }

    for ns in &netns {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
        done.push(format!("network namespace {ns}"));
    }
    // Mounts under a lab's folder, deepest first (a private bpffs: its pins, links and maps go).
    let mut mounts: Vec<String> = fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|dir| lab_names(dir).any(|n| owner.owns(n)))
        .map(str::to_string)
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        let _ = Command::new("umount").arg(&m).status();
        done.push(format!("mount {m}"));
    }
    // A cgroup goes once its processes have; its children first.
    for cg in &cgroups {
        let mut all = sub_cgroups(cg);
        all.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        for c in all {
            for _ in 0..100 {
                match fs::remove_dir(&c) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => break,
                }
            }
        }
        done.push(format!("cgroup {}", cg.display()));
    }
    for e in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if owner.owns(&e.file_name().to_string_lossy()) {
            let _ = fs::remove_dir_all(e.path());
            done.push(format!("folder {}", e.path().display()));
        }
    }
    done
}

/// Every process's parent, from /proc.
fn parents() -> Vec<(i32, i32)> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let ppid = proc_stat(pid)?.get(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}

/// The processes below `pid`, children first.
pub fn descendants(pid: i32) -> Vec<i32> {
    let all = parents();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    found.remove(0);
    found
}

/// Test programs of labs whose process is gone (`sockmesh-testkit` run by a lab, now a
/// child of init): not the commands that make labs, nor a node's pause process.
fn orphaned_kit_programs() -> Vec<i32> {
    parents()
        .into_iter()
        .filter(|(_, ppid)| *ppid == 1)
        .filter(|(pid, _)| {
            let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            let args = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let sub = args.split(|b| *b == 0).nth(1).unwrap_or_default();
            // " (deleted)" follows the name of a binary rebuilt since it started.
            let name = exe.file_name().unwrap_or_default().to_string_lossy();
            (name == "sockmesh-testkit" || name == "sockmesh-testkit (deleted)")
                && ![
                    &b"bench"[..],
                    b"profile",
                    b"lab",
                    b"soak",
                    b"scale",
                    b"pause",
                    b"clean",
                ]
                .contains(&sub)
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// A cgroup and every cgroup below it.
fn sub_cgroups(cg: &Path) -> Vec<std::path::PathBuf> {
    let mut all = vec![cg.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        let below: Vec<_> = fs::read_dir(&all[i])
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        all.extend(below);
        i += 1;
    }
    all
}

/// Set once a signal's removal has begun: it owns the clean-up from then on.
static REMOVING: AtomicBool = AtomicBool::new(false);

/// When a signal's removal has begun, wait (for ever) for it to end the process: a lab's next
/// step or its own clean-up would race it, and returning from `main` would end the process
/// half removed.
pub fn wait_if_removing() {
    while REMOVING.load(Ordering::SeqCst) {
        std::thread::park();
    }
}

/// The write end of the pipe the signal handler writes to (-1: none yet).
static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// The handler: writes the signal's number to the pipe (write is async-signal-safe).
extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::SeqCst);
    let byte = sig as u8;
    // SAFETY: one byte from the stack to a pipe we own.
    unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
}

/// From now on, SIGINT, SIGTERM and SIGHUP remove this process's labs, then end it (exit
/// status 128 + the signal): a signal would otherwise end it without running the labs'
/// clean-up. A handler writes the signal to a pipe that a thread of its own reads: the
/// signals stay unblocked, so the run's children (perf, proxies, the agent) start with the
/// usual mask and dispositions and still stop on their own signals.
pub fn remove_on_signal() {
    let mut fds = [0; 2];
    // SAFETY: a pipe into an array of two fds; the handler only writes to it.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            eprintln!(
                "sockmesh-testkit: no pipe for signals ({}): a signal will end the run without its clean-up (`cargo xtask clean`)",
                std::io::Error::last_os_error()
            );
            return;
        }
        SIGNAL_PIPE.store(fds[1], Ordering::SeqCst);
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        act.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaction(s, &act, std::ptr::null_mut());
        }
    }
    let read_end = fds[0];
    std::thread::spawn(move || {
        let mut byte = 0u8;
        // SAFETY: reads one byte into a local from our pipe.
        while unsafe { libc::read(read_end, (&mut byte as *mut u8).cast(), 1) } != 1 {}
        let sig = i32::from(byte);
        REMOVING.store(true, Ordering::SeqCst);
        // The run's other threads stop at their next lab step (`wait_if_removing`); one may
        // be inside a step (an `ip netns add`), so scan again until a scan finds nothing.
        let mut removed = Vec::new();
        for _ in 0..50 {
            let now = remove(Owner::Pid(std::process::id()));
            if now.is_empty() {
                break;
            }
            removed.extend(now);
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "sockmesh-testkit: signal {sig}: removed {} things of this run's labs",
            removed.len()
        );
        std::process::exit(128 + sig);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_labs_owner_is_read_from_its_name() {
        assert_eq!(owner_pid("smt-bench-22674-0"), Some(22674));
        assert_eq!(owner_pid("smt-bench-22674-0-pod"), Some(22674));
        assert_eq!(owner_pid("smt-mesh-node-8-12"), Some(8));
        assert_eq!(owner_pid("smt-bench"), None);
        assert_eq!(owner_pid("smt-bench-x-0"), None);
        assert_eq!(owner_pid("other-bench-1-0"), None);
    }

    #[test]
    fn lab_names_are_found_in_paths_and_arguments() {
        let args = "agent\0--bpffs\0/tmp/smt-bench-7-0/bpffs\0--x=smt-lab-9-1-pod";
        let names: Vec<&str> = lab_names(args).collect();
        assert_eq!(names, ["smt-bench-7-0", "smt-lab-9-1-pod"]);
    }
}

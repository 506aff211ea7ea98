//! What the benchmark reads of the machine and the kernel: the CPU time, memory, BPF map
//! memory and system calls of a process, the run-time statistics of sockmesh's programs, and the
//! machine itself.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use sockmesh_tests::lab::{proc_stat, run as run_cmd};

/// CPU time a process (all its threads) has used, in seconds: in user space, and in the
/// kernel on its behalf (its system calls, and the network work done in its context).
#[derive(Clone, Copy, Debug)]
pub struct CpuTime {
    pub user: f64,
    pub system: f64,
}

impl CpuTime {
    pub fn of(pid: u32) -> Result<CpuTime> {
        let f = proc_stat(pid as i32).with_context(|| format!("/proc/{pid}/stat"))?;
        // SAFETY: sysconf reads a constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(CpuTime {
            user: f[11].parse::<f64>()? / hz,
            system: f[12].parse::<f64>()? / hz,
        })
    }

    /// User and system time together.
    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

/// CPU time a process (all its threads) has used, user and system, in seconds.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    CpuTime::of(pid).map(CpuTime::total)
}

/// A process's resident memory, MiB.
pub fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024.0)
}

/// Kernel memory of the BPF maps a process holds (the `memlock` of each map, counted once
/// however many fds it has to it), MiB.
pub fn map_memory_mib(pid: u32) -> Result<f64> {
    let mut maps = BTreeMap::new();
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

/// Run count and run time (ns) of a program, as the kernel keeps them.
pub type ProgStats = BTreeMap<String, (u64, u64)>;

/// The kernel's run counts and run times of the sockmesh programs (names start with
/// "sockmesh_"; the kernel keeps 15 characters), from bpftool; bpf_stats must be on.
pub fn prog_stats() -> Result<ProgStats> {
    let out = run_cmd(Command::new("bpftool").args(["prog", "show", "--json"]))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    let mut m = ProgStats::new();
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
pub struct BpfStats(String);

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    pub fn on() -> Result<BpfStats> {
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
pub fn new_netns() -> Result<OwnedFd> {
    std::thread::spawn(|| -> Result<OwnedFd> {
        // SAFETY: only this thread's namespace changes; it ends right after.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            bail!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
        }
        Ok(std::fs::File::open("/proc/thread-self/ns/net")?.into())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// The machine: CPU model, cores, kernel.
pub fn machine() -> String {
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

/// The system calls a process (all its threads) makes while watched, counted by the kernel's
/// tracepoints through `perf stat` (a counter per event, no sampling: the process runs as
/// fast as it would unwatched). `raw_syscalls:sys_enter` counts every call; the other events
/// count one call each (`syscalls:sys_enter_NAME`).
pub struct SyscallCount {
    perf: Child,
    out: PathBuf,
    events: Vec<String>,
}

/// A fifo at `path` (replacing any file there), opened for reading and writing: an open that
/// does not wait for the other end.
fn fifo(path: &Path) -> Result<std::fs::File> {
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        bail!(
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path);
    f.with_context(|| format!("opening fifo {}", path.display()))
}

/// Wait (10 s at most) for perf's `ack` on its acknowledgement fifo (perf 6.1 writes
/// "ack\n" and a NUL).
fn wait_for_ack(ack: &std::fs::File, perf: &mut Child) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"ack\n") {
        if let Some(status) = perf.try_wait()? {
            bail!("perf exited ({status})");
        }
        if std::time::Instant::now() > deadline {
            bail!("no ack in 10 s");
        }
        let mut pfd = libc::pollfd {
            fd: ack.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 100) } > 0 {
            let mut buf = [0u8; 16];
            let n = (&*ack).read(&mut buf)?;
            got.extend_from_slice(&buf[..n]);
        }
    }
    Ok(())
}

/// Start `perf` (`cmd`: its subcommand and options) on process `pid`, with its control and
/// acknowledgement fifos beside `out`, and return once it has acknowledged `enable`: perf
/// answers only from its main loop, once its counters are open and its SIGINT handler is set
/// (a SIGINT before that would end it with nothing written). The fifos are removed then;
/// `what` and `doing` name perf's command and its work in errors.
fn start_perf(mut cmd: Command, pid: u32, out: &Path, what: &str, doing: &str) -> Result<Child> {
    let (ctl, ack) = (out.with_extension("ctl"), out.with_extension("ack"));
    let (mut ctl_fd, ack_fd) = (fifo(&ctl)?, fifo(&ack)?);
    let mut perf = cmd
        .arg(format!(
            "--control=fifo:{},{}",
            ctl.display(),
            ack.display()
        ))
        .arg("-p")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("starting {what} (apt package linux-perf; `cargo xtask setup`)")
        })?;
    ctl_fd.write_all(b"enable\n")?;
    let started = wait_for_ack(&ack_fd, &mut perf);
    for f in [&ctl, &ack] {
        let _ = std::fs::remove_file(f);
    }
    if let Err(e) = started {
        let _ = perf.kill();
        let out = perf.wait_with_output()?;
        bail!(
            "{what} did not start {doing} pid {pid}: {e} (perf: {}, {})",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(perf)
}

/// The event that counts every system call.
const ALL_SYSCALLS: &str = "raw_syscalls:sys_enter";

impl SyscallCount {
    /// Start counting `pid`'s calls: all of them, and each of `calls` by name; `out` is
    /// perf's report file. Returns once perf counts (see [`start_perf`]).
    pub fn start(pid: u32, calls: &[&str], out: &Path) -> Result<SyscallCount> {
        let mut events = vec![ALL_SYSCALLS.to_string()];
        events.extend(calls.iter().map(|c| format!("syscalls:sys_enter_{c}")));
        let mut cmd = Command::new("perf");
        cmd.args(["stat", "-x", ","]).arg("-o").arg(out);
        for e in &events {
            cmd.arg("-e").arg(e);
        }
        let perf = start_perf(cmd, pid, out, "perf stat", "counting")?;
        Ok(SyscallCount {
            perf,
            out: out.to_path_buf(),
            events,
        })
    }

    /// Stop counting: the count of each event, by event name (as given to `start`: "all"
    /// for every call, else the call's name).
    pub fn stop(self) -> Result<BTreeMap<String, f64>> {
        // SAFETY: a signal to our own child; perf writes its counts on SIGINT.
        unsafe { libc::kill(self.perf.id() as libc::pid_t, libc::SIGINT) };
        let out = self.perf.wait_with_output()?;
        let text = std::fs::read_to_string(&self.out).with_context(|| {
            format!(
                "perf stat ({}) wrote no {}: {}",
                out.status,
                self.out.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        // perf also writes its answers to control commands ("Events enabled") into the
        // report, at a line's start or its end.
        let text = text.replace("Events enabled", "\n");
        let mut counts = BTreeMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split(',').collect();
            let (Some(value), Some(event)) = (f.first(), f.get(2)) else {
                continue;
            };
            if !self.events.iter().any(|e| e == event) {
                continue;
            }
            // A counter never scheduled (no thread of the process ran) counted nothing.
            let n = if *value == "<not counted>" {
                Ok(0.0)
            } else {
                value.parse::<f64>()
            };
            let Ok(n) = n else {
                bail!(
                    "perf stat could not count {event} ({value}): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            };
            let name = match event.strip_prefix("syscalls:sys_enter_") {
                Some(call) => call.to_string(),
                None => "all".to_string(),
            };
            counts.insert(name, n);
        }
        if counts.len() != self.events.len() {
            bail!(
                "perf stat counted {} of {} events: {text}{}",
                counts.len(),
                self.events.len(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(counts)
    }
}

/// `perf record` sampling one process's stacks, user and kernel (`-g`, 2999 Hz; the
/// machine's clock event where it has no hardware counters), for `perf report -i FILE`.
pub struct PerfRecord {
    perf: Child,
    out: PathBuf,
}

impl PerfRecord {
    /// Start sampling `pid` into `out`. Returns once perf samples (see [`start_perf`]).
    pub fn start(pid: u32, out: &Path) -> Result<PerfRecord> {
        let mut cmd = Command::new("perf");
        cmd.args(["record", "-q", "-F", "2999", "-g", "-o"])
            .arg(out);
        let perf = start_perf(cmd, pid, out, "perf record", "sampling")?;
        Ok(PerfRecord {
            perf,
            out: out.to_path_buf(),
        })
    }

    /// Stop (SIGINT, as perf expects: it writes its file, then ends by that signal) and
    /// check that the file is perf's.
    pub fn stop(self) -> Result<()> {
        use std::os::unix::process::ExitStatusExt;
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.perf.id() as libc::pid_t, libc::SIGINT) };
        let done = self.perf.wait_with_output()?;
        let mut magic = [0u8; 8];
        let read = std::fs::File::open(&self.out).and_then(|mut f| f.read_exact(&mut magic));
        let ended = done.status.success() || done.status.signal() == Some(libc::SIGINT);
        if !ended || read.is_err() || magic != *b"PERFILE2" {
            bail!(
                "perf record into {} ended with {} and wrote no perf data there: {}",
                self.out.display(),
                done.status,
                String::from_utf8_lossy(&done.stderr).trim()
            );
        }
        Ok(())
    }
}

//! What the benchmark reads of the machine and the kernel: the CPU time, memory and BPF map
//! memory of a process, the run-time statistics of sockmesh's programs, and the machine itself.

use std::{collections::BTreeMap, os::fd::OwnedFd, process::Command};

use anyhow::{bail, Context, Result};
use sockmesh_tests::lab::run as run_cmd;

/// CPU time a process (all its threads) has used, in seconds.
pub fn cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After "(comm)": state is field 3; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("/proc/pid/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
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

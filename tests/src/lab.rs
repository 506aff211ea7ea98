//! A throw-away lab on this machine: a child cgroup2, a private bpffs, network namespaces joined
//! by veth pairs, an agent, and processes started in them. Everything is removed on drop, on
//! failure and panic included. Nothing is ever attached to the root cgroup or the host netns.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::kit::Launch;

/// Prefix of every netns, cgroup, mount and folder the labs create (for leak checks).
pub const PREFIX: &str = "smt";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The cgroup2 mount point of this machine.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or_else(|| anyhow!("no cgroup2 hierarchy is mounted: sockmesh needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup/unified)"))
}

/// The fields of /proc/PID/stat after the command's "(comm)", which may hold spaces and
/// parentheses: `[0]` is the state, `[1]` the parent's pid, `[11]` and `[12]` utime and stime,
/// `[19]` the start time. None when the process is gone.
pub fn proc_stat(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Path of a binary built next to this one (target/<profile>/NAME), or from `env_var`.
pub fn sibling_bin(name: &str, env_var: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    if p.exists() {
        Ok(p)
    } else {
        bail!(
            "{} not found: build it first (cargo build -p sockmesh) or set {env_var}",
            p.display()
        )
    }
}

pub fn sockmesh_bin() -> Result<PathBuf> {
    sibling_bin("sockmesh", "SOCKMESH_BIN")
}

/// `sockmesh dump --json` of the maps pinned under `bpffs` (works while the agent is down).
/// `sockmesh explain` over the pins at `bpffs`, for the network namespace at `netns`: what it
/// printed.
pub fn explain(bpffs: &Path, netns: &Path, args: &[&str]) -> Result<String> {
    let out = run(Command::new(sockmesh_bin()?)
        .arg("explain")
        .arg("--bpffs")
        .arg(bpffs)
        .arg("--netns")
        .arg(netns)
        .args(args))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn dump(bpffs: &Path) -> Result<serde_json::Value> {
    let out = run(Command::new(sockmesh_bin()?)
        .args(["dump", "--json", "--bpffs"])
        .arg(bpffs))?;
    serde_json::from_slice(&out.stdout).context("sockmesh dump --json printed no JSON")
}

pub fn testkit_bin() -> Result<PathBuf> {
    sibling_bin("sockmesh-testkit", "SOCKMESH_TESTKIT_BIN")
}

/// Run a command, failing with its stderr if it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// The value of the `key` line of a command's report (`key  value`): the rest of the first
/// line that starts with `key`, trimmed. Panics, showing the report, when there is none.
pub fn value_of<'a>(report: &'a str, key: &str) -> &'a str {
    report
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {key} in:\n{report}"))
}

/// Check that the tools a lab needs are here; fail loudly naming the fix.
pub fn require_tools(tools: &[&str]) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the lab needs root (netns, cgroups, bpffs, BPF programs): run as root");
    }
    for t in tools {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(t).exists()))
            .unwrap_or(false);
        if !found {
            bail!("{t} is not installed: run `cargo xtask setup` (installs iptables, iproute2)");
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct Netns {
    pub name: String,
    /// For a namespace owned by a user namespace of its own: the process holding both.
    /// [`Netns::exec`] then runs in that user namespace, as a pod's init container does
    /// (iptables takes owner rules only from the netns's own user namespace).
    pub holder: Option<u32>,
}

impl Netns {
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(|_| ())
    }

    /// A command run in this netns (via `ip netns exec`, or `nsenter` into the holder's user
    /// and network namespaces).
    pub fn exec(&self, program: &str) -> Command {
        match self.holder {
            None => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &self.name, program]);
                c
            }
            Some(pid) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--target={pid}"))
                    .args(["--user", "--net", "--", program]);
                c
            }
        }
    }
}

/// Where a process of a lab runs: a namespace, in the lab's cgroup (where capture applies) or
/// not, and as root or (through setpriv, with no supplementary groups) another uid or gid.
#[derive(Clone, Copy, Debug)]
pub struct Place<'a> {
    pub ns: &'a Netns,
    pub in_cgroup: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl<'a> Place<'a> {
    /// As root in `ns`, in the lab's cgroup if `in_cgroup`.
    pub fn new(ns: &'a Netns, in_cgroup: bool) -> Place<'a> {
        Place {
            ns,
            in_cgroup,
            uid: None,
            gid: None,
        }
    }

    /// As uid and gid `id`.
    pub fn as_user(self, id: u32) -> Place<'a> {
        Place {
            uid: Some(id),
            gid: Some(id),
            ..self
        }
    }

    /// As root's uid with gid `gid` (Envoy in TPROXY mode).
    pub fn as_group(self, gid: u32) -> Place<'a> {
        Place {
            gid: Some(gid),
            ..self
        }
    }
}

pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

pub struct Lab {
    /// Extra arguments for the agent (before `start_agent`).
    pub agent_args: Vec<String>,
    pub name: String,
    pub dir: PathBuf,
    pub cgroup: PathBuf,
    pub bpffs_mount: PathBuf,
    pub bpffs: PathBuf,
    pub socket: PathBuf,
    netns: Vec<Netns>,
    children: Vec<Child>,
    agent: Option<Agent>,
    bpffs_mounted: bool,
}

impl Lab {
    /// A new lab: its folder, child cgroup and private bpffs. `tag` names it in listings.
    pub fn new(tag: &str) -> Result<Lab> {
        crate::leftovers::wait_if_removing();
        require_tools(&["ip", "mount", "umount"])?;
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}-{tag}-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&dir)?;
        let cgroup = cgroup2_root()?.join(&name);
        let bpffs_mount = dir.join("bpffs");
        let mut lab = Lab {
            bpffs: bpffs_mount.join("sockmesh"),
            socket: dir.join("agent.sock"),
            name,
            dir,
            cgroup,
            bpffs_mount,
            netns: Vec::new(),
            children: Vec::new(),
            agent_args: Vec::new(),
            agent: None,
            bpffs_mounted: false,
        };
        fs::create_dir(&lab.cgroup)
            .with_context(|| format!("creating cgroup {}", lab.cgroup.display()))?;
        fs::create_dir_all(&lab.bpffs_mount)?;
        run(Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&lab.bpffs_mount))?;
        lab.bpffs_mounted = true;
        Ok(lab)
    }

    /// [`Lab::new`] with its agent started.
    pub fn with_agent(tag: &str) -> Result<Lab> {
        let mut lab = Lab::new(tag)?;
        lab.start_agent()?;
        Ok(lab)
    }

    /// A new network namespace with lo up.
    pub fn netns(&mut self, short: &str) -> Result<Netns> {
        crate::leftovers::wait_if_removing();
        let ns = Netns {
            name: format!("{}-{short}", self.name),
            holder: None,
        };
        run(Command::new("ip").args(["netns", "add", &ns.name]))?;
        self.netns.push(ns.clone());
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A new network namespace owned by a new user namespace, whose ids 0 to 65535 are the
    /// host's `base` to `base + 65535`: a pod with `hostUsers: false`. A process of the lab
    /// (`unshare --user --net sleep`) holds both, the lab writes its id maps (as a runtime
    /// does), and the netns is named like the others (`ip netns attach`), lo up.
    pub fn netns_in_userns(&mut self, short: &str, base: u32) -> Result<Netns> {
        crate::leftovers::wait_if_removing();
        require_tools(&["unshare", "sleep"])?;
        let mut cmd = Command::new("unshare");
        cmd.args(["--user", "--net", "--", "sleep", "infinity"]);
        let idx = self.spawn(cmd, None)?;
        let pid = self.pid(idx).context("the holder exited")?;
        let own = fs::read_link("/proc/self/ns/net")?;
        let until = Instant::now() + Duration::from_secs(5);
        while fs::read_link(format!("/proc/{pid}/ns/net"))? == own {
            if Instant::now() > until {
                bail!("unshare did not enter a new namespace in 5 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for map in ["uid_map", "gid_map"] {
            fs::write(format!("/proc/{pid}/{map}"), format!("0 {base} 65536\n"))
                .with_context(|| format!("writing the holder's {map}"))?;
        }
        let ns = Netns {
            name: format!("{}-{short}", self.name),
            holder: Some(pid),
        };
        run(Command::new("ip").args(["netns", "attach", &ns.name, &pid.to_string()]))?;
        self.netns.push(ns.clone());
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Delete a namespace now (it must have no processes left to outlive its name).
    pub fn remove_netns(&mut self, ns: &Netns) -> Result<()> {
        run(Command::new("ip").args(["netns", "del", &ns.name]))?;
        self.netns.retain(|n| n.name != ns.name);
        Ok(())
    }

    /// A veth pair between two namespaces, both ends up.
    pub fn veth(&mut self, a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
        // Create in `a` directly so no interface ever sits in the host netns.
        a.ip(&[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ])?;
        a.ip(&["link", "set", a_if, "up"])?;
        b.ip(&["link", "set", b_if, "up"])?;
        Ok(())
    }

    /// A command that runs in `ns`, and in the lab's cgroup if `in_cgroup`.
    pub fn command(
        &self,
        ns: &Netns,
        in_cgroup: bool,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        let netns: OwnedFd = fs::File::open(ns.path())
            .with_context(|| format!("opening {}", ns.path().display()))?
            .into();
        let procs = if in_cgroup {
            Some(
                std::ffi::CString::new(
                    self.cgroup
                        .join("cgroup.procs")
                        .as_os_str()
                        .as_encoded_bytes(),
                )
                .expect("no NUL"),
            )
        } else {
            None
        };
        let mut cmd = Command::new(program);
        // SAFETY: only async-signal-safe calls (open, write, close, setns) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let rc = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                    libc::close(fd);
                    if rc < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// A command that runs `program` at `place` (through setpriv when it names a user).
    pub fn command_at(
        &self,
        place: Place,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        if place.uid.is_none() && place.gid.is_none() {
            return self.command(place.ns, place.in_cgroup, program);
        }
        let mut cmd = self.command(place.ns, place.in_cgroup, "setpriv")?;
        if let Some(uid) = place.uid {
            cmd.arg(format!("--reuid={uid}"));
        }
        if let Some(gid) = place.gid {
            cmd.arg(format!("--regid={gid}"));
        }
        cmd.arg("--clear-groups").arg(program);
        Ok(cmd)
    }

    /// The testkit's `program` at `place`, as a command to run or spawn.
    pub fn testkit<P: Launch>(&self, place: Place, program: &P) -> Result<Command> {
        let mut cmd = self.command_at(place, testkit_bin()?)?;
        cmd.args(program.argv());
        Ok(cmd)
    }

    /// Start the testkit's server `program` at `place` and wait until it is ready; its index
    /// for [`Lab::kill`].
    pub fn start<P: Launch>(&mut self, place: Place, program: &P) -> Result<usize> {
        let cmd = self.testkit(place, program)?;
        self.spawn(cmd, Some("ready"))
    }

    /// Run the testkit's client `program` at `place` to its end; what it printed.
    pub fn output<P: Launch>(&self, place: Place, program: &P) -> Result<String> {
        let out = run(&mut self.testkit(place, program)?)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Wait up to `limit` for a process started with [`Lab::spawn`] to exit; how it exited.
    pub fn wait_exit(&mut self, index: usize, limit: Duration) -> Result<std::process::ExitStatus> {
        let c = self.children.get_mut(index).context("no such child")?;
        let until = Instant::now() + limit;
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > until {
                bail!("still running after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id of a process started with [`Lab::spawn`].
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.children.get(index).map(|c| c.id())
    }

    /// Stop a process started with [`Lab::spawn`] (by the index it returned).
    pub fn kill(&mut self, index: usize) -> Result<()> {
        let c = self.children.get_mut(index).context("no such child")?;
        c.kill()?;
        c.wait()?;
        Ok(())
    }

    /// Start a long-running process; it is killed when the lab is dropped. If `ready_line` is
    /// given, wait until the process prints a line containing it on stdout. Returns its index
    /// for [`Lab::kill`].
    pub fn spawn(&mut self, cmd: Command, ready_line: Option<&str>) -> Result<usize> {
        self.spawn_with(cmd, ready_line, Stdio::inherit())
    }

    /// [`Lab::spawn`], with the child's stderr written to the file `log`.
    pub fn spawn_logged(
        &mut self,
        cmd: Command,
        ready_line: Option<&str>,
        log: &Path,
    ) -> Result<usize> {
        let file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        self.spawn_with(cmd, ready_line, file.into())
    }

    fn spawn_with(
        &mut self,
        mut cmd: Command,
        ready_line: Option<&str>,
        stderr: Stdio,
    ) -> Result<usize> {
        crate::leftovers::wait_if_removing();
        cmd.stdin(Stdio::null());
        cmd.stdout(Stdio::piped());
        cmd.stderr(stderr);
        let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let stdout = child.stdout.take().expect("piped");
        self.children.push(child);
        let index = self.children.len() - 1;
        let mut reader = BufReader::new(stdout);
        if let Some(ready) = ready_line {
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line)? == 0 {
                    bail!("{cmd:?} exited before printing '{ready}'");
                }
                if line.contains(ready) {
                    break;
                }
            }
        }
        // Keep draining so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = reader.read_to_end(&mut sink);
        });
        Ok(index)
    }

    /// Start the agent on the lab's cgroup and bpffs and wait until its socket exists.
    pub fn start_agent(&mut self) -> Result<()> {
        self.start_agent_in(None)
    }

    /// `sockmesh dump --json` of this lab's maps.
    pub fn dump(&self) -> Result<serde_json::Value> {
        dump(&self.bpffs)
    }

    /// The agent's process id (when started directly, not through nsenter).
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.child.id())
    }

    /// [`Lab::start_agent`], with the agent in `node` rather than in the machine's network
    /// namespace (mounts shared, so it sees the lab's cgroup and bpffs): then even an agent that
    /// wrongly accepted its own namespace as a pod's would capture the lab's, never the
    /// machine's. Its metrics port is inside `node`.
    pub fn start_agent_in(&mut self, node: Option<&Netns>) -> Result<()> {
        let log = self.agent_log_path();
        let out = fs::File::create(&log)?;
        let mut cmd = match node {
            None => Command::new(sockmesh_bin()?),
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.path().display()))
                    .arg("--")
                    .arg(sockmesh_bin()?);
                c
            }
        };
        let child = cmd
            .args(self.agent_argv())
            // Any free port: several labs run at once.
            .args(["--metrics", "127.0.0.1:0"])
            .args(&self.agent_args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting sockmesh agent")?;
        self.agent = Some(Agent {
            child,
            log: log.clone(),
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            if let Some(a) = self.agent.as_mut() {
                if let Some(status) = a.child.try_wait()? {
                    bail!(
                        "the agent exited ({status}) before it was ready:\n{}",
                        tail(&log, 40)
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("the agent was not ready within 30 s:\n{}", tail(&log, 40));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `agent` and the lab's cgroup, bpffs and socket: the agent's arguments but its metrics
    /// address and the lab's extra ones.
    pub fn agent_argv(&self) -> Vec<std::ffi::OsString> {
        vec![
            "agent".into(),
            "--cgroup".into(),
            self.cgroup.clone().into(),
            "--bpffs".into(),
            self.bpffs.clone().into(),
            "--socket".into(),
            self.socket.clone().into(),
        ]
    }

    /// Whether the agent started by [`Lab::start_agent`] is still running.
    pub fn agent_running(&mut self) -> Result<bool> {
        match self.agent.as_mut() {
            Some(a) => Ok(a.child.try_wait()?.is_none()),
            None => Ok(false),
        }
    }

    /// Stop the agent with a signal (SIGTERM leaves capture in force).
    pub fn stop_agent(&mut self, signal: i32) -> Result<()> {
        if let Some(mut a) = self.agent.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(a.child.id() as i32, signal) };
            a.child.wait()?;
        }
        Ok(())
    }

    /// The agent's metrics address, from its log.
    pub fn metrics_addr(&self) -> Result<std::net::SocketAddr> {
        let log = fs::read_to_string(self.agent_log_path())?;
        log.lines()
            .rev()
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|f| f.strip_prefix("bound="))
                    .and_then(|a| a.parse().ok())
            })
            .ok_or_else(|| anyhow!("the agent logged no metrics address:\n{log}"))
    }

    /// The agent's log, its last 60 lines.
    pub fn agent_log(&self) -> String {
        tail(&self.agent_log_path(), 60)
    }

    /// Where the agent's whole log is.
    pub fn agent_log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    /// `sockmesh` with the lab's bpffs/socket, run in `ns` (not in the cgroup: init need not be).
    pub fn sockmesh_in(&self, ns: &Netns) -> Result<Command> {
        let mut c = self.command(ns, false, sockmesh_bin()?)?;
        c.env("SOCKMESH_AGENT_SOCKET", &self.socket);
        Ok(c)
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A signal's removal (`leftovers`) does this lab's clean-up and ends the process.
        crate::leftovers::wait_if_removing();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut a) = self.agent.take() {
            let _ = a.child.kill();
            let _ = a.child.wait();
        }
        for ns in self.netns.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns.name]).status();
        }
        if self.bpffs_mounted {
            // Unmounting the private bpffs drops every pin: links detach, maps are freed.
            let _ = Command::new("umount").arg(&self.bpffs_mount).status();
        }
        // The cgroup can only go once its processes are gone; give stragglers a moment.
        for _ in 0..100 {
            match fs::remove_dir(&self.cgroup) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

//! A real node for the node suite: Debian's containerd and runc, started with a config, root,
//! state and socket of the test's own, in a network namespace of the test's own (the node's
//! network: the CNI bridge, hostNetwork pods and the agent live there) and a mount namespace
//! of its own (where the node's /run is a folder of the test), with the pods' cgroups under a
//! child cgroup of the test. `cri` speaks to it as kubelet does; `manifest` turns pod specs
//! into CRI configs.
//!
//! Nothing of the machine's /etc/cni, /opt/cni, /var/lib/containerd or /run/containerd is
//! used. Dropping the [`Node`] stops containerd, kills every process it started (one
//! cgroup.kill), removes the cgroups it made in every hierarchy, unmounts the bpffs and deletes
//! the namespace and the folder.

pub mod cri;
pub mod manifest;

use std::{
    fs,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::lab::{cgroup2_root, require_tools, run, PREFIX};
use manifest::HostPaths;

/// The CNI network the node's pods get (a bridge in the node's namespace).
pub const POD_SUBNET: &str = "10.244.0.0/24";
/// The node's address on the pods' bridge (the pods' gateway).
pub const NODE_BRIDGE_IP: &str = "10.244.0.1";
/// The pause image containerd runs each sandbox with.
pub const PAUSE_IMAGE: &str = "localhost/sockmesh/pause:dev";

/// A containerd node.
pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    /// The node's host paths (hostPath volumes land here).
    pub host: HostPaths,
    /// The cgroup2 folder of the node: `pods/` (the pods, and what the agent attaches to) and
    /// `runtime/` (containerd and its shims).
    pub cgroup: PathBuf,
    /// containerd's CRI socket.
    pub socket: PathBuf,
    containerd: Option<Child>,
    netns_made: bool,
    bpffs_mounted: bool,
}

impl Node {
    /// Lay the node out and start containerd; fails loudly when it cannot start.
    pub fn start() -> Result<Node> {
        require_tools(&[
            "containerd",
            "containerd-shim-runc-v2",
            "runc",
            "ctr",
            "nsenter",
            "unshare",
            "ip",
            "mount",
        ])
        .context("the node suite needs containerd and runc: run `cargo xtask setup`")?;
        for plugin in ["bridge", "host-local", "loopback"] {
            let p = Path::new(CNI_PLUGINS).join(plugin);
            if !p.is_file() {
                bail!(
                    "CNI plugin {} is missing: run `cargo xtask setup` \
                     (containernetworking-plugins)",
                    p.display()
                );
            }
        }
        // containerd's shims detach from it; as the subreaper this process inherits them when
        // containerd goes, and reaps them on drop instead of leaving zombies to init.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let name = format!("{PREFIX}-node-{}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let cgroup = cgroup2_root()?.join(&name);
        let host = HostPaths {
            root: dir.join("host"),
            cgroup: cgroup.join("pods"),
            bpffs: dir.join("bpffs"),
        };
        let mut node = Node {
            socket: dir.join("containerd.sock"),
            name,
            dir,
            host,
            cgroup,
            containerd: None,
            netns_made: false,
            bpffs_mounted: false,
        };
        node.lay_out()?;
        node.start_containerd()?;
        Ok(node)
    }

    /// Folders, cgroups, the bpffs, the node's netns, containerd's config and the CNI config.
    fn lay_out(&mut self) -> Result<()> {
        for d in [
            "host/etc/cni/net.d",
            "host/opt/cni/bin",
            "host/run",
            "host/var/lib/cni",
            "containerd",
            "pods",
        ] {
            fs::create_dir_all(self.dir.join(d))?;
        }
        for c in [
            &self.cgroup,
            &self.host.cgroup,
            &self.cgroup.join("runtime"),
        ] {
            fs::create_dir(c).with_context(|| format!("creating cgroup {}", c.display()))?;
        }
        fs::create_dir_all(&self.host.bpffs)?;
        run(Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&self.host.bpffs))?;
        self.bpffs_mounted = true;
        run(Command::new("ip").args(["netns", "add", &self.name]))?;
        self.netns_made = true;
        run(Command::new("ip").args(["-n", &self.name, "link", "set", "lo", "up"]))?;
        // The node's CNI plugins: Debian's, as a node's /opt/cni/bin holds them.
        for e in fs::read_dir(CNI_PLUGINS)?.flatten() {
            std::os::unix::fs::symlink(
                e.path(),
                self.host.resolve("/opt/cni/bin").join(e.file_name()),
            )?;
        }
        fs::write(
            self.host
                .resolve("/etc/cni/net.d")
                .join("10-bridge.conflist"),
            self.bridge_conflist(),
        )?;
        fs::write(
            self.dir.join("containerd/config.toml"),
            self.containerd_config(),
        )?;
        Ok(())
    }

    fn bridge_conflist(&self) -> String {
        let ipam_dir = self.host.resolve("/var/lib/cni/networks");
        serde_json::to_string_pretty(&serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "smt-node",
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "gateway": NODE_BRIDGE_IP}]],
                    "dataDir": ipam_dir,
                },
            }],
        }))
        .expect("a JSON value")
    }

    fn containerd_config(&self) -> String {
        let d = self.dir.join("containerd");
        let p = |s: &str| d.join(s).to_string_lossy().into_owned();
        format!(
            r#"# containerd for the node suite: everything under {dir}.
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  # kubelet asks for -998 for sandboxes; lowering a score needs CAP_SYS_RESOURCE, which root
  # may lack on a CI machine: keep scores at or above containerd's own instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
"#,
            dir = self.dir.display(),
            root = p("root"),
            state = p("state"),
            sock = self.socket.display(),
            opt = p("opt"),
            pause = PAUSE_IMAGE,
            cni_bin = self.host.resolve("/opt/cni/bin").display(),
            cni_conf = self.host.resolve("/etc/cni/net.d").display(),
        )
    }

    /// containerd in the node's netns, in a mount namespace whose /run and /var/lib are the
    /// node's folders (so the shims' sockets, runc's state, the pods' netns files,
    /// /run/sockmesh and libcni's cache in /var/lib/cni are the node's, never the machine's),
    /// in the runtime cgroup. The namespace starts as a slave of
    /// the machine's and its mounts are then made shared, as a node's are (systemd does so):
    /// HostToContainer and Bidirectional mounts need that. Nothing propagates back.
    fn start_containerd(&mut self) -> Result<()> {
        let log = fs::File::create(self.dir.join("containerd.log"))?;
        let script = format!(
            "set -e; echo $$ > {procs}; mount --make-rshared /; mount --bind {run} /run; \
             mount --bind {var_lib} /var/lib; exec containerd --config {config}",
            procs = self.cgroup.join("runtime/cgroup.procs").display(),
            run = self.host.resolve("/run").display(),
            var_lib = self.host.resolve("/var/lib").display(),
            config = self.dir.join("containerd/config.toml").display(),
        );
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.name))
            .args([
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "slave",
                "--",
                "sh",
                "-c",
            ])
            .arg(script)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        self.containerd = Some(child);
        let until = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            if let Some(st) = self.containerd.as_mut().unwrap().try_wait()? {
                bail!(
                    "containerd exited ({st}) before serving:\n{}",
                    crate::lab::tail(&self.dir.join("containerd.log"), 30)
                );
            }
            if Instant::now() > until {
                bail!(
                    "containerd did not create {} in 30 s:\n{}",
                    self.socket.display(),
                    crate::lab::tail(&self.dir.join("containerd.log"), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// containerd's log so far (its last `lines`).
    pub fn log(&self, lines: usize) -> String {
        crate::lab::tail(&self.dir.join("containerd.log"), lines)
    }

    /// Import an OCI image archive into the CRI's namespace, as a registry pull would leave it.
    pub fn import(&self, archive: &Path) -> Result<()> {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io", "images", "import"])
            .arg(archive))
        .with_context(|| format!("importing {}", archive.display()))?;
        Ok(())
    }

    /// Tag `from` as `to` too (a second tag of the same image, for an upgrade).
    pub fn tag(&self, from: &str, to: &str) -> Result<()> {
        run(Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args([
                "--namespace",
                "k8s.io",
                "images",
                "tag",
                "--force",
                from,
                to,
            ]))?;
        Ok(())
    }

    /// The node's network namespace (hostNetwork pods, the agent, the bridge).
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    /// A folder for pod `name` (logs, volumes).
    pub fn pod_dir(&self, name: &str) -> Result<PathBuf> {
        let d = self.dir.join("pods").join(name);
        fs::create_dir_all(d.join("logs"))?;
        Ok(d)
    }

    /// The pod's cgroup parent, cgroupfs style.
    pub fn cgroup_parent(&self, pod: &str) -> String {
        format!("/{}/pods/{pod}", self.name)
    }

    /// A command run in the node's network namespace (only its network: the mounts and the
    /// cgroups are the machine's).
    pub fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.netns_path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// An HTTP/1.1 GET from the node's network, as kubelet probes: the status code and body.
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
        let path = path.to_string();
        in_netns(&self.netns_path(), move || http_get(addr, &path))
    }
}

/// Where Debian's containernetworking-plugins are.
const CNI_PLUGINS: &str = "/usr/lib/cni";

/// Run `f` on a thread that has entered the network namespace at `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only, with an fd we own.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
}

fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {out:?}"))?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.to_string()))
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.containerd.take() {
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Shims and every container process: all below the node's cgroup.
        if self.cgroup.exists() {
            let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
        }
        remove_cgroups(&self.name);
        // SAFETY: waitpid on any child, not blocking.
        while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
        if self.netns_made {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
        if self.bpffs_mounted {
            let _ = Command::new("umount").arg(&self.host.bpffs).status();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Remove `name` and everything below it in every cgroup hierarchy (runc makes the pods'
/// cgroups in each v1 controller too), deepest first, waiting for processes to go.
fn remove_cgroups(name: &str) {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for m in mounts.lines() {
        let mut f = m.split_whitespace();
        let (_, dir, ty) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if ty != "cgroup" && ty != "cgroup2" {
            continue;
        }
        let top = Path::new(dir).join(name);
        if !top.exists() {
            continue;
        }
        let mut dirs = Vec::new();
        let mut stack = vec![top];
        while let Some(d) = stack.pop() {
            if let Ok(rd) = fs::read_dir(&d) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
            dirs.push(d);
        }
        // Deepest last in `dirs` order of discovery: remove in reverse.
        for d in dirs.iter().rev() {
            for _ in 0..100 {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

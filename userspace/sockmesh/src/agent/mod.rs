//! `sockmesh agent`, the node agent: load and pin the programs ([`crate::core::loader`]), own
//! the maps, and serve registrations ([`service`] over [`transport`], carried out by [`pods`]
//! with [`routing`]); health and metrics over HTTP ([`metrics`]).

mod accel_contract;
mod guard;
mod kernel_log;
pub mod metrics;
mod pods;
mod routing;
mod service;
mod transport;

use std::{
    fs,
    os::{
        fd::AsFd,
        unix::{
            fs::PermissionsExt,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{bail, Context};
use clap::Args;
use sockmesh_api::pb;
use tracing::{info, warn};

use crate::core::{loader, maps::PinnedMaps, registry, sys};

#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// cgroup v2 directory to attach the programs to (the cgroup2 root on a node; a child
    /// cgroup in tests).
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup: PathBuf,
    /// Folder on a bpf filesystem for pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/sockmesh")]
    pub bpffs: PathBuf,
    /// Unix socket for the registration API; it appears once the agent is ready.
    #[arg(long, default_value = "/run/sockmesh/agent.sock")]
    pub socket: PathBuf,
    /// HTTP address for /metrics (Prometheus), /healthz and /readyz; "off" to disable.
    #[arg(long, default_value = "127.0.0.1:15094")]
    pub metrics: String,
    /// Socket acceleration (sk_msg) of registered pods' local connections, for the whole node;
    /// each pod chooses with SOCKMESH_ACCELERATION at init: proxies (the default: its proxy's
    /// sockets), all (its app's too) or off. Off by default: on current kernels a socket that
    /// receives redirected data and is read with splice(2) sees none of it, and on a socket in
    /// the map FIONREAD counts only redirected data and blocking reads may fail with EAGAIN
    /// early (see docs/operations.md). Needs the kernel's BTF.
    #[arg(long, default_value = "off", value_parser = ["on", "off"])]
    pub acceleration: String,
    /// Time the programs section by section (creator, decision, record, bind, each sock_ops
    /// callback, SO_ORIGINAL_DST's lookup) into the SM_TIMING map, for `cargo xtask profile`
    /// (docs/profile.md). Costs two clock reads per section: a profiling aid, not for
    /// production. Off, the programs carry no timing code (the verifier removes it).
    #[arg(long)]
    pub section_timing: bool,
    /// Live captured connections the original-destination map holds (node-wide; an LRU map).
    /// Beyond it the oldest records are evicted: a proxy that asks for one of those reads its
    /// own listener's address (never another connection's), `orig_dst_lost` counts it and the
    /// agent logs it. Fixed once the map is pinned.
    #[arg(long, default_value_t = sockmesh_common::sizes::ORIG_DST,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub orig_dst_entries: u32,
    /// Pods the node can register: sizes the maps written for pods (SM_PODS, and for each pod
    /// on average 16 set members, 16 CIDR entries, 4 addresses, 4 listening sockets). A
    /// registration that finds a map full is refused whole (RESOURCE_EXHAUSTED, naming the
    /// map). Fixed once the maps are pinned.
    #[arg(long, default_value_t = sockmesh_common::sizes::PODS,
          value_parser = clap::value_parser!(u32)
              .range(1..=i64::from(sockmesh_common::sizes::MAX_PODS)))]
    pub max_pods: u32,
    /// The kernel's BTF (its type information), where the programs' kernel field offsets are
    /// found: those that lead from a socket to its creator (without them, every socket of a
    /// registered pod gets its creator recorded when it is made, a socket storage each) and
    /// those acceleration reads (it needs them).
    #[arg(long, default_value = crate::core::btf::VMLINUX)]
    pub kernel_btf: PathBuf,
}

/// Block SIGTERM/SIGINT in every thread and return a thread that waits for them: on either, it
/// removes the socket and exits, leaving the pinned programs and maps (capture) in place.
fn handle_signals(socket: PathBuf) {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on the calling thread before
    // any other thread is spawned, so every later thread inherits the mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: set is a valid, initialised signal set.
        unsafe { libc::sigwait(&set, &mut sig) };
        info!(
            signal = sig,
            "stopping; programs and maps stay pinned, capture stays in force"
        );
        let _ = fs::remove_file(&socket);
        std::process::exit(0);
    });
}

/// The oldest kernel sockmesh runs on: 5.17 brings `ingress_ifindex` to sk_lookup; the other
/// hooks and helpers it uses (cgroup getsockopt, getpeername, sk_lookup, netns cookies in
/// sock_addr/sockops/sockopt programs, socket storage in cgroup sock programs,
/// SO_NETNS_COOKIE) are older.
pub const KERNEL_FLOOR: (u32, u32) = (5, 17);

/// Parse the leading "MAJOR.MINOR" of a kernel release string.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// The running kernel's version, if sockmesh runs on it.
fn check_kernel() -> anyhow::Result<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    match kernel_version(release) {
        Some(v) if v >= KERNEL_FLOOR => Ok(v),
        Some(_) => bail!(
            "kernel {release} is older than {}.{}, the oldest sockmesh runs on (it needs \
             sk_lookup with ingress_ifindex, cgroup getsockopt/getpeername hooks and netns \
             cookies): upgrade the node's kernel",
            KERNEL_FLOOR.0,
            KERNEL_FLOOR.1
        ),
        None => {
            bail!("cannot read the kernel version from /proc/sys/kernel/osrelease ({release:?})")
        }
    }
}

/// How often the guard checks that what the agent put in force is still in force.
const GUARD_PERIOD: Duration = Duration::from_secs(2);

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    let kernel = check_kernel()?;
    handle_signals(args.socket.clone());
    match sys::raise_nofile() {
        Ok(n) if n < 2 * transport::MAX_CONNECTIONS as u64 + 1024 => {
            warn!(
                limit = n,
                "open-file limit is low: concurrent API callers beyond it wait"
            )
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
    }
    let health = Arc::new(metrics::Health::default());
    if args.metrics != "off" {
        let addr: std::net::SocketAddr = args.metrics.parse().with_context(|| {
            format!(
                "--metrics {}: want an address such as 127.0.0.1:15094, or off",
                args.metrics
            )
        })?;
        let bound = metrics::serve(addr, health.clone())
            .with_context(|| format!("--metrics {addr}: cannot listen"))?;
        info!(%bound, "metrics, liveness and readiness served over HTTP");
    }
    loader::prepare_bpffs(&args.bpffs)?;
    let cgroup = loader::open_cgroup2(&args.cgroup)?;
    let accel = args.acceleration == "on";
    if args.section_timing {
        warn!(
            "--section-timing: the programs time their sections into SM_TIMING, two clock \
             reads per section: for profiling (cargo xtask profile), not for production"
        );
    }
    let settings = loader::LoadSettings {
        accel,
        orig_dst_entries: args.orig_dst_entries,
        max_pods: args.max_pods,
        btf: &args.kernel_btf,
        timing: args.section_timing,
    };
    let mut loaded = loader::load(&args.bpffs, &settings)?;
    kernel_log::forward_kernel_logs(&mut loaded.ebpf);
    let (actions, in_force) = loader::attach_all(&mut loaded, cgroup.as_fd(), &args.bpffs)?;
    let mut ebpf = loaded.ebpf;
    if accel {
        loader::attach_sk_msg(&mut ebpf)?;
        info!("socket acceleration on: local connections of registered pods skip TCP/IP");
        // Where a socket in the map differs from TCP on this kernel (docs/operations.md).
        for w in accel_contract::ALWAYS {
            warn!("socket acceleration: {w}");
        }
        match accel_contract::Fionread::running(kernel) {
            Some(f) => {
                if let Some(w) = f.warning() {
                    warn!("socket acceleration: {w}");
                }
            }
            None => warn!(
                "socket acceleration: cannot tell what FIONREAD counts on this kernel \
                 (/proc/kallsyms unreadable); it may differ from TCP's"
            ),
        }
    } else {
        info!("socket acceleration off (the default; --acceleration on turns it on)");
    }
    for (link, action) in &actions {
        let cgroup = args.cgroup.display();
        match action {
            loader::LinkAction::Created | loader::LinkAction::Updated => {
                info!(link, ?action, %cgroup, "program in force")
            }
            loader::LinkAction::Removed => info!(
                link,
                ?action,
                %cgroup,
                "program not needed with the kernel's BTF: an earlier agent's link dropped"
            ),
        }
    }
    let sk_lookup = loader::load_sk_lookup(&mut ebpf)?;
    let forward = loader::load_forward(&mut ebpf)?;
    let (updated, gone) = loader::update_netns_links(sk_lookup.as_fd(), &args.bpffs)?;
    let forward_updated = loader::update_forward_links(&forward, &args.bpffs)?;
    if forward_updated > 0 {
        info!(
            links = forward_updated,
            "-k interface programs of registered pods replaced in place"
        );
    }
    if updated > 0 {
        info!(
            pods = updated,
            "inbound programs of registered pods replaced in place"
        );
    }
    let mut maps = PinnedMaps::open(&args.bpffs)?;
    for netns in gone {
        let _ = registry::unregister(&mut maps, netns);
        info!(%netns, "forgot a pod whose network namespace is gone");
    }
    // From here on, what the maps hold for each pod is what the agent wrote.
    maps.track();
    // Loading parsed the object's and the kernel's BTF (several MiB, freed since); the
    // allocator would otherwise keep those pages for the agent's whole life.
    // SAFETY: malloc_trim only hands free heap memory back to the system.
    unsafe { libc::malloc_trim(0) };
    let maps = Arc::new(Mutex::new(maps));
    *health.maps.lock().expect("lock") = Some(maps.clone());
    let state = Arc::new(pods::State {
        maps,
        own_netns: sys::current_netns_cookie()?,
        bpffs: args.bpffs.clone(),
        sk_lookup,
        forward,
    });
    pods::sweeper(state.clone(), Duration::from_secs(10));

    let listener = bind_socket(&args.socket)?;
    guard::spawn(
        guard::Guard {
            socket_ino: std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&args.socket)?),
            socket: args.socket.clone(),
            cgroup: cgroup.into(),
            in_force,
            bpffs: args.bpffs.clone(),
            maps: state.maps.clone(),
            repairs: health.repairs.clone(),
        },
        GUARD_PERIOD,
    );
    health
        .ready
        .store(true, std::sync::atomic::Ordering::SeqCst);
    info!(socket = %args.socket.display(), bpffs = %args.bpffs.display(), "agent ready");
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        tonic::transport::Server::builder()
            .timeout(Duration::from_secs(30))
            .concurrency_limit_per_connection(16)
            .add_service(pb::agent_server::AgentServer::new(service::Api { state }))
            .serve_with_incoming(transport::incoming(listener))
            .await
            .context("serving the registration API")
    })?;
    Ok(())
}

/// Bind under a temporary name and rename into place, so the socket path exists only once the
/// agent accepts connections.
fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        match UnixStream::connect(path) {
            Ok(_) => bail!(
                "another agent is already serving {}: stop it first or pass another --socket",
                path.display()
            ),
            Err(_) => fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))?,
        }
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).with_context(|| format!("binding {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o660))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_floor() {
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(kernel_version("5.4.0-150-generic"), Some((5, 4)));
        assert!(kernel_version("5.4.0").unwrap() < KERNEL_FLOOR);
        assert!(kernel_version("5.17.1").unwrap() >= KERNEL_FLOOR);
        assert_eq!(kernel_version("garbage"), None);
        assert_eq!(kernel_version("7.2.0"), Some((7, 2)));
        assert_eq!(kernel_version("7"), None);
    }
}

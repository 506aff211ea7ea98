//! `sockmesh agent`: load and pin the programs, own the maps, serve registrations.

use std::{
    fs,
    net::IpAddr,
    os::{
        fd::{AsFd, BorrowedFd, OwnedFd},
        unix::{
            fs::PermissionsExt,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
};

use anyhow::{bail, Context};
use clap::Args;
use sockmesh_common::{flags, MemberKind, PodConfig};
use tonic::Status;
use tracing::{info, warn};

use crate::{
    api::{self, pb, Caller},
    bpf::{self, PinnedMaps},
    registry,
    spec::PodSpec,
    sys,
};

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
}

struct State {
    maps: Arc<Mutex<PinnedMaps>>,
    own_netns: u64,
    bpffs: PathBuf,
    /// The loaded sk_lookup program, attached to each pod netns with inbound capture.
    sk_lookup: OwnedFd,
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

/// aya-log records of the kernel programs, as tracing events with target "kernel".
struct KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let msg = r.args();
        match r.level() {
            log::Level::Error => tracing::error!(target: "kernel", "{msg}"),
            log::Level::Warn => tracing::warn!(target: "kernel", "{msg}"),
            log::Level::Info => tracing::info!(target: "kernel", "{msg}"),
            log::Level::Debug | log::Level::Trace => tracing::debug!(target: "kernel", "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Read the programs' log ring buffer in a thread and forward each record to tracing. Only this
/// load's programs write to it: after a restart the previous agent's records are not read.
fn forward_kernel_logs(ebpf: &mut aya::Ebpf) {
    let mut logger = match aya_log::EbpfLogger::init_with_logger(ebpf, KernelLog) {
        Ok(l) => l,
        Err(e) => {
            warn!(error = %e, "kernel-side logs are not forwarded");
            return;
        }
    };
    std::thread::spawn(move || loop {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: logger.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        // A record aya-log cannot decode must not end forwarding.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush())).is_err() {
            warn!("a kernel log record could not be decoded");
        }
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

fn check_kernel() -> anyhow::Result<()> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    match kernel_version(release) {
        Some(v) if v >= KERNEL_FLOOR => Ok(()),
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

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    check_kernel()?;
    handle_signals(args.socket.clone());
    match sys::raise_nofile() {
        Ok(n) if n < 2 * api::MAX_CONNECTIONS as u64 + 1024 => {
            warn!(
                limit = n,
                "open-file limit is low: concurrent API callers beyond it wait"
            )
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
    }
    let health = Arc::new(crate::metrics::Health::default());
    if args.metrics != "off" {
        let addr: std::net::SocketAddr = args.metrics.parse().with_context(|| {
            format!(
                "--metrics {}: want an address such as 127.0.0.1:15094, or off",
                args.metrics
            )
        })?;
        let bound = crate::metrics::serve(addr, health.clone())
            .with_context(|| format!("--metrics {addr}: cannot listen"))?;
        info!(%bound, "metrics, liveness and readiness served over HTTP");
    }
    bpf::prepare_bpffs(&args.bpffs)?;
    let cgroup = bpf::open_cgroup2(&args.cgroup)?;
    let accel = args.acceleration == "on";
    let mut ebpf = bpf::load(&args.bpffs, accel)?;
    forward_kernel_logs(&mut ebpf);
    let actions = bpf::attach_all(&mut ebpf, cgroup.as_fd(), &args.bpffs)?;
    if accel {
        bpf::attach_sk_msg(&mut ebpf)?;
        info!("socket acceleration on: local connections of registered pods skip TCP/IP");
    } else {
        info!("socket acceleration off (the default; --acceleration on turns it on)");
    }
    for (link, action) in &actions {
        info!(link, ?action, cgroup = %args.cgroup.display(), "program in force");
    }
    let sk_lookup = bpf::load_sk_lookup(&mut ebpf)?;
    let (updated, gone) = bpf::update_netns_links(sk_lookup.as_fd(), &args.bpffs)?;
    if updated > 0 {
        info!(
            pods = updated,
            "inbound programs of registered pods replaced in place"
        );
    }
    let mut maps = PinnedMaps::open(&args.bpffs)?;
    for netns in gone {
        let _ = registry::unregister(&mut maps, netns);
        info!(netns, "forgot a pod whose network namespace is gone");
    }
    // Loading parsed the object's and the kernel's BTF (several MiB, freed since); the
    // allocator would otherwise keep those pages for the agent's whole life.
    // SAFETY: malloc_trim only hands free heap memory back to the system.
    unsafe { libc::malloc_trim(0) };
    let maps = Arc::new(Mutex::new(maps));
    *health.maps.lock().expect("lock") = Some(maps.clone());
    let state = Arc::new(State {
        maps,
        own_netns: sys::current_netns_cookie()?,
        bpffs: args.bpffs.clone(),
        sk_lookup,
    });
    sweeper(state.clone(), std::time::Duration::from_secs(10));
    let listener = bind_socket(&args.socket)?;
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
            .timeout(std::time::Duration::from_secs(30))
            .concurrency_limit_per_connection(16)
            .add_service(pb::agent_server::AgentServer::new(Api { state }))
            .serve_with_incoming(api::incoming(listener))
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

/// The gRPC service: each call acts on the network namespace its connection's preamble carried.
struct Api {
    state: Arc<State>,
}

fn caller<T>(req: &tonic::Request<T>) -> Caller {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(|| Caller {
            netns: None,
            peer: "unknown".into(),
        })
}

/// Run `f` (map writes, netlink) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<tonic::Response<T>, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map(tonic::Response::new),
        Err(e) => Err(Status::internal(format!("request handler failed: {e}"))),
    }
}

fn refused(peer: &str, status: Status) -> Status {
    warn!(peer, code = ?status.code(), error = status.message(), "request refused");
    status
}

impl Api {
    /// Register, or with `existing_only` update, the caller's pod.
    async fn apply(
        &self,
        req: tonic::Request<pb::RegisterRequest>,
        existing_only: bool,
    ) -> Result<tonic::Response<pb::PodReply>, Status> {
        let caller = caller(&req);
        let settings = req.into_inner().settings.ok_or_else(|| {
            refused(
                &caller.peer,
                Status::invalid_argument("settings: missing (RegisterRequest.settings)"),
            )
        })?;
        let spec = PodSpec::try_from(settings)
            .and_then(|s| s.validate().map(|()| s))
            .map_err(|e| {
                refused(
                    &caller.peer,
                    Status::invalid_argument(format!("invalid settings: {e}")),
                )
            })?;
        let state = self.state.clone();
        blocking(move || {
            let (netns, fd) = pod_netns(&state, &caller).map_err(|s| refused(&caller.peer, s))?;
            if existing_only {
                let maps = state.maps.lock().expect("maps lock");
                if registry::config(&maps, netns).is_none() {
                    return Err(refused(
                        &caller.peer,
                        Status::not_found(format!(
                            "netns cookie {netns} is not registered: Register it first"
                        )),
                    ));
                }
            }
            register(&state, netns, fd.as_fd(), &spec)
                .map_err(|e| refused(&caller.peer, Status::failed_precondition(e)))?;
            let what = if existing_only {
                "pod updated"
            } else {
                "pod registered"
            };
            info!(peer = caller.peer, netns, "{what}");
            Ok(pb::PodReply {
                netns_cookie: netns,
                registered: true,
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for Api {
    async fn register(
        &self,
        req: tonic::Request<pb::RegisterRequest>,
    ) -> Result<tonic::Response<pb::PodReply>, Status> {
        self.apply(req, false).await
    }

    async fn update(
        &self,
        req: tonic::Request<pb::RegisterRequest>,
    ) -> Result<tonic::Response<pb::PodReply>, Status> {
        self.apply(req, true).await
    }

    async fn unregister(
        &self,
        req: tonic::Request<pb::UnregisterRequest>,
    ) -> Result<tonic::Response<pb::PodReply>, Status> {
        let caller = caller(&req);
        let state = self.state.clone();
        blocking(move || {
            let (netns, fd) = pod_netns(&state, &caller).map_err(|s| refused(&caller.peer, s))?;
            let mut maps = state.maps.lock().expect("maps lock");
            let before = registry::config(&maps, netns);
            let result = registry::unregister(&mut maps, netns);
            bpf::detach_netns(&state.bpffs, netns);
            if let Some(c) = before.filter(|c| c.has(flags::TPROXY)) {
                let _ = tproxy_routing(
                    fd.as_fd(),
                    c.tproxy_mark,
                    c.tproxy_table,
                    c.has(flags::IPV6),
                    false,
                );
            }
            let was = result.map_err(|e| refused(&caller.peer, Status::internal(e.to_string())))?;
            info!(
                peer = caller.peer,
                netns,
                was_registered = was,
                "pod unregistered"
            );
            Ok(pb::PodReply {
                netns_cookie: netns,
                registered: false,
            })
        })
        .await
    }

    async fn status(
        &self,
        req: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::PodReply>, Status> {
        let caller = caller(&req);
        let state = self.state.clone();
        blocking(move || {
            if caller.netns.is_none() {
                return Ok(pb::PodReply::default());
            }
            let (netns, _) = pod_netns(&state, &caller)?;
            let maps = state.maps.lock().expect("maps lock");
            Ok(pb::PodReply {
                netns_cookie: netns,
                registered: registry::config(&maps, netns).is_some(),
            })
        })
        .await
    }

    async fn list(
        &self,
        _req: tonic::Request<pb::ListRequest>,
    ) -> Result<tonic::Response<pb::ListReply>, Status> {
        let state = self.state.clone();
        blocking(move || {
            let maps = state.maps.lock().expect("maps lock");
            let netns_cookies = registry::pods(&maps)
                .map_err(|e| Status::internal(format!("reading the pods map: {e}")))?;
            Ok(pb::ListReply { netns_cookies })
        })
        .await
    }
}

/// The caller's pod: its netns cookie and fd, from the connection's preamble.
fn pod_netns(state: &State, caller: &Caller) -> Result<(u64, Arc<OwnedFd>), Status> {
    let fd = caller.netns.clone().ok_or_else(|| {
        Status::unauthenticated(
            "no network namespace fd came with the connection's preamble (send \
             /proc/self/ns/net with SCM_RIGHTS; sockmesh init does)",
        )
    })?;
    if !sys::is_netns_fd(&*fd) {
        return Err(Status::unauthenticated(
            "the fd sent with the preamble is not a network namespace",
        ));
    }
    let cookie = sys::netns_cookie(fd.as_fd()).map_err(|e| Status::internal(e.to_string()))?;
    if cookie == state.own_netns {
        return Err(Status::permission_denied(
            "refusing to capture the agent's own network namespace (the node's): only pod \
             namespaces can be registered",
        ));
    }
    Ok((cookie, fd))
}

fn register(state: &State, netns: u64, fd: BorrowedFd<'_>, spec: &PodSpec) -> Result<(), String> {
    spec.validate()
        .map_err(|e| format!("invalid settings: {e}"))?;
    let mut spec = spec.clone();
    // Interface indexes and routes come from the pod's netns, never from the caller.
    spec.members
        .retain(|(k, _)| !matches!(k, MemberKind::ExcludedIfindex | MemberKind::KubeVirtIfindex));
    spec.routes.clear();
    spec.route_sources.clear();
    spec.config.src_v4 = [0; 4];
    spec.config.src_v6 = [0; 16];
    let view = read_pod(fd, &spec)?;
    let addrs: Vec<IpAddr> = view.addrs.iter().map(|a| a.ip).collect();
    // The pod's primary addresses, by istio's rule (first non-loopback, non-link-local), read
    // here rather than trusted from the caller.
    if let Some(IpAddr::V4(v4)) = addrs
        .iter()
        .filter(|a| registry::routable(a))
        .find(|a| a.is_ipv4())
    {
        spec.config.src_v4 = v4.octets();
    }
    if let Some(IpAddr::V6(v6)) = addrs
        .iter()
        .filter(|a| registry::routable(a))
        .find(|a| a.is_ipv6())
    {
        spec.config.src_v6 = v6.octets();
    }
    // -c / -k: interface indexes, and for -c the routes that leave through them.
    for (names, kind) in [
        (&spec.exclude_ifaces, MemberKind::ExcludedIfindex),
        (&spec.kube_virt_ifaces, MemberKind::KubeVirtIfindex),
    ] {
        for name in names {
            let flag = kind.istio_name();
            let idx = view
                .ifindex
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, i)| *i)
                .ok_or_else(|| format!("{flag} {name}: the pod has no interface of that name"))?;
            spec.members.push((kind, idx));
        }
    }
    if spec.config.has(flags::EXCLUDE_IFACES) {
        spec.routes = view
            .routes
            .iter()
            .map(|r| (r.dst, spec.exclude_ifaces.contains(&r.dev)))
            .collect();
    }
    // Each route's source address: its own `src`, else the first usable address of its device
    // in that family (the kernel's choice for a single-address interface).
    spec.route_sources = view
        .routes
        .iter()
        .filter_map(|r| {
            let src = r.prefsrc.or_else(|| {
                view.addrs
                    .iter()
                    .find(|a| {
                        a.ifname == r.dev
                            && a.ip.is_ipv6() == r.dst.is_v6()
                            && registry::routable(&a.ip)
                    })
                    .map(|a| a.ip)
            })?;
            Some((r.dst, src))
        })
        .collect();
    let mut maps = state.maps.lock().expect("maps lock");
    let before = registry::config(&maps, netns);
    // Inbound capture: the sk_lookup program in the pod's netns (idempotent), before the maps
    // that turn it on for this pod.
    // The sk_lookup program goes into every registered pod's netns, inbound capture or not: its
    // link also tells the agent when the namespace is gone (see `sweep`).
    let action = bpf::attach_netns(state.sk_lookup.as_fd(), fd, &state.bpffs, netns)
        .map_err(|e| format!("attaching to the pod's netns: {e}"))?;
    let attached_now = action == bpf::LinkAction::Created;
    let mut result = registry::register(&mut maps, netns, &spec, &addrs);
    if matches!(result, Err(registry::RegistryError::AddressTaken { .. })) {
        // The address may belong to a pod that is gone: forget those and try again.
        sweep_locked(&state.bpffs, &mut maps);
        result = registry::register(&mut maps, netns, &spec, &addrs);
    }
    if let Err(e) = result {
        if attached_now {
            bpf::detach_netns(&state.bpffs, netns);
        }
        return Err(e.to_string());
    }
    // TPROXY routing: the previous settings' rule and route go, the new ones come. If that
    // fails, the registration is undone, so the pod is captured completely or not at all.
    let c = spec.config;
    let routing = |c: &PodConfig| (c.tproxy_mark, c.tproxy_table, c.has(flags::IPV6));
    if let Some(old) = before.filter(|o| o.has(flags::TPROXY)) {
        if !c.has(flags::TPROXY) || routing(&old) != routing(&c) {
            let (m, t, v6) = routing(&old);
            let _ = tproxy_routing(fd, m, t, v6, false);
        }
    }
    if c.has(flags::TPROXY) {
        let (m, t, v6) = routing(&c);
        if let Err(e) = tproxy_routing(fd, m, t, v6, true) {
            let _ = tproxy_routing(fd, m, t, v6, false);
            let _ = registry::unregister(&mut maps, netns);
            bpf::detach_netns(&state.bpffs, netns);
            return Err(format!("{e}; the pod was not registered"));
        }
    }
    Ok(())
}

/// Forget pods whose network namespace is gone (their registration, counters and link).
fn sweep_locked(bpffs: &std::path::Path, maps: &mut PinnedMaps) {
    match bpf::dead_pods(bpffs) {
        Ok(gone) => {
            for netns in gone {
                let _ = registry::unregister(maps, netns);
                info!(netns, "forgot a pod whose network namespace is gone");
            }
        }
        Err(e) => warn!(error = %e, "checking for pods that are gone failed"),
    }
}

/// Sweep every `period`, for as long as the agent runs.
fn sweeper(state: Arc<State>, period: std::time::Duration) {
    std::thread::spawn(move || loop {
        std::thread::sleep(period);
        let mut maps = state.maps.lock().expect("maps lock");
        sweep_locked(&state.bpffs, &mut maps);
    });
}

/// What the agent reads inside a pod's netns at registration.
struct PodView {
    addrs: Vec<sys::InterfaceAddr>,
    ifindex: Vec<(String, u32)>,
    routes: Vec<sys::Route>,
}

/// In the pod's netns: add ::6 to lo when IPv6 capture is on (as istio-iptables does, so the
/// proxy can bind its inbound passthrough source), then read the pod's addresses, the indexes
/// of the `-c`/`-k` interfaces, and (for `-c`) its routes.
fn read_pod(fd: BorrowedFd<'_>, spec: &PodSpec) -> Result<PodView, String> {
    let ipv6 = spec.config.has(flags::IPV6);
    let names: Vec<String> = spec
        .exclude_ifaces
        .iter()
        .chain(&spec.kube_virt_ifaces)
        .cloned()
        .collect();
    sys::in_netns(fd, move || -> Result<PodView, String> {
        if ipv6 {
            add_v6_passthrough()?;
        }
        let addrs = sys::interface_addrs().map_err(|e| e.to_string())?;
        let ifindex = names
            .into_iter()
            .filter_map(|n| sys::ifindex(&n).map(|i| (n, i)))
            .collect();
        Ok(PodView {
            addrs,
            ifindex,
            routes: sys::main_routes()?,
        })
    })
    .map_err(|e| e.to_string())?
}

/// Run `ip ARGS` in the calling thread's netns.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip (iproute2) failed: {e}; install iproute2"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// TPROXY mode's routing in the pod's netns, as istio-iptables sets it up: packets with the
/// TPROXY mark are delivered locally (`ip rule fwmark M lookup T`, `local default dev lo` in
/// T), so the app's replies to the proxy's original-source connections come back to it. The
/// mark reaches those replies through `net.ipv4.tcp_fwmark_accept` (the app's accepted socket
/// takes the mark of the proxy's SYN) instead of iptables' CONNMARK rules.
fn tproxy_routing(
    fd: BorrowedFd<'_>,
    mark: u32,
    table: u32,
    ipv6: bool,
    on: bool,
) -> Result<(), String> {
    sys::in_netns(fd, move || -> Result<(), String> {
        let (m, t) = (mark.to_string(), table.to_string());
        let mut families = vec![("-4", "0.0.0.0/0")];
        if ipv6 {
            families.push(("-6", "::/0"));
        }
        for (f, any) in families {
            // Idempotent: drop an earlier copy of the rule first.
            let _ = ip(&[f, "rule", "del", "fwmark", &m, "lookup", &t]);
            if on {
                ip(&[f, "rule", "add", "fwmark", &m, "lookup", &t])?;
                ip(&[
                    f, "route", "replace", "local", any, "dev", "lo", "table", &t,
                ])?;
            } else {
                let _ = ip(&[f, "route", "del", "local", any, "dev", "lo", "table", &t]);
            }
        }
        std::fs::write(
            "/proc/sys/net/ipv4/tcp_fwmark_accept",
            if on { "1" } else { "0" },
        )
        .map_err(|e| format!("setting net.ipv4.tcp_fwmark_accept in the pod: {e}"))?;
        Ok(())
    })
    .map_err(|e| e.to_string())?
}

/// `ip -6 addr replace ::6/128 dev lo`, run in the calling thread's netns.
fn add_v6_passthrough() -> Result<(), String> {
    let out = Command::new("ip")
        .args(["-6", "addr", "replace", "::6/128", "dev", "lo"])
        .output()
        .map_err(|e| {
            format!("running ip (iproute2) to add ::6 to lo failed: {e}; install iproute2")
        })?;
    if !out.status.success() {
        return Err(format!(
            "adding ::6/128 to lo failed: {} (is IPv6 disabled in the pod?)",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
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
    }
}

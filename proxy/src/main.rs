//! The `sockmesh-proxy` binary: command line, privileges, reload and hot restart around the
//! library's listeners.

use sockmesh_proxy::{admin, config, control, listener, restart, upstream, xds};
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, Mutex},
};

use clap::Parser;
use tracing::{error, info, warn};

/// mimalloc rather than the C library's malloc: every new connection allocates tokio's task
/// and I/O registration (cache-line aligned, which glibc serves only on its slow path) and
/// hyper's buffers, and frees them at its end (`cargo xtask profile`). See `alloc`.
#[global_allocator]
static ALLOCATOR: sockmesh_proxy::alloc::MiMalloc = sockmesh_proxy::alloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "sockmesh's sidecar proxy")]
struct Args {
    /// The configuration file (YAML; see proxy/README.md). Reloaded on SIGHUP.
    #[arg(long, short)]
    config: PathBuf,
    /// Run as this uid after binding (if started as root); the capture rules exempt it.
    #[arg(long, default_value = "1337")]
    uid: u32,
    /// Run as this gid after binding (if started as root).
    #[arg(long, default_value = "1337")]
    gid: u32,
    /// Threads serving connections. One (the default, as linkerd2-proxy) runs everything,
    /// the control loop included, on one event loop in the process's only thread: no wakeups
    /// across threads, and no other thread shares the file table, so the kernel need not
    /// count references to a socket's file at each system call. More spread the work over
    /// cores.
    #[arg(long, default_value = "1", value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
    /// Hot restart through this Unix socket: a proxy started with the same path takes this
    /// one's listening sockets, and this one then stops accepting, drains and exits.
    #[arg(long)]
    hot_restart: Option<PathBuf>,
    /// Seconds a draining proxy waits for its connections to end before it exits: one replaced
    /// by a hot restart, or sent SIGTERM or SIGINT (as when its pod is deleted: it stops
    /// accepting inbound, serves outbound for at least 5 s, and exits once no connection is
    /// left; a second signal ends the wait at once).
    #[arg(long, default_value = "30")]
    drain_timeout: u64,
}

/// Become uid/gid (groups dropped) when running as root.
fn drop_privileges(uid: u32, gid: u32) -> anyhow::Result<()> {
    // SAFETY: plain libc calls on the process's credentials.
    unsafe {
        if libc::geteuid() != 0 {
            return Ok(());
        }
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(uid) != 0
        {
            anyhow::bail!(
                "dropping to uid {uid} gid {gid}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// The sections of the file that change only with a restart.
fn restart_only(c: &config::Config) -> (Option<config::XdsSettings>, Option<SocketAddr>) {
    (c.xds.clone(), c.admin.as_ref().map(|a| a.address))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = config::Config::load(&args.config)?;
    // A proxy already serving the hot-restart path hands over its listening sockets.
    let (mut inherited, predecessor) = match &args.hot_restart {
        Some(path) => match restart::take_over(path)
            .map_err(|e| anyhow::anyhow!("hot restart through {}: {e}", path.display()))?
        {
            Some((inherited, old)) => (inherited, Some(old)),
            None => (Default::default(), None),
        },
        None => (Default::default(), None),
    };
    let admin_taken = config
        .admin
        .as_ref()
        .and_then(|a| inherited.remove(&a.address));
    let mut control = control::Control::new(config.clone(), inherited);
    // The file's listeners are bound before privileges go, and served only after: nothing
    // (a request's upstream connection, a health check) may connect as root, which capture
    // does not exclude. Later listeners (from a reload or the control plane) are bound as the
    // proxy's user.
    control.bind_file_listeners()?;
    let successor = match &args.hot_restart {
        Some(path) => Some(
            restart::bind(path)
                .map_err(|e| anyhow::anyhow!("hot restart: binding {}: {e}", path.display()))?,
        ),
        None => None,
    };
    drop_privileges(args.uid, args.gid)?;
    control.start()?;
    let shared = control.shared();
    tokio::spawn(upstream::reap_idle());
    let control = Arc::new(Mutex::new(control));
    let started = restart_only(&config);
    if let Some(x) = &config.xds {
        info!(
            address = x.address,
            node = x.node_id,
            "following a control plane (ADS)"
        );
        tokio::spawn(xds::run(x.clone(), control.clone()));
    }
    let mut admin_fd = None;
    if let Some(admin) = &config.admin {
        let l = match admin_taken {
            Some(l) => l
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpListener::from_std(l)),
            None => tokio::net::TcpListener::bind(admin.address).await,
        }
        .map_err(|e| anyhow::anyhow!("admin {}: {e}", admin.address))?;
        admin_fd = Some((admin.address, std::os::fd::AsRawFd::as_raw_fd(&l)));
        info!(address = %admin.address, "admin endpoint");
        tokio::spawn(admin::serve(l, shared.clone()));
    }
    println!("ready");
    let (drain_tx, mut drain_rx) = tokio::sync::mpsc::channel::<()>(1);
    if let Some(old) = predecessor {
        restart::taken(old)?;
        info!("took over the listening sockets of the running proxy");
    }
    if let Some(l) = successor {
        let control = control.clone();
        tokio::spawn(async move {
            let current = || {
                let mut v = control.lock().expect("control lock").listening();
                v.extend(admin_fd);
                v
            };
            match restart::wait_for_successor(&l, current).await {
                Ok(()) => {
                    let _ = drain_tx.send(()).await;
                }
                Err(e) => warn!("hot restart: {e}"),
            }
        });
    }
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    // SIGTERM (a pod being deleted) or SIGINT: drain and exit; a second one: exit at once.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let limit = std::time::Duration::from_secs(args.drain_timeout);
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = modified(&args.config);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        // SIGHUP, or the file changed (checked every second).
        tokio::select! {
            Some(()) = drain_rx.recv() => {
                drain(&control, limit).await;
                return Ok(());
            }
            _ = term.recv() => {
                drain_or_quit(&control, limit, "SIGTERM", &mut term, &mut int).await;
                return Ok(());
            }
            _ = int.recv() => {
                drain_or_quit(&control, limit, "SIGINT", &mut term, &mut int).await;
                return Ok(());
            }
            _ = hup.recv() => {}
            _ = tick.tick() => {
                let now = modified(&args.config);
                if now == seen {
                    continue;
                }
                seen = now;
            }
        }
        match reload(&args.config, &control, &started) {
            Ok(()) => info!(config = %args.config.display(), "configuration reloaded"),
            Err(e) => warn!("configuration not reloaded, the previous one stays: {e}"),
        }
    }
}

/// How long a proxy asked to stop serves at least, whether connections are left or not (as
/// istio's MINIMUM_DRAIN_DURATION): the app, sent the same signal, may still call out.
const MIN_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Asked to stop (`why`: SIGTERM or SIGINT, its pod is going away): stop accepting inbound,
/// keep serving outbound, and exit once no connection is left (after [`MIN_DRAIN`]) or at
/// `limit`, unless SIGTERM or SIGINT comes again, which ends the wait at once.
async fn drain_or_quit(
    control: &Mutex<control::Control>,
    limit: std::time::Duration,
    why: &str,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) {
    control.lock().expect("control lock").stop_inbound();
    info!(connections = active(), "{why}: inbound closed, draining");
    let wait = async {
        tokio::time::sleep(MIN_DRAIN.min(limit)).await;
        wait_idle(limit.saturating_sub(MIN_DRAIN)).await;
    };
    tokio::select! {
        () = wait => info!(left = active(), "drained: exiting"),
        _ = term.recv() => warn!(left = active(), "SIGTERM again: exiting now"),
        _ = int.recv() => warn!(left = active(), "SIGINT again: exiting now"),
    }
}

/// Wait for the connections there are to end, at most `limit`.
async fn wait_idle(limit: std::time::Duration) {
    let until = tokio::time::Instant::now() + limit;
    while active() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Connections accepted and not yet ended.
fn active() -> usize {
    listener::ACTIVE.load(std::sync::atomic::Ordering::SeqCst)
}

/// A successor serves: stop accepting, and wait for the connections there are to end (at most
/// `limit`).
async fn drain(control: &Mutex<control::Control>, limit: std::time::Duration) {
    control.lock().expect("control lock").stop_accepting();
    info!(connections = active(), "replaced: draining");
    wait_idle(limit).await;
    info!(left = active(), "drained: exiting");
}

/// Load the file again and put it in force with the control plane's resources. A bad file (or
/// listeners that cannot be bound) is refused and the running configuration kept. Established
/// connections keep the configuration they started with.
fn reload(
    path: &Path,
    control: &Mutex<control::Control>,
    started: &(Option<config::XdsSettings>, Option<SocketAddr>),
) -> anyhow::Result<()> {
    let c = config::Config::load(path)?;
    let mut control = control.lock().expect("control lock");
    if restart_only(&c) != *started {
        warn!("the xds and admin sections change only with a restart");
    }
    control.set_file(c)?;
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SOCKMESH_PROXY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file or a collector gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    // One worker: tokio's current-thread scheduler on this thread, so the process has no
    // other (the hot-restart wait and the config watch are tasks on it). In six runs each of
    // the bench's proxy section it cost no more CPU per request than one worker of the
    // multi-threaded scheduler beside this thread, in every role, and less in most.
    let rt = if args.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers.into())
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            error!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sockmesh-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

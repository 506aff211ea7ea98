//! Listeners and connections: original destination, protocol detection, HTTP routing and
//! forwarding, TCP relaying.

use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::Incoming,
    header::{HeaderName, HeaderValue, HOST},
    Request, Response, StatusCode, Uri,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::{
    balancer::{hash_bytes, Balancer},
    config::{Cluster, Config, Direction, HashPolicy},
    router::Router,
    stats,
};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// The source of inbound passthrough connections to the app, as Istio's Envoy uses: the
/// capture rules let traffic from these addresses through.
pub const INBOUND_SOURCE_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);
pub const INBOUND_SOURCE_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Address of the connection before capture rewrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDstAddr(pub SocketAddr);

/// The downstream peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// A cluster, its balancer, and its passive health and retry accounting. It outlives a reload
/// that leaves the cluster as it was, or changes only its endpoints (EDS): balancer state,
/// health and counters carry over.
pub struct ClusterState {
    /// The cluster's settings; its endpoints are in the balancer (the list here is empty).
    pub config: Cluster,
    pub balancer: Balancer,
    probing: std::sync::atomic::AtomicBool,
    /// One permit per request in flight (`max_requests`).
    slots: tokio::sync::Semaphore,
    /// Requests waiting for a permit (`max_pending_requests`).
    pending: std::sync::atomic::AtomicU64,
    outliers: std::sync::Mutex<HashMap<SocketAddr, Outlier>>,
    probes: std::sync::Mutex<HashMap<SocketAddr, Probe>>,
    connections: std::sync::atomic::AtomicU64,
    active: std::sync::atomic::AtomicU64,
    retrying: std::sync::atomic::AtomicU64,
}

/// Active health of one endpoint: healthy until `unhealthy_threshold` probes fail in a row.
struct Probe {
    healthy: bool,
    fails: u32,
    passes: u32,
}

#[derive(Default)]
struct Outlier {
    consecutive_5xx: u32,
    ejections: u32,
    until: Option<std::time::Instant>,
}

/// Decrements a counter when dropped.
pub struct Gauge<'a>(&'a std::sync::atomic::AtomicU64);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl ClusterState {
    fn new(config: &Cluster) -> ClusterState {
        ClusterState {
            balancer: Balancer::new(config.policy(), config.endpoint_list()),
            config: Cluster {
                endpoints: Vec::new(),
                ..config.clone()
            },
            probing: Default::default(),
            slots: tokio::sync::Semaphore::new(
                (config.circuit_breakers.max_requests as usize)
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            ),
            pending: Default::default(),
            outliers: Default::default(),
            probes: Default::default(),
            connections: Default::default(),
            active: Default::default(),
            retrying: Default::default(),
        }
    }

    /// Whether `addr` may get traffic: not ejected, not failing its active health check.
    pub fn usable(&self, addr: SocketAddr) -> bool {
        !self.ejected(addr) && !self.failing_health_check(addr)
    }

    pub fn failing_health_check(&self, addr: SocketAddr) -> bool {
        self.probes
            .lock()
            .expect("probes lock")
            .get(&addr)
            .is_some_and(|p| !p.healthy)
    }

    /// Count a probe; flip the endpoint's health at the thresholds.
    fn probed(&self, addr: SocketAddr, ok: bool, hc: &crate::config::HealthCheck) {
        let mut map = self.probes.lock().expect("probes lock");
        let p = map.entry(addr).or_insert(Probe {
            healthy: true,
            fails: 0,
            passes: 0,
        });
        if ok {
            p.fails = 0;
            p.passes += 1;
            if !p.healthy && p.passes >= hc.healthy_threshold {
                p.healthy = true;
                info!(cluster = self.config.name, endpoint = %addr, "endpoint passes its health check");
            }
        } else {
            p.passes = 0;
            p.fails += 1;
            if p.healthy && p.fails >= hc.unhealthy_threshold {
                p.healthy = false;
                warn!(cluster = self.config.name, endpoint = %addr, "endpoint fails its health check");
            }
        }
    }

    /// Whether passive health checking has ejected `addr` for now.
    pub fn ejected(&self, addr: SocketAddr) -> bool {
        let now = std::time::Instant::now();
        self.outliers
            .lock()
            .expect("outliers lock")
            .get(&addr)
            .and_then(|o| o.until)
            .is_some_and(|t| now < t)
    }

    /// Count an attempt's outcome; eject after `consecutive_5xx` failures in a row.
    fn record(&self, addr: SocketAddr, outcome: &Result<Response<Body>, Failure>) {
        let Some(od) = &self.config.outlier_detection else {
            return;
        };
        let bad = match outcome {
            Ok(r) => r.status().is_server_error(),
            Err(_) => true,
        };
        let mut map = self.outliers.lock().expect("outliers lock");
        let now = std::time::Instant::now();
        let ejected_now = map
            .values()
            .filter(|o| o.until.is_some_and(|t| now < t))
            .count();
        let o = map.entry(addr).or_default();
        if !bad {
            o.consecutive_5xx = 0;
            return;
        }
        o.consecutive_5xx += 1;
        let total = self.balancer.endpoints().len().max(1);
        let under_cap = ejected_now * 100 / total < od.max_ejection_percent as usize;
        if o.consecutive_5xx >= od.consecutive_5xx && under_cap {
            o.ejections += 1;
            o.consecutive_5xx = 0;
            let time = od.base_ejection_time_ms * o.ejections as u64;
            o.until = Some(now + Duration::from_millis(time));
            warn!(cluster = self.config.name, endpoint = %addr, ms = time, "endpoint ejected (outlier)");
            stats::inc(
                "sockmesh_proxy_upstream_ejections_total",
                &[
                    ("cluster", &self.config.name),
                    ("endpoint", &addr.to_string()),
                ],
            );
        }
    }

    fn request_started(&self) -> Gauge<'_> {
        self.active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Gauge(&self.active)
    }

    fn retry_started(&self) -> Gauge<'_> {
        self.retrying
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Gauge(&self.retrying)
    }

    /// Envoy's retry budget: retries in flight below `budget_percent` of active requests, or
    /// below `min_retry_concurrency`.
    fn retry_allowed(&self) -> bool {
        let b = &self.config.retry_budget;
        let active = self.active.load(std::sync::atomic::Ordering::Relaxed);
        let retrying = self.retrying.load(std::sync::atomic::Ordering::Relaxed);
        let budget = (active * b.budget_percent as u64 / 100).max(b.min_retry_concurrency as u64);
        retrying < budget
    }
}

/// Everything a connection needs, swapped as a whole on reload.
pub struct Snapshot {
    pub router: Router,
    pub clusters: HashMap<String, Arc<ClusterState>>,
    /// The configuration's text (admin config dump).
    pub source: String,
}

impl Snapshot {
    /// The snapshot of `c`, keeping the state of `previous`'s clusters that `c` leaves as they
    /// were or changes only in their endpoints.
    pub fn new(c: &Config, previous: Option<&Snapshot>) -> Snapshot {
        let clusters = c
            .clusters
            .iter()
            .map(|cl| {
                let settings = Cluster {
                    endpoints: Vec::new(),
                    ..cl.clone()
                };
                let state = match previous.and_then(|p| p.clusters.get(&cl.name)) {
                    Some(old) if old.config == settings => {
                        if old.balancer.endpoints() != cl.endpoint_list() {
                            old.balancer.set_endpoints(cl.endpoint_list());
                        }
                        old.clone()
                    }
                    _ => Arc::new(ClusterState::new(cl)),
                };
                (cl.name.clone(), state)
            })
            .collect();
        Snapshot {
            router: Router::new(c),
            clusters,
            source: c.source.clone(),
        }
    }
}

pub type Shared = Arc<RwLock<Arc<Snapshot>>>;

/// `a` with a v4-mapped IPv6 address written as the IPv4 address it is.
pub fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6), else the socket's local address
/// (what a connection that was not redirected reports). An IPv4 connection accepted by a
/// dual-stack IPv6 listener (a v4-mapped local address) is an IPv4 connection to conntrack,
/// so it is asked at the IPv4 level.
/// `local` is the socket's local address, unmapped (a v4-mapped one would ask at the IPv6 level).
pub fn original_dst(s: &TcpStream, local: SocketAddr) -> io::Result<OrigDstAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let fd = s.as_raw_fd();
    // SAFETY: the buffers are sized for the address family asked for.
    unsafe {
        match local {
            SocketAddr::V4(_) => {
                let mut a: libc::sockaddr_in = std::mem::zeroed();
                let mut len = std::mem::size_of_val(&a) as libc::socklen_t;
                let rc = libc::getsockopt(
                    fd,
                    libc::SOL_IP,
                    SO_ORIGINAL_DST,
                    (&mut a as *mut libc::sockaddr_in).cast(),
                    &mut len,
                );
                if rc == 0 {
                    let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                    return Ok(OrigDstAddr(SocketAddr::new(
                        ip.into(),
                        u16::from_be(a.sin_port),
                    )));
                }
            }
            SocketAddr::V6(_) => {
                let mut a: libc::sockaddr_in6 = std::mem::zeroed();
                let mut len = std::mem::size_of_val(&a) as libc::socklen_t;
                let rc = libc::getsockopt(
                    fd,
                    libc::SOL_IPV6,
                    SO_ORIGINAL_DST,
                    (&mut a as *mut libc::sockaddr_in6).cast(),
                    &mut len,
                );
                if rc == 0 {
                    let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                    let ip = ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4);
                    return Ok(OrigDstAddr(SocketAddr::new(ip, u16::from_be(a.sin6_port))));
                }
            }
        }
    }
    Ok(OrigDstAddr(local))
}

/// What the first bytes of a connection say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tls,
    Tcp,
}

/// What complete first bytes say (tests; connections use [`sniff`]).
#[cfg(test)]
fn detect(first: &[u8]) -> Protocol {
    detect_partial(first).unwrap_or(Protocol::Tcp)
}

/// [`detect`] on the bytes so far, or None while they are the start of something that the
/// next bytes decide (a client's first segment can be as short as one byte).
fn detect_partial(first: &[u8]) -> Option<Protocol> {
    const PREFACE: &[u8] = b"PRI * HTTP/2";
    if first.starts_with(PREFACE) {
        return Some(Protocol::Http2);
    }
    if first.is_empty() || PREFACE.starts_with(first) {
        return None;
    }
    if first[0] == 0x16 {
        return match first.get(1) {
            None => None,
            Some(0x03) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Tcp),
        };
    }
    let method_len = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match first.get(method_len) {
        Some(b' ') if (3..=7).contains(&method_len) => Some(Protocol::Http1),
        None if method_len <= 7 => None,
        _ => Some(Protocol::Tcp),
    }
}

/// Peek until the first bytes tell the protocol: wait for the first byte (up to `first_limit`
/// if not zero), then at most a second for the rest of a split method or preface.
async fn sniff(stream: &TcpStream, first_limit: Duration) -> io::Result<Protocol> {
    let mut buf = [0u8; 24];
    let n = if first_limit.is_zero() {
        stream.peek(&mut buf).await?
    } else {
        match tokio::time::timeout(first_limit, stream.peek(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(Protocol::Tcp),
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut n = n;
    loop {
        if n == 0 {
            // The client closed without a byte.
            return Ok(Protocol::Tcp);
        }
        if let Some(p) = detect_partial(&buf[..n]) {
            return Ok(p);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Protocol::Tcp);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        n = stream.peek(&mut buf).await?;
    }
}

/// Serve one listener until the process ends.
pub async fn serve(
    listener: TcpListener,
    mut spec: tokio::sync::watch::Receiver<Option<ListenerSpec>>,
    shared: Shared,
) {
    let own = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            changed = spec.changed() => {
                if changed.is_err() || spec.borrow().is_none() {
                    info!(address = ?own, "listener removed: no new connections (established ones go on)");
                    return;
                }
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(ListenerSpec {
            name,
            direction,
            detect_timeout,
        }) = spec.borrow().clone()
        else {
            return;
        };
        let snapshot = shared.read().expect("config lock").clone();
        stats::inc("sockmesh_proxy_downstream_cx_total", &[("listener", name)]);
        stats::gauge(
            "sockmesh_proxy_downstream_cx_active",
            &[("listener", name)],
            1,
        );
        tokio::spawn(async move {
            let _active = ListenerGauge(name);
            if let Err(e) = connection(
                stream,
                ClientAddr(unmapped(peer)),
                own,
                direction,
                detect_timeout,
                snapshot,
            )
            .await
            {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Counts a connection out of its listener's active gauge when dropped.
struct ListenerGauge(&'static str);

impl Drop for ListenerGauge {
    fn drop(&mut self) {
        stats::gauge(
            "sockmesh_proxy_downstream_cx_active",
            &[("listener", self.0)],
            -1,
        );
    }
}

async fn connection(
    stream: TcpStream,
    client: ClientAddr,
    own: Option<SocketAddr>,
    direction: Direction,
    detect_timeout: Duration,
    snapshot: Arc<Snapshot>,
) -> io::Result<()> {
    let local = unmapped(stream.local_addr()?);
    let orig = original_dst(&stream, local)?;
    // Not redirected: relaying to "the original destination" would be a loop back to us.
    if orig.0 == local && own.is_some_and(|o| o.port() == local.port()) {
        warn!(client = %client.0, "connection reached the proxy directly (not redirected): closed");
        return Ok(());
    }
    // A declared TCP port is not sniffed (server-first protocols send nothing); inbound, it
    // goes to the app whatever the route's cluster.
    let declared = snapshot.router.tcp_route(orig.0);
    let protocol = match declared {
        Some(_) => Protocol::Tcp,
        None => sniff(&stream, detect_timeout).await?,
    };
    debug!(client = %client.0, orig = %orig.0, ?protocol, ?direction, "connection");
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let snapshot = snapshot.clone();
                async move {
                    let start = std::time::Instant::now();
                    let method = req.method().clone();
                    let path = req.uri().path().to_string();
                    let mut trace = Trace::new(direction);
                    let mut resp =
                        request(req, client, orig, direction, &snapshot, &mut trace).await;
                    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                        strip_hop_by_hop(resp.headers_mut());
                    }
                    trace.done(&method, &path, client, orig, resp.status(), start);
                    Ok::<_, Infallible>(resp)
                }
            });
            // The protocol is known from the sniff: hyper's own codec for it, without
            // hyper-util's second detection (a read of its own, and a rewind buffer on every
            // read after).
            let io = TokioIo::new(stream);
            match protocol {
                Protocol::Http2 => {
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await
                }
                _ => {
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await
                }
            }
            .map_err(io::Error::other)
        }
        Protocol::Tls | Protocol::Tcp => {
            // TLS by server name, when a TLS route names it.
            let by_sni = match (protocol, direction) {
                (Protocol::Tls, Direction::Outbound) => {
                    client_hello_sni(&stream).await.and_then(|sni| {
                        debug!(sni, "TLS server name");
                        snapshot.router.tls_cluster(&sni).map(String::from)
                    })
                }
                _ => None,
            };
            let target = match direction {
                Direction::Inbound => orig.0,
                Direction::Outbound => match by_sni.as_deref().or(declared.flatten()) {
                    Some(name) => {
                        let Some(cl) = snapshot.clusters.get(name) else {
                            warn!(cluster = name, "TCP route to a cluster not defined: closed");
                            return Ok(());
                        };
                        let hash = hash_bytes(client.0.ip().to_string().as_bytes());
                        if cl.connections.load(std::sync::atomic::Ordering::Relaxed)
                            >= cl.config.circuit_breakers.max_connections
                        {
                            warn!(cluster = name, "circuit breaker: max_connections reached");
                            return Ok(());
                        }
                        match cl.balancer.pick(Some(hash), &|a| cl.usable(a)) {
                            Some(p) => {
                                cl.connections
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let _open = Gauge(&cl.connections);
                                let timeout = cl.config.connect_timeout();
                                return relay(stream, p.addr, direction, timeout).await;
                            }
                            None => return Ok(()),
                        }
                    }
                    None => orig.0,
                },
            };
            relay(stream, target, direction, CONNECT_TIMEOUT).await
        }
    }
}

/// Wait (up to 5 s) for the whole first TLS record and read its server name.
async fn client_hello_sni(stream: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024 + 5];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n >= 5 {
            let want = 5 + u16::from_be_bytes([buf[3], buf[4]]) as usize;
            if n >= want || n == buf.len() {
                return sni(&buf[..n.min(want)]);
            }
        }
        // More is on its way: peek returns what is there, so wait a little.
        tokio::time::sleep(Duration::from_millis(2)).await;
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}

/// The server name (SNI) of a TLS ClientHello record, if it has one.
pub fn sni(record: &[u8]) -> Option<String> {
    fn u16_at(b: &[u8], i: usize) -> Option<usize> {
        Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as usize)
    }
    // Record header (5), handshake header (4), version (2), random (32).
    if record.first() != Some(&0x16) || record.get(5) != Some(&0x01) {
        return None;
    }
    let mut i = 5 + 4 + 2 + 32;
    i += 1 + *record.get(i)? as usize; // session id
    i += 2 + u16_at(record, i)?; // cipher suites
    i += 1 + *record.get(i)? as usize; // compression methods
    let end = (i + 2 + u16_at(record, i)?).min(record.len());
    i += 2;
    while i + 4 <= end {
        let (kind, len) = (u16_at(record, i)?, u16_at(record, i + 2)?);
        let body = record.get(i + 4..i + 4 + len)?;
        if kind == 0 {
            // server_name_list: length (2), then entries of type (1), length (2), name.
            let mut j = 2;
            while j + 3 <= body.len() {
                let name_len = u16_at(body, j + 1)?;
                let name = body.get(j + 3..j + 3 + name_len)?;
                if body[j] == 0 {
                    return String::from_utf8(name.to_vec()).ok();
                }
                j += 3 + name_len;
            }
            return None;
        }
        i += 4 + len;
    }
    None
}

/// A minimal TLS 1.2-style ClientHello record naming `server`.
#[cfg(test)]
fn client_hello(server: &str) -> Vec<u8> {
    let name = server.as_bytes();
    let mut sni_ext = Vec::new();
    sni_ext.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni_ext.push(0);
    sni_ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni_ext.extend_from_slice(name);
    let mut exts = vec![0, 0];
    exts.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
    exts.extend_from_slice(&sni_ext);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0); // no session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// How long a connection to an original destination may take to open (Envoy's default
/// `connect_timeout`; a cluster's endpoints have the cluster's).
pub const CONNECT_TIMEOUT: Duration =
    Duration::from_millis(crate::config::DEFAULT_CONNECT_TIMEOUT_MS);

/// Connect to `target`, from the inbound passthrough source for inbound traffic, within
/// `timeout`.
pub async fn connect(
    target: SocketAddr,
    direction: Direction,
    timeout: Duration,
) -> io::Result<TcpStream> {
    tokio::time::timeout(timeout, connect_untimed(target, direction))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

async fn connect_untimed(target: SocketAddr, direction: Direction) -> io::Result<TcpStream> {
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if direction == Direction::Inbound {
        let src: IpAddr = match target {
            SocketAddr::V4(_) => INBOUND_SOURCE_V4.into(),
            SocketAddr::V6(_) => INBOUND_SOURCE_V6.into(),
        };
        socket.bind(SocketAddr::new(src, 0))?;
    }
    socket.set_nodelay(true)?;
    socket.connect(target).await
}

/// Relay bytes both ways, passing each half-close on.
async fn relay(
    mut down: TcpStream,
    target: SocketAddr,
    direction: Direction,
    connect_timeout: Duration,
) -> io::Result<()> {
    let mut up = connect(target, direction, connect_timeout).await?;
    tokio::io::copy_bidirectional(&mut down, &mut up).await?;
    Ok(())
}

fn full(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{text}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

fn set_headers(h: &mut hyper::HeaderMap, add: &[crate::config::HeaderValue], remove: &[String]) {
    for name in remove {
        h.remove(name.as_str());
    }
    for hv in add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(hv.name.as_bytes()),
            HeaderValue::from_str(&hv.value),
        ) {
            h.insert(n, v);
        }
    }
}

/// Largest request body kept for retries and mirrors; a larger one is sent once, unmirrored.
const REPLAY_LIMIT: usize = 64 * 1024;

fn boxed_bytes(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed()
}

/// A request's head, to send it again (retries, mirrors).
#[derive(Clone)]
struct Head {
    method: hyper::Method,
    uri: Uri,
    version: hyper::Version,
    headers: hyper::HeaderMap,
}

impl Head {
    fn request(&self, body: Body) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

/// Whether an attempt's outcome is one `retry_on` retries.
fn retriable(retry_on: &str, outcome: &Result<Response<Body>, Failure>) -> bool {
    retry_on
        .split(',')
        .map(str::trim)
        .any(|c| match (c, outcome) {
            ("5xx", Ok(r)) => r.status().is_server_error(),
            ("5xx", Err(_)) => true,
            ("gateway-error", Ok(r)) => matches!(r.status().as_u16(), 502..=504),
            ("connect-failure", Err(Failure::Connect(_))) => true,
            ("reset", Err(Failure::Reset(_))) => true,
            ("retriable-4xx", Ok(r)) => r.status() == StatusCode::CONFLICT,
            _ => false,
        })
}

/// Why an attempt produced no response.
#[derive(Debug)]
pub enum Failure {
    Connect(String),
    Reset(String),
    Timeout,
}

/// What became of a request, for stats and the access log.
struct Trace {
    route: String,
    cluster: String,
    upstream: Option<SocketAddr>,
}

impl Trace {
    fn new(direction: Direction) -> Trace {
        let cluster = match direction {
            Direction::Inbound => "InboundPassthroughCluster",
            Direction::Outbound => "PassthroughCluster",
        };
        Trace {
            route: "-".into(),
            cluster: cluster.into(),
            upstream: None,
        }
    }

    fn done(
        &self,
        method: &hyper::Method,
        path: &str,
        client: ClientAddr,
        orig: OrigDstAddr,
        status: StatusCode,
        start: std::time::Instant,
    ) {
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let class = stats::class(status.as_u16());
        stats::inc(
            "sockmesh_proxy_requests_total",
            &[
                ("route", &self.route),
                ("cluster", &self.cluster),
                ("code_class", class),
            ],
        );
        stats::observe_ms(
            "sockmesh_proxy_request_duration_ms",
            &[("cluster", &self.cluster)],
            ms,
        );
        info!(
            target: "access",
            "{method} {path} {} client={} orig={} route={} cluster={} upstream={} {:.1}ms",
            status.as_u16(),
            client.0,
            orig.0,
            self.route,
            self.cluster,
            self.upstream.map_or("-".to_string(), |u| u.to_string()),
            ms
        );
    }
}

/// Headers that belong to one connection (RFC 9110 7.6.1) and are not forwarded, besides
/// those the `Connection` header names.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "http2-settings",
];

/// Remove the hop-by-hop headers of a request or response before it is forwarded, as Envoy
/// does: `Connection` and the headers it names, Keep-Alive, Proxy-Connection, TE (but
/// `te: trailers`, which gRPC needs, whatever else TE lists or Connection says) and Upgrade. So a client's `connection: close` closes
/// its own connection, not the pooled upstream one. Transfer-Encoding is left to the codec.
///
/// An upgrade (WebSocket) keeps `Upgrade` and `connection: upgrade`. An HTTP/1.1
/// `Upgrade: h2c` does not: it is declined and answered as HTTP/1.1, as if it had not asked
/// (a server may decline an upgrade, RFC 9110 7.8; RFC 9113 dropped this way to HTTP/2, and
/// Envoy declines it too).
fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    if !HOP_BY_HOP.iter().any(|h| headers.contains_key(*h)) {
        return;
    }
    let tokens = |headers: &hyper::HeaderMap| -> Vec<String> {
        headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let named = tokens(headers);
    // `te: trailers` goes on (gRPC needs it) even when Connection names TE, as RFC 9110 10.1.4
    // asks a client to; other TE codings are this hop's.
    let te_trailers = headers
        .get_all(hyper::header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        });
    let upgrade = headers
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")))
        .is_some()
        && named.iter().any(|t| t == "upgrade");
    for name in named.iter().map(String::as_str).chain(HOP_BY_HOP) {
        if !(upgrade && name == "upgrade") {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(hyper::header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(
            hyper::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
}

/// Route and forward one request.
async fn request(
    mut req: Request<Incoming>,
    client: ClientAddr,
    orig: OrigDstAddr,
    direction: Direction,
    snap: &Snapshot,
    trace: &mut Trace,
) -> Response<Body> {
    strip_hop_by_hop(req.headers_mut());
    let authority = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(String::from)
        })
        .unwrap_or_default();
    let downstream_h2 = req.version() == hyper::Version::HTTP_2;
    let route = match direction {
        Direction::Inbound => None,
        Direction::Outbound => {
            let pq = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            snap.router.virtual_host(&authority, orig.0).and_then(|vh| {
                debug!(vhost = vh.name, authority, orig = %orig.0, "virtual host");
                vh.route(&pq, req.headers())
            })
        }
    };
    let Some(route) = route else {
        // Inbound, or no route: the original destination (Istio's PassthroughCluster).
        trace.upstream = Some(orig.0);
        let req = req.map(|b| b.boxed());
        let passthrough = Upstream {
            addr: orig.0,
            direction,
            http2: downstream_h2,
            connect_timeout: CONNECT_TIMEOUT,
        };
        return match attempt(req, passthrough, &authority, None).await {
            Ok(r) => r,
            Err(f) => failure_response(f),
        };
    };
    if let Some(fault) = &route.fault {
        if let Some(d) = fault
            .delay
            .as_ref()
            .filter(|d| crate::router::chance(d.percentage))
        {
            tokio::time::sleep(Duration::from_millis(d.fixed_delay_ms)).await;
        }
        if let Some(a) = fault
            .abort
            .as_ref()
            .filter(|a| crate::router::chance(a.percentage))
        {
            let status =
                StatusCode::from_u16(a.http_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return full(status, "fault filter abort");
        }
    }
    trace.route = route.name.clone();
    let name = route.target.cluster();
    trace.cluster = name.to_string();
    let Some(cl) = snap.clusters.get(name) else {
        return full(StatusCode::SERVICE_UNAVAILABLE, "no such cluster");
    };
    let hash = match &cl.config.hash_policy {
        Some(HashPolicy {
            header: Some(h), ..
        }) => req
            .headers()
            .get(h.as_str())
            .map(|v| hash_bytes(v.as_bytes())),
        Some(HashPolicy {
            source_ip: true, ..
        }) => Some(hash_bytes(client.0.ip().to_string().as_bytes())),
        _ => None,
    };
    let (mut parts, body) = req.into_parts();
    // An upgrade (WebSocket) goes with the first attempt only.
    let mut on_upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    let mut head = Head {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
    };
    set_headers(
        &mut head.headers,
        &route.request_headers_to_add,
        &route.request_headers_to_remove,
    );
    // Keep the body when it may be sent again, if it is small enough.
    let replay = route.retry.is_some() || !route.mirrors.is_empty();
    let (body, kept) = if replay && body_fits(&body) {
        match body.collect().await {
            Ok(c) => {
                let b = c.to_bytes();
                (boxed_bytes(b.clone()), Some(b))
            }
            Err(e) => {
                return full(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the request: {e}"),
                )
            }
        }
    } else {
        (body.boxed(), None)
    };
    if let Some(bytes) = &kept {
        for m in route
            .mirrors
            .iter()
            .filter(|m| crate::router::chance(m.percentage))
        {
            mirror(snap, &m.cluster, &head, bytes.clone(), &authority, hash);
        }
    }
    let http2 = downstream_h2 || cl.config.http2;
    let per_try = route
        .retry
        .as_ref()
        .map(|r| r.per_try_timeout_ms)
        .filter(|t| *t > 0)
        .map(Duration::from_millis);
    let retries = match (&route.retry, &kept) {
        (Some(r), Some(_)) => r.num_retries,
        _ => 0,
    };
    let send = async {
        let mut body = Some(body);
        let mut n = 0u32;
        loop {
            let Some(pick) = cl.balancer.pick(hash, &|a| cl.usable(a)) else {
                return full(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
            };
            let b = body
                .take()
                .unwrap_or_else(|| boxed_bytes(kept.clone().unwrap_or_default()));
            let mut this = head.request(b);
            if let Some(u) = on_upgrade.take() {
                this.extensions_mut().insert(u);
            }
            trace.upstream = Some(pick.addr);
            let to = Upstream {
                addr: pick.addr,
                direction,
                http2,
                connect_timeout: cl.config.connect_timeout(),
            };
            let outcome = attempt(this, to, &authority, per_try).await;
            let code = match &outcome {
                Ok(r) => stats::class(r.status().as_u16()),
                Err(_) => "5xx",
            };
            let endpoint = pick.addr.to_string();
            stats::inc(
                "sockmesh_proxy_upstream_rq_total",
                &[
                    ("cluster", name),
                    ("endpoint", &endpoint),
                    ("code_class", code),
                ],
            );
            cl.record(pick.addr, &outcome);
            drop(pick);
            let again = n < retries
                && retriable(
                    &route
                        .retry
                        .as_ref()
                        .expect("retries need a policy")
                        .retry_on,
                    &outcome,
                )
                && cl.retry_allowed();
            if !again {
                return match outcome {
                    Ok(r) => r,
                    Err(f) => failure_response(f),
                };
            }
            n += 1;
            stats::inc(
                "sockmesh_proxy_upstream_rq_retry_total",
                &[("cluster", name)],
            );
            let _retry = cl.retry_started();
            let base = route
                .retry
                .as_ref()
                .map_or(25, |r| r.base_interval_ms)
                .max(1);
            let cap = (base << (n - 1).min(16)).min(base * 10);
            tokio::time::sleep(Duration::from_millis(crate::router::random_u64() % cap + 1)).await;
        }
    };
    let deadline = tokio::time::Instant::now() + route.timeout;
    // Circuit breakers: a request beyond `max_requests` waits for a slot, unless
    // `max_pending_requests` already wait; then it fails at once, as Envoy's overflow.
    let _slot = match cl.slots.try_acquire() {
        Ok(slot) => slot,
        Err(_) => {
            let waiting = cl
                .pending
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _pending = Gauge(&cl.pending);
            if waiting >= cl.config.circuit_breakers.max_pending_requests {
                stats::inc(
                    "sockmesh_proxy_upstream_rq_overflow_total",
                    &[("cluster", name)],
                );
                let mut r = full(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream overflow (circuit breaker)",
                );
                r.headers_mut()
                    .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
                return r;
            }
            match tokio::time::timeout_at(deadline, cl.slots.acquire()).await {
                Ok(Ok(slot)) => slot,
                _ => return full(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
            }
        }
    };
    let _active = cl.request_started();
    let mut resp = match tokio::time::timeout_at(deadline, send).await {
        Err(_) => return full(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
        Ok(r) => r,
    };
    set_headers(
        resp.headers_mut(),
        &route.response_headers_to_add,
        &route.response_headers_to_remove,
    );
    resp
}

/// Whether a request body is known to fit the replay limit (by its length or end).
fn body_fits(b: &Incoming) -> bool {
    use hyper::body::Body as _;
    b.size_hint()
        .upper()
        .is_some_and(|u| u <= REPLAY_LIMIT as u64)
}

fn failure_response(f: Failure) -> Response<Body> {
    match f {
        Failure::Timeout => full(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
        Failure::Connect(e) | Failure::Reset(e) => full(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("upstream connect error or disconnect/reset before headers: {e}"),
        ),
    }
}

/// Fire-and-forget copy of a request to `cluster`, its Host with "-shadow" appended.
fn mirror(
    snap: &Snapshot,
    cluster: &str,
    head: &Head,
    body: Bytes,
    authority: &str,
    hash: Option<u64>,
) {
    let Some(cl) = snap.clusters.get(cluster) else {
        return;
    };
    let Some(pick) = cl.balancer.pick(hash, &|a| cl.usable(a)) else {
        return;
    };
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => format!("{h}-shadow:{p}"),
        _ => format!("{authority}-shadow"),
    };
    let mut head = head.clone();
    if let Ok(v) = HeaderValue::from_str(&host) {
        head.headers.insert(HOST, v);
    }
    let http2 = cl.config.http2 || head.version == hyper::Version::HTTP_2;
    let connect_timeout = cl.config.connect_timeout();
    tokio::spawn(async move {
        let to = Upstream {
            addr: pick.addr,
            direction: Direction::Outbound,
            http2,
            connect_timeout,
        };
        let r = attempt(
            head.request(boxed_bytes(body)),
            to,
            &host,
            Some(Duration::from_secs(15)),
        )
        .await;
        if let Ok(resp) = r {
            // Read the answer so the connection ends cleanly; it is not used.
            let _ = resp.into_body().collect().await;
        }
        drop(pick);
    });
}

/// Where an attempt goes, and how.
#[derive(Clone, Copy)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub direction: Direction,
    /// HTTP/2 (h2c), else HTTP/1.1.
    pub http2: bool,
    pub connect_timeout: Duration,
}

/// One attempt: connect, send, wait for the response head.
async fn attempt(
    req: Request<Body>,
    to: Upstream,
    authority: &str,
    limit: Option<Duration>,
) -> Result<Response<Body>, Failure> {
    let go = async {
        if !to.http2 {
            return pooled(req, to, authority).await;
        }
        let send = crate::pool::h2_connection(to).await?;
        forward_h2(req, send, authority)
            .await
            .map_err(Failure::Reset)
    };
    match limit {
        None => go.await,
        Some(t) => tokio::time::timeout(t, go)
            .await
            .map_err(|_| Failure::Timeout)?,
    }
}

/// Send an HTTP/1.1 request to `target` over a pooled connection; the Host header keeps the
/// client's authority. Upgrades (WebSocket) are relayed once both sides switch.
async fn pooled(
    mut req: Request<Body>,
    to: Upstream,
    authority: &str,
) -> Result<Response<Body>, Failure> {
    // HTTP/1.1 requires Host: the client's authority, else the endpoint's address.
    if !req.headers().contains_key(HOST) {
        let host = if authority.is_empty() {
            HeaderValue::from_str(&to.addr.to_string())
        } else {
            HeaderValue::from_str(authority)
        };
        if let Ok(v) = host {
            req.headers_mut().insert(HOST, v);
        }
    }
    // The request line names the path (origin form), as clients write it to a server; a
    // CONNECT keeps its authority form.
    let absolute = req.uri().scheme().is_some() || req.uri().authority().is_some();
    if absolute && req.method() != hyper::Method::CONNECT {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
    }
    *req.version_mut() = hyper::Version::HTTP_11;
    let down = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let mut resp = crate::pool::send(req, to).await?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(down) = down {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(d), Ok(u)) = (down.await, up.await) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(d), &mut TokioIo::new(u))
                            .await;
                }
            });
        }
    }
    Ok(resp.map(|b| b.boxed()))
}

/// Send `req` over an HTTP/2 connection; the response's body streams. The client's
/// authority becomes `:authority`.
async fn forward_h2(
    mut req: Request<Body>,
    mut send: crate::pool::H2,
    authority: &str,
) -> Result<Response<Body>, String> {
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    send.ready().await.map_err(|e| e.to_string())?;
    let host = if authority.is_empty() {
        "localhost"
    } else {
        authority
    };
    *req.uri_mut() = format!("http://{host}{pq}")
        .parse::<Uri>()
        .map_err(|e| e.to_string())?;
    *req.version_mut() = hyper::Version::HTTP_2;
    req.headers_mut().remove(HOST);
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.map(|b| b.boxed()))
}

/// What a listener does with the connections it accepts; it may change without rebinding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSpec {
    pub name: &'static str,
    pub direction: Direction,
    pub detect_timeout: Duration,
}

impl ListenerSpec {
    pub fn of(l: &crate::config::Listener) -> ListenerSpec {
        ListenerSpec {
            name: intern(&l.name),
            direction: l.direction,
            detect_timeout: Duration::from_millis(l.detect_timeout_ms),
        }
    }
}

/// Listener names label metrics for the process's life: each distinct name is kept once.
fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut names = NAMES.lock().expect("names lock");
    match names.get(name) {
        Some(n) => n,
        None => {
            let n: &'static str = Box::leak(name.to_owned().into_boxed_str());
            names.insert(n);
            n
        }
    }
}

/// Bind a listener's address (SO_REUSEADDR, backlog 1024).
pub fn bind(l: &crate::config::Listener) -> io::Result<TcpListener> {
    let socket = match l.address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(l.address)?;
    socket.listen(1024)
}

/// Probe every endpoint of every cluster with a health check, for as long as its cluster
/// state lives (a cluster carried over by a reload keeps its one prober).
pub fn start_health_checks(snap: &Snapshot) {
    for (name, cl) in &snap.clusters {
        let Some(hc) = cl.config.health_check.clone() else {
            continue;
        };
        if cl.probing.swap(true, std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        let weak = Arc::downgrade(cl);
        let name = name.clone();
        tokio::spawn(async move {
            loop {
                let Some(cl) = weak.upgrade() else {
                    return;
                };
                for e in cl.balancer.endpoints() {
                    let ok = probe(e.addr, &hc, &name).await;
                    cl.probed(e.addr, ok, &hc);
                }
                drop(cl);
                tokio::time::sleep(Duration::from_millis(hc.interval_ms)).await;
            }
        });
    }
}

/// One health probe: a TCP connect, or an HTTP/1.1 GET that must answer 2xx.
async fn probe(addr: SocketAddr, hc: &crate::config::HealthCheck, cluster: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let check = async {
        let mut s = TcpStream::connect(addr).await?;
        let Some(path) = &hc.http_path else {
            return Ok::<bool, io::Error>(true);
        };
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {cluster}\r\nuser-agent: sockmesh-proxy-hc\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        Ok(head.starts_with(b"HTTP/1.") && head[9] == b'2')
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(hc.timeout_ms), check).await,
        Ok(Ok(true))
    )
}

/// The admin endpoint: `/ready`, `/stats/prometheus`, `/clusters`, `/config_dump`.
pub async fn admin(listener: TcpListener, shared: Shared) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let snap = shared.read().expect("config lock").clone();
                async move { Ok::<_, Infallible>(admin_page(req.uri().path(), &snap)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn admin_page(path: &str, snap: &Snapshot) -> Response<Body> {
    match path {
        "/ready" => full(StatusCode::OK, "LIVE"),
        "/stats" | "/stats/prometheus" => full(StatusCode::OK, stats::render().trim_end()),
        "/config_dump" => full(StatusCode::OK, snap.source.trim_end()),
        "/clusters" => {
            let mut out = String::new();
            let mut names: Vec<&String> = snap.clusters.keys().collect();
            names.sort();
            for name in names {
                let cl = &snap.clusters[name];
                for e in cl.balancer.endpoints() {
                    let health = match (cl.ejected(e.addr), cl.failing_health_check(e.addr)) {
                        (false, false) => "healthy",
                        (true, false) => "/failed_outlier_check",
                        (false, true) => "/failed_active_hc",
                        (true, true) => "/failed_active_hc/failed_outlier_check",
                    };
                    out.push_str(&format!(
                        "{name}::{}::health_flags::{health}\n{name}::{}::rq_active::{}\n{name}::{}::weight::{}\n{name}::{}::priority::{}\n",
                        e.addr,
                        e.addr,
                        cl.balancer.active(e.addr),
                        e.addr,
                        e.weight,
                        e.addr,
                        e.priority
                    ));
                }
            }
            full(StatusCode::OK, out.trim_end())
        }
        _ => full(
            StatusCode::NOT_FOUND,
            "not found: /ready, /stats/prometheus, /clusters, /config_dump",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&'static str, &'static str)]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for (k, v) in list {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn names(h: &hyper::HeaderMap) -> Vec<String> {
        let mut n: Vec<String> = h
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        n.sort();
        n
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = headers(&[
            ("host", "a"),
            ("connection", "close, X-Hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("x-end", "2"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["host: a", "te: trailers", "x-end: 2"]);
        // TE other than trailers is this hop's.
        let mut h = headers(&[("te", "gzip"), ("x-end", "2")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["x-end: 2"]);
        // Named by Connection (as RFC 9110 asks of a client sending TE), or with other codings,
        // trailers still go on, alone.
        let mut h = headers(&[("connection", "TE"), ("te", "trailers, deflate;q=0.5")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["te: trailers"]);
        // Nothing hop-by-hop: left alone.
        let mut h = headers(&[("host", "a"), ("x-end", "2")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["host: a", "x-end: 2"]);
    }

    #[test]
    fn upgrades_keep_their_headers_but_h2c_is_declined() {
        let mut ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        strip_hop_by_hop(&mut ws);
        assert_eq!(
            names(&ws),
            [
                "connection: upgrade",
                "sec-websocket-key: k",
                "upgrade: websocket"
            ]
        );
        let mut h2c = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
            ("host", "a"),
        ]);
        strip_hop_by_hop(&mut h2c);
        assert_eq!(names(&h2c), ["host: a"]);
        // An Upgrade header the Connection header does not name is not an upgrade.
        let mut stray = headers(&[("upgrade", "websocket"), ("host", "a")]);
        strip_hop_by_hop(&mut stray);
        assert_eq!(names(&stray), ["host: a"]);
    }

    #[test]
    fn server_names_are_read_from_client_hellos() {
        let hello = client_hello("api.example.com");
        assert_eq!(detect(&hello), Protocol::Tls);
        assert_eq!(sni(&hello).as_deref(), Some("api.example.com"));
        assert_eq!(sni(&hello[..hello.len() - 3]), None, "truncated");
        assert_eq!(sni(b"GET / HTTP/1.1"), None);
    }

    #[test]
    fn protocols_are_told_apart_by_their_first_bytes() {
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(detect(b"OPTIONS * HTTP/1.1"), Protocol::Http1);
        assert_eq!(detect(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Protocol::Http2);
        assert_eq!(detect(&[0x16, 0x03, 0x01, 0x02, 0x00]), Protocol::Tls);
        assert_eq!(detect(b""), Protocol::Tcp);
        assert_eq!(detect(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), Protocol::Tcp);
        assert_eq!(detect(b"HELLO"), Protocol::Tcp);
        // Split first segments wait for more bytes.
        assert_eq!(detect_partial(b"G"), None);
        assert_eq!(detect_partial(b"GET"), None);
        assert_eq!(detect_partial(b"GET "), Some(Protocol::Http1));
        assert_eq!(detect_partial(b"PRI * H"), None);
        assert_eq!(detect_partial(&[0x16]), None);
        assert_eq!(detect_partial(b"get / HTTP/1.1"), Some(Protocol::Tcp));
        assert_eq!(detect_partial(b"ABCDEFGHIJ"), Some(Protocol::Tcp));
    }
}

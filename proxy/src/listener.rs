//! Listeners: accept, learn the original destination and protocol, hand to HTTP or TCP.

use std::{
    collections::BTreeSet,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tokio_stream::{wrappers::WatchStream, StreamExt};
use tracing::{debug, info, warn};

use crate::{
    config::{self, Direction},
    http,
    snapshot::{Shared, Snapshot},
    stats, tcp,
    transport::{
        original_dst, sniff, Accepted, ClientAddr, Conn, ListenAddr, Listener, LocalAddr,
        OrigDstAddr, Protocol, Sniffed,
    },
};

/// What a listener does with the connections it accepts; it may change without rebinding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSpec {
    pub name: &'static str,
    pub direction: Direction,
    pub detect_timeout: Duration,
}

impl ListenerSpec {
    pub fn of(l: &config::Listener) -> ListenerSpec {
        ListenerSpec {
            name: intern(&l.name),
            direction: l.direction,
            detect_timeout: Duration::from_millis(l.detect_timeout_ms),
        }
    }
}

/// Listener names label metrics for the process's life: each distinct name is kept once.
fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
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

/// Serve one listener until its spec is withdrawn (`None`) or its sender dropped.
pub async fn serve(
    listener: Listener,
    mut spec: watch::Receiver<Option<ListenerSpec>>,
    shared: Shared,
) {
    let own = listener.local_addr().ok();
    // The spec in force when the last accept began: a connection accepted as the listener is
    // withdrawn is still served with it, never dropped.
    let Some(first) = spec.borrow_and_update().clone() else {
        return;
    };
    let mut in_force = InForce::of(first);
    // Changes as a stream: its wait for the next change stays registered from one accept to
    // the next, rather than being registered and removed again around each accept.
    let mut between = spec.clone();
    let mut changes = WatchStream::from_changes(spec);
    loop {
        // Accept first: the stream of changes is polled only when no connection waits, not
        // once per connection (`cargo xtask profile`). While connections keep coming, a
        // change is seen after each accept (a version compare).
        let accepted = tokio::select! {
            biased;
            a = listener.accept() => a,
            changed = changes.next() => {
                if in_force.change(changed.flatten()) {
                    continue;
                }
                break;
            }
        };
        match accepted {
            Ok((stream, peer)) => in_force.serve(stream, peer, own, shared.load()),
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // The stream gives the same change again later: putting it in force twice is as once.
        let kept = match between.has_changed() {
            Ok(false) => true,
            Ok(true) => in_force.change(between.borrow_and_update().clone()),
            // The sender dropped: withdrawn, as the stream's end says.
            Err(_) => false,
        };
        if !kept {
            break;
        }
    }
    info!(address = ?own, "listener removed: no new connections (established ones go on)");
}

/// A listener's spec in force, and its connection series.
struct InForce {
    spec: ListenerSpec,
    counted: ListenerStats,
}

impl InForce {
    fn of(spec: ListenerSpec) -> InForce {
        InForce {
            counted: ListenerStats::of(spec.name),
            spec,
        }
    }

    /// Put `change` in force; `false` when the listener is withdrawn (`None`).
    fn change(&mut self, change: Option<ListenerSpec>) -> bool {
        let Some(spec) = change else {
            return false;
        };
        if spec.name != self.spec.name {
            self.counted = ListenerStats::of(spec.name);
        }
        self.spec = spec;
        true
    }

    /// Serve an accepted connection in a task of its own, with the spec in force.
    fn serve(
        &self,
        stream: Conn,
        peer: SocketAddr,
        own: Option<SocketAddr>,
        snapshot: Arc<Snapshot>,
    ) {
        let current = self.spec.clone();
        self.counted.total.inc();
        let active = ListenerGauge::up(self.counted.active.clone());
        let own = own.map(ListenAddr::new);
        crate::exec::spawn(async move {
            let _active = active;
            let client = ClientAddr::new(peer);
            if let Err(e) = connection(stream, client, own, &current, snapshot).await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Connections accepted and not yet ended, on every listener (a draining proxy exits at 0).
pub static ACTIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A listener's connection series, looked up once per listener name rather than per
/// connection.
struct ListenerStats {
    total: stats::Counter,
    active: stats::Gauge,
}

impl ListenerStats {
    fn of(listener: &'static str) -> ListenerStats {
        let labels = [("listener", listener)];
        ListenerStats {
            total: stats::counter("sockmesh_proxy_downstream_cx_total", &labels),
            active: stats::gauge("sockmesh_proxy_downstream_cx_active", &labels),
        }
    }
}

/// Counts a connection in its listener's active gauge (and in [`ACTIVE`]) while alive.
struct ListenerGauge(stats::Gauge);

impl ListenerGauge {
    fn up(active: stats::Gauge) -> ListenerGauge {
        active.add(1);
        ACTIVE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ListenerGauge(active)
    }
}

impl Drop for ListenerGauge {
    fn drop(&mut self) {
        self.0.add(-1);
        ACTIVE.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// One accepted connection: its original destination, then its protocol (unless its port is
/// declared TCP), then HTTP or the relay.
async fn connection(
    stream: Conn,
    client: ClientAddr,
    own: Option<ListenAddr>,
    spec: &ListenerSpec,
    snapshot: Arc<Snapshot>,
) -> io::Result<()> {
    // Not redirected, the connection's original destination is its local address (TPROXY's
    // case: it was never rewritten).
    let orig = match original_dst(&stream, client) {
        Some(orig) => orig,
        None => OrigDstAddr::new(stream.local_addr()?),
    };
    // Sent to the proxy's own port, relaying to "the original destination" would be a loop
    // back to us. Only then is the local address asked for (one system call fewer for every
    // other connection).
    if own.is_some_and(|o| o.addr().port() == orig.addr().port())
        && orig.addr() == LocalAddr::new(stream.local_addr()?).addr()
    {
        warn!(%client, "connection reached the proxy directly (not redirected): closed");
        return Ok(());
    }
    // A declared TCP port is not sniffed (server-first protocols send nothing); inbound, it
    // goes to the app whatever the route's cluster.
    let declared = snapshot.router.tcp_route(orig.addr());
    let (protocol, stream) = match declared {
        Some(_) => (Protocol::Tcp, Sniffed::new(stream)),
        None => sniff(stream, spec.detect_timeout).await?,
    };
    let direction = spec.direction;
    debug!(%client, %orig, ?protocol, ?direction, "connection");
    let accepted = Accepted {
        client,
        orig,
        direction,
    };
    // Each protocol's future boxed: the task spawned per connection is then small, and
    // tokio moves it (the accept loop's spawn, the task's stage) without copying a codec's
    // whole state each time (`cargo xtask profile`).
    match protocol {
        Protocol::Http1 => Box::pin(http::serve_http1(stream, accepted, snapshot)).await,
        Protocol::Http2 => Box::pin(http::serve_http2(stream, accepted, snapshot)).await,
        Protocol::Tls => {
            Box::pin(tcp::serve(
                stream,
                true,
                accepted,
                declared.flatten(),
                &snapshot,
            ))
            .await
        }
        Protocol::Tcp => {
            Box::pin(tcp::serve(
                stream,
                false,
                accepted,
                declared.flatten(),
                &snapshot,
            ))
            .await
        }
    }
}

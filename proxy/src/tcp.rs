//! TCP and TLS connections: relayed to a cluster by SNI or port, else to the original destination.
//!
//! Half-closes are passed on; a cluster's endpoint is chosen by the client's address.

use std::{io, net::SocketAddr, time::Duration};

use tracing::{debug, warn};

use crate::{
    cluster::hash_bytes,
    config::Direction,
    snapshot::Snapshot,
    transport::{
        self, client_hello_sni, connect, Accepted, ClientAddr, Sniffed, ORIG_DST_CONNECT_TIMEOUT,
    },
};

/// Relay a connection that is not HTTP: `tls` when its first bytes are a TLS record,
/// `declared` the cluster of its TCP route, if it has one that names a cluster.
pub async fn serve(
    mut stream: Sniffed,
    tls: bool,
    accepted: Accepted,
    declared: Option<&str>,
    snap: &Snapshot,
) -> io::Result<()> {
    let orig = accepted.orig.addr();
    match accepted.direction {
        // Inbound goes to the app whatever the route's cluster.
        Direction::Inbound => {
            relay(stream, orig, Direction::Inbound, ORIG_DST_CONNECT_TIMEOUT).await
        }
        Direction::Outbound => {
            let by_sni = if tls {
                tls_cluster(&mut stream, snap).await
            } else {
                None
            };
            match by_sni.as_deref().or(declared) {
                Some(name) => to_cluster(stream, name, accepted.client, snap).await,
                None => relay(stream, orig, Direction::Outbound, ORIG_DST_CONNECT_TIMEOUT).await,
            }
        }
    }
}

/// The cluster of the TLS route naming the connection's server name, if one does.
async fn tls_cluster(stream: &mut Sniffed, snap: &Snapshot) -> Option<String> {
    let sni = client_hello_sni(stream).await?;
    debug!(sni, "TLS server name");
    snap.router.tls_cluster(&sni).map(String::from)
}

/// Relay to an endpoint of cluster `name`, chosen by the client's address; the connection is
/// closed when the cluster is not defined, is at `max_connections`, or has no usable endpoint.
async fn to_cluster(
    stream: Sniffed,
    name: &str,
    client: ClientAddr,
    snap: &Snapshot,
) -> io::Result<()> {
    let Some(cl) = snap.clusters.get(name) else {
        warn!(cluster = name, "TCP route to a cluster not defined: closed");
        return Ok(());
    };
    if cl.connections_full() {
        warn!(cluster = name, "circuit breaker: max_connections reached");
        return Ok(());
    }
    let hash = cl
        .config
        .lb_policy
        .hashes()
        .then(|| hash_bytes(client.addr().ip().to_string().as_bytes()));
    let Some(pick) = cl.pick(hash) else {
        return Ok(());
    };
    let _open = cl.connection_opened();
    relay(
        stream,
        pick.addr,
        Direction::Outbound,
        cl.config.connect_timeout(),
    )
    .await
}

/// Relay bytes both ways (the client's sniffed first bytes first), passing each half-close on.
async fn relay(
    mut down: Sniffed,
    target: SocketAddr,
    direction: Direction,
    connect_timeout: Duration,
) -> io::Result<()> {
    let mut up = connect(target, direction, connect_timeout).await?;
    transport::relay(&mut down, &mut up).await
}

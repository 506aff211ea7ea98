//! What became of a request: its access log line and request metrics.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use hyper::{Method, StatusCode};
use tracing::info;

use crate::{config::Direction, stats::RouteStats, transport::Accepted};

/// The configuration's `access_log`, as last put in force.
static ACCESS_LOG: AtomicBool = AtomicBool::new(false);

/// Write (or stop writing) the access log: the configuration in force says.
pub fn set_access_log(on: bool) {
    ACCESS_LOG.store(on, Ordering::Relaxed);
}

/// Whether the access log is written: a request keeps its method and path for it only then.
pub fn access_log_on() -> bool {
    ACCESS_LOG.load(Ordering::Relaxed)
}

/// A request's method and path, as the access log writes them.
pub type RequestLine = (Method, String);

/// What became of a request, for stats and the access log. Its names are the route's and the
/// cluster's in the configuration the request was served with.
pub struct Trace<'s> {
    pub route: &'s str,
    pub cluster: &'s str,
    /// The series its route and cluster count in.
    pub stats: &'s RouteStats,
    pub upstream: Option<SocketAddr>,
}

/// The passthrough clusters' series (route `-`), by direction.
static INBOUND_PASSTHROUGH: RouteStats = RouteStats::new();
static OUTBOUND_PASSTHROUGH: RouteStats = RouteStats::new();

impl<'s> Trace<'s> {
    /// A request not routed (yet): to the passthrough cluster of its direction.
    pub fn new(direction: Direction) -> Trace<'s> {
        let (cluster, stats) = match direction {
            Direction::Inbound => ("InboundPassthroughCluster", &INBOUND_PASSTHROUGH),
            Direction::Outbound => ("PassthroughCluster", &OUTBOUND_PASSTHROUGH),
        };
        Trace {
            route: "-",
            cluster,
            stats,
            upstream: None,
        }
    }

    /// Count the request, and log it when the access log is on (`line` is its request line).
    pub fn done(
        &self,
        line: Option<&RequestLine>,
        conn: Accepted,
        status: StatusCode,
        start: Instant,
    ) {
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        self.stats
            .done(self.route, self.cluster, status.as_u16(), ms);
        let Some((method, path)) = line.filter(|_| access_log_on()) else {
            return;
        };
        info!(
            target: "access",
            "{method} {path} {} client={} orig={} route={} cluster={} upstream={} {:.1}ms",
            status.as_u16(),
            conn.client,
            conn.orig,
            self.route,
            self.cluster,
            self.upstream.map_or("-".to_string(), |u| u.to_string()),
            ms
        );
    }
}

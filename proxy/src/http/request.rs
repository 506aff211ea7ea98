//! One request's way: routed, then forwarded to its cluster or to its original destination.
//!
//! On the way to a cluster: faults, mirrors, circuit breakers and retries.

use std::future::Future;

use hyper::{body::Incoming, upgrade::OnUpgrade, Request, Response, StatusCode, Version};
use tracing::debug;

use super::{
    fault,
    headers::{authority, set_headers, strip_hop_by_hop},
    mirror::mirror_all,
    replay::{keep_body, Head},
    response,
    retry::Attempts,
    trace::Trace,
};
use crate::{
    cluster::{hash_bytes, ClusterState, NoSlot},
    config::{Direction, HashPolicy},
    router::Rule,
    snapshot::Snapshot,
    stats::{self, RouteStats},
    transport::{Accepted, ORIG_DST_CONNECT_TIMEOUT},
    upstream::{self, text_response, Body, BodyError, Upstream},
};

/// Route and forward one request.
///
/// What the request's route asks is decided at once, and the request taken apart for it; the
/// future returned keeps that plan, and the attempts' futures are awaited from there. Each
/// async fn that took the request by value kept two copies of it, and its future was copied
/// whole into the one above it (`cargo xtask profile`).
pub fn handle<'s, 't>(
    req: Request<Incoming>,
    conn: Accepted,
    snap: &'s Snapshot,
    trace: &'t mut Trace<'s>,
) -> impl Future<Output = Response<Body>> + use<'s, 't> {
    let mut plan = plan(req, conn, snap);
    async move {
        match plan {
            Plan::Passthrough { req, to, authority } => {
                trace.upstream = Some(to.addr);
                upstream::send(req, to, &authority, None)
                    .await
                    .unwrap_or_else(response::failure_response)
            }
            Plan::Routed {
                route,
                name,
                stats,
                ref mut forward,
            } => {
                if let Some(fault) = &route.fault {
                    if let Some(abort) = fault::inject(fault).await {
                        return abort;
                    }
                }
                trace.route = &route.name;
                trace.cluster = name;
                trace.stats = stats;
                match forward {
                    Some(forward) => forward.run(trace).await,
                    None => text_response(StatusCode::SERVICE_UNAVAILABLE, "no such cluster"),
                }
            }
        }
    }
}

/// What a request's route asks, the request taken apart for it.
enum Plan<'s> {
    /// Inbound, or no route: the original destination (Istio's PassthroughCluster), in the
    /// client's protocol.
    Passthrough {
        req: Request<Body>,
        to: Upstream,
        authority: String,
    },
    /// A route: its fault first, then its cluster (`None` when the configuration has no
    /// cluster of that name).
    Routed {
        route: &'s Rule,
        /// The cluster's name as routed.
        name: &'s str,
        stats: &'s RouteStats,
        forward: Option<Forward<'s>>,
    },
}

/// The plan for `req`, its hop-by-hop headers stripped.
fn plan(mut req: Request<Incoming>, conn: Accepted, snap: &Snapshot) -> Plan<'_> {
    strip_hop_by_hop(req.headers_mut());
    let authority = authority(&req);
    let Some(route) = route(&req, &authority, conn, snap) else {
        let to = Upstream {
            addr: conn.orig.addr(),
            direction: conn.direction,
            http2: req.version() == Version::HTTP_2,
            connect_timeout: ORIG_DST_CONNECT_TIMEOUT,
        };
        return Plan::Passthrough {
            req: req.map(upstream::boxed),
            to,
            authority,
        };
    };
    let (i, name) = route.target.cluster();
    let forward = snap
        .clusters
        .get(name)
        .map(|cluster| Forward::new(req, cluster, name, route, authority, conn, snap));
    Plan::Routed {
        route,
        name,
        stats: &route.stats[i],
        forward,
    }
}

/// The route of an outbound request: its virtual host by authority and original
/// destination, then the first route matching its path, headers and query. Inbound requests
/// are not routed.
fn route<'s>(
    req: &Request<Incoming>,
    authority: &str,
    conn: Accepted,
    snap: &'s Snapshot,
) -> Option<&'s Rule> {
    match conn.direction {
        Direction::Inbound => None,
        Direction::Outbound => {
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let orig = conn.orig.addr();
            snap.router.host(authority, orig).and_then(|vh| {
                debug!(vhost = vh.name, authority, orig = %orig, "virtual host");
                vh.rule(pq, req.headers())
            })
        }
    }
}

/// A routed request on its way to its cluster.
struct Forward<'s> {
    route: &'s Rule,
    snap: &'s Snapshot,
    attempts: Attempts<'s>,
}

impl<'s> Forward<'s> {
    /// `req` made ready for its attempts at `cluster`, with the route's header changes.
    fn new(
        req: Request<Incoming>,
        cluster: &'s ClusterState,
        name: &'s str,
        route: &'s Rule,
        authority: String,
        conn: Accepted,
        snap: &'s Snapshot,
    ) -> Forward<'s> {
        let hash = hash_key(cluster, &req, conn);
        let http2 = req.version() == Version::HTTP_2 || cluster.config.http2;
        let (mut parts, body) = req.into_parts();
        // An upgrade (WebSocket) goes with the first attempt only.
        let on_upgrade = parts.extensions.remove::<OnUpgrade>();
        let mut head = Head::of(parts);
        set_headers(
            &mut head.headers,
            &route.request_headers_to_add,
            &route.request_headers_to_remove,
        );
        Forward {
            route,
            snap,
            attempts: Attempts {
                cluster,
                name,
                head: Some(head),
                body: Some(upstream::boxed(body)),
                kept: None,
                on_upgrade,
                retry: route.retry.as_ref(),
                direction: conn.direction,
                http2,
                authority,
                hash,
            },
        }
    }

    /// Keep the body and mirror the request when the route may send it again; then through
    /// the cluster's circuit breaker and the attempts, within the route's timeout, and the
    /// route's response header changes on the answer.
    async fn run(&mut self, trace: &mut Trace<'_>) -> Response<Body> {
        let route = self.route;
        if route.retry.is_some() || !route.mirrors.is_empty() {
            if let Err(e) = self.keep_and_mirror().await {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the request: {e}"),
                );
            }
        }
        let cl = self.attempts.cluster;
        let deadline = tokio::time::Instant::now() + route.timeout;
        let _slot = match cl.request_slot(deadline).await {
            Ok(slot) => slot,
            Err(NoSlot::Overflow) => {
                stats::inc(
                    "sockmesh_proxy_upstream_rq_overflow_total",
                    &[("cluster", self.attempts.name)],
                );
                return response::overflow();
            }
            Err(NoSlot::Timeout) => return response::timeout(),
        };
        let _active = cl.request_started();
        let Ok(mut resp) = tokio::time::timeout_at(deadline, self.attempts.run(trace)).await else {
            return response::timeout();
        };
        set_headers(
            resp.headers_mut(),
            &route.response_headers_to_add,
            &route.response_headers_to_remove,
        );
        resp
    }

    /// Read the body whole to send it again, if it is small enough, and mirror the request
    /// with it.
    async fn keep_and_mirror(&mut self) -> Result<(), BodyError> {
        let a = &mut self.attempts;
        let Some(body) = a.body.take() else {
            return Ok(());
        };
        let (body, kept) = keep_body(body).await?;
        a.body = Some(body);
        a.kept = kept;
        if let (Some(bytes), Some(head)) = (&a.kept, &a.head) {
            mirror_all(
                self.snap,
                &self.route.mirrors,
                head,
                bytes,
                &a.authority,
                a.hash,
            );
        }
        Ok(())
    }
}

/// The request's hash key for `cluster`'s hash policy: a header's value, or the client's
/// address.
fn hash_key(cluster: &ClusterState, req: &Request<Incoming>, conn: Accepted) -> Option<u64> {
    match &cluster.config.hash_policy {
        Some(HashPolicy {
            header: Some(h), ..
        }) => req
            .headers()
            .get(h.as_str())
            .map(|v| hash_bytes(v.as_bytes())),
        Some(HashPolicy {
            source_ip: true, ..
        }) => Some(hash_bytes(conn.client.addr().ip().to_string().as_bytes())),
        _ => None,
    }
}

//! One request's way: routed, then forwarded to its cluster or to its original destination.
//!
//! On the way to a cluster: faults, mirrors, circuit breakers and retries.

use http_body_util::BodyExt;
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
    stats,
    transport::{Accepted, ORIG_DST_CONNECT_TIMEOUT},
    upstream::{self, text_response, Body, Upstream},
};

/// Route and forward one request.
pub async fn handle<'s>(
    mut req: Request<Incoming>,
    conn: Accepted,
    snap: &'s Snapshot,
    trace: &mut Trace<'s>,
) -> Response<Body> {
    strip_hop_by_hop(req.headers_mut());
    let authority = authority(&req);
    let Some(route) = route(&req, &authority, conn, snap) else {
        // Inbound, or no route: the original destination (Istio's PassthroughCluster).
        return passthrough(req, &authority, conn, trace).await;
    };
    if let Some(fault) = &route.fault {
        if let Some(abort) = fault::inject(fault).await {
            return abort;
        }
    }
    trace.route = &route.name;
    let (i, name) = route.target.cluster();
    trace.cluster = name;
    trace.stats = &route.stats[i];
    let Some(cl) = snap.clusters.get(name) else {
        return text_response(StatusCode::SERVICE_UNAVAILABLE, "no such cluster");
    };
    let to = ToCluster {
        cluster: cl,
        name,
        route,
        authority: &authority,
        conn,
        snap,
    };
    to.forward(req, trace).await
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

/// Forward to the original destination, in the client's protocol.
async fn passthrough(
    req: Request<Incoming>,
    authority: &str,
    conn: Accepted,
    trace: &mut Trace<'_>,
) -> Response<Body> {
    trace.upstream = Some(conn.orig.addr());
    let to = Upstream {
        addr: conn.orig.addr(),
        direction: conn.direction,
        http2: req.version() == Version::HTTP_2,
        connect_timeout: ORIG_DST_CONNECT_TIMEOUT,
    };
    upstream::send(req.map(|b| b.boxed()), to, authority, None)
        .await
        .unwrap_or_else(response::failure_response)
}

/// A routed request and the cluster it goes to.
struct ToCluster<'a> {
    cluster: &'a ClusterState,
    /// The cluster's name as routed.
    name: &'a str,
    route: &'a Rule,
    authority: &'a str,
    conn: Accepted,
    snap: &'a Snapshot,
}

impl ToCluster<'_> {
    /// Apply the route's header changes, mirror the request, and send it through the
    /// cluster's circuit breaker with retries, all within the route's timeout.
    async fn forward(self, req: Request<Incoming>, trace: &mut Trace<'_>) -> Response<Body> {
        // Not a match around the send: its scrutinee would stay alive across the await.
        let mut attempts = match self.attempts(req).await {
            Ok(attempts) => attempts,
            Err(bad_request) => return bad_request,
        };
        self.send(&mut attempts, trace).await
    }

    /// The request made ready for its attempts (mirrored on the way), or the answer to a
    /// body that could not be read.
    async fn attempts(&self, req: Request<Incoming>) -> Result<Attempts<'_>, Response<Body>> {
        let (cl, route) = (self.cluster, self.route);
        let hash = self.hash_key(&req);
        let http2 = req.version() == Version::HTTP_2 || cl.config.http2;
        let (mut parts, body) = req.into_parts();
        // An upgrade (WebSocket) goes with the first attempt only.
        let on_upgrade = parts.extensions.remove::<OnUpgrade>();
        let mut head = Head::of(parts);
        set_headers(
            &mut head.headers,
            &route.request_headers_to_add,
            &route.request_headers_to_remove,
        );
        // Keep the body when it may be sent again, if it is small enough.
        let replay = route.retry.is_some() || !route.mirrors.is_empty();
        let (body, kept) = keep_body(body, replay).await.map_err(|e| {
            text_response(
                StatusCode::BAD_REQUEST,
                &format!("reading the request: {e}"),
            )
        })?;
        if let Some(bytes) = &kept {
            mirror_all(
                self.snap,
                &route.mirrors,
                &head,
                bytes,
                self.authority,
                hash,
            );
        }
        Ok(Attempts {
            cluster: cl,
            name: self.name,
            head: Some(head),
            body: Some(body),
            kept,
            on_upgrade,
            retry: route.retry.as_ref(),
            direction: self.conn.direction,
            http2,
            authority: self.authority,
            hash,
        })
    }

    /// Through the circuit breaker, then the attempts, within the route's timeout; the
    /// route's response header changes on the answer.
    async fn send(&self, attempts: &mut Attempts<'_>, trace: &mut Trace<'_>) -> Response<Body> {
        let cl = self.cluster;
        let deadline = tokio::time::Instant::now() + self.route.timeout;
        let _slot = match cl.request_slot(deadline).await {
            Ok(slot) => slot,
            Err(NoSlot::Overflow) => {
                stats::inc(
                    "sockmesh_proxy_upstream_rq_overflow_total",
                    &[("cluster", self.name)],
                );
                return response::overflow();
            }
            Err(NoSlot::Timeout) => return response::timeout(),
        };
        let _active = cl.request_started();
        let Ok(mut resp) = tokio::time::timeout_at(deadline, attempts.run(trace)).await else {
            return response::timeout();
        };
        set_headers(
            resp.headers_mut(),
            &self.route.response_headers_to_add,
            &self.route.response_headers_to_remove,
        );
        resp
    }

    /// The request's hash key for the cluster's hash policy: a header's value, or the
    /// client's address.
    fn hash_key(&self, req: &Request<Incoming>) -> Option<u64> {
        match &self.cluster.config.hash_policy {
            Some(HashPolicy {
                header: Some(h), ..
            }) => req
                .headers()
                .get(h.as_str())
                .map(|v| hash_bytes(v.as_bytes())),
            Some(HashPolicy {
                source_ip: true, ..
            }) => Some(hash_bytes(
                self.conn.client.addr().ip().to_string().as_bytes(),
            )),
            _ => None,
        }
    }
}

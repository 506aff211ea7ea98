//! HTTP/1.1 and HTTP/2 from clients: each request routed, forwarded, logged and counted.

mod fault;
mod headers;
mod mirror;
mod replay;
mod request;
mod response;
mod retry;
mod trace;

use std::{convert::Infallible, future::Future, io, sync::Arc, time::Instant};

use futures_util::FutureExt;
use hyper::{body::Incoming, server::conn, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::{
    snapshot::Snapshot,
    transport::{Accepted, Sniffed},
    upstream::Body,
};
use headers::strip_hop_by_hop;
pub use trace::set_access_log;
use trace::Trace;

/// Serve a client's HTTP/1.1 connection until it ends, with the routes and clusters of
/// `snapshot`. The protocol is known from the sniff: hyper's own codec for it, without
/// hyper-util's second detection (a read of its own). The codec reads the sniffed first bytes
/// first.
///
/// The connection's future is returned as it is: an async fn around it would keep its
/// arguments beside it, and every move of the future (into the box the listener puts it in)
/// copies the whole of it (`cargo xtask profile`).
pub fn serve_http1(
    stream: Sniffed,
    accepted: Accepted,
    snapshot: Arc<Snapshot>,
) -> impl Future<Output = io::Result<()>> {
    // hyper keeps an HTTP/1.1 request's future in the connection's: not boxed (a trial of
    // the box with `cargo xtask profile` showed no clear change in misses per request).
    let svc = service_fn(move |req| respond(req, accepted, snapshot.clone()));
    // Head and body in one buffer, one write: fewer instructions for the small messages most
    // requests are (`cargo xtask profile`), one copy more of a large body.
    // Half-close: a client that shuts its side after its request still gets the response
    // (HAProxy's default too). And hyper does not read while a request is out just to notice a
    // close, a read that would register every connection with the reactor (see
    // `transport::Conn`); a client that left is noticed when its response is written.
    conn::http1::Builder::new()
        .writev(false)
        .half_close(true)
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades()
        .map(|done| done.map_err(io::Error::other))
}

/// Serve a client's HTTP/2 (prior knowledge) connection until it ends, as
/// [`serve_http1`] does.
pub fn serve_http2(
    stream: Sniffed,
    accepted: Accepted,
    snapshot: Arc<Snapshot>,
) -> impl Future<Output = io::Result<()>> {
    // hyper spawns a task per stream with the request's future in it: boxed here, that task
    // holds a pointer, and the future (some KiB) is not copied on its way in.
    let svc = service_fn(move |req| Box::pin(respond(req, accepted, snapshot.clone())));
    conn::http2::Builder::new(crate::exec::Exec)
        .serve_connection(TokioIo::new(stream), svc)
        .map(|done| done.map_err(io::Error::other))
}

/// A client's request answered: routed and forwarded, its hop-by-hop headers stripped from
/// the response, logged and counted.
///
/// The request line is read before the future is made: an async fn would keep a copy of the
/// request that it borrowed, beside the one it hands on, for as long as it runs.
fn respond(
    req: Request<Incoming>,
    accepted: Accepted,
    snapshot: Arc<Snapshot>,
) -> impl Future<Output = Result<Response<Body>, Infallible>> {
    let start = Instant::now();
    // Only the access log needs the request line once the request has gone.
    let line = trace::access_log_on().then(|| (req.method().clone(), req.uri().path().to_string()));
    async move {
        let mut trace = Trace::new(accepted.direction);
        let mut resp = request::handle(req, accepted, &snapshot, &mut trace).await;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            strip_hop_by_hop(resp.headers_mut());
        }
        trace.done(line.as_ref(), accepted, resp.status(), start);
        Ok(resp)
    }
}

//! Towards endpoints and original destinations: one attempt of a request, HTTP/1.1 or HTTP/2.

mod body;
mod http1;
mod http2;
mod pool;
mod target;

use std::{future::Future, time::Duration};

use futures_util::{future::Either, FutureExt};

use hyper::{Request, Response};

pub use body::{from_bytes, text_response, Body};
pub use pool::reap_idle;
pub use target::{Failure, Upstream};

/// One attempt: connect (or take a pooled connection), send, wait for the response head,
/// within `limit` if there is one. Each protocol's future is returned as it is (no async fn
/// around it): each level of async fn would hold its own copy of the request's space, and
/// every move of the future copies it.
pub fn send(
    req: Request<Body>,
    to: Upstream,
    authority: &str,
    limit: Option<Duration>,
) -> impl Future<Output = Result<Response<Body>, Failure>> + '_ {
    let go = if to.http2 {
        Either::Left(http2::send(req, to, authority))
    } else {
        Either::Right(http1::send(req, to, authority))
    };
    match limit {
        None => Either::Left(go),
        Some(t) => Either::Right(
            tokio::time::timeout(t, go).map(|r| r.unwrap_or_else(|_| Err(Failure::Timeout))),
        ),
    }
}

//! Towards endpoints and original destinations: one attempt of a request, HTTP/1.1 or HTTP/2.

mod body;
mod http1;
mod http2;
mod pool;
mod target;

use std::{future::Future, pin::Pin, time::Duration};

use futures_util::FutureExt;
use hyper::{Request, Response};

pub use body::{boxed, from_bytes, text_response, Body, BodyError};
pub use pool::reap_idle;
pub use target::{Failure, Upstream};

/// One attempt's future, on the heap.
pub type Attempt<'a> = Pin<Box<dyn Future<Output = Result<Response<Body>, Failure>> + Send + 'a>>;

/// One attempt: connect (or take a pooled connection), send, wait for the response head,
/// within `limit` if there is one.
///
/// Boxed, each protocol's future in a box of its own size: the request's futures around it
/// (the retries, the circuit breaker, the route, the response) hold a pointer instead of the
/// KiB or so an attempt takes, and each of them is copied whole when it is made and moved
/// (`cargo xtask profile`). One allocation per attempt costs less than those copies.
pub fn send(
    req: Request<Body>,
    to: Upstream,
    authority: &str,
    limit: Option<Duration>,
) -> Attempt<'_> {
    match (to.http2, limit) {
        (true, None) => Box::pin(http2::send(req, to, authority)),
        (false, None) => Box::pin(http1::send(req, to, authority)),
        (true, Some(t)) => Box::pin(within(t, http2::send(req, to, authority))),
        (false, Some(t)) => Box::pin(within(t, http1::send(req, to, authority))),
    }
}

/// `attempt`, or a timeout failure once `limit` has passed. A combinator, not an async fn,
/// which would keep `attempt` beside the timeout that holds it.
fn within<F>(limit: Duration, attempt: F) -> impl Future<Output = Result<Response<Body>, Failure>>
where
    F: Future<Output = Result<Response<Body>, Failure>>,
{
    tokio::time::timeout(limit, attempt).map(|done| done.unwrap_or(Err(Failure::Timeout)))
}

//! Towards endpoints and original destinations: one attempt of a request, HTTP/1.1 or HTTP/2.

mod body;
mod http1;
mod http2;
mod pool;
mod target;

use std::time::Duration;

use hyper::{Request, Response};

pub use body::{from_bytes, text_response, Body};
pub use pool::reap_idle;
pub use target::{Failure, Upstream};

/// One attempt: connect (or take a pooled connection), send, wait for the response head,
/// within `limit` if there is one.
pub async fn send(
    req: Request<Body>,
    to: Upstream,
    authority: &str,
    limit: Option<Duration>,
) -> Result<Response<Body>, Failure> {
    let go = async {
        if to.http2 {
            http2::send(req, to, authority).await
        } else {
            http1::send(req, to, authority).await
        }
    };
    match limit {
        None => go.await,
        Some(t) => tokio::time::timeout(t, go)
            .await
            .map_err(|_| Failure::Timeout)?,
    }
}

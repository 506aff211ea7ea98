//! Requests over HTTP/1.1, in origin form, over pooled connections; upgrades relayed.

use std::future::Future;

use futures_util::FutureExt;
use hyper::{
    header::{HeaderValue, HOST},
    http::uri::PathAndQuery,
    upgrade::OnUpgrade,
    Method, Request, Response, StatusCode, Uri, Version,
};
use hyper_util::rt::TokioIo;

use super::{body::Body, pool, target::Failure, target::Upstream};

/// Send an HTTP/1.1 request to `to` over a pooled connection; the Host header keeps the
/// client's authority. Upgrades (WebSocket) are relayed once both sides switch.
///
/// The request is made ready here and the pool's future returned as it is, mapped: an async
/// fn around it would hold a second copy of the request's space.
pub fn send(
    mut req: Request<Body>,
    to: Upstream,
    authority: &str,
) -> impl Future<Output = Result<Response<Body>, Failure>> {
    ensure_host(&mut req, to, authority);
    to_origin_form(&mut req);
    *req.version_mut() = Version::HTTP_11;
    let down = req.extensions_mut().remove::<OnUpgrade>();
    pool::send_http1(req, to).map(move |resp| {
        let mut resp = resp?;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(down) = down {
                relay_upgrade(down, hyper::upgrade::on(&mut resp));
            }
        }
        Ok(resp)
    })
}

/// HTTP/1.1 requires Host: the client's authority, else the endpoint's address.
fn ensure_host(req: &mut Request<Body>, to: Upstream, authority: &str) {
    if req.headers().contains_key(HOST) {
        return;
    }
    let host = if authority.is_empty() {
        HeaderValue::from_str(&to.addr.to_string())
    } else {
        HeaderValue::from_str(authority)
    };
    if let Ok(v) = host {
        req.headers_mut().insert(HOST, v);
    }
}

/// The request line names the path (origin form), as clients write it to a server; a
/// CONNECT keeps its authority form.
fn to_origin_form(req: &mut Request<Body>) {
    let absolute = req.uri().scheme().is_some() || req.uri().authority().is_some();
    if absolute && req.method() != Method::CONNECT {
        let pq = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(pq);
    }
}

/// Once both the client's and the upstream's connections have switched, copy bytes between
/// them until either ends.
fn relay_upgrade(down: OnUpgrade, up: OnUpgrade) {
    tokio::spawn(async move {
        if let (Ok(d), Ok(u)) = (down.await, up.await) {
            let _ = crate::transport::relay(&mut TokioIo::new(d), &mut TokioIo::new(u)).await;
        }
    });
}

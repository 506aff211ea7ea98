//! Requests over HTTP/2 (h2c, prior knowledge): streams of the endpoint's shared connection.

use http_body_util::BodyExt;
use hyper::{header::HOST, Request, Response, Uri, Version};

use super::{body::Body, pool, target::Failure, target::Upstream};

/// Send `req` over the endpoint's HTTP/2 connection; the response's body streams. The
/// client's authority becomes `:authority`.
pub async fn send(
    mut req: Request<Body>,
    to: Upstream,
    authority: &str,
) -> Result<Response<Body>, Failure> {
    let mut send = pool::h2_connection(to).await?;
    let reset = |e: hyper::Error| Failure::Reset(e.to_string());
    send.ready().await.map_err(reset)?;
    let host = if authority.is_empty() {
        "localhost"
    } else {
        authority
    };
    // An HTTP/2 client's request has this URI already (its :scheme, :authority and :path).
    let uri = req.uri();
    let same = uri.scheme_str() == Some("http") && uri.authority().is_some_and(|a| a == host);
    if !same {
        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = format!("http://{host}{pq}")
            .parse::<Uri>()
            .map_err(|e| Failure::Reset(e.to_string()))?;
    }
    *req.version_mut() = Version::HTTP_2;
    req.headers_mut().remove(HOST);
    let resp = send.send_request(req).await.map_err(reset)?;
    Ok(resp.map(|b| b.boxed()))
}

//! The body type every request and response goes through, and the bodies the proxy makes.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{Response, StatusCode};

/// Why a body stopped: hyper's error (a client's or an HTTP/1.1 upstream's body) or h2's (an
/// HTTP/2 upstream's).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body, streaming or made here.
pub type Body = BoxBody<Bytes, BodyError>;

/// A body of `bytes`.
pub fn from_bytes(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// `body` (hyper's) as a [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + 'static,
{
    body.map_err(BodyError::from).boxed()
}

/// A response of the proxy's own: `status`, and `text` as a line.
pub fn text_response(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(from_bytes(Bytes::from(format!("{text}\n"))));
    *r.status_mut() = status;
    r
}

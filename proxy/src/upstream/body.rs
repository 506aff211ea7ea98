//! The body type every request and response goes through, and the bodies the proxy makes.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{Response, StatusCode};

/// A request or response body, streaming or made here.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// A body of `bytes`.
pub fn from_bytes(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// A response of the proxy's own: `status`, and `text` as a line.
pub fn text_response(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(from_bytes(Bytes::from(format!("{text}\n"))));
    *r.status_mut() = status;
    r
}

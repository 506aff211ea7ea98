//! The proxy's own answers when a request gets no upstream response.

use hyper::{header::HeaderValue, Response, StatusCode};

use crate::upstream::{text_response, Body, Failure};

/// 504: the route's timeout (or an attempt's) ran out.
pub fn timeout() -> Response<Body> {
    text_response(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
}

/// 503 with `x-envoy-overloaded`: the cluster's circuit breaker has no room for the request.
pub fn overflow() -> Response<Body> {
    let mut r = text_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream overflow (circuit breaker)",
    );
    r.headers_mut()
        .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    r
}

/// The answer to an attempt that got no response.
pub fn failure_response(f: Failure) -> Response<Body> {
    match f {
        Failure::Timeout => timeout(),
        Failure::Connect(e) | Failure::Reset(e) => text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("upstream connect error or disconnect/reset before headers: {e}"),
        ),
    }
}

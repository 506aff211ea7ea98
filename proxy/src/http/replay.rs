//! Keeping a request to send it again (retries, mirrors): its head, and its body when small.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{body::Body as _, http::request::Parts, HeaderMap, Method, Request, Uri, Version};

use crate::upstream::{self, Body, BodyError};

/// Largest request body kept for retries and mirrors; a larger one is sent once, unmirrored.
const REPLAY_LIMIT: usize = 64 * 1024;

/// A request's head, to send it again (retries, mirrors).
#[derive(Clone)]
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

impl Head {
    /// The head of `parts` (its extensions are left behind).
    pub fn of(parts: Parts) -> Head {
        Head {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
        }
    }

    /// A request of this head and `body`.
    pub fn request(&self, body: Body) -> Request<Body> {
        self.clone().into_request(body)
    }

    /// The request of this head and `body`, taking the head.
    pub fn into_request(self, body: Body) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = self.method;
        *r.uri_mut() = self.uri;
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers;
        r
    }
}

/// The body to send first, and a copy of its bytes when it is known to fit the replay limit
/// (read whole for that). A larger or unsized body streams, and is not kept.
pub async fn keep_body(body: Body) -> Result<(Body, Option<Bytes>), BodyError> {
    if !fits(&body) {
        return Ok((body, None));
    }
    let bytes = body.collect().await?.to_bytes();
    Ok((upstream::from_bytes(bytes.clone()), Some(bytes)))
}

/// Whether a request body is known to fit the replay limit (by its length or end).
fn fits(b: &Body) -> bool {
    b.size_hint()
        .upper()
        .is_some_and(|u| u <= REPLAY_LIMIT as u64)
}

//! Headers on the way through: hop-by-hop ones kept on their hop, route changes, authority.

use hyper::{
    header::{HeaderName, HeaderValue, CONNECTION, HOST, TE, UPGRADE},
    HeaderMap, Request,
};

use crate::config;

/// Headers that belong to one connection (RFC 9110 7.6.1) and are not forwarded, besides
/// those the `Connection` header names.
/// Names, not strings: a lookup by string parses the name first, on every request's path
/// (`cargo xtask profile`).
const HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// The request's authority: its URI's, else its Host header, else empty.
pub fn authority<B>(req: &Request<B>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(HOST)
                .and_then(|h| h.to_str().ok())
                .map(String::from)
        })
        .unwrap_or_default()
}

/// Remove the hop-by-hop headers of a request or response before it is forwarded, as Envoy
/// does: `Connection` and the headers it names, Keep-Alive, Proxy-Connection, TE (but
/// `te: trailers`, which gRPC needs, whatever else TE lists or Connection says) and Upgrade.
/// So a client's `connection: close` closes its own connection, not the pooled upstream one.
/// Transfer-Encoding is left to the codec.
///
/// An upgrade (WebSocket) keeps `Upgrade` and `connection: upgrade`. An HTTP/1.1
/// `Upgrade: h2c` does not: it is declined and answered as HTTP/1.1, as if it had not asked
/// (a server may decline an upgrade, RFC 9110 7.8; RFC 9113 dropped this way to HTTP/2, and
/// Envoy declines it too).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: a scan of their few names (standard ones compare as a tag) is
    // cheaper than hashing each hop-by-hop name (`cargo xtask profile`). The scan notes which
    // are there (bit i: HOP_BY_HOP[i]), and only those are removed: a `connection: close`
    // then costs one removal, not six.
    let present = headers
        .keys()
        .filter_map(|k| HOP_BY_HOP.iter().position(|h| h == k))
        .fold(0u8, |bits, i| bits | 1 << i);
    if present == 0 {
        return;
    }
    // Each header looked up only when the scan saw it.
    let has = |name: &HeaderName| present & 1 << position(name) != 0;
    let named = if has(&CONNECTION) {
        connection_tokens(headers)
    } else {
        Vec::new()
    };
    // `te: trailers` goes on (gRPC needs it) even when Connection names TE, as RFC 9110 10.1.4
    // asks a client to; other TE codings are this hop's.
    let te_trailers = has(&TE) && asks_for_trailers(headers);
    let upgrade = has(&UPGRADE) && is_upgrade(headers, &named);
    for name in &named {
        if !(upgrade && name == UPGRADE) {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & 1 << i != 0 && !(upgrade && name == UPGRADE) {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The position of `name` in [`HOP_BY_HOP`].
fn position(name: &HeaderName) -> usize {
    HOP_BY_HOP
        .iter()
        .position(|h| h == name)
        .expect("a hop-by-hop header")
}

/// The header names the `Connection` headers list. `close` names none (it is the commonest
/// token, and the list then stays empty, unallocated); neither does a token that is not a
/// header name. `keep-alive`, the other common value, names a header removed anyway.
fn connection_tokens(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(CONNECTION)
        .iter()
        // The usual values, one token alone, need no split (`cargo xtask profile`).
        .filter(|v| {
            let v = v.as_bytes();
            !(v.eq_ignore_ascii_case(b"close") || v.eq_ignore_ascii_case(b"keep-alive"))
        })
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("close"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect()
}

/// Whether a TE header lists `trailers` (with or without parameters).
fn asks_for_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("trailers")
        })
}

/// An upgrade to pass on: an `Upgrade` header, not to h2c, that `Connection` names.
fn is_upgrade(headers: &HeaderMap, connection_tokens: &[HeaderName]) -> bool {
    headers
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")))
        .is_some()
        && connection_tokens.contains(&UPGRADE)
}

/// A route's header changes: `remove` first, then `add` (replacing a header of the same name).
pub fn set_headers(h: &mut HeaderMap, add: &[config::HeaderValue], remove: &[String]) {
    for name in remove {
        h.remove(name.as_str());
    }
    for hv in add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(hv.name.as_bytes()),
            HeaderValue::from_str(&hv.value),
        ) {
            h.insert(n, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut n: Vec<String> = h
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        n.sort();
        n
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = headers(&[
            ("host", "a"),
            ("connection", "close, X-Hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("x-end", "2"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["host: a", "te: trailers", "x-end: 2"]);
        // TE other than trailers is this hop's.
        let mut h = headers(&[("te", "gzip"), ("x-end", "2")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["x-end: 2"]);
        // Named by Connection (as RFC 9110 asks of a client sending TE), or with other codings,
        // trailers still go on, alone.
        let mut h = headers(&[("connection", "TE"), ("te", "trailers, deflate;q=0.5")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["te: trailers"]);
        // Nothing hop-by-hop: left alone.
        let mut h = headers(&[("host", "a"), ("x-end", "2")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["host: a", "x-end: 2"]);
    }

    #[test]
    fn a_lone_close_or_keep_alive_takes_only_its_own_header() {
        for value in ["close", "Close", "keep-alive", "Keep-Alive"] {
            let mut h = headers(&[
                ("host", "a"),
                ("connection", value),
                ("keep-alive", "timeout=5"),
                ("x-end", "2"),
            ]);
            strip_hop_by_hop(&mut h);
            assert_eq!(names(&h), ["host: a", "x-end: 2"], "{value}");
        }
        // Two Connection lines: the second's token is still honoured.
        let mut h = headers(&[
            ("connection", "close"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), Vec::<String>::new());
    }

    #[test]
    fn upgrades_keep_their_headers_but_h2c_is_declined() {
        let mut ws = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        strip_hop_by_hop(&mut ws);
        assert_eq!(
            names(&ws),
            [
                "connection: upgrade",
                "sec-websocket-key: k",
                "upgrade: websocket"
            ]
        );
        let mut h2c = headers(&[
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
            ("host", "a"),
        ]);
        strip_hop_by_hop(&mut h2c);
        assert_eq!(names(&h2c), ["host: a"]);
        // An Upgrade header the Connection header does not name is not an upgrade.
        let mut stray = headers(&[("upgrade", "websocket"), ("host", "a")]);
        strip_hop_by_hop(&mut stray);
        assert_eq!(names(&stray), ["host: a"]);
    }
}

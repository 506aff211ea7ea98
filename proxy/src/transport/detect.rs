//! Protocol detection: what a connection's first bytes say it is (HTTP/1.1, HTTP/2, TLS, TCP).

use std::{io, time::Duration};

use super::{Conn, Sniffed};

/// What the first bytes of a connection say it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    Tls,
    Tcp,
}

/// The HTTP/2 connection preface, as far as it tells HTTP/2 apart.
const PREFACE: &[u8] = b"PRI * HTTP/2";

/// The longest HTTP method taken for one (`OPTIONS`, `CONNECT`).
const LONGEST_METHOD: usize = 7;

/// What complete first bytes say (tests; connections use [`sniff`]).
#[cfg(test)]
fn detect(first: &[u8]) -> Protocol {
    detect_partial(first).unwrap_or(Protocol::Tcp)
}

/// What the bytes so far say, or None while they are the start of something that the next
/// bytes decide (a client's first segment can be as short as one byte).
pub fn detect_partial(first: &[u8]) -> Option<Protocol> {
    if first.starts_with(PREFACE) {
        return Some(Protocol::Http2);
    }
    if first.is_empty() || PREFACE.starts_with(first) {
        return None;
    }
    if first[0] == 0x16 {
        return tls_record(first);
    }
    http1_method(first)
}

/// A TLS handshake record starts 0x16 0x03; 0x16 then anything else is not TLS.
fn tls_record(first: &[u8]) -> Option<Protocol> {
    match first.get(1) {
        None => None,
        Some(0x03) => Some(Protocol::Tls),
        Some(_) => Some(Protocol::Tcp),
    }
}

/// An upper-case method of 3 to 7 letters and a space is HTTP/1.1.
fn http1_method(first: &[u8]) -> Option<Protocol> {
    let method_len = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match first.get(method_len) {
        Some(b' ') if (3..=LONGEST_METHOD).contains(&method_len) => Some(Protocol::Http1),
        None if method_len <= LONGEST_METHOD => None,
        _ => Some(Protocol::Tcp),
    }
}

/// Read until the first bytes tell the protocol: wait for the first byte (up to `first_limit`
/// if not zero), then at most a second for the rest of a split method or preface. The bytes
/// read are the returned connection's to read again.
pub async fn sniff(stream: Conn, first_limit: Duration) -> io::Result<(Protocol, Sniffed)> {
    let mut conn = Sniffed::new(stream);
    let first = if first_limit.is_zero() {
        conn.read_more().await?
    } else {
        match tokio::time::timeout(first_limit, conn.read_more()).await {
            Ok(r) => r?,
            // Nothing yet: a server-first protocol.
            Err(_) => return Ok((Protocol::Tcp, conn)),
        }
    };
    if first == 0 {
        // The client closed without a byte.
        return Ok((Protocol::Tcp, conn));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        if let Some(p) = detect_partial(conn.first()) {
            return Ok((p, conn));
        }
        match tokio::time::timeout_at(deadline, conn.read_more()).await {
            Ok(Ok(0)) | Err(_) => return Ok((Protocol::Tcp, conn)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_are_told_apart_by_their_first_bytes() {
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(detect(b"OPTIONS * HTTP/1.1"), Protocol::Http1);
        assert_eq!(detect(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Protocol::Http2);
        assert_eq!(detect(&[0x16, 0x03, 0x01, 0x02, 0x00]), Protocol::Tls);
        assert_eq!(detect(b""), Protocol::Tcp);
        assert_eq!(detect(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"), Protocol::Tcp);
        assert_eq!(detect(b"HELLO"), Protocol::Tcp);
        // Split first segments wait for more bytes.
        assert_eq!(detect_partial(b"G"), None);
        assert_eq!(detect_partial(b"GET"), None);
        assert_eq!(detect_partial(b"GET "), Some(Protocol::Http1));
        assert_eq!(detect_partial(b"PRI * H"), None);
        assert_eq!(detect_partial(&[0x16]), None);
        assert_eq!(detect_partial(b"get / HTTP/1.1"), Some(Protocol::Tcp));
        assert_eq!(detect_partial(b"ABCDEFGHIJ"), Some(Protocol::Tcp));
    }

    #[test]
    fn a_client_hello_is_tls() {
        assert_eq!(
            detect(&crate::transport::sni::client_hello("api.example.com")),
            Protocol::Tls
        );
    }
}

//! The server name (SNI) of a TLS connection, read from its ClientHello (kept to send on).

use std::time::Duration;

use super::Sniffed;

/// A TLS record header: content type (1), version (2), length (2).
const RECORD_HEADER: usize = 5;

/// The largest TLS record plaintext, 2^14 bytes.
const MAX_RECORD: usize = 16 * 1024;

/// Wait (up to 5 s) for the whole first TLS record and read its server name. The record is
/// read into the connection's first bytes, which the relay sends on.
pub async fn client_hello_sni(conn: &mut Sniffed) -> Option<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let have = conn.first();
        if have.len() >= RECORD_HEADER {
            let want = RECORD_HEADER + u16::from_be_bytes([have[3], have[4]]) as usize;
            let whole = want.min(MAX_RECORD + RECORD_HEADER);
            if have.len() >= whole {
                return sni(&have[..whole]);
            }
        }
        match tokio::time::timeout_at(deadline, conn.read_more()).await {
            Ok(Ok(n)) if n > 0 => {}
            // Closed, failed or too slow: no name.
            _ => return None,
        }
    }
}

/// The big-endian u16 at `i`, as a length.
fn u16_at(b: &[u8], i: usize) -> Option<usize> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]) as usize)
}

/// The server name (SNI) of a TLS ClientHello record, if it has one.
pub fn sni(record: &[u8]) -> Option<String> {
    // Record header (5), handshake header (4), version (2), random (32).
    if record.first() != Some(&0x16) || record.get(RECORD_HEADER) != Some(&0x01) {
        return None;
    }
    let mut i = RECORD_HEADER + 4 + 2 + 32;
    i += 1 + *record.get(i)? as usize; // session id
    i += 2 + u16_at(record, i)?; // cipher suites
    i += 1 + *record.get(i)? as usize; // compression methods
    let end = (i + 2 + u16_at(record, i)?).min(record.len());
    i += 2;
    while i + 4 <= end {
        let (kind, len) = (u16_at(record, i)?, u16_at(record, i + 2)?);
        let body = record.get(i + 4..i + 4 + len)?;
        if kind == 0 {
            return host_name(body);
        }
        i += 4 + len;
    }
    None
}

/// The host name of a server_name extension: a list length (2), then entries of type (1),
/// length (2) and name; the first entry of type 0 (host_name).
fn host_name(body: &[u8]) -> Option<String> {
    let mut j = 2;
    while j + 3 <= body.len() {
        let name_len = u16_at(body, j + 1)?;
        let name = body.get(j + 3..j + 3 + name_len)?;
        if body[j] == 0 {
            return String::from_utf8(name.to_vec()).ok();
        }
        j += 3 + name_len;
    }
    None
}

/// A minimal TLS 1.2-style ClientHello record naming `server` (the tests' and the fuzz
/// target's round trip).
pub fn client_hello(server: &str) -> Vec<u8> {
    let name = server.as_bytes();
    let mut sni_ext = Vec::new();
    sni_ext.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni_ext.push(0);
    sni_ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni_ext.extend_from_slice(name);
    let mut exts = vec![0, 0];
    exts.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
    exts.extend_from_slice(&sni_ext);
    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[7u8; 32]);
    body.push(0); // no session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_are_read_from_client_hellos() {
        let hello = client_hello("api.example.com");
        assert_eq!(sni(&hello).as_deref(), Some("api.example.com"));
        assert_eq!(sni(&hello[..hello.len() - 3]), None, "truncated");
        assert_eq!(sni(b"GET / HTTP/1.1"), None);
    }
}

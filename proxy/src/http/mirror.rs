//! Request mirroring: fire-and-forget copies of a request to shadow clusters.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    header::{HeaderValue, HOST},
    Version,
};

use super::replay::Head;
use crate::{
    config::{Direction, MirrorPolicy},
    random::chance,
    snapshot::Snapshot,
    upstream::{self, Upstream},
};

/// How long a mirrored request may take.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(15);

/// Copy the request to each of `mirrors` (each for its share of requests).
pub fn mirror_all(
    snap: &Snapshot,
    mirrors: &[MirrorPolicy],
    head: &Head,
    body: &Bytes,
    authority: &str,
    hash: Option<u64>,
) {
    for m in mirrors.iter().filter(|m| chance(m.percentage)) {
        mirror(snap, &m.cluster, head, body.clone(), authority, hash);
    }
}

/// Fire-and-forget copy of a request to `cluster`, its Host with "-shadow" appended.
fn mirror(
    snap: &Snapshot,
    cluster: &str,
    head: &Head,
    body: Bytes,
    authority: &str,
    hash: Option<u64>,
) {
    let Some(cl) = snap.clusters.get(cluster) else {
        return;
    };
    let Some(pick) = cl.pick(hash) else {
        return;
    };
    let host = shadow_host(authority);
    let mut head = head.clone();
    if let Ok(v) = HeaderValue::from_str(&host) {
        head.headers.insert(HOST, v);
    }
    let to = Upstream {
        addr: pick.addr,
        direction: Direction::Outbound,
        http2: cl.config.http2 || head.version == Version::HTTP_2,
        connect_timeout: cl.config.connect_timeout(),
    };
    tokio::spawn(async move {
        let req = head.request(upstream::from_bytes(body));
        if let Ok(resp) = upstream::send(req, to, &host, Some(MIRROR_TIMEOUT)).await {
            // Read the answer so the connection ends cleanly; it is not used.
            let _ = resp.into_body().collect().await;
        }
        drop(pick);
    });
}

/// `authority` with "-shadow" appended to its host.
fn shadow_host(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => format!("{h}-shadow:{p}"),
        _ => format!("{authority}-shadow"),
    }
}

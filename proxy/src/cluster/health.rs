//! Active health checks: each endpoint probed with a TCP connect or an HTTP GET.

use std::{collections::HashMap, io, net::SocketAddr, sync::Mutex, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tracing::{info, warn};

use crate::config::HealthCheck;

/// Active health of one endpoint: healthy until `unhealthy_threshold` probes fail in a row.
struct Probe {
    healthy: bool,
    fails: u32,
    passes: u32,
}

/// The active health of a cluster's endpoints.
#[derive(Default)]
pub struct Probes(Mutex<HashMap<SocketAddr, Probe>>);

impl Probes {
    /// Whether `addr` has failed its health check (and not passed it again since).
    pub fn failing(&self, addr: SocketAddr) -> bool {
        self.0
            .lock()
            .expect("probes lock")
            .get(&addr)
            .is_some_and(|p| !p.healthy)
    }

    /// Count a probe of `addr` in `cluster`; flip the endpoint's health at the thresholds.
    pub fn probed(&self, addr: SocketAddr, ok: bool, hc: &HealthCheck, cluster: &str) {
        let mut map = self.0.lock().expect("probes lock");
        let p = map.entry(addr).or_insert(Probe {
            healthy: true,
            fails: 0,
            passes: 0,
        });
        if ok {
            p.fails = 0;
            p.passes += 1;
            if !p.healthy && p.passes >= hc.healthy_threshold {
                p.healthy = true;
                info!(cluster, endpoint = %addr, "endpoint passes its health check");
            }
        } else {
            p.passes = 0;
            p.fails += 1;
            if p.healthy && p.fails >= hc.unhealthy_threshold {
                p.healthy = false;
                warn!(cluster, endpoint = %addr, "endpoint fails its health check");
            }
        }
    }
}

/// One health probe: a TCP connect, or an HTTP/1.1 GET that must answer 2xx.
pub async fn probe(addr: SocketAddr, hc: &HealthCheck, cluster: &str) -> bool {
    let check = async {
        let mut s = TcpStream::connect(addr).await?;
        let Some(path) = &hc.http_path else {
            return Ok::<bool, io::Error>(true);
        };
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {cluster}\r\nuser-agent: sockmesh-proxy-hc\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        Ok(head.starts_with(b"HTTP/1.") && head[9] == b'2')
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(hc.timeout_ms), check).await,
        Ok(Ok(true))
    )
}

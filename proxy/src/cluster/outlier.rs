//! Passive health (outlier detection): endpoints failing in a row are ejected for a while.

use std::{
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::warn;

use crate::{config::OutlierDetection, fxhash::FxHashMap, stats};

/// One endpoint's record.
#[derive(Default)]
struct Outlier {
    consecutive_5xx: u32,
    ejections: u32,
    until: Option<Instant>,
}

/// The records of a cluster's endpoints.
#[derive(Default)]
pub struct Outliers(Mutex<FxHashMap<SocketAddr, Outlier>>);

impl Outliers {
    /// Whether `addr` is ejected for now.
    pub fn ejected(&self, addr: SocketAddr) -> bool {
        let now = Instant::now();
        self.0
            .lock()
            .expect("outliers lock")
            .get(&addr)
            .and_then(|o| o.until)
            .is_some_and(|t| now < t)
    }

    /// Count an attempt's outcome at `addr` (`failed`: a 5xx, or no response) in `cluster` of
    /// `endpoints` endpoints; eject after `consecutive_5xx` failures in a row, while under the
    /// cap of `max_ejection_percent` (one endpoint may always go).
    pub fn record(
        &self,
        addr: SocketAddr,
        failed: bool,
        od: &OutlierDetection,
        endpoints: usize,
        cluster: &str,
    ) {
        let mut map = self.0.lock().expect("outliers lock");
        let now = Instant::now();
        let ejected_now = map
            .values()
            .filter(|o| o.until.is_some_and(|t| now < t))
            .count();
        let o = map.entry(addr).or_default();
        if !failed {
            o.consecutive_5xx = 0;
            return;
        }
        o.consecutive_5xx += 1;
        let under_cap = ejected_now * 100 / endpoints.max(1) < od.max_ejection_percent as usize;
        if o.consecutive_5xx >= od.consecutive_5xx && under_cap {
            o.ejections += 1;
            o.consecutive_5xx = 0;
            let time = od.base_ejection_time_ms * o.ejections as u64;
            o.until = Some(now + Duration::from_millis(time));
            warn!(cluster, endpoint = %addr, ms = time, "endpoint ejected (outlier)");
            stats::inc(
                "sockmesh_proxy_upstream_ejections_total",
                &[("cluster", cluster), ("endpoint", &addr.to_string())],
            );
        }
    }
}

//! What connections use: the routes and cluster states in force, swapped whole on each change.

use std::sync::{Arc, RwLock};

use crate::{cluster::ClusterState, config::Config, fxhash::FxHashMap, router::Router};

/// Everything a connection needs, swapped as a whole on a change. A connection keeps the one
/// it started with.
pub struct Snapshot {
    pub router: Router,
    pub clusters: FxHashMap<String, Arc<ClusterState>>,
    /// The configuration's text (admin config dump).
    pub source: String,
}

impl Snapshot {
    /// The snapshot of `c`, keeping the state of `previous`'s clusters that `c` leaves as they
    /// were or changes only in their endpoints.
    pub fn new(c: &Config, previous: Option<&Snapshot>) -> Snapshot {
        let clusters = c
            .clusters
            .iter()
            .map(|cl| {
                let old = previous.and_then(|p| p.clusters.get(&cl.name));
                (cl.name.clone(), ClusterState::carried_over(cl, old))
            })
            .collect();
        Snapshot {
            router: Router::new(c),
            clusters,
            source: c.source.clone(),
        }
    }

    /// Start the health checks of the clusters that have one and are not probed yet.
    pub fn start_health_checks(&self) {
        for cl in self.clusters.values() {
            cl.start_health_checks();
        }
    }
}

/// The snapshot in force, shared by the listeners, the admin endpoint and the control.
#[derive(Clone)]
pub struct Shared(Arc<RwLock<Arc<Snapshot>>>);

impl Shared {
    pub fn new(snapshot: Arc<Snapshot>) -> Shared {
        Shared(Arc::new(RwLock::new(snapshot)))
    }

    /// The snapshot in force now.
    pub fn load(&self) -> Arc<Snapshot> {
        self.0.read().expect("config lock").clone()
    }

    /// Put `snapshot` in force for new connections.
    pub fn store(&self, snapshot: Arc<Snapshot>) {
        *self.0.write().expect("config lock") = snapshot;
    }
}

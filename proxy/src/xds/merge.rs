//! The file's configuration with the control plane's resources added, checked as a whole.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::cluster::v3::cluster::DiscoveryType;

use super::{
    cluster::cluster,
    error::Error,
    kind::Kind,
    listener::listener,
    resources::{discovery, Resources},
    route::{route_config, Clusters},
};
use crate::config::{Config, HashPolicy};

/// The file's configuration with the control plane's resources added; checked as a whole.
pub fn merge(file: &Config, r: &Resources) -> Result<Config, Error> {
    if r.is_empty() {
        return Ok(file.clone());
    }
    let mut c = file.clone();
    let mut hashes: BTreeMap<String, HashPolicy> = BTreeMap::new();
    // ORIGINAL_DST clusters stand for the original destination: they are not made clusters.
    let passthrough: BTreeSet<&str> = r
        .clusters
        .values()
        .filter(|c| matches!(discovery(c), Ok(DiscoveryType::OriginalDst)))
        .map(|c| c.name.as_str())
        .collect();
    let mut clusters = Clusters {
        passthrough: &passthrough,
        hashes: &mut hashes,
    };
    let mut route_names = Vec::new();
    for l in r.listeners.values() {
        listener(l, &mut clusters, &mut c, &mut route_names)
            .map_err(|e| e.of(Kind::Listener, &l.name))?;
    }
    for name in route_names {
        // Not (yet) received: its listeners answer with no routes until it is.
        if let Some(rc) = r.routes.get(&name) {
            route_config(rc, &mut clusters, &mut c.virtual_hosts)
                .map_err(|e| e.of(Kind::Route, &name))?;
        }
    }
    for cl in r.clusters.values() {
        if passthrough.contains(cl.name.as_str()) {
            continue;
        }
        let out =
            cluster(cl, r, hashes.get(&cl.name)).map_err(|e| e.of(Kind::Cluster, &cl.name))?;
        c.clusters.push(out);
    }
    c.source = source(file, r);
    c.validate_merged()?;
    Ok(c)
}

/// The file's text, and the names of the control plane's resources in force (admin config
/// dump).
fn source(file: &Config, r: &Resources) -> String {
    format!(
        "{}\n# from the control plane (xDS):\n#   listeners: {:?}\n#   route configurations: {:?}\n#   clusters: {:?}\n#   endpoints of: {:?}\n",
        file.source.trim_end(),
        r.listeners.keys().collect::<Vec<_>>(),
        r.routes.keys().collect::<Vec<_>>(),
        r.clusters.keys().collect::<Vec<_>>(),
        r.endpoints.keys().collect::<Vec<_>>(),
    )
}

//! xDS: arbitrary bytes decoded as a DiscoveryResponse, its resources taken as the response's
//! kind and merged with a file configuration. A merge either fails naming the resource, or
//! gives a configuration that validates and translates.
#![no_main]

use std::collections::BTreeSet;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sockmesh_proxy::{
    config::Config,
    snapshot::Snapshot,
    xds::{merge, Kind, Resources},
};

const FILE: &str = "listeners: []\nclusters: []\n";

fuzz_target!(|data: &[u8]| {
    let Ok(response) = DiscoveryResponse::decode(data) else {
        return;
    };
    let kind = Kind::of(&response.type_url).unwrap_or(Kind::Cluster);
    let mut resources = Resources::default();
    let wanted: BTreeSet<String> = response
        .resources
        .iter()
        .map(|r| r.type_url.clone())
        .collect();
    if resources.take(kind, &response.resources, &wanted).is_err() {
        return;
    }
    let _ = resources.wanted(kind);
    let file = Config::parse("file.yaml", FILE).expect("the file configuration");
    let Ok(merged) = merge(&file, &resources) else {
        return;
    };
    merged
        .validate_merged()
        .expect("a merged configuration is checked as a whole by merge");
    let snapshot = Snapshot::new(&merged, None);
    assert_eq!(snapshot.clusters.len(), merged.clusters.len());
});

//! The four resource types the proxy follows, and their type URLs.

use std::fmt;

use envoy_types::pb::envoy::config::{
    cluster::v3 as cds, endpoint::v3 as eds, listener::v3 as lds, route::v3 as rds,
};
use prost::Name;

/// The resource types, in the order Envoy asks for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Cluster,
    Endpoint,
    Listener,
    Route,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Cluster, Kind::Endpoint, Kind::Listener, Kind::Route];

    pub fn type_url(self) -> String {
        match self {
            Kind::Cluster => cds::Cluster::type_url(),
            Kind::Endpoint => eds::ClusterLoadAssignment::type_url(),
            Kind::Listener => lds::Listener::type_url(),
            Kind::Route => rds::RouteConfiguration::type_url(),
        }
    }

    /// The kind of a response's type URL, if it is one of the four.
    pub fn of(type_url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == type_url)
    }

    /// Clusters and listeners are asked for by wildcard; endpoints and routes by name.
    pub fn wildcard(self) -> bool {
        matches!(self, Kind::Cluster | Kind::Listener)
    }
}

/// The resource's message name: `Cluster`, `ClusterLoadAssignment`, `Listener`,
/// `RouteConfiguration`.
impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Cluster => cds::Cluster::NAME,
            Kind::Endpoint => eds::ClusterLoadAssignment::NAME,
            Kind::Listener => lds::Listener::NAME,
            Kind::Route => rds::RouteConfiguration::NAME,
        })
    }
}

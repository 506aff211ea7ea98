//! The control plane's resources in force, by name, and the names to ask for next.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{self as cds, cluster::DiscoveryType},
            endpoint::v3 as eds,
            listener::v3 as lds,
            route::v3 as rds,
        },
        extensions::filters::network::http_connection_manager::v3::{
            http_connection_manager::RouteSpecifier, HttpConnectionManager,
        },
    },
    google::protobuf::Any,
};
use prost::{Message, Name};

use super::{
    error::{Error, Problem},
    kind::Kind,
    proto::unpack,
};

/// The control plane's resources, by name.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub clusters: BTreeMap<String, cds::Cluster>,
    pub endpoints: BTreeMap<String, eds::ClusterLoadAssignment>,
    pub listeners: BTreeMap<String, lds::Listener>,
    pub routes: BTreeMap<String, rds::RouteConfiguration>,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
            && self.endpoints.is_empty()
            && self.listeners.is_empty()
            && self.routes.is_empty()
    }

    /// Take a response's resources of `kind`: all of them for a wildcard kind, the named ones
    /// otherwise (`wanted` drops the ones no longer asked for).
    pub fn take(
        &mut self,
        kind: Kind,
        resources: &[Any],
        wanted: &BTreeSet<String>,
    ) -> Result<(), Error> {
        match kind {
            Kind::Cluster => {
                self.clusters = decode(kind, resources, |c: &cds::Cluster| c.name.clone())?
            }
            Kind::Listener => {
                self.listeners = decode(kind, resources, |l: &lds::Listener| l.name.clone())?
            }
            Kind::Endpoint => keep_wanted(
                &mut self.endpoints,
                decode(kind, resources, |c: &eds::ClusterLoadAssignment| {
                    c.cluster_name.clone()
                })?,
                wanted,
            ),
            Kind::Route => keep_wanted(
                &mut self.routes,
                decode(kind, resources, |r: &rds::RouteConfiguration| {
                    r.name.clone()
                })?,
                wanted,
            ),
        }
        Ok(())
    }

    /// The names of `kind` to ask for: the EDS clusters' services, the listeners' route
    /// configurations (empty for the wildcard kinds).
    pub fn wanted(&self, kind: Kind) -> BTreeSet<String> {
        match kind {
            Kind::Cluster | Kind::Listener => BTreeSet::new(),
            Kind::Endpoint => self
                .clusters
                .values()
                .filter(|c| matches!(discovery(c), Ok(DiscoveryType::Eds)))
                .map(eds_service)
                .collect(),
            Kind::Route => self
                .listeners
                .values()
                .flat_map(|l| l.filter_chains.iter().chain(l.default_filter_chain.iter()))
                .flat_map(|ch| ch.filters.iter())
                .filter_map(|f| match &f.config_type {
                    Some(lds::filter::ConfigType::TypedConfig(any)) => {
                        unpack::<HttpConnectionManager>(any).ok().flatten()
                    }
                    _ => None,
                })
                .filter_map(|h| match h.route_specifier {
                    Some(RouteSpecifier::Rds(r)) => Some(r.route_config_name),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// Add `got` to `held`, then keep only the `wanted` names.
fn keep_wanted<M>(
    held: &mut BTreeMap<String, M>,
    got: BTreeMap<String, M>,
    wanted: &BTreeSet<String>,
) {
    held.extend(got);
    held.retain(|n, _| wanted.contains(n));
}

/// A response's resources of `kind`, as `M`s by name.
fn decode<M: Message + Name + Default>(
    kind: Kind,
    resources: &[Any],
    name: impl Fn(&M) -> String,
) -> Result<BTreeMap<String, M>, Error> {
    let mut out = BTreeMap::new();
    for (index, any) in resources.iter().enumerate() {
        let m = unpack::<M>(any)
            .and_then(|m| {
                m.ok_or_else(|| Problem::WrongType {
                    found: any.type_url.clone(),
                    expected: M::type_url(),
                })
            })
            .map_err(|problem| Error::Undecodable { index, problem })?;
        let n = name(&m);
        if out.insert(n.clone(), m).is_some() {
            return Err(Error::SentTwice { kind, name: n });
        }
    }
    Ok(out)
}

/// How a cluster finds its endpoints.
pub fn discovery(c: &cds::Cluster) -> Result<DiscoveryType, Problem> {
    use cds::cluster::ClusterDiscoveryType;
    match &c.cluster_discovery_type {
        None => Ok(DiscoveryType::Static),
        Some(ClusterDiscoveryType::Type(t)) => {
            DiscoveryType::try_from(*t).map_err(|_| Problem::Unknown {
                field: "type",
                value: *t,
            })
        }
        Some(ClusterDiscoveryType::ClusterType(t)) => {
            Err(Problem::CustomClusterType(t.name.clone()))
        }
    }
}

/// The name an EDS cluster's endpoints go by: its `service_name`, else its own.
pub fn eds_service(c: &cds::Cluster) -> String {
    c.eds_cluster_config
        .as_ref()
        .map(|e| e.service_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| c.name.clone())
}

//! Dynamic configuration from a control plane: Envoy's xDS v3 on one aggregated (ADS) stream,
//! state of the world. Clusters (CDS) and listeners (LDS) are asked for by wildcard; the
//! endpoints (EDS) of the EDS clusters and the route configurations (RDS) the listeners name
//! follow. Each response is translated into the proxy's own configuration, merged with the
//! file's and installed whole; it is acknowledged when it is in force and refused (NACK, with
//! the reason) when it cannot be, the previous resources staying in force.
//!
//! The subset understood is the one the proxy can honour; anything else that would change
//! behaviour is refused by name rather than ignored. See proxy/README.md.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3 as cds,
            core::v3 as core,
            endpoint::v3 as eds,
            listener::v3 as lds,
            route::v3::{self as rds, route_action::hash_policy::PolicySpecifier},
        },
        extensions::{
            filters::{
                common::fault::v3::fault_delay::FaultDelaySecifier,
                http::fault::v3::{fault_abort::ErrorType, HttpFault},
                network::{
                    http_connection_manager::v3::{
                        http_connection_manager::RouteSpecifier, http_filter, HttpConnectionManager,
                    },
                    tcp_proxy::v3::{tcp_proxy::ClusterSpecifier, TcpProxy},
                },
            },
            upstreams::http::v3::{
                http_protocol_options::{
                    explicit_http_config::ProtocolConfig, UpstreamProtocolOptions,
                },
                HttpProtocolOptions,
            },
        },
        r#type::{
            matcher::v3::{string_matcher::MatchPattern, StringMatcher},
            v3::{fractional_percent::DenominatorType, FractionalPercent},
        },
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DiscoveryRequest, DiscoveryResponse,
        },
    },
    google::{protobuf::Any, rpc::Status},
};
use prost::{Message, Name};
use tracing::{info, warn};

use crate::{
    config::{
        CircuitBreakers, Cluster, Config, Direction, EndpointConfig, Fault, FaultAbort, FaultDelay,
        HashPolicy, HeaderMatch, HeaderValue, HealthCheck, LbPolicy, Listener, MirrorPolicy,
        OutlierDetection, QueryMatch, RetryBudget, RetryPolicy, Route, RouteAction, RouteMatch,
        TcpRoute, TlsRoute, VirtualHost, WeightedCluster, XdsSettings,
    },
    control::Control,
};

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

    fn of(type_url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == type_url)
    }

    /// Clusters and listeners are asked for by wildcard; endpoints and routes by name.
    fn wildcard(self) -> bool {
        matches!(self, Kind::Cluster | Kind::Listener)
    }
}

/// The control plane's resources, by name.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub clusters: BTreeMap<String, cds::Cluster>,
    pub endpoints: BTreeMap<String, eds::ClusterLoadAssignment>,
    pub listeners: BTreeMap<String, lds::Listener>,
    pub routes: BTreeMap<String, rds::RouteConfiguration>,
}

impl Resources {
    fn is_empty(&self) -> bool {
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
    ) -> Result<(), String> {
        fn decode<M: Message + Name + Default>(
            resources: &[Any],
            name: impl Fn(&M) -> String,
        ) -> Result<BTreeMap<String, M>, String> {
            let mut out = BTreeMap::new();
            for (i, any) in resources.iter().enumerate() {
                let m = unpack::<M>(any)
                    .map_err(|e| format!("resources[{i}]: {e}"))?
                    .ok_or_else(|| {
                        format!(
                            "resources[{i}]: a {} in a response of {}",
                            any.type_url,
                            M::type_url()
                        )
                    })?;
                let n = name(&m);
                if out.insert(n.clone(), m).is_some() {
                    return Err(format!("{} {n:?} is sent twice", M::NAME));
                }
            }
            Ok(out)
        }
        match kind {
            Kind::Cluster => self.clusters = decode(resources, |c: &cds::Cluster| c.name.clone())?,
            Kind::Listener => {
                self.listeners = decode(resources, |l: &lds::Listener| l.name.clone())?
            }
            Kind::Endpoint => {
                let got = decode(resources, |c: &eds::ClusterLoadAssignment| {
                    c.cluster_name.clone()
                })?;
                self.endpoints.extend(got);
                self.endpoints.retain(|n, _| wanted.contains(n));
            }
            Kind::Route => {
                let got = decode(resources, |r: &rds::RouteConfiguration| r.name.clone())?;
                self.routes.extend(got);
                self.routes.retain(|n, _| wanted.contains(n));
            }
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
                .filter(|c| discovery(c) == Ok(cds::cluster::DiscoveryType::Eds))
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

/// `any` as an `M`, or `None` when it holds another type.
fn unpack<M: Message + Name + Default>(any: &Any) -> Result<Option<M>, String> {
    if any.type_url != M::type_url() {
        return Ok(None);
    }
    M::decode(any.value.as_slice())
        .map(Some)
        .map_err(|e| format!("not a valid {}: {e}", M::full_name()))
}

fn discovery(c: &cds::Cluster) -> Result<cds::cluster::DiscoveryType, String> {
    use cds::cluster::{ClusterDiscoveryType, DiscoveryType};
    match &c.cluster_discovery_type {
        None => Ok(DiscoveryType::Static),
        Some(ClusterDiscoveryType::Type(t)) => {
            DiscoveryType::try_from(*t).map_err(|_| format!("type {t} is unknown"))
        }
        Some(ClusterDiscoveryType::ClusterType(t)) => {
            Err(format!("custom cluster type {:?} is not supported", t.name))
        }
    }
}

fn eds_service(c: &cds::Cluster) -> String {
    c.eds_cluster_config
        .as_ref()
        .map(|e| e.service_name.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| c.name.clone())
}

fn ms(d: &Option<envoy_types::pb::google::protobuf::Duration>) -> Option<u64> {
    d.as_ref()
        .map(|d| d.seconds.max(0) as u64 * 1000 + d.nanos.max(0) as u64 / 1_000_000)
}

fn u32v(v: &Option<envoy_types::pb::google::protobuf::UInt32Value>) -> Option<u32> {
    v.as_ref().map(|v| v.value)
}

/// A fractional percent as a percentage (0 to 100); none is 100.
fn percent(f: &Option<FractionalPercent>) -> f64 {
    let Some(f) = f else { return 100.0 };
    let denominator = match DenominatorType::try_from(f.denominator) {
        Ok(DenominatorType::TenThousand) => 10_000.0,
        Ok(DenominatorType::Million) => 1_000_000.0,
        _ => 100.0,
    };
    (f.numerator as f64 / denominator * 100.0).min(100.0)
}

fn socket_addr(a: &Option<core::Address>, what: &str) -> Result<SocketAddr, String> {
    use core::{address::Address, socket_address::PortSpecifier};
    let Some(Address::SocketAddress(sa)) = a.as_ref().and_then(|a| a.address.as_ref()) else {
        return Err(format!("{what}: needs a socket_address"));
    };
    let ip: IpAddr = sa.address.parse().map_err(|_| {
        format!(
            "{what}: {:?} is not an IP address (sockmesh-proxy does not resolve names)",
            sa.address
        )
    })?;
    match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) if p <= 65535 => Ok(SocketAddr::new(ip, p as u16)),
        _ => Err(format!("{what}: needs a port_value of 0 to 65535")),
    }
}

/// Route timeouts of 0 mean none in Envoy: a year stands for it.
const NO_TIMEOUT_MS: u64 = 365 * 24 * 3600 * 1000;

/// The file's configuration with the control plane's resources added; checked as a whole.
pub fn merge(file: &Config, r: &Resources) -> Result<Config, String> {
    if r.is_empty() {
        return Ok(file.clone());
    }
    let mut c = file.clone();
    let mut hashes: BTreeMap<String, HashPolicy> = BTreeMap::new();
    let passthrough: BTreeSet<&str> = r
        .clusters
        .values()
        .filter(|c| discovery(c) == Ok(cds::cluster::DiscoveryType::OriginalDst))
        .map(|c| c.name.as_str())
        .collect();
    let mut route_names = Vec::new();
    for l in r.listeners.values() {
        listener(l, &passthrough, &mut c, &mut route_names, &mut hashes)
            .map_err(|e| format!("Listener {:?}: {e}", l.name))?;
    }
    for name in route_names {
        // Not (yet) received: its listeners answer with no routes until it is.
        if let Some(rc) = r.routes.get(&name) {
            route_config(rc, &passthrough, &mut c.virtual_hosts, &mut hashes)
                .map_err(|e| format!("RouteConfiguration {name:?}: {e}"))?;
        }
    }
    for cl in r.clusters.values() {
        if passthrough.contains(cl.name.as_str()) {
            continue;
        }
        let out = cluster(cl, r, hashes.get(&cl.name))
            .map_err(|e| format!("Cluster {:?}: {e}", cl.name))?;
        c.clusters.push(out);
    }
    c.source = format!(
        "{}\n# from the control plane (xDS):\n#   listeners: {:?}\n#   route configurations: {:?}\n#   clusters: {:?}\n#   endpoints of: {:?}\n",
        file.source.trim_end(),
        r.listeners.keys().collect::<Vec<_>>(),
        r.routes.keys().collect::<Vec<_>>(),
        r.clusters.keys().collect::<Vec<_>>(),
        r.endpoints.keys().collect::<Vec<_>>(),
    );
    c.validate_merged()?;
    Ok(c)
}

fn listener(
    l: &lds::Listener,
    passthrough: &BTreeSet<&str>,
    c: &mut Config,
    route_names: &mut Vec<String>,
    hashes: &mut BTreeMap<String, HashPolicy>,
) -> Result<(), String> {
    let address = socket_addr(&l.address, "address")?;
    if l.bind_to_port.as_ref().is_some_and(|b| !b.value) {
        return Err("bind_to_port false (a listener reached through another's original destination) is not supported".into());
    }
    let direction = match core::TrafficDirection::try_from(l.traffic_direction) {
        Ok(core::TrafficDirection::Inbound) => Direction::Inbound,
        Ok(core::TrafficDirection::Outbound | core::TrafficDirection::Unspecified) => {
            Direction::Outbound
        }
        Err(_) => {
            return Err(format!(
                "traffic_direction {} is unknown",
                l.traffic_direction
            ))
        }
    };
    c.listeners.push(Listener {
        name: l.name.clone(),
        address,
        direction,
        // Unset waits for the client's first bytes, as Istio's protocol detection does.
        detect_timeout_ms: ms(&l.listener_filters_timeout).unwrap_or(0),
    });
    let chains = l.filter_chains.iter().chain(l.default_filter_chain.iter());
    for (i, chain) in chains.enumerate() {
        let m = chain.filter_chain_match.clone().unwrap_or_default();
        if chain.transport_socket.is_some() {
            return Err(format!(
                "filter_chains[{i}]: transport_socket (TLS termination) is not supported"
            ));
        }
        for (j, f) in chain.filters.iter().enumerate() {
            let at = format!("filter_chains[{i}].filters[{j}] ({})", f.name);
            let any = match &f.config_type {
                Some(lds::filter::ConfigType::TypedConfig(any)) => any,
                _ => return Err(format!("{at}: needs a typed_config")),
            };
            if let Some(h) =
                unpack::<HttpConnectionManager>(any).map_err(|e| format!("{at}: {e}"))?
            {
                for (k, hf) in h.http_filters.iter().enumerate() {
                    let known = match &hf.config_type {
                        Some(http_filter::ConfigType::TypedConfig(a)) => {
                            a.type_url.ends_with(".filters.http.router.v3.Router")
                                || a.type_url.ends_with(".filters.http.fault.v3.HTTPFault")
                        }
                        _ => false,
                    };
                    if !known && !hf.is_optional && !hf.disabled {
                        return Err(format!(
                            "{at}: http_filters[{k}] ({}): not supported (router and fault are); mark it is_optional to go without it",
                            hf.name
                        ));
                    }
                }
                match &h.route_specifier {
                    Some(RouteSpecifier::Rds(r)) => route_names.push(r.route_config_name.clone()),
                    Some(RouteSpecifier::RouteConfig(rc)) => {
                        route_config(rc, passthrough, &mut c.virtual_hosts, hashes)
                            .map_err(|e| format!("{at}: route_config: {e}"))?
                    }
                    _ => {
                        return Err(format!(
                            "{at}: needs rds or route_config (scoped routes are not supported)"
                        ))
                    }
                }
            } else if let Some(t) = unpack::<TcpProxy>(any).map_err(|e| format!("{at}: {e}"))? {
                let cluster = match &t.cluster_specifier {
                    Some(ClusterSpecifier::Cluster(name)) => name.clone(),
                    _ => {
                        return Err(format!(
                            "{at}: needs a cluster (weighted TCP clusters are not supported)"
                        ))
                    }
                };
                // To the original destination: what the proxy does with unrouted TCP.
                let to = (!passthrough.contains(cluster.as_str())).then_some(cluster);
                if !m.server_names.is_empty() {
                    // Without a cluster, TLS goes to its original destination anyway.
                    if let Some(cl) = &to {
                        c.tls_routes
                            .extend(m.server_names.iter().map(|sni| TlsRoute {
                                sni: sni.clone(),
                                cluster: cl.clone(),
                            }))
                    }
                } else if let Some(port) = u32v(&m.destination_port) {
                    c.tcp_routes.push(TcpRoute {
                        destination: port.to_string(),
                        cluster: to,
                    });
                } else if to.is_some() {
                    return Err(format!(
                        "{at}: a tcp_proxy to a cluster needs a destination_port or server_names match (unmatched TCP goes to its original destination)"
                    ));
                }
            } else {
                return Err(format!(
                    "{at}: {} is not supported (http_connection_manager and tcp_proxy are)",
                    any.type_url
                ));
            }
        }
    }
    Ok(())
}

fn header_values(v: &[core::HeaderValueOption]) -> Vec<HeaderValue> {
    v.iter()
        .filter_map(|o| o.header.as_ref())
        .map(|h| HeaderValue {
            name: h.key.clone(),
            value: h.value.clone(),
        })
        .collect()
}

fn route_config(
    rc: &rds::RouteConfiguration,
    passthrough: &BTreeSet<&str>,
    out: &mut Vec<VirtualHost>,
    hashes: &mut BTreeMap<String, HashPolicy>,
) -> Result<(), String> {
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let at = format!("virtual_hosts[{i}] ({})", vh.name);
        let mut routes = Vec::new();
        for (j, r) in vh.routes.iter().enumerate() {
            let mut route =
                route(r, passthrough, hashes).map_err(|e| format!("{at}.routes[{j}]: {e}"))?;
            // Envoy's order: the route's header changes, then the virtual host's, then the
            // route configuration's.
            for (add, more) in [
                (
                    &mut route.request_headers_to_add,
                    [&vh.request_headers_to_add, &rc.request_headers_to_add],
                ),
                (
                    &mut route.response_headers_to_add,
                    [&vh.response_headers_to_add, &rc.response_headers_to_add],
                ),
            ] {
                for m in more {
                    add.extend(header_values(m));
                }
            }
            for (remove, more) in [
                (
                    &mut route.request_headers_to_remove,
                    [&vh.request_headers_to_remove, &rc.request_headers_to_remove],
                ),
                (
                    &mut route.response_headers_to_remove,
                    [
                        &vh.response_headers_to_remove,
                        &rc.response_headers_to_remove,
                    ],
                ),
            ] {
                for m in more {
                    remove.extend(m.iter().cloned());
                }
            }
            routes.push(route);
        }
        out.push(VirtualHost {
            name: vh.name.clone(),
            domains: vh.domains.clone(),
            routes,
        });
    }
    Ok(())
}

/// A string matcher as a regex (`None`: an exact value).
fn string_match(m: &StringMatcher) -> Result<(Option<String>, Option<String>), String> {
    if m.ignore_case {
        return Err("ignore_case is not supported".into());
    }
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(v)) => (Some(v.clone()), None),
        Some(MatchPattern::Prefix(p)) => (None, Some(format!("{}.*", regex::escape(p)))),
        Some(MatchPattern::Suffix(s)) => (None, Some(format!(".*{}", regex::escape(s)))),
        Some(MatchPattern::Contains(s)) => (None, Some(format!(".*{}.*", regex::escape(s)))),
        Some(MatchPattern::SafeRegex(r)) => (None, Some(r.regex.clone())),
        _ => return Err("needs exact, prefix, suffix, contains or safe_regex".into()),
    })
}

// Older control planes still send the deprecated header matchers.
#[allow(deprecated)]
fn route(
    r: &rds::Route,
    passthrough: &BTreeSet<&str>,
    hashes: &mut BTreeMap<String, HashPolicy>,
) -> Result<Route, String> {
    use rds::{
        header_matcher::HeaderMatchSpecifier as H,
        query_parameter_matcher::QueryParameterMatchSpecifier as Q,
        route_match::PathSpecifier as P,
    };
    let m = r.r#match.clone().unwrap_or_default();
    if m.runtime_fraction.is_some() {
        return Err("match.runtime_fraction is not supported".into());
    }
    if m.case_sensitive.as_ref().is_some_and(|c| !c.value) {
        return Err("match.case_sensitive false is not supported".into());
    }
    let mut matcher = RouteMatch::default();
    match &m.path_specifier {
        Some(P::Prefix(p)) => matcher.prefix = Some(p.clone()),
        Some(P::Path(p)) => matcher.path = Some(p.clone()),
        Some(P::SafeRegex(re)) => matcher.regex = Some(re.regex.clone()),
        _ => return Err("match needs prefix, path or safe_regex".into()),
    }
    for (k, h) in m.headers.iter().enumerate() {
        let at = format!("match.headers[{k}] ({})", h.name);
        let (exact, regex, present) = match &h.header_match_specifier {
            Some(H::ExactMatch(v)) => (Some(v.clone()), None, None),
            Some(H::SafeRegexMatch(re)) => (None, Some(re.regex.clone()), None),
            Some(H::PrefixMatch(p)) => (None, Some(format!("{}.*", regex::escape(p))), None),
            Some(H::SuffixMatch(s)) => (None, Some(format!(".*{}", regex::escape(s))), None),
            Some(H::ContainsMatch(s)) => (None, Some(format!(".*{}.*", regex::escape(s))), None),
            Some(H::StringMatch(sm)) => {
                let (e, re) = string_match(sm).map_err(|e| format!("{at}: {e}"))?;
                (e, re, None)
            }
            Some(H::PresentMatch(p)) => (None, None, Some(*p != h.invert_match)),
            None => (None, None, Some(!h.invert_match)),
            Some(H::RangeMatch(_)) => return Err(format!("{at}: range_match is not supported")),
        };
        if h.invert_match && present.is_none() {
            return Err(format!(
                "{at}: invert_match is supported with present_match only"
            ));
        }
        matcher.headers.push(HeaderMatch {
            name: h.name.clone(),
            exact,
            regex,
            present,
        });
    }
    for (k, q) in m.query_parameters.iter().enumerate() {
        let at = format!("match.query_parameters[{k}] ({})", q.name);
        let (exact, present) = match &q.query_parameter_match_specifier {
            Some(Q::StringMatch(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(v)),
                ignore_case: false,
            })) => (Some(v.clone()), None),
            Some(Q::PresentMatch(p)) => (None, Some(*p)),
            None => (None, Some(true)),
            Some(Q::StringMatch(_)) => {
                return Err(format!("{at}: only exact string matches are supported"))
            }
        };
        matcher.query.push(QueryMatch {
            name: q.name.clone(),
            exact,
            present,
        });
    }
    let ra = match &r.action {
        Some(rds::route::Action::Route(ra)) => ra,
        _ => {
            return Err(
                "only route actions are supported (not redirect, direct_response, ...)".into(),
            )
        }
    };
    let usable = |name: &str| -> Result<String, String> {
        if passthrough.contains(name) {
            Err(format!("cluster {name:?} is ORIGINAL_DST: routes to it are not supported (unrouted requests go to their original destination)"))
        } else {
            Ok(name.to_string())
        }
    };
    if !ra.prefix_rewrite.is_empty()
        || ra.regex_rewrite.is_some()
        || ra.host_rewrite_specifier.is_some()
    {
        return Err("path and host rewrites are not supported".into());
    }
    use rds::route_action::ClusterSpecifier as C;
    let (cluster, weighted_clusters) = match &ra.cluster_specifier {
        Some(C::Cluster(name)) => (Some(usable(name)?), Vec::new()),
        Some(C::WeightedClusters(w)) => (
            None,
            w.clusters
                .iter()
                .map(|cw| {
                    Ok(WeightedCluster {
                        name: usable(&cw.name)?,
                        weight: u32v(&cw.weight).unwrap_or(0),
                    })
                })
                .collect::<Result<_, String>>()?,
        ),
        _ => return Err("route needs cluster or weighted_clusters".into()),
    };
    if let Some(h) = ra.hash_policy.first() {
        let policy = match &h.policy_specifier {
            Some(PolicySpecifier::Header(h)) => HashPolicy {
                header: Some(h.header_name.clone()),
                source_ip: false,
            },
            Some(PolicySpecifier::ConnectionProperties(p)) if p.source_ip => HashPolicy {
                header: None,
                source_ip: true,
            },
            _ => {
                return Err(
                    "hash_policy: header and connection_properties.source_ip are supported".into(),
                )
            }
        };
        for name in cluster
            .iter()
            .chain(weighted_clusters.iter().map(|w| &w.name))
        {
            hashes.entry(name.clone()).or_insert_with(|| policy.clone());
        }
    }
    let retry_policy = ra.retry_policy.as_ref().map(|rp| RetryPolicy {
        retry_on: if rp.retry_on.is_empty() {
            "5xx,connect-failure,reset".into()
        } else {
            rp.retry_on.clone()
        },
        num_retries: u32v(&rp.num_retries).unwrap_or(1),
        per_try_timeout_ms: ms(&rp.per_try_timeout).unwrap_or(0),
        base_interval_ms: rp
            .retry_back_off
            .as_ref()
            .and_then(|b| ms(&b.base_interval))
            .unwrap_or(25),
    });
    let request_mirror_policies = ra
        .request_mirror_policies
        .iter()
        .map(|m| {
            Ok(MirrorPolicy {
                cluster: usable(&m.cluster)?,
                percentage: percent(&m.runtime_fraction.as_ref().and_then(|f| f.default_value)),
            })
        })
        .collect::<Result<_, String>>()?;
    let fault = match r.typed_per_filter_config.get("envoy.filters.http.fault") {
        None => None,
        Some(any) => {
            let f = unpack::<HttpFault>(any)
                .map_err(|e| format!("typed_per_filter_config: {e}"))?
                .ok_or("typed_per_filter_config[envoy.filters.http.fault]: needs an HTTPFault")?;
            let delay = match &f.delay {
                None => None,
                Some(d) => match &d.fault_delay_secifier {
                    Some(FaultDelaySecifier::FixedDelay(t)) => Some(FaultDelay {
                        fixed_delay_ms: ms(&Some(*t)).unwrap_or(0),
                        percentage: percent(&d.percentage),
                    }),
                    _ => return Err("fault.delay: only fixed_delay is supported".into()),
                },
            };
            let abort = match &f.abort {
                None => None,
                Some(a) => match a.error_type {
                    Some(ErrorType::HttpStatus(s)) => Some(FaultAbort {
                        http_status: s.min(u16::MAX as u32) as u16,
                        percentage: percent(&a.percentage),
                    }),
                    _ => return Err("fault.abort: only http_status is supported".into()),
                },
            };
            Some(Fault { delay, abort })
        }
    };
    Ok(Route {
        matcher,
        route: RouteAction {
            cluster,
            weighted_clusters,
            timeout_ms: match ms(&ra.timeout) {
                None => 15_000,
                Some(0) => NO_TIMEOUT_MS,
                Some(t) => t,
            },
            retry_policy,
            request_mirror_policies,
        },
        request_headers_to_add: header_values(&r.request_headers_to_add),
        request_headers_to_remove: r.request_headers_to_remove.clone(),
        response_headers_to_add: header_values(&r.response_headers_to_add),
        response_headers_to_remove: r.response_headers_to_remove.clone(),
        fault,
    })
}

fn endpoints(cla: &eds::ClusterLoadAssignment) -> Result<Vec<EndpointConfig>, String> {
    let mut out = Vec::new();
    for (i, loc) in cla.endpoints.iter().enumerate() {
        for (j, lb) in loc.lb_endpoints.iter().enumerate() {
            let at = format!("endpoints[{i}].lb_endpoints[{j}]");
            // Envoy sends no traffic to endpoints the control plane marks so.
            if matches!(
                core::HealthStatus::try_from(lb.health_status),
                Ok(core::HealthStatus::Unhealthy
                    | core::HealthStatus::Draining
                    | core::HealthStatus::Timeout)
            ) {
                continue;
            }
            let addr = match &lb.host_identifier {
                Some(eds::lb_endpoint::HostIdentifier::Endpoint(e)) => {
                    socket_addr(&e.address, &at)?
                }
                _ => return Err(format!("{at}: needs an endpoint with an address")),
            };
            let weight = u32v(&lb.load_balancing_weight).unwrap_or(1);
            if weight == 0 {
                return Err(format!("{at}: load_balancing_weight must be 1 or more"));
            }
            out.push(EndpointConfig {
                address: addr,
                weight,
                priority: loc.priority,
            });
        }
    }
    Ok(out)
}

fn cluster(c: &cds::Cluster, r: &Resources, hash: Option<&HashPolicy>) -> Result<Cluster, String> {
    use cds::cluster::{DiscoveryType, LbPolicy as L};
    if c.transport_socket.is_some() {
        return Err("transport_socket (TLS to the endpoints) is not supported".into());
    }
    let endpoint_list = match discovery(c)? {
        DiscoveryType::Static | DiscoveryType::StrictDns | DiscoveryType::LogicalDns => {
            match &c.load_assignment {
                Some(cla) => endpoints(cla).map_err(|e| format!("load_assignment.{e}"))?,
                None => Vec::new(),
            }
        }
        DiscoveryType::Eds => match r.endpoints.get(&eds_service(c)) {
            Some(cla) => endpoints(cla)
                .map_err(|e| format!("ClusterLoadAssignment {:?}: {e}", cla.cluster_name))?,
            // Not (yet) received: no endpoints, requests get 503.
            None => Vec::new(),
        },
        DiscoveryType::OriginalDst => unreachable!("ORIGINAL_DST clusters are not translated"),
    };
    if c.load_balancing_policy.is_some() {
        return Err("load_balancing_policy is not supported: use lb_policy".into());
    }
    let lb_policy = match L::try_from(c.lb_policy) {
        Ok(L::RoundRobin) => LbPolicy::RoundRobin,
        Ok(L::LeastRequest) => LbPolicy::LeastRequest,
        Ok(L::Random) => LbPolicy::Random,
        Ok(L::RingHash) => LbPolicy::RingHash,
        Ok(L::Maglev) => LbPolicy::Maglev,
        other => {
            return Err(format!(
                "lb_policy {} is not supported (ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH and MAGLEV are)",
                other.map_or_else(|_| c.lb_policy.to_string(), |p| p.as_str_name().to_string())
            ))
        }
    };
    // Envoy hashes on the routes' hash_policy; without one, this proxy uses the client's
    // address.
    let hash_policy = matches!(lb_policy, LbPolicy::RingHash | LbPolicy::Maglev).then(|| {
        hash.cloned().unwrap_or(HashPolicy {
            header: None,
            source_ip: true,
        })
    });
    let http2 = match c
        .typed_extension_protocol_options
        .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    {
        None => false,
        Some(any) => {
            let o = unpack::<HttpProtocolOptions>(any)
                .map_err(|e| format!("typed_extension_protocol_options: {e}"))?
                .ok_or("typed_extension_protocol_options: needs an HttpProtocolOptions")?;
            match o.upstream_protocol_options {
                Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => {
                    matches!(
                        e.protocol_config,
                        Some(ProtocolConfig::Http2ProtocolOptions(_))
                    )
                }
                _ => false,
            }
        }
    };
    let mut circuit_breakers = CircuitBreakers::default();
    let mut retry_budget = RetryBudget::default();
    if let Some(t) = c.circuit_breakers.as_ref().and_then(|cb| {
        cb.thresholds
            .iter()
            .find(|t| t.priority == core::RoutingPriority::Default as i32)
    }) {
        if let Some(v) = u32v(&t.max_connections) {
            circuit_breakers.max_connections = v.into();
        }
        if let Some(v) = u32v(&t.max_requests) {
            circuit_breakers.max_requests = v.into();
        }
        if let Some(v) = u32v(&t.max_pending_requests) {
            circuit_breakers.max_pending_requests = v.into();
        }
        if let Some(b) = &t.retry_budget {
            if let Some(p) = &b.budget_percent {
                retry_budget.budget_percent = p.value.clamp(0.0, 100.0) as u32;
            }
            if let Some(v) = u32v(&b.min_retry_concurrency) {
                retry_budget.min_retry_concurrency = v;
            }
        }
    }
    let outlier_detection = c.outlier_detection.as_ref().map(|o| OutlierDetection {
        consecutive_5xx: u32v(&o.consecutive_5xx).unwrap_or(5),
        base_ejection_time_ms: ms(&o.base_ejection_time).unwrap_or(30_000),
        max_ejection_percent: u32v(&o.max_ejection_percent).unwrap_or(10),
    });
    let health_check = match c.health_checks.first() {
        None => None,
        Some(h) => {
            use core::health_check::HealthChecker;
            let http_path =
                match &h.health_checker {
                    Some(HealthChecker::HttpHealthCheck(hh)) => Some(hh.path.clone()),
                    Some(HealthChecker::TcpHealthCheck(_)) => None,
                    _ => return Err(
                        "health_checks[0]: http_health_check and tcp_health_check are supported"
                            .into(),
                    ),
                };
            Some(HealthCheck {
                interval_ms: ms(&h.interval).unwrap_or(1000),
                timeout_ms: ms(&h.timeout).unwrap_or(500),
                unhealthy_threshold: u32v(&h.unhealthy_threshold).unwrap_or(3),
                healthy_threshold: u32v(&h.healthy_threshold).unwrap_or(1),
                http_path,
            })
        }
    };
    Ok(Cluster {
        name: c.name.clone(),
        lb_policy,
        hash_policy,
        http2,
        endpoints: endpoint_list,
        outlier_detection,
        health_check,
        circuit_breakers,
        retry_budget,
        connect_timeout_ms: ms(&c.connect_timeout)
            .filter(|t| *t > 0)
            .unwrap_or(crate::config::DEFAULT_CONNECT_TIMEOUT_MS),
    })
}

/// The ADS client's view of the stream: per type, the version in force and the last nonce.
#[derive(Default)]
struct Stream {
    version: BTreeMap<Kind, String>,
    nonce: BTreeMap<Kind, String>,
    /// Names asked for (endpoints and routes).
    asked: BTreeMap<Kind, BTreeSet<String>>,
}

/// Follow the control plane for the life of the process: reconnect with a backoff when the
/// stream ends; the resources in force stay meanwhile, as Envoy keeps them.
pub async fn run(settings: XdsSettings, control: Arc<Mutex<Control>>) {
    const FIRST: Duration = Duration::from_millis(250);
    let mut backoff = FIRST;
    loop {
        let mut answered = false;
        match session(&settings, &control, &mut answered).await {
            Ok(()) => warn!(
                address = settings.address,
                "xDS stream closed by the control plane"
            ),
            Err(e) => warn!(address = settings.address, "xDS stream: {e:#}"),
        }
        // A stream that got answers starts the backoff over.
        if answered {
            backoff = FIRST;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn channel(address: &str) -> anyhow::Result<tonic::transport::Channel> {
    if let Some(path) = address.strip_prefix("unix:") {
        let path = std::path::PathBuf::from(path);
        // The URI is required by the builder and ignored by the connector.
        let ch = tonic::transport::Endpoint::from_static("http://xds")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(&path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await?;
        return Ok(ch);
    }
    Ok(
        tonic::transport::Endpoint::from_shared(address.to_string())?
            .connect()
            .await?,
    )
}

async fn session(
    settings: &XdsSettings,
    control: &Arc<Mutex<Control>>,
    answered: &mut bool,
) -> anyhow::Result<()> {
    let ch = channel(&settings.address).await?;
    let mut client = AggregatedDiscoveryServiceClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel::<DiscoveryRequest>(16);
    let node = core::Node {
        id: settings.node_id.clone(),
        cluster: settings.node_cluster.clone(),
        user_agent_name: "sockmesh-proxy".into(),
        ..Default::default()
    };
    let mut st = Stream::default();
    let current = control.lock().expect("control lock").dynamic().clone();
    let request = |st: &Stream, kind: Kind, error: Option<String>| DiscoveryRequest {
        version_info: st.version.get(&kind).cloned().unwrap_or_default(),
        node: Some(node.clone()),
        resource_names: st
            .asked
            .get(&kind)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default(),
        type_url: kind.type_url(),
        response_nonce: st.nonce.get(&kind).cloned().unwrap_or_default(),
        error_detail: error.map(|message| Status {
            code: tonic::Code::InvalidArgument as i32,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    };
    // Ask for clusters and listeners (and what they named, on a reconnect).
    for kind in Kind::ALL {
        if kind.wildcard() || !current.wanted(kind).is_empty() {
            st.asked.insert(kind, current.wanted(kind));
            tx.send(request(&st, kind, None)).await?;
        }
    }
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    info!(
        address = settings.address,
        node = settings.node_id,
        "xDS stream open"
    );
    while let Some(resp) = responses.message().await? {
        *answered = true;
        let DiscoveryResponse {
            version_info,
            resources,
            type_url,
            nonce,
            ..
        } = resp;
        let Some(kind) = Kind::of(&type_url) else {
            warn!(type_url, "xDS: a resource type not asked for: ignored");
            continue;
        };
        st.nonce.insert(kind, nonce);
        let outcome = {
            let mut c = control.lock().expect("control lock");
            let mut next = c.dynamic().clone();
            let wanted = st.asked.get(&kind).cloned().unwrap_or_default();
            next.take(kind, &resources, &wanted)
                .and_then(|()| c.set_dynamic(next.clone()).map(|()| next))
        };
        match outcome {
            Ok(next) => {
                info!(
                    ?kind,
                    version = version_info,
                    resources = resources.len(),
                    "xDS: in force (ACK)"
                );
                st.version.insert(kind, version_info);
                tx.send(request(&st, kind, None)).await?;
                // New names to ask for: the endpoints of new EDS clusters, the routes of new
                // listeners.
                for follow in [Kind::Endpoint, Kind::Route] {
                    let wanted = next.wanted(follow);
                    if st.asked.get(&follow) != Some(&wanted) {
                        st.asked.insert(follow, wanted);
                        tx.send(request(&st, follow, None)).await?;
                    }
                }
            }
            Err(e) => {
                warn!(
                    ?kind,
                    version = version_info,
                    "xDS: refused (NACK), the previous resources stay: {e}"
                );
                tx.send(request(&st, kind, Some(e))).await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{
        address, socket_address, Address, SocketAddress,
    };

    fn addr(ip: &str, port: u32) -> Option<Address> {
        Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: ip.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        })
    }

    fn any<M: Message + Name>(m: &M) -> Any {
        Any {
            type_url: M::type_url(),
            value: m.encode_to_vec(),
        }
    }

    fn base() -> Config {
        Config::parse("t.yaml", "listeners: []").unwrap()
    }

    fn eds_cluster(name: &str, policy: cds::cluster::LbPolicy) -> cds::Cluster {
        cds::Cluster {
            name: name.into(),
            lb_policy: policy as i32,
            cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
                cds::cluster::DiscoveryType::Eds as i32,
            )),
            ..Default::default()
        }
    }

    fn assignment(name: &str, eps: &[(&str, u32, i32)]) -> eds::ClusterLoadAssignment {
        eds::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![eds::LocalityLbEndpoints {
                lb_endpoints: eps
                    .iter()
                    .map(|(ip, port, health)| eds::LbEndpoint {
                        health_status: *health,
                        host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(
                            eds::Endpoint {
                                address: addr(ip, *port),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn eds_endpoints_follow_their_cluster_and_skip_unhealthy_ones() {
        let mut r = Resources::default();
        let c = eds_cluster("reviews", cds::cluster::LbPolicy::Maglev);
        r.take(Kind::Cluster, &[any(&c)], &BTreeSet::new()).unwrap();
        assert_eq!(
            r.wanted(Kind::Endpoint),
            BTreeSet::from(["reviews".to_string()])
        );
        // Before its endpoints arrive the cluster is empty, and that is accepted.
        let m = merge(&base(), &r).unwrap();
        assert!(m.clusters[0].endpoints.is_empty());
        // Maglev without a route hash policy hashes the client's address.
        assert!(m.clusters[0].hash_policy.as_ref().unwrap().source_ip);
        let cla = assignment(
            "reviews",
            &[
                ("10.0.0.1", 80, 0),
                ("10.0.0.2", 80, core::HealthStatus::Draining as i32),
            ],
        );
        r.take(Kind::Endpoint, &[any(&cla)], &r.wanted(Kind::Endpoint))
            .unwrap();
        let m = merge(&base(), &r).unwrap();
        let eps: Vec<String> = m.clusters[0]
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(eps, ["10.0.0.1:80"]);
        // The cluster goes: its endpoints are no longer asked for, nor kept.
        r.take(Kind::Cluster, &[], &BTreeSet::new()).unwrap();
        let wanted = r.wanted(Kind::Endpoint);
        r.take(Kind::Endpoint, &[], &wanted).unwrap();
        assert!(r.endpoints.is_empty());
    }

    #[test]
    fn a_clusters_connect_timeout_is_kept_and_defaults_to_envoys() {
        let mut r = Resources::default();
        let mut istio = eds_cluster("istio", cds::cluster::LbPolicy::RoundRobin);
        istio.connect_timeout = Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 10,
            nanos: 0,
        });
        let plain = eds_cluster("plain", cds::cluster::LbPolicy::RoundRobin);
        r.take(Kind::Cluster, &[any(&istio), any(&plain)], &BTreeSet::new())
            .unwrap();
        let m = merge(&base(), &r).unwrap();
        let timeout = |name: &str| {
            let c = m.clusters.iter().find(|c| c.name == name).unwrap();
            c.connect_timeout()
        };
        assert_eq!(timeout("istio"), std::time::Duration::from_secs(10));
        assert_eq!(timeout("plain"), std::time::Duration::from_secs(5));
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let mut r = Resources::default();
        let mut c = eds_cluster("x", cds::cluster::LbPolicy::ClusterProvided);
        r.clusters.insert("x".into(), c.clone());
        let e = merge(&base(), &r).unwrap_err();
        assert!(
            e.contains("Cluster \"x\"") && e.contains("lb_policy"),
            "{e}"
        );
        c.lb_policy = 0;
        r.clusters.insert("x".into(), c);
        let cla = assignment("x", &[("reviews.default", 80, 0)]);
        r.endpoints.insert("x".into(), cla);
        let e = merge(&base(), &r).unwrap_err();
        assert!(e.contains("not an IP address"), "{e}");
        // A resource of the wrong type in a response.
        let e = Resources::default()
            .take(
                Kind::Listener,
                &[any(&eds_cluster("y", cds::cluster::LbPolicy::RoundRobin))],
                &BTreeSet::new(),
            )
            .unwrap_err();
        assert!(e.contains("envoy.config.cluster.v3.Cluster"), "{e}");
    }

    #[test]
    fn listeners_name_their_routes_and_routes_translate() {
        let hcm = HttpConnectionManager {
            route_specifier: Some(RouteSpecifier::Rds(
                envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::Rds {
                    route_config_name: "80".into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        };
        let l = lds::Listener {
            name: "outbound".into(),
            address: addr("0.0.0.0", 15001),
            traffic_direction: core::TrafficDirection::Outbound as i32,
            filter_chains: vec![lds::FilterChain {
                filters: vec![lds::Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(lds::filter::ConfigType::TypedConfig(any(&hcm))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut r = Resources::default();
        r.take(Kind::Listener, &[any(&l)], &BTreeSet::new())
            .unwrap();
        assert_eq!(r.wanted(Kind::Route), BTreeSet::from(["80".to_string()]));
        let rc = rds::RouteConfiguration {
            name: "80".into(),
            virtual_hosts: vec![rds::VirtualHost {
                name: "reviews".into(),
                domains: vec!["reviews".into()],
                routes: vec![rds::Route {
                    r#match: Some(rds::RouteMatch {
                        path_specifier: Some(rds::route_match::PathSpecifier::Prefix("/v2".into())),
                        ..Default::default()
                    }),
                    action: Some(rds::route::Action::Route(rds::RouteAction {
                        cluster_specifier: Some(rds::route_action::ClusterSpecifier::Cluster(
                            "v2".into(),
                        )),
                        timeout: Some(envoy_types::pb::google::protobuf::Duration {
                            seconds: 0,
                            nanos: 0,
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        r.take(Kind::Route, &[any(&rc)], &r.wanted(Kind::Route))
            .unwrap();
        let m = merge(&base(), &r).unwrap();
        assert_eq!(m.listeners[0].address.to_string(), "0.0.0.0:15001");
        let route = &m.virtual_hosts[0].routes[0];
        assert_eq!(route.matcher.prefix.as_deref(), Some("/v2"));
        // A route to a cluster not defined is accepted (503 at request time), as in Envoy.
        assert_eq!(route.route.cluster.as_deref(), Some("v2"));
        assert_eq!(route.route.timeout_ms, NO_TIMEOUT_MS);
    }
}

//! Listeners (LDS) into the proxy's listeners, and their filter chains into routes.
//!
//! HTTP connection managers give virtual hosts (inline, or by RDS name); TCP proxies give TLS
//! and TCP routes.

use envoy_types::pb::{
    envoy::{
        config::{core::v3 as core, listener::v3 as lds},
        extensions::filters::network::{
            http_connection_manager::v3::{
                http_connection_manager::RouteSpecifier, http_filter, HttpConnectionManager,
                HttpFilter,
            },
            tcp_proxy::v3::{tcp_proxy::ClusterSpecifier, TcpProxy},
        },
    },
    google::protobuf::Any,
};

use super::{
    error::{At, Invalid, Problem},
    proto::{ms, socket_addr, u32v, unpack},
    route::{route_config, Clusters},
};
use crate::config::{Config, Direction, Listener, TcpRoute, TlsRoute};

/// Add `l` to `c`: the listener, and the routes of its filter chains. The names of the route
/// configurations it asks for by RDS go to `route_names`.
pub fn listener(
    l: &lds::Listener,
    clusters: &mut Clusters<'_>,
    c: &mut Config,
    route_names: &mut Vec<String>,
) -> Result<(), Invalid> {
    let address = socket_addr(&l.address).at("address")?;
    if l.bind_to_port.as_ref().is_some_and(|b| !b.value) {
        return Err(Problem::Unsupported(
            "bind_to_port false (a listener reached through another's original destination)",
        )
        .into());
    }
    c.listeners.push(Listener {
        name: l.name.clone(),
        address,
        direction: direction(l.traffic_direction)?,
        // Unset waits for the client's first bytes, as Istio's protocol detection does.
        detect_timeout_ms: ms(&l.listener_filters_timeout).unwrap_or(0),
    });
    let chains = l.filter_chains.iter().chain(l.default_filter_chain.iter());
    for (i, chain) in chains.enumerate() {
        if chain.transport_socket.is_some() {
            return Err(Problem::Unsupported("transport_socket (TLS termination)"))
                .at(format!("filter_chains[{i}]"));
        }
        let m = chain.filter_chain_match.clone().unwrap_or_default();
        for (j, f) in chain.filters.iter().enumerate() {
            let at = format!("filter_chains[{i}].filters[{j}] ({})", f.name);
            filter(f, &m, clusters, c, route_names).at(at)?;
        }
    }
    Ok(())
}

fn direction(traffic_direction: i32) -> Result<Direction, Problem> {
    match core::TrafficDirection::try_from(traffic_direction) {
        Ok(core::TrafficDirection::Inbound) => Ok(Direction::Inbound),
        Ok(core::TrafficDirection::Outbound | core::TrafficDirection::Unspecified) => {
            Ok(Direction::Outbound)
        }
        Err(_) => Err(Problem::Unknown {
            field: "traffic_direction",
            value: traffic_direction,
        }),
    }
}

/// One network filter of a chain matching `m`: an HTTP connection manager or a TCP proxy.
fn filter(
    f: &lds::Filter,
    m: &lds::FilterChainMatch,
    clusters: &mut Clusters<'_>,
    c: &mut Config,
    route_names: &mut Vec<String>,
) -> Result<(), Invalid> {
    let any = match &f.config_type {
        Some(lds::filter::ConfigType::TypedConfig(any)) => any,
        _ => return Err(Problem::Missing("a typed_config").into()),
    };
    if let Some(h) = unpack::<HttpConnectionManager>(any)? {
        http_connection_manager(&h, clusters, c, route_names)
    } else if let Some(t) = unpack::<TcpProxy>(any)? {
        tcp_proxy(&t, m, clusters, c).map_err(Invalid::from)
    } else {
        Err(Problem::NetworkFilter(any.type_url.clone()).into())
    }
}

fn http_connection_manager(
    h: &HttpConnectionManager,
    clusters: &mut Clusters<'_>,
    c: &mut Config,
    route_names: &mut Vec<String>,
) -> Result<(), Invalid> {
    for (k, hf) in h.http_filters.iter().enumerate() {
        if !supported(hf) && !hf.is_optional && !hf.disabled {
            return Err(Problem::HttpFilter).at(format!("http_filters[{k}] ({})", hf.name));
        }
    }
    match &h.route_specifier {
        Some(RouteSpecifier::Rds(r)) => {
            route_names.push(r.route_config_name.clone());
            Ok(())
        }
        Some(RouteSpecifier::RouteConfig(rc)) => {
            route_config(rc, clusters, &mut c.virtual_hosts).at("route_config")
        }
        _ => Err(Problem::Missing("rds or route_config (scoped routes are not supported)").into()),
    }
}

/// Whether an HTTP filter is one that runs: the router or the fault filter.
fn supported(hf: &HttpFilter) -> bool {
    match &hf.config_type {
        Some(http_filter::ConfigType::TypedConfig(a)) => is_router_or_fault(a),
        Some(http_filter::ConfigType::ConfigDiscovery(_)) | None => false,
    }
}

fn is_router_or_fault(a: &Any) -> bool {
    a.type_url.ends_with(".filters.http.router.v3.Router")
        || a.type_url.ends_with(".filters.http.fault.v3.HTTPFault")
}

/// A TCP proxy's routes: TLS routes by the chain's server names, or a TCP route by its
/// destination port.
fn tcp_proxy(
    t: &TcpProxy,
    m: &lds::FilterChainMatch,
    clusters: &Clusters<'_>,
    c: &mut Config,
) -> Result<(), Problem> {
    let cluster = match &t.cluster_specifier {
        Some(ClusterSpecifier::Cluster(name)) => name.clone(),
        _ => {
            return Err(Problem::Missing(
                "a cluster (weighted TCP clusters are not supported)",
            ))
        }
    };
    // To the original destination: what the proxy does with unrouted TCP.
    let to = (!clusters.passthrough.contains(cluster.as_str())).then_some(cluster);
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
        return Err(Problem::UnmatchedTcpProxy);
    }
    Ok(())
}

//! The translation of xDS resources and their merge with the file, end to end.

use std::collections::BTreeSet;

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3 as cds,
            core::v3::{self as core, address, socket_address, Address, SocketAddress},
            endpoint::v3 as eds,
            listener::v3 as lds,
            route::v3 as rds,
        },
        extensions::filters::network::http_connection_manager::v3::{
            self as hcm, http_connection_manager::RouteSpecifier, http_filter,
            HttpConnectionManager,
        },
    },
    google::protobuf::Any,
};
use prost::{Message, Name};

use super::{kind::Kind, merge, route::NO_TIMEOUT_MS, Resources};
use crate::config::Config;

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

/// An HTTP connection manager whose routes come by RDS, as `name`.
fn rds_manager(name: &str) -> HttpConnectionManager {
    HttpConnectionManager {
        route_specifier: Some(RouteSpecifier::Rds(hcm::Rds {
            route_config_name: name.into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The outbound listener on 0.0.0.0:15001, its one filter chain holding `manager`.
fn outbound(manager: &HttpConnectionManager) -> lds::Listener {
    lds::Listener {
        name: "outbound".into(),
        address: addr("0.0.0.0", 15001),
        traffic_direction: core::TrafficDirection::Outbound as i32,
        filter_chains: vec![lds::FilterChain {
            filters: vec![lds::Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(lds::filter::ConfigType::TypedConfig(any(manager))),
            }],
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
    let e = merge(&base(), &r).unwrap_err().to_string();
    assert!(
        e.contains("Cluster \"x\"") && e.contains("lb_policy"),
        "{e}"
    );
    c.lb_policy = 0;
    r.clusters.insert("x".into(), c);
    let cla = assignment("x", &[("reviews.default", 80, 0)]);
    r.endpoints.insert("x".into(), cla);
    let e = merge(&base(), &r).unwrap_err().to_string();
    assert!(e.contains("not an IP address"), "{e}");
    // A resource of the wrong type in a response.
    let e = Resources::default()
        .take(
            Kind::Listener,
            &[any(&eds_cluster("y", cds::cluster::LbPolicy::RoundRobin))],
            &BTreeSet::new(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("envoy.config.cluster.v3.Cluster"), "{e}");
    assert_eq!(
        e,
        "resources[0]: a type.googleapis.com/envoy.config.cluster.v3.Cluster in a response of type.googleapis.com/envoy.config.listener.v3.Listener"
    );
}

#[test]
fn listeners_name_their_routes_and_routes_translate() {
    let l = outbound(&rds_manager("80"));
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

/// The refusals the README shows read word for word as it shows them: resource, field, problem.
#[test]
fn refusals_name_the_resource_and_the_field() {
    let refusal = |r: &Resources| merge(&base(), r).unwrap_err().to_string();
    let mut r = Resources::default();
    r.clusters.insert(
        "odd".into(),
        eds_cluster("odd", cds::cluster::LbPolicy::ClusterProvided),
    );
    assert_eq!(
        refusal(&r),
        "Cluster \"odd\": lb_policy CLUSTER_PROVIDED is not supported (ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH and MAGLEV are)"
    );

    let mut r = Resources::default();
    r.clusters.insert(
        "reviews".into(),
        eds_cluster("reviews", cds::cluster::LbPolicy::RoundRobin),
    );
    r.endpoints.insert(
        "reviews".into(),
        assignment(
            "reviews",
            &[("10.0.0.1", 80, 0), ("reviews.default", 80, 0)],
        ),
    );
    assert_eq!(
        refusal(&r),
        "Cluster \"reviews\": ClusterLoadAssignment \"reviews\": endpoints[0].lb_endpoints[1]: \"reviews.default\" is not an IP address (sockmesh-proxy does not resolve names)"
    );

    // An inline load assignment's endpoint without a port.
    let mut r = Resources::default();
    let mut s = eds_cluster("s", cds::cluster::LbPolicy::RoundRobin);
    s.cluster_discovery_type = None;
    s.load_assignment = Some(assignment("s", &[("10.0.0.1", 70000, 0)]));
    r.clusters.insert("s".into(), s);
    assert_eq!(
        refusal(&r),
        "Cluster \"s\": load_assignment.endpoints[0].lb_endpoints[0]: needs a port_value of 0 to 65535"
    );

    // An HTTP filter that does not run, in a listener.
    let cors = hcm::HttpFilter {
        name: "envoy.filters.http.cors".into(),
        config_type: Some(http_filter::ConfigType::TypedConfig(Any {
            type_url: "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors".into(),
            value: Vec::new(),
        })),
        ..Default::default()
    };
    let l = outbound(&HttpConnectionManager {
        http_filters: vec![cors],
        ..Default::default()
    });
    let mut r = Resources::default();
    r.listeners.insert("outbound".into(), l);
    assert_eq!(
        refusal(&r),
        "Listener \"outbound\": filter_chains[0].filters[0] (envoy.filters.network.http_connection_manager): http_filters[0] (envoy.filters.http.cors): not supported (router and fault are); mark it is_optional to go without it"
    );

    // A redirect, in a route configuration a listener names.
    let mut r = Resources::default();
    let l = outbound(&rds_manager("80"));
    r.listeners.insert("outbound".into(), l);
    let redirect = rds::Route {
        action: Some(rds::route::Action::Redirect(Default::default())),
        r#match: Some(rds::RouteMatch {
            path_specifier: Some(rds::route_match::PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        ..Default::default()
    };
    r.routes.insert(
        "80".into(),
        rds::RouteConfiguration {
            name: "80".into(),
            virtual_hosts: vec![rds::VirtualHost {
                name: "reviews".into(),
                domains: vec!["reviews".into()],
                routes: vec![redirect],
                ..Default::default()
            }],
            ..Default::default()
        },
    );
    assert_eq!(
        refusal(&r),
        "RouteConfiguration \"80\": virtual_hosts[0] (reviews).routes[0]: only route actions are supported (not redirect, direct_response, ...)"
    );

    // The merge as a whole: a cluster both in the file and from the control plane.
    let file = Config::parse(
        "t.yaml",
        "clusters: [{name: a, endpoints: [{address: \"10.0.0.1:80\"}]}]",
    )
    .unwrap();
    let mut r = Resources::default();
    r.clusters.insert(
        "a".into(),
        eds_cluster("a", cds::cluster::LbPolicy::RoundRobin),
    );
    assert_eq!(
        merge(&file, &r).unwrap_err().to_string(),
        "clusters[1].name: \"a\" is defined twice"
    );

    // Two resources of one name in a response.
    let c = eds_cluster("x", cds::cluster::LbPolicy::RoundRobin);
    let twice = Resources::default()
        .take(Kind::Cluster, &[any(&c), any(&c)], &BTreeSet::new())
        .unwrap_err()
        .to_string();
    assert_eq!(twice, "Cluster \"x\" is sent twice");
}

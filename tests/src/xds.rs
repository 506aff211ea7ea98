//! A small xDS v3 control plane for the proxy's tests: one ADS service (state of the world) on
//! a Unix socket, resources set by the test, every request the proxy sends kept so the test can
//! see its ACKs and NACKs. Written from Envoy's protocol description, not from the proxy's code.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3 as cds, core::v3 as core, endpoint::v3 as eds, listener::v3 as lds,
            route::v3 as rds,
        },
        extensions::filters::network::http_connection_manager::v3 as hcm,
        service::discovery::v3::{
            aggregated_discovery_service_server::{
                AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
            },
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        },
    },
    google::protobuf::{Any, UInt32Value},
};
use prost::{Message, Name};
use tokio_stream::{Stream, StreamExt};

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// One request the proxy sent.
#[derive(Clone, Debug)]
pub struct Seen {
    pub type_url: String,
    pub version_info: String,
    pub resource_names: Vec<String>,
    pub response_nonce: String,
    pub error: Option<String>,
}

#[derive(Default)]
struct State {
    /// Per type: the version and every resource, by name.
    resources: BTreeMap<String, (u64, BTreeMap<String, Any>)>,
    seen: Vec<Seen>,
    /// Every response's nonce, with the version it carried.
    nonces: BTreeMap<String, u64>,
}

/// The control plane; it serves until dropped.
pub struct ControlPlane {
    state: Arc<Mutex<State>>,
    changed: tokio::sync::watch::Sender<u64>,
    _runtime: tokio::runtime::Runtime,
}

struct Service {
    state: Arc<Mutex<State>>,
    changed: tokio::sync::watch::Receiver<u64>,
}

type Responses = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Service {
    type StreamAggregatedResourcesStream = Responses;
    type DeltaAggregatedResourcesStream =
        Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Responses>, tonic::Status> {
        let mut requests = request.into_inner();
        let state = self.state.clone();
        let mut changed = self.changed.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            // Per type: the names asked for, and what was last sent (version, names).
            let mut asked: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut sent: BTreeMap<String, (u64, Vec<String>)> = BTreeMap::new();
            loop {
                tokio::select! {
                    r = requests.next() => {
                        let Some(Ok(r)) = r else { return };
                        state.lock().unwrap().seen.push(Seen {
                            type_url: r.type_url.clone(),
                            version_info: r.version_info.clone(),
                            resource_names: r.resource_names.clone(),
                            response_nonce: r.response_nonce.clone(),
                            error: r.error_detail.as_ref().map(|s| s.message.clone()),
                        });
                        asked.insert(r.type_url.clone(), r.resource_names.clone());
                    }
                    c = changed.changed() => if c.is_err() { return },
                }
                // Send each type whose version or subscription differs from what was sent.
                let due: Vec<DiscoveryResponse> = {
                    let mut st = state.lock().unwrap();
                    let st = &mut *st;
                    asked
                        .iter()
                        .filter_map(|(type_url, names)| {
                            let (version, all) =
                                st.resources.get(type_url).cloned().unwrap_or_default();
                            let key = (version, names.clone());
                            if sent.get(type_url) == Some(&key) {
                                return None;
                            }
                            sent.insert(type_url.clone(), key);
                            let nonce = format!("n{}", st.nonces.len() + 1);
                            st.nonces.insert(nonce.clone(), version);
                            let resources = all
                                .iter()
                                .filter(|(n, _)| names.is_empty() || names.contains(n))
                                .map(|(_, a)| a.clone())
                                .collect();
                            Some(DiscoveryResponse {
                                version_info: version.to_string(),
                                resources,
                                type_url: type_url.clone(),
                                nonce,
                                ..Default::default()
                            })
                        })
                        .collect()
                };
                for d in due {
                    if tx.send(Ok(d)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("state of the world only"))
    }
}

impl ControlPlane {
    /// Serve ADS on a Unix socket at `path` (anyone may connect: the proxy runs as 1337).
    pub fn start(path: &Path) -> Result<ControlPlane> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let state = Arc::new(Mutex::new(State::default()));
        let (changed, rx) = tokio::sync::watch::channel(0);
        let _ = std::fs::remove_file(path);
        let listener = {
            let _guard = runtime.enter();
            tokio::net::UnixListener::bind(path)
                .with_context(|| format!("binding {}", path.display()))?
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        let svc = Service {
            state: state.clone(),
            changed: rx,
        };
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(svc))
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        Ok(ControlPlane {
            state,
            changed,
            _runtime: runtime,
        })
    }

    /// Replace every resource of `type_url` (a new version); returns that version.
    pub fn set(&self, type_url: &str, resources: Vec<(String, Any)>) -> u64 {
        let version = {
            let mut st = self.state.lock().unwrap();
            let entry = st.resources.entry(type_url.to_string()).or_default();
            entry.0 += 1;
            entry.1 = resources.into_iter().collect();
            entry.0
        };
        self.changed.send_modify(|n| *n += 1);
        version
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Wait for the proxy's answer to `version` of `type_url`, a request naming the nonce of
    /// a response that carried it: an ACK (it asks with that version and no error), or a NACK
    /// (it carries an error detail).
    pub fn answer(&self, type_url: &str, version: u64, within: Duration) -> Result<Verdict> {
        let until = Instant::now() + within;
        loop {
            {
                let st = self.state.lock().unwrap();
                let replies = st.seen.iter().filter(|s| {
                    s.type_url == type_url && st.nonces.get(&s.response_nonce) == Some(&version)
                });
                for s in replies {
                    match &s.error {
                        Some(e) => return Ok(Verdict::Nack(e.clone())),
                        None if s.version_info == version.to_string() => return Ok(Verdict::Ack),
                        None => {}
                    }
                }
            }
            if Instant::now() > until {
                bail!(
                    "no answer to version {version} of {type_url} in {within:?}: {:#?}",
                    self.seen()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The proxy's answer to a version of a resource type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It took the version.
    Ack,
    /// It refused the version, for this reason.
    Nack(String),
}

/// `m` packed as an `Any`, with its name.
pub fn named<M: Message + Name>(name: &str, m: &M) -> (String, Any) {
    (
        name.to_string(),
        Any {
            type_url: M::type_url(),
            value: m.encode_to_vec(),
        },
    )
}

pub fn address(addr: std::net::SocketAddr) -> Option<core::Address> {
    Some(core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(
                addr.port().into(),
            )),
            ..Default::default()
        })),
    })
}

/// A listener at `addr` whose HTTP is routed by the route configuration `rds` (none: no
/// filter chain, for inbound passthrough).
pub fn listener(
    name: &str,
    addr: std::net::SocketAddr,
    inbound: bool,
    rds: Option<&str>,
) -> (String, Any) {
    let chains = rds
        .map(|r| {
            let h = hcm::HttpConnectionManager {
                stat_prefix: name.into(),
                route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
                    hcm::Rds {
                        route_config_name: r.into(),
                        config_source: None,
                    },
                )),
                ..Default::default()
            };
            lds::FilterChain {
                filters: vec![lds::Filter {
                    name: "envoy.filters.network.http_connection_manager".into(),
                    config_type: Some(lds::filter::ConfigType::TypedConfig(named("", &h).1)),
                }],
                ..Default::default()
            }
        })
        .into_iter()
        .collect();
    let direction = if inbound {
        core::TrafficDirection::Inbound
    } else {
        core::TrafficDirection::Outbound
    };
    named(
        name,
        &lds::Listener {
            name: name.into(),
            address: address(addr),
            traffic_direction: direction as i32,
            filter_chains: chains,
            ..Default::default()
        },
    )
}

/// A route to `cluster` for paths under `prefix`, adding `x-route: tag` to the response.
pub fn route(prefix: &str, cluster: &str, tag: &str) -> rds::Route {
    rds::Route {
        r#match: Some(rds::RouteMatch {
            path_specifier: Some(rds::route_match::PathSpecifier::Prefix(prefix.into())),
            ..Default::default()
        }),
        action: Some(rds::route::Action::Route(rds::RouteAction {
            cluster_specifier: Some(rds::route_action::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })),
        response_headers_to_add: vec![core::HeaderValueOption {
            header: Some(core::HeaderValue {
                key: "x-route".into(),
                value: tag.into(),
                ..Default::default()
            }),
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn route_config(
    name: &str,
    vhosts: Vec<(&str, Vec<String>, Vec<rds::Route>)>,
) -> (String, Any) {
    named(
        name,
        &rds::RouteConfiguration {
            name: name.into(),
            virtual_hosts: vhosts
                .into_iter()
                .map(|(n, domains, routes)| rds::VirtualHost {
                    name: n.into(),
                    domains,
                    routes,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        },
    )
}

/// A cluster whose endpoints come by EDS; `limits` are (max_requests, max_pending_requests).
pub fn eds_cluster(
    name: &str,
    lb_policy: cds::cluster::LbPolicy,
    limits: Option<(u32, u32)>,
) -> (String, Any) {
    let circuit_breakers = limits.map(|(requests, pending)| cds::CircuitBreakers {
        thresholds: vec![cds::circuit_breakers::Thresholds {
            max_requests: Some(UInt32Value { value: requests }),
            max_pending_requests: Some(UInt32Value { value: pending }),
            ..Default::default()
        }],
        ..Default::default()
    });
    named(
        name,
        &cds::Cluster {
            name: name.into(),
            lb_policy: lb_policy as i32,
            cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
                cds::cluster::DiscoveryType::Eds as i32,
            )),
            eds_cluster_config: Some(cds::cluster::EdsClusterConfig {
                eds_config: None,
                service_name: name.into(),
            }),
            circuit_breakers,
            ..Default::default()
        },
    )
}

pub fn assignment(name: &str, endpoints: &[std::net::SocketAddr]) -> (String, Any) {
    named(
        name,
        &eds::ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![eds::LocalityLbEndpoints {
                lb_endpoints: endpoints
                    .iter()
                    .map(|a| eds::LbEndpoint {
                        host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(
                            eds::Endpoint {
                                address: address(*a),
                                ..Default::default()
                            },
                        )),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }],
            ..Default::default()
        },
    )
}

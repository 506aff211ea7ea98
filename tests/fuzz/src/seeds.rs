//! The committed seed corpus (tests/fuzz/seeds/<target>/), made here from the inputs users
//! write: istio's and linkerd's injected command lines, a chained CNI configuration, the
//! registration those produce, the proxy's documented configurations, and xDS responses of
//! each kind. `SOCKMESH_WRITE_SEEDS=1 cargo test` writes them; the test checks that each seed
//! is accepted by its parser, so the fuzzers start deep inside it.

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3 as cds,
            core::v3::{address, socket_address, Address, SocketAddress},
            endpoint::v3 as eds,
            listener::v3 as lds,
            route::v3 as rds,
        },
        extensions::filters::network::{
            http_connection_manager::v3::{
                http_connection_manager::RouteSpecifier, HttpConnectionManager,
            },
            tcp_proxy::v3::{tcp_proxy::ClusterSpecifier, TcpProxy},
        },
        service::discovery::v3::DiscoveryResponse,
    },
    google::protobuf::Any,
};
use prost::{Message, Name};

/// One seed: its target, file name and bytes.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

fn words(ws: &[&str]) -> Vec<u8> {
    ws.join("\0").into_bytes()
}

/// istio-iptables command lines: the injector's default, TPROXY, DNS capture through the
/// environment, interfaces, include and exclude lists, dual stack, the CNI's form.
pub const ISTIO: &[&[&str]] = &[
    &[
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
        "--log_output_level=default:info",
    ],
    &[
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "TPROXY",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
        "-t",
        "1337",
        "-r",
        "133",
    ],
    &[
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-i",
        "*",
        "@ISTIO_META_DNS_CAPTURE=true",
    ],
    &[
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-g",
        "1337",
        "-i",
        "10.0.0.0/8,10.96.0.10/32",
        "-x",
        "10.1.0.0/16",
        "-b",
        "8080,9090",
        "-q",
        "3306",
        "-o",
        "5432,6379",
        "-c",
        "eth1",
        "-k",
        "net1",
        "--redirect-dns",
        "--capture-all-dns",
        "--dual-stack",
    ],
    &[
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-i",
        "*",
        "--dry-run",
        "--run-validation",
        "--iptables-probe-port",
        "15002",
    ],
    &[
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-i",
        "fd00::/8",
        "-x",
        "::1/128",
        "-b",
        "",
        "--dual-stack",
    ],
];

/// linkerd proxy-init command lines.
pub const LINKERD: &[&[&str]] = &[
    &[
        "--incoming-proxy-port",
        "4143",
        "--outgoing-proxy-port",
        "4140",
        "--proxy-uid",
        "2102",
        "--inbound-ports-to-ignore",
        "4190,4191,4567,4568",
        "--outbound-ports-to-ignore",
        "443,6443",
    ],
    &[
        "-p",
        "4143",
        "-o",
        "4140",
        "--proxy-uid",
        "2102",
        "--proxy-gid",
        "2102",
        "-r",
        "80,8080",
        "--subnets-to-ignore",
        "10.0.0.0/8",
        "--simulate",
    ],
];

const CNI_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=reviews-v1-0;K8S_POD_INFRA_CONTAINER_ID=abc";

const CNI_CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"sockmesh","agent_socket":"/var/run/sockmesh/agent.sock","exclude_namespaces":["kube-system"],"runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"sidecar.istio.io/status":"{\"initContainers\":null,\"containers\":[\"istio-proxy\"]}","traffic.sidecar.istio.io/includeOutboundIPRanges":"*","traffic.sidecar.istio.io/excludeInboundPorts":"15020","traffic.sidecar.istio.io/kubevirtInterfaces":"net1","sockmesh.io/acceleration":"on"}},"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"10.244.0.5/24","gateway":"10.244.0.1","interface":0}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}}"#;

const CNI_CONF_OLD: &str = r#"{"cniVersion":"0.3.1","name":"bridge","type":"sockmesh","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"sidecar.istio.io/status":"{}","sidecar.istio.io/interceptionMode":"TPROXY","traffic.sidecar.istio.io/excludeOutboundIPRanges":"10.96.0.0/12"}},"prevResult":{"cniVersion":"0.3.1","interfaces":[],"ips":[{"version":"4","address":"10.0.0.2/24"}]}}"#;

/// The proxy's documented configuration (proxy/README.md), and smaller ones.
const PROXY_CONFIGS: &[&str] = &[
    include_str!("../../../proxy/README.md"),
    "listeners:\n  - {name: outbound, address: \"0.0.0.0:15001\", direction: outbound}\nclusters:\n  - name: c\n    endpoints: [{address: \"127.0.0.1:8080\"}]\ntcp_routes:\n  - {destination: \"5432\", cluster: c}\n",
    "admin: {address: \"127.0.0.1:15000\"}\nxds:\n  address: \"unix:/var/run/sockmesh/xds.sock\"\n  node_id: \"reviews-v1-0.default\"\n  node_cluster: \"reviews\"\n",
];

/// The first YAML block of a markdown file (the README's complete example), or the text itself
/// when it has none.
fn first_yaml(text: &str) -> String {
    text.split("```yaml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap_or(text)
        .to_string()
}

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

fn response<M: Message + Name>(resources: &[M]) -> Vec<u8> {
    DiscoveryResponse {
        version_info: "1".into(),
        type_url: M::type_url(),
        nonce: "n1".into(),
        resources: resources.iter().map(any).collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

fn xds() -> Vec<(String, Vec<u8>)> {
    let static_cluster = cds::Cluster {
        name: "reviews".into(),
        lb_policy: cds::cluster::LbPolicy::LeastRequest as i32,
        cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
            cds::cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(assignment("reviews")),
        ..Default::default()
    };
    let eds_cluster = cds::Cluster {
        name: "ratings".into(),
        cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
            cds::cluster::DiscoveryType::Eds as i32,
        )),
        ..Default::default()
    };
    let passthrough = cds::Cluster {
        name: "PassthroughCluster".into(),
        cluster_discovery_type: Some(cds::cluster::ClusterDiscoveryType::Type(
            cds::cluster::DiscoveryType::OriginalDst as i32,
        )),
        lb_policy: cds::cluster::LbPolicy::ClusterProvided as i32,
        ..Default::default()
    };
    let route = rds::RouteConfiguration {
        name: "80".into(),
        virtual_hosts: vec![rds::VirtualHost {
            name: "reviews".into(),
            domains: vec!["reviews".into(), "*".into()],
            routes: vec![rds::Route {
                r#match: Some(rds::RouteMatch {
                    path_specifier: Some(rds::route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(rds::route::Action::Route(rds::RouteAction {
                    cluster_specifier: Some(rds::route_action::ClusterSpecifier::Cluster(
                        "reviews".into(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: "outbound_0.0.0.0_80".into(),
        route_specifier: Some(RouteSpecifier::RouteConfig(route.clone())),
        ..Default::default()
    };
    let tcp = TcpProxy {
        stat_prefix: "tcp".into(),
        cluster_specifier: Some(ClusterSpecifier::Cluster("reviews".into())),
        ..Default::default()
    };
    let listener = lds::Listener {
        name: "virtualOutbound".into(),
        address: addr("0.0.0.0", 15001),
        traffic_direction: 2, // OUTBOUND
        filter_chains: vec![
            lds::FilterChain {
                filter_chain_match: Some(lds::FilterChainMatch {
                    destination_port: Some(envoy_types::pb::google::protobuf::UInt32Value {
                        value: 5432,
                    }),
                    ..Default::default()
                }),
                filters: vec![filter("envoy.filters.network.tcp_proxy", any(&tcp))],
                ..Default::default()
            },
            lds::FilterChain {
                filters: vec![filter(
                    "envoy.filters.network.http_connection_manager",
                    any(&hcm),
                )],
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    vec![
        (
            "cds".into(),
            response(&[static_cluster, eds_cluster, passthrough]),
        ),
        ("eds".into(), response(&[assignment("ratings")])),
        ("rds".into(), response(&[route])),
        ("lds".into(), response(&[listener])),
    ]
}

fn filter(name: &str, config: Any) -> lds::Filter {
    lds::Filter {
        name: name.into(),
        config_type: Some(lds::filter::ConfigType::TypedConfig(config)),
    }
}

fn assignment(name: &str) -> eds::ClusterLoadAssignment {
    eds::ClusterLoadAssignment {
        cluster_name: name.into(),
        endpoints: vec![eds::LocalityLbEndpoints {
            lb_endpoints: ["10.0.1.1", "10.0.1.2"]
                .iter()
                .map(|ip| eds::LbEndpoint {
                    host_identifier: Some(eds::lb_endpoint::HostIdentifier::Endpoint(
                        eds::Endpoint {
                            address: addr(ip, 9080),
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

/// The registration each istio command line gives, as the init container sends it.
fn pod_settings() -> Vec<(String, Vec<u8>)> {
    use sockmesh::init::{
        flags::CommandLine,
        istio::{IfAddr, IstioArgs},
    };
    use sockmesh_api::pb;
    // As the init container sends it: from the command line alone, no environment.
    let no_env = crate::Invocation::from_bytes("istio-iptables", &[]);
    let addrs = [IfAddr {
        ip: "10.244.0.5".parse().unwrap(),
    }];
    ISTIO
        .iter()
        .enumerate()
        .filter_map(|(i, args)| {
            let mut argv = vec!["istio-iptables"];
            argv.extend(args.iter().filter(|a| !a.starts_with('@')));
            let (spec, _) = IstioArgs::parse_argv(argv)
                .ok()?
                .to_spec(&no_env, &addrs)
                .ok()?;
            Some((
                format!("istio-{i}"),
                pb::PodSettings::from(&spec).encode_to_vec(),
            ))
        })
        .collect()
}

/// Every seed of every target.
pub fn all() -> Vec<Seed> {
    let mut seeds = Vec::new();
    let mut add = |target: &'static str, name: String, bytes: Vec<u8>| {
        seeds.push(Seed {
            target,
            name,
            bytes,
        })
    };
    for (i, args) in ISTIO.iter().enumerate() {
        add("istio_flags", format!("istio-{i}"), words(args));
    }
    for (i, args) in LINKERD.iter().enumerate() {
        add("linkerd_flags", format!("linkerd-{i}"), words(args));
    }
    for (name, conf) in [("conf-1.0", CNI_CONF), ("conf-0.3", CNI_CONF_OLD)] {
        add(
            "cni_input",
            name.into(),
            [CNI_ARGS, "\0", conf].concat().into_bytes(),
        );
    }
    for (name, bytes) in pod_settings() {
        add("agent_api", name, bytes);
    }
    let configs = PROXY_CONFIGS.iter().map(|t| first_yaml(t));
    for (i, text) in configs.enumerate() {
        add("proxy_config", format!("config-{i}"), text.into_bytes());
    }
    for (name, bytes) in xds() {
        add("xds_resources", name, bytes);
    }
    let hello = sockmesh_proxy::transport::client_hello("reviews.default.svc.cluster.local");
    add("first_bytes", "tls".into(), hello);
    add(
        "first_bytes",
        "http1".into(),
        b"GET / HTTP/1.1\r\nHost: reviews\r\n\r\n".to_vec(),
    );
    add(
        "first_bytes",
        "http2".into(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
    );
    add(
        "first_bytes",
        "tcp".into(),
        b"\x00\x00\x00\x08\x04\xd2\x16\x2f".to_vec(),
    );
    seeds
}

//! The proxy's configuration file: YAML shaped like Envoy's, checked in shape and in meaning.
//!
//! Listeners, virtual hosts, routes, clusters and endpoints. Loading checks the shape (serde
//! names the field, line and column) and then the meaning (references, regexes, weights),
//! naming the offending path.

use std::{collections::BTreeSet, net::SocketAddr, path::Path};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHost>,
    #[serde(default)]
    pub clusters: Vec<Cluster>,
    /// Raw TCP by original destination port (or `ip:port`), for traffic that is not HTTP.
    #[serde(default)]
    pub tcp_routes: Vec<TcpRoute>,
    /// TLS passed through by SNI (server name, `*.suffix` allowed) to a cluster; other TLS goes
    /// to its original destination.
    #[serde(default)]
    pub tls_routes: Vec<TlsRoute>,
    /// One line per request on stderr (tracing target `access`). Off by default, as Istio's
    /// meshConfig leaves `accessLogFile` empty.
    #[serde(default)]
    pub access_log: bool,
    /// The admin endpoint (keep it on localhost).
    pub admin: Option<Admin>,
    /// A control plane serving Envoy's xDS v3 (ADS): its listeners, routes, clusters and
    /// endpoints are added to the ones in this file.
    pub xds: Option<XdsSettings>,
    /// The file's text, for the admin's config dump.
    #[serde(skip)]
    pub source: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsRoute {
    pub sni: String,
    pub cluster: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsSettings {
    /// `http://host:port` or `unix:/path/to/socket` (as Istio's agent serves its proxy).
    pub address: String,
    /// The node id the control plane knows this proxy by.
    pub node_id: String,
    #[serde(default = "default_node_cluster")]
    pub node_cluster: String,
}

fn default_node_cluster() -> String {
    "sockmesh".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Captured outbound traffic (15001): routed, else passed through to the original
    /// destination.
    Outbound,
    /// Captured inbound traffic (15006): passed to the local app from 127.0.0.6 / ::6.
    Inbound,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub direction: Direction,
    /// How long to wait for a client's first bytes before treating the connection as TCP;
    /// 0 (the default, as Istio's) waits for them. Server-first protocols send nothing: declare
    /// their ports in `tcp_routes`, which skips detection.
    #[serde(default)]
    pub detect_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualHost {
    pub name: String,
    /// Authorities (`host`, `host:port`, `*.suffix`, `prefix*`, `*`) and original destinations
    /// (`ip:port`) this virtual host answers for.
    pub domains: Vec<String>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(rename = "match", default)]
    pub matcher: RouteMatch,
    pub route: RouteAction,
    #[serde(default)]
    pub request_headers_to_add: Vec<HeaderValue>,
    #[serde(default)]
    pub request_headers_to_remove: Vec<String>,
    #[serde(default)]
    pub response_headers_to_add: Vec<HeaderValue>,
    #[serde(default)]
    pub response_headers_to_remove: Vec<String>,
    /// Fault injection (Envoy's HTTP fault filter, per route).
    pub fault: Option<Fault>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    pub fixed_delay_ms: u64,
    /// Share of requests delayed, 0 to 100.
    #[serde(default = "hundred")]
    pub percentage: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    pub http_status: u16,
    #[serde(default = "hundred")]
    pub percentage: f64,
}

fn hundred() -> f64 {
    100.0
}

/// Fields left out take Envoy's defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Comma-separated: `5xx`, `gateway-error`, `connect-failure`, `reset`, `retriable-4xx`.
    pub retry_on: String,
    pub num_retries: u32,
    /// Each attempt's own limit (0: only the route's timeout).
    pub per_try_timeout_ms: u64,
    /// Backoff: a random wait up to base * 2^(attempt-1), capped at 10 x base (Envoy's).
    pub base_interval_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retry_on: "5xx,connect-failure,reset".into(),
            num_retries: 1,
            per_try_timeout_ms: 0,
            base_interval_ms: 25,
        }
    }
}

/// The `retry_on` conditions understood.
pub const RETRY_ON: [&str; 5] = [
    "5xx",
    "gateway-error",
    "connect-failure",
    "reset",
    "retriable-4xx",
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorPolicy {
    pub cluster: String,
    #[serde(default = "hundred")]
    pub percentage: f64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// One of path, prefix, regex (none: prefix "/").
    pub path: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
    #[serde(default)]
    pub query: Vec<QueryMatch>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub exact: Option<String>,
    pub regex: Option<String>,
    /// Only that the header is there (or, with `false`, that it is not).
    pub present: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryMatch {
    pub name: String,
    pub exact: Option<String>,
    pub present: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAction {
    pub cluster: Option<String>,
    #[serde(default)]
    pub weighted_clusters: Vec<WeightedCluster>,
    /// Per-route timeout for the whole request (default 15 s, as Envoy's).
    #[serde(default = "default_route_timeout_ms")]
    pub timeout_ms: u64,
    pub retry_policy: Option<RetryPolicy>,
    /// Shadow traffic: a copy of each request, answer ignored, Host with "-shadow" appended.
    #[serde(default)]
    pub request_mirror_policies: Vec<MirrorPolicy>,
}

/// Envoy's default route timeout, for routes that set none.
pub const DEFAULT_ROUTE_TIMEOUT_MS: u64 = 15_000;

fn default_route_timeout_ms() -> u64 {
    DEFAULT_ROUTE_TIMEOUT_MS
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
    RingHash,
    Maglev,
}

impl LbPolicy {
    /// Whether the policy picks by a request's hash (the consistent hashes); the others ignore
    /// it.
    pub const fn hashes(self) -> bool {
        matches!(self, LbPolicy::RingHash | LbPolicy::Maglev)
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    #[serde(default)]
    pub lb_policy: LbPolicy,
    /// The hash key of ring_hash and maglev: a request header, or the client's address.
    pub hash_policy: Option<HashPolicy>,
    /// Speak HTTP/2 (h2c) to the endpoints rather than the client's protocol.
    #[serde(default)]
    pub http2: bool,
    pub endpoints: Vec<EndpointConfig>,
    /// Passive health: endpoints answering 5xx in a row are ejected for a while.
    pub outlier_detection: Option<OutlierDetection>,
    /// Active health: probes each endpoint; failing ones get no traffic.
    pub health_check: Option<HealthCheck>,
    /// Limits on connections and requests in flight, and on requests waiting for one (beyond:
    /// 503 at once); Envoy's defaults.
    #[serde(default)]
    pub circuit_breakers: CircuitBreakers,
    /// Retries allowed at once: `budget_percent` of active requests, at least
    /// `min_retry_concurrency` (Envoy's retry budget).
    #[serde(default)]
    pub retry_budget: RetryBudget,
    /// How long a connection to an endpoint may take to open (Envoy's default: 5 s).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

/// Fields left out take Envoy's defaults.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Failed probes in a row that make an endpoint unhealthy.
    pub unhealthy_threshold: u32,
    /// Passed probes in a row that make it healthy again.
    pub healthy_threshold: u32,
    /// An HTTP/1.1 GET of this path must answer 2xx; without it, a TCP connect must succeed.
    pub http_path: Option<String>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval_ms: 1000,
            timeout_ms: 500,
            unhealthy_threshold: 3,
            healthy_threshold: 1,
            http_path: None,
        }
    }
}

/// Envoy's default `connect_timeout`, for clusters that set none and original destinations.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5000;

fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}

/// Fields left out take Envoy's defaults.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakers {
    pub max_connections: u64,
    /// Requests in flight to the cluster at once.
    pub max_requests: u64,
    /// Requests waiting for one of those slots; beyond, 503 at once.
    pub max_pending_requests: u64,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        CircuitBreakers {
            max_connections: 1024,
            max_requests: 1024,
            max_pending_requests: 1024,
        }
    }
}

/// Fields left out take Envoy's defaults.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierDetection {
    pub consecutive_5xx: u32,
    /// Ejection lasts this times the number of times the endpoint was ejected.
    pub base_ejection_time_ms: u64,
    /// Never eject more than this share of the cluster (one endpoint may always go).
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            base_ejection_time_ms: 30_000,
            max_ejection_percent: 10,
        }
    }
}

/// Fields left out take Envoy's defaults.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudget {
    pub budget_percent: u32,
    pub min_retry_concurrency: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            budget_percent: 20,
            min_retry_concurrency: 3,
        }
    }
}

/// One of: a request header's value, or the client's address.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HashPolicy {
    pub header: Option<String>,
    #[serde(default)]
    pub source_ip: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub address: SocketAddr,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default)]
    pub priority: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpRoute {
    /// `port` or `ip:port` of the original destination.
    pub destination: String,
    /// Where to send it; none: the original destination (declared TCP, not sniffed).
    pub cluster: Option<String>,
}

/// Where a configuration comes from: a file alone is held to all its references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    File,
    Merged,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// serde_yaml's message names the field, line and column.
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: {invalid}")]
    Invalid { path: String, invalid: Invalid },
}

/// What is wrong with a configuration, and where: a path such as
/// `virtual_hosts[0].routes[0].route.cluster`.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct Invalid {
    pub field: String,
    pub problem: String,
}

impl Invalid {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Invalid {
        Invalid {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl Cluster {
    pub fn connect_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.connect_timeout_ms)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        Config::parse(&p, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<Config, ConfigError> {
        let mut c: Config = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_string(),
            source,
        })?;
        c.source = text.to_string();
        c.validate(Origin::File)
            .map_err(|invalid| ConfigError::Invalid {
                path: path.to_string(),
                invalid,
            })?;
        Ok(c)
    }

    /// Check a configuration merged from this file and a control plane's resources: as a file,
    /// but (as Envoy) a cluster may have no endpoints yet and a route may name a cluster not
    /// (yet) defined; its requests get 503.
    pub fn validate_merged(&self) -> Result<(), Invalid> {
        self.validate(Origin::Merged)
    }

    /// The meaning: names unique, references resolve, regexes compile, weights usable.
    fn validate(&self, origin: Origin) -> Result<(), Invalid> {
        let lenient = origin == Origin::Merged;
        let mut names = BTreeSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let f = format!("clusters[{i}]");
            if !names.insert(c.name.as_str()) {
                return Err(Invalid::new(
                    format!("{f}.name"),
                    format!("{:?} is defined twice", c.name),
                ));
            }
            if c.endpoints.is_empty() && !lenient {
                return Err(Invalid::new(
                    format!("{f}.endpoints"),
                    "a cluster needs an endpoint",
                ));
            }
            if c.connect_timeout_ms == 0 {
                return Err(Invalid::new(
                    format!("{f}.connect_timeout_ms"),
                    "must be 1 or more (5000 when left out)",
                ));
            }
            for (j, e) in c.endpoints.iter().enumerate() {
                if e.weight == 0 {
                    return Err(Invalid::new(
                        format!("{f}.endpoints[{j}].weight"),
                        "must be 1 or more",
                    ));
                }
            }
            if let Some(h) = &c.hash_policy {
                if h.header.is_some() == h.source_ip {
                    return Err(Invalid::new(
                        format!("{f}.hash_policy"),
                        "give one of header and source_ip",
                    ));
                }
            }
            if c.lb_policy.hashes() != c.hash_policy.is_some() {
                return Err(Invalid::new(
                    format!("{f}.hash_policy"),
                    "ring_hash and maglev need a hash_policy, and only they use one",
                ));
            }
        }
        let known = |name: &str| lenient || names.contains(name);
        for (i, l) in self.listeners.iter().enumerate() {
            if self.listeners[..i].iter().any(|o| o.address == l.address) {
                return Err(Invalid::new(
                    format!("listeners[{i}].address"),
                    format!("{} is used twice", l.address),
                ));
            }
        }
        for (i, vh) in self.virtual_hosts.iter().enumerate() {
            let f = format!("virtual_hosts[{i}]");
            if vh.domains.is_empty() {
                return Err(Invalid::new(
                    format!("{f}.domains"),
                    "needs at least one domain",
                ));
            }
            for (j, r) in vh.routes.iter().enumerate() {
                let f = format!("{f}.routes[{j}]");
                let m = &r.matcher;
                let kinds = [&m.path, &m.prefix, &m.regex]
                    .iter()
                    .filter(|k| k.is_some())
                    .count();
                if kinds > 1 {
                    return Err(Invalid::new(
                        format!("{f}.match"),
                        "give one of path, prefix and regex",
                    ));
                }
                if let Some(re) = &m.regex {
                    regex::Regex::new(re)
                        .map_err(|e| Invalid::new(format!("{f}.match.regex"), e.to_string()))?;
                }
                for (k, h) in m.headers.iter().enumerate() {
                    if let Some(re) = &h.regex {
                        regex::Regex::new(re).map_err(|e| {
                            Invalid::new(format!("{f}.match.headers[{k}].regex"), e.to_string())
                        })?;
                    }
                }
                let a = &r.route;
                for (k, m) in a.request_mirror_policies.iter().enumerate() {
                    if !known(&m.cluster) {
                        return Err(Invalid::new(
                            format!("{f}.route.request_mirror_policies[{k}].cluster"),
                            format!("no cluster {:?}", m.cluster),
                        ));
                    }
                }
                if let Some(rp) = &a.retry_policy {
                    for cond in rp.retry_on.split(',').map(str::trim) {
                        if !RETRY_ON.contains(&cond) {
                            return Err(Invalid::new(
                                format!("{f}.route.retry_policy.retry_on"),
                                format!("{cond:?} is not one of {}", RETRY_ON.join(", ")),
                            ));
                        }
                    }
                }
                if let Some(abort) = r.fault.as_ref().and_then(|f| f.abort.as_ref()) {
                    if !(200..600).contains(&abort.http_status) {
                        return Err(Invalid::new(
                            format!("{f}.fault.abort.http_status"),
                            format!("{} is not an HTTP status", abort.http_status),
                        ));
                    }
                }
                match (&a.cluster, a.weighted_clusters.is_empty()) {
                    (Some(c), true) if !known(c) => {
                        return Err(Invalid::new(
                            format!("{f}.route.cluster"),
                            format!("no cluster {c:?}"),
                        ))
                    }
                    (Some(_), true) => {}
                    (None, false) => {
                        for (k, w) in a.weighted_clusters.iter().enumerate() {
                            if !known(&w.name) {
                                return Err(Invalid::new(
                                    format!("{f}.route.weighted_clusters[{k}].name"),
                                    format!("no cluster {:?}", w.name),
                                ));
                            }
                        }
                        if a.weighted_clusters.iter().all(|w| w.weight == 0) {
                            return Err(Invalid::new(
                                format!("{f}.route.weighted_clusters"),
                                "the weights add up to 0",
                            ));
                        }
                    }
                    _ => {
                        return Err(Invalid::new(
                            format!("{f}.route"),
                            "give either cluster or weighted_clusters",
                        ))
                    }
                }
            }
        }
        for (i, t) in self.tls_routes.iter().enumerate() {
            if !known(&t.cluster) {
                return Err(Invalid::new(
                    format!("tls_routes[{i}].cluster"),
                    format!("no cluster {:?}", t.cluster),
                ));
            }
        }
        for (i, t) in self.tcp_routes.iter().enumerate() {
            let f = format!("tcp_routes[{i}]");
            if t.destination.parse::<u16>().is_err() && t.destination.parse::<SocketAddr>().is_err()
            {
                return Err(Invalid::new(
                    format!("{f}.destination"),
                    format!("{:?} is neither a port nor ip:port", t.destination),
                ));
            }
            if let Some(cl) = t.cluster.as_deref().filter(|c| !known(c)) {
                return Err(Invalid::new(
                    format!("{f}.cluster"),
                    format!("no cluster {cl:?}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listeners:
  - {name: outbound, address: "0.0.0.0:15001", direction: outbound}
virtual_hosts:
  - name: reviews
    domains: ["reviews", "10.96.0.10:80"]
    routes:
      - match: {prefix: /v2}
        route: {cluster: v2}
      - route:
          weighted_clusters: [{name: v1, weight: 99}, {name: v2, weight: 1}]
clusters:
  - name: v1
    endpoints: [{address: "10.0.0.1:9080"}]
  - name: v2
    lb_policy: maglev
    hash_policy: {header: x-user}
    endpoints: [{address: "10.0.0.2:9080", weight: 2}]
"#;

    #[test]
    fn a_good_file_loads() {
        let c = Config::parse("t.yaml", GOOD).unwrap();
        assert_eq!(c.virtual_hosts[0].routes.len(), 2);
        assert_eq!(c.clusters[1].lb_policy, LbPolicy::Maglev);
        assert_eq!(c.clusters[0].connect_timeout_ms, 5000);
        let c = Config::parse(
            "t.yaml",
            &GOOD.replace(
                "  - name: v1\n",
                "  - name: v1\n    connect_timeout_ms: 250\n",
            ),
        )
        .unwrap();
        assert_eq!(
            c.clusters[0].connect_timeout(),
            std::time::Duration::from_millis(250)
        );
    }

    #[test]
    fn left_out_fields_take_envoys_defaults() {
        let c = Config::parse(
            "t.yaml",
            r#"
virtual_hosts:
  - name: v
    domains: ["*"]
    routes: [{route: {cluster: a, retry_policy: {}}}]
clusters:
  - name: a
    endpoints: [{address: "10.0.0.1:80"}]
    outlier_detection: {}
    health_check: {}
    circuit_breakers: {max_requests: 7}
    retry_budget: {}
"#,
        )
        .unwrap();
        let route = &c.virtual_hosts[0].routes[0].route;
        assert_eq!(route.timeout_ms, 15_000);
        let r = route.retry_policy.as_ref().unwrap();
        assert_eq!(
            (
                r.retry_on.as_str(),
                r.num_retries,
                r.per_try_timeout_ms,
                r.base_interval_ms
            ),
            ("5xx,connect-failure,reset", 1, 0, 25)
        );
        let cl = &c.clusters[0];
        let od = cl.outlier_detection.as_ref().unwrap();
        assert_eq!(
            (
                od.consecutive_5xx,
                od.base_ejection_time_ms,
                od.max_ejection_percent
            ),
            (5, 30_000, 10)
        );
        let hc = cl.health_check.as_ref().unwrap();
        assert_eq!(
            (
                hc.interval_ms,
                hc.timeout_ms,
                hc.unhealthy_threshold,
                hc.healthy_threshold
            ),
            (1000, 500, 3, 1)
        );
        assert_eq!(hc.http_path, None);
        let cb = &cl.circuit_breakers;
        assert_eq!(
            (cb.max_connections, cb.max_requests, cb.max_pending_requests),
            (1024, 7, 1024)
        );
        let rb = &cl.retry_budget;
        assert_eq!((rb.budget_percent, rb.min_retry_concurrency), (20, 3));
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let e = Config::parse(
            "t.yaml",
            &GOOD.replace("lb_policy: maglev", "lb_policy: fastest"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("lb_policy") && e.contains("line"), "{e}");
        let e = Config::parse("t.yaml", &GOOD.replace("{cluster: v2}", "{cluster: v3}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("virtual_hosts[0].routes[0].route.cluster"),
            "{e}"
        );
        let e = Config::parse("t.yaml", &GOOD.replace("prefix: /v2", "regex: '('"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("match.regex"), "{e}");
        let e = Config::parse(
            "t.yaml",
            &GOOD.replace("    hash_policy: {header: x-user}\n", ""),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("clusters[1].hash_policy"), "{e}");
        let e = Config::parse(
            "t.yaml",
            &GOOD.replace(
                "  - name: v1\n",
                "  - name: v1\n    connect_timeout_ms: 0\n",
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("clusters[0].connect_timeout_ms"), "{e}");
        let e = Config::parse(
            "t.yaml",
            &GOOD.replace("direction: outbound", "direction: sideways"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("listeners[0].direction") && e.contains("line 3"),
            "{e}"
        );
    }
}

//! Route selection, compiled from the configuration: HTTP by virtual host, TLS by SNI, TCP by port.
//!
//! A virtual host is chosen by authority (Envoy's order: exact, longest `*.suffix`, longest
//! `prefix*`), else by original destination, else `*`; then the first route whose path,
//! headers and query match.

use std::{
    borrow::Cow,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use hyper::HeaderMap;
use regex::Regex;

use crate::{
    config::{self, Config, Fault, HeaderValue, MirrorPolicy, RetryPolicy},
    random,
    stats::RouteStats,
};

#[derive(Debug)]
enum Domain {
    Exact(String),
    /// `*.example.com` is stored as `.example.com`.
    Suffix(String),
    /// `api.*` is stored as `api.`.
    Prefix(String),
    Any,
    OrigDst(SocketAddr),
}

#[derive(Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum Cond {
    Exact(String),
    Regex(Regex),
    Present(bool),
}

/// Where a matched route sends requests.
#[derive(Debug, Clone)]
pub enum Target {
    Cluster(String),
    Weighted(Vec<(String, u32)>),
}

/// A route compiled: what it matches, and what becomes of the requests it takes.
#[derive(Debug)]
pub struct Rule {
    /// `virtual host/index`, for stats and logs.
    pub name: String,
    path: PathMatch,
    headers: Vec<(String, Cond)>,
    query: Vec<(String, Cond)>,
    pub target: Target,
    pub timeout: Duration,
    pub request_headers_to_add: Vec<HeaderValue>,
    pub request_headers_to_remove: Vec<String>,
    pub response_headers_to_add: Vec<HeaderValue>,
    pub response_headers_to_remove: Vec<String>,
    pub fault: Option<Fault>,
    pub retry: Option<RetryPolicy>,
    pub mirrors: Vec<MirrorPolicy>,
    /// Its requests' stats, by the place of their cluster in `target`.
    pub stats: Vec<RouteStats>,
}

/// A virtual host compiled: the domains it answers for, and its rules in order.
#[derive(Debug)]
pub struct Host {
    pub name: String,
    domains: Vec<Domain>,
    rules: Vec<Rule>,
}

/// The routes in force, compiled.
#[derive(Debug, Default)]
pub struct Router {
    hosts: Vec<Host>,
    /// TCP routes: original destination IP (any when none), port, cluster (none: the original
    /// destination).
    tcp: Vec<(Option<IpAddr>, u16, Option<String>)>,
    /// TLS routes: server name, cluster.
    tls: Vec<(Domain, String)>,
}

fn cond(exact: &Option<String>, regex: &Option<String>, present: Option<bool>) -> Cond {
    match (exact, regex, present) {
        (Some(v), _, _) => Cond::Exact(v.clone()),
        (None, Some(r), _) => Cond::Regex(Regex::new(&format!("^(?:{r})$")).expect("validated")),
        (None, None, p) => Cond::Present(p.unwrap_or(true)),
    }
}

impl Cond {
    fn test(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (Cond::Present(want), v) => v.is_some() == *want,
            (Cond::Exact(e), Some(v)) => e == v,
            (Cond::Regex(r), Some(v)) => r.is_match(v),
            (_, None) => false,
        }
    }
}

fn compile_route(name: String, r: &config::Route) -> Rule {
    let m = &r.matcher;
    let path = match (&m.path, &m.prefix, &m.regex) {
        (Some(p), _, _) => PathMatch::Exact(p.clone()),
        (_, Some(p), _) => PathMatch::Prefix(p.clone()),
        (_, _, Some(re)) => {
            PathMatch::Regex(Regex::new(&format!("^(?:{re})$")).expect("validated"))
        }
        _ => PathMatch::Prefix("/".into()),
    };
    let target = match &r.route.cluster {
        Some(c) => Target::Cluster(c.clone()),
        None => Target::Weighted(
            r.route
                .weighted_clusters
                .iter()
                .map(|w| (w.name.clone(), w.weight))
                .collect(),
        ),
    };
    Rule {
        name,
        path,
        headers: m
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    cond(&h.exact, &h.regex, h.present),
                )
            })
            .collect(),
        query: m
            .query
            .iter()
            .map(|q| (q.name.clone(), cond(&q.exact, &None, q.present)))
            .collect(),
        timeout: Duration::from_millis(r.route.timeout_ms),
        request_headers_to_add: r.request_headers_to_add.clone(),
        request_headers_to_remove: r.request_headers_to_remove.clone(),
        response_headers_to_add: r.response_headers_to_add.clone(),
        response_headers_to_remove: r.response_headers_to_remove.clone(),
        fault: r.fault.clone(),
        retry: r.route.retry_policy.clone(),
        mirrors: r.route.request_mirror_policies.clone(),
        stats: (0..target.len()).map(|_| RouteStats::new()).collect(),
        target,
    }
}

fn domain(d: &str) -> Domain {
    let d = d.to_ascii_lowercase();
    if d == "*" {
        Domain::Any
    } else if let Ok(a) = d.parse::<SocketAddr>() {
        Domain::OrigDst(a)
    } else if let Some(s) = d.strip_prefix('*') {
        Domain::Suffix(s.to_string())
    } else if let Some(p) = d.strip_suffix('*') {
        Domain::Prefix(p.to_string())
    } else {
        Domain::Exact(d)
    }
}

impl Router {
    pub fn new(c: &Config) -> Router {
        let hosts = c
            .virtual_hosts
            .iter()
            .map(|v| Host {
                name: v.name.clone(),
                domains: v.domains.iter().map(|d| domain(d)).collect(),
                rules: v
                    .routes
                    .iter()
                    .enumerate()
                    .map(|(i, r)| compile_route(format!("{}/{i}", v.name), r))
                    .collect(),
            })
            .collect();
        let tcp = c
            .tcp_routes
            .iter()
            .map(|t| match t.destination.parse::<SocketAddr>() {
                Ok(a) => (Some(a.ip()), a.port(), t.cluster.clone()),
                Err(_) => (
                    None,
                    t.destination.parse().expect("validated"),
                    t.cluster.clone(),
                ),
            })
            .collect();
        let tls = c
            .tls_routes
            .iter()
            .map(|t| (domain(&t.sni), t.cluster.clone()))
            .collect();
        Router { hosts, tcp, tls }
    }

    /// The virtual host for a request to `authority` that was sent to `orig_dst`.
    pub fn host(&self, authority: &str, orig_dst: SocketAddr) -> Option<&Host> {
        // Lowercased only when it has capitals: most clients send it in lowercase.
        let authority = if authority.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(authority.to_ascii_lowercase())
        } else {
            Cow::Borrowed(authority)
        };
        let host = authority
            .rsplit_once(':')
            .filter(|(_, port)| port.parse::<u16>().is_ok() && !authority.ends_with(']'))
            .map_or(&*authority, |(h, _)| h);
        // Score: exact 3, suffix 2 (+len), prefix 1 (+len); original destination and `*` last.
        let mut best: Option<(u32, usize, &Host)> = None;
        for vh in &self.hosts {
            for d in &vh.domains {
                let score = match d {
                    Domain::Exact(e) if *e == *authority || *e == host => Some((4, e.len())),
                    Domain::Suffix(s) if host.ends_with(s.as_str()) && host.len() > s.len() => {
                        Some((3, s.len()))
                    }
                    Domain::Prefix(p) if host.starts_with(p.as_str()) && host.len() > p.len() => {
                        Some((2, p.len()))
                    }
                    Domain::OrigDst(a) if *a == orig_dst => Some((1, 0)),
                    Domain::Any => Some((0, 0)),
                    _ => None,
                };
                if let Some((s, len)) = score {
                    if best.is_none_or(|(bs, bl, _)| (s, len) > (bs, bl)) {
                        best = Some((s, len, vh));
                    }
                }
            }
        }
        best.map(|(_, _, vh)| vh)
    }

    /// The cluster for TLS with server name `sni`: an exact name first, then the longest
    /// `*.suffix`.
    pub fn tls_cluster(&self, sni: &str) -> Option<&str> {
        let sni = sni.to_ascii_lowercase();
        self.tls
            .iter()
            .filter_map(|(d, c)| match d {
                Domain::Exact(e) if *e == sni => Some((usize::MAX, c)),
                Domain::Suffix(s) if sni.ends_with(s.as_str()) && sni.len() > s.len() => {
                    Some((s.len(), c))
                }
                Domain::Any => Some((0, c)),
                _ => None,
            })
            .max_by_key(|(score, _)| *score)
            .map(|(_, c)| c.as_str())
    }

    /// The TCP route for `orig_dst`, if one is declared: its cluster, or none for the original
    /// destination.
    pub fn tcp_route(&self, orig_dst: SocketAddr) -> Option<Option<&str>> {
        self.tcp
            .iter()
            .filter(|(ip, port, _)| {
                *port == orig_dst.port() && ip.is_none_or(|i| i == orig_dst.ip())
            })
            // An ip:port route wins over a port route.
            .max_by_key(|(ip, _, _)| ip.is_some())
            .map(|(_, _, c)| c.as_deref())
    }
}

impl Host {
    /// The first rule matching the request.
    pub fn rule(&self, path_and_query: &str, headers: &HeaderMap) -> Option<&Rule> {
        let (path, query) = path_and_query
            .split_once('?')
            .map_or((path_and_query, ""), |(p, q)| (p, q));
        self.rules.iter().find(|r| {
            let path_ok = match &r.path {
                PathMatch::Exact(p) => p == path,
                PathMatch::Prefix(p) => path.starts_with(p.as_str()),
                PathMatch::Regex(re) => re.is_match(path),
            };
            path_ok
                && r.headers.iter().all(|(name, c)| {
                    c.test(headers.get(name.as_str()).and_then(|v| v.to_str().ok()))
                })
                && r.query.iter().all(|(name, c)| {
                    let v = query
                        .split('&')
                        .filter_map(|kv| {
                            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                            (k == name).then_some(v)
                        })
                        .next();
                    c.test(v)
                })
        })
    }
}

impl Target {
    /// The cluster for one request: weighted clusters are drawn in proportion to their weights.
    /// Returned with its place among the target's clusters.
    pub fn cluster(&self) -> (usize, &str) {
        match self {
            Target::Cluster(c) => (0, c),
            Target::Weighted(w) => {
                let total: u64 = w.iter().map(|(_, x)| *x as u64).sum();
                let mut at = random::below(total.max(1));
                for (i, (name, weight)) in w.iter().enumerate() {
                    if at < *weight as u64 {
                        return (i, name);
                    }
                    at -= *weight as u64;
                }
                (w.len() - 1, &w[w.len() - 1].0)
            }
        }
    }

    /// How many clusters the target names.
    fn len(&self) -> usize {
        match self {
            Target::Cluster(_) => 1,
            Target::Weighted(w) => w.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(yaml: &str) -> Router {
        Router::new(&Config::parse("t.yaml", yaml).unwrap())
    }

    const YAML: &str = r#"
virtual_hosts:
  - name: exact
    domains: ["reviews", "reviews.default.svc.cluster.local:9080"]
    routes:
      - match: {path: /exact}
        route: {cluster: a}
      - match: {prefix: /api, headers: [{name: x-canary, exact: "yes"}]}
        route: {cluster: b}
      - match: {regex: "/items/[0-9]+", query: [{name: debug, present: true}]}
        route: {cluster: b}
      - route: {cluster: a}
  - name: suffix
    domains: ["*.example.com"]
    routes: [{route: {cluster: a}}]
  - name: longer-suffix
    domains: ["*.api.example.com"]
    routes: [{route: {cluster: a}}]
  - name: prefix
    domains: ["api.*"]
    routes: [{route: {cluster: a}}]
  - name: vip
    domains: ["10.96.0.10:80"]
    routes: [{route: {cluster: a}}]
  - name: any
    domains: ["*"]
    routes: [{route: {weighted_clusters: [{name: a, weight: 99}, {name: b, weight: 1}]}}]
clusters:
  - {name: a, endpoints: [{address: "10.0.0.1:80"}]}
  - {name: b, endpoints: [{address: "10.0.0.2:80"}]}
"#;

    /// An original destination no virtual host names.
    const OTHER: &str = "192.0.2.1:80";

    fn host<'a>(r: &'a Router, authority: &str, dst: &str) -> &'a Host {
        r.host(authority, dst.parse().unwrap()).unwrap()
    }

    fn vh<'a>(r: &'a Router, authority: &str, dst: &str) -> &'a str {
        &host(r, authority, dst).name
    }

    #[test]
    fn virtual_hosts_in_envoys_order() {
        let r = router(YAML);
        let other = OTHER;
        assert_eq!(vh(&r, "reviews", other), "exact");
        assert_eq!(
            vh(&r, "reviews:9080", other),
            "exact",
            "port ignored for a portless domain"
        );
        assert_eq!(
            vh(&r, "Reviews.default.svc.cluster.local:9080", other),
            "exact"
        );
        assert_eq!(vh(&r, "www.example.com", other), "suffix");
        assert_eq!(vh(&r, "v1.api.example.com", other), "longer-suffix");
        assert_eq!(vh(&r, "api.internal", other), "prefix");
        assert_eq!(
            vh(&r, "unknown", "10.96.0.10:80"),
            "vip",
            "original destination"
        );
        assert_eq!(vh(&r, "unknown", other), "any");
        assert_eq!(
            vh(&r, "reviews", "10.96.0.10:80"),
            "exact",
            "authority beats VIP"
        );
    }

    #[test]
    fn routes_by_path_headers_and_query() {
        let r = router(YAML);
        let v = host(&r, "reviews", OTHER);
        let mut h = HeaderMap::new();
        let cluster = |p: &str, h: &HeaderMap| match &v.rule(p, h).unwrap().target {
            Target::Cluster(c) => c.clone(),
            Target::Weighted(_) => "weighted".into(),
        };
        assert_eq!(cluster("/exact", &h), "a");
        assert_eq!(cluster("/exact/more", &h), "a", "falls to the catch-all");
        assert_eq!(cluster("/api/x", &h), "a", "header missing");
        h.insert("x-canary", "yes".parse().unwrap());
        assert_eq!(cluster("/api/x", &h), "b");
        assert_eq!(cluster("/items/42", &h), "a", "query missing");
        assert_eq!(cluster("/items/42?debug=1", &h), "b");
        assert_eq!(cluster("/items/42x?debug", &h), "a", "regex is anchored");
    }

    #[test]
    fn weighted_clusters_follow_their_weights() {
        let r = router(YAML);
        let t = &host(&r, "x", OTHER)
            .rule("/", &HeaderMap::new())
            .unwrap()
            .target;
        let b = (0..20_000).filter(|_| t.cluster().1 == "b").count();
        assert!((100..400).contains(&b), "1% of 20000 is 200, got {b}");
    }

    #[test]
    fn tcp_routes_by_port_and_address() {
        let r = router(
            r#"
tcp_routes:
  - {destination: "5432", cluster: a}
  - {destination: "10.0.0.9:5432", cluster: b}
  - {destination: "3306"}
clusters:
  - {name: a, endpoints: [{address: "10.0.0.1:80"}]}
  - {name: b, endpoints: [{address: "10.0.0.2:80"}]}
"#,
        );
        assert_eq!(
            r.tcp_route("10.0.0.8:5432".parse().unwrap()),
            Some(Some("a"))
        );
        assert_eq!(
            r.tcp_route("10.0.0.9:5432".parse().unwrap()),
            Some(Some("b"))
        );
        assert_eq!(r.tcp_route("10.0.0.9:5433".parse().unwrap()), None);
        assert_eq!(r.tcp_route("10.0.0.9:3306".parse().unwrap()), Some(None));
    }
}

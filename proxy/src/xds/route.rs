//! RouteConfigurations (RDS, or inline in a listener) into virtual hosts and routes.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::{
    config::{
        core::v3 as core,
        route::v3::{self as rds, route_action::hash_policy::PolicySpecifier},
    },
    extensions::filters::{
        common::fault::v3::fault_delay::FaultDelaySecifier,
        http::fault::v3::{fault_abort::ErrorType, HttpFault},
    },
    r#type::matcher::v3::{string_matcher::MatchPattern, StringMatcher},
};

use super::{
    error::{At, Invalid, Problem},
    proto::{ms, percent, u32v, unpack},
};
use crate::config::{
    Fault, FaultAbort, FaultDelay, HashPolicy, HeaderMatch, HeaderValue, MirrorPolicy, QueryMatch,
    RetryPolicy, Route, RouteAction, RouteMatch, VirtualHost, WeightedCluster,
    DEFAULT_ROUTE_TIMEOUT_MS,
};

/// Route timeouts of 0 mean none in Envoy: a year stands for it.
pub const NO_TIMEOUT_MS: u64 = 365 * 24 * 3600 * 1000;

/// How a translation sees the clusters: the ORIGINAL_DST ones cannot be routed to, and the
/// first route naming a hashing cluster gives its hash policy.
pub struct Clusters<'a> {
    pub passthrough: &'a BTreeSet<&'a str>,
    pub hashes: &'a mut BTreeMap<String, HashPolicy>,
}

/// Add the virtual hosts of `rc` to `out`.
pub fn route_config(
    rc: &rds::RouteConfiguration,
    clusters: &mut Clusters<'_>,
    out: &mut Vec<VirtualHost>,
) -> Result<(), Invalid> {
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        let at = format!("virtual_hosts[{i}] ({})", vh.name);
        let mut routes = Vec::new();
        for (j, r) in vh.routes.iter().enumerate() {
            let mut route = route(r, clusters).at(format!("{at}.routes[{j}]"))?;
            add_header_changes(&mut route, vh, rc);
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

/// Envoy's order of header changes: the route's, then the virtual host's, then the route
/// configuration's.
fn add_header_changes(route: &mut Route, vh: &rds::VirtualHost, rc: &rds::RouteConfiguration) {
    for more in [&vh.request_headers_to_add, &rc.request_headers_to_add] {
        route.request_headers_to_add.extend(header_values(more));
    }
    for more in [&vh.response_headers_to_add, &rc.response_headers_to_add] {
        route.response_headers_to_add.extend(header_values(more));
    }
    for more in [&vh.request_headers_to_remove, &rc.request_headers_to_remove] {
        route.request_headers_to_remove.extend(more.iter().cloned());
    }
    for more in [
        &vh.response_headers_to_remove,
        &rc.response_headers_to_remove,
    ] {
        route
            .response_headers_to_remove
            .extend(more.iter().cloned());
    }
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

fn route(r: &rds::Route, clusters: &mut Clusters<'_>) -> Result<Route, Invalid> {
    let matcher = route_match(&r.r#match.clone().unwrap_or_default())?;
    let ra = match &r.action {
        Some(rds::route::Action::Route(ra)) => ra,
        _ => return Err(Problem::NotRouteAction.into()),
    };
    if !ra.prefix_rewrite.is_empty()
        || ra.regex_rewrite.is_some()
        || ra.host_rewrite_specifier.is_some()
    {
        return Err(Problem::Unsupported("path and host rewrites").into());
    }
    let (cluster, weighted_clusters) = targets(ra, clusters.passthrough)?;
    if let Some(h) = ra.hash_policy.first() {
        let policy = hash_policy(h).at("hash_policy")?;
        for name in cluster
            .iter()
            .chain(weighted_clusters.iter().map(|w| &w.name))
        {
            clusters
                .hashes
                .entry(name.clone())
                .or_insert_with(|| policy.clone());
        }
    }
    let request_mirror_policies = ra
        .request_mirror_policies
        .iter()
        .map(|m| {
            Ok(MirrorPolicy {
                cluster: routable(&m.cluster, clusters.passthrough)?,
                percentage: percent(&m.runtime_fraction.as_ref().and_then(|f| f.default_value)),
            })
        })
        .collect::<Result<_, Problem>>()?;
    Ok(Route {
        matcher,
        route: RouteAction {
            cluster,
            weighted_clusters,
            timeout_ms: match ms(&ra.timeout) {
                None => DEFAULT_ROUTE_TIMEOUT_MS,
                Some(0) => NO_TIMEOUT_MS,
                Some(t) => t,
            },
            retry_policy: ra.retry_policy.as_ref().map(retry_policy),
            request_mirror_policies,
        },
        request_headers_to_add: header_values(&r.request_headers_to_add),
        request_headers_to_remove: r.request_headers_to_remove.clone(),
        response_headers_to_add: header_values(&r.response_headers_to_add),
        response_headers_to_remove: r.response_headers_to_remove.clone(),
        fault: fault(r)?,
    })
}

// Older control planes still send the deprecated header matchers.
#[allow(deprecated)]
fn route_match(m: &rds::RouteMatch) -> Result<RouteMatch, Invalid> {
    use rds::route_match::PathSpecifier as P;
    if m.runtime_fraction.is_some() {
        return Err(Problem::Unsupported("match.runtime_fraction").into());
    }
    if m.case_sensitive.as_ref().is_some_and(|c| !c.value) {
        return Err(Problem::Unsupported("match.case_sensitive false").into());
    }
    let mut matcher = RouteMatch::default();
    match &m.path_specifier {
        Some(P::Prefix(p)) => matcher.prefix = Some(p.clone()),
        Some(P::Path(p)) => matcher.path = Some(p.clone()),
        Some(P::SafeRegex(re)) => matcher.regex = Some(re.regex.clone()),
        _ => {
            return Err(Problem::NoChoice {
                field: "match",
                choices: "prefix, path or safe_regex",
            }
            .into())
        }
    }
    for (k, h) in m.headers.iter().enumerate() {
        let at = format!("match.headers[{k}] ({})", h.name);
        matcher.headers.push(header_match(h).at(at)?);
    }
    for (k, q) in m.query_parameters.iter().enumerate() {
        let at = format!("match.query_parameters[{k}] ({})", q.name);
        matcher.query.push(query_match(q).at(at)?);
    }
    Ok(matcher)
}

#[allow(deprecated)]
fn header_match(h: &rds::HeaderMatcher) -> Result<HeaderMatch, Invalid> {
    use rds::header_matcher::HeaderMatchSpecifier as H;
    let (exact, regex, present) = match &h.header_match_specifier {
        Some(H::ExactMatch(v)) => (Some(v.clone()), None, None),
        Some(H::SafeRegexMatch(re)) => (None, Some(re.regex.clone()), None),
        Some(H::PrefixMatch(p)) => (None, Some(format!("{}.*", regex::escape(p))), None),
        Some(H::SuffixMatch(s)) => (None, Some(format!(".*{}", regex::escape(s))), None),
        Some(H::ContainsMatch(s)) => (None, Some(format!(".*{}.*", regex::escape(s))), None),
        Some(H::StringMatch(sm)) => {
            let (e, re) = string_match(sm)?;
            (e, re, None)
        }
        Some(H::PresentMatch(p)) => (None, None, Some(*p != h.invert_match)),
        None => (None, None, Some(!h.invert_match)),
        Some(H::RangeMatch(_)) => return Err(Problem::Unsupported("range_match").into()),
    };
    if h.invert_match && present.is_none() {
        return Err(Problem::InvertMatch.into());
    }
    Ok(HeaderMatch {
        name: h.name.clone(),
        exact,
        regex,
        present,
    })
}

/// A string matcher as an exact value or a regex.
fn string_match(m: &StringMatcher) -> Result<(Option<String>, Option<String>), Problem> {
    if m.ignore_case {
        return Err(Problem::Unsupported("ignore_case"));
    }
    Ok(match &m.match_pattern {
        Some(MatchPattern::Exact(v)) => (Some(v.clone()), None),
        Some(MatchPattern::Prefix(p)) => (None, Some(format!("{}.*", regex::escape(p)))),
        Some(MatchPattern::Suffix(s)) => (None, Some(format!(".*{}", regex::escape(s)))),
        Some(MatchPattern::Contains(s)) => (None, Some(format!(".*{}.*", regex::escape(s)))),
        Some(MatchPattern::SafeRegex(r)) => (None, Some(r.regex.clone())),
        _ => {
            return Err(Problem::Missing(
                "exact, prefix, suffix, contains or safe_regex",
            ))
        }
    })
}

fn query_match(q: &rds::QueryParameterMatcher) -> Result<QueryMatch, Problem> {
    use rds::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
    let (exact, present) = match &q.query_parameter_match_specifier {
        Some(Q::StringMatch(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(v)),
            ignore_case: false,
        })) => (Some(v.clone()), None),
        Some(Q::PresentMatch(p)) => (None, Some(*p)),
        None => (None, Some(true)),
        Some(Q::StringMatch(_)) => return Err(Problem::QueryMatch),
    };
    Ok(QueryMatch {
        name: q.name.clone(),
        exact,
        present,
    })
}

/// Where the route sends requests: a cluster, or weighted clusters.
fn targets(
    ra: &rds::RouteAction,
    passthrough: &BTreeSet<&str>,
) -> Result<(Option<String>, Vec<WeightedCluster>), Problem> {
    use rds::route_action::ClusterSpecifier as C;
    match &ra.cluster_specifier {
        Some(C::Cluster(name)) => Ok((Some(routable(name, passthrough)?), Vec::new())),
        Some(C::WeightedClusters(w)) => {
            let weighted = w
                .clusters
                .iter()
                .map(|cw| {
                    Ok(WeightedCluster {
                        name: routable(&cw.name, passthrough)?,
                        weight: u32v(&cw.weight).unwrap_or(0),
                    })
                })
                .collect::<Result<_, Problem>>()?;
            Ok((None, weighted))
        }
        _ => Err(Problem::NoChoice {
            field: "route",
            choices: "cluster or weighted_clusters",
        }),
    }
}

/// `name`, unless it is an ORIGINAL_DST cluster (unrouted requests go there anyway).
fn routable(name: &str, passthrough: &BTreeSet<&str>) -> Result<String, Problem> {
    if passthrough.contains(name) {
        Err(Problem::RouteToOriginalDst(name.to_string()))
    } else {
        Ok(name.to_string())
    }
}

fn hash_policy(h: &rds::route_action::HashPolicy) -> Result<HashPolicy, Problem> {
    match &h.policy_specifier {
        Some(PolicySpecifier::Header(h)) => Ok(HashPolicy {
            header: Some(h.header_name.clone()),
            source_ip: false,
        }),
        Some(PolicySpecifier::ConnectionProperties(p)) if p.source_ip => Ok(HashPolicy {
            header: None,
            source_ip: true,
        }),
        _ => Err(Problem::SupportedAre(
            "header and connection_properties.source_ip",
        )),
    }
}

/// A retry policy; unset fields take the file's defaults.
fn retry_policy(rp: &rds::RetryPolicy) -> RetryPolicy {
    let d = RetryPolicy::default();
    RetryPolicy {
        retry_on: if rp.retry_on.is_empty() {
            d.retry_on
        } else {
            rp.retry_on.clone()
        },
        num_retries: u32v(&rp.num_retries).unwrap_or(d.num_retries),
        per_try_timeout_ms: ms(&rp.per_try_timeout).unwrap_or(d.per_try_timeout_ms),
        base_interval_ms: rp
            .retry_back_off
            .as_ref()
            .and_then(|b| ms(&b.base_interval))
            .unwrap_or(d.base_interval_ms),
    }
}

/// The route's fault filter configuration, if it has one.
fn fault(r: &rds::Route) -> Result<Option<Fault>, Invalid> {
    const FILTER: &str = "envoy.filters.http.fault";
    let Some(any) = r.typed_per_filter_config.get(FILTER) else {
        return Ok(None);
    };
    let f = unpack::<HttpFault>(any)
        .at("typed_per_filter_config")?
        .ok_or(Problem::Missing("an HTTPFault"))
        .at(format!("typed_per_filter_config[{FILTER}]"))?;
    let delay = match &f.delay {
        None => None,
        Some(d) => match &d.fault_delay_secifier {
            Some(FaultDelaySecifier::FixedDelay(t)) => Some(FaultDelay {
                fixed_delay_ms: ms(&Some(*t)).unwrap_or(0),
                percentage: percent(&d.percentage),
            }),
            _ => return Err(Problem::OnlyOne("fixed_delay")).at("fault.delay"),
        },
    };
    let abort = match &f.abort {
        None => None,
        Some(a) => match a.error_type {
            Some(ErrorType::HttpStatus(s)) => Some(FaultAbort {
                http_status: s.min(u16::MAX as u32) as u16,
                percentage: percent(&a.percentage),
            }),
            _ => return Err(Problem::OnlyOne("http_status")).at("fault.abort"),
        },
    };
    Ok(Some(Fault { delay, abort }))
}

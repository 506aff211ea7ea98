//! Clusters (CDS) and their endpoints (inline, or by EDS) into the proxy's clusters.

use envoy_types::pb::envoy::{
    config::{
        cluster::v3::{
            self as cds,
            cluster::{DiscoveryType, LbPolicy as L},
        },
        core::v3 as core,
        endpoint::v3 as eds,
    },
    extensions::upstreams::http::v3::{
        http_protocol_options::{explicit_http_config::ProtocolConfig, UpstreamProtocolOptions},
        HttpProtocolOptions,
    },
};

use super::{
    error::{At, Invalid, Problem},
    kind::Kind,
    proto::{ms, socket_addr, u32v, unpack},
    resources::{discovery, eds_service, Resources},
};
use crate::config::{
    CircuitBreakers, Cluster, EndpointConfig, HashPolicy, HealthCheck, LbPolicy, OutlierDetection,
    RetryBudget, DEFAULT_CONNECT_TIMEOUT_MS,
};

/// The proxy's cluster for `c`, with its endpoints from `r` (EDS) or its own load assignment,
/// and `hash` (the hash policy of the first route naming it) if it hashes.
pub fn cluster(
    c: &cds::Cluster,
    r: &Resources,
    hash: Option<&HashPolicy>,
) -> Result<Cluster, Invalid> {
    if c.transport_socket.is_some() {
        return Err(Problem::Unsupported("transport_socket (TLS to the endpoints)").into());
    }
    let endpoints = cluster_endpoints(c, r)?;
    if c.load_balancing_policy.is_some() {
        return Err(Problem::LoadBalancingPolicy.into());
    }
    let lb_policy = lb_policy(c.lb_policy)?;
    // Envoy hashes on the routes' hash_policy; without one, this proxy uses the client's
    // address.
    let hash_policy = lb_policy.hashes().then(|| {
        hash.cloned().unwrap_or(HashPolicy {
            header: None,
            source_ip: true,
        })
    });
    let (circuit_breakers, retry_budget) = thresholds(c);
    Ok(Cluster {
        name: c.name.clone(),
        lb_policy,
        hash_policy,
        http2: http2(c)?,
        endpoints,
        outlier_detection: c.outlier_detection.as_ref().map(outlier_detection),
        health_check: c.health_checks.first().map(health_check).transpose()?,
        circuit_breakers,
        retry_budget,
        connect_timeout_ms: ms(&c.connect_timeout)
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT_MS),
    })
}

/// The cluster's endpoints: its load assignment, or (EDS) the one sent for its service.
fn cluster_endpoints(c: &cds::Cluster, r: &Resources) -> Result<Vec<EndpointConfig>, Invalid> {
    match discovery(c)? {
        DiscoveryType::Static | DiscoveryType::StrictDns | DiscoveryType::LogicalDns => {
            match &c.load_assignment {
                Some(cla) => endpoints(cla, "load_assignment."),
                None => Ok(Vec::new()),
            }
        }
        DiscoveryType::Eds => match r.endpoints.get(&eds_service(c)) {
            Some(cla) => {
                endpoints(cla, "").at(format!("{} {:?}", Kind::Endpoint, cla.cluster_name))
            }
            // Not (yet) received: no endpoints, requests get 503.
            None => Ok(Vec::new()),
        },
        DiscoveryType::OriginalDst => unreachable!("ORIGINAL_DST clusters are not translated"),
    }
}

/// The endpoints of a load assignment, whose fields are named after `place`; those the
/// control plane marks unhealthy, draining or timed out are left out.
fn endpoints(
    cla: &eds::ClusterLoadAssignment,
    place: &str,
) -> Result<Vec<EndpointConfig>, Invalid> {
    let mut out = Vec::new();
    for (i, loc) in cla.endpoints.iter().enumerate() {
        for (j, lb) in loc.lb_endpoints.iter().enumerate() {
            // Envoy sends no traffic to endpoints the control plane marks so.
            if matches!(
                core::HealthStatus::try_from(lb.health_status),
                Ok(core::HealthStatus::Unhealthy
                    | core::HealthStatus::Draining
                    | core::HealthStatus::Timeout)
            ) {
                continue;
            }
            let at = format!("{place}endpoints[{i}].lb_endpoints[{j}]");
            out.push(endpoint(lb, loc.priority).at(at)?);
        }
    }
    Ok(out)
}

fn endpoint(lb: &eds::LbEndpoint, priority: u32) -> Result<EndpointConfig, Problem> {
    let address = match &lb.host_identifier {
        Some(eds::lb_endpoint::HostIdentifier::Endpoint(e)) => socket_addr(&e.address)?,
        _ => return Err(Problem::Missing("an endpoint with an address")),
    };
    let weight = u32v(&lb.load_balancing_weight).unwrap_or(1);
    if weight == 0 {
        return Err(Problem::ZeroWeight);
    }
    Ok(EndpointConfig {
        address,
        weight,
        priority,
    })
}

fn lb_policy(value: i32) -> Result<LbPolicy, Problem> {
    match L::try_from(value) {
        Ok(L::RoundRobin) => Ok(LbPolicy::RoundRobin),
        Ok(L::LeastRequest) => Ok(LbPolicy::LeastRequest),
        Ok(L::Random) => Ok(LbPolicy::Random),
        Ok(L::RingHash) => Ok(LbPolicy::RingHash),
        Ok(L::Maglev) => Ok(LbPolicy::Maglev),
        Ok(other @ (L::ClusterProvided | L::LoadBalancingPolicyConfig)) => {
            Err(Problem::LbPolicy(other.as_str_name().to_string()))
        }
        Err(_) => Err(Problem::LbPolicy(value.to_string())),
    }
}

/// Whether the cluster speaks HTTP/2 to its endpoints (explicit HTTP/2 protocol options).
fn http2(c: &cds::Cluster) -> Result<bool, Invalid> {
    const OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
    let Some(any) = c.typed_extension_protocol_options.get(OPTIONS) else {
        return Ok(false);
    };
    let o = unpack::<HttpProtocolOptions>(any)
        .and_then(|o| o.ok_or(Problem::Missing("an HttpProtocolOptions")))
        .at("typed_extension_protocol_options")?;
    Ok(match o.upstream_protocol_options {
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => matches!(
            e.protocol_config,
            Some(ProtocolConfig::Http2ProtocolOptions(_))
        ),
        _ => false,
    })
}

/// The circuit breakers and retry budget of the default-priority thresholds.
fn thresholds(c: &cds::Cluster) -> (CircuitBreakers, RetryBudget) {
    let mut circuit_breakers = CircuitBreakers::default();
    let mut retry_budget = RetryBudget::default();
    let Some(t) = c.circuit_breakers.as_ref().and_then(|cb| {
        cb.thresholds
            .iter()
            .find(|t| t.priority == core::RoutingPriority::Default as i32)
    }) else {
        return (circuit_breakers, retry_budget);
    };
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
    (circuit_breakers, retry_budget)
}

/// Outlier detection; unset fields take the file's defaults.
fn outlier_detection(o: &cds::OutlierDetection) -> OutlierDetection {
    let d = OutlierDetection::default();
    OutlierDetection {
        consecutive_5xx: u32v(&o.consecutive_5xx).unwrap_or(d.consecutive_5xx),
        base_ejection_time_ms: ms(&o.base_ejection_time).unwrap_or(d.base_ejection_time_ms),
        max_ejection_percent: u32v(&o.max_ejection_percent).unwrap_or(d.max_ejection_percent),
    }
}

/// The first health check: HTTP (a GET of its path) or TCP (a connect); unset fields take
/// the file's defaults.
fn health_check(h: &core::HealthCheck) -> Result<HealthCheck, Invalid> {
    use core::health_check::HealthChecker;
    let http_path = match &h.health_checker {
        Some(HealthChecker::HttpHealthCheck(hh)) => Some(hh.path.clone()),
        Some(HealthChecker::TcpHealthCheck(_)) => None,
        _ => {
            return Err(Problem::SupportedAre(
                "http_health_check and tcp_health_check",
            ))
            .at("health_checks[0]")
        }
    };
    let d = HealthCheck::default();
    Ok(HealthCheck {
        interval_ms: ms(&h.interval).unwrap_or(d.interval_ms),
        timeout_ms: ms(&h.timeout).unwrap_or(d.timeout_ms),
        unhealthy_threshold: u32v(&h.unhealthy_threshold).unwrap_or(d.unhealthy_threshold),
        healthy_threshold: u32v(&h.healthy_threshold).unwrap_or(d.healthy_threshold),
        http_path,
    })
}

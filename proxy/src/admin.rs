//! The admin endpoint: readiness, metrics, clusters' endpoints, and the configuration in force.

use std::{convert::Infallible, fmt::Write};

use hyper::{body::Incoming, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{
    cluster::EndpointState,
    snapshot::{Shared, Snapshot},
    stats,
    upstream::{text_response, Body},
};

/// Serve `/ready`, `/stats/prometheus`, `/clusters` and `/config_dump` until the process ends.
pub async fn serve(listener: TcpListener, shared: Shared) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let snap = shared.load();
                async move { Ok::<_, Infallible>(page(req.uri().path(), &snap)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn page(path: &str, snap: &Snapshot) -> Response<Body> {
    match path {
        "/ready" => text_response(StatusCode::OK, "LIVE"),
        "/stats" | "/stats/prometheus" => text_response(StatusCode::OK, stats::render().trim_end()),
        "/config_dump" => text_response(StatusCode::OK, snap.source.trim_end()),
        "/clusters" => text_response(StatusCode::OK, clusters(snap).trim_end()),
        _ => text_response(
            StatusCode::NOT_FOUND,
            "not found: /ready, /stats/prometheus, /clusters, /config_dump",
        ),
    }
}

/// Each endpoint of each cluster, by cluster name: health flags, requests in flight, weight
/// and priority, one line each (Envoy's `/clusters` format).
fn clusters(snap: &Snapshot) -> String {
    let mut out = String::new();
    let mut names: Vec<&String> = snap.clusters.keys().collect();
    names.sort();
    for name in names {
        for e in snap.clusters[name].endpoint_states() {
            let addr = e.addr;
            let _ = writeln!(out, "{name}::{addr}::health_flags::{}", health_flags(&e));
            let _ = writeln!(out, "{name}::{addr}::rq_active::{}", e.active);
            let _ = writeln!(out, "{name}::{addr}::weight::{}", e.weight);
            let _ = writeln!(out, "{name}::{addr}::priority::{}", e.priority);
        }
    }
    out
}

/// Envoy's health flags of an endpoint.
fn health_flags(e: &EndpointState) -> &'static str {
    match (e.ejected, e.failing_health_check) {
        (false, false) => "healthy",
        (true, false) => "/failed_outlier_check",
        (false, true) => "/failed_active_hc",
        (true, true) => "/failed_active_hc/failed_outlier_check",
    }
}

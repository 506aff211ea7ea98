//! A request's attempts at a cluster, retried under its policy and budget, with a backoff.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use futures_util::future::Either;
use hyper::{upgrade::OnUpgrade, Request, Response, StatusCode};

use super::{replay::Head, response::failure_response, trace::Trace};
use crate::{
    cluster::{ClusterState, Pick},
    config::{Direction, RetryPolicy},
    random, stats,
    upstream::{self, text_response, Body, Failure, Upstream},
};

/// One request's way to a cluster.
pub struct Attempts<'a> {
    pub cluster: &'a ClusterState,
    /// The cluster's name as routed (stats).
    pub name: &'a str,
    /// The request's head: cloned for an attempt that may be retried, moved into the last.
    pub head: Option<Head>,
    /// The client's body, for the first attempt; later ones replay `kept`.
    pub body: Option<Body>,
    /// The body's bytes, when small enough to send again.
    pub kept: Option<Bytes>,
    /// The client's side of an upgrade, for the first attempt only.
    pub on_upgrade: Option<OnUpgrade>,
    pub retry: Option<&'a RetryPolicy>,
    pub direction: Direction,
    pub http2: bool,
    pub authority: String,
    pub hash: Option<u64>,
}

impl Attempts<'_> {
    /// Send until an attempt's outcome is not retried, and answer with it. (By reference: a
    /// future holds an async fn's by-value parameters twice, and each is copied at a move.)
    pub async fn run(&mut self, trace: &mut Trace<'_>) -> Response<Body> {
        let retries = self.retries();
        let mut n = 0u32;
        loop {
            let Some(pick) = self.cluster.pick(self.hash) else {
                return text_response(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
            };
            trace.upstream = Some(pick.addr);
            // The attempt's future is made in the await's operand, the request in a block of
            // its own: a match on a temporary would keep the request's space across the await.
            let outcome = {
                let req = self.request(n >= retries);
                match req {
                    Ok(req) => Either::Left(upstream::send(
                        req,
                        self.upstream(pick.addr),
                        &self.authority,
                        self.per_try(),
                    )),
                    Err(e) => Either::Right(std::future::ready(Err(e))),
                }
            }
            .await;
            count(self.name, &pick, &outcome);
            self.cluster.record(pick.addr, failed(&outcome));
            drop(pick);
            let again = self.retry.filter(|r| {
                n < retries && retriable(&r.retry_on, &outcome) && self.cluster.retry_allowed()
            });
            let Some(policy) = again else {
                return outcome.unwrap_or_else(failure_response);
            };
            n += 1;
            stats::inc(
                "sockmesh_proxy_upstream_rq_retry_total",
                &[("cluster", self.name)],
            );
            let _retry = self.cluster.retry_started();
            tokio::time::sleep(backoff(policy.base_interval_ms, n)).await;
        }
    }

    /// The retries the policy allows, when the body was kept to send again.
    fn retries(&self) -> u32 {
        match (self.retry, &self.kept) {
            (Some(r), Some(_)) => r.num_retries,
            _ => 0,
        }
    }

    /// Each attempt's own time limit, when the policy sets one.
    fn per_try(&self) -> Option<Duration> {
        self.retry
            .map(|r| r.per_try_timeout_ms)
            .filter(|t| *t > 0)
            .map(Duration::from_millis)
    }

    /// An attempt's request: the first with the client's body (and upgrade), later ones with
    /// the kept copy; the `last` one takes the head. (Made here, not in an async fn around
    /// the send: that would hold the request's space twice.)
    fn request(&mut self, last: bool) -> Result<Request<Body>, Failure> {
        let body = self
            .body
            .take()
            .unwrap_or_else(|| upstream::from_bytes(self.kept.clone().unwrap_or_default()));
        let head = if last {
            self.head.take()
        } else {
            self.head.clone()
        };
        let Some(head) = head else {
            return Err(Failure::Reset("no request left to send".into()));
        };
        let mut req = head.into_request(body);
        if let Some(u) = self.on_upgrade.take() {
            req.extensions_mut().insert(u);
        }
        Ok(req)
    }

    /// The endpoint at `addr`, as this request goes to it.
    fn upstream(&self, addr: SocketAddr) -> Upstream {
        Upstream {
            addr,
            direction: self.direction,
            http2: self.http2,
            connect_timeout: self.cluster.config.connect_timeout(),
        }
    }
}

/// Count an attempt at the endpoint `pick` of `cluster` by its status class (no response is
/// 5xx), in the endpoint's series (looked up on its first response of the class).
fn count(cluster: &str, pick: &Pick, outcome: &Result<Response<Body>, Failure>) {
    let status = match outcome {
        Ok(r) => r.status().as_u16(),
        Err(_) => 500,
    };
    pick.requests().inc(status, |class| {
        stats::counter(
            "sockmesh_proxy_upstream_rq_total",
            &[
                ("cluster", cluster),
                ("endpoint", pick.label()),
                ("code_class", class),
            ],
        )
    });
}

/// Whether an outcome counts against the endpoint (outlier detection): a 5xx, or none.
fn failed(outcome: &Result<Response<Body>, Failure>) -> bool {
    match outcome {
        Ok(r) => r.status().is_server_error(),
        Err(_) => true,
    }
}

/// Whether an attempt's outcome is one `retry_on` retries.
fn retriable(retry_on: &str, outcome: &Result<Response<Body>, Failure>) -> bool {
    retry_on
        .split(',')
        .map(str::trim)
        .any(|c| match (c, outcome) {
            ("5xx", Ok(r)) => r.status().is_server_error(),
            ("5xx", Err(_)) => true,
            ("gateway-error", Ok(r)) => matches!(r.status().as_u16(), 502..=504),
            ("connect-failure", Err(Failure::Connect(_))) => true,
            ("reset", Err(Failure::Reset(_))) => true,
            ("retriable-4xx", Ok(r)) => r.status() == StatusCode::CONFLICT,
            _ => false,
        })
}

/// The wait before retry `n` (from 1): random, up to `base * 2^(n-1)`, capped at 10 x base.
fn backoff(base_interval_ms: u64, n: u32) -> Duration {
    let base = base_interval_ms.max(1);
    let cap = (base << (n - 1).min(16)).min(base * 10);
    Duration::from_millis(random::below(cap) + 1)
}

//! Fault injection (Envoy's HTTP fault filter, per route): a delay, and an aborting status.

use std::time::Duration;

use hyper::{Response, StatusCode};

use crate::{
    config::Fault,
    random::chance,
    upstream::{text_response, Body},
};

/// Apply a route's fault: wait its delay (for its share of requests), then answer its abort
/// (for its share) instead of forwarding; `None` lets the request go on.
pub async fn inject(fault: &Fault) -> Option<Response<Body>> {
    if let Some(d) = fault.delay.as_ref().filter(|d| chance(d.percentage)) {
        tokio::time::sleep(Duration::from_millis(d.fixed_delay_ms)).await;
    }
    let abort = fault.abort.as_ref().filter(|a| chance(a.percentage))?;
    let status = StatusCode::from_u16(abort.http_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    Some(text_response(status, "fault filter abort"))
}

//! Clusters at run time: balancer, active and passive health, circuit breakers, retry budget.
//!
//! A cluster's state outlives a change that leaves it as it was, or changes only its
//! endpoints (EDS): balancer state, health and counters carry over.

mod balancer;
mod health;
mod outlier;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::{Semaphore, SemaphorePermit};

pub use balancer::{hash_bytes, Pick};
use balancer::{Balancer, Endpoint, Policy};
use health::Probes;
use outlier::Outliers;

use crate::config::{Cluster, EndpointConfig, LbPolicy};

/// A cluster, its balancer, and its health and load accounting.
pub struct ClusterState {
    /// The cluster's settings; its endpoints are in the balancer (the list here is empty).
    pub config: Cluster,
    balancer: Balancer,
    /// Whether the health-check task runs (one per cluster state).
    probing: AtomicBool,
    /// One permit per request in flight (`max_requests`).
    slots: Semaphore,
    /// Requests waiting for a permit (`max_pending_requests`).
    pending: AtomicU64,
    outliers: Outliers,
    probes: Probes,
    /// TCP relays open to the cluster (`max_connections`).
    connections: AtomicU64,
    /// Requests in flight, and retries among them (the retry budget).
    active: AtomicU64,
    retrying: AtomicU64,
}

/// Counts one in while alive: decrements its counter when dropped.
pub struct Gauge<'a>(&'a AtomicU64);

impl<'a> Gauge<'a> {
    fn up(counter: &'a AtomicU64) -> Gauge<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        Gauge(counter)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a request got no slot of the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// `max_pending_requests` requests wait already.
    Overflow,
    /// The deadline came first.
    Timeout,
}

impl ClusterState {
    fn new(config: &Cluster) -> ClusterState {
        ClusterState {
            balancer: Balancer::new(policy(config.lb_policy), endpoints(&config.endpoints)),
            config: settings(config),
            probing: AtomicBool::default(),
            slots: Semaphore::new(
                (config.circuit_breakers.max_requests as usize).min(Semaphore::MAX_PERMITS),
            ),
            pending: AtomicU64::default(),
            outliers: Outliers::default(),
            probes: Probes::default(),
            connections: AtomicU64::default(),
            active: AtomicU64::default(),
            retrying: AtomicU64::default(),
        }
    }

    /// The state for `config`: `previous`, if `config` leaves it as it was or changes only
    /// its endpoints (given to its balancer), else a fresh one.
    pub fn carried_over(config: &Cluster, previous: Option<&Arc<ClusterState>>) -> Arc<Self> {
        match previous {
            Some(old) if old.config == settings(config) => {
                let list = endpoints(&config.endpoints);
                if old.balancer.endpoints() != list {
                    old.balancer.set_endpoints(list);
                }
                old.clone()
            }
            _ => Arc::new(ClusterState::new(config)),
        }
    }

    /// An endpoint for a request (by `hash` for the hashing policies) among the usable ones.
    pub fn pick(&self, hash: Option<u64>) -> Option<Pick> {
        self.balancer.pick(hash, &|a| self.usable(a))
    }

    /// Whether `addr` may get traffic: not ejected, not failing its active health check.
    /// A cluster without outlier detection or health checks has no such records to look up
    /// (each a lock and a hash lookup per endpoint per request).
    fn usable(&self, addr: SocketAddr) -> bool {
        let ejected = self.config.outlier_detection.is_some() && self.outliers.ejected(addr);
        let failing = self.config.health_check.is_some() && self.probes.failing(addr);
        !ejected && !failing
    }

    /// Each endpoint: its address, weight, priority, requests in flight, and whether it is
    /// ejected and failing its health check (the admin's `/clusters`).
    pub fn endpoint_states(&self) -> Vec<EndpointState> {
        self.balancer
            .endpoints()
            .into_iter()
            .map(|e| EndpointState {
                addr: e.addr,
                weight: e.weight,
                priority: e.priority,
                active: self.balancer.active(e.addr),
                ejected: self.outliers.ejected(e.addr),
                failing_health_check: self.probes.failing(e.addr),
            })
            .collect()
    }

    /// Count an attempt's outcome at `addr` (`failed`: a 5xx, or no response) for outlier
    /// detection, if the cluster has it.
    pub fn record(&self, addr: SocketAddr, failed: bool) {
        if let Some(od) = &self.config.outlier_detection {
            let endpoints = self.balancer.endpoints().len();
            self.outliers
                .record(addr, failed, od, endpoints, &self.config.name);
        }
    }

    /// Count a request in flight until the gauge drops.
    pub fn request_started(&self) -> Gauge<'_> {
        Gauge::up(&self.active)
    }

    /// Count a retry in flight until the gauge drops.
    pub fn retry_started(&self) -> Gauge<'_> {
        Gauge::up(&self.retrying)
    }

    /// Envoy's retry budget: retries in flight below `budget_percent` of active requests, or
    /// below `min_retry_concurrency`.
    pub fn retry_allowed(&self) -> bool {
        let b = &self.config.retry_budget;
        let active = self.active.load(Ordering::Relaxed);
        let retrying = self.retrying.load(Ordering::Relaxed);
        let budget = (active * b.budget_percent as u64 / 100).max(b.min_retry_concurrency as u64);
        retrying < budget
    }

    /// A slot for a request (circuit breakers): at once if one of `max_requests` is free;
    /// else the request waits for one until `deadline`, unless `max_pending_requests` already
    /// wait (Envoy's overflow).
    pub async fn request_slot(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<SemaphorePermit<'_>, NoSlot> {
        if let Ok(slot) = self.slots.try_acquire() {
            return Ok(slot);
        }
        let waiting = self.pending.fetch_add(1, Ordering::Relaxed);
        let _pending = Gauge(&self.pending);
        if waiting >= self.config.circuit_breakers.max_pending_requests {
            return Err(NoSlot::Overflow);
        }
        match tokio::time::timeout_at(deadline, self.slots.acquire()).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => Err(NoSlot::Timeout),
        }
    }

    /// Whether `max_connections` TCP relays to the cluster are open.
    pub fn connections_full(&self) -> bool {
        self.connections.load(Ordering::Relaxed) >= self.config.circuit_breakers.max_connections
    }

    /// Count a TCP relay to the cluster until the gauge drops.
    pub fn connection_opened(&self) -> Gauge<'_> {
        Gauge::up(&self.connections)
    }

    /// Probe every endpoint with the cluster's health check, for as long as this state lives
    /// (a state carried over by a change keeps its one prober).
    pub fn start_health_checks(self: &Arc<Self>) {
        let Some(hc) = self.config.health_check.clone() else {
            return;
        };
        if self.probing.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(cl) = weak.upgrade() else {
                    return;
                };
                for e in cl.balancer.endpoints() {
                    let ok = health::probe(e.addr, &hc, &cl.config.name).await;
                    cl.probes.probed(e.addr, ok, &hc, &cl.config.name);
                }
                drop(cl);
                tokio::time::sleep(Duration::from_millis(hc.interval_ms)).await;
            }
        });
    }
}

/// What the admin page shows of an endpoint.
pub struct EndpointState {
    pub addr: SocketAddr,
    pub weight: u32,
    pub priority: u32,
    pub active: u64,
    pub ejected: bool,
    pub failing_health_check: bool,
}

/// A cluster's settings without its endpoints: what must stay equal for its state to carry
/// over.
fn settings(config: &Cluster) -> Cluster {
    Cluster {
        endpoints: Vec::new(),
        ..config.clone()
    }
}

/// The balancer's policy for a configured `lb_policy`.
fn policy(lb: LbPolicy) -> Policy {
    match lb {
        LbPolicy::RoundRobin => Policy::RoundRobin,
        LbPolicy::LeastRequest => Policy::least_request(),
        LbPolicy::Random => Policy::Random,
        LbPolicy::RingHash => Policy::ring_hash(),
        LbPolicy::Maglev => Policy::maglev(),
    }
}

/// The balancer's endpoints for configured ones.
fn endpoints(list: &[EndpointConfig]) -> Vec<Endpoint> {
    list.iter()
        .map(|e| Endpoint {
            addr: e.address,
            weight: e.weight,
            priority: e.priority,
        })
        .collect()
}

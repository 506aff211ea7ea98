//! Load balancing over a cluster's endpoints.
//!
//! A [`Balancer`] holds a set of [`Endpoint`]s (address, weight, priority) and a [`Policy`]
//! (round robin, least request, random, ring hash or Maglev). [`Balancer::pick`] chooses one
//! endpoint for a request from the highest priority level that has a healthy endpoint, and
//! returns a [`Pick`] guard that counts the request as active on that endpoint until dropped.
//!
//! The endpoint set is replaced with [`Balancer::set_endpoints`]; picks read an immutable
//! copy of it, so they never block on an update and in-flight [`Pick`]s stay valid (an endpoint's
//! active count survives its removal and re-addition while requests are in flight).
//!
//! Hash-based policies are functions of the endpoint set only (not of its order or of the
//! balancer's history), so every proxy with the same endpoints maps a key to the same endpoint.
//! Hash keys come from [`hash_bytes`], which is stable across runs, platforms and versions.

// The API is complete for callers (stats, endpoint updates, tests) though the proxy uses only
// part of it so far; the tests exercise all of it, so dead code still shows there.
#![cfg_attr(not(test), allow(dead_code))]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::random::{mix64, Rng};
use crate::stats;

/// Default number of candidates of [`Policy::LeastRequest`].
pub const DEFAULT_CHOICES: u32 = 2;
/// Default minimum ring size of [`Policy::RingHash`].
pub const DEFAULT_MIN_RING_SIZE: usize = 1024;
/// Default (prime) lookup table size of [`Policy::Maglev`].
pub const DEFAULT_TABLE_SIZE: usize = 65537;

/// Upper bound on the points of one ring (16 bytes each).
const MAX_RING_SIZE: u64 = 1 << 21;
/// Upper bound on a Maglev table size (4 bytes an entry).
const MAX_TABLE_SIZE: usize = 1 << 24;
/// Marks an empty Maglev table slot while filling.
const EMPTY: u32 = u32::MAX;

/// One upstream endpoint of a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Relative share of the traffic; 0 is treated as 1.
    pub weight: u32,
    /// Priority level, 0 being the highest; lower levels take traffic only when no endpoint of
    /// a higher level is healthy.
    pub priority: u32,
}

impl Endpoint {
    /// An endpoint of weight 1 at priority 0.
    pub fn new(addr: SocketAddr) -> Endpoint {
        Endpoint {
            addr,
            weight: 1,
            priority: 0,
        }
    }

    /// The same endpoint with another weight.
    pub fn with_weight(self, weight: u32) -> Endpoint {
        Endpoint { weight, ..self }
    }

    /// The same endpoint at another priority.
    pub fn with_priority(self, priority: u32) -> Endpoint {
        Endpoint { priority, ..self }
    }
}

/// How a [`Balancer`] chooses among the healthy endpoints of a priority level.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// Smooth weighted round robin (nginx's algorithm): over any window, each endpoint is chosen
    /// in proportion to its weight, interleaved rather than in bursts.
    #[default]
    RoundRobin,
    /// Draw `choices` distinct candidates at random in proportion to weight and take the one
    /// with the fewest active requests (ties go to the first drawn). 0 is treated as 1.
    LeastRequest {
        /// How many candidates to compare (default [`DEFAULT_CHOICES`]).
        choices: u32,
    },
    /// Weighted random choice.
    Random,
    /// Consistent hashing on a ring (Karger et al.), with points in proportion to weight.
    RingHash {
        /// The ring has between this many and twice this many points (unless the total weight
        /// exceeds it, then one point per unit of weight). Default [`DEFAULT_MIN_RING_SIZE`].
        min_ring_size: usize,
    },
    /// Maglev consistent hashing (Eisenbud et al., NSDI '16), weighted.
    Maglev {
        /// Lookup table size; rounded up to a prime (and to at most 2^24 + a little).
        /// Default [`DEFAULT_TABLE_SIZE`].
        table_size: usize,
    },
}

impl Policy {
    /// [`Policy::LeastRequest`] with the default number of choices.
    pub fn least_request() -> Policy {
        Policy::LeastRequest {
            choices: DEFAULT_CHOICES,
        }
    }

    /// [`Policy::RingHash`] with the default minimum ring size.
    pub fn ring_hash() -> Policy {
        Policy::RingHash {
            min_ring_size: DEFAULT_MIN_RING_SIZE,
        }
    }

    /// [`Policy::Maglev`] with the default table size.
    pub fn maglev() -> Policy {
        Policy::Maglev {
            table_size: DEFAULT_TABLE_SIZE,
        }
    }
}

/// The deterministic 64-bit hash used for hash keys and for placing endpoints: FNV-1a over the
/// bytes, then the splitmix64 finalizer for avalanche. Identical across runs and platforms.
pub fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.write(b);
    h.finish()
}

/// A chosen endpoint. While it is alive the endpoint's active-request count is one higher;
/// dropping it (when the request completes) gives the request back.
#[derive(Debug)]
pub struct Pick {
    /// The endpoint to send the request to.
    pub addr: SocketAddr,
    counts: Arc<Counts>,
}

impl Pick {
    /// `addr` written out once for the endpoint (its stats label).
    pub fn label(&self) -> &str {
        &self.counts.label
    }

    /// The endpoint's request counters, by status class.
    pub fn requests(&self) -> &stats::ByClass {
        &self.counts.requests
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.counts.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An endpoint's label and counters, in one allocation: a pick takes one reference to them
/// and gives it back (two atomic operations on one cache line per request, where a reference
/// each took six on three; `cargo xtask profile`). Kept across endpoint updates while the
/// endpoint stays or a pick of it lives.
#[derive(Debug)]
struct Counts {
    label: Box<str>,
    requests: stats::ByClass,
    /// Picks alive.
    active: AtomicU64,
}

impl Counts {
    fn of(addr: SocketAddr) -> Counts {
        Counts {
            label: addr.to_string().into(),
            requests: stats::ByClass::new(),
            active: AtomicU64::new(0),
        }
    }
}

/// Chooses endpoints for requests; see the module documentation. Shareable across threads.
pub struct Balancer {
    policy: Policy,
    current: RwLock<Arc<EndpointSet>>,
    /// Serializes [`Balancer::set_endpoints`] so concurrent updates do not lose counters.
    update: Mutex<()>,
    rng: Rng,
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balancer")
            .field("policy", &self.policy)
            .field("endpoints", &self.current().endpoints)
            .finish()
    }
}

impl Balancer {
    /// A balancer with the given policy over the given endpoints. Endpoints repeating an
    /// earlier address are ignored; weight 0 counts as 1.
    pub fn new(policy: Policy, endpoints: Vec<Endpoint>) -> Balancer {
        let set = EndpointSet::build(&policy, endpoints, None);
        Balancer {
            policy,
            current: RwLock::new(Arc::new(set)),
            update: Mutex::new(()),
            rng: Rng::new(),
        }
    }

    /// The policy this balancer was made with.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replace the endpoint set (normalized as in [`Balancer::new`]). In-flight [`Pick`]s stay
    /// valid, and endpoints that remain keep their active counts (and round-robin position).
    pub fn set_endpoints(&self, endpoints: Vec<Endpoint>) {
        let _serial = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let old = self.current();
        let new = Arc::new(EndpointSet::build(&self.policy, endpoints, Some(&old)));
        let replaced = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(PoisonError::into_inner),
            new,
        );
        drop(replaced);
    }

    /// Choose an endpoint for a request. `hash` is the request's key for
    /// [`Policy::RingHash`] and [`Policy::Maglev`] (without one they choose at random, by
    /// weight); other policies ignore it. `healthy(addr)` says whether an endpoint may be used.
    /// The highest priority level with a healthy endpoint is used; `None` when there is none.
    /// With a hashing policy an unhealthy endpoint's keys walk on to the next healthy endpoint
    /// on the ring or table, so the keys of healthy endpoints do not move.
    pub fn pick(&self, hash: Option<u64>, healthy: &dyn Fn(SocketAddr) -> bool) -> Option<Pick> {
        let set = self.current();
        for level in &set.levels {
            if let Some(i) = self.pick_in(level, hash, healthy) {
                let member = &level.members[i];
                member.counts.active.fetch_add(1, Ordering::Relaxed);
                return Some(Pick {
                    addr: member.addr,
                    counts: Arc::clone(&member.counts),
                });
            }
        }
        None
    }

    /// The current endpoints, normalized, in the order given.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.current().endpoints.clone()
    }

    /// The number of live [`Pick`]s of `addr` (also for a removed endpoint still draining).
    pub fn active(&self, addr: SocketAddr) -> u64 {
        self.current()
            .counters
            .get(&addr)
            .map_or(0, |c| c.active.load(Ordering::Relaxed))
    }

    fn current(&self) -> Arc<EndpointSet> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// The index of the chosen member of `level`, `None` if none is healthy.
    fn pick_in(
        &self,
        level: &Level,
        hash: Option<u64>,
        healthy: &dyn Fn(SocketAddr) -> bool,
    ) -> Option<usize> {
        let members = &level.members;
        match (&level.index, hash) {
            (Index::RoundRobin(state), _) => round_robin(members, state, healthy),
            (Index::LeastRequest(choices), _) => self.least_request(members, *choices, healthy),
            (Index::Ring(ring), Some(key)) => {
                let point = mix64(key);
                let start = ring.partition_point(|p| p.0 < point);
                walk(members, ring.len(), start, |p| ring[p].1, healthy)
            }
            (Index::Table(table), Some(key)) => {
                let start = (mix64(key) % table.len().max(1) as u64) as usize;
                walk(members, table.len(), start, |p| table[p], healthy)
                    // Members too light to own a slot are used only when all others are down.
                    .or_else(|| members.iter().position(|m| healthy(m.addr)))
            }
            (Index::Random | Index::Ring(_) | Index::Table(_), _) => {
                let candidates: Vec<(usize, u32)> = members
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| healthy(m.addr))
                    .map(|(i, m)| (i, m.weight))
                    .collect();
                self.weighted_random(&candidates)
            }
        }
    }

    /// One of `candidates` (index, weight) at random in proportion to weight.
    fn weighted_random(&self, candidates: &[(usize, u32)]) -> Option<usize> {
        let total: u64 = candidates.iter().map(|&(_, w)| u64::from(w)).sum();
        if total == 0 {
            return None;
        }
        let mut r = self.rng.below(total);
        for &(i, w) in candidates {
            if r < u64::from(w) {
                return Some(i);
            }
            r -= u64::from(w);
        }
        candidates.last().map(|&(i, _)| i)
    }

    /// Weighted sampling of `choices` distinct healthy members (Efraimidis–Spirakis keys:
    /// the largest `ln(u) / weight` come first), then the least loaded, ties to the first drawn.
    fn least_request(
        &self,
        members: &[Member],
        choices: u32,
        healthy: &dyn Fn(SocketAddr) -> bool,
    ) -> Option<usize> {
        let mut keyed: Vec<(f64, usize)> = members
            .iter()
            .enumerate()
            .filter(|(_, m)| healthy(m.addr))
            .map(|(i, m)| (self.rng.unit().ln() / f64::from(m.weight), i))
            .collect();
        if keyed.is_empty() {
            return None;
        }
        let k = (choices.max(1) as usize).min(keyed.len());
        if k < keyed.len() {
            keyed.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            keyed.truncate(k);
        }
        keyed
            .iter()
            .map(|&(key, i)| (members[i].counts.active.load(Ordering::Relaxed), key, i))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))
            .map(|(_, _, i)| i)
    }
}

/// An immutable view of the endpoint set, prepared for the policy.
struct EndpointSet {
    /// The normalized endpoints, in the order given.
    endpoints: Vec<Endpoint>,
    /// Priority levels, highest priority (lowest number) first; none is empty.
    levels: Vec<Level>,
    /// Counts of the current endpoints and of removed ones still in use.
    counters: HashMap<SocketAddr, Arc<Counts>>,
}

/// The endpoints of one priority level.
struct Level {
    members: Vec<Member>,
    index: Index,
}

/// One endpoint as seen by the policies.
struct Member {
    addr: SocketAddr,
    weight: u32,
    counts: Arc<Counts>,
}

/// Per-level state of the policy.
enum Index {
    /// Current weights of smooth weighted round robin, by member.
    RoundRobin(Mutex<Vec<i64>>),
    /// Number of candidates to compare.
    LeastRequest(u32),
    Random,
    /// (point hash, member) sorted by hash.
    Ring(Vec<(u64, u32)>),
    /// Maglev lookup table of members.
    Table(Vec<u32>),
}

impl EndpointSet {
    /// Prepare `endpoints` for `policy`, carrying over counters and round-robin state of `old`.
    fn build(policy: &Policy, endpoints: Vec<Endpoint>, old: Option<&EndpointSet>) -> EndpointSet {
        let mut seen = HashSet::new();
        let endpoints: Vec<Endpoint> = endpoints
            .into_iter()
            .filter(|e| seen.insert(e.addr))
            .map(|e| Endpoint {
                weight: e.weight.max(1),
                ..e
            })
            .collect();

        let mut counters = HashMap::new();
        let mut rr_state = HashMap::new();
        if let Some(old) = old {
            let old_members: HashSet<SocketAddr> = old
                .levels
                .iter()
                .flat_map(|l| l.members.iter().map(|m| m.addr))
                .collect();
            for (addr, counter) in &old.counters {
                // References held by `old` itself: its map, and its member if it had one.
                // More means a live Pick or an older endpoint set still in use by a pick.
                let own = 1 + usize::from(old_members.contains(addr));
                if seen.contains(addr)
                    || counter.active.load(Ordering::Relaxed) > 0
                    || Arc::strong_count(counter) > own
                {
                    counters.insert(*addr, Arc::clone(counter));
                }
            }
            for level in &old.levels {
                if let Index::RoundRobin(state) = &level.index {
                    let state = state.lock().unwrap_or_else(PoisonError::into_inner);
                    for (m, current) in level.members.iter().zip(state.iter()) {
                        rr_state.insert(m.addr, *current);
                    }
                }
            }
        }

        let mut by_priority: BTreeMap<u32, Vec<Member>> = BTreeMap::new();
        for e in &endpoints {
            let counts = counters
                .entry(e.addr)
                .or_insert_with(|| Arc::new(Counts::of(e.addr)));
            by_priority.entry(e.priority).or_default().push(Member {
                addr: e.addr,
                weight: e.weight,
                counts: Arc::clone(counts),
            });
        }
        let levels = by_priority
            .into_values()
            .map(|members| {
                let index = match policy {
                    Policy::RoundRobin => Index::RoundRobin(Mutex::new(
                        members
                            .iter()
                            .map(|m| rr_state.get(&m.addr).copied().unwrap_or(0))
                            .collect(),
                    )),
                    Policy::LeastRequest { choices } => Index::LeastRequest(*choices),
                    Policy::Random => Index::Random,
                    Policy::RingHash { min_ring_size } => {
                        Index::Ring(build_ring(&members, *min_ring_size))
                    }
                    Policy::Maglev { table_size } => {
                        Index::Table(build_table(&members, *table_size))
                    }
                };
                Level { members, index }
            })
            .collect();
        EndpointSet {
            endpoints,
            levels,
            counters,
        }
    }
}

/// Smooth weighted round robin over the healthy members: each gains its weight, the one with
/// the most is chosen and pays back the total.
fn round_robin(
    members: &[Member],
    state: &Mutex<Vec<i64>>,
    healthy: &dyn Fn(SocketAddr) -> bool,
) -> Option<usize> {
    // Ask before locking, so a callback that re-enters the balancer cannot deadlock. A bit
    // per member for up to 64 of them: no allocation on a request's way (`cargo xtask
    // profile`).
    if members.len() <= 64 {
        let up = members
            .iter()
            .enumerate()
            .fold(0u64, |up, (i, m)| up | u64::from(healthy(m.addr)) << i);
        rotate(members, state, |i| up >> i & 1 == 1)
    } else {
        let up: Vec<bool> = members.iter().map(|m| healthy(m.addr)).collect();
        rotate(members, state, |i| up[i])
    }
}

/// One turn of the smooth weighted round robin among the members that are `up`.
fn rotate(
    members: &[Member],
    state: &Mutex<Vec<i64>>,
    up: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut current = state.lock().unwrap_or_else(PoisonError::into_inner);
    let mut total = 0i64;
    let mut best: Option<usize> = None;
    for (i, m) in members.iter().enumerate() {
        if !up(i) {
            continue;
        }
        current[i] += i64::from(m.weight);
        total += i64::from(m.weight);
        if best.is_none_or(|b| current[i] > current[b]) {
            best = Some(i);
        }
    }
    let best = best?;
    current[best] -= total;
    Some(best)
}

/// From position `start` of a ring or table of `len` slots (`at` gives a slot's member), the
/// first slot whose member is healthy. Health is asked at most once per member.
fn walk(
    members: &[Member],
    len: usize,
    start: usize,
    at: impl Fn(usize) -> u32,
    healthy: &dyn Fn(SocketAddr) -> bool,
) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let mut known: Vec<Option<bool>> = vec![None; members.len()];
    let mut down = 0;
    for step in 0..len {
        let i = at((start + step) % len) as usize;
        match known[i] {
            Some(true) => return Some(i),
            Some(false) => {}
            None => {
                if healthy(members[i].addr) {
                    return Some(i);
                }
                known[i] = Some(false);
                down += 1;
                if down == members.len() {
                    return None;
                }
            }
        }
    }
    None
}

/// The ring: each member gets `weight * p` points, `p` being the largest power of two keeping
/// the ring within twice `min_ring_size` (at least 1). Points depend only on the member's
/// address, and `p` changes only when the total weight crosses a power of two, so adding or
/// removing an endpoint usually moves only its own keys. Past [`MAX_RING_SIZE`] units of
/// weight, points are scaled down instead.
fn build_ring(members: &[Member], min_ring_size: usize) -> Vec<(u64, u32)> {
    let total: u64 = members.iter().map(|m| u64::from(m.weight)).sum();
    let min = (min_ring_size as u64).clamp(1, MAX_RING_SIZE / 2);
    let mut per_weight = 1u64;
    while total * per_weight * 2 <= 2 * min {
        per_weight *= 2;
    }
    let mut ring = Vec::new();
    for (index, m) in members.iter().enumerate() {
        let points = if total <= MAX_RING_SIZE {
            u64::from(m.weight) * per_weight
        } else {
            (u128::from(m.weight) * u128::from(MAX_RING_SIZE) / u128::from(total)).max(1) as u64
        };
        let key = addr_bytes(m.addr);
        for point in 0..points {
            let mut h = Fnv::new();
            h.write(&key);
            h.write(&point.to_le_bytes());
            ring.push((h.finish(), index as u32));
        }
    }
    ring.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| members[a.1 as usize].addr.cmp(&members[b.1 as usize].addr))
    });
    ring
}

/// The Maglev table: members (in address order) take turns claiming their next preferred free
/// slot, a member claiming `weight / max weight` slots a turn on average, until all are taken.
fn build_table(members: &[Member], table_size: usize) -> Vec<u32> {
    if members.is_empty() {
        return Vec::new();
    }
    let size = next_prime(table_size.clamp(2, MAX_TABLE_SIZE)) as u64;
    let max_weight = members
        .iter()
        .map(|m| u64::from(m.weight))
        .max()
        .unwrap_or(1);

    struct Turn {
        index: u32,
        weight: u64,
        offset: u64,
        skip: u64,
        next: u64,
        credit: u64,
    }
    let mut turns: Vec<Turn> = members
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let key = addr_bytes(m.addr);
            let seeded = |seed: u8| {
                let mut h = Fnv::new();
                h.write(&key);
                h.write(&[seed]);
                h.finish()
            };
            Turn {
                index: i as u32,
                weight: u64::from(m.weight),
                offset: seeded(0) % size,
                skip: seeded(1) % (size - 1) + 1,
                next: 0,
                credit: 0,
            }
        })
        .collect();
    turns.sort_by_key(|t| members[t.index as usize].addr);

    let mut table = vec![EMPTY; size as usize];
    let mut filled = 0u64;
    loop {
        for t in &mut turns {
            t.credit += t.weight;
            while t.credit >= max_weight {
                t.credit -= max_weight;
                loop {
                    let slot = ((t.offset + t.next * t.skip) % size) as usize;
                    t.next += 1;
                    if table[slot] == EMPTY {
                        table[slot] = t.index;
                        break;
                    }
                }
                filled += 1;
                if filled == size {
                    return table;
                }
            }
        }
    }
}

/// The smallest prime at least `n` (n >= 2).
fn next_prime(n: usize) -> usize {
    let is_prime = |n: usize| {
        n >= 2
            && (2..)
                .take_while(|d| d * d <= n)
                .all(|d| !n.is_multiple_of(d))
    };
    (n..).find(|&n| is_prime(n)).unwrap_or(n)
}

/// A canonical byte form of an address for hashing: family, IP (v4 padded), port.
fn addr_bytes(addr: SocketAddr) -> [u8; 19] {
    let mut b = [0u8; 19];
    match addr {
        SocketAddr::V4(a) => {
            b[0] = 4;
            b[1..5].copy_from_slice(&a.ip().octets());
        }
        SocketAddr::V6(a) => {
            b[0] = 6;
            b[1..17].copy_from_slice(&a.ip().octets());
        }
    }
    b[17..].copy_from_slice(&addr.port().to_be_bytes());
    b
}

/// Incremental FNV-1a 64, finished with [`mix64`].
struct Fnv(u64);

impl Fnv {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;

    fn new() -> Fnv {
        Fnv(Fnv::OFFSET)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(Fnv::PRIME);
        }
    }

    fn finish(&self) -> u64 {
        mix64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, (n % 250) as u8 + 1], 8000 + n))
    }

    fn eps(n: u16) -> Vec<Endpoint> {
        (0..n).map(|i| Endpoint::new(addr(i))).collect()
    }

    /// Endpoints `addr(0)`, `addr(1)`, ... of these weights.
    fn weighted(weights: &[u32]) -> Vec<Endpoint> {
        (0u16..)
            .zip(weights)
            .map(|(i, w)| Endpoint::new(addr(i)).with_weight(*w))
            .collect()
    }

    fn all(_: SocketAddr) -> bool {
        true
    }

    fn key(i: usize) -> u64 {
        hash_bytes(format!("session-{i}").as_bytes())
    }

    const POLICIES: [Policy; 5] = [
        Policy::RoundRobin,
        Policy::LeastRequest { choices: 2 },
        Policy::Random,
        Policy::RingHash {
            min_ring_size: 1024,
        },
        Policy::Maglev { table_size: 65537 },
    ];

    /// How many of `n` picks (dropped at once) went to each address.
    fn counts(
        b: &Balancer,
        n: usize,
        healthy: &dyn Fn(SocketAddr) -> bool,
    ) -> HashMap<SocketAddr, usize> {
        let mut c = HashMap::new();
        for _ in 0..n {
            *c.entry(b.pick(None, healthy).unwrap().addr).or_default() += 1;
        }
        c
    }

    /// The endpoint of each of `n` keys.
    fn placement(b: &Balancer, n: usize, healthy: &dyn Fn(SocketAddr) -> bool) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| b.pick(Some(key(i)), healthy).unwrap().addr)
            .collect()
    }

    fn within(count: usize, expected: f64, tolerance: f64) -> bool {
        (count as f64 - expected).abs() <= expected * tolerance
    }

    #[test]
    fn balancer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Balancer>();
        check::<Pick>();
    }

    #[test]
    fn hash_bytes_is_fnv1a_then_mixed_and_stable() {
        // FNV-1a 64 reference vectors.
        let fnv = |b: &[u8]| {
            let mut h = Fnv::new();
            h.write(b);
            h.0
        };
        assert_eq!(fnv(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(hash_bytes(b"foobar"), mix64(0x8594_4171_f739_67e8));
        // splitmix64's finalizer maps 0 to 0 and is not the identity elsewhere.
        assert_eq!(mix64(0), 0);
        assert_ne!(hash_bytes(b"a"), hash_bytes(b"b"));
    }

    #[test]
    fn round_robin_even_distribution_in_rotation() {
        let b = Balancer::new(Policy::RoundRobin, eps(3));
        let seq: Vec<SocketAddr> = (0..300).map(|_| b.pick(None, &all).unwrap().addr).collect();
        for chunk in seq.chunks(3) {
            let mut c = chunk.to_vec();
            c.sort();
            c.dedup();
            assert_eq!(
                c.len(),
                3,
                "every round visits each endpoint once: {chunk:?}"
            );
        }
        let c = counts(&b, 300, &all);
        assert!(c.values().all(|&n| n == 100), "{c:?}");
    }

    #[test]
    fn round_robin_weighted_exact_and_smooth() {
        let b = Balancer::new(Policy::RoundRobin, weighted(&[3, 1]));
        let seq: Vec<SocketAddr> = (0..400).map(|_| b.pick(None, &all).unwrap().addr).collect();
        let heavy = seq.iter().filter(|&&a| a == addr(0)).count();
        assert_eq!((heavy, 400 - heavy), (300, 100));
        let mut run = 0;
        let mut longest = 0;
        for a in &seq {
            run = if *a == addr(0) { run + 1 } else { 0 };
            longest = longest.max(run);
        }
        assert!(longest <= 3, "run of {longest}");
        // Smooth: every window of 4 has the 3:1 split.
        for w in seq.windows(4) {
            assert_eq!(w.iter().filter(|&&a| a == addr(1)).count(), 1, "{w:?}");
        }
    }

    #[test]
    fn round_robin_skips_unhealthy_and_keeps_position_across_updates() {
        let b = Balancer::new(Policy::RoundRobin, eps(3));
        let c = counts(&b, 200, &|a| a != addr(1));
        assert_eq!(c.get(&addr(1)), None);
        assert_eq!((c[&addr(0)], c[&addr(2)]), (100, 100));

        let first = b.pick(None, &all).unwrap().addr;
        b.set_endpoints(eps(3));
        let second = b.pick(None, &all).unwrap().addr;
        assert_ne!(first, second, "an update does not restart the rotation");
    }

    #[test]
    fn round_robin_skips_unhealthy_among_more_than_64() {
        // Past 64 members, health is kept in a list rather than a bit mask.
        for n in [64u16, 65, 200] {
            let b = Balancer::new(Policy::RoundRobin, eps(n));
            let down = |a: SocketAddr| a.port().is_multiple_of(3);
            let c = counts(&b, usize::from(n) * 4, &|a| !down(a));
            assert!(c.keys().all(|&a| !down(a)), "{n}: {c:?}");
            let up = (0..n).filter(|&i| !down(addr(i))).count();
            assert_eq!(c.len(), up, "{n}: every healthy member gets its turn");
        }
    }

    #[test]
    fn least_request_avoids_the_loaded_endpoint() {
        let b = Balancer::new(Policy::least_request(), eps(3));
        let held: Vec<Pick> = (0..20)
            .map(|_| b.pick(None, &|a| a == addr(0)).unwrap())
            .collect();
        assert_eq!(b.active(addr(0)), 20);
        let c = counts(&b, 1000, &all);
        assert_eq!(c.get(&addr(0)), None, "{c:?}");
        assert!(c[&addr(1)] > 350 && c[&addr(2)] > 350, "{c:?}");
        drop(held);
        assert_eq!(b.active(addr(0)), 0);
        let c = counts(&b, 1000, &all);
        assert!(c[&addr(0)] > 250, "{c:?}");
    }

    #[test]
    fn least_request_spreads_held_requests() {
        let b = Balancer::new(Policy::least_request(), eps(2));
        let held: Vec<Pick> = (0..100).map(|_| b.pick(None, &all).unwrap()).collect();
        // With both endpoints always compared, the loads never differ by more than one.
        let (x, y) = (b.active(addr(0)), b.active(addr(1)));
        assert_eq!(x + y, 100);
        assert!(x.abs_diff(y) <= 1, "{x} vs {y}");
        drop(held);
        assert_eq!((b.active(addr(0)), b.active(addr(1))), (0, 0));
    }

    #[test]
    fn guards_decrement_on_drop_and_survive_updates() {
        let b = Balancer::new(Policy::least_request(), eps(2));
        let p = b.pick(None, &|a| a == addr(0)).unwrap();
        let q = b.pick(None, &|a| a == addr(0)).unwrap();
        assert_eq!(b.active(addr(0)), 2);
        drop(q);
        assert_eq!(b.active(addr(0)), 1);

        // Removed while in flight: still counted, and counted again if re-added.
        b.set_endpoints(vec![Endpoint::new(addr(1))]);
        assert_eq!(b.active(addr(0)), 1);
        b.set_endpoints(eps(2));
        assert_eq!(b.active(addr(0)), 1);
        drop(p);
        assert_eq!(b.active(addr(0)), 0);

        // A drained, removed endpoint is forgotten.
        b.set_endpoints(vec![Endpoint::new(addr(1))]);
        b.set_endpoints(vec![Endpoint::new(addr(1))]);
        assert!(!b.current().counters.contains_key(&addr(0)));
        assert_eq!(b.active(addr(0)), 0);
    }

    #[test]
    fn least_request_weighted_without_load() {
        let b = Balancer::new(Policy::least_request(), weighted(&[3, 1]));
        let c = counts(&b, 10_000, &all);
        assert!(within(c[&addr(0)], 7500.0, 0.04), "{c:?}");
        // One choice: plain weighted random.
        let b = Balancer::new(Policy::LeastRequest { choices: 0 }, weighted(&[3, 1]));
        let c = counts(&b, 10_000, &all);
        assert!(within(c[&addr(0)], 7500.0, 0.04), "{c:?}");
    }

    #[test]
    fn random_distribution_and_weights() {
        let b = Balancer::new(Policy::Random, eps(4));
        let c = counts(&b, 10_000, &all);
        assert_eq!(c.len(), 4);
        for n in c.values() {
            assert!(within(*n, 2500.0, 0.15), "{c:?}");
        }
        let b = Balancer::new(Policy::Random, weighted(&[1, 3]));
        let c = counts(&b, 10_000, &all);
        assert!(within(c[&addr(1)], 7500.0, 0.04), "{c:?}");
        let c = counts(&b, 1000, &|a| a == addr(0));
        assert_eq!(c[&addr(0)], 1000);
    }

    /// The shared checks of the two hashing policies; returns the fraction of keys not on the
    /// removed endpoint that moved when it was removed.
    fn hashing_checks(policy: Policy) -> f64 {
        const KEYS: usize = 10_000;
        let b = Balancer::new(policy.clone(), eps(4));

        // Stable: the same key, the same endpoint.
        for i in 0..100 {
            let first = b.pick(Some(key(i)), &all).unwrap().addr;
            for _ in 0..5 {
                assert_eq!(b.pick(Some(key(i)), &all).unwrap().addr, first);
            }
        }
        // The order of the endpoints does not matter.
        let mut reversed = eps(4);
        reversed.reverse();
        let before = placement(&b, KEYS, &all);
        assert_eq!(
            placement(&Balancer::new(policy.clone(), reversed), KEYS, &all),
            before
        );

        // Even within 20%.
        let mut c: HashMap<SocketAddr, usize> = HashMap::new();
        for a in &before {
            *c.entry(*a).or_default() += 1;
        }
        assert_eq!(c.len(), 4);
        for n in c.values() {
            assert!(within(*n, KEYS as f64 / 4.0, 0.2), "{policy:?}: {c:?}");
        }

        // Unhealthy: its keys go elsewhere, the others stay.
        let sick = addr(2);
        let during = placement(&b, KEYS, &|a| a != sick);
        for (was, is) in before.iter().zip(&during) {
            if *was == sick {
                assert_ne!(*is, sick);
            } else {
                assert_eq!(is, was, "{policy:?}: a healthy endpoint's key moved");
            }
        }
        // Its keys spread over the others rather than piling onto one.
        let mut heirs: HashSet<SocketAddr> = HashSet::new();
        heirs.extend(
            before
                .iter()
                .zip(&during)
                .filter(|(w, _)| **w == sick)
                .map(|(_, i)| *i),
        );
        assert!(heirs.len() >= 2, "{policy:?}: {heirs:?}");
        assert!(b.pick(Some(key(0)), &|_| false).is_none());
        // Without a key: random among the healthy.
        let c = counts(&b, 4000, &|a| a != sick);
        assert_eq!(c.len(), 3, "{c:?}");

        // Removed: only its keys move (up to what the caller allows for the others).
        b.set_endpoints(eps(4).into_iter().filter(|e| e.addr != sick).collect());
        let after = placement(&b, KEYS, &all);
        let mut others = 0;
        let mut moved = 0;
        for (was, is) in before.iter().zip(&after) {
            assert_ne!(*is, sick);
            if *was != sick {
                others += 1;
                moved += usize::from(is != was);
            }
        }

        // Weights 2:1.
        let b = Balancer::new(policy.clone(), weighted(&[2, 1]));
        let heavy = placement(&b, KEYS, &all)
            .iter()
            .filter(|&&a| a == addr(0))
            .count();
        assert!(
            (0.60..=0.73).contains(&(heavy as f64 / KEYS as f64)),
            "{policy:?}: {heavy}"
        );

        moved as f64 / others as f64
    }

    #[test]
    fn ring_hash_consistent() {
        let moved = hashing_checks(Policy::ring_hash());
        assert_eq!(moved, 0.0, "ring hash moved keys of remaining endpoints");
    }

    #[test]
    fn maglev_consistent() {
        let moved = hashing_checks(Policy::maglev());
        assert!(moved < 0.10, "maglev moved {moved} of the other keys");
    }

    #[test]
    fn ring_hash_sizes() {
        let ring = |n: u16, w: u32, min: usize| {
            let members: Vec<Member> = (0..n)
                .map(|i| Member {
                    addr: addr(i),
                    weight: w,
                    counts: Arc::new(Counts::of(addr(i))),
                })
                .collect();
            build_ring(&members, min).len()
        };
        assert_eq!(ring(4, 1, 1024), 2048);
        assert_eq!(ring(3, 1, 1024), 1536);
        assert_eq!(ring(5, 1, 1024), 1280);
        assert_eq!(ring(1, 1, 1024), 2048);
        assert_eq!(ring(3, 1000, 1024), 3000);
        // Huge weights are scaled down to the cap.
        assert!(ring(4, u32::MAX, 1024) as u64 <= MAX_RING_SIZE);
        assert_eq!(ring(1, 1, 0), 2);
    }

    #[test]
    fn maglev_table_sizes_and_weights() {
        assert_eq!(next_prime(65537), 65537);
        assert_eq!(next_prime(100), 101);
        assert_eq!(next_prime(2), 2);
        let members: Vec<Member> = (0..3)
            .map(|i| Member {
                addr: addr(i),
                weight: [1, 2, 3][i as usize],
                counts: Arc::new(Counts::of(addr(i))),
            })
            .collect();
        let table = build_table(&members, 1000);
        assert_eq!(table.len(), 1009);
        let owned = |m: u32| table.iter().filter(|&&t| t == m).count();
        assert_eq!(owned(0) + owned(1) + owned(2), 1009);
        assert!(within(owned(0), 1009.0 / 6.0, 0.05), "{}", owned(0));
        assert!(within(owned(2), 1009.0 / 2.0, 0.05), "{}", owned(2));

        // A table smaller than the endpoint set still serves every key.
        let b = Balancer::new(Policy::Maglev { table_size: 3 }, eps(10));
        assert!(placement(&b, 100, &all).len() == 100);
    }

    #[test]
    fn priorities_fail_over_in_order() {
        for policy in POLICIES {
            let mut endpoints = eps(2);
            endpoints.push(Endpoint::new(addr(2)).with_priority(1));
            endpoints.push(Endpoint::new(addr(3)).with_priority(7));
            let b = Balancer::new(policy.clone(), endpoints);
            let down: Cell<Vec<SocketAddr>> = Cell::new(vec![]);
            let healthy = |a: SocketAddr| {
                let d = down.take();
                let up = !d.contains(&a);
                down.set(d);
                up
            };
            let run = |b: &Balancer| {
                let mut seen: Vec<SocketAddr> = (0..200)
                    .map(|i| b.pick(Some(key(i)), &healthy).map(|p| p.addr))
                    .collect::<Option<_>>()
                    .unwrap_or_default();
                seen.sort();
                seen.dedup();
                seen
            };
            assert_eq!(run(&b), vec![addr(0), addr(1)], "{policy:?}");
            down.set(vec![addr(0)]);
            assert_eq!(run(&b), vec![addr(1)], "{policy:?}");
            down.set(vec![addr(0), addr(1)]);
            assert_eq!(run(&b), vec![addr(2)], "{policy:?}");
            down.set(vec![addr(0), addr(1), addr(2)]);
            assert_eq!(run(&b), vec![addr(3)], "{policy:?}");
            down.set(vec![addr(1), addr(2)]);
            assert_eq!(run(&b), vec![addr(0)], "{policy:?}");
            down.set(vec![addr(0), addr(1), addr(2), addr(3)]);
            assert!(b.pick(Some(1), &healthy).is_none(), "{policy:?}");
            assert!(b.pick(None, &healthy).is_none(), "{policy:?}");
        }
    }

    #[test]
    fn empty_or_all_unhealthy_gives_none() {
        for policy in POLICIES {
            let b = Balancer::new(policy.clone(), vec![]);
            assert!(b.pick(None, &all).is_none(), "{policy:?}");
            assert!(b.pick(Some(42), &all).is_none(), "{policy:?}");
            b.set_endpoints(eps(3));
            assert!(b.pick(Some(42), &all).is_some(), "{policy:?}");
            assert!(b.pick(None, &|_| false).is_none(), "{policy:?}");
            assert!(b.pick(Some(42), &|_| false).is_none(), "{policy:?}");
            b.set_endpoints(vec![]);
            assert!(b.pick(None, &all).is_none(), "{policy:?}");
        }
    }

    #[test]
    fn endpoints_are_normalized() {
        let mut list = weighted(&[0, 5]);
        list.push(Endpoint::new(addr(0)).with_weight(9));
        let b = Balancer::new(Policy::RoundRobin, list);
        assert_eq!(
            b.endpoints(),
            vec![
                Endpoint::new(addr(0)),
                Endpoint::new(addr(1)).with_weight(5)
            ]
        );
        assert_eq!(b.policy(), &Policy::RoundRobin);
        assert_eq!(Policy::default(), Policy::RoundRobin);
    }

    #[test]
    fn concurrent_picks_and_updates() {
        let b = Arc::new(Balancer::new(Policy::least_request(), eps(4)));
        let pickers: Vec<_> = (0..4)
            .map(|_| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..2000 {
                        if let Some(p) = b.pick(None, &all) {
                            held.push(p);
                        }
                        if i % 7 == 0 {
                            held.clear();
                        }
                    }
                })
            })
            .collect();
        let updater = {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                for i in 0..200u16 {
                    b.set_endpoints(eps(2 + i % 3));
                }
            })
        };
        for t in pickers {
            t.join().unwrap();
        }
        updater.join().unwrap();
        b.set_endpoints(eps(4));
        for i in 0..4 {
            assert_eq!(b.active(addr(i)), 0);
        }
    }
}

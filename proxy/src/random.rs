//! The proxy's one random generator (splitmix64); not cryptographic, it only spreads load.
//!
//! Load balancing, weighted clusters, shares of requests (faults, mirrors) and retry backoff
//! all draw from it.

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        LazyLock,
    },
    time::{SystemTime, UNIX_EPOCH},
};

/// A lock-free splitmix64 generator, seeded from std's per-process random hasher keys and the
/// clock.
pub struct Rng(AtomicU64);

impl Default for Rng {
    fn default() -> Rng {
        Rng::new()
    }
}

impl Rng {
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

    pub fn new() -> Rng {
        let mut h = RandomState::new().build_hasher();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        h.write_u128(now);
        Rng(AtomicU64::new(h.finish()))
    }

    fn next_u64(&self) -> u64 {
        let state = self
            .0
            .fetch_add(Rng::GAMMA, Ordering::Relaxed)
            .wrapping_add(Rng::GAMMA);
        mix64(state)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    pub fn below(&self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in (0, 1].
    pub fn unit(&self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

/// The generator of everything that has none of its own.
static SHARED: LazyLock<Rng> = LazyLock::new(Rng::new);

/// Uniform in `0..n` (n > 0).
pub fn below(n: u64) -> u64 {
    SHARED.below(n)
}

/// Whether a share (0 to 100) of requests is hit this time.
pub fn chance(percentage: f64) -> bool {
    below(1_000_000) as f64 / 10_000.0 < percentage
}

/// The splitmix64 finalizer: a bijective mix of 64 bits (the generator's output function, and
/// the balancer's hash finish).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_stay_in_range_and_spread() {
        let rng = Rng::new();
        let mut seen = [0usize; 4];
        for _ in 0..4000 {
            seen[rng.below(4) as usize] += 1;
            let u = rng.unit();
            assert!(u > 0.0 && u <= 1.0, "{u}");
        }
        assert!(seen.iter().all(|n| (800..1200).contains(n)), "{seen:?}");
        assert!(!chance(0.0));
        assert!(chance(100.0));
    }
}

//! A fast hash for the maps a request looks up: the stats' series, the upstream pools, the
//! clusters by name and the outlier records by endpoint. Their keys are the proxy's own (names
//! from its configuration, endpoints and the original destinations of its pod's own app), not
//! a remote client's, so SipHash's resistance to chosen keys buys nothing there; it cost a
//! SocketAddr about 290 instructions, several times per request (`cargo xtask profile`).

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
};

/// A HashMap with [`Fx`].
pub type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<Fx>>;

/// The hasher: rustc's Fx, a rotate, xor and multiply per 8 bytes.
#[derive(Default, Clone, Copy)]
pub struct Fx(u64);

impl Fx {
    const K: u64 = 0x517c_c1b7_2722_0a95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, b: u8) {
        self.add(b.into());
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

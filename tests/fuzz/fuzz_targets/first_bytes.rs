//! The proxy's look at a connection's first bytes: protocol detection never changes its mind
//! as more bytes arrive, and a server name read from a ClientHello is read back the same from a
//! ClientHello made for it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sockmesh_proxy::transport::{client_hello, detect_partial, sni};

fuzz_target!(|data: &[u8]| {
    let mut decided = None;
    for n in 0..=data.len().min(64) {
        match (decided, detect_partial(&data[..n])) {
            (None, now) => decided = now,
            (Some(before), Some(now)) => assert_eq!(before, now, "changed at byte {n}"),
            (Some(before), None) => panic!("decided {before:?}, then undecided at byte {n}"),
        }
    }
    if let Some(name) = sni(data) {
        assert_eq!(sni(&client_hello(&name)).as_deref(), Some(name.as_str()));
    }
});

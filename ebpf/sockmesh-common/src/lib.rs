//! Types shared by sockmesh's kernel programs and its userspace, and every capture decision.
//!
//! Everything here is `no_std` and allocation-free so the same code runs in the kernel (built for
//! `bpfel-unknown-none`) and on the host (`--dry-run`, `explain`, unit tests). The map layouts are
//! `#[repr(C)]` and padded explicitly: userspace writes them byte for byte.
//!
//! - [`addr`]: addresses in the maps' form (IPv6, IPv4 v4-mapped).
//! - [`pod`]: a registered pod: netns cookie, settings ([`PodConfig`], [`PodFlags`]), set kinds.
//! - [`maps`]: the maps' names, sizes, keys and values.
//! - [`decision`]: every verdict, behind lookups the kernel and `explain` both answer.
//! - [`accel`]: socket acceleration's pairing of local connections and its window.
//! - [`timing`]: the sections `--section-timing` times in the programs.
#![cfg_attr(not(any(test, feature = "user")), no_std)]

pub mod accel;
pub mod addr;
pub mod decision;
pub mod maps;
pub mod pod;
pub mod timing;

pub use accel::*;
pub use addr::*;
pub use decision::{
    decide, decide_arrival, decide_forwarded, decide_inbound, in_loopback_cidr, is_local,
    local_origin, Action, Arrival, Conn, Lookups, Proto, Reason, Rules, Verdict, DNS_CAPTURE_PORT,
    DNS_PORT, LOOPBACK_IFINDEX,
};
pub use maps::*;
pub use pod::*;

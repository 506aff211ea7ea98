//! Types shared by sockmesh's kernel programs and its userspace, and the capture decision.
//!
//! Everything here is `no_std` and allocation-free so the same code runs in the kernel (built for
//! `bpfel-unknown-none`) and on the host (`--dry-run`, `explain`, unit tests). The map layouts are
//! `#[repr(C)]` and padded explicitly: userspace writes them byte for byte.
#![cfg_attr(not(any(test, feature = "user")), no_std)]

pub mod decision;
pub mod maps;

pub use decision::{
    decide, decide_inbound, Action, Arrival, Conn, Proto, Reason, Rules, Verdict, DNS_CAPTURE_PORT,
    DNS_PORT,
};
pub use maps::*;

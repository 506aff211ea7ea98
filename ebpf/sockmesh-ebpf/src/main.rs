//! sockmesh's kernel programs.
//!
//! - `connect4`/`connect6` decide with [`sockmesh_common::decide`] and rewrite the destination of
//!   captured connects to localhost:15001 (or :15006), remembering the original destination in
//!   per-socket storage.
//! - `sockops` re-keys that record by the connection's 4-tuple once it is established, so the
//!   proxy's accepted socket can find it, and drops it when the socket closes.
//! - `getsockopt` answers SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST as conntrack would.
//! - `getpeername4`/`getpeername6` show the app its original peer.
//!
//! Every program acts only on sockets of registered pods (netns cookie in `SM_PODS`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("sockmesh-ebpf is a kernel object; it is built for bpfel-unknown-none by aya-build");
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

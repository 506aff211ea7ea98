//! sockmesh's kernel programs, one module per hook:
//!
//! - [`connect`]: `connect4`/`connect6` (and `sendmsg4`/`sendmsg6` for DNS) decide with
//!   [`sockmesh_common::decide`] and rewrite captured calls to localhost:15001 (or :15006,
//!   :15053), keeping the original destination (a TCP socket's in its task's storage until
//!   sock_ops takes it, a UDP socket's in its socket storage).
//! - [`sockops`]: re-keys a TCP socket's record by the connection's 4-tuple as its SYN goes
//!   out, so the proxy's accepted socket can find it, drops it when the connection closes, and
//!   records listening sockets.
//! - [`getsockopt`]: answers SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST as conntrack would.
//! - [`getpeername`], [`recvmsg`]: show the app its original peer.
//! - [`sk_lookup`]: steers new inbound connections to the pod's proxy.
//! - [`forward`]: tc ingress and egress on `-k` interfaces: connections forwarded through the
//!   pod go to its outbound proxy, translated as REDIRECT translates them.
//! - [`sock_create`]: a socket's creator (iptables' owner match): read from the socket's file,
//!   recorded for listeners (their accepted sockets take it), or remembered at `socket()`
//!   where the file cannot be read.
//! - [`accel`]: opt-in socket acceleration (sock_ops + sk_msg).
//!
//! [`maps`] holds the maps they share; [`ctx`] the context reads and writes; [`timing`] the
//! section timing of `--section-timing`. Every program acts only on sockets of registered pods
//! (netns cookie in `SM_PODS`).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod accel;
#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod ctx;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod getpeername;
#[cfg(target_arch = "bpf")]
mod getsockopt;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod recvmsg;
#[cfg(target_arch = "bpf")]
mod sk_lookup;
#[cfg(target_arch = "bpf")]
mod sock_create;
#[cfg(target_arch = "bpf")]
mod sockops;
#[cfg(target_arch = "bpf")]
mod timing;

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

//! `cgroup/getsockopt`: answer SO_ORIGINAL_DST (SOL_IP, 80) and IP6T_SO_ORIGINAL_DST
//! (SOL_IPV6, 80) on a pod's sockets as conntrack would: the redirect record's destination,
//! else the socket's own local address.

use core::ptr::{self, addr_of_mut};

use aya_ebpf::{bindings::bpf_sock, macros::cgroup_sockopt, programs::SockoptContext};
use sockmesh_common::{counters, is_v4_mapped, Addr, ConnKey, PodFlags, AF_INET, AF_INET6};

use crate::{
    ctx::{self, IPPROTO_TCP, SOL_IP, SOL_IPV6, SO_ORIGINAL_DST},
    maps::{count, pod, ORIG_DST},
    timing::{self, Section},
};

#[cgroup_sockopt(getsockopt)]
pub fn sockmesh_getsockopt(ctx: SockoptContext) -> i32 {
    try_getsockopt(&ctx);
    1
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return;
    }
    let begin = timing::start();
    original_dst(ctx);
    timing::lap(Section::GetsockoptOrigDst, begin);
}

/// Answer SO_ORIGINAL_DST or IP6T_SO_ORIGINAL_DST.
#[inline(always)]
fn original_dst(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    let level = unsafe { (*so).level };
    let sk: *mut bpf_sock = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    if unsafe { (*sk).protocol } != IPPROTO_TCP {
        return;
    }
    let netns = ctx::netns(ctx);
    // The proxy's accepted socket: its peer is the connection's client.
    let sock = ctx::sock_key(sk, netns);
    if sock.remote_port == 0 {
        // Not connected: conntrack has nothing for it either.
        return;
    }
    // conntrack answers SOL_IP for IPv4 flows (v4 sockets, or v6 sockets with a v4-mapped peer)
    // and SOL_IPV6 for IPv6 flows.
    let v4_flow = is_v4_mapped(&sock.remote);
    if (level == SOL_IP) != v4_flow {
        return;
    }
    let (server, server_port) = (sock.local, sock.local_port);
    // A record exists only for a connection captured in a registered pod: the pod's config is
    // looked up only without one.
    let t = timing::start();
    let record = unsafe { ORIG_DST.get(&ConnKey::of_server(&sock)) };
    timing::lap(Section::GetsockoptLookup, t);
    let (addr, port, counter) = match record {
        Some(o) => (o.addr, o.port, counters::ORIG_DST_HIT),
        None => {
            let Some(cfg) = pod(netns) else {
                return;
            };
            // A flow that was not redirected: conntrack reports its own destination, but only
            // where the pod has rules for that family.
            if !v4_flow && !cfg.has(PodFlags::IPV6) {
                return;
            }
            if server_port == cfg.outbound_port {
                // On the outbound capture port a record was expected: it was evicted (or never
                // stored). The proxy sees its own address, never another connection's.
                (server, server_port, counters::ORIG_DST_LOST)
            } else {
                (server, server_port, counters::ORIG_DST_LOCAL)
            }
        }
    };
    let optval = unsafe { (*so).__bindgen_anon_2.optval }.cast::<u8>();
    let optval_end = unsafe { (*so).__bindgen_anon_3.optval_end }.cast::<u8>();
    let len: usize = if v4_flow { 16 } else { 28 };
    if (optval as usize) + len > optval_end as usize {
        return;
    }
    unsafe {
        if (*so).optlen < len as i32 {
            return;
        }
        if v4_flow {
            write_sockaddr_in(optval, &addr, port);
        } else {
            write_sockaddr_in6(optval, &addr, port);
        }
        ptr::write_volatile(addr_of_mut!((*so).optlen), len as i32);
        ptr::write_volatile(addr_of_mut!((*so).retval), 0);
    }
    let n = count(netns, counter);
    if counter == counters::ORIG_DST_LOST && counters::worth_logging(n) {
        aya_log_ebpf::warn!(
            ctx,
            "pod netns {}: no original destination for a connection to capture port {} \
             ({} on this CPU so far, logged at powers of two, all counted as orig_dst_lost): \
             more live connections than --orig-dst-entries, the oldest records went",
            netns.get(),
            port,
            n
        );
    }
}

/// `struct sockaddr_in` into the first 16 bytes of `out` (bounds checked by the caller).
#[inline(always)]
unsafe fn write_sockaddr_in(out: *mut u8, addr: &Addr, port: u16) {
    let fam = AF_INET.to_ne_bytes();
    let p = port.to_be_bytes();
    let bytes: [u8; 16] = [
        fam[0], fam[1], p[0], p[1], addr[12], addr[13], addr[14], addr[15], 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let mut i = 0;
    while i < 16 {
        unsafe { ptr::write_volatile(out.add(i), bytes[i]) };
        i += 1;
    }
}

/// `struct sockaddr_in6` into the first 28 bytes of `out` (bounds checked by the caller).
#[inline(always)]
unsafe fn write_sockaddr_in6(out: *mut u8, addr: &Addr, port: u16) {
    let fam = AF_INET6.to_ne_bytes();
    let p = port.to_be_bytes();
    let head: [u8; 8] = [fam[0], fam[1], p[0], p[1], 0, 0, 0, 0];
    let mut i = 0;
    while i < 8 {
        unsafe { ptr::write_volatile(out.add(i), head[i]) };
        i += 1;
    }
    let mut i = 0;
    while i < 16 {
        unsafe { ptr::write_volatile(out.add(8 + i), addr[i]) };
        i += 1;
    }
    let mut i = 0;
    while i < 4 {
        unsafe { ptr::write_volatile(out.add(24 + i), 0) };
        i += 1;
    }
}

//! `cgroup/getpeername4`, `getpeername6`: the app sees the peer it dialed, not the proxy, as
//! with NAT.

use aya_ebpf::{bindings::bpf_sock, macros::cgroup_sock_addr, programs::SockAddrContext};
use sockmesh_common::{counters, is_loopback, ConnKey, NetnsCookie, OrigDst};

use crate::{
    ctx::{self, SOCK_DGRAM},
    maps::{count, ORIG_DST, SOCK_DST},
};

#[cgroup_sock_addr(getpeername4)]
pub fn sockmesh_getpeername4(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn sockmesh_getpeername6(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, true);
    1
}

#[inline(always)]
fn try_getpeername(ctx: &SockAddrContext, v6: bool) {
    let record = if unsafe { (*ctx.sock_addr).type_ } == SOCK_DGRAM {
        let record = unsafe { SOCK_DST.get_ptr_mut(ctx) };
        if record.is_null() {
            return;
        }
        unsafe { *record }
    } else {
        match tcp_record(ctx) {
            Some(record) => record,
            None => return,
        }
    };
    ctx::write_user_addr(ctx, &record.addr, record.port, v6);
    count(ctx::netns(ctx), counters::PEERNAME_REWRITE);
}

/// A TCP socket's record in `ORIG_DST`, under its own 4-tuple as the client: looked up only
/// for a socket whose peer is on loopback (where a redirected connection goes; a proxy's
/// accepted sockets mostly have the pod's address as peer).
#[inline(always)]
fn tcp_record(ctx: &SockAddrContext) -> Option<OrigDst> {
    let sk: *mut bpf_sock = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    // The netns only once the peer is known to be on loopback: most are not.
    let mut sock = ctx::sock_key(sk, NetnsCookie(0));
    if !is_loopback(&sock.remote) {
        return None;
    }
    sock.netns = ctx::netns(ctx);
    unsafe { ORIG_DST.get(&ConnKey::of_client(&sock)) }.copied()
}

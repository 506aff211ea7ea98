//! `cgroup/getpeername4`, `getpeername6`: the app sees the peer it dialed, not the proxy, as
//! with NAT.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use sockmesh_common::counters;

use crate::{
    ctx,
    maps::{count, SOCK_DST},
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
    let record = unsafe { SOCK_DST.get_ptr_mut(ctx) };
    if record.is_null() {
        return;
    }
    let record = unsafe { *record };
    ctx::write_user_addr(ctx, &record.addr, record.port, v6);
    count(ctx::netns(ctx), counters::PEERNAME_REWRITE);
}

//! `cgroup/recvmsg4`, `recvmsg6`: a captured DNS query's replies come from the server it asked,
//! not from the DNS proxy.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use sockmesh_common::{is_loopback, v4_mapped, Reason, DNS_CAPTURE_PORT};

use crate::{
    ctx::{self, read_words},
    maps::SOCK_DST,
};

#[cgroup_sock_addr(recvmsg4)]
pub fn sockmesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    try_recvmsg(&ctx, false);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sockmesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    try_recvmsg(&ctx, true);
    1
}

#[inline(always)]
fn try_recvmsg(ctx: &SockAddrContext, v6: bool) {
    let record = unsafe { SOCK_DST.get_ptr_mut(ctx) };
    if record.is_null() {
        return;
    }
    let record = unsafe { *record };
    if !record.is(Reason::DnsCaptured) {
        return;
    }
    let sa = ctx.sock_addr;
    let (from, port) = unsafe {
        let from = if v6 {
            read_words!(sa, user_ip6)
        } else {
            v4_mapped((*sa).user_ip4.to_ne_bytes())
        };
        (from, u16::from_be((*sa).user_port as u16))
    };
    // Only datagrams from the DNS proxy the query was sent to.
    if !is_loopback(&from) || port != DNS_CAPTURE_PORT {
        return;
    }
    ctx::write_user_addr(ctx, &record.addr, record.port, v6);
}

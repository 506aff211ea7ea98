//! `cgroup/sock_create`: remember who created each socket of a registered pod (iptables'
//! owner match looks at the socket's creator, not at the task that later connects).

use core::ptr;

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    helpers::{bpf_get_current_uid_gid, generated::bpf_sk_storage_get},
    macros::cgroup_sock,
    programs::SockContext,
};
use sockmesh_common::SockOwner;

use crate::{
    ctx,
    maps::{pod, SOCK_OWNER},
};

#[cgroup_sock(sock_create)]
pub fn sockmesh_sock_create(ctx: SockContext) -> i32 {
    try_sock_create(&ctx);
    // Never refuse a socket.
    1
}

#[inline(always)]
fn try_sock_create(ctx: &SockContext) {
    if pod(ctx::netns(ctx)).is_none() {
        return;
    }
    let ids = bpf_get_current_uid_gid();
    let owner = unsafe {
        bpf_sk_storage_get(
            SOCK_OWNER.as_ptr(),
            ctx.sock.cast(),
            ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    };
    if !owner.is_null() {
        unsafe {
            *owner.cast::<SockOwner>() = SockOwner {
                uid: ids as u32,
                gid: (ids >> 32) as u32,
            }
        };
    }
}

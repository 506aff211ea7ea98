//! Who created a socket (iptables' owner match looks at the socket's creator, not at the task
//! that later connects): read from the socket's file when the connect programs need it, or,
//! where that cannot be done or acceleration needs it for accepted sockets, recorded by
//! `cgroup/sock_create` in `SOCK_OWNER`.

use core::ptr;

use aya_ebpf::{
    bindings::{bpf_sock, BPF_SK_STORAGE_GET_F_CREATE},
    helpers::{bpf_get_current_uid_gid, bpf_probe_read_kernel, generated::bpf_sk_storage_get},
    macros::cgroup_sock,
    programs::SockContext,
};
use sockmesh_common::{CredOffsets, SockOwner};

use crate::{
    accel, ctx,
    maps::{pod, SOCKMESH_CRED_OFFSETS, SOCK_OWNER},
};

#[cgroup_sock(sock_create)]
pub fn sockmesh_sock_create(ctx: SockContext) -> i32 {
    try_sock_create(&ctx);
    // Never refuse a socket.
    1
}

/// Record the creator of a registered pod's socket, unless the connect programs can read it
/// from the socket and acceleration (which looks up an accepted socket's listener's creator,
/// copied with the record) is off for the pod: a socket storage per socket saved.
#[inline(always)]
fn try_sock_create(ctx: &SockContext) {
    let Some(cfg) = pod(ctx::netns(ctx)) else {
        return;
    };
    if offsets().known() && !accel::on_for(cfg) {
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

/// The agent's offsets of the fields from a socket to its creator's credentials.
#[inline(always)]
fn offsets() -> CredOffsets {
    unsafe { ptr::read_volatile(&SOCKMESH_CRED_OFFSETS) }
}

/// Fill `owner` with the credentials `sk`'s file was opened with (`fsuid`, `fsgid`: what
/// iptables' owner match compares); false if the offsets are unknown or a read failed.
#[inline(never)]
pub fn creator(sk: *mut bpf_sock, owner: &mut SockOwner) -> bool {
    let off = offsets();
    if !off.known() {
        return false;
    }
    // The verifier allows no arithmetic on a socket pointer: its value is copied out as plain
    // bytes first.
    let value = sk as u64;
    let Ok(sk) = (unsafe { bpf_probe_read_kernel(ptr::from_ref(&value)) }) else {
        return false;
    };
    let Some(cred) = follow(sk, off.sk_socket)
        .and_then(|socket| follow(socket, off.socket_file))
        .and_then(|file| follow(file, off.file_cred))
    else {
        return false;
    };
    let read = |at: u32| unsafe { bpf_probe_read_kernel((cred + u64::from(at)) as *const u32) };
    match (read(off.cred_fsuid), read(off.cred_fsgid)) {
        (Ok(uid), Ok(gid)) => {
            *owner = SockOwner { uid, gid };
            true
        }
        _ => false,
    }
}

/// The pointer at `offset` in the kernel object at `addr`, if it reads and is not null.
#[inline(always)]
fn follow(addr: u64, offset: u32) -> Option<u64> {
    let p: u64 = unsafe { bpf_probe_read_kernel((addr + u64::from(offset)) as *const u64) }.ok()?;
    (p != 0).then_some(p)
}

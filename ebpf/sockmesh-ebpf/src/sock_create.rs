//! Who created a socket (iptables' owner match looks at the socket's creator, not at the task
//! that later connects): read from the socket's file when the connect programs or acceleration
//! need it. An accepted socket has no file of its own yet when it is established: it takes its
//! listener's creator, recorded in `LISTENER_OWNER` when it listened. Where the socket's file
//! cannot be read (no kernel BTF), `cgroup/sock_create` records every creator in `SOCK_OWNER`
//! instead.

use core::ptr;

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::{bpf_get_current_uid_gid, bpf_probe_read_kernel},
    macros::cgroup_sock,
    programs::SockContext,
};
use sockmesh_common::{CredOffsets, ListenerKey, SockOwner};

use crate::{
    ctx,
    maps::{pod, sk_storage_create, LISTENER_OWNER, SOCKMESH_CRED_OFFSETS, SOCK_OWNER},
};

#[cgroup_sock(sock_create)]
pub fn sockmesh_sock_create(ctx: SockContext) -> i32 {
    try_sock_create(&ctx);
    // Never refuse a socket.
    1
}

/// Record the creator of a registered pod's socket, unless it can be read from the socket: a
/// socket storage per socket saved.
#[inline(always)]
fn try_sock_create(ctx: &SockContext) {
    if offsets().known() || pod(ctx::netns(ctx)).is_none() {
        return;
    }
    let stored = sk_storage_create(&SOCK_OWNER, ctx.sock.cast());
    if !stored.is_null() {
        unsafe { *stored = current_task() };
    }
}

/// Record a listening socket's creator in `LISTENER_OWNER` under `key` (the sockets it accepts
/// take it, by which acceleration tells a proxy's), whether or not its pod is registered yet,
/// as listeners are recorded: read from the socket, else the task calling listen().
/// Acceleration, the map's only reader, needs the kernel's BTF, which places the creator.
#[inline(never)]
pub fn record_listener(sk: *mut bpf_sock, key: &ListenerKey) {
    let mut owner = current_task();
    creator(sk, &mut owner);
    let _ = LISTENER_OWNER.insert(key, &owner, 0);
}

/// The current task's uid and gid.
#[inline(always)]
pub fn current_task() -> SockOwner {
    let ids = bpf_get_current_uid_gid();
    SockOwner {
        uid: ids as u32,
        gid: (ids >> 32) as u32,
    }
}

/// The agent's offsets of the fields from a socket to its creator's credentials.
#[inline(always)]
fn offsets() -> CredOffsets {
    unsafe { ptr::read_volatile(&SOCKMESH_CRED_OFFSETS) }
}

/// Fill `owner` with the credentials `sk`'s file was opened with (`fsuid`, `fsgid`: what
/// iptables' owner match compares); false (`owner` untouched) if the offsets are unknown or a
/// read failed.
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
    // `fsgid` follows `fsuid` in every kernel's `struct cred`: one read of both.
    if off.cred_fsgid == off.cred_fsuid + 4 {
        let at = (cred + u64::from(off.cred_fsuid)) as *const SockOwner;
        return match unsafe { bpf_probe_read_kernel(at) } {
            Ok(read) => {
                *owner = read;
                true
            }
            Err(_) => false,
        };
    }
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

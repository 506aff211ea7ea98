//! Socket acceleration, on when the agent turns it on for the node: sock_ops puts both ends of
//! an established local connection of a registered pod in `SOCKS`, and `sk_msg` (attached to
//! that socket hash) hands each message straight to the other end's receive queue, skipping
//! TCP/IP, when that end receives redirected data (the proxy's) and its window has room;
//! otherwise by TCP, until what went that way has been read.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    helpers::{bpf_probe_read_kernel, generated::bpf_sk_storage_get},
    macros::sk_msg,
    programs::{SkMsgContext, SockOpsContext},
};
use sockmesh_common::{
    counters, tcp_drained, v4_mapped, window_has_room, AccelSock, KernelOffsets, NetnsCookie,
    PodConfig, PodFlags, SockKey, SockOwner, AF_INET, SK_USER_DATA_FLAGS,
};

use crate::{
    ctx::{self, read_words},
    maps::{
        count, pod, sk_storage_of, ADDR_POD, LISTENER_OWNER, PEER_SK, SOCKMESH_ACCEL,
        SOCKMESH_KERNEL_OFFSETS, SOCKS, SOCK_OWNER, SOCK_TCP,
    },
    sock_create,
    sockops::{self, listener_key, sock_key},
};

/// sk_msg's verdict: let the message go (redirected, or by TCP).
pub const SK_PASS: u32 = 1;

/// Put an established socket of a registered pod in `SOCKS` when its peer is local (loopback,
/// or a pod address of this node) and acceleration is on for the pod (the caller checked the
/// node's, [`on_for_node`]). The kernel takes the entry out when the socket closes. The counter
/// to count, if any (counted by the caller: three frames deep would pass the verifier's stack
/// limit).
#[inline(never)]
pub fn accelerate(ctx: &SockOpsContext, netns: NetnsCookie) -> Option<u32> {
    let pod = pod(netns)?;
    if !on_for(pod) {
        return None;
    }
    // One key on the stack (the connect programs' frames leave little room).
    let mut key = sock_key(ctx, netns);
    if !SockKey::local_peer(&key.remote, unsafe { ADDR_POD.get(&key.remote) }.is_some()) {
        return None;
    }
    // The proxy's sockets; an app's only if the pod says so (all).
    let proxy = is_proxy_socket(ctx, netns, pod);
    if !proxy && !pod.has(PodFlags::ACCEL_APPS) {
        return None;
    }
    // Its address and role first: once in SOCKS the socket can be sent to.
    if !record_address(ctx, &key, proxy) {
        return Some(counters::ACCEL_SOCK_FULL);
    }
    match SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64) {
        Ok(()) => {
            // Told when it closes, to forget its address (see `forget_address`).
            sockops::watch_state(ctx);
            Some(counters::ACCEL_SOCK_ADDED)
        }
        Err(_) => Some(counters::ACCEL_SOCK_FULL),
    }
}

/// Whether the agent turned acceleration on for the node: without it sock_ops has nothing to
/// do for acceleration (nothing to add, nothing to forget).
#[inline(always)]
pub fn on_for_node() -> bool {
    (unsafe { ptr::read_volatile(&SOCKMESH_ACCEL) }) != 0
}

/// Whether acceleration is on for the node and for `pod`.
#[inline(always)]
pub fn on_for(pod: &PodConfig) -> bool {
    on_for_node() && !pod.has(PodFlags::NO_ACCEL)
}

/// Whether the socket is `pod`'s proxy's: its creator (or its listener's, for an accepted
/// one) is one of the proxy's uids or gids.
#[inline(never)]
fn is_proxy_socket(ctx: &SockOpsContext, netns: NetnsCookie, pod: &PodConfig) -> bool {
    // An accepted socket has no file yet: its listener's creator.
    if ctx.op() == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        if let Some(owner) = unsafe { LISTENER_OWNER.get(&listener_key(ctx, netns, 0)) } {
            return pod.is_proxy(owner);
        }
    }
    let Some(sk) = sockops::sk(ctx) else {
        return false;
    };
    // Read from the socket's file, else as `sock_create` recorded it (no BTF), or as an earlier
    // release recorded a listener's, copied to the sockets it accepts.
    let mut owner = SockOwner { uid: 0, gid: 0 };
    if sock_create::creator(sk, &mut owner) {
        return pod.is_proxy(&owner);
    }
    let stored = sk_storage_of(&SOCK_OWNER, sk.cast());
    !stored.is_null() && pod.is_proxy(unsafe { &*stored })
}

/// A watched socket closed: if its pod accelerates, its entry in `PEER_SK` goes, so that the
/// LRU map only ever has to make room by dropping closed sockets' entries that this missed. A
/// pod that does not accelerate has none there, and its closing sockets (watched for their
/// original destination) skip the deletion, a locked LRU operation, for a pod lookup. Missed
/// here, and left to the LRU: the entries of a pod that turned acceleration off, or left,
/// while its sockets were accelerated.
#[inline(never)]
pub fn forget_address(ctx: &SockOpsContext, netns: NetnsCookie) {
    if !pod(netns).is_some_and(on_for) {
        return;
    }
    let _ = PEER_SK.remove(&sock_key(ctx, netns));
}

/// Record the socket's kernel address under `key` (for senders to size its window), and
/// whether it receives redirected data (`proxy`: a socket of the pod's proxy). False if it
/// could not be stored.
#[inline(never)]
fn record_address(ctx: &SockOpsContext, key: &SockKey, proxy: bool) -> bool {
    let Some(sk) = sockops::sk(ctx) else {
        return false;
    };
    let value = AccelSock {
        addr: sk as u64,
        receives: u32::from(proxy),
        _pad: 0,
    };
    PEER_SK.insert(key, &value, BPF_ANY as u64).is_ok()
}

/// The kernel's field offsets the agent set at load, if it set them.
#[inline(always)]
fn kernel_offsets() -> Option<KernelOffsets> {
    let off = unsafe { ptr::read_volatile(&SOCKMESH_KERNEL_OFFSETS) };
    off.known().then_some(off)
}

/// Bytes sk_msg has queued for the socket at kernel address `sk` that its reader has not taken
/// (its psock's `msg_tot_len`), or `None` if they cannot be read.
#[inline(never)]
fn unread(sk: u64) -> Option<u64> {
    let off = kernel_offsets()?;
    let user_data: u64 =
        unsafe { bpf_probe_read_kernel((sk + u64::from(off.sk_user_data)) as *const u64) }.ok()?;
    let psock = user_data & !SK_USER_DATA_FLAGS;
    if psock == 0 {
        return None;
    }
    let len: u32 =
        unsafe { bpf_probe_read_kernel((psock + u64::from(off.psock_msg_tot_len)) as *const u32) }
            .ok()?;
    Some(u64::from(len))
}

#[sk_msg]
pub fn sockmesh_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) {
    let msg = ctx.msg;
    let sk = unsafe { (*msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return;
    }
    let netns = ctx::netns(ctx);
    let (local, remote) = unsafe {
        if (*msg).family == AF_INET as u32 {
            (
                v4_mapped((*msg).local_ip4.to_ne_bytes()),
                v4_mapped((*msg).remote_ip4.to_ne_bytes()),
            )
        } else {
            (read_words!(msg, local_ip6), read_words!(msg, remote_ip6))
        }
    };
    let me = SockKey {
        netns,
        local,
        remote,
        local_port: unsafe { (*msg).local_port } as u16,
        remote_port: u32::from_be(unsafe { (*msg).remote_port }) as u16,
        _pad: 0,
    };
    let remote_pod = unsafe { ADDR_POD.get(&remote) }.copied();
    let mut peer = me.peer(remote_pod);
    let size = u64::from(unsafe { (*msg).size });
    // Whatever is not redirected here the caller sends by TCP; the socket is then marked so
    // that the rest follows, until all of it has been read (the two paths do not keep each
    // other's order: a reader takes redirected data first).
    let tcp = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&SOCK_TCP).cast_mut().cast::<c_void>(),
            sk.cast(),
            ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    }
    .cast::<u8>();
    if tcp.is_null() {
        return;
    }
    // Both ends' kernel addresses: the peer's is missing until it is in SOCKS.
    let (Some(me_sk), Some(peer_sk)) = (unsafe { PEER_SK.get(&me) }, unsafe { PEER_SK.get(&peer) })
    else {
        unsafe { *tcp = 1 };
        return;
    };
    // An app's socket gets all its data by TCP.
    if peer_sk.receives == 0 {
        return;
    }
    let (me_sk, peer_sk) = (me_sk.addr, peer_sk.addr);
    let by_tcp = unsafe { *tcp } != 0;
    if by_tcp && !drained(me_sk, peer_sk) {
        return;
    }
    // Within the peer's window, redirected; SK_DROP when the peer is not in the map.
    if !window_has_room(unread(peer_sk), size) {
        if !by_tcp {
            unsafe { *tcp = 1 };
            count(netns, counters::ACCEL_WINDOW_FULL);
        }
        return;
    }
    let redirected = SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64;
    unsafe { *tcp = u8::from(!redirected) };
    if redirected && by_tcp {
        count(netns, counters::ACCEL_RESUMED);
    }
}

/// Whether all the TCP data the socket at kernel address `sender` sent its peer (at `peer`)
/// has been read ([`tcp_drained`]); false if the fields cannot be read.
#[inline(never)]
fn drained(sender: u64, peer: u64) -> bool {
    let Some(off) = kernel_offsets() else {
        return false;
    };
    let field = |sk: u64, at: u32| unsafe {
        bpf_probe_read_kernel((sk + u64::from(at)) as *const u32).ok()
    };
    match (
        field(sender, off.tcp_write_seq),
        field(sender, off.tcp_snd_una),
        field(peer, off.tcp_rcv_nxt),
        field(peer, off.tcp_copied_seq),
    ) {
        (Some(w), Some(u), Some(n), Some(c)) => tcp_drained(w, u, n, c),
        _ => false,
    }
}

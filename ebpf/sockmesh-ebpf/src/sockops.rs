//! `sock_ops`: publish a redirected or TPROXY connection's original destination under its
//! 4-tuple as its SYN goes out (for SO_ORIGINAL_DST, getpeername and sk_lookup), forget it on
//! close; record listening sockets (where sk_lookup finds a pod's
//! proxy); and hand established local connections to acceleration ([`crate::accel`]).

use aya_ebpf::{
    bindings::{
        bpf_sock, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE,
    },
    helpers::generated::bpf_sock_ops_cb_flags_set,
    macros::sock_ops,
    programs::SockOpsContext,
};
use sockmesh_common::{
    counters, is_loopback, v4_mapped, ConnKey, Handoff, ListenerKey, NetnsCookie, PodFlags,
    SockKey, AF_INET, LISTENER_SLOTS,
};

use crate::{
    accel,
    ctx::{self, read_words},
    maps::{
        count, handoff_slot, is_local, pod, task_handoff, CONNECTING, LISTENERS, ORIG_DST, PARKED,
    },
    sock_create,
    timing::{self, Section},
};

#[sock_ops]
pub fn sockmesh_sockops(ctx: SockOpsContext) -> u32 {
    let begin = timing::start();
    // Acceleration and the rest each in their own frame (the verifier adds up nested frames).
    let op = ctx.op();
    let established =
        op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;
    if established && accel::on_for_node() {
        let netns = ctx::netns(&ctx);
        if let Some(counter) = accel::accelerate(&ctx, netns) {
            count(netns, counter);
        }
    }
    try_sockops(&ctx);
    // Which callback this was is worked out only when timing.
    if timing::on() {
        timing::lap(section(&ctx, op), begin);
    }
    1
}

/// The timing section of callback `op`.
#[inline(always)]
fn section(ctx: &SockOpsContext, op: u32) -> Section {
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => Section::SockopsConnect,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => Section::SockopsActive,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => Section::SockopsPassive,
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => Section::SockopsClose,
        BPF_SOCK_OPS_STATE_CB => Section::SockopsState,
        BPF_SOCK_OPS_TCP_LISTEN_CB => Section::SockopsListen,
        _ => Section::SockopsIdle,
    }
}

/// The socket's own 4-tuple: its key in `SOCKS` and `PEER_SK`.
#[inline(always)]
pub fn sock_key(ctx: &SockOpsContext, netns: NetnsCookie) -> SockKey {
    let (local, remote) = if ctx.family() == AF_INET as u32 {
        (
            v4_mapped(ctx.local_ip4().to_ne_bytes()),
            v4_mapped(ctx.remote_ip4().to_ne_bytes()),
        )
    } else {
        let ops = ctx.ops;
        unsafe { (read_words!(ops, local_ip6), read_words!(ops, remote_ip6)) }
    };
    SockKey {
        netns,
        local,
        remote,
        local_port: ctx.local_port() as u16,
        remote_port: u32::from_be(ctx.remote_port()) as u16,
        _pad: 0,
    }
}

/// The connection's key in `ORIG_DST`, seen from this socket as the client.
#[inline(always)]
fn conn_key(ctx: &SockOpsContext, netns: NetnsCookie) -> ConnKey {
    ConnKey::of_client(&sock_key(ctx, netns))
}

/// The sock_ops context's socket, if it has one.
#[inline(always)]
pub fn sk(ctx: &SockOpsContext) -> Option<*mut bpf_sock> {
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    (!sk.is_null()).then_some(sk)
}

/// Ask to be told when the socket changes state (for its close).
#[inline(always)]
pub fn watch_state(ctx: &SockOpsContext) {
    unsafe { bpf_sock_ops_cb_flags_set(ctx.ops, BPF_SOCK_OPS_STATE_CB_FLAG as i32) };
}

#[inline(never)]
fn try_sockops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
        && op != BPF_SOCK_OPS_TCP_LISTEN_CB
        && op != BPF_SOCK_OPS_TCP_CONNECT_CB
    {
        return;
    }
    if op == BPF_SOCK_OPS_STATE_CB {
        // Called at every change of state of a watched socket: only its close matters.
        if ctx.arg(1) == BPF_TCP_CLOSE {
            let netns = ctx::netns(ctx);
            // The client's socket holds its record; the proxy's socket holds a forwarded one.
            if ORIG_DST.remove(&conn_key(ctx, netns)).is_ok()
                || ORIG_DST.remove(&server_key(ctx, netns)).is_ok()
            {
                count(netns, counters::ORIG_DST_RELEASED);
            }
            if accel::on_for_node() {
                accel::forget_address(ctx, netns);
            }
        }
        return;
    }
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && task_handoff() {
        // Records went out with the SYN (`TCP_CONNECT_CB`).
        return;
    }
    let netns = ctx::netns(ctx);
    if op == BPF_SOCK_OPS_TCP_LISTEN_CB {
        record_listener(ctx, netns);
        if let Some(sk) = sk(ctx) {
            sock_create::record_listener(sk, &listener_key(ctx, netns, 0));
        }
        return;
    }
    if op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        watch_forwarded(ctx, netns);
        return;
    }
    publish(ctx, netns, op == BPF_SOCK_OPS_TCP_CONNECT_CB);
}

/// The connection's key in `ORIG_DST`, seen from this socket as the server (the proxy's
/// accepted socket).
#[inline(always)]
fn server_key(ctx: &SockOpsContext, netns: NetnsCookie) -> ConnKey {
    ConnKey::of_server(&sock_key(ctx, netns))
}

/// A proxy's socket accepting a connection forwarded from a `-k` interface (its record was
/// made by the tc program, see `forward`; its client is not one of the pod's addresses): the
/// record leaves when this socket closes.
#[inline(always)]
fn watch_forwarded(ctx: &SockOpsContext, netns: NetnsCookie) {
    let Some(cfg) = pod(netns) else {
        return;
    };
    if !cfg.has(PodFlags::KUBE_VIRT) {
        return;
    }
    let port = ctx.local_port();
    if port != cfg.outbound_port as u32 && port != cfg.inbound_port as u32 {
        return;
    }
    let key = server_key(ctx, netns);
    if !is_local(netns, &key.client) && unsafe { ORIG_DST.get(&key) }.is_some() {
        watch_state(ctx);
    }
}

/// The key of the socket's (netns, local port, family) in `LISTENERS` at `slot`, and (slot 0)
/// in `LISTENER_OWNER`.
#[inline(always)]
pub fn listener_key(ctx: &SockOpsContext, netns: NetnsCookie, slot: u32) -> ListenerKey {
    ListenerKey {
        netns,
        port: ctx.local_port(),
        family: ctx.family(),
        slot,
        _pad: 0,
    }
}

/// Several sockets may listen on one port (SO_REUSEPORT workers): each takes a free slot, so
/// one closing (its entry leaves with it) does not hide the others.
#[inline(always)]
fn record_listener(ctx: &SockOpsContext, netns: NetnsCookie) {
    let mut slot = 0;
    while slot < LISTENER_SLOTS {
        let mut key = listener_key(ctx, netns, slot);
        if LISTENERS
            .update(&mut key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64)
            .is_ok()
        {
            return;
        }
        slot += 1;
    }
    count(netns, counters::LISTENER_STORE_FAILED);
}

/// Publish the socket's original destination, left by the connect program in the task's slot
/// (or parked in `CONNECTING`), under its 4-tuple as its SYN goes out (`connecting`): before
/// sk_lookup runs for a TPROXY one, before the proxy's socket exists for a redirected one. Only
/// for a socket still going where its connect sent it ([`Handoff::still_going`]). From then its
/// state is watched, for its close. Without the task's slot (`task_handoff`), from
/// `CONNECTING`: a TPROXY record as the SYN goes out, a redirected one once established, before
/// its last ACK (so before the proxy's socket exists too).
#[inline(always)]
fn publish(ctx: &SockOpsContext, netns: NetnsCookie, connecting: bool) {
    let (handoff, sock) = if task_handoff() {
        let Some(handoff) = take(ctx::cookie(ctx)) else {
            return;
        };
        (handoff, sock_key(ctx, netns))
    } else {
        let sock = sock_key(ctx, netns);
        let Some(handoff) = take_connecting(ctx, &sock, connecting) else {
            return;
        };
        (handoff, sock)
    };
    if !handoff.still_going(&sock.remote, sock.remote_port) {
        return;
    }
    if ORIG_DST
        .insert(&ConnKey::of_client(&sock), &handoff.record, 0)
        .is_err()
    {
        let n = count(netns, counters::ORIG_DST_STORE_FAILED);
        if counters::worth_logging(n) {
            aya_log_ebpf::error!(
                ctx,
                "pod netns {}: original destination not stored (map full?): the proxy will \
                 see the capture port ({} on this CPU so far, logged at powers of two)",
                netns.get(),
                n
            );
        }
        return;
    }
    watch_state(ctx);
}

/// Socket `cookie`'s record: from its task's slot (emptied), else, once any was parked, from
/// `CONNECTING` (removed).
#[inline(always)]
fn take(cookie: u64) -> Option<Handoff> {
    let slot = handoff_slot(false);
    if !slot.is_null() && unsafe { (*slot).cookie } == cookie {
        unsafe { (*slot).cookie = 0 };
        return Some(unsafe { *slot });
    }
    if PARKED.get(0).copied().unwrap_or(0) == 0 {
        return None;
    }
    let parked: Handoff = *unsafe { CONNECTING.get(&cookie) }?;
    let _ = CONNECTING.remove(&cookie);
    Some(parked)
}

/// Without the task's slot: the socket's record from `CONNECTING` (removed), a TPROXY one
/// (its destination left alone) as the SYN goes out (`connecting`), a redirected one once
/// established. A redirect's peer is on loopback, a TPROXY record's never is (its peer is one of
/// the pod's own addresses): the other sockets (a proxy's upstream connections among them) skip
/// the lookup.
#[inline(always)]
fn take_connecting(ctx: &SockOpsContext, sock: &SockKey, connecting: bool) -> Option<Handoff> {
    if is_loopback(&sock.remote) == connecting {
        return None;
    }
    let cookie = ctx::cookie(ctx);
    let record: Handoff = *unsafe { CONNECTING.get(&cookie) }?;
    if connecting != record.left_alone() {
        return None;
    }
    let _ = CONNECTING.remove(&cookie);
    Some(record)
}

//! `sock_ops`: publish a redirected connection's original destination under its 4-tuple once
//! established, a TPROXY one as its SYN goes out (for SO_ORIGINAL_DST, getpeername and
//! sk_lookup), forget it on close; record listening sockets (where sk_lookup finds a pod's
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
    counters, is_loopback, v4_mapped, ConnKey, ListenerKey, NetnsCookie, OrigDst, PodFlags,
    SockKey, AF_INET, LISTENER_SLOTS,
};

use crate::{
    accel,
    ctx::{self, read_words},
    maps::{count, is_local, pod, CONNECTING, LISTENERS, ORIG_DST},
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

/// Publish the socket's original destination (its `CONNECTING` record, made by the connect
/// program) under its 4-tuple. A TPROXY record must be published before the SYN goes out
/// (`connecting`), for sk_lookup to see it; a redirected connection's once established, before
/// its last ACK, so before the proxy's socket exists. Watching the socket's state only from
/// then spares a callback per connection (the move to established).
#[inline(always)]
fn publish(ctx: &SockOpsContext, netns: NetnsCookie, connecting: bool) {
    // A redirect's peer is on loopback, a TPROXY record's never is (its peer is one of the
    // pod's own addresses, other than a loopback one): as the SYN goes out only a peer off
    // loopback can have a record to publish, once established only one on loopback. The
    // others (a proxy's upstream connections among them) skip the lookup.
    let sock = sock_key(ctx, netns);
    if is_loopback(&sock.remote) == connecting {
        return;
    }
    let cookie = ctx::cookie(ctx);
    let Some(record) = (unsafe { CONNECTING.get(&cookie) }) else {
        return;
    };
    let record: OrigDst = *record;
    if connecting && !record.is_tproxy() {
        return;
    }
    let _ = CONNECTING.remove(&cookie);
    if ORIG_DST
        .insert(&ConnKey::of_client(&sock), &record, 0)
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

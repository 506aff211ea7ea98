//! `cgroup/connect4`, `connect6` and (for DNS over unconnected UDP) `sendmsg4`, `sendmsg6`:
//! decide with [`sockmesh_common::decide`], rewrite a captured call to localhost at the capture
//! port, and keep the original destination: a TCP socket's in its task's `HANDOFF` slot until
//! sock_ops publishes it, a UDP socket's in its socket storage.

use core::ptr::{self, addr_of_mut};

use aya_ebpf::{helpers::generated::bpf_bind, macros::cgroup_sock_addr, programs::SockAddrContext};
use sockmesh_common::{
    counters, decide, is_loopback, is_unspecified, is_v4_mapped, local_origin, v4_mapped, Action,
    Addr, Conn, Handoff, NetnsCookie, OrigDst, PodConfig, PodFlags, Proto, Reason, SockOwner,
    Verdict, AF_INET, AF_INET6, V4_LOOPBACK, V6_LOOPBACK,
};

use crate::{
    ctx::{self, read_words, v4_word, write_words, SOCK_DGRAM, SOCK_STREAM},
    maps::{
        count, handoff_slot, is_local, pod, route_source, task_handoff, PodRules, CONNECTING,
        PARKED, SOCK_DST, SOCK_OWNER,
    },
    sock_create,
    timing::{self, Section},
};

#[cgroup_sock_addr(connect4)]
pub fn sockmesh_connect4(ctx: SockAddrContext) -> i32 {
    try_connect::<true, false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn sockmesh_connect6(ctx: SockAddrContext) -> i32 {
    try_connect::<true, true>(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sockmesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_connect::<false, false>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sockmesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_connect::<false, true>(&ctx)
}

/// Decide and redirect a connect() (`CONNECT`) or an unconnected UDP sendmsg(). Returns 1 to
/// let the call proceed (rewritten or not), 0 to refuse it with EPERM: only when a captured
/// call could not be recorded, so nothing escapes capture.
#[inline(always)]
fn try_connect<const CONNECT: bool, const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let begin = timing::lap(Section::Timer, timing::start());
    let sa = ctx.sock_addr;
    let netns = ctx::netns(ctx);
    let Some(cfg) = pod(netns) else {
        return 1;
    };
    timing::lap(Section::ConnectPod, begin);
    let proto = match unsafe { (*sa).type_ } {
        SOCK_STREAM => Proto::Tcp,
        // UDP is only ever captured for DNS.
        SOCK_DGRAM if cfg.has(PodFlags::DNS) => Proto::Udp,
        _ => return 1,
    };
    let conn = read_conn::<V6>(ctx, netns, proto);
    let rules = PodRules::of(netns, cfg);
    let t = timing::start();
    let verdict = decide(cfg, &rules, &conn);
    let t = timing::lap(Section::ConnectDecide, t);
    count(netns, verdict.reason() as u32);
    timing::lap(Section::ConnectCount, t);
    if verdict.action == Action::Pass {
        if CONNECT && local_origin(&rules, &conn) {
            let local_origin = Verdict::tproxy(0, Reason::LocalOrigin);
            let r = redirect::<CONNECT, V6>(ctx, cfg, &conn, &local_origin);
            timing::lap(Section::ConnectRedirected, begin);
            return r;
        }
        if CONNECT {
            forget(ctx, proto);
        }
        timing::lap(Section::ConnectPassed, begin);
        return 1;
    }
    let r = redirect::<CONNECT, V6>(ctx, cfg, &conn, &verdict);
    timing::lap(Section::ConnectRedirected, begin);
    r
}

/// A socket connected again must not keep an earlier capture's record: UDP can connect again,
/// and so can TCP after a connect() that failed before its SYN (its record still in its task's
/// slot, or in `CONNECTING` where the slot is not used; one parked there from the slot is
/// refused at publication, its socket not going to the capture port, see `sockops::publish`).
#[inline(always)]
fn forget(ctx: &SockAddrContext, proto: Proto) {
    match proto {
        Proto::Udp => {
            if !unsafe { SOCK_DST.get_ptr_mut(ctx) }.is_null() {
                let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
                let _ = unsafe { SOCK_DST.delete(sk) };
            }
        }
        Proto::Tcp if task_handoff() => {
            let slot = handoff_slot(false);
            if !slot.is_null() && unsafe { (*slot).cookie } == ctx::cookie(ctx) {
                unsafe { (*slot).cookie = 0 };
            }
        }
        Proto::Tcp => {
            let cookie = ctx::cookie(ctx);
            if unsafe { CONNECTING.get(&cookie) }.is_some() {
                let _ = CONNECTING.remove(&cookie);
            }
        }
    }
}

/// The `proto` connection the context describes: destination (0.0.0.0 / :: read as
/// localhost), bound source, port, the socket owner's credentials, and whether the destination
/// is local. A BPF subprogram (not inlined) to keep the caller's stack frame small; it writes
/// every field, so the caller zeroes nothing first.
#[inline(never)]
fn read_conn<const V6: bool>(ctx: &SockAddrContext, netns: NetnsCookie, proto: Proto) -> Conn {
    let v6 = V6;
    let sa = ctx.sock_addr;
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    let (mut dst, src) = if v6 {
        unsafe { (read_words!(sa, user_ip6), read_words!(sk, src_ip6)) }
    } else {
        (
            v4_mapped(unsafe { (*sa).user_ip4 }.to_ne_bytes()),
            v4_mapped(unsafe { (*sk).src_ip4 }.to_ne_bytes()),
        )
    };
    if is_unspecified(&dst) {
        dst = if v6 && !is_v4_mapped(&dst) {
            V6_LOOPBACK
        } else {
            v4_mapped(V4_LOOPBACK)
        };
    }
    // The socket's creator, as iptables' owner match: read from the socket, else as
    // `sock_create` recorded it, else (a socket created before the pod was registered) the
    // current task.
    let t = timing::start();
    let mut owner = SockOwner { uid: 0, gid: 0 };
    if !sock_create::creator(sk, &mut owner) {
        let stored = unsafe { SOCK_OWNER.get_ptr_mut(ctx) };
        owner = if stored.is_null() {
            sock_create::current_task()
        } else {
            unsafe { *stored }
        };
    }
    let t = timing::lap(Section::ConnectCreator, t);
    let dst_is_local = is_local(netns, &dst);
    timing::lap(Section::ConnectLocal, t);
    Conn {
        proto,
        dst,
        dport: u16::from_be(unsafe { (*sa).user_port } as u16),
        src,
        uid: owner.uid,
        gid: owner.gid,
        dst_is_local,
        mark: unsafe { (*sk).mark },
    }
}

/// Record the original destination and rewrite the call to localhost at the verdict's port;
/// for connect(), also bind the source (see [`set_source`]). Returns the program's verdict.
#[inline(never)]
fn redirect<const CONNECT: bool, const V6: bool>(
    ctx: &SockAddrContext,
    cfg: &PodConfig,
    conn: &Conn,
    verdict: &Verdict,
) -> i32 {
    let rewrite = match verdict.action {
        Action::Redirect => true,
        // TPROXY: remembered (sock_ops publishes it for sk_lookup), destination left alone.
        Action::Tproxy => false,
        Action::Pass | Action::Refuse => return 1,
    };
    let v4_dst = is_v4_mapped(&conn.dst);
    let mut record = OrigDst {
        addr: conn.dst,
        port: conn.dport,
        family: if v4_dst { AF_INET } else { AF_INET6 },
        reason: verdict.reason as u32,
    };
    let t = timing::start();
    let target_port = if rewrite { verdict.port } else { 0 };
    let stored = store(ctx, conn.proto, &mut record, target_port);
    timing::lap(Section::ConnectRecord, t);
    if !stored {
        count(ctx::netns(ctx), counters::ORIG_DST_STORE_FAILED);
        return 0;
    }
    if !rewrite {
        return 1;
    }
    set_source::<CONNECT, V6>(ctx, cfg, conn);
    let target = if v4_dst {
        v4_mapped(V4_LOOPBACK)
    } else {
        V6_LOOPBACK
    };
    ctx::write_user_addr(ctx, &target, verdict.port, V6);
    1
}

/// Keep a redirected socket's original destination: a TCP socket's in its task's `HANDOFF`
/// slot until sock_ops publishes it under the 4-tuple (`target_port`: where the connect was
/// rewritten to), a UDP socket's for its life. False if it could not be kept.
#[inline(always)]
fn store(ctx: &SockAddrContext, proto: Proto, record: &mut OrigDst, target_port: u16) -> bool {
    match proto {
        Proto::Tcp => {
            let handoff = Handoff {
                cookie: ctx::cookie(ctx),
                record: *record,
                target_port,
                _pad: 0,
            };
            if task_handoff() {
                hand_off(&handoff)
            } else {
                CONNECTING.insert(&handoff.cookie, &handoff, 0).is_ok()
            }
        }
        Proto::Udp => {
            let stored = unsafe { SOCK_DST.get_or_insert_ptr_mut(ctx, Some(record)) };
            if stored.is_null() {
                return false;
            }
            unsafe { *stored = *record };
            true
        }
    }
}

/// Leave a socket's record in its task's slot for `TCP_CONNECT_CB`, which runs later in the
/// same connect(). A record the slot still holds for another socket was not taken (its connect
/// stopped before the SYN): it is parked in `CONNECTING` first.
#[inline(always)]
fn hand_off(handoff: &Handoff) -> bool {
    let slot = handoff_slot(true);
    if slot.is_null() {
        return false;
    }
    let slot = unsafe { &mut *slot };
    if slot.cookie != 0 && slot.cookie != handoff.cookie {
        if CONNECTING.insert(&slot.cookie, &*slot, 0).is_err() {
            return false;
        }
        if let Some(parked) = PARKED.get_ptr_mut(0) {
            if unsafe { *parked } == 0 {
                unsafe { *parked = 1 };
            }
        }
    }
    *slot = *handoff;
    true
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: Addr,
    scope_id: u32,
}

/// The source address the kernel would have chosen for the original destination of an unbound
/// socket: the destination itself for the pod's own address, the pod's primary address for a
/// remote one, nothing (the default is right) for localhost or a bound socket.
#[inline(always)]
fn natural_source(netns: NetnsCookie, cfg: &PodConfig, conn: &Conn) -> Option<Addr> {
    if !is_unspecified(&conn.src) {
        return None;
    }
    if conn.dst_is_local {
        return (!is_loopback(&conn.dst)).then_some(conn.dst);
    }
    // The route's source address, else the pod's primary address.
    if let Some(src) = route_source(netns, &conn.dst) {
        return Some(src);
    }
    if is_v4_mapped(&conn.dst) {
        (cfg.src_v4 != [0, 0, 0, 0]).then(|| v4_mapped(cfg.src_v4))
    } else {
        (!ctx::is_zero(&cfg.src_v6)).then_some(cfg.src_v6)
    }
}

/// Give a redirected call the source address it would have had without capture, so the proxy
/// sees the peer it sees after iptables' REDIRECT (the pod's address, not 127.0.0.1): bind the
/// socket (connect, with `bpf_bind`, port 0) or set the datagram's source (sendmsg). A failure
/// leaves the call as it was.
#[inline(never)]
fn set_source<const CONNECT: bool, const V6: bool>(
    ctx: &SockAddrContext,
    cfg: &PodConfig,
    conn: &Conn,
) {
    let t = timing::start();
    let source = natural_source(ctx::netns(ctx), cfg, conn);
    let t = timing::lap(Section::ConnectSource, t);
    let Some(source) = source else {
        return;
    };
    let sa = ctx.sock_addr;
    unsafe {
        if !CONNECT {
            if V6 {
                write_words!(sa, msg_src_ip6, &source);
            } else {
                ptr::write_volatile(addr_of_mut!((*sa).msg_src_ip4), v4_word(&source));
            }
        } else if V6 {
            let mut sa = SockaddrIn6 {
                family: AF_INET6,
                port: 0,
                flowinfo: 0,
                addr: source,
                scope_id: 0,
            };
            bpf_bind(
                ctx.sock_addr,
                ptr::from_mut(&mut sa).cast(),
                core::mem::size_of::<SockaddrIn6>() as i32,
            );
        } else {
            let mut sa = SockaddrIn {
                family: AF_INET,
                port: 0,
                addr: [source[12], source[13], source[14], source[15]],
                zero: [0; 8],
            };
            bpf_bind(
                ctx.sock_addr,
                ptr::from_mut(&mut sa).cast(),
                core::mem::size_of::<SockaddrIn>() as i32,
            );
        }
    }
    timing::lap(Section::ConnectBind, t);
}

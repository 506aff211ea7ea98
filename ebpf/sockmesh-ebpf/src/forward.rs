//! tc ingress (`clsact`) on a pod's `-k` interfaces: a new TCP connection forwarded *through*
//! the pod (a VM behind the interface calling a remote address) goes to the pod's outbound
//! listener when [`sockmesh_common::decide_forwarded`] says so, as istio's nat PREROUTING
//! `-i IF [-d CIDR] -j ISTIO_REDIRECT` does. No packet is rewritten: the packet is assigned to
//! the listener (`bpf_sk_assign`), or to the connection's established socket, and marked
//! [`FORWARD_MARK`] so the agent's policy route delivers it locally instead of forwarding it.
//! The proxy's accepted socket has the original destination as its local address, which is
//! what its `SO_ORIGINAL_DST` answers (see `getsockopt`).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_sock, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    programs::TcContext,
};
use sockmesh_common::{
    decide_forwarded, forward_key, v4_mapped, Action, Addr, Arrival, FORWARD_MARK,
};

use crate::maps::{count, pod, PodRules, ADDR_POD};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
const BPF_TCP_LISTEN: u32 = 10;
/// `BPF_F_CURRENT_NETNS`: look sockets up in the netns of the packet's device (the pod's).
const CURRENT_NETNS: u64 = u64::MAX;

/// `struct bpf_sock_tuple`'s IPv4 half: addresses and ports in network order.
#[repr(C)]
struct Tuple4 {
    saddr: [u8; 4],
    daddr: [u8; 4],
    sport: [u8; 2],
    dport: [u8; 2],
}

/// `struct bpf_sock_tuple`'s IPv6 half.
#[repr(C)]
struct Tuple6 {
    saddr: Addr,
    daddr: Addr,
    sport: [u8; 2],
    dport: [u8; 2],
}

#[classifier]
pub fn sockmesh_forward(ctx: TcContext) -> i32 {
    try_forward(&ctx).unwrap_or(TC_ACT_OK as i32)
}

/// A TCP segment's addresses, ports and flags, with the tuple the socket lookups take.
struct Segment {
    src: Addr,
    dst: Addr,
    sport: [u8; 2],
    dport: [u8; 2],
    flags: u8,
    v4: bool,
}

#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Segment, i64> {
    let proto = u16::from_be(ctx.load::<u16>(12)?);
    let (src, dst, l4, v4) = if proto == ETH_P_IP {
        let vihl: u8 = ctx.load(ETH_HLEN)?;
        if ctx.load::<u8>(ETH_HLEN + 9)? != IPPROTO_TCP {
            return Err(0);
        }
        // Fragments other than the first carry no TCP header.
        if u16::from_be(ctx.load::<u16>(ETH_HLEN + 6)?) & 0x1fff != 0 {
            return Err(0);
        }
        let s: [u8; 4] = ctx.load(ETH_HLEN + 12)?;
        let d: [u8; 4] = ctx.load(ETH_HLEN + 16)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Err(0);
        }
        (v4_mapped(s), v4_mapped(d), ETH_HLEN + ihl, true)
    } else if proto == ETH_P_IPV6 {
        // Extension headers before TCP are not followed: such a segment is left alone.
        if ctx.load::<u8>(ETH_HLEN + 6)? != IPPROTO_TCP {
            return Err(0);
        }
        let s: Addr = ctx.load(ETH_HLEN + 8)?;
        let d: Addr = ctx.load(ETH_HLEN + 24)?;
        (s, d, ETH_HLEN + 40, false)
    } else {
        return Err(0);
    };
    Ok(Segment {
        src,
        dst,
        sport: ctx.load(l4)?,
        dport: ctx.load(l4 + 2)?,
        flags: ctx.load(l4 + 13)?,
        v4,
    })
}

/// Look up a TCP socket (established, request, time-wait or listening) for `src` → `dst` in
/// the pod's netns.
#[inline(always)]
fn lookup(ctx: &TcContext, seg: &Segment, dst: &Addr, dport: [u8; 2]) -> *mut bpf_sock {
    let skb = ctx.skb.skb as *mut c_void;
    unsafe {
        if seg.v4 {
            let mut t = Tuple4 {
                saddr: [seg.src[12], seg.src[13], seg.src[14], seg.src[15]],
                daddr: [dst[12], dst[13], dst[14], dst[15]],
                sport: seg.sport,
                dport,
            };
            bpf_skc_lookup_tcp(
                skb,
                (&mut t as *mut Tuple4).cast(),
                core::mem::size_of::<Tuple4>() as u32,
                CURRENT_NETNS,
                0,
            )
        } else {
            let mut t = Tuple6 {
                saddr: seg.src,
                daddr: *dst,
                sport: seg.sport,
                dport,
            };
            bpf_skc_lookup_tcp(
                skb,
                (&mut t as *mut Tuple6).cast(),
                core::mem::size_of::<Tuple6>() as u32,
                CURRENT_NETNS,
                0,
            )
        }
    }
}

/// Hand the packet to `sk` and mark it for local delivery; releases `sk`.
#[inline(always)]
fn assign(ctx: &TcContext, sk: *mut bpf_sock) -> i64 {
    let ret = unsafe { bpf_sk_assign(ctx.skb.skb as *mut c_void, sk.cast(), 0) };
    unsafe { bpf_sk_release(sk.cast()) };
    if ret == 0 {
        ctx.set_mark(FORWARD_MARK);
    }
    ret
}

#[inline(always)]
fn try_forward(ctx: &TcContext) -> Result<i32, i64> {
    // tc's netns cookie is that of the packet's socket, and a forwarded packet has none: the
    // pod is found by the interface (its index and MAC address, the frame's destination).
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mac: [u8; 6] = ctx.load(0)?;
    let Some(&netns) = (unsafe { ADDR_POD.get(&forward_key(ifindex, mac)) }) else {
        return Ok(TC_ACT_OK as i32);
    };
    let Some(cfg) = pod(netns) else {
        return Ok(TC_ACT_OK as i32);
    };
    let seg = parse(ctx)?;
    // For one of the pod's own addresses: sk_lookup's business.
    if unsafe { ADDR_POD.get(&seg.dst) }.is_some() {
        return Ok(TC_ACT_OK as i32);
    }
    // A connection already handed to the proxy: its socket (request or established) has the
    // original destination as its local address.
    let sk = lookup(ctx, &seg, &seg.dst, seg.dport);
    if !sk.is_null() {
        if unsafe { (*sk).state } != BPF_TCP_LISTEN {
            assign(ctx, sk);
            return Ok(TC_ACT_OK as i32);
        }
        // A listener of the pod on the destination port (a wildcard one): not this flow's.
        unsafe { bpf_sk_release(sk.cast()) };
    }
    // Only a new connection is decided; the rest of a flow left alone is forwarded.
    if seg.flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        return Ok(TC_ACT_OK as i32);
    }
    let arrival = Arrival {
        src: seg.src,
        sport: u16::from_be_bytes(seg.sport),
        dst: seg.dst,
        dport: u16::from_be_bytes(seg.dport),
        ifindex,
    };
    let Some(verdict) = decide_forwarded(cfg, &PodRules { netns }, &arrival) else {
        return Ok(TC_ACT_OK as i32);
    };
    if verdict.action == Action::Pass {
        count(netns, verdict.reason as u32);
        return Ok(TC_ACT_OK as i32);
    }
    // The pod's listener on the capture port, bound to the wildcard or loopback address.
    let mut lo: Addr = [0; 16];
    if seg.v4 {
        lo = v4_mapped([127, 0, 0, 1]);
    } else {
        lo[15] = 1;
    }
    let sk = lookup(ctx, &seg, &lo, verdict.port.to_be_bytes());
    if !sk.is_null() {
        if unsafe { (*sk).state } == BPF_TCP_LISTEN {
            if assign(ctx, sk) == 0 {
                count(netns, verdict.reason as u32);
                return Ok(TC_ACT_OK as i32);
            }
        } else {
            unsafe { bpf_sk_release(sk.cast()) };
        }
    }
    // No proxy listens: dropped, never forwarded around it (nor delivered to a local socket).
    let refused = sockmesh_common::Verdict::no_listener(verdict.port);
    count(netns, refused.reason as u32);
    Ok(TC_ACT_SHOT as i32)
}

//! tc (tcx) on a pod's `-k` interfaces: a new TCP connection forwarded *through* the pod (a VM
//! behind the interface calling a remote address) goes to the pod's proxy when
//! [`sockmesh_common::decide_forwarded`] says so, as istio's nat PREROUTING
//! `-i IF [-d CIDR] -j ISTIO_REDIRECT` (or, in TPROXY mode, mangle's ISTIO_INBOUND first) does,
//! and the way REDIRECT does it: the ingress program rewrites the destination to the pod's
//! address on that interface (the source address of the pod's route back to the VM) and the
//! capture port; the egress program rewrites the answers' source back to the original
//! destination. Any listener gets such a connection, as under iptables.
//!
//! The flow's record is the `ORIG_DST` entry under the proxy's view of it (client the VM,
//! server the pod's address and capture port): it is what SO_ORIGINAL_DST answers and what
//! both programs translate by. Its client is not one of the pod's addresses, so it is never
//! another record's key. It leaves when the proxy's socket closes (see `sockops`), or with the
//! pod's RST (no listener).

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::bpf_csum_diff,
    macros::classifier,
    programs::TcContext,
};
use sockmesh_common::{
    counters, decide_forwarded, forward_key, v4_mapped, Action, Addr, Arrival, ConnKey, OrigDst,
    PodFlags, AF_INET, AF_INET6,
};

use crate::maps::{count, pod, route_source, PodRules, ADDR_POD, ORIG_DST};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_RST: u8 = 0x04;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Offsets in the IPv4 header: checksum, source, destination.
const IP4_CSUM: usize = ETH_HLEN + 10;
const IP4_SRC: usize = ETH_HLEN + 12;
const IP4_DST: usize = ETH_HLEN + 16;
/// Offsets in the IPv6 header: source, destination.
const IP6_SRC: usize = ETH_HLEN + 8;
const IP6_DST: usize = ETH_HLEN + 24;
/// Offset of the checksum in the TCP header.
const TCP_CSUM: usize = 16;
const OK: i32 = TC_ACT_OK as i32;
const SHOT: i32 = TC_ACT_SHOT as i32;

/// From the VM: a new connection is decided and, when captured, rewritten to the proxy.
#[classifier]
pub fn sockmesh_forward(ctx: TcContext) -> i32 {
    try_ingress(&ctx).unwrap_or(OK)
}

/// To the VM: the proxy's answers on a captured connection leave from the original destination.
#[classifier]
pub fn sockmesh_forward_egress(ctx: TcContext) -> i32 {
    try_egress(&ctx).unwrap_or(OK)
}

/// A TCP segment's addresses, ports and flags, and where its TCP header starts.
struct Segment {
    src: Addr,
    dst: Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    l4: usize,
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
        let s: [u8; 4] = ctx.load(IP4_SRC)?;
        let d: [u8; 4] = ctx.load(IP4_DST)?;
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
        let s: Addr = ctx.load(IP6_SRC)?;
        let d: Addr = ctx.load(IP6_DST)?;
        (s, d, ETH_HLEN + 40, false)
    } else {
        return Err(0);
    };
    Ok(Segment {
        src,
        dst,
        sport: u16::from_be(ctx.load(l4)?),
        dport: u16::from_be(ctx.load(l4 + 2)?),
        flags: ctx.load(l4 + 13)?,
        l4,
        v4,
    })
}

/// Which end of the segment a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Source,
    Destination,
}

/// Replace one end's address and port with `addr`, `port`, keeping the IPv4 and TCP checksums
/// right (the TCP one covers the addresses through its pseudo-header).
#[inline(always)]
fn rewrite(ctx: &TcContext, seg: &Segment, end: End, addr: &Addr, port: u16) -> Result<(), i64> {
    let src = end == End::Source;
    let (old_addr, old_port) = if src {
        (&seg.src, seg.sport)
    } else {
        (&seg.dst, seg.dport)
    };
    let csum = seg.l4 + TCP_CSUM;
    if seg.v4 {
        let old = u32::from_ne_bytes([old_addr[12], old_addr[13], old_addr[14], old_addr[15]]);
        let new = [addr[12], addr[13], addr[14], addr[15]];
        let new_word = u32::from_ne_bytes(new);
        ctx.l3_csum_replace(IP4_CSUM, old as u64, new_word as u64, 4)?;
        ctx.l4_csum_replace(
            csum,
            old as u64,
            new_word as u64,
            BPF_F_PSEUDO_HDR as u64 | 4,
        )?;
        ctx.store(if src { IP4_SRC } else { IP4_DST }, &new, 0)?;
    } else {
        let mut from = *old_addr;
        let mut to = *addr;
        let diff =
            unsafe { bpf_csum_diff(from.as_mut_ptr().cast(), 16, to.as_mut_ptr().cast(), 16, 0) };
        if diff < 0 {
            return Err(diff);
        }
        ctx.l4_csum_replace(csum, 0, diff as u64, BPF_F_PSEUDO_HDR as u64)?;
        ctx.store(if src { IP6_SRC } else { IP6_DST }, addr, 0)?;
    }
    let (old, new) = (old_port.to_be_bytes(), port.to_be_bytes());
    ctx.l4_csum_replace(
        csum,
        u16::from_ne_bytes(old) as u64,
        u16::from_ne_bytes(new) as u64,
        2,
    )?;
    ctx.store(seg.l4 + if src { 0 } else { 2 }, &new, 0)?;
    Ok(())
}

#[inline(always)]
fn try_ingress(ctx: &TcContext) -> Result<i32, i64> {
    // tc's netns cookie is that of the packet's socket, and a forwarded packet has none: the
    // pod is found by the interface (its index and MAC address, the frame's destination).
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mac: [u8; 6] = ctx.load(0)?;
    let Some(&netns) = (unsafe { ADDR_POD.get(&forward_key(ifindex, mac)) }) else {
        return Ok(OK);
    };
    let Some(cfg) = pod(netns) else {
        return Ok(OK);
    };
    let seg = parse(ctx)?;
    // For one of the pod's own addresses: sk_lookup's business.
    if unsafe { ADDR_POD.get(&seg.dst) }.is_some() {
        return Ok(OK);
    }
    // REDIRECT's new destination: the pod's address toward the VM.
    // (No flow of the VM's was captured without it.)
    let local = route_source(netns, &seg.src);
    let key = |server, port| ConnKey {
        netns,
        client: seg.src,
        server,
        client_port: seg.sport,
        server_port: port,
        _pad: 0,
    };
    if seg.flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        // The rest of a captured flow follows its first segment to the same port; the rest of
        // any other flow is forwarded.
        let Some(local) = local else {
            return Ok(OK);
        };
        let mut port = cfg.outbound_port;
        let mut record = unsafe { ORIG_DST.get(&key(local, port)) };
        if record.is_none() && cfg.has(PodFlags::TPROXY) {
            port = cfg.inbound_port;
            record = unsafe { ORIG_DST.get(&key(local, port)) };
        }
        if let Some(o) = record {
            if o.addr == seg.dst && o.port == seg.dport {
                rewrite(ctx, &seg, End::Destination, &local, port)?;
            }
        }
        return Ok(OK);
    }
    let arrival = Arrival {
        src: seg.src,
        sport: seg.sport,
        dst: seg.dst,
        dport: seg.dport,
        ifindex,
    };
    let Some(verdict) = decide_forwarded(cfg, &PodRules::of(netns, cfg), &arrival) else {
        return Ok(OK);
    };
    count(netns, verdict.reason as u32);
    if verdict.action == Action::Pass {
        // A record of an earlier flow with the same client port must not catch this one.
        if let Some(local) = local {
            let _ = ORIG_DST.remove(&key(local, cfg.outbound_port));
            if cfg.has(PodFlags::TPROXY) {
                let _ = ORIG_DST.remove(&key(local, cfg.inbound_port));
            }
        }
        return Ok(OK);
    }
    // REDIRECT drops what arrives on an interface without an address of its family.
    let Some(local) = local else {
        count(netns, counters::FORWARD_NO_ADDRESS);
        return Ok(SHOT);
    };
    let record = OrigDst {
        addr: seg.dst,
        port: seg.dport,
        family: if seg.v4 { AF_INET } else { AF_INET6 },
        reason: verdict.reason as u32,
    };
    // Without its record the connection could not be translated: never forwarded around
    // the proxy.
    if ORIG_DST
        .insert(&key(local, verdict.port), &record, 0)
        .is_err()
    {
        count(netns, counters::ORIG_DST_STORE_FAILED);
        return Ok(SHOT);
    }
    rewrite(ctx, &seg, End::Destination, &local, verdict.port)?;
    Ok(OK)
}

#[inline(always)]
fn try_egress(ctx: &TcContext) -> Result<i32, i64> {
    // The pod's interface is the frame's source.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let mac: [u8; 6] = ctx.load(6)?;
    let Some(&netns) = (unsafe { ADDR_POD.get(&forward_key(ifindex, mac)) }) else {
        return Ok(OK);
    };
    let Some(cfg) = pod(netns) else {
        return Ok(OK);
    };
    let seg = parse(ctx)?;
    if seg.sport != cfg.outbound_port && seg.sport != cfg.inbound_port {
        return Ok(OK);
    }
    let key = ConnKey {
        netns,
        client: seg.dst,
        server: seg.src,
        client_port: seg.dport,
        server_port: seg.sport,
        _pad: 0,
    };
    if let Some(o) = unsafe { ORIG_DST.get(&key) } {
        let (addr, port) = (o.addr, o.port);
        rewrite(ctx, &seg, End::Source, &addr, port)?;
        // The pod refused it (no listener) or the proxy reset it: no socket will close to
        // take the record away.
        if seg.flags & TCP_RST != 0 {
            let _ = ORIG_DST.remove(&key);
        }
    }
    Ok(OK)
}

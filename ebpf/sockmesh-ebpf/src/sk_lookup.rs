//! `sk_lookup` (attached per pod netns): steer a new inbound TCP connection to the pod's
//! proxy, as [`sockmesh_common::decide_arrival`] says, without rewriting a packet.

use core::ptr;

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use sockmesh_common::{
    counters, decide_arrival, is_loopback, is_v4_mapped, listener_families, v4_mapped, Action,
    Addr, Arrival, ListenerKey, NetnsCookie, Verdict, AF_INET, LISTENER_SLOTS,
};

use crate::{
    ctx::{read_words, IPPROTO_TCP},
    maps::{count, pod, PodRules, ADDR_POD, LISTENERS},
};

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

#[sk_lookup]
pub fn sockmesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    let (protocol, family, ifindex, port) = unsafe {
        (
            ptr::read_volatile(&(*l).protocol),
            ptr::read_volatile(&(*l).family),
            ptr::read_volatile(&(*l).ingress_ifindex),
            ptr::read_volatile(&(*l).local_port),
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let v4 = family == AF_INET as u32;
    let local: Addr = if v4 {
        v4_mapped(unsafe { ptr::read_volatile(&(*l).local_ip4) }.to_ne_bytes())
    } else {
        unsafe { read_words!(l, local_ip6) }
    };
    // Loopback is every pod's own and never a pod address (the agent registers routable ones
    // only): a local connection, a redirected one to the capture port among them, needs no
    // lookup.
    if is_loopback(&local) {
        return SK_PASS;
    }
    let Some(&netns) = (unsafe { ADDR_POD.get(&local) }) else {
        return SK_PASS;
    };
    let Some(cfg) = pod(netns) else {
        return SK_PASS;
    };
    let remote = if v4 {
        v4_mapped(unsafe { ptr::read_volatile(&(*l).remote_ip4) }.to_ne_bytes())
    } else {
        unsafe { read_words!(l, remote_ip6) }
    };
    let arrival = Arrival {
        src: remote,
        sport: u16::from_be(unsafe { ptr::read_volatile(&(*l).remote_port) }),
        dst: local,
        dport: port as u16,
        ifindex,
    };
    let Some(verdict) = decide_arrival(cfg, &PodRules::of(netns, cfg), &arrival) else {
        return SK_PASS;
    };
    if verdict.action == Action::Pass {
        count(netns, verdict.reason as u32);
        return SK_PASS;
    }
    steer(ctx, netns, &verdict, is_v4_mapped(&local))
}

/// Hand the connection to the pod's listener on the verdict's port, or refuse it if there is
/// none ([`Verdict::no_listener`]).
#[inline(always)]
fn steer(ctx: &SkLookupContext, netns: NetnsCookie, verdict: &Verdict, v4: bool) -> u32 {
    let port = verdict.port;
    let families = listener_families(v4);
    let mut f = 0;
    while f < 2 {
        let mut slot = 0;
        while slot < LISTENER_SLOTS {
            let key = ListenerKey {
                netns,
                port: port as u32,
                family: families[f],
                slot,
                _pad: 0,
            };
            if LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok() {
                count(netns, verdict.reason as u32);
                return SK_PASS;
            }
            slot += 1;
        }
        f += 1;
    }
    let refused = Verdict::no_listener(port);
    let n = count(netns, refused.reason as u32);
    if counters::worth_logging(n) {
        aya_log_ebpf::warn!(
            ctx,
            "pod netns {}: inbound connection refused: no listener on capture port {} ({} on \
             this CPU so far, logged at powers of two)",
            netns.get(),
            port,
            n
        );
    }
    SK_DROP
}

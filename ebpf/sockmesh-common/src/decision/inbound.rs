//! The inbound decision: what happens to a new TCP connection to one of the pod's addresses.
//! istio's PREROUTING rules (`-k`, `-c`, `ISTIO_INBOUND`) or linkerd's `PROXY_INIT_REDIRECT`
//! for connections from outside; the outbound rules' records for those made inside.

use super::{is_local, Arrival, Lookups, Reason, Rules, Verdict, LOOPBACK_IFINDEX};
use crate::{
    addr::is_v4_mapped,
    pod::{CidrKind, MemberKind, PodConfig, PodFlags},
};

/// What sk_lookup does with a new TCP connection `a` to one of the pod's addresses: `None`
/// when it is not inbound traffic (made inside the pod, so the outbound rules decided it when
/// it connected, and it is left alone uncounted); else the verdict, whose redirect becomes
/// [`Verdict::no_listener`] when no proxy listens on its port.
///
/// Made inside the pod: it arrives on lo, or from one of the pod's own addresses (the kernel
/// may report another ingress for those). Only a TPROXY-mode call that the outbound rules
/// marked for the inbound listener is steered to it. A connection the pod made from a
/// transparent source ([`super::local_origin`]) is local traffic too, whatever it looks like
/// here; a connection forwarded from a `-k` interface arrives here already translated to its
/// proxy port by tc ingress ([`decide_forwarded`]), with its record, and is left alone too.
#[inline(always)]
pub fn decide_arrival<L: Lookups>(cfg: &PodConfig, lookups: &L, a: &Arrival) -> Option<Verdict> {
    if a.ifindex == LOOPBACK_IFINDEX || is_local(lookups, &a.src) {
        return match lookups.recorded(a) {
            Some(Reason::TproxyToLocal) => {
                Some(Verdict::redirect(cfg.inbound_port, Reason::TproxyToLocal))
            }
            _ => None,
        };
    }
    // From outside, a record is the pod's own transparent call ([`Reason::LocalOrigin`]) or a
    // connection forwarded from a `-k` interface that tc ingress already sent to its proxy
    // port: either way decided.
    if lookups.recorded(a).is_some() {
        return None;
    }
    Some(decide_inbound(cfg, lookups, a))
}

/// What tc ingress on a `-k` interface does with a new TCP connection `a` forwarded *through*
/// the pod (its destination is not one of the pod's addresses, e.g. a VM behind the interface
/// calling a remote address): istio's `PREROUTING -i IF [-d CIDR] -j ISTIO_REDIRECT`, the same
/// `-k` rules as [`decide_inbound`]. `None` when `a` did not arrive on a `-k` interface, or the
/// pod has no rules for its family: the connection is forwarded untouched, uncounted.
#[inline(always)]
pub fn decide_forwarded<R: Rules>(cfg: &PodConfig, rules: &R, a: &Arrival) -> Option<Verdict> {
    if !cfg.has(PodFlags::KUBE_VIRT) || !rules.member(MemberKind::KubeVirtIfindex, a.ifindex) {
        return None;
    }
    if !is_v4_mapped(&a.dst) && !cfg.has(PodFlags::IPV6) {
        return None;
    }
    Some(decide_inbound(cfg, rules, a))
}

/// Decide what the pod's PREROUTING rules (istio's `-k` and `-c` rules and `ISTIO_INBOUND`,
/// or linkerd's `PROXY_INIT_REDIRECT`) would do with a new TCP connection.
///
/// `-k` rules are inserted first in nat PREROUTING: traffic entering there is outbound
/// traffic. In istio's TPROXY mode, mangle PREROUTING (`ISTIO_INBOUND`) sees the connection
/// before nat does, and a listener its TPROXY picked keeps the connection whatever nat does
/// next: there, a `-k` arrival that ISTIO_INBOUND takes goes to the inbound port, and only
/// one it returns meets the `-k` rule.
#[inline(always)]
pub fn decide_inbound<R: Rules>(cfg: &PodConfig, rules: &R, a: &Arrival) -> Verdict {
    if !is_v4_mapped(&a.src) && !cfg.has(PodFlags::IPV6) {
        return Verdict::pass(Reason::NoIpv6Rules);
    }
    if !cfg.has(PodFlags::KUBE_VIRT) || !rules.member(MemberKind::KubeVirtIfindex, a.ifindex) {
        return istio_or_linkerd_inbound(cfg, rules, a);
    }
    if cfg.has(PodFlags::TPROXY) {
        let mangle = istio_or_linkerd_inbound(cfg, rules, a);
        if mangle.action != super::Action::Pass {
            return mangle;
        }
    }
    let include = if is_v4_mapped(&a.src) {
        CidrKind::IncludeV4
    } else {
        CidrKind::IncludeV6
    };
    if cfg.has(PodFlags::OUTBOUND_ALL) || rules.cidr(include, &a.dst) {
        Verdict::redirect(cfg.outbound_port, Reason::KubeVirtRedirect)
    } else {
        Verdict::pass(Reason::KubeVirtReturn)
    }
}

/// [`decide_inbound`] past the `-k` rules.
#[inline(always)]
fn istio_or_linkerd_inbound<R: Rules>(cfg: &PodConfig, rules: &R, a: &Arrival) -> Verdict {
    let src = &a.src;
    let dport = a.dport;
    let v4 = is_v4_mapped(src);
    let redirect = |reason| Verdict::redirect(cfg.inbound_port, reason);
    // -c: appended to PREROUTING before the ISTIO_INBOUND jump.
    if cfg.has(PodFlags::EXCLUDE_IFACES) && rules.member(MemberKind::ExcludedIfindex, a.ifindex) {
        return Verdict::pass(Reason::InterfaceExcluded);
    }
    if cfg.has(PodFlags::LINKERD) {
        if rules.port_range(CidrKind::InboundIgnorePorts, dport) {
            return Verdict::pass(Reason::InboundPortExcluded);
        }
        let subnets = if v4 {
            CidrKind::IgnoreSubnetV4
        } else {
            CidrKind::IgnoreSubnetV6
        };
        if rules.cidr(subnets, src) {
            return Verdict::pass(Reason::InboundSubnetIgnored);
        }
        if !cfg.has(PodFlags::INBOUND_LIST) {
            return redirect(Reason::InboundCaptureAll);
        }
        return if rules.port_range(CidrKind::RedirectPorts, dport) {
            redirect(Reason::InboundPortIncluded)
        } else {
            Verdict::pass(Reason::InboundPortNotListed)
        };
    }
    // TPROXY mode has no nat ISTIO_INBOUND jump, so the tunnel port is not exempt.
    let tunnel = !cfg.has(PodFlags::TPROXY) && dport == cfg.tunnel_port;
    if cfg.has(PodFlags::INBOUND_ALL) {
        if tunnel {
            Verdict::pass(Reason::InboundTunnelPort)
        } else if rules.member(MemberKind::InboundExcludePort, dport as u32) {
            Verdict::pass(Reason::InboundPortExcluded)
        } else {
            redirect(Reason::InboundCaptureAll)
        }
    } else if cfg.has(PodFlags::INBOUND_LIST) {
        if tunnel {
            Verdict::pass(Reason::InboundTunnelPort)
        } else if rules.member(MemberKind::InboundPort, dport as u32) {
            redirect(Reason::InboundPortIncluded)
        } else {
            Verdict::pass(Reason::InboundPortNotListed)
        }
    } else {
        Verdict::pass(Reason::InboundOff)
    }
}

//! The decisions against the reference rules (docs/design.md), case by case.
extern crate std;
use std::vec::Vec;

use super::*;
use crate::{
    addr::{is_v4_mapped, v4_mapped, v4_octets, Addr, V6_LOOPBACK},
    pod::{CidrKind, MemberKind, PodConfig, PodFlags},
};

#[derive(Default)]
struct Sets {
    members: Vec<(MemberKind, u32)>,
    cidrs: Vec<(CidrKind, Addr, u8)>,
    ranges: Vec<(CidrKind, u16, u16)>,
    excluded_routes: Vec<Addr>,
    /// The pod's own addresses.
    pod_addrs: Vec<Addr>,
    /// Records of connections made inside the pod, by their client's address and port.
    records: Vec<(Addr, u16, Reason)>,
}

impl Lookups for Sets {
    fn pod_addr(&self, addr: &Addr) -> bool {
        self.pod_addrs.contains(addr)
    }
    fn recorded(&self, a: &Arrival) -> Option<Reason> {
        self.records
            .iter()
            .find(|(src, sport, _)| *src == a.src && *sport == a.sport)
            .map(|(_, _, r)| *r)
    }
}

impl Rules for Sets {
    fn member(&self, kind: MemberKind, value: u32) -> bool {
        self.members.contains(&(kind, value))
    }
    fn port_range(&self, kind: CidrKind, port: u16) -> bool {
        self.ranges
            .iter()
            .any(|(k, lo, hi)| *k == kind && (*lo..=*hi).contains(&port))
    }
    fn route_excluded(&self, dst: &Addr) -> bool {
        self.excluded_routes.contains(dst)
    }
    fn cidr(&self, kind: CidrKind, addr: &Addr) -> bool {
        self.cidrs.iter().any(|(k, net, len)| {
            if *k != kind {
                return false;
            }
            let (a, n, bits) = if kind.is_v6() {
                (
                    u128::from_be_bytes(*addr),
                    u128::from_be_bytes(*net),
                    *len as u32,
                )
            } else {
                (
                    u32::from_be_bytes(v4_octets(addr)) as u128,
                    u32::from_be_bytes(v4_octets(net)) as u128,
                    96 + *len as u32,
                )
            };
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            (a & mask) == (n & mask)
        })
    }
}

fn cfg(flags: PodFlags, uids: &[u32], gids: &[u32]) -> PodConfig {
    let mut c = PodConfig::new(flags, 15001, 15006, 15008).with_owners(uids, gids);
    c.tproxy_mark = 1337;
    c.tproxy_table = 133;
    c
}

fn default_cfg() -> PodConfig {
    cfg(PodFlags::OUTBOUND_ALL, &[1337], &[1337])
}

const POD: [u8; 4] = [192, 0, 2, 10];
const REMOTE: [u8; 4] = [198, 51, 100, 7];

fn conn(dst: [u8; 4], dport: u16, uid: u32, gid: u32) -> Conn {
    let local = dst[0] == 127 || dst == POD;
    Conn {
        proto: Proto::Tcp,
        dst: v4_mapped(dst),
        dport,
        src: [0; 16],
        uid,
        gid,
        dst_is_local: local,
        mark: 0,
    }
}

const OUT: Verdict = Verdict::redirect(15001, Reason::CaptureAll);

fn inbound(reason: Reason) -> Verdict {
    Verdict::redirect(15006, reason)
}

#[test]
fn default_sidecar() {
    let c = default_cfg();
    let s = Sets::default();
    assert_eq!(decide(&c, &s, &conn(REMOTE, 80, 1000, 1000)), OUT);
    assert_eq!(decide(&c, &s, &conn(REMOTE, 80, 0, 0)), OUT);
    assert_eq!(
        decide(&c, &s, &conn(REMOTE, 80, 1337, 1337)),
        Verdict::pass(Reason::ProxyUid)
    );
    // gid 1337 alone, remote: rule 4c.
    assert_eq!(
        decide(&c, &s, &conn(REMOTE, 80, 1000, 1337)),
        Verdict::pass(Reason::ProxyGid)
    );
    // The app to localhost and to its own pod IP: 3b.
    assert_eq!(
        decide(&c, &s, &conn([127, 0, 0, 1], 8080, 1000, 1000)),
        Verdict::pass(Reason::LocalTrafficUid)
    );
    assert_eq!(
        decide(&c, &s, &conn(POD, 8080, 1000, 1000)),
        Verdict::pass(Reason::LocalTrafficUid)
    );
    // The proxy to its own pod IP and to 127.0.0.2: inbound port (3a); to 127.0.0.1: 3c.
    assert_eq!(
        decide(&c, &s, &conn(POD, 8080, 1337, 1337)),
        inbound(Reason::ProxyUidToLocal)
    );
    assert_eq!(
        decide(&c, &s, &conn([127, 0, 0, 2], 8080, 1337, 1337)),
        inbound(Reason::ProxyUidToLocal)
    );
    assert_eq!(
        decide(&c, &s, &conn([127, 0, 0, 1], 8080, 1337, 1337)),
        Verdict::pass(Reason::ProxyUid)
    );
    // The tunnel port is never sent inbound.
    assert_eq!(
        decide(&c, &s, &conn(POD, 15008, 1337, 1337)),
        Verdict::pass(Reason::ProxyUid)
    );
    // uid != 1337 with gid 1337 over lo is caught by 3b first: never IN_REDIRECTed.
    assert_eq!(
        decide(&c, &s, &conn(POD, 8080, 1000, 1337)),
        Verdict::pass(Reason::LocalTrafficUid)
    );
}

#[test]
fn passthrough_source() {
    let c = default_cfg();
    let s = Sets::default();
    let mut k = conn(POD, 8080, 1337, 1337);
    k.src = v4_mapped([127, 0, 0, 6]);
    assert_eq!(
        decide(&c, &s, &k),
        Verdict::pass(Reason::InboundPassthrough)
    );
    // Only towards local addresses (rule 2 has -o lo).
    let mut k = conn(REMOTE, 80, 1000, 1000);
    k.src = v4_mapped([127, 0, 0, 6]);
    assert_eq!(decide(&c, &s, &k), OUT);
}

#[test]
fn excluded_outbound_port_comes_first() {
    let c = default_cfg();
    let s = Sets {
        members: std::vec![(MemberKind::OutboundExcludePort, 9090)],
        ..Default::default()
    };
    assert_eq!(
        decide(&c, &s, &conn(POD, 9090, 1337, 1337)),
        Verdict::pass(Reason::OutboundPortExcluded)
    );
    assert_eq!(
        decide(&c, &s, &conn(REMOTE, 9090, 1000, 1000)),
        Verdict::pass(Reason::OutboundPortExcluded)
    );
    let mut u = conn(REMOTE, 9090, 1000, 1000);
    u.proto = Proto::Udp;
    assert_eq!(
        decide(&c, &s, &u),
        Verdict::pass(Reason::OutboundPortExcluded)
    );
}

#[test]
fn multiple_proxy_uids_only_first_goes_inbound() {
    let c = cfg(PodFlags::OUTBOUND_ALL, &[1337, 1338], &[1337, 1338]);
    let s = Sets::default();
    assert_eq!(
        decide(&c, &s, &conn(POD, 8080, 1337, 1337)),
        inbound(Reason::ProxyUidToLocal)
    );
    // The second uid meets the first uid's 3b rule over lo.
    assert_eq!(
        decide(&c, &s, &conn(POD, 8080, 1338, 1338)),
        Verdict::pass(Reason::LocalTrafficUid)
    );
    assert_eq!(
        decide(&c, &s, &conn(REMOTE, 80, 1338, 1338)),
        Verdict::pass(Reason::ProxyUid)
    );
}

#[test]
fn cidr_lists() {
    let c = cfg(PodFlags::NONE, &[1337], &[1337]);
    let s = Sets {
        cidrs: std::vec![
            (CidrKind::IncludeV4, v4_mapped([198, 51, 100, 0]), 24),
            (CidrKind::ExcludeV4, v4_mapped([198, 51, 100, 128]), 25),
        ],
        ..Default::default()
    };
    assert_eq!(
        decide(&c, &s, &conn(REMOTE, 80, 1000, 1000)),
        Verdict::redirect(15001, Reason::CidrIncluded)
    );
    assert_eq!(
        decide(&c, &s, &conn([198, 51, 100, 200], 80, 1000, 1000)),
        Verdict::pass(Reason::CidrExcluded)
    );
    assert_eq!(
        decide(&c, &s, &conn([203, 0, 113, 1], 80, 1000, 1000)),
        Verdict::pass(Reason::NoMatch)
    );
}

#[test]
fn outbound_ports_without_cidrs() {
    let c = cfg(PodFlags::NONE, &[1337], &[1337]);
    let s = Sets {
        members: std::vec![(MemberKind::OutboundIncludePort, 8081)],
        ..Default::default()
    };
    assert_eq!(
        decide(&c, &s, &conn(REMOTE, 8081, 1000, 1000)),
        Verdict::redirect(15001, Reason::OutboundPortIncluded)
    );
    assert_eq!(
        decide(&c, &s, &conn(REMOTE, 80, 1000, 1000)),
        Verdict::pass(Reason::NoMatch)
    );
    // The proxy is still exempt.
    assert_eq!(
        decide(&c, &s, &conn(REMOTE, 8081, 1337, 1337)),
        Verdict::pass(Reason::ProxyUid)
    );
    // And -p tcp only.
    let mut u = conn(REMOTE, 8081, 1000, 1000);
    u.proto = Proto::Udp;
    assert_eq!(decide(&c, &s, &u), Verdict::pass(Reason::NoMatch));
}

#[test]
fn owner_groups() {
    let c = cfg(
        PodFlags::OUTBOUND_ALL | PodFlags::OWNER_GROUPS_INCLUDE,
        &[1337],
        &[1337],
    );
    let s = Sets {
        members: std::vec![(MemberKind::OwnerGroupInclude, 2001)],
        ..Default::default()
    };
    assert_eq!(decide(&c, &s, &conn(REMOTE, 80, 1000, 2001)), OUT);
    assert_eq!(
        decide(&c, &s, &conn(REMOTE, 80, 1000, 1000)),
        Verdict::pass(Reason::OwnerGroupNotIncluded)
    );
    let c = cfg(
        PodFlags::OUTBOUND_ALL | PodFlags::OWNER_GROUPS_EXCLUDE,
        &[1337],
        &[1337],
    );
    let s = Sets {
        members: std::vec![(MemberKind::OwnerGroupExclude, 2002)],
        ..Default::default()
    };
    assert_eq!(
        decide(&c, &s, &conn(REMOTE, 80, 1000, 2002)),
        Verdict::pass(Reason::OwnerGroupExcluded)
    );
    assert_eq!(decide(&c, &s, &conn(REMOTE, 80, 1000, 1000)), OUT);
}

#[test]
fn loopback_cidr_setting() {
    let mut c = default_cfg();
    c.loopback_v4_prefix = 8;
    let s = Sets::default();
    // With 127.0.0.1/8 the proxy's 127.0.0.2 is localhost: not sent inbound.
    assert_eq!(
        decide(&c, &s, &conn([127, 0, 0, 2], 8080, 1337, 1337)),
        Verdict::pass(Reason::ProxyUid)
    );
}

#[test]
fn loopback_include_drops_the_lo_return_rule() {
    let c = cfg(PodFlags::NO_LO_RETURN, &[1337], &[1337]);
    let s = Sets {
        cidrs: std::vec![(CidrKind::IncludeV4, v4_mapped([127, 1, 2, 3]), 32)],
        ..Default::default()
    };
    // The app's call to 127.1.2.3 is no longer exempt as local traffic: it is captured.
    assert_eq!(
        decide(&c, &s, &conn([127, 1, 2, 3], 8080, 1000, 1000)),
        Verdict::redirect(15001, Reason::CidrIncluded)
    );
}

#[test]
fn ipv6_follows_the_pod() {
    let c = default_cfg();
    let s = Sets::default();
    let v6 = Conn {
        proto: Proto::Tcp,
        dst: [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20,
        ],
        dport: 80,
        src: [0; 16],
        uid: 1000,
        gid: 1000,
        dst_is_local: false,
        mark: 0,
    };
    assert_eq!(decide(&c, &s, &v6), Verdict::pass(Reason::NoIpv6Rules));
    let c6 = cfg(PodFlags::OUTBOUND_ALL | PodFlags::IPV6, &[1337], &[1337]);
    assert_eq!(decide(&c6, &s, &v6), OUT);
    // ::1 is localhost.
    let mut lo = v6;
    lo.dst = V6_LOOPBACK;
    lo.dst_is_local = true;
    lo.uid = 1337;
    lo.gid = 1337;
    assert_eq!(decide(&c6, &s, &lo), Verdict::pass(Reason::ProxyUid));
    // A v4-mapped destination is IPv4, whatever the pod's IPv6 setting.
    let mapped = conn(REMOTE, 80, 1000, 1000);
    assert_eq!(decide(&c, &s, &mapped), OUT);
}

#[test]
fn dns() {
    let dns = PodFlags::OUTBOUND_ALL | PodFlags::DNS | PodFlags::DNS_V4;
    let c = cfg(dns, &[1337], &[1337]);
    let s = Sets {
        cidrs: std::vec![(CidrKind::DnsServerV4, v4_mapped([192, 0, 2, 20]), 32)],
        ..Default::default()
    };
    let captured = Verdict::redirect(15053, Reason::DnsCaptured);
    let udp = |dst, uid, gid| Conn {
        proto: Proto::Udp,
        ..conn(dst, 53, uid, gid)
    };
    assert_eq!(decide(&c, &s, &udp([192, 0, 2, 20], 1000, 1000)), captured);
    assert_eq!(
        decide(&c, &s, &conn([192, 0, 2, 20], 53, 1000, 1000)),
        captured
    );
    // Not a resolv.conf server: udp passes, tcp falls through to the outbound port.
    assert_eq!(
        decide(&c, &s, &udp([198, 51, 100, 7], 1000, 1000)),
        Verdict::pass(Reason::NotTcp)
    );
    assert_eq!(
        decide(&c, &s, &conn([198, 51, 100, 7], 53, 1000, 1000)),
        OUT
    );
    // The proxy's own DNS is never captured.
    assert_eq!(
        decide(&c, &s, &udp([192, 0, 2, 20], 1337, 1337)),
        Verdict::pass(Reason::ProxyUid)
    );
    let all = cfg(dns | PodFlags::DNS_ALL, &[1337], &[1337]);
    assert_eq!(
        decide(&all, &s, &udp([198, 51, 100, 7], 1000, 1000)),
        captured
    );
    // A local resolver: the app's tcp and udp to 127.0.0.1:53 are captured (3b spares 53).
    assert_eq!(
        decide(&all, &s, &conn([127, 0, 0, 1], 53, 1000, 1000)),
        captured
    );
    assert_eq!(decide(&all, &s, &udp([127, 0, 0, 1], 1000, 1000)), captured);
    // The proxy's tcp to its own pod IP:53 is not sent inbound by the uid rule, but the gid
    // rule (which only spares the tunnel port) catches a gid-only proxy... after 3b.
    assert_eq!(
        decide(&all, &s, &conn(POD, 53, 1337, 1337)),
        Verdict::pass(Reason::ProxyUid)
    );
    // IPv4 servers only: no IPv6 DNS chain.
    let c6 = cfg(dns | PodFlags::IPV6 | PodFlags::DNS_ALL, &[1337], &[1337]);
    let v6 = Conn {
        dst: [
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20,
        ],
        dst_is_local: false,
        ..udp([0, 0, 0, 0], 1000, 1000)
    };
    assert_eq!(decide(&c6, &s, &v6), Verdict::pass(Reason::NotTcp));
}

#[test]
fn interfaces() {
    let c = cfg(
        PodFlags::OUTBOUND_ALL
            | PodFlags::INBOUND_ALL
            | PodFlags::EXCLUDE_IFACES
            | PodFlags::KUBE_VIRT,
        &[1337],
        &[1337],
    );
    let s = Sets {
        members: std::vec![
            (MemberKind::ExcludedIfindex, 3),
            (MemberKind::KubeVirtIfindex, 4)
        ],
        excluded_routes: std::vec![v4_mapped([203, 0, 113, 10])],
        ..Default::default()
    };
    assert_eq!(
        decide(&c, &s, &conn([203, 0, 113, 10], 80, 1000, 1000)),
        Verdict::pass(Reason::InterfaceExcluded)
    );
    assert_eq!(decide(&c, &s, &conn(REMOTE, 80, 1000, 1000)), OUT);
    let on = |ifindex| Arrival {
        ifindex,
        ..arr(PEER, 8080)
    };
    assert_eq!(
        decide_inbound(&c, &s, &on(3)),
        Verdict::pass(Reason::InterfaceExcluded)
    );
    assert_eq!(
        decide_inbound(&c, &s, &on(4)),
        Verdict::redirect(15001, Reason::KubeVirtRedirect)
    );
    assert_eq!(
        decide_inbound(&c, &s, &on(2)),
        inbound(Reason::InboundCaptureAll)
    );
    // -k with an -i list: only listed destinations go to the outbound port.
    let listed = cfg(
        PodFlags::INBOUND_ALL | PodFlags::KUBE_VIRT,
        &[1337],
        &[1337],
    );
    assert_eq!(
        decide_inbound(&listed, &s, &on(4)),
        Verdict::pass(Reason::KubeVirtReturn)
    );
    // Forwarded through the pod (tc ingress on a -k interface): the same -k rules; on any
    // other interface nothing.
    let through = |ifindex, dst| Arrival {
        ifindex,
        dst: v4_mapped(dst),
        ..arr(PEER, 443)
    };
    assert_eq!(
        decide_forwarded(&c, &s, &through(4, [203, 0, 113, 10])),
        Some(Verdict::redirect(15001, Reason::KubeVirtRedirect))
    );
    assert_eq!(
        decide_forwarded(&c, &s, &through(3, [203, 0, 113, 10])),
        None
    );
    assert_eq!(
        decide_forwarded(&c, &s, &through(2, [203, 0, 113, 10])),
        None
    );
    let listed_i = Sets {
        members: std::vec![(MemberKind::KubeVirtIfindex, 4)],
        cidrs: std::vec![(CidrKind::IncludeV4, v4_mapped([203, 0, 113, 0]), 24)],
        ..Default::default()
    };
    assert_eq!(
        decide_forwarded(&listed, &listed_i, &through(4, [203, 0, 113, 10])),
        Some(Verdict::redirect(15001, Reason::KubeVirtRedirect))
    );
    assert_eq!(
        decide_forwarded(&listed, &listed_i, &through(4, [198, 51, 100, 7])),
        Some(Verdict::pass(Reason::KubeVirtReturn))
    );
    // TPROXY mode: mangle's ISTIO_INBOUND comes first; only what it returns meets -k.
    let tproxy = cfg(
        PodFlags::OUTBOUND_ALL | PodFlags::INBOUND_ALL | PodFlags::KUBE_VIRT | PodFlags::TPROXY,
        &[1337],
        &[1337],
    );
    assert_eq!(
        decide_forwarded(&tproxy, &s, &through(4, [203, 0, 113, 10])),
        Some(inbound(Reason::InboundCaptureAll))
    );
    let excluded = Sets {
        members: std::vec![
            (MemberKind::KubeVirtIfindex, 4),
            (MemberKind::InboundExcludePort, 443)
        ],
        ..Default::default()
    };
    assert_eq!(
        decide_forwarded(&tproxy, &excluded, &through(4, [203, 0, 113, 10])),
        Some(Verdict::redirect(15001, Reason::KubeVirtRedirect))
    );
    let tproxy_no_inbound = cfg(
        PodFlags::OUTBOUND_ALL | PodFlags::KUBE_VIRT | PodFlags::TPROXY,
        &[1337],
        &[1337],
    );
    assert_eq!(
        decide_forwarded(&tproxy_no_inbound, &s, &through(4, [203, 0, 113, 10])),
        Some(Verdict::redirect(15001, Reason::KubeVirtRedirect))
    );
    // Without -k, or IPv6 without IPv6 rules: untouched.
    let no_k = cfg(PodFlags::OUTBOUND_ALL, &[1337], &[1337]);
    assert_eq!(
        decide_forwarded(&no_k, &s, &through(4, [203, 0, 113, 10])),
        None
    );
    let v6 = Arrival {
        ifindex: 4,
        dst: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        ..arr(PEER6, 443)
    };
    assert_eq!(decide_forwarded(&c, &s, &v6), None);
}

#[test]
fn tproxy() {
    let c = cfg(
        PodFlags::OUTBOUND_ALL | PodFlags::INBOUND_ALL | PodFlags::TPROXY,
        &[1337],
        &[1337],
    );
    let s = Sets {
        members: std::vec![(MemberKind::InboundExcludePort, 15090)],
        ..Default::default()
    };
    let steer = Verdict::tproxy(15006, Reason::TproxyToLocal);
    // The TPROXY proxy runs as 0:1337: its call to the pod IP is TPROXYed, unrewritten.
    assert_eq!(decide(&c, &s, &conn(POD, 8080, 0, 1337)), steer);
    // ... but not with the TPROXY mark (its original-source upstream), nor to -d ports.
    let marked = Conn {
        mark: 1337,
        ..conn(POD, 8080, 0, 1337)
    };
    assert_eq!(
        decide(&c, &s, &marked),
        Verdict::pass(Reason::LocalTrafficUid)
    );
    assert_eq!(
        decide(&c, &s, &conn(POD, 15090, 0, 1337)),
        Verdict::pass(Reason::LocalTrafficUid)
    );
    // uid 1337 itself still takes the nat IN_REDIRECT path; the app is untouched.
    assert_eq!(
        decide(&c, &s, &conn(POD, 8080, 1337, 1337)),
        inbound(Reason::ProxyUidToLocal)
    );
    assert_eq!(
        decide(&c, &s, &conn(POD, 8080, 1000, 1000)),
        Verdict::pass(Reason::LocalTrafficUid)
    );
    // Inbound: the tunnel port is not exempt.
    assert_eq!(
        decide_inbound(&c, &s, &arr(PEER, 15008)),
        inbound(Reason::InboundCaptureAll)
    );
}

const PEER: Addr = v4_mapped([192, 0, 2, 20]);

fn arr(src: Addr, dport: u16) -> Arrival {
    let dst = if is_v4_mapped(&src) {
        v4_mapped(POD)
    } else {
        PEER6
    };
    Arrival {
        src,
        sport: 40000,
        dst,
        dport,
        ifindex: 2,
    }
}
const PEER6: Addr = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20,
];

#[test]
fn linkerd() {
    let mut c = cfg(PodFlags::LINKERD | PodFlags::IPV6, &[2102], &[]);
    c.outbound_port = 4140;
    c.inbound_port = 4143;
    let s = Sets {
        ranges: std::vec![
            (CidrKind::OutboundIgnorePorts, 4567, 4568),
            (CidrKind::InboundIgnorePorts, 4190, 4191),
        ],
        cidrs: std::vec![(CidrKind::IgnoreSubnetV4, v4_mapped([192, 0, 2, 0]), 28)],
        ..Default::default()
    };
    let out = Verdict::redirect(4140, Reason::CaptureAll);
    assert_eq!(decide(&c, &s, &conn(REMOTE, 80, 1000, 1000)), out);
    assert_eq!(
        decide(&c, &s, &conn(REMOTE, 80, 2102, 2102)),
        Verdict::pass(Reason::ProxyUid)
    );
    assert_eq!(
        decide(&c, &s, &conn(REMOTE, 4568, 1000, 1000)),
        Verdict::pass(Reason::OutboundPortExcluded)
    );
    // Everything local is skipped, the proxy's own pod IP included: no inbound redirect.
    assert_eq!(
        decide(&c, &s, &conn(POD, 8080, 2102, 2102)),
        Verdict::pass(Reason::ProxyUid)
    );
    assert_eq!(
        decide(&c, &s, &conn(POD, 8080, 1000, 1000)),
        Verdict::pass(Reason::LoopbackInterface)
    );
    let inb = |reason| Verdict::redirect(4143, reason);
    assert_eq!(
        decide_inbound(&c, &s, &arr(PEER6, 22)),
        inb(Reason::InboundCaptureAll)
    );
    assert_eq!(
        decide_inbound(&c, &s, &arr(PEER6, 4191)),
        Verdict::pass(Reason::InboundPortExcluded)
    );
    // 192.0.2.20 is outside 192.0.2.0/28; 192.0.2.5 is inside.
    assert_eq!(
        decide_inbound(&c, &s, &arr(PEER, 8080)),
        inb(Reason::InboundCaptureAll)
    );
    assert_eq!(
        decide_inbound(&c, &s, &arr(v4_mapped([192, 0, 2, 5]), 8080)),
        Verdict::pass(Reason::InboundSubnetIgnored)
    );
    let mut listed = c;
    listed.flags |= PodFlags::INBOUND_LIST;
    let s = Sets {
        ranges: std::vec![(CidrKind::RedirectPorts, 8080, 8080)],
        ..Default::default()
    };
    assert_eq!(
        decide_inbound(&listed, &s, &arr(PEER, 8080)),
        inb(Reason::InboundPortIncluded)
    );
    assert_eq!(
        decide_inbound(&listed, &s, &arr(PEER, 9090)),
        Verdict::pass(Reason::InboundPortNotListed)
    );
}

#[test]
fn inbound_rules() {
    let all = cfg(
        PodFlags::OUTBOUND_ALL | PodFlags::INBOUND_ALL,
        &[1337],
        &[1337],
    );
    let s = Sets {
        members: std::vec![(MemberKind::InboundExcludePort, 15090)],
        ..Default::default()
    };
    assert_eq!(
        decide_inbound(&all, &s, &arr(PEER, 8080)),
        inbound(Reason::InboundCaptureAll)
    );
    // Port 22 is captured (istio >= 1.13).
    assert_eq!(
        decide_inbound(&all, &s, &arr(PEER, 22)),
        inbound(Reason::InboundCaptureAll)
    );
    assert_eq!(
        decide_inbound(&all, &s, &arr(PEER, 15090)),
        Verdict::pass(Reason::InboundPortExcluded)
    );
    assert_eq!(
        decide_inbound(&all, &s, &arr(PEER, 15008)),
        Verdict::pass(Reason::InboundTunnelPort)
    );
    assert_eq!(
        decide_inbound(&all, &s, &arr(PEER6, 8080)),
        Verdict::pass(Reason::NoIpv6Rules)
    );
    let list = cfg(PodFlags::INBOUND_LIST, &[1337], &[1337]);
    let s = Sets {
        members: std::vec![
            (MemberKind::InboundPort, 8080),
            (MemberKind::InboundExcludePort, 8080)
        ],
        ..Default::default()
    };
    // -d is ignored with a -b list.
    assert_eq!(
        decide_inbound(&list, &s, &arr(PEER, 8080)),
        inbound(Reason::InboundPortIncluded)
    );
    assert_eq!(
        decide_inbound(&list, &s, &arr(PEER, 9090)),
        Verdict::pass(Reason::InboundPortNotListed)
    );
    let off = cfg(PodFlags::NONE, &[1337], &[1337]);
    assert_eq!(
        decide_inbound(&off, &s, &arr(PEER, 8080)),
        Verdict::pass(Reason::InboundOff)
    );
}

/// The pod of [`arr`]: its address is `POD`; a connection it made to itself from 127.0.0.6.
fn pod_sets() -> Sets {
    Sets {
        pod_addrs: std::vec![v4_mapped(POD)],
        ..Default::default()
    }
}

#[test]
fn arrivals_from_outside_take_the_inbound_rules() {
    let all = cfg(
        PodFlags::OUTBOUND_ALL | PodFlags::INBOUND_ALL,
        &[1337],
        &[1337],
    );
    let s = pod_sets();
    assert_eq!(
        decide_arrival(&all, &s, &arr(PEER, 8080)),
        Some(inbound(Reason::InboundCaptureAll))
    );
    assert_eq!(
        decide_arrival(&all, &s, &arr(PEER, 15008)),
        Some(Verdict::pass(Reason::InboundTunnelPort))
    );
}

#[test]
fn arrivals_made_inside_the_pod_are_the_outbound_rules_business() {
    let all = cfg(
        PodFlags::OUTBOUND_ALL | PodFlags::INBOUND_ALL,
        &[1337],
        &[1337],
    );
    let mut s = pod_sets();
    // On lo, from the pod's own address, or from loopback: not inbound traffic.
    let on_lo = Arrival {
        ifindex: LOOPBACK_IFINDEX,
        ..arr(PEER, 8080)
    };
    assert_eq!(decide_arrival(&all, &s, &on_lo), None);
    assert_eq!(decide_arrival(&all, &s, &arr(v4_mapped(POD), 8080)), None);
    assert_eq!(
        decide_arrival(&all, &s, &arr(v4_mapped([127, 0, 0, 6]), 8080)),
        None
    );
    // Unless the outbound rules sent it to the inbound listener (TPROXY mode).
    s.records
        .push((v4_mapped(POD), 40000, Reason::TproxyToLocal));
    assert_eq!(
        decide_arrival(&all, &s, &arr(v4_mapped(POD), 8080)),
        Some(inbound(Reason::TproxyToLocal))
    );
    // Another record of a local connection changes nothing.
    s.records[0].2 = Reason::ProxyUidToLocal;
    assert_eq!(decide_arrival(&all, &s, &arr(v4_mapped(POD), 8080)), None);
}

#[test]
fn a_transparent_connection_of_the_pod_is_remembered_and_left_alone() {
    let c = cfg(
        PodFlags::OUTBOUND_ALL | PodFlags::INBOUND_ALL | PodFlags::TPROXY,
        &[1337],
        &[1337],
    );
    let mut s = pod_sets();
    // The TPROXY proxy's upstream call to the app, from the original client's address.
    let mut k = conn(POD, 8080, 0, 1337);
    k.src = PEER;
    assert!(local_origin(&s, &k));
    // From the pod's own address, unbound, to a remote address, or over UDP: not remembered.
    k.src = v4_mapped(POD);
    assert!(!local_origin(&s, &k));
    k.src = v4_mapped([0; 4]);
    assert!(!local_origin(&s, &k));
    let mut remote = conn(REMOTE, 80, 0, 1337);
    remote.src = PEER;
    assert!(!local_origin(&s, &remote));
    let mut udp = conn(POD, 8080, 0, 1337);
    udp.src = PEER;
    udp.proto = Proto::Udp;
    assert!(!local_origin(&s, &udp));
    // To a loopback address (local, but never captured inbound): not remembered.
    let mut lo = conn([127, 0, 0, 1], 8080, 0, 1337);
    lo.src = PEER;
    assert!(lo.dst_is_local);
    assert!(!local_origin(&s, &lo));
    // Its arrival looks like inbound traffic from PEER, but is left alone by its record.
    s.records.push((PEER, 40000, Reason::LocalOrigin));
    assert_eq!(decide_arrival(&c, &s, &arr(PEER, 8080)), None);
    // So is a connection forwarded from a -k interface, which tc ingress translated to the
    // proxy's port (TPROXY mode's mangle verdict must not take it to the inbound port).
    s.records = std::vec![(PEER, 40000, Reason::KubeVirtRedirect)];
    assert_eq!(decide_arrival(&c, &s, &arr(PEER, 15001)), None);
}

#[test]
fn a_capture_no_proxy_answers_is_refused() {
    let v = Verdict::no_listener(15006);
    assert_eq!(v.action, Action::Refuse);
    assert_eq!((v.port, v.reason), (15006, Reason::InboundNoListener));
}

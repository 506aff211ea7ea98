//! The outbound decision: what istio-iptables' nat OUTPUT chain (`ISTIO_OUTPUT`), its TPROXY
//! mangle rules, or linkerd2-proxy-init's `PROXY_INIT_OUTPUT` do with the first packet of a
//! connection the pod makes.

use super::{
    is_local, Action, Conn, Lookups, Proto, Reason, Rules, Verdict, DNS_CAPTURE_PORT, DNS_PORT,
};
use crate::{
    addr::{
        addr_eq, is_inbound_passthrough, is_loopback, is_unspecified, is_v4_mapped, v4_octets,
        Addr, V6_INBOUND_PASSTHROUGH, V6_LOOPBACK,
    },
    pod::{CidrKind, MemberKind, PodConfig, PodFlags, SockOwner, MAX_OWNERS},
};

#[inline(always)]
fn v4_in_prefix(addr: [u8; 4], net: [u8; 4], prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let prefix = if prefix > 32 { 32 } else { prefix };
    let mask = u32::MAX << (32 - prefix as u32);
    (u32::from_be_bytes(addr) & mask) == (u32::from_be_bytes(net) & mask)
}

/// Whether `dst` is in the pod's "localhost" CIDR: `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR` for v4,
/// `::1/128` for v6.
#[inline(always)]
pub fn in_loopback_cidr(cfg: &PodConfig, dst: &Addr) -> bool {
    if is_v4_mapped(dst) {
        v4_in_prefix(v4_octets(dst), cfg.loopback_v4, cfg.loopback_v4_prefix)
    } else {
        addr_eq(dst, &V6_LOOPBACK)
    }
}

/// The owner rules 3 (uid) and 4 (gid), one triple per listed owner in list order.
/// (Not inlined, like [`decide`], to keep each BPF stack frame small.)
#[inline(never)]
fn owner_rules(cfg: &PodConfig, conn: &Conn, lo_return: bool, by_gid: bool) -> Option<Verdict> {
    let (owners, n, id) = if by_gid {
        (&cfg.gids, cfg.n_gids, conn.gid)
    } else {
        (&cfg.uids, cfg.n_uids, conn.uid)
    };
    let lo = conn.dst_is_local;
    let tcp = conn.proto == Proto::Tcp;
    let dns = cfg.has(PodFlags::DNS);
    // With DNS capture, istio's uid rule (3a) also spares port 53; the gid rule (4a) does not.
    let to_local = lo
        && !in_loopback_cidr(cfg, &conn.dst)
        && tcp
        && conn.dport != cfg.tunnel_port
        && !(dns && !by_gid && conn.dport == DNS_PORT);
    // With DNS capture, 3b/4b only return TCP to a port other than 53.
    let lo_return = lo_return && (!dns || (tcp && conn.dport != DNS_PORT));
    let mut i = 0;
    while i < MAX_OWNERS {
        if i >= n as usize {
            break;
        }
        let owner = owners[i];
        // a: the proxy calling a local address goes to the inbound port.
        if to_local && id == owner {
            let reason = if by_gid {
                Reason::ProxyGidToLocal
            } else {
                Reason::ProxyUidToLocal
            };
            return Some(Verdict::redirect(cfg.inbound_port, reason));
        }
        // b: anyone else talking to a local address is left alone.
        if lo_return && lo && id != owner {
            let reason = if by_gid {
                Reason::LocalTrafficGid
            } else {
                Reason::LocalTrafficUid
            };
            return Some(Verdict::pass(reason));
        }
        // c: the proxy's own traffic is left alone.
        if id == owner {
            let reason = if by_gid {
                Reason::ProxyGid
            } else {
                Reason::ProxyUid
            };
            return Some(Verdict::pass(reason));
        }
        i += 1;
    }
    None
}

/// linkerd2-proxy-init's nat OUTPUT chain (`PROXY_INIT_OUTPUT`, spec §5).
#[inline(never)]
fn decide_linkerd<R: Rules>(cfg: &PodConfig, rules: &R, conn: &Conn) -> Verdict {
    if cfg.n_uids > 0 && conn.uid == cfg.uids[0] {
        return Verdict::pass(Reason::ProxyUid);
    }
    if cfg.n_gids > 0 && conn.gid == cfg.gids[0] {
        return Verdict::pass(Reason::ProxyGid);
    }
    if conn.dst_is_local {
        return Verdict::pass(Reason::LoopbackInterface);
    }
    if conn.proto != Proto::Tcp {
        return Verdict::pass(Reason::NotTcp);
    }
    if rules.port_range(CidrKind::OutboundIgnorePorts, conn.dport) {
        return Verdict::pass(Reason::OutboundPortExcluded);
    }
    Verdict::redirect(cfg.outbound_port, Reason::CaptureAll)
}

/// Decide what the pod's nat OUTPUT rules (istio-iptables', or linkerd2-proxy-init's when the
/// pod has the `LINKERD` flag) would do with the first packet of `conn`.
///
/// Not inlined: in the kernel it is a BPF subprogram with its own stack frame, which keeps the
/// connect programs within the 512-byte stack limit.
#[inline(never)]
pub fn decide<R: Rules>(cfg: &PodConfig, rules: &R, conn: &Conn) -> Verdict {
    decide_all(cfg, rules, conn)
}

#[inline(always)]
fn decide_all<R: Rules>(cfg: &PodConfig, rules: &R, conn: &Conn) -> Verdict {
    let v = decide_nat(cfg, rules, conn);
    if v.reason == Reason::NoIpv6Rules {
        return v;
    }
    if cfg.has(PodFlags::TPROXY) && v.action == Action::Pass && tproxy_to_local(cfg, rules, conn) {
        // The pod's own addresses are steered unrewritten; 127/8 and ::6 (not the pod's alone,
        // so inbound capture cannot tell which pod they are for) are redirected instead.
        let shared = if conn.is_v4() {
            conn.dst[12] == 127
        } else {
            addr_eq(&conn.dst, &V6_INBOUND_PASSTHROUGH)
        };
        return if shared {
            Verdict::redirect(cfg.inbound_port, Reason::TproxyToLocal)
        } else {
            Verdict::tproxy(cfg.inbound_port, Reason::TproxyToLocal)
        };
    }
    v
}

/// TPROXY mode's mangle rules for a connection the nat rules left alone: the proxy user's TCP
/// to a local, non-localhost address is marked 1338 (unless its socket carries the TPROXY mark)
/// and TPROXYed to the inbound port on its way in through lo, unless it comes from 127.0.0.6 or
/// its port is not captured inbound.
#[inline(never)]
fn tproxy_to_local<R: Rules>(cfg: &PodConfig, rules: &R, conn: &Conn) -> bool {
    if conn.proto != Proto::Tcp
        || !conn.dst_is_local
        || in_loopback_cidr(cfg, &conn.dst)
        || conn.mark == cfg.tproxy_mark
    {
        return false;
    }
    let owner = cfg.is_proxy(&SockOwner {
        uid: conn.uid,
        gid: conn.gid,
    });
    if !owner || is_inbound_passthrough(&conn.src) {
        return false;
    }
    if cfg.has(PodFlags::INBOUND_ALL) {
        !rules.member(MemberKind::InboundExcludePort, conn.dport as u32)
    } else if cfg.has(PodFlags::INBOUND_LIST) {
        rules.member(MemberKind::InboundPort, conn.dport as u32)
    } else {
        false
    }
}

/// istio-iptables' nat OUTPUT rules (`ISTIO_OUTPUT`), or linkerd's.
#[inline(always)]
fn decide_nat<R: Rules>(cfg: &PodConfig, rules: &R, conn: &Conn) -> Verdict {
    let v4 = conn.is_v4();
    if !v4 && !cfg.has(PodFlags::IPV6) {
        return Verdict::pass(Reason::NoIpv6Rules);
    }
    if cfg.has(PodFlags::LINKERD) {
        return decide_linkerd(cfg, rules, conn);
    }
    // Rule 0: -c, the route's output interface is excluded (local destinations use lo).
    if cfg.has(PodFlags::EXCLUDE_IFACES) && !conn.dst_is_local && rules.route_excluded(&conn.dst) {
        return Verdict::pass(Reason::InterfaceExcluded);
    }
    // Rule 1: -o, tcp and udp alike, before everything else.
    if rules.member(MemberKind::OutboundExcludePort, conn.dport as u32) {
        return Verdict::pass(Reason::OutboundPortExcluded);
    }
    // Rule 2: Envoy's inbound passthrough source.
    if conn.dst_is_local && is_inbound_passthrough(&conn.src) {
        return Verdict::pass(Reason::InboundPassthrough);
    }
    let lo_return = !cfg.has(PodFlags::NO_LO_RETURN);
    // Rules 3 and 4.
    if let Some(v) = owner_rules(cfg, conn, lo_return, false) {
        return v;
    }
    if let Some(v) = owner_rules(cfg, conn, lo_return, true) {
        return v;
    }
    // Rule 5: owner groups.
    if cfg.has(PodFlags::OWNER_GROUPS_INCLUDE) {
        if !rules.member(MemberKind::OwnerGroupInclude, conn.gid) {
            return Verdict::pass(Reason::OwnerGroupNotIncluded);
        }
    } else if cfg.has(PodFlags::OWNER_GROUPS_EXCLUDE)
        && rules.member(MemberKind::OwnerGroupExclude, conn.gid)
    {
        return Verdict::pass(Reason::OwnerGroupExcluded);
    }
    // Rule 6: DNS (tcp and udp port 53, to any server or to the pod's resolv.conf servers).
    if cfg.has(PodFlags::DNS) && conn.dport == DNS_PORT {
        let (chain, servers) = if v4 {
            (PodFlags::DNS_V4, CidrKind::DnsServerV4)
        } else {
            (PodFlags::DNS_V6, CidrKind::DnsServerV6)
        };
        if cfg.has(chain) && (cfg.has(PodFlags::DNS_ALL) || rules.cidr(servers, &conn.dst)) {
            return Verdict::redirect(DNS_CAPTURE_PORT, Reason::DnsCaptured);
        }
    }
    // Rule 7: localhost.
    if in_loopback_cidr(cfg, &conn.dst) {
        return Verdict::pass(Reason::LoopbackDestination);
    }
    // Rule 8: -x.
    let (exclude, include) = if v4 {
        (CidrKind::ExcludeV4, CidrKind::IncludeV4)
    } else {
        (CidrKind::ExcludeV6, CidrKind::IncludeV6)
    };
    if rules.cidr(exclude, &conn.dst) {
        return Verdict::pass(Reason::CidrExcluded);
    }
    let tcp = conn.proto == Proto::Tcp;
    // Rule 9: -q.
    if tcp && rules.member(MemberKind::OutboundIncludePort, conn.dport as u32) {
        return Verdict::redirect(cfg.outbound_port, Reason::OutboundPortIncluded);
    }
    // Rule 10: -i.
    let matched = if cfg.has(PodFlags::OUTBOUND_ALL) {
        Some(Reason::CaptureAll)
    } else if rules.cidr(include, &conn.dst) {
        Some(Reason::CidrIncluded)
    } else {
        None
    };
    match matched {
        Some(reason) if tcp => Verdict::redirect(cfg.outbound_port, reason),
        Some(_) => Verdict::pass(Reason::NotTcp),
        None => Verdict::pass(Reason::NoMatch),
    }
}

/// Whether a connection the rules left alone must still be remembered (as
/// [`Reason::LocalOrigin`]): TCP to one of the pod's own addresses, other than a loopback one,
/// from a source that is not the pod's (a transparent socket: the TPROXY proxy's
/// original-source upstream). iptables leaves such a connection alone on its way in through lo;
/// inbound capture, which cannot see the interface it came from, knows it by this record.
/// Inbound capture never takes a connection to a loopback address, so none is kept for one.
#[inline(never)]
pub fn local_origin<L: Lookups>(lookups: &L, conn: &Conn) -> bool {
    conn.proto == Proto::Tcp
        && conn.dst_is_local
        && !is_loopback(&conn.dst)
        && !is_unspecified(&conn.src)
        && !is_local(lookups, &conn.src)
}

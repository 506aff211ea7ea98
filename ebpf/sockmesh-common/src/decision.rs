//! The outbound capture decision: istio-iptables' nat OUTPUT chain (`ISTIO_OUTPUT`) as one
//! function. The kernel's connect4/connect6 programs, `sockmesh init --dry-run` and `sockmesh
//! explain` all call [`decide`]; only the set lookups differ (maps in the kernel, in-memory sets on
//! the host), behind the [`Rules`] trait.
//!
//! Rule numbers follow `shared/spec/istio-iptables.md` §2.2 "Locally generated traffic".

use crate::maps::{
    flags, is_v4_mapped, v4_octets, Addr, CidrKind, MemberKind, PodConfig, MAX_OWNERS,
};

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp = 6,
    Udp = 17,
}

/// What the kernel knows about a connect() when it decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    pub proto: Proto,
    /// Destination, IPv6 form (IPv4 v4-mapped).
    pub dst: Addr,
    pub dport: u16,
    /// Address the socket is bound to, or all zeroes (IPv6 form; a v4 socket's is v4-mapped).
    pub src: Addr,
    /// Owner of the socket (see docs/design.md "Owner matching").
    pub uid: u32,
    pub gid: u32,
    /// The destination is an address of this netns: the route would leave through `lo`.
    pub dst_is_local: bool,
}

impl Conn {
    pub const fn is_v4(&self) -> bool {
        is_v4_mapped(&self.dst)
    }
}

/// Why a connection was or was not redirected: the istio rule that made the decision.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// IPv6 traffic of a pod whose IPv6 capture is off: istio installs no ip6tables rules.
    NoIpv6Rules = 1,
    /// Rule 1: destination port is in `-o`.
    OutboundPortExcluded = 2,
    /// Rule 2: bound to 127.0.0.6 / ::6 towards a local address (inbound passthrough).
    InboundPassthrough = 3,
    /// Rule 3a: the proxy uid connects to a local, non-localhost address: inbound port.
    ProxyUidToLocal = 4,
    /// Rule 3b: another uid talks to a local address.
    LocalTrafficUid = 5,
    /// Rule 3c: the proxy uid's own traffic.
    ProxyUid = 6,
    /// Rule 4a: the proxy gid connects to a local, non-localhost address: inbound port.
    ProxyGidToLocal = 7,
    /// Rule 4b: another gid talks to a local address.
    LocalTrafficGid = 8,
    /// Rule 4c: the proxy gid's own traffic.
    ProxyGid = 9,
    /// Rule 5: gid not in `ISTIO_OUTBOUND_OWNER_GROUPS`.
    OwnerGroupNotIncluded = 10,
    /// Rule 5: gid in `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`.
    OwnerGroupExcluded = 11,
    /// Rule 7: destination in the loopback CIDR (127.0.0.1/32 by default, ::1/128).
    LoopbackDestination = 12,
    /// Rule 8: destination in `-x`.
    CidrExcluded = 13,
    /// Rule 9: TCP destination port in `-q`.
    OutboundPortIncluded = 14,
    /// Rule 10: `-i '*'`.
    CaptureAll = 15,
    /// Rule 10: destination in `-i`.
    CidrIncluded = 16,
    /// Rule 11: nothing matched.
    NoMatch = 17,
    /// Rules 9/10 matched, but istio only redirects TCP.
    NotTcp = 18,
}

impl Reason {
    pub const ALL: [Reason; 18] = [
        Reason::NoIpv6Rules,
        Reason::OutboundPortExcluded,
        Reason::InboundPassthrough,
        Reason::ProxyUidToLocal,
        Reason::LocalTrafficUid,
        Reason::ProxyUid,
        Reason::ProxyGidToLocal,
        Reason::LocalTrafficGid,
        Reason::ProxyGid,
        Reason::OwnerGroupNotIncluded,
        Reason::OwnerGroupExcluded,
        Reason::LoopbackDestination,
        Reason::CidrExcluded,
        Reason::OutboundPortIncluded,
        Reason::CaptureAll,
        Reason::CidrIncluded,
        Reason::NoMatch,
        Reason::NotTcp,
    ];

    pub const fn from_u32(v: u32) -> Option<Reason> {
        if v >= 1 && v <= 18 {
            Some(Self::ALL[(v - 1) as usize])
        } else {
            None
        }
    }

    /// Short snake_case name, used for counters and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NoIpv6Rules => "no_ipv6_rules",
            Self::OutboundPortExcluded => "outbound_port_excluded",
            Self::InboundPassthrough => "inbound_passthrough",
            Self::ProxyUidToLocal => "proxy_uid_to_local",
            Self::LocalTrafficUid => "local_traffic_uid",
            Self::ProxyUid => "proxy_uid",
            Self::ProxyGidToLocal => "proxy_gid_to_local",
            Self::LocalTrafficGid => "local_traffic_gid",
            Self::ProxyGid => "proxy_gid",
            Self::OwnerGroupNotIncluded => "owner_group_not_included",
            Self::OwnerGroupExcluded => "owner_group_excluded",
            Self::LoopbackDestination => "loopback_destination",
            Self::CidrExcluded => "cidr_excluded",
            Self::OutboundPortIncluded => "outbound_port_included",
            Self::CaptureAll => "capture_all",
            Self::CidrIncluded => "cidr_included",
            Self::NoMatch => "no_match",
            Self::NotTcp => "not_tcp",
        }
    }

    /// The istio-iptables rule (nat ISTIO_OUTPUT) this reason stands for.
    pub const fn rule(self) -> &'static str {
        match self {
            Self::NoIpv6Rules => "no ip6tables rules: IPv6 capture is off (pod's first address is IPv4, no --dual-stack)",
            Self::OutboundPortExcluded => "rule 1: -p tcp|udp --dport P -j RETURN (-o)",
            Self::InboundPassthrough => "rule 2: -o lo -s 127.0.0.6/32 (::6) -j RETURN",
            Self::ProxyUidToLocal => "rule 3a: -o lo ! -d LOOPBACK -p tcp ! --dport TUNNEL -m owner --uid-owner U -j ISTIO_IN_REDIRECT",
            Self::LocalTrafficUid => "rule 3b: -o lo -m owner ! --uid-owner U -j RETURN",
            Self::ProxyUid => "rule 3c: -m owner --uid-owner U -j RETURN",
            Self::ProxyGidToLocal => "rule 4a: -o lo ! -d LOOPBACK -p tcp ! --dport TUNNEL -m owner --gid-owner G -j ISTIO_IN_REDIRECT",
            Self::LocalTrafficGid => "rule 4b: -o lo -m owner ! --gid-owner G -j RETURN",
            Self::ProxyGid => "rule 4c: -m owner --gid-owner G -j RETURN",
            Self::OwnerGroupNotIncluded => "rule 5: -m owner ! --gid-owner g1 ... -j RETURN (ISTIO_OUTBOUND_OWNER_GROUPS)",
            Self::OwnerGroupExcluded => "rule 5: -m owner --gid-owner g -j RETURN (ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE)",
            Self::LoopbackDestination => "rule 7: -d LOOPBACK -j RETURN",
            Self::CidrExcluded => "rule 8: -d CIDR -j RETURN (-x)",
            Self::OutboundPortIncluded => "rule 9: -p tcp --dport P -j ISTIO_REDIRECT (-q)",
            Self::CaptureAll => "rule 10: -j ISTIO_REDIRECT (-i '*')",
            Self::CidrIncluded => "rule 10: -d CIDR -j ISTIO_REDIRECT (-i)",
            Self::NoMatch => "rule 11: end of ISTIO_OUTPUT, no rule matched",
            Self::NotTcp => "rule 9/10 matched, but ISTIO_REDIRECT only redirects tcp",
        }
    }
}

/// The outcome of [`decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Leave the connection alone.
    Pass(Reason),
    /// Send it to localhost:`port` (the outbound or the inbound capture port).
    Redirect { port: u16, reason: Reason },
}

impl Verdict {
    pub const fn reason(self) -> Reason {
        match self {
            Verdict::Pass(r) | Verdict::Redirect { reason: r, .. } => r,
        }
    }
}

/// Per-pod set membership, answered by maps in the kernel and by in-memory sets on the host.
pub trait Rules {
    fn member(&self, kind: MemberKind, value: u32) -> bool;
    /// Whether `addr` (IPv6 form) lies in one of the CIDRs of list `kind`.
    fn cidr(&self, kind: CidrKind, addr: &Addr) -> bool;
}

const V4_INBOUND_PASSTHROUGH: [u8; 4] = [127, 0, 0, 6];
const V6_INBOUND_PASSTHROUGH: Addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];
const V6_LOOPBACK: Addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

#[inline(always)]
fn v4_in_prefix(addr: [u8; 4], net: [u8; 4], prefix: u8) -> bool {
    if prefix == 0 {
        return true;
    }
    let prefix = if prefix > 32 { 32 } else { prefix };
    let mask = u32::MAX << (32 - prefix as u32);
    (u32::from_be_bytes(addr) & mask) == (u32::from_be_bytes(net) & mask)
}

#[inline(always)]
fn addr_eq(a: &Addr, b: &Addr) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
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
#[inline(always)]
fn owner_rules(
    cfg: &PodConfig,
    conn: &Conn,
    owners: &[u32; MAX_OWNERS],
    n: u8,
    id: u32,
    lo_return: bool,
    by_gid: bool,
) -> Option<Verdict> {
    let lo = conn.dst_is_local;
    let to_local = lo
        && !in_loopback_cidr(cfg, &conn.dst)
        && conn.proto == Proto::Tcp
        && conn.dport != cfg.tunnel_port;
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
            return Some(Verdict::Redirect {
                port: cfg.inbound_port,
                reason,
            });
        }
        // b: anyone else talking to a local address is left alone.
        if lo_return && lo && id != owner {
            let reason = if by_gid {
                Reason::LocalTrafficGid
            } else {
                Reason::LocalTrafficUid
            };
            return Some(Verdict::Pass(reason));
        }
        // c: the proxy's own traffic is left alone.
        if id == owner {
            let reason = if by_gid {
                Reason::ProxyGid
            } else {
                Reason::ProxyUid
            };
            return Some(Verdict::Pass(reason));
        }
        i += 1;
    }
    None
}

/// Decide what istio-iptables' nat OUTPUT rules would do with the first packet of `conn` in a pod
/// configured as `cfg`.
#[inline(always)]
pub fn decide<R: Rules>(cfg: &PodConfig, rules: &R, conn: &Conn) -> Verdict {
    let v4 = conn.is_v4();
    if !v4 && !cfg.has(flags::IPV6) {
        return Verdict::Pass(Reason::NoIpv6Rules);
    }
    // Rule 1: -o, tcp and udp alike, before everything else.
    if rules.member(MemberKind::OutboundExcludePort, conn.dport as u32) {
        return Verdict::Pass(Reason::OutboundPortExcluded);
    }
    // Rule 2: Envoy's inbound passthrough source.
    if conn.dst_is_local {
        let passthrough = if is_v4_mapped(&conn.src) {
            v4_octets(&conn.src) == V4_INBOUND_PASSTHROUGH
        } else {
            addr_eq(&conn.src, &V6_INBOUND_PASSTHROUGH)
        };
        if passthrough {
            return Verdict::Pass(Reason::InboundPassthrough);
        }
    }
    let lo_return = !cfg.has(flags::NO_LO_RETURN);
    // Rules 3 and 4.
    if let Some(v) = owner_rules(cfg, conn, &cfg.uids, cfg.n_uids, conn.uid, lo_return, false) {
        return v;
    }
    if let Some(v) = owner_rules(cfg, conn, &cfg.gids, cfg.n_gids, conn.gid, lo_return, true) {
        return v;
    }
    // Rule 5: owner groups.
    if cfg.has(flags::OWNER_GROUPS_INCLUDE) {
        if !rules.member(MemberKind::OwnerGroupInclude, conn.gid) {
            return Verdict::Pass(Reason::OwnerGroupNotIncluded);
        }
    } else if cfg.has(flags::OWNER_GROUPS_EXCLUDE)
        && rules.member(MemberKind::OwnerGroupExclude, conn.gid)
    {
        return Verdict::Pass(Reason::OwnerGroupExcluded);
    }
    // Rule 6 (DNS) is not part of the outbound TCP capture.
    // Rule 7: localhost.
    if in_loopback_cidr(cfg, &conn.dst) {
        return Verdict::Pass(Reason::LoopbackDestination);
    }
    // Rule 8: -x.
    let (exclude, include) = if v4 {
        (CidrKind::ExcludeV4, CidrKind::IncludeV4)
    } else {
        (CidrKind::ExcludeV6, CidrKind::IncludeV6)
    };
    if rules.cidr(exclude, &conn.dst) {
        return Verdict::Pass(Reason::CidrExcluded);
    }
    let tcp = conn.proto == Proto::Tcp;
    // Rule 9: -q.
    if tcp && rules.member(MemberKind::OutboundIncludePort, conn.dport as u32) {
        return Verdict::Redirect {
            port: cfg.outbound_port,
            reason: Reason::OutboundPortIncluded,
        };
    }
    // Rule 10: -i.
    let matched = if cfg.has(flags::OUTBOUND_ALL) {
        Some(Reason::CaptureAll)
    } else if rules.cidr(include, &conn.dst) {
        Some(Reason::CidrIncluded)
    } else {
        None
    };
    match matched {
        Some(reason) if tcp => Verdict::Redirect {
            port: cfg.outbound_port,
            reason,
        },
        Some(_) => Verdict::Pass(Reason::NotTcp),
        None => Verdict::Pass(Reason::NoMatch),
    }
}

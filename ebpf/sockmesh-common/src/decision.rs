//! The outbound capture decision: istio-iptables' nat OUTPUT chain (`ISTIO_OUTPUT`) as one
//! function. The kernel's connect4/connect6 programs, `sockmesh init --dry-run` and `sockmesh
//! explain` all call [`decide`]; only the set lookups differ (maps in the kernel, in-memory sets on
//! the host), behind the [`Rules`] trait.
//!
//! Rule numbers follow `shared/spec/istio-iptables.md` §2.2 "Locally generated traffic".

use crate::maps::{
    flags, is_v4_mapped, v4_octets, Addr, CidrKind, MemberKind, PodConfig, SockOwner, MAX_OWNERS,
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
    /// The socket's mark (SO_MARK).
    pub mark: u32,
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
    /// Inbound: the tunnel (HBONE) port is never redirected.
    InboundTunnelPort = 19,
    /// Inbound: `-b '*'` and the port is in `-d`.
    InboundPortExcluded = 20,
    /// Inbound: `-b '*'`.
    InboundCaptureAll = 21,
    /// Inbound: the port is in the `-b` list.
    InboundPortIncluded = 22,
    /// Inbound: a `-b` list without this port.
    InboundPortNotListed = 23,
    /// Inbound: `-b ''`, no inbound capture.
    InboundOff = 24,
    /// Inbound: captured, but no proxy listens on the inbound port: refused, as with iptables.
    InboundNoListener = 25,
    /// linkerd: `-o lo -j RETURN`, everything local is left alone.
    LoopbackInterface = 26,
    /// linkerd inbound: the source is in `--subnets-to-ignore`.
    InboundSubnetIgnored = 27,
    /// Rule 6: DNS (port 53) sent to the DNS proxy on 15053.
    DnsCaptured = 28,
    /// Rule 0 (`-c`): the route leaves through an excluded interface, or the connection arrived
    /// on one.
    InterfaceExcluded = 29,
    /// `-k`: arrived on a kube-virt interface, sent to the outbound port.
    KubeVirtRedirect = 30,
    /// `-k` with an `-i` list: arrived on a kube-virt interface for a destination outside it.
    KubeVirtReturn = 31,
    /// TPROXY mode: the proxy user calls a local address; marked 1338 and TPROXYed to the
    /// inbound port.
    TproxyToLocal = 32,
    /// Not a decision: a connection made inside the pod from a non-local (transparent) source
    /// address, remembered so inbound capture leaves it alone as iptables does with lo traffic.
    LocalOrigin = 33,
}

impl Reason {
    pub const ALL: [Reason; 33] = [
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
        Reason::InboundTunnelPort,
        Reason::InboundPortExcluded,
        Reason::InboundCaptureAll,
        Reason::InboundPortIncluded,
        Reason::InboundPortNotListed,
        Reason::InboundOff,
        Reason::InboundNoListener,
        Reason::LoopbackInterface,
        Reason::InboundSubnetIgnored,
        Reason::DnsCaptured,
        Reason::InterfaceExcluded,
        Reason::KubeVirtRedirect,
        Reason::KubeVirtReturn,
        Reason::TproxyToLocal,
        Reason::LocalOrigin,
    ];

    pub const fn from_u32(v: u32) -> Option<Reason> {
        if v >= 1 && v <= Self::ALL.len() as u32 {
            // SAFETY: Reason is repr(u32) with the contiguous values 1..=ALL.len()
            // (checked by the reason_table_is_consistent test). No table lookup: in the kernel
            // a bounds-checked index would leave a panic path the verifier rejects.
            Some(unsafe { core::mem::transmute::<u32, Reason>(v) })
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
            Self::InboundTunnelPort => "inbound_tunnel_port",
            Self::InboundPortExcluded => "inbound_port_excluded",
            Self::InboundCaptureAll => "inbound_capture_all",
            Self::InboundPortIncluded => "inbound_port_included",
            Self::InboundPortNotListed => "inbound_port_not_listed",
            Self::InboundOff => "inbound_off",
            Self::InboundNoListener => "inbound_no_listener",
            Self::LoopbackInterface => "loopback_interface",
            Self::InboundSubnetIgnored => "inbound_subnet_ignored",
            Self::DnsCaptured => "dns_captured",
            Self::InterfaceExcluded => "interface_excluded",
            Self::KubeVirtRedirect => "kube_virt_redirect",
            Self::KubeVirtReturn => "kube_virt_return",
            Self::TproxyToLocal => "tproxy_to_local",
            Self::LocalOrigin => "local_origin",
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
            Self::InboundTunnelPort => "inbound: ISTIO_INBOUND -p tcp --dport TUNNEL -j RETURN",
            Self::InboundPortExcluded => "inbound: ISTIO_INBOUND -p tcp --dport P -j RETURN (-d)",
            Self::InboundCaptureAll => "inbound: ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT (-b '*')",
            Self::InboundPortIncluded => "inbound: ISTIO_INBOUND -p tcp --dport P -j ISTIO_IN_REDIRECT (-b)",
            Self::InboundPortNotListed => "inbound: end of ISTIO_INBOUND, port not in -b",
            Self::InboundOff => "inbound: -b '' (no PREROUTING jump)",
            Self::InboundNoListener => "inbound: redirected, but nothing listens on the inbound port (refused)",
            Self::LoopbackInterface => "linkerd: PROXY_INIT_OUTPUT -o lo -j RETURN",
            Self::InboundSubnetIgnored => "linkerd inbound: PROXY_INIT_REDIRECT -s SUBNET -j RETURN (--subnets-to-ignore)",
            Self::DnsCaptured => "rule 6: ISTIO_OUTPUT_DNS -p tcp|udp --dport 53 [-d SERVER] -j REDIRECT --to-ports 15053",
            Self::InterfaceExcluded => "rule 0: OUTPUT -o IF -j RETURN / PREROUTING -i IF -j RETURN (-c)",
            Self::KubeVirtRedirect => "inbound: PREROUTING -i IF [-d CIDR] -j ISTIO_REDIRECT (-k)",
            Self::KubeVirtReturn => "inbound: PREROUTING -i IF -j RETURN (-k)",
            Self::TproxyToLocal => "TPROXY: mangle OUTPUT -o lo --uid/gid-owner -j MARK 1338, then ISTIO_TPROXY",
            Self::LocalOrigin => "local traffic from a transparent source: PREROUTING -i lo rules leave it alone",
        }
    }
}

/// What to do with a connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Leave the connection alone.
    Pass,
    /// Send it to localhost:`port` (the outbound or the inbound capture port).
    Redirect,
    /// TPROXY mode: leave the destination alone; inbound capture hands the connection to the
    /// listener on `port` (what iptables' TPROXY target does).
    Tproxy,
}

/// The outcome of [`decide`]. A plain struct rather than an enum with data: every field is
/// defined on every path, which the BPF verifier needs (an enum's unused payload can hold a
/// stale pointer in a register).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    /// The capture port (0 for `Pass`).
    pub port: u16,
    pub reason: Reason,
}

impl Verdict {
    pub const fn pass(reason: Reason) -> Self {
        Verdict {
            action: Action::Pass,
            port: 0,
            reason,
        }
    }

    pub const fn redirect(port: u16, reason: Reason) -> Self {
        Verdict {
            action: Action::Redirect,
            port,
            reason,
        }
    }

    pub const fn tproxy(port: u16, reason: Reason) -> Self {
        Verdict {
            action: Action::Tproxy,
            port,
            reason,
        }
    }

    pub const fn reason(self) -> Reason {
        self.reason
    }
}

/// Per-pod set membership, answered by maps in the kernel and by in-memory sets on the host.
pub trait Rules {
    fn member(&self, kind: MemberKind, value: u32) -> bool;
    /// Whether `addr` (IPv6 form) lies in one of the CIDRs of list `kind`.
    fn cidr(&self, kind: CidrKind, addr: &Addr) -> bool;
    /// Whether `port` lies in one of the ranges of port-range list `kind`.
    fn port_range(&self, kind: CidrKind, port: u16) -> bool;
    /// Whether the pod's route to `dst` leaves through an interface excluded with `-c`.
    fn route_excluded(&self, dst: &Addr) -> bool;
}

/// DNS, and the port istio's DNS proxy listens on (fixed in istio).
pub const DNS_PORT: u16 = 53;
pub const DNS_CAPTURE_PORT: u16 = 15053;

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
    let dns = cfg.has(flags::DNS);
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
    if cfg.has(flags::TPROXY) && v.action == Action::Pass && tproxy_to_local(cfg, rules, conn) {
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
    let passthrough = if is_v4_mapped(&conn.src) {
        v4_octets(&conn.src) == V4_INBOUND_PASSTHROUGH
    } else {
        addr_eq(&conn.src, &V6_INBOUND_PASSTHROUGH)
    };
    if !owner || passthrough {
        return false;
    }
    if cfg.has(flags::INBOUND_ALL) {
        !rules.member(MemberKind::InboundExcludePort, conn.dport as u32)
    } else if cfg.has(flags::INBOUND_LIST) {
        rules.member(MemberKind::InboundPort, conn.dport as u32)
    } else {
        false
    }
}

/// istio-iptables' nat OUTPUT rules (`ISTIO_OUTPUT`), or linkerd's.
#[inline(always)]
fn decide_nat<R: Rules>(cfg: &PodConfig, rules: &R, conn: &Conn) -> Verdict {
    let v4 = conn.is_v4();
    if !v4 && !cfg.has(flags::IPV6) {
        return Verdict::pass(Reason::NoIpv6Rules);
    }
    if cfg.has(flags::LINKERD) {
        return decide_linkerd(cfg, rules, conn);
    }
    // Rule 0: -c, the route's output interface is excluded (local destinations use lo).
    if cfg.has(flags::EXCLUDE_IFACES) && !conn.dst_is_local && rules.route_excluded(&conn.dst) {
        return Verdict::pass(Reason::InterfaceExcluded);
    }
    // Rule 1: -o, tcp and udp alike, before everything else.
    if rules.member(MemberKind::OutboundExcludePort, conn.dport as u32) {
        return Verdict::pass(Reason::OutboundPortExcluded);
    }
    // Rule 2: Envoy's inbound passthrough source.
    if conn.dst_is_local {
        let passthrough = if is_v4_mapped(&conn.src) {
            v4_octets(&conn.src) == V4_INBOUND_PASSTHROUGH
        } else {
            addr_eq(&conn.src, &V6_INBOUND_PASSTHROUGH)
        };
        if passthrough {
            return Verdict::pass(Reason::InboundPassthrough);
        }
    }
    let lo_return = !cfg.has(flags::NO_LO_RETURN);
    // Rules 3 and 4.
    if let Some(v) = owner_rules(cfg, conn, lo_return, false) {
        return v;
    }
    if let Some(v) = owner_rules(cfg, conn, lo_return, true) {
        return v;
    }
    // Rule 5: owner groups.
    if cfg.has(flags::OWNER_GROUPS_INCLUDE) {
        if !rules.member(MemberKind::OwnerGroupInclude, conn.gid) {
            return Verdict::pass(Reason::OwnerGroupNotIncluded);
        }
    } else if cfg.has(flags::OWNER_GROUPS_EXCLUDE)
        && rules.member(MemberKind::OwnerGroupExclude, conn.gid)
    {
        return Verdict::pass(Reason::OwnerGroupExcluded);
    }
    // Rule 6: DNS (tcp and udp port 53, to any server or to the pod's resolv.conf servers).
    if cfg.has(flags::DNS) && conn.dport == DNS_PORT {
        let (chain, servers) = if v4 {
            (flags::DNS_V4, CidrKind::DnsServerV4)
        } else {
            (flags::DNS_V6, CidrKind::DnsServerV6)
        };
        if cfg.has(chain) && (cfg.has(flags::DNS_ALL) || rules.cidr(servers, &conn.dst)) {
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
    let matched = if cfg.has(flags::OUTBOUND_ALL) {
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

/// A new connection arriving on one of the pod's interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub src: Addr,
    /// The pod address it is for.
    pub dst: Addr,
    pub dport: u16,
    pub ifindex: u32,
}

/// Decide what the pod's nat PREROUTING rules (istio's `-k` and `-c` rules and
/// `ISTIO_INBOUND`, or linkerd's `PROXY_INIT_REDIRECT`) would do with a new TCP connection.
#[inline(always)]
pub fn decide_inbound<R: Rules>(cfg: &PodConfig, rules: &R, a: &Arrival) -> Verdict {
    let src = &a.src;
    let dport = a.dport;
    let v4 = is_v4_mapped(src);
    if !v4 && !cfg.has(flags::IPV6) {
        return Verdict::pass(Reason::NoIpv6Rules);
    }
    let redirect = |reason| Verdict::redirect(cfg.inbound_port, reason);
    // -k: inserted first in PREROUTING: traffic entering there is outbound traffic.
    if cfg.has(flags::KUBE_VIRT) && rules.member(MemberKind::KubeVirtIfindex, a.ifindex) {
        let include = if v4 {
            CidrKind::IncludeV4
        } else {
            CidrKind::IncludeV6
        };
        return if cfg.has(flags::OUTBOUND_ALL) || rules.cidr(include, &a.dst) {
            Verdict::redirect(cfg.outbound_port, Reason::KubeVirtRedirect)
        } else {
            Verdict::pass(Reason::KubeVirtReturn)
        };
    }
    // -c: appended to PREROUTING before the ISTIO_INBOUND jump.
    if cfg.has(flags::EXCLUDE_IFACES) && rules.member(MemberKind::ExcludedIfindex, a.ifindex) {
        return Verdict::pass(Reason::InterfaceExcluded);
    }
    if cfg.has(flags::LINKERD) {
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
        if !cfg.has(flags::INBOUND_LIST) {
            return redirect(Reason::InboundCaptureAll);
        }
        return if rules.port_range(CidrKind::RedirectPorts, dport) {
            redirect(Reason::InboundPortIncluded)
        } else {
            Verdict::pass(Reason::InboundPortNotListed)
        };
    }
    // TPROXY mode has no nat ISTIO_INBOUND jump, so the tunnel port is not exempt.
    let tunnel = !cfg.has(flags::TPROXY) && dport == cfg.tunnel_port;
    if cfg.has(flags::INBOUND_ALL) {
        if tunnel {
            Verdict::pass(Reason::InboundTunnelPort)
        } else if rules.member(MemberKind::InboundExcludePort, dport as u32) {
            Verdict::pass(Reason::InboundPortExcluded)
        } else {
            redirect(Reason::InboundCaptureAll)
        }
    } else if cfg.has(flags::INBOUND_LIST) {
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

#[cfg(test)]
mod tests {
    //! The decision against the rules of shared/spec/istio-iptables.md, case by case.
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::maps::{v4_mapped, MAX_OWNERS};

    #[derive(Default)]
    struct Sets {
        members: Vec<(MemberKind, u32)>,
        cidrs: Vec<(CidrKind, Addr, u8)>,
        ranges: Vec<(CidrKind, u16, u16)>,
        excluded_routes: Vec<Addr>,
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

    fn cfg(flags: u32, uids: &[u32], gids: &[u32]) -> PodConfig {
        let mut u = [0; MAX_OWNERS];
        u[..uids.len()].copy_from_slice(uids);
        let mut g = [0; MAX_OWNERS];
        g[..gids.len()].copy_from_slice(gids);
        PodConfig {
            flags,
            outbound_port: 15001,
            inbound_port: 15006,
            tunnel_port: 15008,
            loopback_v4_prefix: 32,
            n_uids: uids.len() as u8,
            n_gids: gids.len() as u8,
            _pad: [0; 3],
            loopback_v4: [127, 0, 0, 1],
            uids: u,
            gids: g,
            src_v4: [0; 4],
            src_v6: [0; 16],
            tproxy_mark: 1337,
            tproxy_table: 133,
        }
    }

    fn default_cfg() -> PodConfig {
        cfg(flags::OUTBOUND_ALL, &[1337], &[1337])
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
        let c = cfg(flags::OUTBOUND_ALL, &[1337, 1338], &[1337, 1338]);
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
        let c = cfg(0, &[1337], &[1337]);
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
        let c = cfg(0, &[1337], &[1337]);
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
            flags::OUTBOUND_ALL | flags::OWNER_GROUPS_INCLUDE,
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
            flags::OUTBOUND_ALL | flags::OWNER_GROUPS_EXCLUDE,
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
        let c = cfg(flags::NO_LO_RETURN, &[1337], &[1337]);
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
        let c6 = cfg(flags::OUTBOUND_ALL | flags::IPV6, &[1337], &[1337]);
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
        let dns = flags::OUTBOUND_ALL | flags::DNS | flags::DNS_V4;
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
        let all = cfg(dns | flags::DNS_ALL, &[1337], &[1337]);
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
        let c6 = cfg(dns | flags::IPV6 | flags::DNS_ALL, &[1337], &[1337]);
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
            flags::OUTBOUND_ALL | flags::INBOUND_ALL | flags::EXCLUDE_IFACES | flags::KUBE_VIRT,
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
        let listed = cfg(flags::INBOUND_ALL | flags::KUBE_VIRT, &[1337], &[1337]);
        assert_eq!(
            decide_inbound(&listed, &s, &on(4)),
            Verdict::pass(Reason::KubeVirtReturn)
        );
    }

    #[test]
    fn tproxy() {
        let c = cfg(
            flags::OUTBOUND_ALL | flags::INBOUND_ALL | flags::TPROXY,
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

    #[test]
    fn reason_table_is_consistent() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32 + 1);
            assert_eq!(Reason::from_u32(*r as u32), Some(*r));
        }
        assert_eq!(Reason::from_u32(0), None);
        assert_eq!(Reason::from_u32(Reason::ALL.len() as u32 + 1), None);
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
        let mut c = cfg(flags::LINKERD | flags::IPV6, &[2102], &[]);
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
        listed.flags |= flags::INBOUND_LIST;
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
        let all = cfg(flags::OUTBOUND_ALL | flags::INBOUND_ALL, &[1337], &[1337]);
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
        let list = cfg(flags::INBOUND_LIST, &[1337], &[1337]);
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
        let off = cfg(0, &[1337], &[1337]);
        assert_eq!(
            decide_inbound(&off, &s, &arr(PEER, 8080)),
            Verdict::pass(Reason::InboundOff)
        );
    }
}

//! A pod's capture settings as userspace holds them: the `PodConfig` map value plus its sets,
//! with a host implementation of [`Rules`] so the kernel's decision runs here unchanged.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Deserialize, Serialize};
use sockmesh_common::{
    flags, is_v4_mapped, v4_mapped, v4_octets, Addr, CidrKind, MemberKind, PodConfig, Rules,
    MAX_OWNERS,
};

/// An IP prefix, host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - prefix as u32)
                };
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
            }
            IpAddr::V6(a) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - prefix as u32)
                };
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
            }
        };
        Cidr { addr, prefix }
    }

    /// The address as given (before masking, for the loopback check it is the same class).
    pub fn ip(&self) -> IpAddr {
        self.addr
    }

    pub fn is_v6(&self) -> bool {
        self.addr.is_ipv6()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Cidr::new(ip, self.prefix).addr == self.addr
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Everything the agent writes for one pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    #[serde(with = "config_serde")]
    pub config: PodConfig,
    pub members: Vec<(MemberKind, u32)>,
    pub cidrs: Vec<(CidrKind, Cidr)>,
    /// Port-range lists (linkerd): (list, first, last).
    #[serde(default)]
    pub ranges: Vec<(CidrKind, u16, u16)>,
    /// `-c` and `-k` interface names, resolved to indexes by the agent in the pod's netns.
    #[serde(default)]
    pub exclude_ifaces: Vec<String>,
    #[serde(default)]
    pub kube_virt_ifaces: Vec<String>,
    /// The pod's main routing table (`-c`): each route, and whether it leaves through an
    /// excluded interface. Read by the agent in the pod's netns; never trusted from the caller.
    #[serde(default)]
    pub routes: Vec<(Cidr, bool)>,
    /// The source address the kernel picks for each route of the pod (agent-filled).
    #[serde(default)]
    pub route_sources: Vec<(Cidr, IpAddr)>,
}

/// The prefixes of the 16-bit port space that exactly cover `lo..=hi`: (first port, prefix
/// length in bits).
pub fn port_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (lo as u32, hi as u32);
    while lo <= hi {
        // The largest aligned block starting at lo that ends at or before hi.
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1u32 << lo.trailing_zeros()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, (16 - size.trailing_zeros()) as u8));
        lo += size;
    }
    out
}

impl PodSpec {
    pub fn new(
        config: PodConfig,
        mut members: Vec<(MemberKind, u32)>,
        cidrs: Vec<(CidrKind, Cidr)>,
        ranges: Vec<(CidrKind, u16, u16)>,
    ) -> Self {
        members.sort();
        members.dedup();
        PodSpec {
            config,
            members,
            cidrs,
            ranges,
            exclude_ifaces: Vec::new(),
            kube_virt_ifaces: Vec::new(),
            routes: Vec::new(),
            route_sources: Vec::new(),
        }
    }

    /// Check what the wire may have mangled: sizes, kinds matching families, prefix lengths.
    pub fn validate(&self) -> Result<(), String> {
        let c = &self.config;
        if c.flags & !flags::ALL != 0 {
            return Err(format!(
                "flags: unknown bits {:#x} (this agent knows {:#x}): is the caller newer than the agent?",
                c.flags & !flags::ALL,
                flags::ALL
            ));
        }
        let both = |a: u32, b: u32| c.has(a) && c.has(b);
        let contradictions = [
            (
                both(flags::INBOUND_ALL, flags::INBOUND_LIST),
                "inbound capture of every port (-b '*') and of a list (-b p1,p2) at once",
            ),
            (
                both(flags::OWNER_GROUPS_INCLUDE, flags::OWNER_GROUPS_EXCLUDE),
                "an owner-group include list and exclude list at once (istio uses one)",
            ),
            (
                both(flags::LINKERD, flags::TPROXY),
                "linkerd rules in TPROXY mode (proxy-init has no TPROXY)",
            ),
            (
                c.flags & (flags::DNS_V4 | flags::DNS_V6 | flags::DNS_ALL) != 0
                    && !c.has(flags::DNS),
                "DNS chain bits without DNS capture",
            ),
            (
                c.has(flags::TPROXY) && (c.tproxy_mark == 0 || c.tproxy_table == 0),
                "TPROXY mode without a mark (-t) and a routing table (-r)",
            ),
            (
                c.has(flags::EXCLUDE_IFACES) && self.exclude_ifaces.is_empty(),
                "-c is on but names no interface",
            ),
            (
                c.has(flags::KUBE_VIRT) && self.kube_virt_ifaces.is_empty(),
                "-k is on but names no interface",
            ),
        ];
        if let Some((_, what)) = contradictions.iter().find(|(bad, _)| *bad) {
            return Err(format!("contradictory settings: {what}"));
        }
        if c.n_uids as usize > MAX_OWNERS || c.n_gids as usize > MAX_OWNERS {
            return Err(format!("at most {MAX_OWNERS} proxy uids and gids"));
        }
        let tunnel_ok = c.tunnel_port != 0 || c.has(flags::LINKERD);
        if c.outbound_port == 0 || c.inbound_port == 0 || !tunnel_ok {
            return Err("capture and tunnel ports must be 1-65535".into());
        }
        if !(8..=32).contains(&c.loopback_v4_prefix) || c.loopback_v4[0] != 127 {
            return Err("loopback CIDR must be 127.x.x.x with a prefix of 8 to 32".into());
        }
        for (kind, cidr) in &self.cidrs {
            let max = if cidr.is_v6() { 128 } else { 32 };
            if kind.is_v6() != cidr.is_v6() || cidr.prefix > max {
                return Err(format!("CIDR {cidr} does not fit list {kind:?}"));
            }
            // Routes are the agent's to read, and port ranges travel in `ranges`.
            if kind.is_port() || matches!(kind, CidrKind::RouteV4 | CidrKind::RouteV6) {
                return Err(format!("list {kind:?} cannot be set by the caller"));
            }
        }
        for (kind, _, _) in &self.ranges {
            if !kind.is_port() {
                return Err(format!("{kind:?} is not a port-range list"));
            }
        }
        for (kind, v) in &self.members {
            let port_kind = !matches!(
                kind,
                MemberKind::OwnerGroupInclude
                    | MemberKind::OwnerGroupExclude
                    | MemberKind::ExcludedIfindex
                    | MemberKind::KubeVirtIfindex
            );
            if port_kind && (*v == 0 || *v > 65535) {
                return Err(format!("{}: {v} is not a port", kind.istio_name()));
            }
        }
        Ok(())
    }

    fn has_member(&self, kind: MemberKind, value: u32) -> bool {
        self.members.contains(&(kind, value))
    }

    fn members_of(&self, kind: MemberKind) -> Vec<String> {
        self.members
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, v)| v.to_string())
            .collect()
    }

    fn cidrs_of(&self, kinds: [CidrKind; 2]) -> Vec<String> {
        self.cidrs
            .iter()
            .filter(|(k, _)| kinds.contains(k))
            .map(|(_, c)| c.to_string())
            .collect()
    }

    /// Interface names as given, or (read back from the maps) their indexes.
    fn ifaces(&self, names: &[String], kind: MemberKind) -> String {
        if !names.is_empty() {
            return names.join(",");
        }
        let idx = self.members_of(kind);
        if idx.is_empty() {
            "''".into()
        } else {
            format!("ifindex {}", idx.join(","))
        }
    }

    fn dns_setting(&self) -> String {
        let c = &self.config;
        if !c.has(flags::DNS) {
            "off".into()
        } else if c.has(flags::DNS_ALL) {
            "every port-53 destination (--capture-all-dns)".into()
        } else {
            format!(
                "resolv.conf servers {}",
                self.cidrs_of([CidrKind::DnsServerV4, CidrKind::DnsServerV6])
                    .join(",")
            )
        }
    }

    fn ranges_of(&self, kind: CidrKind) -> Vec<String> {
        self.ranges
            .iter()
            .filter(|(k, _, _)| *k == kind)
            .map(|(_, lo, hi)| {
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}-{hi}")
                }
            })
            .collect()
    }

    /// The settings in linkerd2-proxy-init's terms.
    fn describe_linkerd(&self) -> Vec<(String, String)> {
        let c = &self.config;
        let join = |v: Vec<String>| {
            if v.is_empty() {
                "''".to_string()
            } else {
                v.join(",")
            }
        };
        let id = |n: u8, v: u32| {
            if n == 0 {
                "-1 (none)".to_string()
            } else {
                v.to_string()
            }
        };
        let redirect = if c.has(flags::INBOUND_LIST) {
            join(self.ranges_of(CidrKind::RedirectPorts))
        } else {
            "all".to_string()
        };
        vec![
            ("profile".into(), "linkerd (proxy-init)".into()),
            ("--incoming-proxy-port".into(), c.inbound_port.to_string()),
            ("--outgoing-proxy-port".into(), c.outbound_port.to_string()),
            ("--proxy-uid".into(), id(c.n_uids, c.uids[0])),
            ("--proxy-gid".into(), id(c.n_gids, c.gids[0])),
            ("--ports-to-redirect".into(), redirect),
            (
                "--inbound-ports-to-ignore".into(),
                join(self.ranges_of(CidrKind::InboundIgnorePorts)),
            ),
            (
                "--outbound-ports-to-ignore".into(),
                join(self.ranges_of(CidrKind::OutboundIgnorePorts)),
            ),
            (
                "--subnets-to-ignore".into(),
                join(self.cidrs_of([CidrKind::IgnoreSubnetV4, CidrKind::IgnoreSubnetV6])),
            ),
            ("--ipv6".into(), c.has(flags::IPV6).to_string()),
        ]
    }

    /// The settings in the terms of the tool they came from (istio-iptables or linkerd's
    /// proxy-init), one `name: value` per line.
    pub fn describe(&self) -> Vec<(String, String)> {
        if self.config.has(flags::LINKERD) {
            return self.describe_linkerd();
        }
        let c = &self.config;
        let join = |v: Vec<String>| {
            if v.is_empty() {
                "''".to_string()
            } else {
                v.join(",")
            }
        };
        let uids: Vec<String> = c.uids[..c.n_uids as usize]
            .iter()
            .map(u32::to_string)
            .collect();
        let gids: Vec<String> = c.gids[..c.n_gids as usize]
            .iter()
            .map(u32::to_string)
            .collect();
        let inbound = if c.has(flags::INBOUND_ALL) {
            "*".to_string()
        } else {
            join(self.members_of(MemberKind::InboundPort))
        };
        let include = if c.has(flags::OUTBOUND_ALL) {
            "*".to_string()
        } else {
            join(self.cidrs_of([CidrKind::IncludeV4, CidrKind::IncludeV6]))
        };
        let owner_include = if c.has(flags::OWNER_GROUPS_INCLUDE) {
            join(self.members_of(MemberKind::OwnerGroupInclude))
        } else {
            "*".to_string()
        };
        vec![
            (
                "-p (outbound capture port)".into(),
                c.outbound_port.to_string(),
            ),
            (
                "-z (inbound capture port)".into(),
                c.inbound_port.to_string(),
            ),
            ("-e (inbound tunnel port)".into(), c.tunnel_port.to_string()),
            ("-u (proxy uids)".into(), join(uids)),
            ("-g (proxy gids)".into(), join(gids)),
            ("-i (outbound CIDRs captured)".into(), include),
            (
                "-x (outbound CIDRs excluded)".into(),
                join(self.cidrs_of([CidrKind::ExcludeV4, CidrKind::ExcludeV6])),
            ),
            (
                "-q (outbound ports captured)".into(),
                join(self.members_of(MemberKind::OutboundIncludePort)),
            ),
            (
                "-o (outbound ports excluded)".into(),
                join(self.members_of(MemberKind::OutboundExcludePort)),
            ),
            ("-b (inbound ports)".into(), inbound),
            (
                "-d (inbound ports excluded)".into(),
                join(self.members_of(MemberKind::InboundExcludePort)),
            ),
            ("owner groups captured".into(), owner_include),
            (
                "owner groups excluded".into(),
                join(self.members_of(MemberKind::OwnerGroupExclude)),
            ),
            (
                "IPv4 loopback CIDR".into(),
                format!("{}/{}", Ipv4Addr::from(c.loopback_v4), c.loopback_v4_prefix),
            ),
            ("IPv6 capture".into(), c.has(flags::IPV6).to_string()),
            ("DNS capture (to 15053)".into(), self.dns_setting()),
            (
                "socket acceleration (SOCKMESH_ACCELERATION)".into(),
                if c.has(flags::NO_ACCEL) {
                    "off"
                } else if c.has(flags::ACCEL_APPS) {
                    "all (the app's sockets too)"
                } else {
                    "proxies (the proxy's sockets)"
                }
                .into(),
            ),
            (
                "-m (inbound interception mode)".into(),
                if c.has(flags::TPROXY) {
                    format!("TPROXY (mark {}, table {})", c.tproxy_mark, c.tproxy_table)
                } else {
                    "REDIRECT".into()
                },
            ),
            (
                "-c (excluded interfaces)".into(),
                self.ifaces(&self.exclude_ifaces, MemberKind::ExcludedIfindex),
            ),
            (
                "-k (kube-virt interfaces)".into(),
                self.ifaces(&self.kube_virt_ifaces, MemberKind::KubeVirtIfindex),
            ),
            (
                "-o lo ! --uid-owner RETURN rules".into(),
                if c.has(flags::NO_LO_RETURN) {
                    "omitted (-i has a loopback CIDR)"
                } else {
                    "present"
                }
                .into(),
            ),
        ]
    }
}

impl Rules for PodSpec {
    fn member(&self, kind: MemberKind, value: u32) -> bool {
        self.has_member(kind, value)
    }

    fn cidr(&self, kind: CidrKind, addr: &Addr) -> bool {
        let ip = addr_to_ip(addr);
        self.cidrs.iter().any(|(k, c)| *k == kind && c.contains(ip))
    }

    fn port_range(&self, kind: CidrKind, port: u16) -> bool {
        self.ranges
            .iter()
            .any(|(k, lo, hi)| *k == kind && (*lo..=*hi).contains(&port))
    }

    fn route_excluded(&self, dst: &Addr) -> bool {
        let ip = addr_to_ip(dst);
        self.routes
            .iter()
            .filter(|(c, _)| c.contains(ip))
            .max_by_key(|(c, _)| c.prefix)
            .is_some_and(|(_, excluded)| *excluded)
    }
}

#[cfg(test)]
mod tests {
    use super::port_prefixes;

    #[test]
    fn port_ranges_become_exact_prefixes() {
        assert_eq!(port_prefixes(4567, 4567), vec![(4567, 16)]);
        assert_eq!(port_prefixes(0, 65535), vec![(0, 0)]);
        assert_eq!(port_prefixes(4566, 4569), vec![(4566, 15), (4568, 15)]);
        for (lo, hi) in [
            (1, 1000),
            (4190, 4191),
            (30000, 32767),
            (65535, 65535),
            (7, 9),
        ] {
            let mut covered = Vec::new();
            for (start, bits) in port_prefixes(lo, hi) {
                let size = 1u32 << (16 - bits);
                assert_eq!(start as u32 % size, 0, "unaligned block");
                covered.extend(start as u32..start as u32 + size);
            }
            assert_eq!(
                covered,
                (lo as u32..=hi as u32).collect::<Vec<_>>(),
                "{lo}-{hi}"
            );
        }
    }
}

/// [`Addr`] (IPv6 form, v4-mapped for IPv4) to a std address of the right family.
pub fn addr_to_ip(a: &Addr) -> IpAddr {
    if is_v4_mapped(a) {
        IpAddr::V4(Ipv4Addr::from(v4_octets(a)))
    } else {
        IpAddr::V6(Ipv6Addr::from(*a))
    }
}

pub fn ip_to_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// `PodConfig` as plain JSON fields (it has no serde impls: it is a kernel type).
mod config_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use sockmesh_common::{PodConfig, MAX_OWNERS};

    #[derive(Serialize, Deserialize)]
    struct Wire {
        flags: u32,
        outbound_port: u16,
        inbound_port: u16,
        tunnel_port: u16,
        loopback_v4: [u8; 4],
        loopback_v4_prefix: u8,
        uids: Vec<u32>,
        gids: Vec<u32>,
        #[serde(default)]
        src_v4: [u8; 4],
        #[serde(default)]
        src_v6: [u8; 16],
        #[serde(default)]
        tproxy_mark: u32,
        #[serde(default)]
        tproxy_table: u32,
    }

    pub fn serialize<S: Serializer>(c: &PodConfig, s: S) -> Result<S::Ok, S::Error> {
        Wire {
            flags: c.flags,
            outbound_port: c.outbound_port,
            inbound_port: c.inbound_port,
            tunnel_port: c.tunnel_port,
            loopback_v4: c.loopback_v4,
            loopback_v4_prefix: c.loopback_v4_prefix,
            uids: c.uids[..(c.n_uids as usize).min(MAX_OWNERS)].to_vec(),
            gids: c.gids[..(c.n_gids as usize).min(MAX_OWNERS)].to_vec(),
            src_v4: c.src_v4,
            src_v6: c.src_v6,
            tproxy_mark: c.tproxy_mark,
            tproxy_table: c.tproxy_table,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PodConfig, D::Error> {
        let w = Wire::deserialize(d)?;
        if w.uids.len() > MAX_OWNERS || w.gids.len() > MAX_OWNERS {
            return Err(serde::de::Error::custom(format!(
                "at most {MAX_OWNERS} uids and gids"
            )));
        }
        let mut uids = [0; MAX_OWNERS];
        uids[..w.uids.len()].copy_from_slice(&w.uids);
        let mut gids = [0; MAX_OWNERS];
        gids[..w.gids.len()].copy_from_slice(&w.gids);
        Ok(PodConfig {
            flags: w.flags,
            outbound_port: w.outbound_port,
            inbound_port: w.inbound_port,
            tunnel_port: w.tunnel_port,
            loopback_v4_prefix: w.loopback_v4_prefix,
            n_uids: w.uids.len() as u8,
            n_gids: w.gids.len() as u8,
            _pad: [0; 3],
            loopback_v4: w.loopback_v4,
            uids,
            gids,
            src_v4: w.src_v4,
            src_v6: w.src_v6,
            tproxy_mark: w.tproxy_mark,
            tproxy_table: w.tproxy_table,
        })
    }
}

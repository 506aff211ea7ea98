//! The pod model: a pod's capture settings as userspace holds them (the `PodConfig` map value
//! plus its sets), checked for what the wire may have mangled, described in the terms of the
//! tool they came from, and answering [`Rules`] so the kernel's decision runs here unchanged.

use std::net::{IpAddr, Ipv4Addr};

use sockmesh_common::{Addr, CidrKind, MemberKind, PodConfig, PodFlags, Rules, MAX_OWNERS};

use super::net::{addr_to_ip, Cidr};

/// Why a pod's settings cannot be written: what they contradict or do not fit.
#[derive(Debug, thiserror::Error)]
pub enum InvalidSpec {
    #[error("contradictory settings: {0}")]
    Contradiction(&'static str),
    #[error("at most {MAX_OWNERS} proxy uids and gids")]
    TooManyOwners,
    #[error("capture and tunnel ports must be 1-65535")]
    Ports,
    #[error("loopback CIDR must be 127.x.x.x with a prefix of 8 to 32")]
    LoopbackCidr,
    #[error("CIDR {cidr} does not fit list {kind:?}")]
    CidrMisfit { cidr: Cidr, kind: CidrKind },
    #[error("list {0:?} cannot be set by the caller")]
    AgentList(CidrKind),
    #[error("{0:?} is not a port-range list")]
    NotPortRange(CidrKind),
    #[error("{}: {value} is not a port", kind.istio_name())]
    NotAPort { kind: MemberKind, value: u32 },
}

/// Everything the agent writes for one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub config: PodConfig,
    pub members: Vec<(MemberKind, u32)>,
    pub cidrs: Vec<(CidrKind, Cidr)>,
    /// Port-range lists (linkerd): (list, first, last).
    pub ranges: Vec<(CidrKind, u16, u16)>,
    /// `-c` and `-k` interface names, resolved to indexes by the agent in the pod's netns.
    pub exclude_ifaces: Vec<String>,
    pub kube_virt_ifaces: Vec<String>,
    /// The pod's main routing table (`-c`): each route, and whether it leaves through an
    /// excluded interface. Read by the agent in the pod's netns; never trusted from the caller.
    pub routes: Vec<(Cidr, bool)>,
    /// The source address the kernel picks for each route of the pod (agent-filled).
    pub route_sources: Vec<(Cidr, IpAddr)>,
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
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        let c = &self.config;
        let both = |a: PodFlags, b: PodFlags| c.has(a) && c.has(b);
        let contradictions = [
            (
                both(PodFlags::INBOUND_ALL, PodFlags::INBOUND_LIST),
                "inbound capture of every port (-b '*') and of a list (-b p1,p2) at once",
            ),
            (
                both(
                    PodFlags::OWNER_GROUPS_INCLUDE,
                    PodFlags::OWNER_GROUPS_EXCLUDE,
                ),
                "an owner-group include list and exclude list at once (istio uses one)",
            ),
            (
                both(PodFlags::LINKERD, PodFlags::TPROXY),
                "linkerd rules in TPROXY mode (proxy-init has no TPROXY)",
            ),
            (
                c.has(PodFlags::DNS_V4 | PodFlags::DNS_V6 | PodFlags::DNS_ALL)
                    && !c.has(PodFlags::DNS),
                "DNS chain bits without DNS capture",
            ),
            (
                c.has(PodFlags::TPROXY) && (c.tproxy_mark == 0 || c.tproxy_table == 0),
                "TPROXY mode without a mark (-t) and a routing table (-r)",
            ),
            (
                c.has(PodFlags::EXCLUDE_IFACES) && self.exclude_ifaces.is_empty(),
                "-c is on but names no interface",
            ),
            (
                c.has(PodFlags::KUBE_VIRT) && self.kube_virt_ifaces.is_empty(),
                "-k is on but names no interface",
            ),
        ];
        if let Some((_, what)) = contradictions.iter().find(|(bad, _)| *bad) {
            return Err(InvalidSpec::Contradiction(what));
        }
        if c.n_uids as usize > MAX_OWNERS || c.n_gids as usize > MAX_OWNERS {
            return Err(InvalidSpec::TooManyOwners);
        }
        let tunnel_ok = c.tunnel_port != 0 || c.has(PodFlags::LINKERD);
        if c.outbound_port == 0 || c.inbound_port == 0 || !tunnel_ok {
            return Err(InvalidSpec::Ports);
        }
        if !(8..=32).contains(&c.loopback_v4_prefix) || c.loopback_v4[0] != 127 {
            return Err(InvalidSpec::LoopbackCidr);
        }
        for &(kind, cidr) in &self.cidrs {
            let max = if cidr.is_v6() { 128 } else { 32 };
            if kind.is_v6() != cidr.is_v6() || cidr.prefix > max {
                return Err(InvalidSpec::CidrMisfit { cidr, kind });
            }
            // Routes are the agent's to read, and port ranges travel in `ranges`.
            if kind.is_port() || matches!(kind, CidrKind::RouteV4 | CidrKind::RouteV6) {
                return Err(InvalidSpec::AgentList(kind));
            }
        }
        for &(kind, _, _) in &self.ranges {
            if !kind.is_port() {
                return Err(InvalidSpec::NotPortRange(kind));
            }
        }
        for &(kind, value) in &self.members {
            let port_kind = !matches!(
                kind,
                MemberKind::OwnerGroupInclude
                    | MemberKind::OwnerGroupExclude
                    | MemberKind::ExcludedIfindex
                    | MemberKind::KubeVirtIfindex
            );
            if port_kind && (value == 0 || value > 65535) {
                return Err(InvalidSpec::NotAPort { kind, value });
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
        if !c.has(PodFlags::DNS) {
            "off".into()
        } else if c.has(PodFlags::DNS_ALL) {
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
        let id = |n: u8, v: u32| {
            if n == 0 {
                "-1 (none)".to_string()
            } else {
                v.to_string()
            }
        };
        let redirect = if c.has(PodFlags::INBOUND_LIST) {
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
            ("--ipv6".into(), c.has(PodFlags::IPV6).to_string()),
        ]
    }

    /// The settings in the terms of the tool they came from (istio-iptables or linkerd's
    /// proxy-init), one `name: value` per line.
    pub fn describe(&self) -> Vec<(String, String)> {
        if self.config.has(PodFlags::LINKERD) {
            return self.describe_linkerd();
        }
        let c = &self.config;
        let uids: Vec<String> = c.uids[..c.n_uids as usize]
            .iter()
            .map(u32::to_string)
            .collect();
        let gids: Vec<String> = c.gids[..c.n_gids as usize]
            .iter()
            .map(u32::to_string)
            .collect();
        let inbound = if c.has(PodFlags::INBOUND_ALL) {
            "*".to_string()
        } else {
            join(self.members_of(MemberKind::InboundPort))
        };
        let include = if c.has(PodFlags::OUTBOUND_ALL) {
            "*".to_string()
        } else {
            join(self.cidrs_of([CidrKind::IncludeV4, CidrKind::IncludeV6]))
        };
        let owner_include = if c.has(PodFlags::OWNER_GROUPS_INCLUDE) {
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
            ("IPv6 capture".into(), c.has(PodFlags::IPV6).to_string()),
            ("DNS capture (to 15053)".into(), self.dns_setting()),
            (
                "socket acceleration (SOCKMESH_ACCELERATION)".into(),
                if c.has(PodFlags::NO_ACCEL) {
                    "off"
                } else if c.has(PodFlags::ACCEL_APPS) {
                    "all (the app's sockets too)"
                } else {
                    "proxies (the proxy's sockets)"
                }
                .into(),
            ),
            (
                "-m (inbound interception mode)".into(),
                if c.has(PodFlags::TPROXY) {
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
                if c.has(PodFlags::NO_LO_RETURN) {
                    "omitted (-i has a loopback CIDR)"
                } else {
                    "present"
                }
                .into(),
            ),
        ]
    }
}

/// A list as istio-iptables prints it: comma-separated, or `''` when empty.
fn join(v: Vec<String>) -> String {
    if v.is_empty() {
        "''".to_string()
    } else {
        v.join(",")
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

//! A [`PodSpec`] on the wire: to and from the registration API's `PodSettings`. Structural
//! problems are named by field here; the meaning is checked afterwards by
//! [`PodSpec::validate`].

use sockmesh_api::pb;
use sockmesh_common::{CidrKind, MemberKind, PodConfig, PodFlags, MAX_OWNERS};

use super::{net::Cidr, spec::PodSpec};

/// Most entries of each repeated field accepted (a pod's lists are far shorter).
pub const MAX_ENTRIES: usize = 65536;

/// A `PodSettings` field that does not hold what it must.
#[derive(Debug, thiserror::Error)]
pub enum BadSettings {
    #[error(
        "flags: unknown bits {unknown:#x} (this agent knows {known:#x}): is the caller newer than the agent?",
        known = PodFlags::ALL.bits()
    )]
    UnknownFlags { unknown: u32 },
    #[error("uids, gids: at most {MAX_OWNERS} of each")]
    TooManyOwners,
    #[error("{field}: {len} entries, at most {MAX_ENTRIES}")]
    TooManyEntries { field: &'static str, len: usize },
    #[error("loopback_v4: {0} bytes, want the 4 bytes of an IPv4 address")]
    LoopbackAddr(usize),
    #[error("loopback_v4_prefix: {0} is not 0-32")]
    LoopbackPrefix(u32),
    #[error("{field}: {value} is not a port (0-65535)")]
    Port { field: &'static str, value: u32 },
    #[error("{field}: unknown kind {kind}")]
    UnknownKind { field: &'static str, kind: u32 },
    #[error("prefixes: {0:?} is not an address/prefix-length")]
    Prefix(String),
    #[error("port_ranges: {first}-{last} is empty")]
    EmptyRange { first: u16, last: u16 },
}

impl From<&PodSpec> for pb::PodSettings {
    fn from(s: &PodSpec) -> Self {
        let c = &s.config;
        pb::PodSettings {
            flags: c.flags.bits(),
            outbound_port: c.outbound_port.into(),
            inbound_port: c.inbound_port.into(),
            tunnel_port: c.tunnel_port.into(),
            uids: c.proxy_uids().to_vec(),
            gids: c.proxy_gids().to_vec(),
            loopback_v4: c.loopback_v4.to_vec(),
            loopback_v4_prefix: c.loopback_v4_prefix.into(),
            tproxy_mark: c.tproxy_mark,
            tproxy_table: c.tproxy_table,
            members: s
                .members
                .iter()
                .map(|&(kind, value)| pb::Member {
                    kind: kind as u32,
                    value,
                })
                .collect(),
            prefixes: s
                .cidrs
                .iter()
                .map(|(kind, cidr)| pb::Prefix {
                    kind: *kind as u32,
                    cidr: cidr.to_string(),
                })
                .collect(),
            port_ranges: s
                .ranges
                .iter()
                .map(|&(kind, first, last)| pb::PortRange {
                    kind: kind as u32,
                    first: first.into(),
                    last: last.into(),
                })
                .collect(),
            exclude_interfaces: s.exclude_ifaces.clone(),
            kube_virt_interfaces: s.kube_virt_ifaces.clone(),
        }
    }
}

fn port(field: &'static str, value: u32) -> Result<u16, BadSettings> {
    u16::try_from(value).map_err(|_| BadSettings::Port { field, value })
}

fn member_kind(kind: u32) -> Result<MemberKind, BadSettings> {
    MemberKind::from_u32(kind).ok_or(BadSettings::UnknownKind {
        field: "members",
        kind,
    })
}

fn list_kind(field: &'static str, kind: u32) -> Result<CidrKind, BadSettings> {
    CidrKind::from_u32(kind).ok_or(BadSettings::UnknownKind { field, kind })
}

/// The settings of a request as a [`PodSpec`].
impl TryFrom<pb::PodSettings> for PodSpec {
    type Error = BadSettings;

    fn try_from(s: pb::PodSettings) -> Result<Self, BadSettings> {
        let flags = PodFlags::from_bits(s.flags)
            .map_err(|unknown| BadSettings::UnknownFlags { unknown })?;
        if s.uids.len() > MAX_OWNERS || s.gids.len() > MAX_OWNERS {
            return Err(BadSettings::TooManyOwners);
        }
        for (field, len) in [
            ("members", s.members.len()),
            ("prefixes", s.prefixes.len()),
            ("port_ranges", s.port_ranges.len()),
            ("exclude_interfaces", s.exclude_interfaces.len()),
            ("kube_virt_interfaces", s.kube_virt_interfaces.len()),
        ] {
            if len > MAX_ENTRIES {
                return Err(BadSettings::TooManyEntries { field, len });
            }
        }
        let mut config = PodConfig::new(
            flags,
            port("outbound_port", s.outbound_port)?,
            port("inbound_port", s.inbound_port)?,
            port("tunnel_port", s.tunnel_port)?,
        )
        .with_owners(&s.uids, &s.gids);
        config.loopback_v4 = s
            .loopback_v4
            .as_slice()
            .try_into()
            .map_err(|_| BadSettings::LoopbackAddr(s.loopback_v4.len()))?;
        config.loopback_v4_prefix = u8::try_from(s.loopback_v4_prefix)
            .map_err(|_| BadSettings::LoopbackPrefix(s.loopback_v4_prefix))?;
        config.tproxy_mark = s.tproxy_mark;
        config.tproxy_table = s.tproxy_table;
        let members = s
            .members
            .iter()
            .map(|m| Ok((member_kind(m.kind)?, m.value)))
            .collect::<Result<_, BadSettings>>()?;
        let cidrs = s
            .prefixes
            .iter()
            .map(|p| {
                let kind = list_kind("prefixes", p.kind)?;
                let cidr =
                    Cidr::parse(&p.cidr).ok_or_else(|| BadSettings::Prefix(p.cidr.clone()))?;
                Ok((kind, cidr))
            })
            .collect::<Result<_, BadSettings>>()?;
        let ranges = s
            .port_ranges
            .iter()
            .map(|r| {
                let kind = list_kind("port_ranges", r.kind)?;
                let (first, last) = (port("port_ranges", r.first)?, port("port_ranges", r.last)?);
                if first > last {
                    return Err(BadSettings::EmptyRange { first, last });
                }
                Ok((kind, first, last))
            })
            .collect::<Result<_, BadSettings>>()?;
        Ok(PodSpec {
            config,
            members,
            cidrs,
            ranges,
            exclude_ifaces: s.exclude_interfaces,
            kube_virt_ifaces: s.kube_virt_interfaces,
            routes: Vec::new(),
            route_sources: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rich_spec() -> PodSpec {
        let argv: Vec<&str> = "-p 15001 -z 15006 -u 1337 -g 1337 -i 10.0.0.0/8,fd00::/8 \
             -x 10.1.0.0/16 -b * -d 15090,15021 -o 9000 -q 7000 -c eth9 -k eth8"
            .split_whitespace()
            .collect();
        crate::init::istio::tests::spec(&argv, &[("ISTIO_OUTBOUND_OWNER_GROUPS", "1,2")]).unwrap()
    }

    fn refused(edit: impl FnOnce(&mut pb::PodSettings)) -> String {
        let mut s = pb::PodSettings::from(&rich_spec());
        edit(&mut s);
        PodSpec::try_from(s).unwrap_err().to_string()
    }

    #[test]
    fn settings_round_trip() {
        let spec = rich_spec();
        assert!(!spec.cidrs.is_empty() && !spec.members.is_empty());
        let back = PodSpec::try_from(pb::PodSettings::from(&spec)).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn structural_errors_name_the_field() {
        assert!(refused(|s| s.outbound_port = 70000).contains("outbound_port"));
        assert!(refused(|s| s.loopback_v4 = vec![127]).contains("loopback_v4"));
        assert!(refused(|s| s.members.push(pb::Member { kind: 99, value: 1 })).contains("members"));
        assert!(refused(|s| s.prefixes.push(pb::Prefix {
            kind: CidrKind::ExcludeV4 as u32,
            cidr: "10.0.0.0/33".into(),
        }))
        .contains("10.0.0.0/33"));
        assert!(refused(|s| s.uids = vec![1; MAX_OWNERS + 1]).contains("uids"));
        assert!(refused(|s| s.flags |= 1 << 30).contains("unknown bits 0x40000000"));
    }
}

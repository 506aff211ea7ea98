//! A pod in the maps: its keys ([`PodKeys`]), and its capture written all or nothing
//! ([`register`]) or removed ([`unregister`]).
//!
//! Order matters: a pod's sets (ports, gids, CIDRs, local addresses) are written first and its
//! `SM_PODS` entry last, because the kernel looks at nothing until that entry exists. Replacing a
//! registration writes the new sets, switches the config, then drops what the new sets do not
//! have. Any failure undoes what this call wrote, so a pod is captured completely or not at all.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::maps::{lpm_trie::Key, MapError};
use sockmesh_common::{
    names, Addr, CidrKey, CidrKind, LocalAddrKey, MemberKey, MemberKind, NetnsCookie, PodConfig,
    CIDR_KEY_FIXED_BITS,
};

use super::{
    maps::PinnedMaps,
    net::{addr_to_ip, ip_to_addr, port_prefixes, Cidr},
    spec::PodSpec,
};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "map {map} is full ({source}): the node's pods take all of its entries, whose number \
         the agent's --max-pods sets; unregister pods or register fewer entries, or restart the \
         agent with a larger --max-pods on a new --bpffs folder (a pinned map keeps its size); \
         nothing was changed for this pod"
    )]
    Full {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map}: {source}; nothing was changed for this pod")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "address {addr} already belongs to registered pod (netns cookie {owner}): pod addresses \
         must be unique on a node; nothing was changed for this pod"
    )]
    AddressTaken { addr: IpAddr, owner: NetnsCookie },
}

fn map_err(map: &'static str, source: MapError) -> RegistryError {
    let full = matches!(
        &source,
        MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG)
    );
    if full {
        RegistryError::Full { map, source }
    } else {
        RegistryError::Map { map, source }
    }
}

/// An LPM-trie entry: key fields (netns, kind, address, prefix length) and its value.
type CidrEntry = ([u8; 8], [u8; 4], [u8; 16], u32, u8);

fn same_key(a: &CidrEntry, b: &CidrEntry) -> bool {
    (a.0, a.1, a.2, a.3) == (b.0, b.1, b.2, b.3)
}

/// Everything stored for one pod, as map keys.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct PodKeys {
    pub members: BTreeSet<(u32, u32)>,
    pub cidrs: BTreeSet<CidrEntry>,
    pub local_addrs: BTreeSet<Addr>,
    /// The pod's own routable addresses (inbound capture finds the pod by them).
    pub pod_addrs: BTreeSet<Addr>,
}

/// Addresses inbound traffic can reach the pod at: not loopback, not link-local, not ::6. A
/// v4-mapped IPv6 address is judged as its IPv4 address (the kernel's programs key both
/// alike; sk_lookup takes a loopback address for no pod's without a lookup).
pub fn routable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => routable(&IpAddr::V4(v4)),
            None => {
                !v6.is_loopback()
                    && !v6.is_unspecified()
                    && (v6.segments()[0] & 0xffc0) != 0xfe80
                    && *v6 != std::net::Ipv6Addr::from(6u128)
            }
        },
    }
}

impl PodKeys {
    fn from_spec(netns: NetnsCookie, spec: &PodSpec, local: &[IpAddr]) -> Self {
        let members = spec.members.iter().map(|(k, v)| (*k as u32, *v)).collect();
        let cidrs = spec
            .cidrs
            .iter()
            .map(|(kind, c)| {
                let k = cidr_list_key(netns, *kind, c);
                let d = k.data();
                (d.netns, d.kind, d.addr, k.prefix_len(), 1)
            })
            .chain(spec.ranges.iter().flat_map(|(kind, lo, hi)| {
                port_prefixes(*lo, *hi)
                    .into_iter()
                    .map(move |(start, bits)| {
                        let k = CidrKey::port(netns, *kind, start);
                        (
                            k.netns,
                            k.kind,
                            k.addr,
                            CIDR_KEY_FIXED_BITS + bits as u32,
                            1,
                        )
                    })
            }))
            .chain(spec.routes.iter().map(|(c, excluded)| {
                let k = route_key(netns, c);
                let d = k.data();
                (d.netns, d.kind, d.addr, k.prefix_len(), *excluded as u8)
            }))
            .collect();
        let local_addrs = local.iter().map(|ip| ip_to_addr(*ip)).collect();
        let pod_addrs = local
            .iter()
            .filter(|ip| routable(ip))
            .map(|ip| ip_to_addr(*ip))
            .collect();
        PodKeys {
            members,
            cidrs,
            local_addrs,
            pod_addrs,
        }
    }

    /// `config` as written with these keys: the sets they have no entry in are marked empty,
    /// so the kernel does not look them up (whatever the caller's config said).
    pub fn config_for(&self, config: PodConfig) -> PodConfig {
        config.with_sets_present(
            self.members
                .iter()
                .filter_map(|(k, _)| MemberKind::from_u32(*k)),
            self.cidrs
                .iter()
                .filter_map(|c| CidrKind::from_u32(u32::from_be_bytes(c.1))),
        )
    }

    /// The spec these keys were written from, with the pod's `config` (from the maps).
    pub fn spec(&self, config: PodConfig) -> PodSpec {
        let members = self
            .members
            .iter()
            .filter_map(|(k, v)| MemberKind::from_u32(*k).map(|k| (k, *v)))
            .collect();
        let mut ranges: Vec<(CidrKind, u16, u16)> = Vec::new();
        let mut routes = Vec::new();
        let mut cidrs = Vec::new();
        for (_, kind, addr, len, value) in &self.cidrs {
            let Some(kind) = CidrKind::from_u32(u32::from_be_bytes(*kind)) else {
                continue;
            };
            let prefix = (len - CIDR_KEY_FIXED_BITS) as u8;
            if kind.is_port() {
                let start = u16::from_be_bytes([addr[0], addr[1]]);
                let last = start as u32 + (1u32 << (16 - prefix.min(16))) - 1;
                ranges.push((kind, start, last as u16));
                continue;
            }
            let ip = if kind.is_v6() {
                IpAddr::from(*addr)
            } else {
                IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
            };
            let cidr = Cidr::new(ip, prefix);
            if matches!(kind, CidrKind::RouteV4 | CidrKind::RouteV6) {
                routes.push((cidr, *value == 1));
            } else {
                cidrs.push((kind, cidr));
            }
        }
        // Prefix blocks of one range are adjacent: merge them back.
        ranges.sort();
        let mut merged: Vec<(CidrKind, u16, u16)> = Vec::new();
        for (k, lo, hi) in ranges {
            match merged.last_mut() {
                Some((lk, _, lhi)) if *lk == k && *lhi as u32 + 1 == lo as u32 => *lhi = hi,
                _ => merged.push((k, lo, hi)),
            }
        }
        let mut spec = PodSpec::new(config, members, cidrs, merged);
        spec.routes = routes;
        spec
    }

    /// What the maps hold for `netns` now.
    pub fn read(maps: &PinnedMaps, netns: NetnsCookie) -> Self {
        let mut keys = PodKeys::default();
        for k in maps.members.keys().flatten() {
            if k.netns == netns {
                keys.members.insert((k.kind, k.value));
            }
        }
        let ns = netns.get().to_be_bytes();
        for (k, v) in maps.cidrs.iter().flatten() {
            let d = k.data();
            if d.netns == ns {
                keys.cidrs
                    .insert((d.netns, d.kind, d.addr, k.prefix_len(), v));
            }
        }
        for k in maps.local_addrs.keys().flatten() {
            if k.netns == netns {
                keys.local_addrs.insert(k.addr);
            }
        }
        for (addr, owner) in maps.addr_pod.iter().flatten() {
            if owner == netns {
                keys.pod_addrs.insert(addr);
            }
        }
        keys
    }
}

/// The key of `cidr` in list `kind` of pod `netns`.
fn cidr_list_key(netns: NetnsCookie, kind: CidrKind, cidr: &Cidr) -> Key<CidrKey> {
    Key::new(
        CIDR_KEY_FIXED_BITS + cidr.prefix as u32,
        CidrKey::new(netns, kind, &ip_to_addr(cidr.addr)),
    )
}

/// The key of route `dst` in pod `netns`'s routing table (`CidrKind::RouteV4/V6`).
fn route_key(netns: NetnsCookie, dst: &Cidr) -> Key<CidrKey> {
    let kind = if dst.is_v6() {
        CidrKind::RouteV6
    } else {
        CidrKind::RouteV4
    };
    cidr_list_key(netns, kind, dst)
}

fn member_key(netns: NetnsCookie, (kind, value): (u32, u32)) -> MemberKey {
    MemberKey { netns, kind, value }
}

fn cidr_key((netns, kind, addr, len, _): CidrEntry) -> Key<CidrKey> {
    Key::new(len, CidrKey { netns, kind, addr })
}

/// What this call wrote, to undo on failure.
#[derive(Default)]
struct Undo {
    members: Vec<(u32, u32)>,
    cidrs: Vec<CidrEntry>,
    /// Entries overwritten with a new value, to put back.
    restore_cidrs: Vec<CidrEntry>,
    local_addrs: Vec<Addr>,
    pod_addrs: Vec<Addr>,
}

impl Undo {
    fn run(self, maps: &mut PinnedMaps, netns: NetnsCookie) {
        for m in self.members {
            let _ = maps.members.remove(&member_key(netns, m));
        }
        for c in self.cidrs {
            let _ = maps.cidrs.remove(&cidr_key(c));
        }
        for c in self.restore_cidrs {
            let _ = maps.cidrs.insert(&cidr_key(c), c.4, 0);
        }
        for a in self.local_addrs {
            let _ = maps.local_addrs.remove(&LocalAddrKey { netns, addr: a });
        }
        for a in self.pod_addrs {
            let _ = maps.addr_pod.remove(&a);
        }
    }
}

/// Register (or re-register) pod `netns` with `spec`; `local` are the pod's interface addresses.
pub fn register(
    maps: &mut PinnedMaps,
    netns: NetnsCookie,
    spec: &PodSpec,
    local: &[IpAddr],
) -> Result<(), RegistryError> {
    // A pod not registered yet has nothing in the maps (netns cookies are never reused, and a
    // failed registration undoes its writes), so only a re-registration reads what is there:
    // reading scans whole maps, which grows with the node's pods.
    let known = maps.pods.get(&netns, 0).is_ok();
    let old = if known {
        PodKeys::read(maps, netns)
    } else {
        PodKeys::default()
    };
    let new = PodKeys::from_spec(netns, spec, local);
    let config = new.config_for(spec.config);
    let mut undo = Undo::default();
    if let Err(e) = write_sets(maps, netns, &old, &new, &mut undo) {
        undo.run(maps, netns);
        return Err(e);
    }
    if let Err(e) = maps.pods.insert(netns, config, 0) {
        undo.run(maps, netns);
        return Err(map_err(names::PODS, e));
    }
    // Source-address hints (no capture decision depends on them): replaced wholesale.
    set_route_sources(maps, netns, spec, known);
    // The new config is in force; drop what only the old one had.
    drop_extras(maps, netns, &old, &new);
    if let Some(t) = maps.tracked.as_mut() {
        t.insert(netns, (config, new));
    }
    Ok(())
}

/// Remove the entries of pod `netns` that `old` has and `new` has not.
fn drop_extras(maps: &mut PinnedMaps, netns: NetnsCookie, old: &PodKeys, new: &PodKeys) {
    for m in old.members.difference(&new.members) {
        let _ = maps.members.remove(&member_key(netns, *m));
    }
    for c in old.cidrs.difference(&new.cidrs) {
        // An entry whose value changed was overwritten in place, not dropped.
        if !new.cidrs.iter().any(|n| same_key(n, c)) {
            let _ = maps.cidrs.remove(&cidr_key(*c));
        }
    }
    for a in old.local_addrs.difference(&new.local_addrs) {
        let _ = maps.local_addrs.remove(&LocalAddrKey { netns, addr: *a });
    }
    for a in old.pod_addrs.difference(&new.pod_addrs) {
        let _ = maps.addr_pod.remove(a);
    }
}

/// What the agent wrote for each pod: its config and its entries.
pub type Tracked = BTreeMap<NetnsCookie, (PodConfig, PodKeys)>;

/// What the maps hold now, every pod in one pass over each map.
pub fn snapshot(maps: &PinnedMaps) -> Tracked {
    let mut all: Tracked = BTreeMap::new();
    for (netns, config) in maps.pods.iter().flatten() {
        all.insert(netns, (config, PodKeys::default()));
    }
    for k in maps.members.keys().flatten() {
        if let Some((_, p)) = all.get_mut(&k.netns) {
            p.members.insert((k.kind, k.value));
        }
    }
    for (k, v) in maps.cidrs.iter().flatten() {
        let d = k.data();
        if let Some((_, p)) = all.get_mut(&NetnsCookie(u64::from_be_bytes(d.netns))) {
            p.cidrs.insert((d.netns, d.kind, d.addr, k.prefix_len(), v));
        }
    }
    for k in maps.local_addrs.keys().flatten() {
        if let Some((_, p)) = all.get_mut(&k.netns) {
            p.local_addrs.insert(k.addr);
        }
    }
    for (addr, owner) in maps.addr_pod.iter().flatten() {
        if let Some((_, p)) = all.get_mut(&owner) {
            p.pod_addrs.insert(addr);
        }
    }
    all
}

/// What a comparison of the maps with the agent's record found and put right.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Repairs {
    /// Pods whose entries had changed or gone: written again.
    pub restored: Vec<NetnsCookie>,
    /// Pod entries the agent never wrote: removed.
    pub foreign: Vec<NetnsCookie>,
}

/// Put the maps back to the agent's record (see [`PinnedMaps::track`]): a registered pod's
/// config and entries as the agent wrote them, and no pod it did not register.
pub fn repair(maps: &mut PinnedMaps) -> Result<Repairs, RegistryError> {
    let Some(tracked) = maps.tracked.take() else {
        return Ok(Repairs::default());
    };
    let now = snapshot(maps);
    let mut done = Repairs::default();
    let result = (|| {
        for (netns, (config, want)) in &tracked {
            let empty = (*config, PodKeys::default());
            let (cur_config, cur) = now.get(netns).unwrap_or(&empty);
            let config_ok = now.contains_key(netns) && cur_config == config;
            if config_ok && cur == want {
                continue;
            }
            // The pod's addresses are its own again, whoever they were given to.
            for a in &want.pod_addrs {
                maps.addr_pod
                    .insert(*a, *netns, 0)
                    .map_err(|e| map_err(names::ADDR_POD, e))?;
            }
            let cur = PodKeys::read(maps, *netns);
            write_sets(maps, *netns, &cur, want, &mut Undo::default())?;
            maps.pods
                .insert(netns, *config, 0)
                .map_err(|e| map_err(names::PODS, e))?;
            drop_extras(maps, *netns, &cur, want);
            done.restored.push(*netns);
        }
        for netns in now.keys().filter(|n| !tracked.contains_key(n)) {
            // Its entry and every set written under its name go (the record is taken out
            // meanwhile, so nothing is untracked twice).
            unregister(maps, *netns)?;
            done.foreign.push(*netns);
        }
        Ok(())
    })();
    maps.tracked = Some(tracked);
    result.map(|()| done)
}

fn write_sets(
    maps: &mut PinnedMaps,
    netns: NetnsCookie,
    old: &PodKeys,
    new: &PodKeys,
    undo: &mut Undo,
) -> Result<(), RegistryError> {
    for m in new.members.difference(&old.members) {
        maps.members
            .insert(member_key(netns, *m), 1, 0)
            .map_err(|e| map_err(names::MEMBERS, e))?;
        undo.members.push(*m);
    }
    for c in new.cidrs.difference(&old.cidrs) {
        maps.cidrs
            .insert(&cidr_key(*c), c.4, 0)
            .map_err(|e| map_err(names::CIDRS, e))?;
        match old.cidrs.iter().find(|o| same_key(o, c)) {
            Some(prev) => undo.restore_cidrs.push(*prev),
            None => undo.cidrs.push(*c),
        }
    }
    for a in new.local_addrs.difference(&old.local_addrs) {
        maps.local_addrs
            .insert(LocalAddrKey { netns, addr: *a }, 1, 0)
            .map_err(|e| map_err(names::LOCAL_ADDRS, e))?;
        undo.local_addrs.push(*a);
    }
    for a in new.pod_addrs.difference(&old.pod_addrs) {
        if let Ok(owner) = maps.addr_pod.get(a, 0) {
            if owner != netns {
                return Err(RegistryError::AddressTaken {
                    addr: addr_to_ip(a),
                    owner,
                });
            }
        }
        maps.addr_pod
            .insert(*a, netns, 0)
            .map_err(|e| map_err(names::ADDR_POD, e))?;
        undo.pod_addrs.push(*a);
    }
    Ok(())
}

fn route_src_keys(maps: &PinnedMaps, netns: NetnsCookie) -> Vec<Key<CidrKey>> {
    let ns = netns.get().to_be_bytes();
    maps.route_src
        .keys()
        .flatten()
        .filter(|k| k.data().netns == ns)
        .collect()
}

fn set_route_sources(maps: &mut PinnedMaps, netns: NetnsCookie, spec: &PodSpec, known: bool) {
    let new: Vec<(Key<CidrKey>, Addr)> = spec
        .route_sources
        .iter()
        .map(|(c, src)| (route_key(netns, c), ip_to_addr(*src)))
        .collect();
    let old_keys = if known {
        route_src_keys(maps, netns)
    } else {
        Vec::new()
    };
    for old in old_keys {
        let kept = new
            .iter()
            .any(|(k, _)| k.prefix_len() == old.prefix_len() && k.data() == old.data());
        if !kept {
            let _ = maps.route_src.remove(&old);
        }
    }
    for (k, v) in new {
        // A full map only loses the hint: the primary address is used instead.
        let _ = maps.route_src.insert(&k, v, 0);
    }
}

/// Stop capturing pod `netns` and forget its sets. Returns whether it was registered.
pub fn unregister(maps: &mut PinnedMaps, netns: NetnsCookie) -> Result<bool, RegistryError> {
    let was = match maps.pods.remove(&netns) {
        Ok(()) => true,
        Err(MapError::KeyNotFound) => false,
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => false,
        Err(e) => return Err(map_err(names::PODS, e)),
    };
    for k in route_src_keys(maps, netns) {
        let _ = maps.route_src.remove(&k);
    }
    let counters: Vec<_> = maps
        .counters
        .keys()
        .flatten()
        .filter(|k| k.netns == netns)
        .collect();
    for k in counters {
        let _ = maps.counters.remove(&k);
    }
    let old = PodKeys::read(maps, netns);
    Undo {
        members: old.members.into_iter().collect(),
        cidrs: old.cidrs.into_iter().collect(),
        restore_cidrs: Vec::new(),
        local_addrs: old.local_addrs.into_iter().collect(),
        pod_addrs: old.pod_addrs.into_iter().collect(),
    }
    .run(maps, netns);
    if let Some(t) = maps.tracked.as_mut() {
        t.remove(&netns);
    }
    Ok(was)
}

#[cfg(test)]
mod tests {
    use sockmesh_common::PodFlags;

    use super::*;

    #[test]
    fn loopback_link_local_and_unspecified_addresses_are_not_a_pods() {
        for ip in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "::ffff:127.0.0.1",
            "169.254.1.1",
            "::ffff:169.254.1.1",
            "fe80::1",
            "0.0.0.0",
            "::",
            "::6",
        ] {
            assert!(!routable(&ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.0.0.5", "::ffff:10.0.0.5", "fd00::5", "2001:db8::5"] {
            assert!(routable(&ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn the_written_config_marks_the_sets_it_leaves_empty() {
        let caller = PodConfig::new(PodFlags::OUTBOUND_ALL, 15001, 15006, 15008);
        // A caller's claim that a set is empty is not believed.
        let mut lying = caller;
        lying.empty_members = u8::MAX;
        lying.empty_lists = u16::MAX;
        let spec = PodSpec::new(
            lying,
            vec![(MemberKind::OutboundExcludePort, 22)],
            vec![(CidrKind::ExcludeV4, Cidr::parse("10.96.0.0/12").unwrap())],
            vec![],
        );
        let netns = NetnsCookie(7);
        let config = PodKeys::from_spec(netns, &spec, &[]).config_for(spec.config);
        let empty = config.empty_sets();
        assert!(!empty.no_members(MemberKind::OutboundExcludePort));
        assert!(empty.no_members(MemberKind::OutboundIncludePort));
        assert!(!empty.no_list(CidrKind::ExcludeV4));
        assert!(empty.no_list(CidrKind::ExcludeV6));
        assert!(empty.no_list(CidrKind::IncludeV4));
        // Everything else is the caller's.
        let mut rest = config;
        (rest.empty_members, rest.empty_lists) = (0, 0);
        assert_eq!(rest, caller);
    }
}

//! A registered pod as the pinned maps hold it now: its settings, sets and addresses, and the
//! kernel's records of its connections. It answers the decision's [`Rules`] and [`Lookups`]
//! as the kernel does, so `explain` gives the kernel's verdict.

use sockmesh_common::{
    listener_families, Addr, Arrival, CidrKind, ConnKey, Lookups, MemberKind, NetnsCookie,
    PodConfig, Reason, Rules,
};

use super::{maps::PinnedMaps, registry::PodKeys, spec::PodSpec};

pub struct LivePod<'a> {
    pub netns: NetnsCookie,
    pub config: PodConfig,
    pub keys: PodKeys,
    pub spec: PodSpec,
    maps: &'a PinnedMaps,
}

impl<'a> LivePod<'a> {
    /// Pod `netns` as the maps hold it, if it is registered.
    pub fn read(maps: &'a PinnedMaps, netns: NetnsCookie) -> Option<Self> {
        let config = maps.pod(netns)?;
        let keys = PodKeys::read(maps, netns);
        let spec = keys.spec(config);
        Some(LivePod {
            netns,
            config,
            keys,
            spec,
            maps,
        })
    }

    /// Whether a proxy listens on `port` for a connection of family `v4` or not, as sk_lookup
    /// looks for one.
    pub fn listening(&self, port: u16, v4: bool) -> bool {
        self.maps.listening(self.netns, port, listener_families(v4))
    }
}

impl Rules for LivePod<'_> {
    fn member(&self, kind: MemberKind, value: u32) -> bool {
        self.spec.member(kind, value)
    }

    fn cidr(&self, kind: CidrKind, addr: &Addr) -> bool {
        self.spec.cidr(kind, addr)
    }

    fn port_range(&self, kind: CidrKind, port: u16) -> bool {
        self.spec.port_range(kind, port)
    }

    fn route_excluded(&self, dst: &Addr) -> bool {
        self.spec.route_excluded(dst)
    }
}

impl Lookups for LivePod<'_> {
    fn pod_addr(&self, addr: &Addr) -> bool {
        self.keys.local_addrs.contains(addr)
    }

    fn recorded(&self, a: &Arrival) -> Option<Reason> {
        let record = self
            .maps
            .orig_dst
            .get(&ConnKey::arrival(self.netns, a), 0)
            .ok()?;
        Reason::from_u32(record.reason)
    }
}

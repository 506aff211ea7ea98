//! The pinned maps, opened by name with the types this build gives them; their layouts
//! checked against the pins an earlier release may have left; the per-pod counters summed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use aya::maps::{lpm_trie::LpmTrie, HashMap, Map, MapData, MapError, PerCpuHashMap, SockHash};
use sockmesh_common::{
    counters, names, AccelSock, Addr, CidrKey, ConnKey, CounterKey, Handoff, ListenerKey,
    LocalAddrKey, MemberKey, NetnsCookie, OrigDst, PodConfig, Reason, SockKey, SockOwner,
};

use super::loader::BpfError;

/// Where the maps are pinned under the agent's bpffs folder.
pub fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("maps")
}

/// Key and value sizes of every pinned map, as this build lays them out.
fn map_layouts() -> [(&'static str, usize, usize); 19] {
    use std::mem::size_of;
    // LPM-trie keys carry a 4-byte prefix length before the data.
    let lpm = 4 + size_of::<CidrKey>();
    [
        (
            names::PODS,
            size_of::<NetnsCookie>(),
            size_of::<PodConfig>(),
        ),
        (names::MEMBERS, size_of::<MemberKey>(), 1),
        (names::CIDRS, lpm, 1),
        (names::LOCAL_ADDRS, size_of::<LocalAddrKey>(), 1),
        (names::ORIG_DST, size_of::<ConnKey>(), size_of::<OrigDst>()),
        (names::SOCK_DST, 4, size_of::<OrigDst>()),
        (names::SOCK_OWNER, 4, size_of::<SockOwner>()),
        (names::LISTENERS, size_of::<ListenerKey>(), 4),
        (names::ADDR_POD, size_of::<Addr>(), size_of::<NetnsCookie>()),
        (names::ROUTE_SRC, lpm, 16),
        (names::COUNTERS, size_of::<CounterKey>(), 8),
        (names::SOCKS, size_of::<SockKey>(), 4),
        (names::SOCK_TCP, 4, 1),
        (names::PEER_SK, size_of::<SockKey>(), size_of::<AccelSock>()),
        (
            names::LISTENER_OWNER,
            size_of::<ListenerKey>(),
            size_of::<SockOwner>(),
        ),
        (names::CONNECTING, 8, size_of::<Handoff>()),
        (names::TIMING, 4, 8),
        (names::HANDOFF, 4, size_of::<Handoff>()),
        (names::PARKED, 4, 4),
    ]
}

/// Refuse pinned maps whose layout this build does not share (left by an older or newer
/// release): reusing them would corrupt every lookup.
pub fn check_pinned_layouts(dir: &Path) -> Result<(), BpfError> {
    for (name, key, value) in map_layouts() {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|source| BpfError::Map {
            name,
            path: path.clone(),
            source,
        })?;
        let (k, v) = (info.key_size() as usize, info.value_size() as usize);
        if (k, v) != (key, value) {
            return Err(BpfError::Layout {
                path,
                found: (k, v),
                wanted: (key, value),
            });
        }
    }
    Ok(())
}

/// Typed handles on the pinned maps.
pub struct PinnedMaps {
    pub pods: HashMap<MapData, NetnsCookie, PodConfig>,
    pub members: HashMap<MapData, MemberKey, u8>,
    pub cidrs: LpmTrie<MapData, CidrKey, u8>,
    pub local_addrs: HashMap<MapData, LocalAddrKey, u8>,
    pub addr_pod: HashMap<MapData, Addr, NetnsCookie>,
    pub route_src: LpmTrie<MapData, CidrKey, Addr>,
    pub orig_dst: HashMap<MapData, ConnKey, OrigDst>,
    pub counters: PerCpuHashMap<MapData, CounterKey, u64>,
    /// Sockets of local connections that sk_msg shortcuts (entries leave with their sockets).
    pub socks: SockHash<MapData, SockKey>,
    /// Listening sockets of the attached cgroup, where sk_lookup finds a pod's proxy.
    pub listeners: SockHash<MapData, ListenerKey>,
    /// The agent's record of what it wrote for each pod (see `registry::repair`); None for
    /// readers such as `dump` and `explain`.
    pub tracked: Option<super::registry::Tracked>,
}

/// The map pinned as `name`, as the type `T` that this build gives it.
fn open_map<T>(bpffs: &Path, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = maps_dir(bpffs).join(name);
    let err = |source| BpfError::Map {
        name,
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    Map::from_map_data(data)
        .map_err(err)?
        .try_into()
        .map_err(err)
}

impl PinnedMaps {
    pub fn open(bpffs: &Path) -> Result<Self, BpfError> {
        Ok(PinnedMaps {
            pods: open_map(bpffs, names::PODS)?,
            members: open_map(bpffs, names::MEMBERS)?,
            cidrs: open_map(bpffs, names::CIDRS)?,
            local_addrs: open_map(bpffs, names::LOCAL_ADDRS)?,
            addr_pod: open_map(bpffs, names::ADDR_POD)?,
            route_src: open_map(bpffs, names::ROUTE_SRC)?,
            orig_dst: open_map(bpffs, names::ORIG_DST)?,
            counters: open_map(bpffs, names::COUNTERS)?,
            socks: open_map(bpffs, names::SOCKS)?,
            listeners: open_map(bpffs, names::LISTENERS)?,
            tracked: None,
        })
    }

    /// Keep a record of every pod's entries from now on, starting from what the maps hold:
    /// registrations and unregistrations update it, and `registry::repair` puts the maps back
    /// to it.
    pub fn track(&mut self) {
        self.tracked = Some(super::registry::snapshot(self));
    }

    /// The settings of pod `netns`, if it is registered.
    pub fn pod(&self, netns: NetnsCookie) -> Option<PodConfig> {
        self.pods.get(&netns, 0).ok()
    }

    /// Netns cookies of every registered pod.
    pub fn pod_cookies(&self) -> Result<Vec<NetnsCookie>, MapError> {
        self.pods.keys().collect()
    }

    /// Every counter, summed over CPUs: netns cookie → counter name → count.
    pub fn counters(&self) -> Result<BTreeMap<NetnsCookie, BTreeMap<String, u64>>, MapError> {
        let mut counts: BTreeMap<NetnsCookie, BTreeMap<String, u64>> = BTreeMap::new();
        for item in self.counters.iter() {
            let (k, per_cpu) = item?;
            let total: u64 = per_cpu.iter().sum();
            *counts
                .entry(k.netns)
                .or_default()
                .entry(counter_name(k.counter))
                .or_default() += total;
        }
        Ok(counts)
    }

    /// Whether pod `netns` has a listening socket on `port` of a family in `families` (as
    /// sk_lookup looks for one).
    pub fn listening(&self, netns: NetnsCookie, port: u16, families: [u32; 2]) -> bool {
        self.listeners
            .keys()
            .flatten()
            .any(|k| k.netns == netns && k.port == u32::from(port) && families.contains(&k.family))
    }
}

/// A counter's name: its [`Reason`]'s, one of `counters`, or `counter_N`.
pub fn counter_name(c: u32) -> String {
    if let Some(r) = Reason::from_u32(c) {
        return r.name().to_string();
    }
    counters::name(c)
        .map(str::to_string)
        .unwrap_or_else(|| format!("counter_{c}"))
}

//! A pod's registration as the agent carries it out: what it reads in the pod's netns, the
//! sk_lookup link it puts there, the maps it writes, and the sweep that forgets pods whose
//! namespace is gone.

use std::{
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use sockmesh_common::{forward_key, MemberKind, NetnsCookie, PodConfig, PodFlags};
use tracing::{info, warn};

use super::routing::{self, RoutingError};
use crate::core::{
    loader::{self, BpfError},
    maps::PinnedMaps,
    registry::{self, RegistryError},
    spec::{InvalidSpec, PodSpec},
    sys::{self, SyscallError},
    userns::{self, PodIds, UsernsError},
};

/// What registrations share: the maps, where the pins are, the loaded sk_lookup program, and
/// the agent's own netns (never captured).
pub struct State {
    pub maps: Arc<Mutex<PinnedMaps>>,
    pub own_netns: NetnsCookie,
    pub bpffs: PathBuf,
    /// The loaded sk_lookup program, attached to each registered pod's netns.
    pub sk_lookup: OwnedFd,
    /// The loaded tc programs, attached at the ingress and egress of each pod's `-k` interfaces.
    pub forward: loader::ForwardProgs,
}

/// Why a pod was not registered (nothing of it was written).
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("invalid settings: {0}")]
    Invalid(#[from] InvalidSpec),
    #[error("{flag} {name}: the pod has no interface of that name")]
    NoInterface { flag: &'static str, name: String },
    #[error(
        "{flag} {name}: the interface has no Ethernet address (a veth, bridge or tap is needed)"
    )]
    NotEthernet { flag: &'static str, name: String },
    #[error(transparent)]
    Netns(#[from] SyscallError),
    #[error("attaching to the pod's netns: {0}")]
    Attach(#[source] BpfError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{0}; the pod was not registered")]
    Routing(#[from] RoutingError),
    #[error("{0}; the pod was not registered")]
    Userns(#[from] UsernsError),
}

/// Capture pod `netns` (fd `fd`) with `spec`: what the caller may not say (interface
/// indexes, routes, source addresses) is read in the pod's netns, the sk_lookup program is put
/// in force there, the maps are written, and TPROXY routing is set up; all of it or, on
/// failure, none.
pub fn register(
    state: &State,
    netns: NetnsCookie,
    fd: BorrowedFd<'_>,
    spec: &PodSpec,
) -> Result<(), RegisterError> {
    spec.validate()?;
    let mut spec = spec.clone();
    // Interface indexes and routes come from the pod's netns, never from the caller.
    spec.members
        .retain(|(k, _)| !matches!(k, MemberKind::ExcludedIfindex | MemberKind::KubeVirtIfindex));
    spec.routes.clear();
    spec.route_sources.clear();
    spec.config.src_v4 = [0; 4];
    spec.config.src_v6 = [0; 16];
    // A pod with a user namespace of its own: its proxy's ids as the kernel sees them.
    if let Some(ids) = userns::pod_ids(fd)? {
        kernel_ids(&mut spec, &ids)?;
    }
    let view = read_pod(fd, &spec)?;
    let mut addrs: Vec<IpAddr> = view.addrs.iter().map(|a| a.ip).collect();
    // The pod's primary addresses, by istio's rule (first non-loopback, non-link-local), read
    // here rather than trusted from the caller.
    if let Some(IpAddr::V4(v4)) = addrs
        .iter()
        .filter(|a| registry::routable(a))
        .find(|a| a.is_ipv4())
    {
        spec.config.src_v4 = v4.octets();
    }
    if let Some(IpAddr::V6(v6)) = addrs
        .iter()
        .filter(|a| registry::routable(a))
        .find(|a| a.is_ipv6())
    {
        spec.config.src_v6 = v6.octets();
    }
    // -c / -k: interface indexes, and for -c the routes that leave through them.
    for (names, kind) in [
        (&spec.exclude_ifaces, MemberKind::ExcludedIfindex),
        (&spec.kube_virt_ifaces, MemberKind::KubeVirtIfindex),
    ] {
        for name in names {
            let flag = kind.istio_name();
            let idx = view
                .ifindex
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, i)| *i)
                .ok_or_else(|| RegisterError::NoInterface {
                    flag,
                    name: name.clone(),
                })?;
            spec.members.push((kind, idx));
        }
    }
    // -k: the tc programs find the pod by interface index and MAC (it cannot read the netns
    // cookie of a forwarded packet): that key goes into SM_ADDR_POD beside the pod's addresses,
    // so a clash with another pod is refused as an address clash is, and it leaves with them.
    for name in &spec.kube_virt_ifaces {
        let found = view.ifindex.iter().find(|(n, _)| n == name);
        let mac = view.macs.iter().find(|(n, _)| n == name);
        if let (Some((_, idx)), Some((_, mac))) = (found, mac) {
            addrs.push(IpAddr::V6(Ipv6Addr::from(forward_key(*idx, *mac))));
        } else {
            return Err(RegisterError::NotEthernet {
                flag: MemberKind::KubeVirtIfindex.istio_name(),
                name: name.clone(),
            });
        }
    }
    if spec.config.has(PodFlags::EXCLUDE_IFACES) {
        spec.routes = view
            .routes
            .iter()
            .map(|r| (r.dst, spec.exclude_ifaces.contains(&r.dev)))
            .collect();
    }
    // Each route's source address: its own `src`, else the first usable address of its device
    // in that family (the kernel's choice for a single-address interface).
    spec.route_sources = view
        .routes
        .iter()
        .filter_map(|r| {
            let src = r.prefsrc.or_else(|| {
                view.addrs
                    .iter()
                    .find(|a| {
                        a.ifname == r.dev
                            && a.ip.is_ipv6() == r.dst.is_v6()
                            && registry::routable(&a.ip)
                    })
                    .map(|a| a.ip)
            })?;
            Some((r.dst, src))
        })
        .collect();
    let mut maps = state.maps.lock().expect("maps lock");
    let before = maps.pod(netns);
    // Inbound capture: the sk_lookup program in the pod's netns (idempotent), before the maps
    // that turn it on for this pod.
    // The sk_lookup program goes into every registered pod's netns, inbound capture or not: its
    // link also tells the agent when the namespace is gone (see `sweep`).
    let action = loader::attach_netns(state.sk_lookup.as_fd(), fd, &state.bpffs, netns)
        .map_err(RegisterError::Attach)?;
    let attached_now = action == loader::LinkAction::Created;
    let mut result = registry::register(&mut maps, netns, &spec, &addrs);
    if matches!(result, Err(registry::RegistryError::AddressTaken { .. })) {
        // The address may belong to a pod that is gone: forget those and try again.
        sweep_locked(&state.bpffs, &mut maps);
        result = registry::register(&mut maps, netns, &spec, &addrs);
    }
    if let Err(e) = result {
        if attached_now {
            loader::detach_netns(&state.bpffs, netns);
        }
        return Err(e.into());
    }
    // TPROXY routing: the previous settings' rule and route go, the new ones come. If that
    // fails, the registration is undone, so the pod is captured completely or not at all.
    let c = spec.config;
    let routing = |c: &PodConfig| (c.tproxy_mark, c.tproxy_table, c.has(PodFlags::IPV6));
    if let Some(old) = before.filter(|o| o.has(PodFlags::TPROXY)) {
        if !c.has(PodFlags::TPROXY) || routing(&old) != routing(&c) {
            let (m, t, v6) = routing(&old);
            let _ = routing::tproxy_routing(fd, m, t, v6, false);
        }
    }
    if c.has(PodFlags::TPROXY) {
        let (m, t, v6) = routing(&c);
        if let Err(e) = routing::tproxy_routing(fd, m, t, v6, true) {
            let _ = routing::tproxy_routing(fd, m, t, v6, false);
            let _ = registry::unregister(&mut maps, netns);
            loader::detach_netns(&state.bpffs, netns);
            return Err(RegisterError::Routing(e));
        }
    }
    // -k: connections forwarded through the pod from those interfaces (tc ingress and
    // egress). Undone entirely if any of it fails.
    let kube_virt: Vec<u32> = spec
        .members
        .iter()
        .filter(|(k, _)| *k == MemberKind::KubeVirtIfindex)
        .map(|(_, i)| *i)
        .collect();
    if kube_virt.is_empty() {
        loader::detach_forward(&state.bpffs, netns);
    } else if let Err(e) =
        loader::attach_forward(&state.forward, fd, &state.bpffs, netns, &kube_virt)
    {
        if c.has(PodFlags::TPROXY) {
            let (m, t, v6) = routing(&c);
            let _ = routing::tproxy_routing(fd, m, t, v6, false);
        }
        let _ = registry::unregister(&mut maps, netns);
        loader::detach_netns(&state.bpffs, netns);
        return Err(RegisterError::Attach(e));
    }
    Ok(())
}

/// Map the owner ids of `spec` (`-u`, `-g`, owner groups) from the pod's user namespace to the
/// kernel's, as iptables' owner match reads its rules in the namespace that owns the pod's
/// network. An id the pod's namespace does not map is an error: nothing is registered.
fn kernel_ids(spec: &mut PodSpec, ids: &PodIds) -> Result<(), UsernsError> {
    let uids = spec
        .config
        .proxy_uids()
        .iter()
        .map(|&u| ids.uid(u))
        .collect::<Result<Vec<_>, _>>()?;
    let gids = spec
        .config
        .proxy_gids()
        .iter()
        .map(|&g| ids.gid(g))
        .collect::<Result<Vec<_>, _>>()?;
    spec.config = spec.config.with_owners(&uids, &gids);
    for (kind, value) in &mut spec.members {
        if matches!(
            kind,
            MemberKind::OwnerGroupInclude | MemberKind::OwnerGroupExclude
        ) {
            *value = ids.gid(*value)?;
        }
    }
    Ok(())
}

/// Forget pods whose network namespace is gone (their registration, counters and link).
pub fn sweep_locked(bpffs: &Path, maps: &mut PinnedMaps) {
    match loader::dead_pods(bpffs) {
        Ok(gone) => {
            for netns in gone {
                let _ = registry::unregister(maps, netns);
                info!(%netns, "forgot a pod whose network namespace is gone");
            }
        }
        Err(e) => warn!(error = %e, "checking for pods that are gone failed"),
    }
}

/// Sweep every `period`, for as long as the agent runs.
pub fn sweeper(state: Arc<State>, period: Duration) {
    std::thread::spawn(move || loop {
        std::thread::sleep(period);
        let mut maps = state.maps.lock().expect("maps lock");
        sweep_locked(&state.bpffs, &mut maps);
    });
}

/// What the agent reads inside a pod's netns at registration.
struct PodView {
    addrs: Vec<sys::InterfaceAddr>,
    ifindex: Vec<(String, u32)>,
    /// The MAC addresses of the `-k` interfaces.
    macs: Vec<(String, [u8; 6])>,
    routes: Vec<sys::Route>,
}

/// In the pod's netns: add ::6 to lo when IPv6 capture is on (as istio-iptables does, so the
/// proxy can bind its inbound passthrough source), then read the pod's addresses, the indexes
/// of the `-c`/`-k` interfaces, and (for `-c`) its routes.
fn read_pod(fd: BorrowedFd<'_>, spec: &PodSpec) -> Result<PodView, RegisterError> {
    let ipv6 = spec.config.has(PodFlags::IPV6);
    let kube_virt = spec.kube_virt_ifaces.clone();
    let names: Vec<String> = spec
        .exclude_ifaces
        .iter()
        .chain(&spec.kube_virt_ifaces)
        .cloned()
        .collect();
    sys::in_netns(fd, move || -> Result<PodView, RegisterError> {
        if ipv6 {
            routing::add_v6_passthrough()?;
        }
        let addrs = sys::interface_addrs()?;
        let ifindex = names
            .into_iter()
            .filter_map(|n| sys::ifindex(&n).map(|i| (n, i)))
            .collect();
        let macs = kube_virt
            .into_iter()
            .filter_map(|n| sys::hwaddr(&n).map(|m| (n, m)))
            .collect();
        Ok(PodView {
            addrs,
            ifindex,
            macs,
            routes: sys::main_routes()?,
        })
    })?
}

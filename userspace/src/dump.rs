//! `sockmesh dump`: every redirection map, decoded, read from the pins (works with the agent
//! down).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
};

use clap::Args;
use serde_json::{json, Value};
use sockmesh_common::{counters, CidrKind, MemberKind, OrigDst, Reason, CIDR_KEY_FIXED_BITS};

use crate::{
    bpf::PinnedMaps,
    registry::PodKeys,
    spec::{addr_to_ip, Cidr, PodSpec},
};

#[derive(Args, Debug, Clone)]
pub struct DumpArgs {
    /// The agent's bpffs folder.
    #[arg(long, default_value = "/sys/fs/bpf/sockmesh")]
    pub bpffs: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn counter_name(c: u32) -> String {
    if let Some(r) = Reason::from_u32(c) {
        return r.name().to_string();
    }
    counters::name(c)
        .map(str::to_string)
        .unwrap_or_else(|| format!("counter_{c}"))
}

fn orig_dst_addr(o: &OrigDst) -> SocketAddr {
    SocketAddr::new(addr_to_ip(&o.addr), o.port)
}

/// Rebuild a pod's spec from what the maps hold.
pub fn pod_spec(config: sockmesh_common::PodConfig, keys: &PodKeys) -> PodSpec {
    let members = keys
        .members
        .iter()
        .filter_map(|(k, v)| MemberKind::from_u32(*k).map(|k| (k, *v)))
        .collect();
    let mut ranges: Vec<(CidrKind, u16, u16)> = Vec::new();
    let mut routes = Vec::new();
    let cidrs = keys
        .cidrs
        .iter()
        .filter_map(|(_, kind, addr, len, value)| {
            let kind = CidrKind::from_u32(u32::from_be_bytes(*kind))?;
            let prefix = (len - CIDR_KEY_FIXED_BITS) as u8;
            if matches!(kind, CidrKind::RouteV4 | CidrKind::RouteV6) {
                let ip = if kind.is_v6() {
                    IpAddr::V6(Ipv6Addr::from(*addr))
                } else {
                    IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
                };
                routes.push((Cidr::new(ip, prefix), *value == 1));
                return None;
            }
            if kind.is_port() {
                let start = u16::from_be_bytes([addr[0], addr[1]]);
                let last = start as u32 + (1u32 << (16 - prefix.min(16))) - 1;
                ranges.push((kind, start, last as u16));
                return None;
            }
            let ip = if kind.is_v6() {
                IpAddr::V6(Ipv6Addr::from(*addr))
            } else {
                IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
            };
            Some((kind, Cidr::new(ip, prefix)))
        })
        .collect();
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

/// Every counter, summed over CPUs: netns cookie → counter name → count.
pub fn counters(maps: &PinnedMaps) -> anyhow::Result<BTreeMap<u64, BTreeMap<String, u64>>> {
    let mut counts: BTreeMap<u64, BTreeMap<String, u64>> = BTreeMap::new();
    for item in maps.counters.iter() {
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

pub fn run(args: DumpArgs) -> anyhow::Result<()> {
    let maps = PinnedMaps::open(&args.bpffs)?;
    let counts = counters(&maps)?;
    let mut pods = Vec::new();
    for item in maps.pods.iter() {
        let (netns, config) = item?;
        let keys = PodKeys::read(&maps, netns);
        let spec = pod_spec(config, &keys);
        let local: Vec<String> = keys
            .local_addrs
            .iter()
            .map(|a| addr_to_ip(a).to_string())
            .collect();
        pods.push((netns, spec, local));
    }
    let mut conns = Vec::new();
    for item in maps.orig_dst.iter() {
        let (k, v) = item?;
        conns.push((k, v));
    }
    let mut socks = Vec::new();
    for k in maps.socks.keys() {
        socks.push(k?);
    }
    socks.sort_by_key(|k| (k.netns, k.local, k.local_port));
    let ends = |k: &sockmesh_common::SockKey| {
        (
            SocketAddr::new(addr_to_ip(&k.local), k.local_port).to_string(),
            SocketAddr::new(addr_to_ip(&k.remote), k.remote_port).to_string(),
        )
    };

    if args.json {
        let pods_json: Vec<Value> = pods
            .iter()
            .map(|(netns, spec, local)| {
                let settings: serde_json::Map<String, Value> = spec
                    .describe()
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect();
                json!({
                    "netns_cookie": netns,
                    "settings": settings,
                    "local_addresses": local,
                    "counters": counts.get(netns).cloned().unwrap_or_default(),
                })
            })
            .collect();
        let conns_json: Vec<Value> = conns
            .iter()
            .map(|(k, v)| {
                json!({
                    "netns_cookie": k.netns,
                    "client": SocketAddr::new(addr_to_ip(&k.client), k.client_port).to_string(),
                    "proxy": SocketAddr::new(addr_to_ip(&k.server), k.server_port).to_string(),
                    "original_destination": orig_dst_addr(v).to_string(),
                    "reason": Reason::from_u32(v.reason).map(Reason::name).unwrap_or("unknown"),
                })
            })
            .collect();
        let socks_json: Vec<Value> = socks
            .iter()
            .map(|k| {
                let (local, remote) = ends(k);
                json!({"netns_cookie": k.netns, "local": local, "remote": remote})
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "bpffs": args.bpffs,
                "pods": pods_json,
                "original_destinations": conns_json,
                "accelerated_sockets": socks_json,
            }))?
        );
        return Ok(());
    }

    println!("sockmesh maps at {}", args.bpffs.display());
    println!("\nregistered pods: {}", pods.len());
    for (netns, spec, local) in &pods {
        println!("\npod netns cookie {netns}");
        for (k, v) in spec.describe() {
            println!("  {k:<36} {v}");
        }
        println!("  {:<36} {}", "local addresses", local.join(", "));
        match counts.get(netns) {
            Some(c) if !c.is_empty() => {
                println!("  counters:");
                for (name, n) in c {
                    println!("    {name:<32} {n}");
                }
            }
            _ => println!("  counters: none yet"),
        }
    }
    println!("\nlive original destinations: {}", conns.len());
    if !conns.is_empty() {
        println!(
            "  {:<20} {:<28} {:<24} {:<28} reason",
            "netns", "client", "proxy", "original destination"
        );
    }
    for (k, v) in &conns {
        println!(
            "  {:<20} {:<28} {:<24} {:<28} {}",
            k.netns,
            SocketAddr::new(addr_to_ip(&k.client), k.client_port).to_string(),
            SocketAddr::new(addr_to_ip(&k.server), k.server_port).to_string(),
            orig_dst_addr(v).to_string(),
            Reason::from_u32(v.reason)
                .map(Reason::name)
                .unwrap_or("unknown"),
        );
    }
    println!(
        "\naccelerated sockets (sk_msg shortcuts their local connections): {}",
        socks.len()
    );
    for k in &socks {
        let (local, remote) = ends(k);
        println!("  {:<20} {local:<28} <-> {remote}", k.netns);
    }
    let orphans: Vec<&u64> = counts
        .keys()
        .filter(|n| !pods.iter().any(|(p, _, _)| p == *n))
        .collect();
    if !orphans.is_empty() {
        println!("\ncounters of namespaces no longer registered: {orphans:?}");
    }
    Ok(())
}

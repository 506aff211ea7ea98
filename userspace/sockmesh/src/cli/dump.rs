//! `sockmesh dump`: every redirection map, decoded, read from the pins (works with the agent
//! down).

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;
use serde_json::{json, Value};
use sockmesh_common::{NetnsCookie, OrigDst, Reason, SockKey};

use crate::core::{maps::PinnedMaps, net::addr_to_ip, registry::PodKeys};

#[derive(Args, Debug, Clone)]
pub struct DumpArgs {
    /// The agent's bpffs folder.
    #[arg(long, default_value = "/sys/fs/bpf/sockmesh")]
    pub bpffs: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn orig_dst_addr(o: &OrigDst) -> SocketAddr {
    SocketAddr::new(addr_to_ip(&o.addr), o.port)
}

pub fn run(args: DumpArgs) -> anyhow::Result<()> {
    let maps = PinnedMaps::open(&args.bpffs)?;
    let counts = maps.counters()?;
    let mut pods = Vec::new();
    for item in maps.pods.iter() {
        let (netns, config) = item?;
        let keys = PodKeys::read(&maps, netns);
        let spec = keys.spec(config);
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
    let ends = |k: &SockKey| {
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
                    "netns_cookie": netns.get(),
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
                    "netns_cookie": k.netns.get(),
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
                json!({"netns_cookie": k.netns.get(), "local": local, "remote": remote})
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
    let orphans: Vec<&NetnsCookie> = counts
        .keys()
        .filter(|n| !pods.iter().any(|(p, _, _)| p == *n))
        .collect();
    if !orphans.is_empty() {
        let orphans: Vec<u64> = orphans.into_iter().map(|n| n.get()).collect();
        println!("\ncounters of namespaces no longer registered: {orphans:?}");
    }
    Ok(())
}

//! `sockmesh explain`: what the kernel would do with a connection from (or into) a pod, and the
//! istio rule that decides it, computed by the same decision function from the pinned maps.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::PathBuf,
};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use sockmesh_common::{decide, decide_inbound, is_v4_mapped, Action, Arrival, Conn, Proto};

use crate::{
    bpf::PinnedMaps,
    dump::pod_spec,
    registry::{self, PodKeys},
    spec::ip_to_addr,
    sys,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Transport {
    Tcp,
    Udp,
}

#[derive(Args, Debug, Clone)]
pub struct ExplainArgs {
    /// The agent's bpffs folder.
    #[arg(long, default_value = "/sys/fs/bpf/sockmesh")]
    pub bpffs: PathBuf,
    /// The pod: a netns path (/var/run/netns/NAME, /proc/PID/ns/net) or a pid in it.
    #[arg(long)]
    pub netns: String,
    /// The socket owner's uid.
    #[arg(long, default_value = "1000")]
    pub uid: u32,
    /// The socket owner's gid (default: the uid).
    #[arg(long)]
    pub gid: Option<u32>,
    /// Source address: the socket's bound address (outbound), or the remote peer (--inbound).
    #[arg(long)]
    pub src: Option<IpAddr>,
    /// The socket's mark (SO_MARK).
    #[arg(long, default_value = "0")]
    pub mark: u32,
    /// Explain a connection arriving at the pod (from --src) rather than one it makes.
    #[arg(long)]
    pub inbound: bool,
    /// For --inbound: the index of the interface it arrives on, in the pod's netns.
    #[arg(long, default_value = "0")]
    pub ifindex: u32,
    pub transport: Transport,
    /// Destination address and port.
    pub dst: SocketAddr,
}

pub fn run(a: ExplainArgs) -> anyhow::Result<()> {
    let path = match a.netns.parse::<u32>() {
        Ok(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        Err(_) => PathBuf::from(&a.netns),
    };
    let fd = sys::open_netns(&path).with_context(|| format!("--netns {}", path.display()))?;
    if !sys::is_netns_fd(&fd) {
        bail!("--netns {}: not a network namespace", path.display());
    }
    let netns = sys::netns_cookie(fd.as_fd()).context("reading the netns cookie")?;
    let maps = PinnedMaps::open(&a.bpffs)?;
    let Some(config) = registry::config(&maps, netns) else {
        println!(
            "netns cookie {netns} is not registered: sockmesh leaves all of its traffic alone"
        );
        return Ok(());
    };
    let keys = PodKeys::read(&maps, netns);
    let spec = pod_spec(config, &keys);
    let dst = ip_to_addr(a.dst.ip());
    let verdict = if a.inbound {
        let Some(src) = a.src else {
            bail!("--inbound needs --src, the address the connection comes from");
        };
        decide_inbound(
            &config,
            &spec,
            &Arrival {
                src: ip_to_addr(src),
                dst,
                dport: a.dst.port(),
                ifindex: a.ifindex,
            },
        )
    } else {
        let local = a.dst.ip().is_loopback() || keys.local_addrs.contains(&dst);
        let src = a.src.map(ip_to_addr).unwrap_or(if is_v4_mapped(&dst) {
            sockmesh_common::v4_mapped([0; 4])
        } else {
            [0; 16]
        });
        decide(
            &config,
            &spec,
            &Conn {
                proto: match a.transport {
                    Transport::Tcp => Proto::Tcp,
                    Transport::Udp => Proto::Udp,
                },
                dst,
                dport: a.dst.port(),
                src,
                uid: a.uid,
                gid: a.gid.unwrap_or(a.uid),
                dst_is_local: local,
                mark: a.mark,
            },
        )
    };
    let what = match verdict.action {
        Action::Pass => "pass: left alone".to_string(),
        Action::Redirect => format!("redirect to localhost:{}", verdict.port),
        Action::Tproxy => format!(
            "TPROXY to the listener on port {} (destination kept)",
            verdict.port
        ),
    };
    println!("pod netns cookie {netns}");
    println!("verdict  {what}");
    println!("reason   {}", verdict.reason.name());
    println!("rule     {}", verdict.reason.rule());
    Ok(())
}

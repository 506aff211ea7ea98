//! `sockmesh explain`: what the kernel does with a connection from (or into) a pod, and the
//! rule that decides it, computed by the kernel's own decision functions from the pinned maps
//! and the kernel's live records.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::PathBuf,
};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use sockmesh_common::{
    decide, decide_arrival, is_v4_mapped, local_origin, v4_mapped, Action, Arrival, Conn, Proto,
    Verdict,
};

use crate::core::{live::LivePod, maps::PinnedMaps, net::ip_to_addr, sys, userns};

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
    /// The socket owner's uid, as the pod sees it (for a pod with a user namespace of its own,
    /// explain maps it to the kernel's, as the agent maps the pod's -u).
    #[arg(long, default_value = "1000")]
    pub uid: u32,
    /// The socket owner's gid (default: the uid).
    #[arg(long)]
    pub gid: Option<u32>,
    /// Source address: the socket's bound address (outbound), or the remote peer (--inbound).
    #[arg(long)]
    pub src: Option<IpAddr>,
    /// For --inbound: the peer's port (a live connection's records are found by it).
    #[arg(long, default_value = "0")]
    pub sport: u16,
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

/// What explain found: the verdict, and whether the connection is remembered besides.
struct Finding {
    verdict: Option<Verdict>,
    /// Outbound: left alone, but recorded as made from a transparent source.
    local_origin: bool,
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
    let Some(pod) = LivePod::read(&maps, netns) else {
        println!(
            "netns cookie {netns} is not registered: sockmesh leaves all of its traffic alone"
        );
        return Ok(());
    };
    let mut a = a;
    let gid = a.gid.unwrap_or(a.uid);
    let ids = userns::pod_ids(fd.as_fd()).context("reading the pod's user namespace")?;
    if let Some(ids) = ids {
        let (uid, kgid) = (ids.uid(a.uid)?, ids.gid(gid)?);
        println!(
            "owner    uid {} gid {gid} in the pod's user namespace: kernel uid {uid} gid {kgid}",
            a.uid
        );
        (a.uid, a.gid) = (uid, Some(kgid));
    }
    let finding = if a.inbound {
        inbound(&a, &pod)?
    } else {
        outbound(&a, &pod)
    };
    println!("pod netns cookie {netns}");
    match finding.verdict {
        None => {
            println!("verdict  pass: left alone");
            println!(
                "reason   made inside the pod: the outbound rules decided it when it connected \
                 (explain it without --inbound)"
            );
        }
        Some(v) => {
            let what = match v.action {
                Action::Pass => "pass: left alone".to_string(),
                Action::Redirect => format!("redirect to localhost:{}", v.port),
                Action::Tproxy => format!(
                    "TPROXY to the listener on port {} (destination kept)",
                    v.port
                ),
                Action::Refuse => format!("refused: nothing listens on port {}", v.port),
            };
            println!("verdict  {what}");
            println!("reason   {}", v.reason.name());
            println!("rule     {}", v.reason.rule());
        }
    }
    if finding.local_origin {
        println!(
            "note     recorded as local traffic from a transparent source: inbound capture \
             leaves its arrival alone"
        );
    }
    Ok(())
}

/// A connection the pod makes: [`decide`], as connect4/6 and sendmsg4/6 run it.
fn outbound(a: &ExplainArgs, pod: &LivePod<'_>) -> Finding {
    let dst = ip_to_addr(a.dst.ip());
    let src = a.src.map(ip_to_addr).unwrap_or(if is_v4_mapped(&dst) {
        v4_mapped([0; 4])
    } else {
        [0; 16]
    });
    let conn = Conn {
        proto: match a.transport {
            Transport::Tcp => Proto::Tcp,
            Transport::Udp => Proto::Udp,
        },
        dst,
        dport: a.dst.port(),
        src,
        uid: a.uid,
        gid: a.gid.unwrap_or(a.uid),
        dst_is_local: sockmesh_common::is_local(pod, &dst),
        mark: a.mark,
    };
    let verdict = decide(&pod.config, pod, &conn);
    Finding {
        local_origin: verdict.action == Action::Pass && local_origin(pod, &conn),
        verdict: Some(verdict),
    }
}

/// A connection arriving at the pod: [`decide_arrival`], as sk_lookup runs it, and the
/// listener it looks for.
fn inbound(a: &ExplainArgs, pod: &LivePod<'_>) -> anyhow::Result<Finding> {
    let Some(src) = a.src else {
        bail!("--inbound needs --src, the address the connection comes from");
    };
    let arrival = Arrival {
        src: ip_to_addr(src),
        sport: a.sport,
        dst: ip_to_addr(a.dst.ip()),
        dport: a.dst.port(),
        ifindex: a.ifindex,
    };
    let verdict = decide_arrival(&pod.config, pod, &arrival).map(|v| match v.action {
        Action::Redirect | Action::Tproxy if !pod.listening(v.port, is_v4_mapped(&arrival.dst)) => {
            Verdict::no_listener(v.port)
        }
        _ => v,
    });
    Ok(Finding {
        verdict,
        local_origin: false,
    })
}

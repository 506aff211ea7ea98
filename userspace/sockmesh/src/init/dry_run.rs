//! `--dry-run` (istio) and `--simulate` (linkerd): the settings in the tool's own terms, and the
//! verdict for representative connections, computed by the function the kernel runs.

use std::net::IpAddr;

use sockmesh_common::{decide, Action, CidrKind, Conn, MemberKind, PodFlags, Proto};

use crate::core::{net::ip_to_addr, spec::PodSpec};

/// The settings, and the decision for representative connections, computed by the same
/// function the kernel runs.
pub fn decision_table(spec: &PodSpec, local: &[IpAddr]) -> String {
    let mut out = String::from("# sockmesh capture settings (istio-iptables terms)\n");
    for (k, v) in spec.describe() {
        out.push_str(&format!("{k:<36} {v}\n"));
    }
    let c = &spec.config;
    let proxy_uid = c.proxy_uids().first().copied().unwrap_or(1337);
    let proxy_gid = c.proxy_gids().first().copied().unwrap_or(1337);
    let pod_ip = local
        .iter()
        .copied()
        .find(|ip| !ip.is_loopback() && ip.is_ipv4())
        .or_else(|| local.iter().copied().find(|ip| !ip.is_loopback()));
    let mut dsts: Vec<(IpAddr, u16, &str)> = vec![
        ("127.0.0.1".parse().unwrap(), 8080, "localhost"),
        ("127.0.0.2".parse().unwrap(), 8080, "127.0.0.2"),
        ("198.51.100.7".parse().unwrap(), 80, "remote"),
        ("198.51.100.7".parse().unwrap(), 15008, "remote tunnel port"),
    ];
    if let Some(ip) = pod_ip {
        dsts.push((ip, 8080, "own pod IP"));
    }
    if c.has(PodFlags::IPV6) {
        dsts.push(("::1".parse().unwrap(), 8080, "localhost v6"));
        dsts.push(("2001:db8::7".parse().unwrap(), 80, "remote v6"));
    }
    for (kind, cidr) in &spec.cidrs {
        dsts.push((
            cidr.addr,
            80,
            if matches!(kind, CidrKind::ExcludeV4 | CidrKind::ExcludeV6) {
                "-x CIDR"
            } else {
                "-i CIDR"
            },
        ));
    }
    for (kind, port) in &spec.members {
        if *kind == MemberKind::OutboundIncludePort {
            dsts.push(("198.51.100.7".parse().unwrap(), *port as u16, "-q port"));
        }
        if *kind == MemberKind::OutboundExcludePort {
            dsts.push(("198.51.100.7".parse().unwrap(), *port as u16, "-o port"));
        }
    }
    let who: [(&str, u32, u32, Option<IpAddr>); 5] = [
        ("app 1000:1000", 1000, 1000, None),
        ("root 0:0", 0, 0, None),
        ("proxy uid", proxy_uid, proxy_uid, None),
        ("proxy gid only", 1000, proxy_gid, None),
        (
            "from 127.0.0.6",
            1000,
            1000,
            Some("127.0.0.6".parse().unwrap()),
        ),
    ];
    out.push_str("\n# decisions (tcp)\n");
    out.push_str(&format!(
        "{:<18} {:<34} {:<20} {}\n",
        "caller", "destination", "verdict", "rule"
    ));
    for (dst, port, label) in &dsts {
        for (wname, uid, gid, src) in &who {
            let dst_is_local = dst.is_loopback() || local.contains(dst);
            let src = src.map(ip_to_addr).unwrap_or([0; 16]);
            let conn = Conn {
                proto: Proto::Tcp,
                dst: ip_to_addr(*dst),
                dport: *port,
                src,
                uid: *uid,
                gid: *gid,
                dst_is_local,
                mark: 0,
            };
            let v = decide(c, spec, &conn);
            let verdict = match v.action {
                Action::Pass => "pass".to_string(),
                Action::Redirect => format!("redirect :{}", v.port),
                Action::Tproxy => format!("tproxy :{}", v.port),
                Action::Refuse => format!("refuse :{}", v.port),
            };
            let target = match dst {
                IpAddr::V6(_) => format!("[{dst}]:{port} ({label})"),
                IpAddr::V4(_) => format!("{dst}:{port} ({label})"),
            };
            out.push_str(&format!(
                "{wname:<18} {target:<34} {verdict:<20} {}\n",
                v.reason().rule()
            ));
        }
    }
    out
}

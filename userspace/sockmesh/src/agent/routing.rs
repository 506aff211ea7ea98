//! What the agent sets up inside a pod's netns besides the maps, as istio-iptables does:
//! TPROXY mode's policy routing, `-k`'s local delivery of forwarded connections, and `::6` on
//! lo for IPv6 pods.

use std::{os::fd::BorrowedFd, process::Command};

use crate::core::sys::{self, SyscallError};

/// A setting in the pod's netns that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("running ip (iproute2) failed: {0}; install iproute2")]
    NoIp(#[source] std::io::Error),
    #[error("ip {args} failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("adding ::6/128 to lo failed: {0} (is IPv6 disabled in the pod?)")]
    V6Passthrough(String),
    #[error("setting net.ipv4.tcp_fwmark_accept in the pod: {0}")]
    FwmarkAccept(#[source] std::io::Error),
    #[error(transparent)]
    Netns(#[from] SyscallError),
}

/// Run `ip ARGS` in the calling thread's netns.
fn ip(args: &[&str]) -> Result<(), RoutingError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(RoutingError::NoIp)?;
    if !out.status.success() {
        return Err(RoutingError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// TPROXY mode's routing in the pod's netns, as istio-iptables sets it up: packets with the
/// TPROXY mark are delivered locally (`ip rule fwmark M lookup T`, `local default dev lo` in
/// T), so the app's replies to the proxy's original-source connections come back to it. The
/// mark reaches those replies through `net.ipv4.tcp_fwmark_accept` (the app's accepted socket
/// takes the mark of the proxy's SYN) instead of iptables' CONNMARK rules. `on: false` takes
/// it all away again.
pub fn tproxy_routing(
    fd: BorrowedFd<'_>,
    mark: u32,
    table: u32,
    ipv6: bool,
    on: bool,
) -> Result<(), RoutingError> {
    sys::in_netns(fd, move || -> Result<(), RoutingError> {
        let (m, t) = (mark.to_string(), table.to_string());
        let mut families = vec![("-4", "0.0.0.0/0")];
        if ipv6 {
            families.push(("-6", "::/0"));
        }
        for (f, any) in families {
            // Idempotent: drop an earlier copy of the rule first.
            let _ = ip(&[f, "rule", "del", "fwmark", &m, "lookup", &t]);
            if on {
                ip(&[f, "rule", "add", "fwmark", &m, "lookup", &t])?;
                ip(&[
                    f, "route", "replace", "local", any, "dev", "lo", "table", &t,
                ])?;
            } else {
                let _ = ip(&[f, "route", "del", "local", any, "dev", "lo", "table", &t]);
            }
        }
        std::fs::write(
            "/proc/sys/net/ipv4/tcp_fwmark_accept",
            if on { "1" } else { "0" },
        )
        .map_err(RoutingError::FwmarkAccept)
    })?
}

/// `ip -6 addr replace ::6/128 dev lo`, run in the calling thread's netns.
pub fn add_v6_passthrough() -> Result<(), RoutingError> {
    ip(&["-6", "addr", "replace", "::6/128", "dev", "lo"]).map_err(|e| match e {
        RoutingError::Ip { stderr, .. } => RoutingError::V6Passthrough(stderr),
        other => other,
    })
}

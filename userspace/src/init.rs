//! `sockmesh init istio`: register the pod's network namespace with the agent.

use std::{ffi::OsString, io::Write, net::IpAddr, os::fd::AsFd, path::Path, time::Duration};

use sockmesh_common::{decide, flags, Action, Conn, Proto};

use crate::{
    api::{self, pb},
    istio::{IfAddr, IstioArgs, ProcessEnv},
    linkerd::LinkerdArgs,
    spec::{ip_to_addr, PodSpec},
    sys,
};

const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// istio-iptables' exit code for a failed validation (constants.ValidationErrorCode).
const VALIDATION_ERROR_CODE: i32 = 126;

/// Socket acceleration of the pod being registered: `off`, `proxies` (the default: the
/// proxy's sockets only) or `all` (the app's too; `on`, as earlier releases said it).
pub const ACCELERATION_ENV: &str = "SOCKMESH_ACCELERATION";

/// The pod flags for a `SOCKMESH_ACCELERATION` value (unset or empty: the default).
pub fn acceleration_flags(value: Option<&str>) -> Result<u32, String> {
    match value {
        None | Some("" | "proxies") => Ok(0),
        Some("off") => Ok(flags::NO_ACCEL),
        // `on` is how earlier releases said it, when every local socket was accelerated.
        Some("all" | "on") => Ok(flags::ACCEL_APPS),
        Some(other) => Err(format!(
            "{ACCELERATION_ENV}={other:?}: want off, proxies (the default: the proxy's local \
             connections skip TCP/IP) or all (the app's writes to its proxy too; its blocking \
             reads may then return EAGAIN early, see docs/operations.md)"
        )),
    }
}

/// Why `init` failed, with its exit code.
enum Failure {
    Error(String),
    Validation(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Error(e)
    }
}

/// Non-capture settings `init` acts on.
#[derive(Debug, Clone)]
pub struct InitAction {
    pub dry_run: bool,
    pub cleanup_only: bool,
    /// `--skip-rule-apply`: register nothing.
    pub skip_apply: bool,
    /// `--run-validation`: probe port and timeout.
    pub validation: Option<(u16, Duration)>,
    pub agent_socket: std::path::PathBuf,
    /// Accepted settings that need no action under sockmesh, with why (printed by init).
    pub notes: Vec<String>,
}

/// The two command lines `init` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Istio,
    Linkerd,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Flavor::Istio => "istio",
            Flavor::Linkerd => "linkerd",
        }
    }
}

/// Run `init istio` or `init linkerd` with `argv` (argv[0] first). Returns the process exit
/// code; errors are printed as one line on stderr.
pub fn main(flavor: Flavor, argv: Vec<OsString>) -> i32 {
    match run(flavor, argv, &mut std::io::stdout()) {
        Ok(()) => 0,
        Err(Failure::Error(e)) => {
            eprintln!("sockmesh init {}: {e}", flavor.name());
            1
        }
        Err(Failure::Validation(e)) => {
            eprintln!("sockmesh init {}: validation failed: {e}", flavor.name());
            VALIDATION_ERROR_CODE
        }
    }
}

/// `--help` output comes back from the parsers as an error text; print it and succeed.
fn is_help(text: &str) -> bool {
    text.contains("Usage:")
}

/// Run `init` for the CNI plugin, whose stdout belongs to the CNI result: progress goes to
/// stderr, and any failure (validation included) is an error.
pub fn run_for_cni(argv: Vec<OsString>) -> Result<(), String> {
    run(Flavor::Istio, argv, &mut std::io::stderr()).map_err(|f| match f {
        Failure::Error(e) => e,
        Failure::Validation(e) => format!("validation failed: {e}"),
    })
}

fn run(flavor: Flavor, argv: Vec<OsString>, out: &mut dyn Write) -> Result<(), Failure> {
    // Parse first, so a bad flag fails before anything is opened.
    enum Parsed {
        Istio(Box<IstioArgs>),
        Linkerd(Box<LinkerdArgs>),
    }
    let parsed = match flavor {
        Flavor::Istio => IstioArgs::parse_argv(argv).map(|a| Parsed::Istio(Box::new(a))),
        Flavor::Linkerd => LinkerdArgs::parse_argv(argv).map(|a| Parsed::Linkerd(Box::new(a))),
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) if is_help(&e) => {
            let _ = write!(out, "{e}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let (ns_flag, ns_value) = match &parsed {
        Parsed::Istio(a) => ("--network-namespace", a.network_namespace.clone()),
        Parsed::Linkerd(a) => ("--netns", a.netns.clone()),
    };
    let netns_path = if ns_value.is_empty() {
        Path::new("/proc/self/ns/net").to_path_buf()
    } else {
        Path::new(&ns_value).to_path_buf()
    };
    let netns = sys::open_netns(&netns_path)
        .map_err(|e| format!("{ns_flag} {}: {e}", netns_path.display()))?;
    if !sys::is_netns_fd(&netns) {
        return Err(format!(
            "{ns_flag} {}: not a network namespace",
            netns_path.display()
        )
        .into());
    }
    let addrs = sys::in_netns(netns.as_fd(), sys::interface_addrs)
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let if_addrs: Vec<IfAddr> = addrs.iter().map(|a| IfAddr { ip: a.ip }).collect();
    let (mut spec, action) = match &parsed {
        Parsed::Istio(a) => a.to_spec(&ProcessEnv, &if_addrs),
        Parsed::Linkerd(a) => a.to_spec(),
    }
    .map_err(|e| e.to_string())?;
    // sockmesh's own per-pod switch (the node's is the agent's --acceleration).
    spec.config.flags |= acceleration_flags(std::env::var(ACCELERATION_ENV).ok().as_deref())?;
    for note in &action.notes {
        eprintln!("sockmesh init {}: note: {note}", flavor.name());
    }
    if action.dry_run {
        let local: Vec<IpAddr> = addrs.iter().map(|a| a.ip).collect();
        let _ = write!(out, "{}", decision_table(&spec, &local));
        return Ok(());
    }
    let spec_ports = (spec.config.outbound_port, spec.config.inbound_port);
    if !action.skip_apply {
        apply(&action, spec, &netns, out)?;
    }
    if let Some((port, timeout)) = action.validation {
        let v6 = if_addrs
            .iter()
            .find(|a| !a.ip.is_loopback())
            .is_some_and(|a| a.ip.is_ipv6());
        let ports = [spec_ports.0, spec_ports.1];
        crate::validation::run(ports, port, timeout, v6).map_err(Failure::Validation)?;
        let _ = writeln!(
            out,
            "sockmesh: validation passed: a connection to the probe port reached the inbound \
             capture port"
        );
    }
    Ok(())
}

/// Register (or with --cleanup-only, unregister) the pod with the agent.
fn apply(
    action: &InitAction,
    spec: PodSpec,
    netns: &std::os::fd::OwnedFd,
    out: &mut dyn Write,
) -> Result<(), String> {
    let sock = &action.agent_socket;
    let unreachable = |e: &dyn std::fmt::Display| {
        format!(
            "cannot reach the sockmesh agent at {}: {e}: start it (sockmesh agent) and make \
             its socket available here (--agent-socket / SOCKMESH_AGENT_SOCKET)",
            sock.display()
        )
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    let call = async {
        let mut client = api::connect(sock, Some(netns.as_fd()))
            .await
            .map_err(|e| Err(unreachable(&source_chain(&*e))))?;
        let reply = if action.cleanup_only {
            client.unregister(pb::UnregisterRequest {}).await
        } else {
            client
                .register(pb::RegisterRequest {
                    settings: Some(pb::PodSettings::from(&spec)),
                })
                .await
        };
        reply.map(|r| r.into_inner()).map_err(Ok)
    };
    let resp = match rt.block_on(async { tokio::time::timeout(AGENT_TIMEOUT, call).await }) {
        Err(_) => {
            return Err(format!(
                "the sockmesh agent at {} did not answer within {}s: it may be overloaded; \
                 the registration may still complete, run init again to be sure",
                sock.display(),
                AGENT_TIMEOUT.as_secs()
            ))
        }
        Ok(Err(Err(e))) => return Err(e),
        Ok(Err(Ok(status))) if status.code() == tonic::Code::Unavailable => {
            return Err(unreachable(&status.message()))
        }
        Ok(Err(Ok(status))) => {
            return Err(format!(
                "the agent refused ({:?}): {}",
                status.code(),
                status.message()
            ))
        }
        Ok(Ok(r)) => r,
    };
    let cookie = resp.netns_cookie;
    if action.cleanup_only {
        let _ = writeln!(out, "sockmesh: capture removed for netns cookie {cookie}");
    } else {
        let _ = writeln!(out, "sockmesh: capture in force for netns cookie {cookie}");
    }
    Ok(())
}

/// An error and its causes, "a: b: c".
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// The settings, and the decision for representative connections, computed by the same
/// function the kernel runs.
pub fn decision_table(spec: &PodSpec, local: &[IpAddr]) -> String {
    let mut out = String::from("# sockmesh capture settings (istio-iptables terms)\n");
    for (k, v) in spec.describe() {
        out.push_str(&format!("{k:<36} {v}\n"));
    }
    let c = &spec.config;
    let proxy_uid = if c.n_uids > 0 { c.uids[0] } else { 1337 };
    let proxy_gid = if c.n_gids > 0 { c.gids[0] } else { 1337 };
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
    if c.has(flags::IPV6) {
        dsts.push(("::1".parse().unwrap(), 8080, "localhost v6"));
        dsts.push(("2001:db8::7".parse().unwrap(), 80, "remote v6"));
    }
    for (kind, cidr) in &spec.cidrs {
        dsts.push((
            cidr.addr,
            80,
            if matches!(*kind as u32, 1 | 2) {
                "-x CIDR"
            } else {
                "-i CIDR"
            },
        ));
    }
    for (kind, port) in &spec.members {
        if *kind == sockmesh_common::MemberKind::OutboundIncludePort {
            dsts.push(("198.51.100.7".parse().unwrap(), *port as u16, "-q port"));
        }
        if *kind == sockmesh_common::MemberKind::OutboundExcludePort {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acceleration_levels_and_a_bad_one() {
        assert_eq!(acceleration_flags(None), Ok(0));
        assert_eq!(acceleration_flags(Some("")), Ok(0));
        assert_eq!(acceleration_flags(Some("proxies")), Ok(0));
        assert_eq!(acceleration_flags(Some("off")), Ok(flags::NO_ACCEL));
        assert_eq!(acceleration_flags(Some("all")), Ok(flags::ACCEL_APPS));
        assert_eq!(
            acceleration_flags(Some("on")),
            Ok(flags::ACCEL_APPS),
            "the old spelling"
        );
        let e = acceleration_flags(Some("fast")).unwrap_err();
        assert!(
            e.contains("want off, proxies") && e.contains("\"fast\""),
            "{e}"
        );
    }
}

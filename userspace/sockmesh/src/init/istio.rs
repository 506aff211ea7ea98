//! `sockmesh init istio`: istio-iptables' command line, flag for flag, turned into a [`PodSpec`].
//!
//! Flags, environment variables, defaults and precedence are istio-iptables' (docs/design.md,
//! "Reference behaviour"): a flag on the command line beats its environment variable, which
//! beats the default. Where
//! istio-iptables passes a malformed value through to iptables (ports, uids) or silently drops it
//! (typed flags set from the environment), sockmesh rejects it with an error naming the flag,
//! before anything is registered.

use std::{net::IpAddr, path::PathBuf};

use clap::{ArgAction, Parser};
use sockmesh_common::{CidrKind, MemberKind, PodConfig, PodFlags, MAX_OWNERS};

use super::{
    action::InitAction,
    flags::{
        env_bool, err, go_bool, parse_cidr, parse_go_duration, parse_port, parse_ports, resolve_id,
        split, CommandLine, Env, FlagError,
    },
};
use crate::core::{net::Cidr, spec::PodSpec};

/// istio-iptables' flags. Every flag of the spec's table is here; the ones whose behaviour is not
/// implemented yet are rejected in [`IstioArgs::to_spec`] with a message, never ignored.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "istio-iptables",
    about = "Capture a pod's traffic with sockmesh, taking istio-iptables' flags",
    disable_version_flag = true,
    // pflag lets a later occurrence of a flag replace an earlier one.
    args_override_self = true
)]
pub struct IstioArgs {
    /// Path of the sockmesh agent's registration socket.
    #[arg(
        long,
        env = "SOCKMESH_AGENT_SOCKET",
        default_value = "/run/sockmesh/agent.sock"
    )]
    pub agent_socket: PathBuf,

    /// Outbound capture port (no environment variable, as in istio).
    #[arg(short = 'p', long = "envoy-port", default_value = "15001")]
    pub envoy_port: String,
    /// Inbound capture port.
    #[arg(
        short = 'z',
        long = "inbound-capture-port",
        env = "INBOUND_CAPTURE_PORT",
        default_value = "15006"
    )]
    pub inbound_capture_port: String,
    /// Inbound tunnel (HBONE) port, never redirected.
    #[arg(
        short = 'e',
        long = "inbound-tunnel-port",
        env = "INBOUND_TUNNEL_PORT",
        default_value = "15008"
    )]
    pub inbound_tunnel_port: String,
    /// Proxy uids (comma list); default: uid of $ENVOY_USER, else 1337.
    #[arg(short = 'u', long = "proxy-uid", env = "PROXY_UID")]
    pub proxy_uid: Option<String>,
    /// Proxy gids (comma list); default: the -u value.
    #[arg(short = 'g', long = "proxy-gid", env = "PROXY_GID")]
    pub proxy_gid: Option<String>,
    /// Inbound interception mode: REDIRECT (default) or TPROXY.
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        env = "ISTIO_INBOUND_INTERCEPTION_MODE",
        default_value = ""
    )]
    pub interception_mode: String,
    /// TPROXY mark.
    #[arg(
        short = 't',
        long = "istio-inbound-tproxy-mark",
        env = "ISTIO_INBOUND_TPROXY_MARK",
        default_value = "1337"
    )]
    pub tproxy_mark: String,
    /// TPROXY routing table.
    #[arg(
        short = 'r',
        long = "istio-inbound-tproxy-route-table",
        env = "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        default_value = "133"
    )]
    pub tproxy_route_table: String,
    /// Inbound ports to capture: '*' or a comma list; empty means no inbound capture.
    #[arg(
        short = 'b',
        long = "istio-inbound-ports",
        env = "ISTIO_INBOUND_PORTS",
        default_value = ""
    )]
    pub inbound_ports: String,
    /// Inbound ports to skip when -b is '*'.
    #[arg(
        short = 'd',
        long = "istio-local-exclude-ports",
        env = "ISTIO_LOCAL_EXCLUDE_PORTS",
        default_value = ""
    )]
    pub local_exclude_ports: String,
    /// Interfaces whose traffic is never captured.
    #[arg(
        short = 'c',
        long = "istio-exclude-interfaces",
        env = "ISTIO_EXCLUDE_INTERFACES",
        default_value = ""
    )]
    pub exclude_interfaces: String,
    /// Outbound CIDRs to capture: '*' or a comma list; empty means none.
    #[arg(
        short = 'i',
        long = "istio-service-cidr",
        env = "ISTIO_SERVICE_CIDR",
        default_value = ""
    )]
    pub service_cidr: String,
    /// Outbound CIDRs never captured.
    #[arg(
        short = 'x',
        long = "istio-service-exclude-cidr",
        env = "ISTIO_SERVICE_EXCLUDE_CIDR",
        default_value = ""
    )]
    pub service_exclude_cidr: String,
    /// TCP ports always captured outbound.
    #[arg(
        short = 'q',
        long = "istio-outbound-ports",
        env = "ISTIO_OUTBOUND_PORTS",
        default_value = ""
    )]
    pub outbound_ports: String,
    /// Outbound ports (tcp and udp) never captured, before every other rule.
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        default_value = ""
    )]
    pub local_outbound_ports_exclude: String,
    /// Interfaces whose inbound traffic is treated as outbound.
    #[arg(
        short = 'k',
        long = "kube-virt-interfaces",
        env = "KUBE_VIRT_INTERFACES",
        default_value = ""
    )]
    pub kube_virt_interfaces: String,
    /// Print the decision table; register nothing.
    #[arg(short = 'n', long = "dry-run", env = "DRY_RUN", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = go_bool, action = ArgAction::Set)]
    pub dry_run: bool,
    /// Port of the validation probe.
    #[arg(
        long = "iptables-probe-port",
        env = "IPTABLES_PROBE_PORT",
        default_value = "15002"
    )]
    pub iptables_probe_port: String,
    /// Validation timeout.
    #[arg(long = "probe-timeout", env = "PROBE_TIMEOUT", default_value = "5s")]
    pub probe_timeout: String,
    /// Program nothing.
    #[arg(long = "skip-rule-apply", env = "SKIP_RULE_APPLY", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = go_bool, action = ArgAction::Set)]
    pub skip_rule_apply: bool,
    /// Run the validation self-test.
    #[arg(long = "run-validation", env = "RUN_VALIDATION", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = go_bool, action = ArgAction::Set)]
    pub run_validation: bool,
    /// Capture DNS to 15053 (also ISTIO_META_DNS_CAPTURE).
    #[arg(long = "redirect-dns", env = "REDIRECT_DNS", num_args = 0..=1, default_missing_value = "true", value_parser = go_bool, action = ArgAction::Set)]
    pub redirect_dns: Option<bool>,
    /// Capture every port-53 destination, not only resolv.conf's servers.
    #[arg(long = "capture-all-dns", env = "CAPTURE_ALL_DNS", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = go_bool, action = ArgAction::Set)]
    pub capture_all_dns: bool,
    /// Drop conntrack-INVALID packets (also INVALID_DROP).
    #[arg(long = "drop-invalid", env = "DROP_INVALID", num_args = 0..=1, default_missing_value = "true", value_parser = go_bool, action = ArgAction::Set)]
    pub drop_invalid: Option<bool>,
    /// Keep scanning interfaces for an IPv6 address (also ISTIO_DUAL_STACK).
    #[arg(long = "dual-stack", env = "DUAL_STACK", num_args = 0..=1, default_missing_value = "true", value_parser = go_bool, action = ArgAction::Set)]
    pub dual_stack: Option<bool>,
    /// Network namespace (a path such as /var/run/netns/NAME or /proc/PID/ns/net) to capture,
    /// instead of the caller's own.
    #[arg(
        long = "network-namespace",
        env = "NETWORK_NAMESPACE",
        default_value = ""
    )]
    pub network_namespace: String,
    /// Pod-scoped xtables lock (no effect: sockmesh takes no xtables lock).
    #[arg(long = "cni-mode", env = "CNI_MODE", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = go_bool, action = ArgAction::Set)]
    pub cni_mode: bool,
    /// Reconcile differing state (sockmesh always replaces a pod's registration atomically).
    #[arg(long = "reconcile", env = "RECONCILE", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = go_bool, action = ArgAction::Set)]
    pub reconcile: bool,
    /// Remove this pod's capture (unregister) and exit.
    #[arg(long = "cleanup-only", env = "CLEANUP_ONLY", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = go_bool, action = ArgAction::Set)]
    pub cleanup_only: bool,
    /// Apply even if already applied (sockmesh always applies).
    #[arg(long = "force-apply", env = "FORCE_APPLY", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = go_bool, action = ArgAction::Set)]
    pub force_apply: bool,
    /// Use istio-nftables (no effect: sockmesh programs no firewall).
    #[arg(long = "native-nftables", env = "NATIVE_NFTABLES", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = go_bool, action = ArgAction::Set)]
    pub native_nftables: bool,
    /// legacy or nft (no effect: sockmesh runs no iptables binary).
    #[arg(
        long = "force-iptables-binary",
        env = "FORCE_IPTABLES_BINARY",
        default_value = ""
    )]
    pub force_iptables_binary: String,

    // istio's logging flags, present in the injection template.
    #[arg(long = "log_output_level", hide = true)]
    pub log_output_level: Option<String>,
    #[arg(long = "log_as_json", hide = true, num_args = 0..=1, default_missing_value = "true", value_parser = go_bool, action = ArgAction::Set)]
    pub log_as_json: Option<bool>,
    #[arg(long = "log_caller", hide = true)]
    pub log_caller: Option<String>,
    #[arg(long = "log_stacktrace_level", hide = true)]
    pub log_stacktrace_level: Option<String>,
    #[arg(long = "log_target", hide = true)]
    pub log_target: Option<String>,
}

/// The `nameserver` addresses of a resolv.conf.
pub fn resolv_conf_servers(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("nameserver"))
                .then(|| f.next())
                .flatten()
                .and_then(|a| a.split('%').next())
                .and_then(|a| a.parse().ok())
        })
        .collect()
}

/// A local interface address as istio's getLocalIP sees it.
#[derive(Clone, Debug)]
pub struct IfAddr {
    pub ip: IpAddr,
}

/// istio's IPv6 detection (config.go getLocalIP): the first address that is neither loopback
/// nor link-local decides; with dual-stack, any such v6 address turns IPv6 on.
pub fn detect_ipv6(addrs: &[IfAddr], dual_stack: bool) -> Result<bool, FlagError> {
    let usable: Vec<IpAddr> = addrs
        .iter()
        .map(|a| match a.ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a.ip),
            ip => ip,
        })
        .filter(|ip| !ip.is_loopback() && !is_link_local(ip))
        .collect();
    let Some(first) = usable.first() else {
        return Err(err(
            "local IP",
            "no valid local IP address found: the pod needs a non-loopback, non-link-local \
             address before init runs (istio-iptables fails the same way)",
        ));
    };
    Ok(if dual_stack {
        usable.iter().any(IpAddr::is_ipv6)
    } else {
        first.is_ipv6()
    })
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local()
                || v4.octets()[0] == 224 && v4.octets()[1] == 0 && v4.octets()[2] == 0
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            (s[0] & 0xffc0) == 0xfe80 || (s[0] == 0xff02)
        }
    }
}

impl CommandLine for IstioArgs {
    const TAKES: &'static str = "sockmesh init istio takes istio-iptables' flags";
}

impl IstioArgs {
    /// Validate everything and build the pod's capture spec. `addrs` are the pod's interface
    /// addresses (for IPv6 detection); `env` supplies the env-only settings.
    pub fn to_spec(
        &self,
        env: &dyn Env,
        addrs: &[IfAddr],
    ) -> Result<(PodSpec, InitAction), FlagError> {
        let mut notes = Vec::new();
        // Settings whose behaviour sockmesh does not implement yet: refuse, never ignore.
        // Interface names: checked for shape here; the agent resolves them in the pod's netns.
        let ifaces = |flag: &str, s: &str| -> Result<Vec<String>, FlagError> {
            split(s)
                .map(|n| {
                    if n.len() > 15 || n.contains(['/', ' ']) {
                        Err(err(flag, format!("'{n}' is not an interface name")))
                    } else {
                        Ok(n.to_string())
                    }
                })
                .collect()
        };
        let exclude_ifaces = ifaces("-c", &self.exclude_interfaces)?;
        let kube_virt_ifaces = ifaces("-k", &self.kube_virt_interfaces)?;
        let redirect_dns = match self.redirect_dns {
            Some(v) => v,
            None => env_bool(env, &["ISTIO_META_DNS_CAPTURE"])?,
        };
        match self.force_iptables_binary.as_str() {
            "" | "legacy" | "nft" => {}
            other => {
                return Err(err(
                    "--force-iptables-binary",
                    format!("'{other}' is neither legacy nor nft"),
                ))
            }
        }
        let probe_port = parse_port("--iptables-probe-port", &self.iptables_probe_port)?;
        let probe_timeout = parse_go_duration(&self.probe_timeout)
            .map_err(|m| err("--probe-timeout", m.to_string()))?;
        let tproxy_mark = self
            .tproxy_mark
            .parse::<u32>()
            .map_err(|_| err("-t", format!("'{}' is not a number", self.tproxy_mark)))?;
        let tproxy_table = self.tproxy_route_table.parse::<u32>().map_err(|_| {
            err(
                "-r",
                format!("'{}' is not a number", self.tproxy_route_table),
            )
        })?;
        let drop_invalid = match self.drop_invalid {
            Some(v) => v,
            None => env_bool(env, &["INVALID_DROP"])?,
        };
        if drop_invalid {
            notes.push(
                "--drop-invalid: nothing to do, sockmesh does no NAT so no conntrack-INVALID \
                 packet can escape reverse translation"
                    .into(),
            );
        }
        if self.cni_mode || self.native_nftables || !self.force_iptables_binary.is_empty() {
            notes.push(
                "--cni-mode/--native-nftables/--force-iptables-binary: no effect, sockmesh runs \
                 no iptables or nftables"
                    .into(),
            );
        }

        let outbound_port = parse_port("-p", &self.envoy_port)?;
        let inbound_port = parse_port("-z", &self.inbound_capture_port)?;
        let tunnel_port = parse_port("-e", &self.inbound_tunnel_port)?;

        // -u: default is the uid of $ENVOY_USER (istio-proxy), else 1337.
        let uid_str = match &self.proxy_uid {
            Some(s) if !s.is_empty() => s.clone(),
            _ => {
                let user = env
                    .var("ENVOY_USER")
                    .unwrap_or_else(|| "istio-proxy".into());
                crate::core::sys::uid_by_name(&user)
                    .map(|u| u.to_string())
                    .unwrap_or_else(|| "1337".into())
            }
        };
        let gid_str = match &self.proxy_gid {
            Some(s) if !s.is_empty() => s.clone(),
            _ => uid_str.clone(),
        };
        let uids = split(&uid_str)
            .map(|u| resolve_id("-u", u, false))
            .collect::<Result<Vec<_>, _>>()?;
        let gids = split(&gid_str)
            .map(|g| resolve_id("-g", g, true))
            .collect::<Result<Vec<_>, _>>()?;
        if uids.len() > MAX_OWNERS {
            return Err(err(
                "-u",
                format!("at most {MAX_OWNERS} proxy uids, got {}", uids.len()),
            ));
        }
        if gids.len() > MAX_OWNERS {
            return Err(err(
                "-g",
                format!("at most {MAX_OWNERS} proxy gids, got {}", gids.len()),
            ));
        }

        let mut members: Vec<(MemberKind, u32)> = Vec::new();
        let mut cidrs: Vec<(CidrKind, Cidr)> = Vec::new();
        let mut cfg_flags = PodFlags::NONE;

        for p in parse_ports("-o", &self.local_outbound_ports_exclude)? {
            members.push((MemberKind::OutboundExcludePort, p.into()));
        }
        for p in parse_ports("-q", &self.outbound_ports)? {
            members.push((MemberKind::OutboundIncludePort, p.into()));
        }
        // -x before -i, as istio parses them; '*' is an error for -x.
        if self.service_exclude_cidr == "*" {
            return Err(err(
                "-x",
                "'*' is not allowed (invalid value for OUTBOUND_IP_RANGES_EXCLUDE)",
            ));
        }
        for c in split(&self.service_exclude_cidr) {
            let c = parse_cidr("-x", c)?;
            let kind = if c.is_v6() {
                CidrKind::ExcludeV6
            } else {
                CidrKind::ExcludeV4
            };
            cidrs.push((kind, c));
        }
        if self.service_cidr == "*" {
            cfg_flags |= PodFlags::OUTBOUND_ALL;
        } else {
            for c in split(&self.service_cidr) {
                let c = parse_cidr("-i", c)?;
                if c.ip().is_loopback() {
                    cfg_flags |= PodFlags::NO_LO_RETURN;
                }
                let kind = if c.is_v6() {
                    CidrKind::IncludeV6
                } else {
                    CidrKind::IncludeV4
                };
                cidrs.push((kind, c));
            }
        }
        if self.inbound_ports == "*" {
            cfg_flags |= PodFlags::INBOUND_ALL;
            for p in parse_ports("-d", &self.local_exclude_ports)? {
                members.push((MemberKind::InboundExcludePort, p.into()));
            }
        } else {
            // istio ignores -d unless -b is '*'; it is still validated here.
            parse_ports("-d", &self.local_exclude_ports)?;
            let ports = parse_ports("-b", &self.inbound_ports)?;
            if !ports.is_empty() {
                cfg_flags |= PodFlags::INBOUND_LIST;
            }
            for p in ports {
                members.push((MemberKind::InboundPort, p.into()));
            }
        }
        // Owner groups (env only).
        let include = env
            .var("ISTIO_OUTBOUND_OWNER_GROUPS")
            .unwrap_or_else(|| "*".into());
        let exclude = env
            .var("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE")
            .unwrap_or_default();
        if include != "*" {
            cfg_flags |= PodFlags::OWNER_GROUPS_INCLUDE;
            let groups: Vec<&str> = split(&include).collect();
            if groups.len() > 64 {
                return Err(err(
                    "ISTIO_OUTBOUND_OWNER_GROUPS",
                    format!("at most 64 owner groups, got {}", groups.len()),
                ));
            }
            for g in groups {
                let gid = resolve_id("ISTIO_OUTBOUND_OWNER_GROUPS", g, true)?;
                members.push((MemberKind::OwnerGroupInclude, gid));
            }
            // istio ignores the exclude list unless the include list is '*'; still validated.
            for g in split(&exclude) {
                resolve_id("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", g, true)?;
            }
        } else {
            for g in split(&exclude) {
                cfg_flags |= PodFlags::OWNER_GROUPS_EXCLUDE;
                let gid = resolve_id("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", g, true)?;
                members.push((MemberKind::OwnerGroupExclude, gid));
            }
        }

        // Loopback CIDR (env only).
        let lo = env
            .var("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR")
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "127.0.0.1/32".into());
        let lo_cidr = parse_cidr("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", &lo)?;
        let IpAddr::V4(lo_ip) = lo_cidr.ip() else {
            return Err(err(
                "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                format!("expected an IPv4 loopback address in CIDR {lo}"),
            ));
        };
        if !lo_ip.is_loopback() {
            return Err(err(
                "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                format!("expected an IPv4 loopback address in CIDR {lo}"),
            ));
        }
        if !(8..=32).contains(&lo_cidr.prefix) {
            return Err(err(
                "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
                format!("expected CIDR {lo} to have a mask in range [8, 32]"),
            ));
        }

        let dual_stack = match self.dual_stack {
            Some(v) => v,
            None => env_bool(env, &["ISTIO_DUAL_STACK"])?,
        };
        // Removing capture needs no address: the pod may have lost it already (CNI DEL after
        // the interface plugin's).
        let ipv6 = match detect_ipv6(addrs, dual_stack) {
            Err(_) if self.cleanup_only => false,
            r => r?,
        };
        if ipv6 {
            cfg_flags |= PodFlags::IPV6;
        }

        // DNS capture: every port-53 destination, or only the servers of the pod's resolv.conf
        // (then none listed means no DNS capture, as istio-iptables decides).
        if redirect_dns {
            let servers = if self.capture_all_dns {
                Vec::new()
            } else {
                let path = env
                    .var("SOCKMESH_RESOLV_CONF")
                    .unwrap_or_else(|| "/etc/resolv.conf".into());
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    err(
                        "--redirect-dns",
                        format!("reading DNS servers from {path}: {e} (or use --capture-all-dns)"),
                    )
                })?;
                resolv_conf_servers(&text)
            };
            if self.capture_all_dns {
                cfg_flags |=
                    PodFlags::DNS | PodFlags::DNS_ALL | PodFlags::DNS_V4 | PodFlags::DNS_V6;
            } else if servers.is_empty() {
                notes.push(
                    "--redirect-dns: no nameserver in resolv.conf and no --capture-all-dns: DNS \
                     capture disabled (as istio-iptables does)"
                        .into(),
                );
            } else {
                cfg_flags |= PodFlags::DNS;
                for ip in servers {
                    let (kind, chain, len) = match ip {
                        IpAddr::V4(_) => (CidrKind::DnsServerV4, PodFlags::DNS_V4, 32),
                        IpAddr::V6(_) => (CidrKind::DnsServerV6, PodFlags::DNS_V6, 128),
                    };
                    cfg_flags |= chain;
                    cidrs.push((kind, Cidr::new(ip, len)));
                }
            }
        }

        let mut config = PodConfig::new(cfg_flags, outbound_port, inbound_port, tunnel_port)
            .with_owners(&uids, &gids);
        config.loopback_v4 = lo_ip.octets();
        config.loopback_v4_prefix = lo_cidr.prefix;
        config.tproxy_mark = tproxy_mark;
        config.tproxy_table = tproxy_table;
        members.sort();
        members.dedup();
        let mut spec = PodSpec::new(config, members, cidrs, Vec::new());
        // Only the exact string TPROXY changes the mode (anything else means REDIRECT).
        if self.interception_mode == "TPROXY" {
            // Mark 0 is every unmarked packet's, and table 0 is no table: neither can steer.
            if tproxy_mark == 0 {
                return Err(err(
                    "-t",
                    "0 cannot be the TPROXY mark (every unmarked packet carries 0): use a \
                     non-zero mark, such as istio's default 1337",
                ));
            }
            if tproxy_table == 0 {
                return Err(err(
                    "-r",
                    "0 is not a routing table: use a table id from 1, such as istio's default \
                     133",
                ));
            }
            spec.config.flags |= PodFlags::TPROXY;
        }
        if !exclude_ifaces.is_empty() {
            spec.config.flags |= PodFlags::EXCLUDE_IFACES;
        }
        if !kube_virt_ifaces.is_empty() {
            spec.config.flags |= PodFlags::KUBE_VIRT;
        }
        spec.exclude_ifaces = exclude_ifaces;
        spec.kube_virt_ifaces = kube_virt_ifaces;
        let action = InitAction {
            dry_run: self.dry_run,
            cleanup_only: self.cleanup_only,
            skip_apply: self.skip_rule_apply,
            validation: self.run_validation.then_some((probe_port, probe_timeout)),
            agent_socket: self.agent_socket.clone(),
            notes,
        };
        Ok((spec, action))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;

    struct MapEnv(HashMap<&'static str, &'static str>);

    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|s| s.to_string())
        }
    }

    fn v4_pod() -> Vec<IfAddr> {
        vec![
            IfAddr {
                ip: "127.0.0.1".parse().unwrap(),
            },
            IfAddr {
                ip: "192.0.2.10".parse().unwrap(),
            },
            IfAddr {
                ip: "2001:db8::10".parse().unwrap(),
            },
        ]
    }

    pub(crate) fn spec(
        args: &[&str],
        env: &[(&'static str, &'static str)],
    ) -> Result<PodSpec, String> {
        let mut argv = vec!["istio-iptables"];
        argv.extend_from_slice(args);
        let a = IstioArgs::parse_argv(argv).map_err(|e| e.to_string())?;
        a.to_spec(&MapEnv(env.iter().copied().collect()), &v4_pod())
            .map(|(s, _)| s)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn default_sidecar_argv() {
        let s = spec(
            &[
                "-p",
                "15001",
                "-z",
                "15006",
                "-u",
                "1337",
                "-m",
                "REDIRECT",
                "-i",
                "*",
                "-x",
                "",
                "-b",
                "*",
                "-d",
                "15090,15021,15020",
                "--log_output_level=default:info",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(s.config.outbound_port, 15001);
        assert_eq!(s.config.inbound_port, 15006);
        assert_eq!(s.config.tunnel_port, 15008);
        assert_eq!(&s.config.uids[..1], &[1337]);
        assert_eq!(&s.config.gids[..1], &[1337]);
        assert!(s.config.has(PodFlags::OUTBOUND_ALL));
        assert!(s.config.has(PodFlags::INBOUND_ALL));
        assert!(!s.config.has(PodFlags::IPV6));
        assert_eq!(s.config.loopback_v4, [127, 0, 0, 1]);
        assert_eq!(s.config.loopback_v4_prefix, 32);
    }

    #[test]
    fn gid_defaults_to_uid_list() {
        let s = spec(&["-u", "3,4"], &[]).unwrap();
        assert_eq!(s.config.n_uids, 2);
        assert_eq!(s.config.n_gids, 2);
        assert_eq!(&s.config.gids[..2], &[3, 4]);
    }

    #[test]
    fn bad_values_name_their_flag() {
        for (args, flag) in [
            (vec!["-q", "80,http"], "-q:"),
            (vec!["-o", "70000"], "-o:"),
            (vec!["-i", "10.0.0.0"], "-i:"),
            (vec!["-x", "10.0.0.0/33"], "-x:"),
            (vec!["-x", "*"], "-x:"),
            (vec!["-u", "no-such-user-here"], "-u:"),
            (vec!["-p", ""], "-p:"),
            (vec!["--bogus"], "--bogus:"),
            (vec!["-m", "TPROXY", "-t", "x"], "-t:"),
            // Found by fuzzing (istio_flags): the agent refused these after init accepted them.
            (vec!["-m", "TPROXY", "-t", "00"], "-t:"),
            (vec!["-m", "TPROXY", "-r", "0"], "-r:"),
            (vec!["--capture-all-dns=maybe"], "--capture-all-dns"),
            (vec!["--dry-run=maybe"], "--dry-run"),
        ] {
            let e = spec(&args, &[]).unwrap_err();
            assert!(e.starts_with(flag), "{args:?}: {e}");
            assert!(!e.contains('\n'), "{args:?}: multi-line error {e:?}");
        }
    }

    #[test]
    fn loopback_cidr_is_validated() {
        let s = spec(&[], &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")]).unwrap();
        assert_eq!(s.config.loopback_v4_prefix, 8);
        for bad in ["10.0.0.1/32", "127.0.0.1/4", "::1/128", "127.0.0.1"] {
            let mut env = HashMap::new();
            env.insert("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", bad);
            let a = IstioArgs::parse_argv(["x"]).unwrap();
            let e = a.to_spec(&MapEnv(env), &v4_pod()).unwrap_err();
            assert_eq!(e.flag, "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "{bad}");
        }
    }

    #[test]
    fn owner_groups() {
        let s = spec(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "202,303")]).unwrap();
        assert!(s.config.has(PodFlags::OWNER_GROUPS_INCLUDE));
        assert!(s.members.contains(&(MemberKind::OwnerGroupInclude, 202)));
        let s = spec(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888")]).unwrap();
        assert!(s.config.has(PodFlags::OWNER_GROUPS_EXCLUDE));
        // Exclude is ignored when include is a list.
        let s = spec(
            &[],
            &[
                ("ISTIO_OUTBOUND_OWNER_GROUPS", "202"),
                ("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888"),
            ],
        )
        .unwrap();
        assert!(!s.config.has(PodFlags::OWNER_GROUPS_EXCLUDE));
    }

    #[test]
    fn dns_capture_from_proxy_metadata() {
        let s = spec(
            &["--capture-all-dns"],
            &[("ISTIO_META_DNS_CAPTURE", "true")],
        )
        .unwrap();
        assert!(s.config.has(PodFlags::DNS) && s.config.has(PodFlags::DNS_ALL));
        // A flag beats the variable.
        let s = spec(
            &["--redirect-dns=false", "--capture-all-dns"],
            &[("ISTIO_META_DNS_CAPTURE", "true")],
        )
        .unwrap();
        assert!(!s.config.has(PodFlags::DNS));
        assert_eq!(
            resolv_conf_servers("search x\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n"),
            vec![
                "192.0.2.53".parse::<IpAddr>().unwrap(),
                "fe80::1".parse().unwrap()
            ]
        );
    }

    #[test]
    fn loopback_include_drops_lo_return() {
        let s = spec(&["-i", "127.1.2.3/32"], &[]).unwrap();
        assert!(s.config.has(PodFlags::NO_LO_RETURN));
        let s = spec(&["-i", "10.0.0.0/8"], &[]).unwrap();
        assert!(!s.config.has(PodFlags::NO_LO_RETURN));
    }

    #[test]
    fn ipv6_detection() {
        let v6_first = vec![
            IfAddr {
                ip: "::1".parse().unwrap(),
            },
            IfAddr {
                ip: "fe80::1".parse().unwrap(),
            },
            IfAddr {
                ip: "2001:db8::10".parse().unwrap(),
            },
        ];
        assert!(detect_ipv6(&v6_first, false).unwrap());
        assert!(!detect_ipv6(&v4_pod(), false).unwrap());
        assert!(detect_ipv6(&v4_pod(), true).unwrap());
        let only_lo = vec![IfAddr {
            ip: "127.0.0.1".parse().unwrap(),
        }];
        assert!(detect_ipv6(&only_lo, false).is_err());
    }
}

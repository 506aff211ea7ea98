//! `sockmesh init linkerd`: linkerd2-proxy-init's command line turned into a [`PodSpec`], with
//! proxy-init's flags, defaults and rules (docs/design.md, "linkerd").

use std::path::PathBuf;

use clap::{ArgAction, Parser};
use sockmesh_common::{CidrKind, PodConfig, PodFlags};

use super::{
    action::InitAction,
    flags::{err, go_bool, parse_cidr, parse_port, CommandLine, FlagError},
};
use crate::core::spec::PodSpec;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "proxy-init",
    about = "Capture a pod's traffic with sockmesh, taking linkerd2-proxy-init's flags",
    disable_version_flag = true,
    args_override_self = true
)]
pub struct LinkerdArgs {
    /// Path of the sockmesh agent's registration socket.
    #[arg(
        long,
        env = "SOCKMESH_AGENT_SOCKET",
        default_value = "/run/sockmesh/agent.sock"
    )]
    pub agent_socket: PathBuf,
    /// Remove this pod's capture (sockmesh's addition; proxy-init has no cleanup).
    #[arg(long)]
    pub cleanup_only: bool,

    /// Port of the proxy's inbound listener (required).
    #[arg(short = 'p', long = "incoming-proxy-port")]
    pub incoming_proxy_port: Option<String>,
    /// Port of the proxy's outbound listener (required).
    #[arg(short = 'o', long = "outgoing-proxy-port")]
    pub outgoing_proxy_port: Option<String>,
    /// The proxy's uid, whose traffic is never captured (-1: none).
    #[arg(
        short = 'u',
        long = "proxy-uid",
        default_value = "-1",
        allow_hyphen_values = true
    )]
    pub proxy_uid: String,
    /// The proxy's gid, whose traffic is never captured (-1: none).
    #[arg(
        short = 'g',
        long = "proxy-gid",
        default_value = "-1",
        allow_hyphen_values = true
    )]
    pub proxy_gid: String,
    /// Inbound ports to redirect (default: all).
    #[arg(short = 'r', long = "ports-to-redirect", value_delimiter = ',', action = ArgAction::Append)]
    pub ports_to_redirect: Vec<String>,
    /// Inbound ports and ranges (a-b) not to redirect.
    #[arg(long = "inbound-ports-to-ignore", value_delimiter = ',', action = ArgAction::Append)]
    pub inbound_ports_to_ignore: Vec<String>,
    /// Outbound ports and ranges (a-b) not to redirect.
    #[arg(long = "outbound-ports-to-ignore", value_delimiter = ',', action = ArgAction::Append)]
    pub outbound_ports_to_ignore: Vec<String>,
    /// Source subnets whose inbound connections are not redirected.
    #[arg(long = "subnets-to-ignore", value_delimiter = ',', action = ArgAction::Append)]
    pub subnets_to_ignore: Vec<String>,
    /// Print the decision table; register nothing.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = go_bool, action = ArgAction::Set)]
    pub simulate: bool,
    /// Network namespace to capture instead of the caller's own.
    #[arg(long, default_value = "")]
    pub netns: String,
    /// Pass -w to iptables (no effect: sockmesh runs no iptables).
    #[arg(short = 'w', long = "use-wait-flag", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = go_bool, action = ArgAction::Set)]
    pub use_wait_flag: bool,
    /// conntrack CLOSE_WAIT timeout (no effect: sockmesh does no NAT, so no conntrack entry).
    #[arg(long = "timeout-close-wait-secs", default_value = "0")]
    pub timeout_close_wait_secs: String,
    /// legacy, nft or plain (no effect: sockmesh runs no iptables).
    #[arg(long = "iptables-mode", default_value = "")]
    pub iptables_mode: String,
    /// Capture IPv6 too.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "true", value_parser = go_bool, action = ArgAction::Set)]
    pub ipv6: bool,
    /// iptables binary (no effect).
    #[arg(long = "firewall-bin-path", default_value = "")]
    pub firewall_bin_path: String,
    /// iptables-save binary (no effect).
    #[arg(long = "firewall-save-bin-path", default_value = "")]
    pub firewall_save_bin_path: String,
    #[arg(long = "log-format", default_value = "plain")]
    pub log_format: String,
    #[arg(long = "log-level", default_value = "info")]
    pub log_level: String,
}

/// A port or a range `a-b` / `a:b`.
fn parse_range(flag: &str, s: &str) -> Result<(u16, u16), FlagError> {
    let Some((a, b)) = s.split_once(['-', ':']) else {
        let p = parse_port(flag, s)?;
        return Ok((p, p));
    };
    let (a, b) = (parse_port(flag, a)?, parse_port(flag, b)?);
    if a > b {
        return Err(err(flag, format!("range '{s}' runs backwards")));
    }
    Ok((a, b))
}

fn parse_id(flag: &str, s: &str) -> Result<Option<u32>, FlagError> {
    match s.parse::<i64>() {
        Ok(-1) => Ok(None),
        Ok(n) if (0..=u32::MAX as i64).contains(&n) => Ok(Some(n as u32)),
        _ => Err(err(
            flag,
            format!("'{s}' is not an id (a number, or -1 for none)"),
        )),
    }
}

impl CommandLine for LinkerdArgs {
    const TAKES: &'static str = "sockmesh init linkerd takes proxy-init's flags";
}

impl LinkerdArgs {
    pub fn to_spec(&self) -> Result<(PodSpec, InitAction), FlagError> {
        let mut notes = Vec::new();
        let inbound_port = parse_port(
            "--incoming-proxy-port",
            self.incoming_proxy_port
                .as_deref()
                .ok_or_else(|| err("--incoming-proxy-port", "is required (linkerd: 4143)"))?,
        )?;
        let outbound_port = parse_port(
            "--outgoing-proxy-port",
            self.outgoing_proxy_port
                .as_deref()
                .ok_or_else(|| err("--outgoing-proxy-port", "is required (linkerd: 4140)"))?,
        )?;
        let uid = parse_id("--proxy-uid", &self.proxy_uid)?;
        let gid = parse_id("--proxy-gid", &self.proxy_gid)?;
        match self.iptables_mode.as_str() {
            "" | "legacy" | "nft" | "plain" => {}
            other => {
                return Err(err(
                    "--iptables-mode",
                    format!("'{other}' is not one of legacy, nft, plain"),
                ))
            }
        }
        self.timeout_close_wait_secs.parse::<u32>().map_err(|_| {
            err(
                "--timeout-close-wait-secs",
                format!(
                    "'{}' is not a number of seconds",
                    self.timeout_close_wait_secs
                ),
            )
        })?;
        if self.use_wait_flag
            || !self.iptables_mode.is_empty()
            || !self.firewall_bin_path.is_empty()
            || self.timeout_close_wait_secs != "0"
        {
            notes.push(
                "-w/--iptables-mode/--firewall-*/--timeout-close-wait-secs: no effect, sockmesh \
                 runs no iptables and creates no conntrack entries"
                    .into(),
            );
        }
        let mut ranges = Vec::new();
        let mut flags_ = PodFlags::LINKERD;
        for (flag, list, kind) in [
            (
                "--inbound-ports-to-ignore",
                &self.inbound_ports_to_ignore,
                CidrKind::InboundIgnorePorts,
            ),
            (
                "--outbound-ports-to-ignore",
                &self.outbound_ports_to_ignore,
                CidrKind::OutboundIgnorePorts,
            ),
        ] {
            for item in list.iter().filter(|s| !s.is_empty()) {
                let (lo, hi) = parse_range(flag, item)?;
                ranges.push((kind, lo, hi));
            }
        }
        for item in self.ports_to_redirect.iter().filter(|s| !s.is_empty()) {
            let p = parse_port("--ports-to-redirect", item)?;
            ranges.push((CidrKind::RedirectPorts, p, p));
            flags_ |= PodFlags::INBOUND_LIST;
        }
        let mut cidrs = Vec::new();
        for item in self.subnets_to_ignore.iter().filter(|s| !s.is_empty()) {
            let c = parse_cidr("--subnets-to-ignore", item)?;
            let kind = if c.is_v6() {
                CidrKind::IgnoreSubnetV6
            } else {
                CidrKind::IgnoreSubnetV4
            };
            cidrs.push((kind, c));
        }
        if self.ipv6 {
            flags_ |= PodFlags::IPV6;
        }
        let uids: Vec<u32> = uid.into_iter().collect();
        let gids: Vec<u32> = gid.into_iter().collect();
        let config =
            PodConfig::new(flags_, outbound_port, inbound_port, 0).with_owners(&uids, &gids);
        let spec = PodSpec::new(config, Vec::new(), cidrs, ranges);
        let action = InitAction {
            dry_run: self.simulate,
            cleanup_only: self.cleanup_only,
            skip_apply: false,
            validation: None,
            agent_socket: self.agent_socket.clone(),
            notes,
        };
        Ok((spec, action))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(args: &[&str]) -> Result<PodSpec, String> {
        let mut argv = vec!["proxy-init"];
        argv.extend_from_slice(args);
        LinkerdArgs::parse_argv(argv)
            .map_err(|e| e.to_string())?
            .to_spec()
            .map(|(s, _)| s)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn injector_default_argv() {
        let s = spec(&[
            "--incoming-proxy-port",
            "4143",
            "--outgoing-proxy-port",
            "4140",
            "--proxy-uid",
            "2102",
            "--inbound-ports-to-ignore",
            "4190,4191,4567,4568",
            "--outbound-ports-to-ignore",
            "4567,4568",
        ])
        .unwrap();
        assert!(s.config.has(PodFlags::LINKERD) && s.config.has(PodFlags::IPV6));
        assert_eq!(
            (s.config.inbound_port, s.config.outbound_port),
            (4143, 4140)
        );
        assert_eq!(
            (s.config.n_uids, s.config.uids[0], s.config.n_gids),
            (1, 2102, 0)
        );
        assert!(s
            .ranges
            .contains(&(CidrKind::InboundIgnorePorts, 4190, 4190)));
        assert!(s
            .ranges
            .contains(&(CidrKind::OutboundIgnorePorts, 4568, 4568)));
    }

    #[test]
    fn ranges_subnets_and_errors() {
        let s = spec(&[
            "-p",
            "4143",
            "-o",
            "4140",
            "--outbound-ports-to-ignore",
            "1000-2000",
            "--subnets-to-ignore",
            "192.0.2.0/28",
            "-r",
            "8080",
            "--ipv6=false",
        ])
        .unwrap();
        assert!(s
            .ranges
            .contains(&(CidrKind::OutboundIgnorePorts, 1000, 2000)));
        assert!(s.config.has(PodFlags::INBOUND_LIST) && !s.config.has(PodFlags::IPV6));
        assert_eq!(s.cidrs.len(), 1);
        for (args, flag) in [
            (vec!["-o", "4140"], "--incoming-proxy-port:"),
            (
                vec![
                    "-p",
                    "4143",
                    "-o",
                    "4140",
                    "--outbound-ports-to-ignore",
                    "9-1",
                ],
                "--outbound-ports-to-ignore:",
            ),
            (vec!["-p", "4143", "-o", "4140", "-u", "x"], "--proxy-uid:"),
            (
                vec![
                    "-p",
                    "4143",
                    "-o",
                    "4140",
                    "--subnets-to-ignore",
                    "10.0.0.1",
                ],
                "--subnets-to-ignore:",
            ),
            (vec!["-p", "4143", "-o", "4140", "--bogus"], "--bogus:"),
        ] {
            let e = spec(&args).unwrap_err();
            assert!(e.starts_with(flag), "{args:?}: {e}");
        }
    }
}

//! What both command lines (istio-iptables', linkerd proxy-init's) parse the same way: Go's
//! booleans and durations, ports, CIDRs, ids, environment variables, and one-line errors that
//! name the flag.

use std::{ffi::OsString, net::IpAddr, time::Duration};

use clap::Parser;

use crate::core::{net::Cidr, sys};

/// Why a command line was not taken: `--help` (its text, printed as success) or an error on
/// one line naming the flag.
#[derive(Debug, thiserror::Error)]
pub enum ArgvError {
    #[error("{0}")]
    Help(String),
    #[error("{0}")]
    Invalid(String),
}

/// An init container's command line.
pub trait CommandLine: Parser {
    /// What the command takes, for an unknown flag's error.
    const TAKES: &'static str;

    /// Parse an argv (argv[0] first), with a one-line error for anything clap rejects.
    fn parse_argv<I, T>(argv: I) -> Result<Self, ArgvError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        Self::try_parse_from(argv).map_err(|e| one_line_clap_error(e, Self::TAKES))
    }
}

/// A value that is not of Go's spelling for its type.
#[derive(Debug, thiserror::Error)]
pub enum GoValueError {
    #[error("'{0}' is not a boolean (use true or false)")]
    Bool(String),
    #[error("'{0}' is not a duration (e.g. 5s, 500ms, 1m)")]
    Duration(String),
}

/// Parse Go's strconv.ParseBool spellings, as pflag does.
pub fn go_bool(s: &str) -> Result<bool, GoValueError> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(GoValueError::Bool(s.to_string())),
    }
}

/// A configuration error: the flag (or variable) and what is wrong with its value, on one line.
#[derive(Debug, thiserror::Error)]
#[error("{flag}: {message}")]
pub struct FlagError {
    pub flag: String,
    pub message: String,
}

pub fn err(flag: &str, message: impl Into<String>) -> FlagError {
    FlagError {
        flag: flag.to_string(),
        message: message.into(),
    }
}

/// Split istio-style: on commas, empty items dropped, no trimming.
pub fn split(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').filter(|p| !p.is_empty())
}

pub fn parse_port(flag: &str, s: &str) -> Result<u16, FlagError> {
    match s.parse::<u16>() {
        Ok(0) => Err(err(flag, "port 0 is not a valid port (1-65535)")),
        Ok(p) => Ok(p),
        Err(_) => Err(err(flag, format!("'{s}' is not a port number (1-65535)"))),
    }
}

pub fn parse_ports(flag: &str, s: &str) -> Result<Vec<u16>, FlagError> {
    split(s).map(|p| parse_port(flag, p)).collect()
}

pub fn parse_cidr(flag: &str, s: &str) -> Result<Cidr, FlagError> {
    let (ip, len) = s.split_once('/').ok_or_else(|| {
        err(
            flag,
            format!("'{s}' is not a CIDR (address/prefix-length, e.g. 10.0.0.0/8)"),
        )
    })?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| err(flag, format!("'{s}': '{ip}' is not an IP address")))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| *l <= max)
        .ok_or_else(|| err(flag, format!("'{s}': prefix length must be 0-{max}")))?;
    Ok(Cidr::new(ip, len))
}

/// What a uid or gid list item names: a number, or a user/group name of this pod.
pub fn resolve_id(flag: &str, s: &str, group: bool) -> Result<u32, FlagError> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    let lookup = if group {
        sys::gid_by_name(s)
    } else {
        sys::uid_by_name(s)
    };
    lookup.ok_or_else(|| {
        let what = if group { "group" } else { "user" };
        err(
            flag,
            format!("'{s}' is neither a number nor a {what} known in this pod"),
        )
    })
}

/// Environment lookups, injectable for tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// The first of several variables that is set.
fn env_any(env: &dyn Env, names: &[&str]) -> Option<(String, String)> {
    names
        .iter()
        .find_map(|n| env.var(n).map(|v| (n.to_string(), v)))
}

pub fn env_bool(env: &dyn Env, names: &[&str]) -> Result<bool, FlagError> {
    match env_any(env, names) {
        None => Ok(false),
        Some((_, v)) if v.is_empty() => Ok(false),
        Some((name, v)) => go_bool(&v).map_err(|m| err(&name, m.to_string())),
    }
}

/// A clap error as one line naming the flag (`--help` text is passed through whole).
fn one_line_clap_error(e: clap::Error, takes: &str) -> ArgvError {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.split_whitespace().next().unwrap_or(s).to_string(),
        _ => String::from("argument"),
    };
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ArgvError::Help(e.to_string()),
        ErrorKind::UnknownArgument => {
            ArgvError::Invalid(format!("{arg}: unknown flag: {takes} (see --help)"))
        }
        _ => {
            let text = e.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("")
                .trim_start_matches("error: ");
            ArgvError::Invalid(format!("{arg}: {first}"))
        }
    }
}

/// Go's time.ParseDuration, for the units istio's flags use.
pub fn parse_go_duration(s: &str) -> Result<Duration, GoValueError> {
    let bad = || GoValueError::Duration(s.to_string());
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let n: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let mult = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += n * mult;
        rest = &rest[unit_end..];
    }
    Ok(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_go_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert!(parse_go_duration("5").is_err());
    }
}

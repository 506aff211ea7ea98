//! `sockmesh init istio|linkerd` (and `istio-iptables`): take the init container's command
//! line ([`istio`], [`linkerd`], with what both parse alike in [`flags`]), and register the
//! pod's network namespace with the agent ([`register`]), print what would be done
//! ([`dry_run`]), or probe that capture is in force ([`validation`]).

pub mod action;
pub mod dry_run;
pub mod flags;
pub mod istio;
pub mod linkerd;
pub mod register;
pub mod validation;

use std::{
    ffi::OsString,
    io::Write,
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use action::{acceleration_flags, BadAcceleration, ACCELERATION_ENV};
use flags::{ArgvError, CommandLine, FlagError};
use istio::{IfAddr, IstioArgs};
use linkerd::LinkerdArgs;

use crate::core::sys::{self, SyscallError};

/// istio-iptables' exit code for a failed validation (constants.ValidationErrorCode).
const VALIDATION_ERROR_CODE: i32 = 126;

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

/// Why `init` did not put the pod's capture in force.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Argv(#[from] ArgvError),
    #[error(transparent)]
    Flag(#[from] FlagError),
    #[error(transparent)]
    Acceleration(#[from] BadAcceleration),
    #[error("{flag} {}: {source}", .path.display())]
    Netns {
        flag: &'static str,
        path: PathBuf,
        #[source]
        source: SyscallError,
    },
    #[error("{flag} {}: not a network namespace", .path.display())]
    NotNetns { flag: &'static str, path: PathBuf },
    #[error(transparent)]
    Syscall(#[from] SyscallError),
    #[error(transparent)]
    Agent(#[from] register::AgentError),
    #[error("validation failed: {0}")]
    Validation(#[from] validation::ValidationError),
}

/// Run `init istio` or `init linkerd` with `argv` (argv[0] first). Returns the process exit
/// code; errors are printed as one line on stderr.
pub fn main(flavor: Flavor, argv: Vec<OsString>) -> i32 {
    match run(flavor, argv, &mut std::io::stdout()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sockmesh init {}: {e}", flavor.name());
            match e {
                InitError::Validation(_) => VALIDATION_ERROR_CODE,
                _ => 1,
            }
        }
    }
}

/// Run `init` for the CNI plugin, whose stdout belongs to the CNI result: progress goes to
/// stderr, and any failure (validation included) is an error.
pub fn run_for_cni(argv: Vec<OsString>) -> Result<(), InitError> {
    run(Flavor::Istio, argv, &mut std::io::stderr())
}

/// One of the two parsed command lines.
enum Parsed {
    Istio(Box<IstioArgs>),
    Linkerd(Box<LinkerdArgs>),
}

impl Parsed {
    fn parse(flavor: Flavor, argv: Vec<OsString>) -> Result<Self, ArgvError> {
        Ok(match flavor {
            Flavor::Istio => Parsed::Istio(Box::new(IstioArgs::parse_argv(argv)?)),
            Flavor::Linkerd => Parsed::Linkerd(Box::new(LinkerdArgs::parse_argv(argv)?)),
        })
    }

    /// The flag naming the netns to capture, and its value (empty: the caller's).
    fn netns(&self) -> (&'static str, &str) {
        match self {
            Parsed::Istio(a) => ("--network-namespace", &a.network_namespace),
            Parsed::Linkerd(a) => ("--netns", &a.netns),
        }
    }
}

fn run(flavor: Flavor, argv: Vec<OsString>, out: &mut dyn Write) -> Result<(), InitError> {
    // Parse first, so a bad flag fails before anything is opened.
    let parsed = match Parsed::parse(flavor, argv) {
        Ok(p) => p,
        Err(ArgvError::Help(text)) => {
            let _ = write!(out, "{text}");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let (flag, value) = parsed.netns();
    let path = if value.is_empty() {
        Path::new("/proc/self/ns/net").to_path_buf()
    } else {
        PathBuf::from(value)
    };
    let netns = sys::open_netns(&path).map_err(|source| InitError::Netns {
        flag,
        path: path.clone(),
        source,
    })?;
    if !sys::is_netns_fd(&netns) {
        return Err(InitError::NotNetns { flag, path });
    }
    let addrs = sys::in_netns(netns.as_fd(), sys::interface_addrs)??;
    let if_addrs: Vec<IfAddr> = addrs.iter().map(|a| IfAddr { ip: a.ip }).collect();
    let (mut spec, action) = match &parsed {
        Parsed::Istio(a) => a.to_spec(&flags::ProcessEnv, &if_addrs),
        Parsed::Linkerd(a) => a.to_spec(),
    }?;
    // sockmesh's own per-pod switch (the node's is the agent's --acceleration).
    spec.config.flags |= acceleration_flags(std::env::var(ACCELERATION_ENV).ok().as_deref())?;
    for note in &action.notes {
        eprintln!("sockmesh init {}: note: {note}", flavor.name());
    }
    if action.dry_run {
        let local: Vec<IpAddr> = addrs.iter().map(|a| a.ip).collect();
        let _ = write!(out, "{}", dry_run::decision_table(&spec, &local));
        return Ok(());
    }
    if !action.skip_apply {
        register::apply(&action, &spec, &netns, out)?;
    }
    if let Some((port, timeout)) = action.validation {
        let v6 = if_addrs
            .iter()
            .find(|a| !a.ip.is_loopback())
            .is_some_and(|a| a.ip.is_ipv6());
        let ports = [spec.config.outbound_port, spec.config.inbound_port];
        validation::run(ports, port, timeout, v6)?;
        let _ = writeln!(
            out,
            "sockmesh: validation passed: a connection to the probe port reached the inbound \
             capture port"
        );
    }
    Ok(())
}

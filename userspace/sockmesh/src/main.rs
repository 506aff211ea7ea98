//! The `sockmesh` binary: picks the role from its name and arguments (see the library's
//! documentation for the roles).

use sockmesh::{agent, cli, cni, init};

use std::{ffi::OsString, path::Path, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "sockmesh",
    version,
    about = "Transparent sidecar capture with eBPF at the socket layer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent: load and pin the programs, serve registrations.
    Agent(agent::AgentArgs),
    /// Register the calling pod, taking istio-iptables' (`init istio`) flags.
    Init {
        /// `istio` (then istio-iptables' flags follow).
        #[arg(value_name = "PROFILE")]
        profile: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        rest: Vec<OsString>,
    },
    /// Print the redirection maps, decoded.
    Dump(cli::dump::DumpArgs),
    /// What sockmesh does with a connection of a pod, and the rule that decides it.
    Explain(cli::explain::ExplainArgs),
    /// Chained CNI plugin: run by the container runtime (CNI_COMMAND and the network
    /// configuration on stdin); also what the binary does when run with no arguments and
    /// CNI_COMMAND set, as runtimes run plugins.
    Cni,
    /// Install the CNI plugin on the node: binary into the plugin folder, sockmesh chained into
    /// the active CNI configuration (run by the DaemonSet).
    InstallCni(cni::install::InstallArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SOCKMESH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn exit(code: i32) -> ExitCode {
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let invoked_as = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Istio's injection template runs `istio-iptables ...` (older images) or
    // `pilot-agent istio-iptables ...`: behave as `sockmesh init istio`.
    if invoked_as == "istio-iptables" {
        return exit(init::main(init::Flavor::Istio, argv));
    }
    if invoked_as == "pilot-agent" && argv.get(1).is_some_and(|a| a == "istio-iptables") {
        return exit(init::main(init::Flavor::Istio, argv[1..].to_vec()));
    }
    // A container runtime runs a CNI plugin with no arguments.
    let as_cni = argv.len() == 1 && std::env::var_os("CNI_COMMAND").is_some();
    if as_cni || argv.get(1).is_some_and(|a| a == "cni") {
        return exit(cni::plugin::main());
    }
    // `init istio` hands its arguments to the istio-iptables parser untouched.
    if argv.get(1).is_some_and(|a| a == "init") {
        match argv.get(2).and_then(|p| p.to_str()) {
            Some(name @ ("istio" | "linkerd")) => {
                let flavor = if name == "istio" {
                    init::Flavor::Istio
                } else {
                    init::Flavor::Linkerd
                };
                let mut rest = vec![OsString::from(format!("sockmesh init {name}"))];
                rest.extend(argv[3..].iter().cloned());
                return exit(init::main(flavor, rest));
            }
            Some(other) if !other.starts_with('-') => {
                eprintln!("sockmesh init: unknown profile '{other}': use `init istio`");
                return exit(2);
            }
            _ => {}
        }
    }
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Agent(a) => agent::run(a),
        Command::Dump(d) => cli::dump::run(d),
        Command::Explain(e) => cli::explain::run(e),
        Command::Cni => unreachable!("handled before parsing"),
        Command::InstallCni(a) => cni::install::run(a),
        Command::Init { profile, .. } => {
            eprintln!("sockmesh init: unknown profile '{profile}': use `init istio`");
            return exit(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sockmesh: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `sockmesh-testkit`: the test programs the suites run in lab namespaces (sockmesh_tests::kit
//! and ::accel, each subcommand a typed launcher there), the benchmark's hop programs (`hop`),
//! the benchmark suite behind `cargo xtask bench` (`bench`), and the demo behind
//! `cargo xtask lab` (`demo`).

mod bench;
mod demo;
mod hop;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    #[command(flatten)]
    Kit(sockmesh_tests::kit::Program),
    #[command(flatten)]
    Hop(hop::Program),
    /// The benchmark suite (run by `cargo xtask bench`): prints a Markdown report.
    Bench {
        /// Tiny sizes: checks that the suite runs, measures nothing worth quoting.
        #[arg(long)]
        smoke: bool,
        /// Write the report here as well.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// The demo lab: pods in netns, the agent, a listener on 15001, real connections, dump.
    Lab,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Kit(program) => program.run(),
        Cmd::Hop(program) => program.run(),
        Cmd::Bench { smoke, out } => {
            let report = bench::run(smoke)?;
            print!("{report}");
            if let Some(path) = out {
                std::fs::write(&path, &report)?;
            }
            Ok(())
        }
        Cmd::Lab => demo::run(),
    }
}

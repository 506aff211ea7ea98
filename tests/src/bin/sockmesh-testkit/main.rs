//! `sockmesh-testkit`: the test programs the suites run in lab namespaces (sockmesh_tests::kit
//! and ::accel, each subcommand a typed launcher there), the benchmark's hop programs (`hop`),
//! the benchmark suite behind `cargo xtask bench` (`bench`), and the demo behind
//! `cargo xtask lab` (`demo`), and the node suite's pause process (`pause`).

mod bench;
mod demo;
mod hop;
mod scale;
mod soak;

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
        /// Section 1 alone (capture at connect time), full sizes: for working on the
        /// programs. Its report has no targets table.
        #[arg(long)]
        capture_only: bool,
        /// Section 5 alone (the proxy against HAProxy), full sizes: for working on the proxy.
        /// Its report has no targets table.
        #[arg(long, conflicts_with = "capture_only")]
        proxies_only: bool,
    },
    /// Where the proxies' CPU goes (run by `cargo xtask profile`): sockmesh-proxy and HAProxy
    /// under callgrind in the benchmark's proxy section. Prints a Markdown report.
    Profile {
        /// Short rounds: checks that it runs.
        #[arg(long)]
        smoke: bool,
        /// Write the report here as well.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// Copy callgrind's counts files into this folder (for callgrind_annotate).
        #[arg(long)]
        keep: Option<std::path::PathBuf>,
        /// Also sample each proxy's stacks (user and kernel) with `perf record` in its native
        /// run per role, one file per proxy and role in this folder (for `perf report -i`).
        #[arg(long)]
        perf_record: Option<std::path::PathBuf>,
        /// Only where the capture programs' time goes (section timing), not the proxies: for
        /// working on the programs.
        #[arg(long, conflicts_with_all = ["keep", "perf_record"])]
        programs_only: bool,
    },
    /// The demo lab: pods in netns, the agent, a listener on 15001, real connections, dump.
    Lab,
    /// The soak (run by `cargo xtask soak`): a captured pod under churn for --secs; the maps
    /// and the agent must be back at their baseline after it. Prints a Markdown report.
    Soak {
        #[arg(long, default_value = "60")]
        secs: f64,
        /// Fail unless at least this many connections and queries were made.
        #[arg(long, default_value = "0")]
        min_connections: u64,
        /// Write the report here as well.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Scale (run by `cargo xtask scale`): --pods captured pods hold --per-pod connections
    /// each, all open at once; each must reach its pod's proxy with its own original
    /// destination. Prints a Markdown report.
    Scale {
        #[arg(long, default_value = "20")]
        pods: usize,
        #[arg(long, default_value = "5000")]
        per_pod: usize,
        /// Write the report here as well.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Remove what the labs of processes that no longer run left behind (a lab ended by
    /// SIGKILL, or a crash): processes, network namespaces, mounts, cgroups, folders.
    Clean,
    /// A pod's pause process (the node suite's sandbox image, and an idle app to exec in):
    /// waits for SIGTERM or SIGINT, its children reaped by the kernel.
    Pause,
}

fn main() -> anyhow::Result<()> {
    let cmd = Cli::parse().cmd;
    // The commands that make labs: a signal (Ctrl-C) removes them before the process ends.
    if matches!(
        cmd,
        Cmd::Bench { .. } | Cmd::Profile { .. } | Cmd::Lab | Cmd::Soak { .. } | Cmd::Scale { .. }
    ) {
        sockmesh_tests::leftovers::remove_on_signal();
    }
    let result = run(cmd);
    sockmesh_tests::leftovers::wait_if_removing();
    result
}

fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Kit(program) => program.run(),
        Cmd::Hop(program) => program.run(),
        Cmd::Bench {
            smoke,
            out,
            capture_only,
            proxies_only,
        } => {
            let report = if capture_only {
                bench::run_capture(smoke)?
            } else if proxies_only {
                bench::run_proxies(smoke)?
            } else {
                bench::run(smoke)?
            };
            print!("{report}");
            if let Some(path) = out {
                std::fs::write(&path, &report)?;
            }
            Ok(())
        }
        Cmd::Profile {
            smoke,
            out,
            keep,
            perf_record,
            programs_only,
        } => {
            let report = if programs_only {
                bench::programs::run(smoke)?
            } else {
                bench::profile::run(smoke, keep.as_deref(), perf_record.as_deref())?
            };
            print!("{report}");
            if let Some(path) = out {
                std::fs::write(&path, &report)?;
            }
            Ok(())
        }
        Cmd::Lab => demo::run(),
        Cmd::Soak {
            secs,
            min_connections,
            out,
        } => {
            let report = soak::run(secs, min_connections)?;
            print!("{report}");
            if let Some(path) = out {
                std::fs::write(&path, &report)?;
            }
            Ok(())
        }
        Cmd::Scale { pods, per_pod, out } => {
            let report = scale::run(pods, per_pod)?;
            print!("{report}");
            if let Some(path) = out {
                std::fs::write(&path, &report)?;
            }
            Ok(())
        }
        Cmd::Clean => {
            for line in sockmesh_tests::leftovers::remove(sockmesh_tests::leftovers::Owner::Gone) {
                println!("removed {line}");
            }
            Ok(())
        }
        Cmd::Pause => {
            pause();
            Ok(())
        }
    }
}

fn pause() {
    // SAFETY: signal dispositions and the mask are set before any thread starts; sigwait
    // takes a set we own.
    unsafe {
        libc::signal(libc::SIGCHLD, libc::SIG_IGN);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
}

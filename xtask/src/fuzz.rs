//! `cargo xtask fuzz`: every libFuzzer target of tests/fuzz, each for a time, from its committed
//! seeds; a table of executions per target, and the crash that stopped a target, if any.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{output, root, say, show};

/// The targets, in the order they run: one per parser of outside input.
pub const TARGETS: &[&str] = &[
    "istio_flags",
    "linkerd_flags",
    "cni_input",
    "agent_api",
    "proxy_config",
    "xds_resources",
    "first_bytes",
];

/// cargo-fuzz, installed by `cargo xtask setup`.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// One target's run.
struct Run {
    target: &'static str,
    seconds: f64,
    executions: u64,
    corpus: usize,
    crash: Option<PathBuf>,
}

fn fuzz_dir() -> PathBuf {
    root().join("tests/fuzz")
}

/// `cargo +nightly fuzz <args>` on tests/fuzz, the kernel object stubbed (no target parses it).
fn cargo_fuzz(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(root())
        .arg("+nightly")
        .arg("fuzz")
        .args(args)
        .arg("--fuzz-dir")
        .arg(fuzz_dir())
        .env("AYA_BUILD_SKIP", "1")
        .env("CARGO_TARGET_DIR", root().join("target/fuzz"));
    c
}

/// Build every target, then run each for `seconds` (or only `only`), `jobs` at a time; write
/// the report to `out`.
pub fn run(seconds: u64, jobs: usize, only: Option<&str>, out: &Path) -> Result<()> {
    let targets: Vec<&'static str> = match only {
        None => TARGETS.to_vec(),
        Some(name) => match TARGETS.iter().find(|t| **t == name) {
            Some(t) => vec![*t],
            None => bail!(
                "no fuzz target {name}: the targets are {}",
                TARGETS.join(", ")
            ),
        },
    };
    crate::status(&mut cargo_fuzz(&["build"]))?;
    let commit =
        output(
            Command::new("git")
                .current_dir(root())
                .args(["rev-parse", "--short", "HEAD"]),
        )
        .unwrap_or_default();
    // `jobs` targets at a time (each fuzzer uses one core).
    let mut runs = Vec::new();
    for batch in targets.chunks(jobs.max(1)) {
        let handles: Vec<_> = batch
            .iter()
            .map(|&t| std::thread::spawn(move || run_one(t, seconds)))
            .collect();
        for h in handles {
            let r = h.join().expect("fuzz thread")?;
            say(format!(
                "{}: {} executions in {:.0} s, corpus {}{}",
                r.target,
                r.executions,
                r.seconds,
                r.corpus,
                r.crash
                    .as_ref()
                    .map(|p| format!(", CRASH {}", p.display()))
                    .unwrap_or_default()
            ));
            runs.push(r);
        }
    }
    let report = report(&runs, seconds, commit.trim());
    std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    eprint!("{report}");
    say(format!("report written to {}", out.display()));
    let crashed: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            r.crash
                .as_ref()
                .map(|p| format!("{}: {}", r.target, p.display()))
        })
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzzing found crashes (reproduce with `cargo +nightly fuzz run --fuzz-dir tests/fuzz \
             <target> <file>`): {}",
            crashed.join("; ")
        );
    }
    Ok(())
}

fn run_one(target: &'static str, seconds: u64) -> Result<Run> {
    let seeds = fuzz_dir().join("seeds").join(target);
    if !seeds.is_dir() {
        bail!("{target}: no seed corpus at {}", seeds.display());
    }
    // New inputs go to a working corpus under target/; the seeds are only read.
    let corpus = root().join("target/fuzz/corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    let artifacts = root().join("target/fuzz/artifacts").join(target);
    std::fs::create_dir_all(&artifacts)?;
    let mut cmd = cargo_fuzz(&["run", target]);
    cmd.arg(&corpus).arg(&seeds).arg("--").args([
        format!("-max_total_time={seconds}"),
        "-print_final_stats=1".to_string(),
        "-timeout=10".to_string(),
        "-rss_limit_mb=4096".to_string(),
        format!("-artifact_prefix={}/", artifacts.display()),
    ]);
    say(format!("running {}", show(&cmd)));
    let started = Instant::now();
    let out = cmd
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("starting {}", show(&cmd)))?;
    let seconds = started.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&out.stderr);
    let executions = stat(&log, "stat::number_of_executed_units");
    let crash = log
        .lines()
        .find_map(|l| l.split("Test unit written to ").nth(1))
        .map(|p| PathBuf::from(p.trim()));
    if !out.status.success() && crash.is_none() {
        eprint!("{log}");
        bail!(
            "{target}: the fuzzer failed ({}) without writing a crash",
            out.status
        );
    }
    if out.status.success() && executions.is_none() {
        eprint!("{log}");
        bail!("{target}: libFuzzer printed no final stats");
    }
    if crash.is_some() {
        // The crash's stack is the part worth reading.
        eprint!("{log}");
    }
    Ok(Run {
        target,
        seconds,
        executions: executions.unwrap_or(0),
        corpus: std::fs::read_dir(&corpus)?.count(),
        crash,
    })
}

/// The value of libFuzzer's final `name: value` line.
fn stat(log: &str, name: &str) -> Option<u64> {
    log.lines().find_map(|l| {
        l.strip_prefix(name)?
            .trim_start_matches(':')
            .trim()
            .parse()
            .ok()
    })
}

fn report(runs: &[Run], seconds: u64, commit: &str) -> String {
    let mut s = format!(
        "`cargo xtask fuzz --seconds {seconds}` at commit {commit}: each target from its seeds \
         (tests/fuzz/seeds) and the working corpus in target/fuzz/corpus.\n\n"
    );
    s.push_str("| target | seconds | executions | executions/s | corpus | crashes |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|\n");
    for r in runs {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {} | {:.0} | {} | {} |",
            r.target,
            r.seconds,
            r.executions,
            r.executions as f64 / r.seconds.max(1e-9),
            r.corpus,
            u8::from(r.crash.is_some())
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_stats_are_read() {
        let log =
            "INFO: x\nstat::number_of_executed_units: 123456\nstat::average_exec_per_sec: 9\n";
        assert_eq!(stat(log, "stat::number_of_executed_units"), Some(123456));
        assert_eq!(stat(log, "stat::peak_rss_mb"), None);
    }

    #[test]
    fn every_target_has_a_binary_and_seeds() {
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "{t} not in Cargo.toml"
            );
            let seeds = fuzz_dir().join("seeds").join(t);
            assert!(
                std::fs::read_dir(&seeds).is_ok_and(|d| d.count() > 0),
                "{t} has no seeds in {}",
                seeds.display()
            );
        }
    }
}

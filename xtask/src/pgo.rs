//! sockmesh-proxy as release builds ship it: optimised by a profile of its own hot paths
//! (LLVM's profile-guided optimisation). An instrumented build serves the benchmark's proxy
//! roles in a lab (`sockmesh-testkit bench --proxies-only --smoke`: HTTP/1.1 with keep-alive
//! and with new connections, h2c, a TCP relay, each through capture to two upstreams); the
//! counts it leaves steer a second build, which becomes target/release/sockmesh-proxy. The
//! compiler then lays out and inlines by what a request runs, not by guesses: fewer
//! instructions and fewer cache lines touched per request (`cargo xtask profile`,
//! docs/benchmarks.md).
//!
//! Each build has a target folder of its own under target/pgo, so neither invalidates the
//! other nor the plain release build. The training runs again only when the instrumented
//! build changed; the profile's file name carries a digest of its contents, so a new profile
//! rebuilds the optimised proxy and everything it inlines.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{cargo, image, output, root, say, status};

/// The instrumented build's flags, after `-Cprofile-generate`. Its processes are stopped with
/// SIGKILL when a lab ends, so they never write a profile at exit: continuous mode keeps the
/// counters in the profile file itself as they run (it needs runtime counter relocation, and
/// does without value profiling).
const GENERATE_FLAGS: [&str; 2] = [
    "-Cllvm-args=-runtime-counter-relocation",
    NO_VALUE_PROFILING,
];

/// Value profiling off: continuous mode cannot keep its counts, and the optimised build must not
/// look for them.
const NO_VALUE_PROFILING: &str = "-Cllvm-args=-disable-vp=true";

/// Build the instrumented proxy, train it, build the optimised one and put it in
/// target/release. The plain release build (with the testkit that trains) must be done.
pub fn build_proxy() -> Result<()> {
    let host = host_triple()?;
    let profdata_tool = llvm_profdata(&host)?;
    let dir = root().join("target/pgo");
    let raw = dir.join("raw");
    let generate = cargo_build(
        &dir.join("generate"),
        &host,
        &[
            &format!("-Cprofile-generate={}", raw.display()),
            GENERATE_FLAGS[0],
            GENERATE_FLAGS[1],
        ],
    )?;
    let merged = dir.join("sockmesh-proxy.profdata");
    if is_newer(&merged, &generate)? {
        say("sockmesh-proxy's profile is newer than its instrumented build: not trained again");
    } else {
        train(&generate, &raw)?;
        merge(&profdata_tool, &raw, &merged)?;
    }
    let profile = by_digest(&dir, &merged)?;
    let optimised = cargo_build(
        &dir.join("use"),
        &host,
        // Value profiling was off in the instrumented build: off here too, so LLVM does not
        // look for its counts.
        &[
            &format!("-Cprofile-use={}", profile.display()),
            NO_VALUE_PROFILING,
        ],
    )?;
    let installed = root().join("target/release/sockmesh-proxy");
    // Not through the hard link cargo made to its own copy in target/release/deps.
    match fs::remove_file(&installed) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", installed.display())),
    }
    fs::copy(&optimised, &installed)
        .with_context(|| format!("copying {} to {}", optimised.display(), installed.display()))?;
    say(format!(
        "{} is the profile-guided build ({})",
        installed.display(),
        profile.display()
    ));
    Ok(())
}

/// The triple rustc builds for by default (the instrumented and optimised builds name it, so
/// that RUSTFLAGS reach the proxy's crates and not the build scripts and macros).
fn host_triple() -> Result<String> {
    let vv = output(Command::new("rustc").arg("-vV"))?;
    vv.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_string)
        .context("rustc -vV printed no host triple")
}

/// The llvm-profdata of rustc's own LLVM (rustup's llvm-tools component): a profile's format
/// follows the LLVM version that wrote it.
fn llvm_profdata(host: &str) -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let tool = Path::new(sysroot.trim()).join(format!("lib/rustlib/{host}/bin/llvm-profdata"));
    if !tool.is_file() {
        bail!(
            "{} is missing: the profile-guided build of sockmesh-proxy merges its profile with \
             rustc's own llvm-profdata (run `cargo xtask setup`, or `rustup component add \
             llvm-tools`)",
            tool.display()
        );
    }
    Ok(tool)
}

/// A release build of sockmesh-proxy for `host` in `target_dir` with `rustflags` (passed one
/// by one, so a path with a space stays whole; they replace any RUSTFLAGS); the binary.
fn cargo_build(target_dir: &Path, host: &str, rustflags: &[&str]) -> Result<PathBuf> {
    status(
        cargo()
            .args([
                "build",
                "--release",
                "-p",
                "sockmesh-proxy",
                "--bin",
                "sockmesh-proxy",
                "--target",
                host,
                "--target-dir",
            ])
            .arg(target_dir)
            .env("CARGO_ENCODED_RUSTFLAGS", rustflags.join("\x1f")),
    )?;
    Ok(target_dir.join(host).join("release/sockmesh-proxy"))
}

/// Whether `a` exists and was written after `b`.
fn is_newer(a: &Path, b: &Path) -> Result<bool> {
    let Ok(a) = fs::metadata(a) else {
        return Ok(false);
    };
    let b = fs::metadata(b).with_context(|| format!("reading {}", b.display()))?;
    Ok(a.modified()? > b.modified()?)
}

/// Run the benchmark's proxy roles with the instrumented proxy, its profiles going to `raw`.
fn train(generate: &Path, raw: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(raw);
    fs::create_dir_all(raw).with_context(|| format!("creating {}", raw.display()))?;
    // The proxy runs as uid 1337: its files go in a folder anyone may write to (sticky).
    fs::set_permissions(raw, fs::Permissions::from_mode(0o1777))?;
    say("training sockmesh-proxy's profile: the benchmark's proxy roles (smoke sizes)");
    let report = root().join("target/pgo/training.md");
    status(
        Command::new(root().join("target/release/sockmesh-testkit"))
            .args(["bench", "--proxies-only", "--smoke", "--out"])
            .arg(&report)
            .env("SOCKMESH_PROXY_BIN", generate)
            // %p: one file per process; %c: continuous mode (see GENERATE_FLAGS).
            .env("LLVM_PROFILE_FILE", raw.join("proxy-%p%c.profraw"))
            .stdout(std::process::Stdio::null()),
    )
}

/// Merge the training's raw profiles into `merged`; fail if there were none, or they counted
/// nothing.
fn merge(tool: &Path, raw: &Path, merged: &Path) -> Result<()> {
    let files: Vec<PathBuf> = fs::read_dir(raw)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "profraw"))
        .collect();
    if files.is_empty() {
        bail!(
            "the training run left no profile in {}: did the instrumented sockmesh-proxy start?",
            raw.display()
        );
    }
    status(
        Command::new(tool)
            .args(["merge", "-o"])
            .arg(merged)
            .args(&files),
    )?;
    let shown = output(Command::new(tool).arg("show").arg(merged))?;
    let total: u64 = shown
        .lines()
        .find_map(|l| l.strip_prefix("Total count: "))
        .and_then(|n| n.trim().parse().ok())
        .context("llvm-profdata show printed no total count")?;
    if total == 0 {
        bail!(
            "sockmesh-proxy's profile from {} files counts nothing: the training served no \
             requests",
            files.len()
        );
    }
    say(format!(
        "sockmesh-proxy's profile: {} processes, {total} counts",
        files.len()
    ));
    Ok(())
}

/// A copy of `merged` named by a digest of its contents (the one the optimised build reads;
/// other such copies are removed).
fn by_digest(dir: &Path, merged: &Path) -> Result<PathBuf> {
    let bytes = fs::read(merged).with_context(|| format!("reading {}", merged.display()))?;
    // The digest's first 16 hex digits, after image's "sha256:".
    let name = format!("sockmesh-proxy-{}.profdata", &image::digest(&bytes)[7..23]);
    let path = dir.join(&name);
    for e in fs::read_dir(dir)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("sockmesh-proxy-") && n.ends_with(".profdata") && n != name {
            fs::remove_file(e.path())?;
        }
    }
    if !path.exists() {
        fs::write(&path, &bytes)?;
    }
    Ok(path)
}

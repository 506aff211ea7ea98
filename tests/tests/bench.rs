//! A smoke run of the benchmark suite (tiny sizes), so that it cannot rot: every measurement
//! runs, every baseline is measured, and the report has its tables and ratios. The figures of
//! a smoke run are not checked against any target: numbers live in `cargo xtask bench`.

use sockmesh_tests::lab::{run, testkit_bin};

#[test]
fn the_benchmark_suite_runs_and_reports_every_ratio() {
    let out =
        run(std::process::Command::new(testkit_bin().unwrap()).args(["bench", "--smoke"])).unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "| direct (no capture) |",
        "| iptables REDIRECT (istio rules) |",
        "| sockmesh |",
        "sockmesh / iptables: ",
        "| HTTP/1.1 | keep-alive | HAProxy |",
        "| HTTP/1.1 | keep-alive | sockmesh-proxy |",
        "| HTTP/1.1 | new connections | HAProxy |",
        "| HTTP/1.1 | new connections | sockmesh-proxy |",
        "| h2c | keep-alive | HAProxy |",
        "| h2c | keep-alive | sockmesh-proxy |",
        "| TCP relay | keep-alive | sockmesh-proxy |",
        "| TCP relay | new connections | HAProxy |",
        "sockmesh-proxy / HAProxy, HTTP/1.1 keep-alive: requests/s ",
        "sockmesh-proxy / HAProxy, HTTP/1.1 new connections: requests/s ",
        "| connect-time capture within 5% of direct (>= 0.95) |",
        "| proxy p99 at most HAProxy's (HTTP/1.1 keep-alive, <= 1.00) |",
        "| proxy p99 at most HAProxy's (HTTP/1.1 new connections, <= 1.00) |",
        "| proxy CPU per request at most HAProxy's (h2c keep-alive, <= 1.00) |",
        "| proxy requests/s at least HAProxy's (TCP relay new connections, >= 1.00) |",
        "## 2. The app-to-proxy hop",
        "| sockmesh + sk_msg |",
        "| Unix socket |",
        "| hop bulk throughput at least 1.5x iptables' (sockmesh + sk_msg) |",
        "## 3. Rule scale",
        "| exclusions (each kind) | iptables conn/s |",
        "## 4. Pod scale",
        "| pods | ms per registration | ms per unregistration |",
        "| registering 10 pods in under 2 s |",
        "| agent under 30 MiB RSS with 10 pods |",
        "## 6. The mesh request end to end",
        "| same node | keep-alive | iptables (istio rules) |",
        "| same node | new connections | sockmesh + acceleration |",
        "| two nodes | new connections | sockmesh |",
        "same node, new connections, against iptables: sockmesh requests/s ",
        "| mesh request through two sidecars, one node, new connections: sockmesh requests/s at least 1.1x iptables' |",
    ] {
        assert!(
            report.contains(needle),
            "no {needle:?} in the report:\n{report}"
        );
    }
    // Every ratio is a finite positive number.
    let ratio = |after: &str| -> f64 {
        let tail = &report[report.find(after).unwrap() + after.len()..];
        let num: String = tail
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        // A sentence's full stop is not the number's.
        num.trim_end_matches('.')
            .parse()
            .unwrap_or_else(|_| panic!("no number after {after:?}:\n{report}"))
    };
    for after in [
        "sockmesh / iptables: ",
        "sockmesh-proxy / HAProxy, HTTP/1.1 keep-alive: requests/s ",
        "sockmesh-proxy / HAProxy, HTTP/1.1 new connections: requests/s ",
        "sockmesh-proxy / HAProxy, h2c keep-alive: requests/s ",
        "sockmesh-proxy / HAProxy, TCP relay keep-alive: requests/s ",
        "sockmesh-proxy / HAProxy, TCP relay new connections: requests/s ",
        ", system calls per request ",
        "others registered ",
    ] {
        let r = ratio(after);
        assert!(r.is_finite() && r > 0.0, "{after}{r}");
    }
}

/// A folder removed when the test ends, failed or not.
struct Removed(std::path::PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A short run of `cargo xtask profile`: both proxies run under callgrind, each role's
/// requests are counted (HTTP/1.1 keep-alive and new connections, h2c keep-alive, the TCP
/// relay keep-alive and new connections), with their instructions and simulated L1 misses
/// per request; sockmesh-proxy's instructions are shared out by part, and both proxies' system
/// calls are counted per request (and sampled by `perf record`, a file per proxy and role).
#[test]
fn the_profile_counts_both_proxies_instructions_per_request() {
    let samples =
        Removed(std::env::temp_dir().join(format!("sockmesh-profile-perf-{}", std::process::id())));
    let out = run(std::process::Command::new(testkit_bin().unwrap())
        .args(["profile", "--smoke", "--perf-record"])
        .arg(&samples.0))
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    // `--perf-record`: a file of samples per proxy and role.
    let mut files: Vec<String> = std::fs::read_dir(&samples.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files.len(), 10, "{files:?}");
    assert!(
        files.contains(&"sockmesh-proxy-http-1-1-new-connections.data".to_string()),
        "{files:?}"
    );
    assert!(
        files.contains(&"haproxy-tcp-relay-keep-alive.data".to_string()),
        "{files:?}"
    );
    let roles = [
        "HTTP/1.1 keep-alive",
        "HTTP/1.1 new connections",
        "h2c keep-alive",
        "TCP relay keep-alive",
        "TCP relay new connections",
    ];
    for role in roles {
        for proxy in ["HAProxy", "sockmesh-proxy"] {
            let prefix = format!("| {role} | {proxy} | ");
            let line = report
                .lines()
                .find(|l| l.starts_with(&prefix))
                .unwrap_or_else(|| panic!("no {prefix:?} row:\n{report}"));
            // | role | proxy | requests | instructions per request | against HAProxy | L1 data
            // misses per request | L1 instruction misses per request |
            let cells: Vec<f64> = line
                .split('|')
                .filter_map(|c| c.trim().parse().ok())
                .collect();
            assert_eq!(cells.len(), 5, "{line}");
            assert!(cells[0] >= 10.0 && cells[1] > 1000.0, "{line}");
            assert!(cells[3] >= 0.0 && cells[4] >= 0.0, "{line}");
            // An HTTP request runs more code than fits the first-level cache: a simulation
            // that counted no misses did not run.
            if role.starts_with("HTTP/1.1") {
                assert!(cells[4] > 0.0, "no instruction misses counted: {line}");
            }
        }
        assert!(
            report.contains(&format!(
                "### sockmesh-proxy, {role}: where the instructions go"
            )),
            "{report}"
        );
    }
    assert!(report.contains("| hyper | "), "{report}");
    assert!(
        report.contains("| TCP relay (sockmesh-proxy) | "),
        "{report}"
    );
    // Both proxies' system calls per request, by call: every proxy reads and writes.
    let all = report
        .lines()
        .find(|l| l.starts_with("| **all** |"))
        .unwrap_or_else(|| panic!("no system calls table:\n{report}"));
    let cells: Vec<f64> = all
        .split('|')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    // Per role, HAProxy's then sockmesh-proxy's.
    assert_eq!(cells.len(), 2 * roles.len(), "{all}");
    assert!(cells.iter().all(|n| *n >= 1.0), "{all}");
    // Last, the capture programs timed part by part (`--section-timing`): a captured
    // connection runs connect4's redirect, its bind and the publish once each, and the
    // connections left alone run connect4's other end.
    let (captured, left_alone) = report.split_once("### left alone").unwrap_or_else(|| {
        panic!(
            "no section timing of connections left alone:
{report}"
        )
    });
    assert!(
        captured.contains("## Where the capture programs' time goes"),
        "{report}"
    );
    let runs = |table: &str, section: &str| -> f64 {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("| {section} | ")))
            .unwrap_or_else(|| {
                panic!(
                    "no {section:?} row:
{table}"
                )
            });
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | section | runs per connection | ns per run | ...
        assert!(cells[3].parse::<f64>().unwrap() > 0.0, "{line}");
        cells[2].parse().unwrap()
    };
    for section in [
        "connect4: whole, redirected",
        "connect4: bpf_bind",
        "sock_ops: SYN out, TCP_CONNECT_CB (publish)",
        "sock_ops: close (release)",
        "getsockopt: ORIG_DST lookup",
    ] {
        let n = runs(captured, section);
        assert!(
            (0.9..=1.1).contains(&n),
            "{section}: {n} runs per connection"
        );
    }
    assert!(
        !left_alone.contains("connect4: whole, redirected"),
        "{left_alone}"
    );
    let n = runs(left_alone, "connect4: whole, left alone");
    assert!(
        (0.9..=1.1).contains(&n),
        "left alone: {n} runs per connection"
    );
}

/// The proxy section alone (`bench --proxies-only`, for comparing builds of sockmesh-proxy):
/// both proxies' rows and ratios in every role, and no other section or targets table.
#[test]
fn the_proxy_section_runs_alone() {
    let out = run(std::process::Command::new(testkit_bin().unwrap()).args([
        "bench",
        "--smoke",
        "--proxies-only",
    ]))
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "## 5. The proxy against HAProxy",
        "| HTTP/1.1 | new connections | sockmesh-proxy |",
        "| h2c | keep-alive | HAProxy |",
        "| TCP relay | new connections | sockmesh-proxy |",
        "sockmesh-proxy / HAProxy, HTTP/1.1 new connections: requests/s ",
        "sockmesh-proxy / HAProxy, TCP relay keep-alive: requests/s ",
    ] {
        assert!(report.contains(needle), "no {needle:?} in:\n{report}");
    }
    for absent in ["## 1.", "## 6.", "## Targets"] {
        assert!(!report.contains(absent), "{absent:?} in:\n{report}");
    }
}

//! Socket acceleration (sock_ops + sk_msg) on the app-to-proxy hop: every case a TCP user can
//! see, byte-exact, with acceleration on, off for the pod, and off for the node (the default).
//! With it on, the app's data never goes through TCP/IP (the kernel counts no data segments
//! on its socket), and the outcomes are the same as without, except where this kernel's
//! sk_msg differs from TCP, which these tests pin down so that the day it changes is seen:
//! no back pressure (a reader that stops reading does not hold up the writer: the data piles
//! up in the reader's socket), splice(2) readers see none of the redirected data, and a
//! blocking read may return EAGAIN early (the clients here read as event loops do; see
//! `sockmesh_tests::accel::Patient`). Those are why acceleration is off unless turned on.

use std::process::Command;

use sockmesh_tests::{
    lab::{run, testkit_bin, Lab},
    pods::{self, Mode, Pod, PEER_V4},
    profiles::Profile,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accel {
    On,
    OffForThePod,
    OffForTheNode,
}

const CASES: [&str; 11] = [
    "big-write",
    "small-writes",
    "echo-both-ways",
    "download",
    "back-pressure",
    "client-half-close",
    "server-half-close",
    "rst",
    "sendfile",
    "splice",
    "close-in-flight",
];

/// A lab whose pod has the case server on its outbound port (as the proxy, uid 1337).
fn lab(tag: &str, accel: Accel) -> (Lab, Pod, std::path::PathBuf) {
    let mut lab = Lab::new(tag).unwrap();
    // Off for the node is the default.
    if accel != Accel::OffForTheNode {
        lab.agent_args = vec!["--acceleration".into(), "on".into()];
    }
    lab.start_agent().unwrap();
    let p = Profile::default_sidecar();
    let pod = pods::pod_with(&mut lab, "a", &p, Mode::Sockmesh, &[]).unwrap();
    let log = lab.dir.join("accel-server.log");
    let mut server = pods::as_user(&lab, &pod, 1337, &testkit_bin().unwrap()).unwrap();
    server
        .args(["accel-serve", "0.0.0.0:15001", "--log"])
        .arg(&log);
    lab.spawn(server, Some("ready")).unwrap();
    std::fs::write(&log, "").unwrap();
    std::fs::set_permissions(&log, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let env: &[(&str, &str)] = match accel {
        Accel::OffForThePod => &[("SOCKMESH_ACCELERATION", "off")],
        Accel::On | Accel::OffForTheNode => &[],
    };
    pods::apply_sockmesh_env(&lab, &pod, &p, env).unwrap();
    (lab, pod, log)
}

/// Run `case` as the app (uid 1000, in the pod's cgroup) toward a remote address, which capture
/// sends to the outbound port.
fn case(lab: &Lab, pod: &Pod, case: &str) -> String {
    let mut cmd: Command = lab
        .command(&pod.ns, pod.in_cgroup, testkit_bin().unwrap())
        .unwrap();
    cmd.args(["accel-case", &format!("{PEER_V4}:80"), case])
        .args(["--uid", "1000", "--gid", "1000"]);
    let out = run(&mut cmd).unwrap_or_else(|e| panic!("lab {}: case {case}: {e:#}", lab.name));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every case's outcome, its path split off; the server's log at the end.
fn outcomes(accel: Accel) -> (Vec<String>, Vec<String>, String) {
    let tag = match accel {
        Accel::On => "acc1",
        Accel::OffForThePod => "acc0",
        Accel::OffForTheNode => "accn",
    };
    let (lab, pod, log) = lab(tag, accel);
    let mut seen = Vec::new();
    let mut paths = Vec::new();
    for c in CASES {
        let line = case(&lab, &pod, c);
        let (outcome, path) = line
            .rsplit_once(" path=")
            .unwrap_or_else(|| panic!("{c}: {line}"));
        seen.push(format!("{c}: {outcome}"));
        paths.push(format!("{c}: {path}"));
    }
    // The server logs what arrived on connections whose client had gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut text = std::fs::read_to_string(&log).unwrap();
    while text.lines().count() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        text = std::fs::read_to_string(&log).unwrap();
    }
    (seen, paths, text)
}

fn sums_match(line: &str) {
    // "sent N bytes sum=S / got N bytes sum=S" and the like: both halves the same.
    if let Some((sent, got)) = line.split_once(" / ") {
        let sent = sent.rsplit_once("sent ").map_or(sent, |x| x.1);
        let sent = sent.split(" (").next().unwrap_or(sent);
        assert!(got.ends_with(sent), "{line}");
    }
}

/// What differs with acceleration on, on this kernel; every other case is the same: each
/// case, TCP's outcome (a part of it), and whether an outcome is this kernel's sk_msg's.
type Known = (&'static str, &'static str, fn(&str) -> bool);

const KNOWN_DIFFERENCES: [Known; 2] = [
    // The writer never waits: the reader's socket takes all 16 MiB.
    ("back-pressure", "(writes waited: true)", |a| {
        a.contains("(writes waited: false)")
    }),
    // The splice reader gets none of the redirected data (only what its line reader had
    // taken before it spliced), then end of file.
    ("splice", "got 4194304 bytes sum=c1b9ea8004d5a800", |a| {
        !a.contains("got 4194304 bytes")
    }),
];

#[test]
fn every_case_is_byte_exact_with_acceleration_on_and_off_but_the_known_differences() {
    let (on, on_paths, on_log) = outcomes(Accel::On);
    let (off, off_paths, off_log) = outcomes(Accel::OffForThePod);
    assert_eq!(on.len(), off.len());
    for (a, b) in on.iter().zip(&off) {
        match KNOWN_DIFFERENCES
            .iter()
            .find(|(case, _, _)| a.starts_with(&format!("{case}: ")))
        {
            // Without acceleration, TCP's behaviour; with it, this kernel's sk_msg's.
            Some((case, tcp, is_sk_msg)) => {
                assert!(b.contains(tcp), "{case} without acceleration: {b}");
                assert!(
                    is_sk_msg(a),
                    "{case} with acceleration is no longer as documented (kernel changed?): {a}"
                );
            }
            None => assert_eq!(a, b, "acceleration changed what a TCP user sees"),
        }
    }
    for line in &off {
        sums_match(line);
    }
    assert!(
        on.iter().any(
            |l| l.starts_with("server-half-close: received 100000 bytes") && l.contains("eof=true")
        ),
        "{on:#?}"
    );
    // What arrived after the client had gone, and after the server's half-close.
    for log in [&on_log, &off_log] {
        assert!(log.contains("close-in-flight: got 1048576 bytes"), "{log}");
        assert!(
            log.contains("after the server's half-close: got 19 bytes"),
            "{log}"
        );
        assert!(!log.contains("error"), "{log}");
    }
    // The path: on, the hop skips TCP/IP; off for the pod, it does not.
    for p in &on_paths {
        assert!(p.ends_with(": skipped-tcp"), "accelerated: {on_paths:#?}");
    }
    for p in &off_paths {
        assert!(p.ends_with(": tcp"), "not accelerated: {off_paths:#?}");
    }
}

#[test]
fn off_for_the_node_by_default() {
    let (lab, pod, _) = lab("accs", Accel::OffForTheNode);
    let line = case(&lab, &pod, "big-write");
    assert!(line.ends_with(" path=tcp"), "{line}");
}

#[test]
fn thousands_of_concurrent_connections_and_the_map_follows_the_sockets() {
    let (lab, pod, _) = lab("accm", Accel::On);
    let dump = || {
        lab.dump().unwrap()["accelerated_sockets"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(dump(), 0);
    // While the 2,000 connections are open, dump shows both ends of them.
    let mut client = lab
        .command(&pod.ns, pod.in_cgroup, testkit_bin().unwrap())
        .unwrap();
    client
        .args(["accel-case", &format!("{PEER_V4}:80"), "many"])
        .args(["--uid", "1000", "--gid", "1000"])
        .stdout(std::process::Stdio::piped());
    let client = client.spawn().unwrap();
    let mut most = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while most < 2000 && std::time::Instant::now() < deadline {
        most = most.max(dump());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = client.wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(
        line,
        "2000 of 2000 connections echoed 10000 bytes whole path=skipped-tcp"
    );
    assert!(
        most >= 2000,
        "dump showed at most {most} accelerated sockets"
    );
    // Entries leave with their sockets: once the client is gone, none are left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while dump() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} accelerated sockets left after their connections closed",
            dump()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

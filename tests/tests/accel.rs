//! Socket acceleration (sock_ops + sk_msg): every case a TCP user can see, byte-exact, with
//! acceleration for all the pod's sockets (app to proxy), with the pod's default (proxy to
//! proxy), off for the pod, and off for the node (the default). With it on, the client's data
//! skips TCP/IP (the kernel counts the bytes its socket sent by TCP) except what does not fit
//! its reader's window, which goes by TCP with TCP's back pressure; the outcomes are the same
//! as without, except where this kernel's sk_msg differs from TCP, which these tests pin down
//! so that the day it changes is seen: a splice(2) reader of redirected data sees none of it,
//! FIONREAD on a socket in the map counts only redirected data, and a blocking read on a
//! socket in the map may return EAGAIN early (the clients here read as event loops do; see
//! `sockmesh_tests::accel::Patient`). Those are why acceleration is off for the node unless
//! turned on, and for apps unless their pod asks.

use std::net::SocketAddr;

use sockmesh_tests::{
    accel::{AccelCase, AccelServe},
    kit::Identity,
    lab::Lab,
    pods::{self, Mode, Pod, PEER_V4},
    profiles::Profile,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accel {
    /// On for the node, and for all the pod's sockets.
    On,
    /// On for the node; the pod's default: its proxy's sockets only.
    Proxies,
    OffForThePod,
    OffForTheNode,
}

const CASES: [&str; 13] = [
    "big-write",
    "small-writes",
    "echo-both-ways",
    "download",
    "fionread",
    "back-pressure",
    "resume",
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
    // Registered before the proxy starts, as an init container does: the proxy's sockets are
    // known as its own by their creator, which is recorded for registered pods only.
    let env: &[(&str, &str)] = match accel {
        Accel::OffForThePod => &[("SOCKMESH_ACCELERATION", "off")],
        // The app's sockets too: the cases' client stands where the app stands.
        Accel::On => &[("SOCKMESH_ACCELERATION", "all")],
        Accel::OffForTheNode => &[],
        Accel::Proxies => &[("SOCKMESH_ACCELERATION", "proxies")],
    };
    pods::apply_sockmesh_env(&lab, &pod, &p, env).unwrap();
    let log = lab.dir.join("accel-server.log");
    std::fs::write(&log, "").unwrap();
    std::fs::set_permissions(&log, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let server = AccelServe {
        addr: pods::any_v4(15001),
        log: log.clone(),
    };
    lab.start(pod.place().as_user(1337), &server).unwrap();
    (lab, pod, log)
}

/// Run `case` as the app (uid 1000, in the pod's cgroup) toward a remote address, which capture
/// sends to the outbound port.
fn case(lab: &Lab, pod: &Pod, case: &str) -> String {
    case_as(lab, pod, false, case)
}

/// Run `case` as the app, or (`proxy`) as the proxy user straight to the outbound port over
/// loopback (capture leaves the proxy's own connections alone): a proxy-to-proxy connection.
fn case_as(lab: &Lab, pod: &Pod, proxy: bool, case: &str) -> String {
    let out = lab
        .output(pod.place(), &app_case(proxy, case))
        .unwrap_or_else(|e| panic!("lab {}: case {case}: {e:#}", lab.name));
    out.trim().to_string()
}

/// The testkit's `case`: as the app to a remote address, or (`proxy`) as the proxy user to
/// the outbound port over loopback.
fn app_case(proxy: bool, case: &str) -> AccelCase {
    if proxy {
        AccelCase::new("127.0.0.1:15001".parse().unwrap(), case, Identity::PROXY)
    } else {
        let remote = SocketAddr::new(PEER_V4.parse().unwrap(), 80);
        AccelCase::new(remote, case, Identity::APP)
    }
}

/// Every case's outcome, its path split off; the server's log at the end. The client is the
/// app, but with the pod's default acceleration (`Proxies`), another proxy.
fn outcomes(accel: Accel) -> (Vec<String>, Vec<String>, String, serde_json::Value) {
    let tag = match accel {
        Accel::On => "acc1",
        Accel::OffForThePod => "acc0",
        Accel::OffForTheNode => "accn",
        Accel::Proxies => "accd",
    };
    let (lab, pod, log) = lab(tag, accel);
    let mut seen = Vec::new();
    let mut paths = Vec::new();
    for c in CASES {
        let line = case_as(&lab, &pod, accel == Accel::Proxies, c);
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
    // The pod's counters, as dump shows them.
    let counters = lab.dump().unwrap()["pods"][0]["counters"].clone();
    (seen, paths, text, counters)
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
    // The splice reader gets none of the redirected data (only what its line reader had taken
    // before it spliced): it counts short at end of file, or, as that data sits in its socket
    // charged to its receive memory, TCP's window closes on the rest (sent by TCP once the
    // window filled) and it waits for ever, never answering.
    ("splice", "got 4194304 bytes sum=c1b9ea8004d5a800", |a| {
        a.contains("no answer within") || (a.contains(" / got ") && !a.contains("got 4194304"))
    }),
    // FIONREAD on a socket in the map counts only what sk_msg queued for it: an app's socket
    // with `all` (in the map for its writes, receiving by TCP) reports nothing waiting. A
    // proxy's, receiving redirected data, reports it (so the proxy-to-proxy run has only the
    // first difference).
    ("fionread", "FIONREAD said 1000;", |a| {
        a.contains("FIONREAD said 0;")
    }),
];

#[test]
fn every_case_is_byte_exact_with_acceleration_on_and_off_but_the_known_differences() {
    // On for all the pod's sockets, app to proxy (the proxy receives redirected data, the app
    // gets its by TCP); the pod's default, proxy to proxy (both receive redirected data); off.
    let (all, all_paths, all_log, all_counts) = outcomes(Accel::On);
    let (pp, pp_paths, pp_log, pp_counts) = outcomes(Accel::Proxies);
    let (off, off_paths, off_log, off_counts) = outcomes(Accel::OffForThePod);
    for (on, on_paths, on_log, known, counts) in [
        (
            &all,
            &all_paths,
            &all_log,
            &KNOWN_DIFFERENCES[..],
            &all_counts,
        ),
        (&pp, &pp_paths, &pp_log, &KNOWN_DIFFERENCES[..1], &pp_counts),
    ] {
        // The stalled and the slow readers made writers go by TCP, and, once their readers
        // had caught up, back to sk_msg; dump says so.
        let n = |c: &str| counts[c].as_u64().unwrap_or(0);
        assert!(
            n("accel_sock_added") >= 2 * CASES.len() as u64
                && n("accel_window_full") >= 1
                && n("accel_resumed") >= 1,
            "{counts}"
        );
        same_but_the_known_differences(on, &off, known);
        sent_what_fits_by_sk_msg(on_paths);
        assert!(
            on.iter().any(
                |l| l.starts_with("server-half-close: received 100000 bytes")
                    && l.contains("eof=true")
            ),
            "{on:#?}"
        );
        logged_what_came_after(on_log);
    }
    for line in &off {
        sums_match(line);
    }
    logged_what_came_after(&off_log);
    assert!(off_counts.get("accel_sock_added").is_none(), "{off_counts}");
    for p in &off_paths {
        assert!(p.contains(": tcp "), "not accelerated: {off_paths:#?}");
    }
}

fn same_but_the_known_differences(on: &[String], off: &[String], known: &[Known]) {
    assert_eq!(on.len(), off.len());
    for (a, b) in on.iter().zip(off) {
        match known
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
}

/// What arrived after the client had gone, and after the server's half-close.
fn logged_what_came_after(log: &str) {
    assert!(log.contains("close-in-flight: got 1048576 bytes"), "{log}");
    assert!(
        log.contains("after the server's half-close: got 19 bytes"),
        "{log}"
    );
    assert!(!log.contains("error"), "{log}");
}

/// A connection's first writes can come before its other end is in the map (it joins when
/// the server's side of the handshake completes): those go by TCP, at most one message of
/// 64 KiB, and the rest follows by sk_msg once they have been read.
const HEAD_START: u64 = 64 << 10;

/// What sk_msg leaves unread in a reader's socket before its writer goes by TCP.
const ACCEL_WINDOW: u64 = sockmesh_common::ACCEL_WINDOW;

/// The path with acceleration on. The cases whose reader keeps up skip TCP/IP but for a head
/// start, and most of them entirely. Where the writer outruns its reader (bulk, a stalled or a
/// splicing reader), what does not fit the reader's window goes by TCP, but at least a quarter
/// of a window's worth does not.
fn sent_what_fits_by_sk_msg(on_paths: &[String]) {
    let mut skipped = 0;
    for p in on_paths {
        let (case, path) = p.split_once(": ").unwrap();
        let by_tcp: u64 = path.strip_prefix("tcp ").map_or(0, |n| n.parse().unwrap());
        match OUTRUN.iter().find(|(c, _)| *c == case) {
            Some((_, written)) => {
                assert!(written - by_tcp >= 256 << 10, "accelerated: {on_paths:#?}");
                // The stalled reader's writer filled the window, went by TCP, and came back
                // to sk_msg once its reader had caught up: more than a window's worth (and a
                // head start) skipped TCP/IP.
                if case == "resume" {
                    assert!(
                        written - by_tcp > ACCEL_WINDOW + HEAD_START,
                        "the writer did not come back to sk_msg: {on_paths:#?}"
                    );
                }
            }
            None => {
                assert!(by_tcp <= HEAD_START, "accelerated: {on_paths:#?}");
                skipped += usize::from(path == "skipped-tcp");
            }
        }
    }
    let keep_up = on_paths.len() - OUTRUN.len();
    assert!(skipped * 2 > keep_up, "accelerated: {on_paths:#?}");
}

/// The cases whose writer can outrun its reader, and the bytes each writes.
const OUTRUN: [(&str, u64); 6] = [
    ("big-write", 8 << 20),
    ("echo-both-ways", 4 << 20),
    ("back-pressure", 16 << 20),
    ("resume", 5 << 20),
    ("sendfile", 4 << 20),
    ("splice", 4 << 20),
];

/// By default a pod's proxy's sockets are accelerated and its app's are not: the app's
/// connection to its proxy goes by TCP/IP (its socket never enters the map, so it reads and
/// writes as with TCP in every way), while the proxy's connections to another proxy (here the
/// proxy user over loopback, which capture leaves alone) skip it.
#[test]
fn by_default_proxies_are_accelerated_and_apps_are_not() {
    let (lab, pod, _) = lab("accp", Accel::Proxies);
    let app = case(&lab, &pod, "small-writes");
    assert!(app.contains(" path=tcp "), "{app}");
    let line = case_as(&lab, &pod, true, "small-writes");
    let by_tcp: u64 = line
        .rsplit_once(" path=tcp ")
        .map_or(0, |(_, n)| n.parse().unwrap());
    assert!(
        line.ends_with(" path=skipped-tcp") || by_tcp <= HEAD_START,
        "{line}"
    );
    // The same answer either way.
    assert_eq!(
        app.rsplit_once(" path=").unwrap().0,
        line.rsplit_once(" path=").unwrap().0
    );
    // What a proxy sends a proxy skips TCP/IP too (but for a head start).
    let down = case_as(&lab, &pod, true, "download-path");
    assert!(down.starts_with("received 1048576 bytes"), "{down}");
    assert!(received_by_tcp(&down) <= HEAD_START, "{down}");
}

/// A proxy that listened while its pod had acceleration off is known as the pod's proxy once
/// the pod turns it on (registered again): its listener's creator was recorded when it
/// listened, and the sockets it accepts inherit it, so the app's writes to it skip TCP/IP.
#[test]
fn a_proxy_listening_before_its_pod_turns_acceleration_on_is_known() {
    let (lab, pod, _) = lab("accl", Accel::OffForThePod);
    let before = case(&lab, &pod, "small-writes");
    assert!(before.contains(" path=tcp "), "{before}");
    sockmesh_tests::lab::run(lab.sockmesh_in(&pod.ns).unwrap().args([
        "init",
        "istio",
        "--cleanup-only",
    ]))
    .unwrap();
    let p = Profile::default_sidecar();
    pods::apply_sockmesh_env(&lab, &pod, &p, &[("SOCKMESH_ACCELERATION", "all")]).unwrap();
    let line = case(&lab, &pod, "small-writes");
    let by_tcp: u64 = line
        .rsplit_once(" path=tcp ")
        .map_or(0, |(_, n)| n.parse().unwrap());
    assert!(
        line.ends_with(" path=skipped-tcp") || by_tcp <= HEAD_START,
        "{line}\nagent log:\n{}",
        lab.agent_log()
    );
}

/// From a `download-path` line: the bytes that came through TCP/IP (the count includes the
/// FIN's one).
fn received_by_tcp(line: &str) -> u64 {
    let (_, n) = line.split_once(", ").unwrap();
    n.split(' ').next().unwrap().parse().unwrap()
}

/// With `all`, the app's writes to its proxy skip TCP/IP, but what the proxy sends the app
/// comes by TCP: an app's socket never receives redirected data.
#[test]
fn with_all_the_app_still_receives_by_tcp() {
    let (lab, pod, _) = lab("acca", Accel::On);
    let down = case(&lab, &pod, "download-path");
    assert!(down.starts_with("received 1048576 bytes"), "{down}");
    assert!(received_by_tcp(&down) >= 1 << 20, "{down}");
}

#[test]
fn off_for_the_node_by_default() {
    let (lab, pod, _) = lab("accs", Accel::OffForTheNode);
    let line = case(&lab, &pod, "big-write");
    assert!(line.contains(" path=tcp "), "{line}");
    assert!(
        !lab.agent_log().contains("socket acceleration: "),
        "{}",
        lab.agent_log()
    );
}

/// `--acceleration on` says where a socket in the map differs from TCP on this kernel: splice
/// and early EAGAIN everywhere, and FIONREAD as the kernel has it (by `tcp_bpf_ioctl`, which
/// upstream 929e30f93125 added; the fionread case above pins this kernel's down).
#[test]
fn acceleration_on_names_the_kernels_differences() {
    let (lab, _pod, _) = lab("accw", Accel::On);
    let log = lab.agent_log();
    assert!(log.contains("splice(2) from a socket"), "{log}");
    assert!(log.contains("fail early with EAGAIN"), "{log}");
    let syms = std::fs::read_to_string("/proc/kallsyms").unwrap();
    let fixed = syms
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("tcp_bpf_ioctl"));
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().unwrap().parse().unwrap();
    let minor: u32 = parts.next().unwrap().parse().unwrap();
    // Upstream 7.2 also counts TCP's queue (04af4efde58a): FIONREAD is TCP's again.
    match (fixed, (major, minor) >= (7, 2)) {
        (false, _) => assert!(log.contains("does not count data sk_msg queued"), "{log}"),
        (true, false) => assert!(log.contains("counts only data sk_msg queued"), "{log}"),
        (true, true) => assert!(!log.contains("FIONREAD"), "{log}"),
    }
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
    let mut client = lab.testkit(pod.place(), &app_case(false, "many")).unwrap();
    client.stdout(std::process::Stdio::piped());
    let client = client.spawn().unwrap();
    let mut most = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while most < 2000 && std::time::Instant::now() < deadline {
        most = most.max(dump());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = client.wait_with_output().unwrap();
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // Every connection skipped TCP/IP, but for the head start a first write can have.
    let (whole, path) = line.split_once(" path=").unwrap();
    assert_eq!(whole, "2000 of 2000 connections echoed 10000 bytes whole");
    assert!(
        path == "skipped-tcp" || path.starts_with("skipped-tcp but "),
        "{line}"
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
    // And so do their kernel addresses, which sock_ops forgets as each closes (not left for
    // the LRU map to drop when it needs room).
    assert_eq!(peer_addresses(&lab), 0, "addresses left in SM_PEER_SK");
}

/// Entries in the pinned map of accelerated sockets' kernel addresses (bpftool).
fn peer_addresses(lab: &Lab) -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(lab.bpffs.join("maps/SM_PEER_SK"))
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    v.as_array().expect("a list of entries").len()
}

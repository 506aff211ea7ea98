//! Hot restart of sockmesh-proxy under load, under iptables and under sockmesh: a second
//! instance started with the same `--hot-restart` path takes the first one's listening sockets;
//! the first stops accepting, lets its connections finish and exits. No connection fails, and
//! a response streaming through the first instance when the second takes over completes. The
//! first runs on one thread while it waits for the second.
//!
//! And the end of a pod's proxy: SIGTERM closes its inbound listener, its outbound one keeps
//! serving the app, a response streaming through it completes, and it exits on its own once
//! nothing is left; a second SIGTERM ends it at once.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use sockmesh_tests::{
    kit::{
        Connect, HttpGet, HttpServe, HttpStream, HttpUpstream, Identity, Load, LoadReport, Outcome,
    },
    lab::{sibling_bin, Lab},
    pods::{self, Mode, PEER_V4},
    profiles::Profile,
};

const CHUNKS: usize = 15;

/// sockmesh-proxy in `pod` with `config` (its listeners and routes, after the admin line),
/// draining for at most 20 s.
fn proxy_with(lab: &Lab, pod: &pods::Pod, name: &str, config: &str) -> Command {
    let cfg = lab.dir.join(name);
    let admin = "admin: {address: \"127.0.0.1:15000\"}\n";
    std::fs::write(&cfg, format!("{admin}{config}")).unwrap();
    let bin = sibling_bin("sockmesh-proxy", "SOCKMESH_PROXY_BIN").unwrap();
    let mut cmd = lab.command_at(pod.place(), bin).unwrap();
    cmd.arg("--config").arg(cfg).args(["--drain-timeout", "20"]);
    cmd
}

/// The proxy of the hot-restart test: outbound, TCP to port 80 relayed.
fn proxy(lab: &Lab, pod: &pods::Pod) -> Command {
    let config =
        "listeners:\n  - {name: outbound, address: \"0.0.0.0:15001\", direction: outbound}\n\
                  tcp_routes:\n  - {destination: \"80\"}\n";
    let mut cmd = proxy_with(lab, pod, "proxy.yaml", config);
    cmd.arg("--hot-restart").arg(lab.dir.join("restart.sock"));
    cmd
}

/// A lab in `mode` with a captured pod, and an HTTP upstream on the peer host (its address).
fn captured_pod(tag: &str, mode: Mode) -> (Lab, pods::Pod, SocketAddr) {
    let mut lab = pods::lab_for(tag, mode).unwrap();
    let p = Profile::default_sidecar();
    let pod = pods::captured(&mut lab, "h", &p, mode, &[]).unwrap();
    let upstream = format!("{PEER_V4}:18081").parse().unwrap();
    lab.start(
        pod.peer_place(),
        &HttpServe::new([HttpUpstream::new("s1", upstream)]),
    )
    .unwrap();
    (lab, pod, upstream)
}

/// A response of [`CHUNKS`] chunks (3 s) streaming from `upstream` to the app in `pod`; it
/// prints what it saw.
fn stream(lab: &Lab, pod: &pods::Pod, upstream: SocketAddr) -> std::process::Child {
    let stream = HttpStream {
        chunks: CHUNKS,
        ..HttpStream::new(upstream, "up", Identity::APP)
    };
    lab.testkit(pod.place(), &stream)
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// (load report, what the stream saw, how the first instance exited)
fn run(mode: Mode) -> (LoadReport, String, i32) {
    let tag = match mode {
        Mode::Iptables => "hoti",
        Mode::Sockmesh => "hots",
    };
    let (mut lab, pod, upstream) = captured_pod(tag, mode);
    let first = lab.spawn(proxy(&lab, &pod), Some("ready")).unwrap();

    let stop = lab.dir.join("stop-load");
    let load = Load::new(
        format!("{PEER_V4}:80").parse().unwrap(),
        "peer:80",
        stop.clone(),
        Identity::APP,
    );
    let load = lab
        .testkit(pod.place(), &load)
        .unwrap()
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stream = stream(&lab, &pod, upstream);
    std::thread::sleep(Duration::from_millis(700));
    // Under load and waiting for a successor, the first instance runs on one thread (its
    // default `--workers 1`): the hot-restart wait is a task, not a thread.
    let pid = lab.pid(first).unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "sockmesh-proxy", "{mode:?}: pid {pid}");
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert_eq!(threads, 1, "{mode:?}: sockmesh-proxy's threads");
    lab.spawn(proxy(&lab, &pod), Some("ready")).unwrap();
    // The first drains (the stream takes 3 s in all) and exits.
    let exited = lab.wait_exit(first, Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(700));
    std::fs::write(&stop, "").unwrap();
    let out = load.wait_with_output().unwrap();
    let report: LoadReport = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let streamed = stream.wait_with_output().unwrap();
    (
        report,
        String::from_utf8_lossy(&streamed.stdout).trim().to_string(),
        exited.code().unwrap_or(-1),
    )
}

#[test]
fn a_second_instance_takes_over_with_no_failed_connection() {
    for mode in [Mode::Iptables, Mode::Sockmesh] {
        let (report, streamed, code) = run(mode);
        assert_eq!(code, 0, "{mode:?}: the replaced instance's exit");
        assert_eq!(report.failed, 0, "{mode:?}: {report:?}");
        assert_eq!(report.escaped, 0, "{mode:?}: {report:?}");
        assert!(
            report.captured > 100,
            "{mode:?}: too few to tell: {report:?}"
        );
        assert_eq!(
            streamed,
            format!("chunks={CHUNKS} streamed=true"),
            "{mode:?}: the stream through the first instance"
        );
    }
}

/// sockmesh-proxy in `pod` with an outbound and an inbound listener, as a pod's sidecar.
fn sidecar(lab: &Lab, pod: &pods::Pod) -> Command {
    let config =
        "listeners:\n  - {name: outbound, address: \"0.0.0.0:15001\", direction: outbound}\n\
                  \x20 - {name: inbound, address: \"0.0.0.0:15006\", direction: inbound}\n";
    proxy_with(lab, pod, "sidecar.yaml", config)
}

fn signal(lab: &Lab, index: usize, sig: i32) {
    let pid = lab.pid(index).expect("the proxy runs");
    // SAFETY: kill on the lab's own child.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill {pid}");
}

#[test]
fn sigterm_closes_inbound_serves_outbound_and_drains_and_a_second_ends_it() {
    let (mut lab, pod, upstream) = captured_pod("term", Mode::Sockmesh);
    let inbound = "127.0.0.1:15006".parse().unwrap();

    // One SIGTERM: inbound closed, outbound served, the stream completes, then it exits.
    let proxy = lab.spawn(sidecar(&lab, &pod), Some("ready")).unwrap();
    let streaming = stream(&lab, &pod, upstream);
    std::thread::sleep(Duration::from_millis(700));
    let termed = std::time::Instant::now();
    signal(&lab, proxy, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let out = lab
        .output(pod.place(), &Connect::new(inbound, Identity::APP))
        .unwrap();
    let outcome: Outcome = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        outcome,
        Outcome::Refused,
        "the inbound listener after SIGTERM"
    );
    let got = lab
        .output(
            pod.place(),
            &HttpGet::new(upstream, "/", "up", Identity::APP),
        )
        .unwrap();
    assert!(
        got.starts_with("HTTP/1.1 200"),
        "an outbound request after SIGTERM: {got}"
    );
    let streamed = streaming.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&streamed.stdout).trim(),
        format!("chunks={CHUNKS} streamed=true"),
        "the stream through the proxy when SIGTERM came"
    );
    let exited = lab.wait_exit(proxy, Duration::from_secs(15)).unwrap();
    assert_eq!(exited.code(), Some(0), "the proxy's exit after SIGTERM");
    let served = termed.elapsed();
    assert!(
        served >= Duration::from_secs(4),
        "exited {served:?} after SIGTERM: it serves at least 5 s"
    );

    // A second SIGTERM ends the wait with the stream still going.
    let proxy = lab.spawn(sidecar(&lab, &pod), Some("ready")).unwrap();
    let streaming = stream(&lab, &pod, upstream);
    std::thread::sleep(Duration::from_millis(700));
    signal(&lab, proxy, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    let again = std::time::Instant::now();
    signal(&lab, proxy, libc::SIGTERM);
    let exited = lab.wait_exit(proxy, Duration::from_secs(5)).unwrap();
    assert_eq!(
        exited.code(),
        Some(0),
        "the proxy's exit after a second SIGTERM"
    );
    assert!(
        again.elapsed() < Duration::from_secs(1),
        "a second SIGTERM ended it after {:?}",
        again.elapsed()
    );
    let streamed = streaming.wait_with_output().unwrap();
    assert_ne!(
        String::from_utf8_lossy(&streamed.stdout).trim(),
        format!("chunks={CHUNKS} streamed=true"),
        "the stream cut by the proxy's exit"
    );
}

//! Inbound capture beyond the conformance matrix: a missing proxy, a proxy that starts after
//! init, istio-cni's validation probe, and a request from pod A's app to pod B's app through
//! both sidecars.

use std::net::SocketAddr;

use sockmesh_tests::{
    kit::{Fetch, Identity, Listen, Listener, ListenerKind, Outcome, Proxy},
    lab::{sockmesh_bin, Lab},
    pods::{self, Caller, Case, Mode, POD_B_V4, POD_V4},
    profiles::Profile,
};

/// The app's listener on its port 8080, named `name`.
fn app_listener(name: &str) -> Listen {
    Listen {
        listeners: vec![Listener::report(name, pods::any_v4(8080))],
    }
}

/// The fields of each line of `text`, with the address of the `keys` fields reduced to its IP
/// (ports differ from run to run) and the `other=` field dropped unless `keep_other`.
fn without_ports(text: &str, keys: &[&str], keep_other: bool) -> Vec<String> {
    text.lines()
        .map(|l| {
            l.split_whitespace()
                .filter(|f| keep_other || !f.starts_with("other="))
                .map(|f| match f.split_once('=') {
                    Some((k, v)) if keys.contains(&k) => {
                        let ip = v.parse::<SocketAddr>().map(|a| a.ip().to_string());
                        format!("{k}={}", ip.unwrap_or_else(|_| v.to_string()))
                    }
                    _ => f.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn peer_case(port: u16) -> Case {
    Case::new(
        Caller::new_peer(),
        format!("{POD_V4}:{port}").parse().unwrap(),
    )
}

#[test]
fn no_proxy_means_refused_and_a_late_proxy_is_found() {
    let mut lab = Lab::with_agent("late").unwrap();
    let p = Profile::default_sidecar();
    let ipt = pods::captured(&mut lab, "i", &p, Mode::Iptables, &[8080]).unwrap();
    let smp = pods::captured(&mut lab, "s", &p, Mode::Sockmesh, &[8080]).unwrap();
    let case = peer_case(8080);
    // No inbound proxy: iptables' REDIRECT hits a closed port; sockmesh refuses the same way
    // rather than letting the connection reach the app.
    assert_eq!(
        pods::probe_from_peer(&lab, &ipt, &case).unwrap(),
        Outcome::Refused
    );
    assert_eq!(
        pods::probe_from_peer(&lab, &smp, &case).unwrap(),
        Outcome::Refused
    );
    // The kernel program says why, through aya-log and the agent's log.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !lab
        .agent_log()
        .contains("no listener on capture port 15006")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the kernel's log record did not reach the agent's log:\n{}",
            lab.agent_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The proxy starts after init: found without any call to the agent.
    pods::listen(&mut lab, &smp.ns, true, "late", &[15006]).unwrap();
    pods::listen(&mut lab, &ipt.ns, false, "late", &[15006]).unwrap();
    let want = pods::probe_from_peer(&lab, &ipt, &case).unwrap();
    let got = pods::probe_from_peer(&lab, &smp, &case).unwrap();
    assert_eq!(got, want);
    match got {
        Outcome::Ok { listener, orig, .. } => {
            assert_eq!(listener, "late:15006");
            assert_eq!(orig, format!("{POD_V4}:8080"));
        }
        other => panic!("{other:?}"),
    }
}

fn validation(lab: &Lab, pod: &pods::Pod) -> std::process::Output {
    let mut cmd = lab
        .command_at(pod.place().as_user(1337), sockmesh_bin().unwrap())
        .unwrap();
    cmd.args([
        "init",
        "istio",
        "--run-validation",
        "--skip-rule-apply",
        "--probe-timeout",
        "3s",
    ]);
    cmd.output().unwrap()
}

#[test]
fn istio_cni_validation_probe() {
    let mut lab = Lab::with_agent("valid").unwrap();
    let p = Profile::default_sidecar();
    let ipt = pods::captured(&mut lab, "i", &p, Mode::Iptables, &[]).unwrap();
    let smp = pods::captured(&mut lab, "s", &p, Mode::Sockmesh, &[]).unwrap();
    let bare = pods::pod_with(&mut lab, "u", &p, Mode::Sockmesh, &[]).unwrap();

    let out = validation(&lab, &ipt);
    assert!(out.status.success(), "with istio's rules: {out:?}");
    let out = validation(&lab, &smp);
    assert!(out.status.success(), "with sockmesh: {out:?}");
    let out = validation(&lab, &bare);
    assert_eq!(out.status.code(), Some(126), "uncaptured pod: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("validation failed"));
}

/// Lines of pod A's app's response, ports dropped so runs compare.
fn e2e(mode: Mode) -> Vec<String> {
    let mut lab = pods::lab_for("e2e", mode).unwrap();
    let p = Profile::default_sidecar();
    let pods = pods::two_pods(&mut lab, "x", mode).unwrap();
    for pod in [&pods.a, &pods.b] {
        pods::capture(&lab, pod, &p, mode).unwrap();
    }
    for (pod, name) in [(&pods.a, "A"), (&pods.b, "B")] {
        lab.start(pod.place().as_user(1337), &Proxy::new(name))
            .unwrap();
    }
    lab.start(pods.b.place(), &app_listener("b-app")).unwrap();
    let fetch = Fetch::new(
        SocketAddr::new(POD_B_V4.parse().unwrap(), 8080),
        Identity::APP,
    );
    let text = lab.output(pods.a.place(), &fetch).unwrap();
    without_ports(&text, &["peer", "local"], true)
}

#[test]
fn pod_to_pod_through_both_sidecars() {
    let sockmesh = e2e(Mode::Sockmesh);
    let b = POD_B_V4;
    let a = POD_V4;
    assert_eq!(sockmesh.len(), 3, "{sockmesh:?}");
    assert_eq!(
        sockmesh[0],
        format!("hop=A-outbound orig={b}:8080 client={a}")
    );
    assert_eq!(
        sockmesh[1],
        format!("hop=B-inbound orig={b}:8080 client={a}")
    );
    assert!(
        sockmesh[2].starts_with(&format!("listener=b-app orig={b}:8080 peer=127.0.0.6 ")),
        "{sockmesh:?}"
    );
    // The same request under istio-iptables' rules gives the same observations, except the
    // inbound proxy's local address (REDIRECT rewrites it to :15006; sk_lookup does not).
    let iptables = e2e(Mode::Iptables);
    assert_eq!(sockmesh, iptables);
}

/// TPROXY mode end to end: the peer calls the pod's app; the inbound proxy (uid 0, gid 1337,
/// as Istio runs Envoy in TPROXY mode) sees the original destination as its local address and
/// connects to the app from the client's own address (original source, marked 1337); the app
/// sees the real client, and its replies find their way back.
fn tproxy_e2e(mode: Mode) -> Vec<String> {
    let mut lab = pods::lab_for("tpx", mode).unwrap();
    let p = Profile {
        tproxy: true,
        ..Profile::default_sidecar()
    };
    let pod = pods::captured(&mut lab, "t", &p, mode, &[]).unwrap();
    let proxy = Proxy {
        tproxy_mark: Some(1337),
        ..Proxy::new("P")
    };
    lab.start(pod.place().as_group(1337), &proxy).unwrap();
    lab.start(pod.place(), &app_listener("app")).unwrap();
    let fetch = Fetch::new(
        SocketAddr::new(POD_V4.parse().unwrap(), 8080),
        Identity::ROOT,
    );
    let text = lab.output(pod.peer_place(), &fetch).unwrap();
    without_ports(&text, &["peer"], false)
}

#[test]
fn tproxy_original_source_to_the_app() {
    let sockmesh = tproxy_e2e(Mode::Sockmesh);
    assert_eq!(sockmesh.len(), 2, "{sockmesh:?}");
    assert_eq!(
        sockmesh[0],
        format!("hop=P-inbound orig={POD_V4}:8080 client={}", pods::PEER_V4)
    );
    // The app sees the real client address, not 127.0.0.6.
    assert!(
        sockmesh[1].starts_with(&format!(
            "listener=app orig={POD_V4}:8080 peer={} ",
            pods::PEER_V4
        )),
        "{sockmesh:?}"
    );
    assert_eq!(sockmesh, tproxy_e2e(Mode::Iptables));
}

#[test]
fn reuseport_proxy_workers_share_the_inbound_port() {
    let mut lab = Lab::with_agent("reuse").unwrap();
    let p = Profile::default_sidecar();
    let smp = pods::captured(&mut lab, "s", &p, Mode::Sockmesh, &[8080]).unwrap();
    // Two workers on 15006 with SO_REUSEPORT, as Envoy runs them.
    let mut workers = Vec::new();
    for name in ["w1", "w2"] {
        let worker = Listen {
            listeners: vec![Listener::new(
                ListenerKind::ReusePort,
                name,
                pods::any_v4(15006),
            )],
        };
        workers.push(lab.start(smp.place(), &worker).unwrap());
    }
    let case = peer_case(8080);
    let land = |lab: &Lab| match pods::probe_from_peer(lab, &smp, &case).unwrap() {
        Outcome::Ok { listener, .. } => listener,
        other => panic!("{other:?}"),
    };
    for _ in 0..4 {
        assert!(["w1", "w2"].contains(&land(&lab).as_str()));
    }
    // The last worker to listen going away leaves the first in charge.
    lab.kill(workers[1]).unwrap();
    for _ in 0..4 {
        assert_eq!(land(&lab), "w1");
    }
}

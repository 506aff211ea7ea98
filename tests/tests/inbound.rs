//! Inbound capture beyond the conformance matrix: a missing proxy, a proxy that starts after
//! init, istio-cni's validation probe, and a request from pod A's app to pod B's app through
//! both sidecars.

use sockmesh_tests::{
    kit::Outcome,
    lab::{run, sockmesh_bin, testkit_bin, Lab},
    pods::{self, Caller, Case, Mode, POD_B_V4, POD_V4},
    profiles::Profile,
};

fn peer_case(port: u16) -> Case {
    Case::new(
        Caller::new_peer(),
        format!("{POD_V4}:{port}").parse().unwrap(),
    )
}

#[test]
fn no_proxy_means_refused_and_a_late_proxy_is_found() {
    let mut lab = Lab::new("late").unwrap();
    lab.start_agent().unwrap();
    let p = Profile::default_sidecar();
    let ipt = pods::pod_with(&mut lab, "i", &p, Mode::Iptables, &[8080]).unwrap();
    pods::apply_iptables(&ipt, &p).unwrap();
    let smp = pods::pod_with(&mut lab, "s", &p, Mode::Sockmesh, &[8080]).unwrap();
    pods::apply_sockmesh(&lab, &smp, &p).unwrap();
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
    let mut cmd = pods::as_user(lab, pod, 1337, &sockmesh_bin().unwrap()).unwrap();
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
    let mut lab = Lab::new("valid").unwrap();
    lab.start_agent().unwrap();
    let p = Profile::default_sidecar();
    let ipt = pods::pod_with(&mut lab, "i", &p, Mode::Iptables, &[]).unwrap();
    pods::apply_iptables(&ipt, &p).unwrap();
    let smp = pods::pod_with(&mut lab, "s", &p, Mode::Sockmesh, &[]).unwrap();
    pods::apply_sockmesh(&lab, &smp, &p).unwrap();
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
    let mut lab = Lab::new("e2e").unwrap();
    if mode == Mode::Sockmesh {
        lab.start_agent().unwrap();
    }
    let p = Profile::default_sidecar();
    let pods = pods::two_pods(&mut lab, "x", mode).unwrap();
    for pod in [&pods.a, &pods.b] {
        match mode {
            Mode::Iptables => pods::apply_iptables(pod, &p).unwrap(),
            Mode::Sockmesh => {
                pods::apply_sockmesh(&lab, pod, &p).unwrap();
            }
        }
    }
    let kit = testkit_bin().unwrap();
    for (pod, name) in [(&pods.a, "A"), (&pods.b, "B")] {
        let mut cmd = pods::as_user(&lab, pod, 1337, &kit).unwrap();
        cmd.args(["proxy", "--name", name]);
        lab.spawn(cmd, Some("ready")).unwrap();
    }
    let mut app = lab.command(&pods.b.ns, pods.b.in_cgroup, &kit).unwrap();
    app.args(["listen", "b-app@0.0.0.0:8080"]);
    lab.spawn(app, Some("ready")).unwrap();

    let mut cmd = lab.command(&pods.a.ns, pods.a.in_cgroup, &kit).unwrap();
    cmd.args([
        "fetch",
        &format!("{POD_B_V4}:8080"),
        "--uid",
        "1000",
        "--gid",
        "1000",
    ]);
    let out = run(&mut cmd).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .map(|l| {
            l.split_whitespace()
                .map(|f| match f.split_once('=') {
                    Some((k @ ("peer" | "local"), v)) => {
                        let ip = v
                            .parse::<std::net::SocketAddr>()
                            .map(|a| a.ip().to_string());
                        format!("{k}={}", ip.unwrap_or_else(|_| v.to_string()))
                    }
                    _ => f.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
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
    let mut lab = Lab::new("tpx").unwrap();
    if mode == Mode::Sockmesh {
        lab.start_agent().unwrap();
    }
    let p = Profile {
        tproxy: true,
        ..Profile::default_sidecar()
    };
    let pod = pods::pod_with(&mut lab, "t", &p, mode, &[]).unwrap();
    match mode {
        Mode::Iptables => pods::apply_iptables(&pod, &p).unwrap(),
        Mode::Sockmesh => {
            pods::apply_sockmesh(&lab, &pod, &p).unwrap();
        }
    }
    let kit = testkit_bin().unwrap();
    let mut proxy = lab.command(&pod.ns, pod.in_cgroup, "setpriv").unwrap();
    proxy
        .args(["--regid=1337", "--clear-groups"])
        .arg(&kit)
        .args(["proxy", "--name", "P", "--tproxy-mark", "1337"]);
    lab.spawn(proxy, Some("ready")).unwrap();
    let mut app = lab.command(&pod.ns, pod.in_cgroup, &kit).unwrap();
    app.args(["listen", "app@0.0.0.0:8080"]);
    lab.spawn(app, Some("ready")).unwrap();

    let mut cmd = lab.command(&pod.peer, false, &kit).unwrap();
    cmd.args(["fetch", &format!("{POD_V4}:8080")]);
    let out = run(&mut cmd).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            l.split_whitespace()
                .filter(|f| !f.starts_with("other="))
                .map(|f| match f.split_once('=') {
                    Some((k @ "peer", v)) => {
                        let ip = v
                            .parse::<std::net::SocketAddr>()
                            .map(|a| a.ip().to_string());
                        format!("{k}={}", ip.unwrap_or_else(|_| v.to_string()))
                    }
                    _ => f.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
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
    let mut lab = Lab::new("reuse").unwrap();
    lab.start_agent().unwrap();
    let p = Profile::default_sidecar();
    let smp = pods::pod_with(&mut lab, "s", &p, Mode::Sockmesh, &[8080]).unwrap();
    pods::apply_sockmesh(&lab, &smp, &p).unwrap();
    let kit = testkit_bin().unwrap();
    // Two workers on 15006 with SO_REUSEPORT, as Envoy runs them.
    let mut workers = Vec::new();
    for name in ["w1", "w2"] {
        let mut cmd = lab.command(&smp.ns, true, &kit).unwrap();
        cmd.args(["listen", &format!("r/{name}@0.0.0.0:15006")]);
        workers.push(lab.spawn(cmd, Some("ready")).unwrap());
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

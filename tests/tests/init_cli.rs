//! `sockmesh init istio` and the agent from the outside: flag precedence, bad input, an agent
//! that is not running, unregistering, the istio-iptables name, no NET_ADMIN, and capture that
//! outlives the agent.

use std::process::{Command, Output};

use sockmesh_tests::{
    lab::{run, sockmesh_bin, value_of, Lab},
    pods::{self, Case, Mode, Pod, CALLERS, PEER_V4},
    profiles::Profile,
};

fn dump(lab: &Lab) -> serde_json::Value {
    lab.dump().unwrap()
}

fn registered(lab: &Lab) -> usize {
    dump(lab)["pods"].as_array().unwrap().len()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The app's call to the peer: where does it land?
fn app_to_peer(lab: &Lab, pod: &Pod) -> String {
    let case = Case::new(CALLERS[0], format!("{PEER_V4}:80").parse().unwrap());
    pods::probe(lab, pod, &case).unwrap().landed()
}

/// A lab with its agent and an unregistered pod, listening as the suites' pods do.
fn lab_with_pod(tag: &str) -> (Lab, Pod, Profile) {
    let mut lab = Lab::with_agent(tag).unwrap();
    let p = Profile::default_sidecar();
    let pod = pods::pod(&mut lab, "a", &p, Mode::Sockmesh).unwrap();
    (lab, pod, p)
}

#[test]
fn flags_beat_environment_and_dry_run_registers_nothing() {
    let (lab, pod, _) = lab_with_pod("cli");
    // `init istio --dry-run` with `flags` and INBOUND_CAPTURE_PORT=17000: the settings it shows.
    let dry_run = |flags: &[&str]| {
        let out = run(lab
            .sockmesh_in(&pod.ns)
            .unwrap()
            .args(["init", "istio", "--dry-run"])
            .args(flags)
            .env("INBOUND_CAPTURE_PORT", "17000"))
        .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let text = dry_run(&["-i", "*"]);
    assert_eq!(value_of(&text, "-z (inbound capture port)"), "17000");
    assert!(text.contains("redirect :15001"), "{text}");

    let text = dry_run(&["-z", "16000"]);
    assert_eq!(value_of(&text, "-z (inbound capture port)"), "16000");
    assert_eq!(registered(&lab), 0, "--dry-run registered something");
    assert_eq!(app_to_peer(&lab, &pod), "peer:80");
}

#[test]
fn bad_input_is_refused_in_one_line_and_registers_nothing() {
    let (lab, pod, _) = lab_with_pod("bad");
    /// Arguments, environment, and the flag the error must name.
    type BadInput<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[BadInput] = &[
        (&["-q", "80,http"], &[], "-q:"),
        (&["-o", "70000"], &[], "-o:"),
        (&["-p", "0"], &[], "-p:"),
        (&["-i", "10.0.0.0/8,not-a-cidr"], &[], "-i:"),
        (&["-x", "10.0.0.0"], &[], "-x:"),
        (&["-x", "*"], &[], "-x:"),
        (&["-i", "192.0.2.0/33"], &[], "-i:"),
        (&["-u", "no-such-user-anywhere"], &[], "-u:"),
        (&["-g", "1337,x y"], &[], "-g:"),
        (&["--no-such-flag"], &[], "--no-such-flag:"),
        (&["-Z", "1"], &[], "-Z:"),
        (&["-m", "TPROXY", "-r", "table"], &[], "-r:"),
        (
            &["--redirect-dns"],
            &[("SOCKMESH_RESOLV_CONF", "/nonexistent/resolv.conf")],
            "--redirect-dns:",
        ),
        (
            &[],
            &[
                ("ISTIO_META_DNS_CAPTURE", "true"),
                ("SOCKMESH_RESOLV_CONF", "/nonexistent"),
            ],
            "--redirect-dns:",
        ),
        (&["--capture-all-dns=maybe"], &[], "--capture-all-dns"),
        (&[], &[("INBOUND_CAPTURE_PORT", "abc")], "-z:"),
        (
            &[],
            &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.1/32")],
            "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR:",
        ),
        (
            &[],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS", "no-such-group-anywhere")],
            "ISTIO_OUTBOUND_OWNER_GROUPS:",
        ),
        (&[], &[("ISTIO_DUAL_STACK", "maybe")], "ISTIO_DUAL_STACK:"),
    ];
    for (args, env, flag) in cases {
        let mut cmd = lab.sockmesh_in(&pod.ns).unwrap();
        cmd.args(["init", "istio", "-i", "*"]).args(*args);
        for (k, v) in *env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} {env:?} was accepted");
        assert_eq!(
            err.lines().count(),
            1,
            "{args:?} {env:?}: not one line: {err:?}"
        );
        let expected = format!("sockmesh init istio: {flag}");
        assert!(
            err.starts_with(&expected),
            "{args:?} {env:?}: {err:?} does not name {flag}"
        );
        assert_eq!(registered(&lab), 0, "{args:?} {env:?} left a registration");
    }
    assert_eq!(app_to_peer(&lab, &pod), "peer:80");
}

#[test]
fn an_agent_that_is_not_running_is_a_clear_error() {
    let mut lab = Lab::new("noag").unwrap();
    let p = Profile::default_sidecar();
    let pod = pods::pod(&mut lab, "a", &p, Mode::Sockmesh).unwrap();
    let missing = lab.dir.join("no-agent.sock");
    let out = lab
        .sockmesh_in(&pod.ns)
        .unwrap()
        .args(["init", "istio", "-i", "*", "--agent-socket"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cannot reach the sockmesh agent"), "{err}");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");
}

#[test]
fn cleanup_only_unregisters_and_capture_stops() {
    let (lab, pod, p) = lab_with_pod("clean");
    pods::apply_sockmesh(&lab, &pod, &p).unwrap();
    assert_eq!(app_to_peer(&lab, &pod), "pod:15001");
    assert_eq!(registered(&lab), 1);
    run(lab
        .sockmesh_in(&pod.ns)
        .unwrap()
        .args(["init", "istio", "--cleanup-only"]))
    .unwrap();
    assert_eq!(registered(&lab), 0);
    assert_eq!(app_to_peer(&lab, &pod), "peer:80");
    let d = dump(&lab);
    // No set entry of the pod survives its unregistration.
    assert!(d["pods"].as_array().unwrap().is_empty(), "{d}");
}

#[test]
fn invoked_as_istio_iptables_without_net_admin() {
    let (lab, pod, p) = lab_with_pod("name");
    let link = lab.dir.join("istio-iptables");
    std::os::unix::fs::symlink(sockmesh_bin().unwrap(), &link).unwrap();
    // setpriv drops every capability: the pod's init needs none (no NET_ADMIN, no NET_RAW).
    let mut cmd = lab.command(&pod.ns, false, "setpriv").unwrap();
    cmd.args([
        "--bounding-set=-all",
        "--inh-caps=-all",
        "--ambient-caps=-all",
    ])
    .arg(&link)
    .args(p.argv())
    .env("SOCKMESH_AGENT_SOCKET", &lab.socket);
    let out = run(&mut cmd).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("capture in force"));
    assert_eq!(app_to_peer(&lab, &pod), "pod:15001");
}

#[test]
fn unregistered_namespaces_and_the_agents_own_are_never_touched() {
    let (mut lab, a, p) = lab_with_pod("other");
    let b = pods::pod(&mut lab, "b", &p, Mode::Sockmesh).unwrap();
    pods::apply_sockmesh(&lab, &a, &p).unwrap();
    assert_eq!(app_to_peer(&lab, &a), "pod:15001");
    // b is in the same cgroup, with the programs attached, but not registered.
    assert_eq!(app_to_peer(&lab, &b), "peer:80");
    // Registering the agent's own (host) namespace is refused.
    let out = Command::new(sockmesh_bin().unwrap())
        .args(["init", "istio", "-i", "*", "--agent-socket"])
        .arg(&lab.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("refusing to capture the agent's own network namespace"),
        "{}",
        stderr(&out)
    );
    assert_eq!(registered(&lab), 1);
}

#[test]
fn capture_outlives_the_agent_and_a_restart_adopts_it() {
    let (mut lab, pod, p) = lab_with_pod("term");
    pods::apply_sockmesh(&lab, &pod, &p).unwrap();
    lab.stop_agent(libc::SIGTERM).unwrap();
    assert!(!lab.socket.exists(), "the socket outlived the agent");
    // Capture stays in force, and dump reads the pinned maps without the agent.
    assert_eq!(app_to_peer(&lab, &pod), "pod:15001");
    assert_eq!(registered(&lab), 1);
    // A new agent swaps the programs in place and keeps the registration.
    lab.start_agent().unwrap();
    assert!(lab.agent_log().contains("Updated"), "{}", lab.agent_log());
    assert_eq!(registered(&lab), 1);
    assert_eq!(app_to_peer(&lab, &pod), "pod:15001");
}

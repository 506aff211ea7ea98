//! Pods with a user namespace of their own (Kubernetes `hostUsers: false`): the pod's ids
//! 0..65535 are the host's 200000..265535. istio-iptables' `-u 1337` is read by iptables in
//! the user namespace that owns the pod's network namespace, so it matches host uid 201337;
//! sockmesh must decide the same way, or the proxy's own connections loop back into it.

use std::process::Command;

use sockmesh_tests::{
    lab::{run, value_of},
    pods::{self, Caller, Case, Mode, PEER_V4, POD_PORTS},
    profiles::Profile,
};

/// Where the pod's ids start on the host.
const BASE: u32 = 200_000;

/// The callers: the pod's proxy and app as the pod sees them (so, on the host, BASE + id), the
/// host's own uid 1337 (not the pod's proxy), and the pod's root.
const CALLERS: [Caller; 5] = [
    Caller::new("pod-proxy (1337 inside)", BASE + 1337, BASE + 1337),
    Caller::new("pod-app (1000 inside)", BASE + 1000, BASE + 1000),
    Caller::new("pod-app in the proxy's group", BASE + 1000, BASE + 1337),
    Caller::new("host uid 1337", 1337, 1337),
    Caller::new("pod root", BASE, BASE),
];

/// Where each caller's connection to the peer lands, with the pod captured by `mode`.
fn outcomes(mode: Mode) -> Vec<(String, String)> {
    let tag = match mode {
        Mode::Iptables => "unsi",
        Mode::Sockmesh => "unss",
    };
    let mut lab = pods::lab_for(tag, mode).unwrap();
    let ns = lab.netns_in_userns("up", BASE).unwrap();
    let p = Profile::default_sidecar();
    let pod = pods::pod_in(&mut lab, ns, "u", &p, mode, &POD_PORTS).unwrap();
    pods::capture(&lab, &pod, &p, mode).unwrap();
    let outcomes = CALLERS
        .iter()
        .map(|c| {
            let case = Case::new(*c, format!("{PEER_V4}:80").parse().unwrap());
            let o = pods::probe(&lab, &pod, &case).unwrap();
            (c.name.to_string(), o.landed())
        })
        .collect();
    if mode == Mode::Sockmesh {
        // explain takes the pod's own ids and maps them as the agent does.
        let text = explain(
            &lab,
            &pod.ns.path(),
            &["--uid", "1337", "tcp", &format!("{PEER_V4}:80")],
        );
        assert!(text.contains("kernel uid 201337"), "{text}");
        assert_eq!(value_of(&text, "verdict"), "pass: left alone", "{text}");
        let text = explain(
            &lab,
            &pod.ns.path(),
            &["--uid", "1000", "tcp", &format!("{PEER_V4}:80")],
        );
        assert_eq!(
            value_of(&text, "verdict"),
            "redirect to localhost:15001",
            "{text}"
        );
    }
    outcomes
}

fn explain(lab: &sockmesh_tests::lab::Lab, netns: &std::path::Path, args: &[&str]) -> String {
    sockmesh_tests::lab::explain(&lab.bpffs, netns, args).unwrap()
}

#[test]
fn owner_ids_are_read_in_the_pods_user_namespace_as_iptables_reads_them() {
    let iptables = outcomes(Mode::Iptables);
    let sockmesh = outcomes(Mode::Sockmesh);
    assert_eq!(iptables, sockmesh, "iptables vs sockmesh");
    let want = ["peer:80", "pod:15001", "peer:80", "pod:15001", "pod:15001"];
    for ((who, landed), want) in iptables.iter().zip(want) {
        assert_eq!(landed, want, "{who}");
    }
}

/// A proxy uid the pod's user namespace does not map: registration fails, naming the uid,
/// and nothing is captured.
#[test]
fn a_proxy_uid_the_pod_cannot_have_is_refused() {
    let mut lab = pods::lab_for("unsu", Mode::Sockmesh).unwrap();
    let ns = lab.netns_in_userns("up", BASE).unwrap();
    let p = Profile::default_sidecar();
    let pod = pods::pod_in(&mut lab, ns, "u", &p, Mode::Sockmesh, &POD_PORTS).unwrap();
    let mut cmd = lab.sockmesh_in(&pod.ns).unwrap();
    cmd.args([
        "init", "istio", "-p", "15001", "-z", "15006", "-u", "70000", "-m", "REDIRECT", "-i", "*",
        "-b", "*",
    ]);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "init succeeded: {err}");
    assert!(err.contains("maps no uid 70000"), "{err}");
    let dump = run(Command::new(sockmesh_tests::lab::sockmesh_bin().unwrap())
        .arg("dump")
        .arg("--bpffs")
        .arg(&lab.bpffs))
    .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("registered pods: 0"), "{dump}");
}

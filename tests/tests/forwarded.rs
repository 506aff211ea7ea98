//! `-k` for traffic forwarded *through* the pod: a "VM" behind the pod's `-k` interface (eth1,
//! the lab's second host, whose default route goes through the pod) calls remote addresses
//! on the pod's peer. Under istio-iptables (rules loaded by the real iptables-restore) nat
//! PREROUTING `-i eth1 [-d CIDR] -j ISTIO_REDIRECT` sends those connections to the outbound
//! port; under sockmesh the tc program on eth1 does. Both must land on the same listener with
//! the same SO_ORIGINAL_DST, client address and peer name; a destination the `-i` list leaves
//! alone reaches the remote directly under both.

use sockmesh_tests::{
    kit::Outcome,
    lab::{run, Lab},
    pods::{self, Caller, Case, Mode, Origin, Pod, PEER2, POD_ETH1, POD_V4},
    profiles::{self, Profile},
};

/// The agent's setting that turns on capture of forwarded connections (off by default).
fn forwarded_capture() -> Vec<String> {
    vec!["--forwarded-capture".into(), "on".into()]
}

fn profile(name: &str) -> Profile {
    profiles::all()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no profile {name}"))
}

/// Make the pod a router for its second host: forwarding on, the VM's default route through
/// the pod, and the peer's route back to the VM's network through the pod.
fn route_through(pod: &Pod) {
    run(pod.ns.exec("sysctl").args(["-qw", "net.ipv4.ip_forward=1"])).unwrap();
    let vm = pod.peer2.as_ref().expect("a second link");
    vm.ip(&["route", "add", "default", "via", POD_ETH1])
        .unwrap();
    pod.peer
        .ip(&["route", "add", "198.18.0.0/24", "via", POD_V4])
        .unwrap();
}

/// The VM's calls to `dsts`, under iptables and under sockmesh; each case's outcome under both.
fn forwarded(p: &Profile, dsts: &[&str]) -> Vec<(String, Outcome, Outcome)> {
    sockmesh_tests::lab::require_tools(&["ip", "iptables-restore", "sysctl"]).unwrap();
    let mut lab = Lab::new("fwd").unwrap();
    lab.agent_args = forwarded_capture();
    lab.start_agent().unwrap();
    // The outbound listener is IP_TRANSPARENT in both pods (Envoy's `transparent: true`): the
    // kernel sends a SYN-ACK from a non-local address only for such a listener (see
    // docs/design.md, "Interfaces"). It changes nothing under iptables' REDIRECT.
    let ipt = pods::pod_transparent(&mut lab, "i", p, Mode::Iptables, &[15001]).unwrap();
    pods::apply_iptables(&ipt, p).unwrap();
    route_through(&ipt);
    let smp = pods::pod_transparent(&mut lab, "s", p, Mode::Sockmesh, &[15001]).unwrap();
    pods::apply_sockmesh(&lab, &smp, p).unwrap();
    route_through(&smp);
    let vm = Caller {
        origin: Origin::Peer2,
        ..Caller::new("vm", 0, 0)
    };
    let mut out = Vec::new();
    for dst in dsts {
        let case = Case::new(vm, dst.parse().unwrap());
        let want = pods::probe(&lab, &ipt, &case).unwrap();
        let got = pods::probe(&lab, &smp, &case).unwrap();
        out.push((case.label(), want, got));
    }
    if std::env::var_os("SOCKMESH_TEST_VERBOSE").is_some() {
        for args in [
            &["bpftool", "net", "show"][..],
            &["bpftool", "link", "show"],
            &["ip", "-d", "link", "show", "eth1"],
            &["ip", "rule"],
            &["ip", "route", "show", "table", "all"],
        ] {
            let o = smp.ns.exec(args[0]).args(&args[1..]).output().unwrap();
            eprintln!(
                "{args:?}:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        eprintln!(
            "{:#}\nagent log:\n{}",
            lab.dump().unwrap()["pods"],
            lab.agent_log()
        );
    }
    let dump = lab.dump().unwrap();
    let live = dump["original_destinations"].as_array().unwrap();
    assert!(live.is_empty(), "records outlived their sockets: {live:?}");
    out
}

fn landed(o: &Outcome) -> Option<(&str, &str)> {
    match o {
        Outcome::Ok { listener, orig, .. } => Some((listener.as_str(), orig.as_str())),
        _ => None,
    }
}

/// Every case the same under both, and landed on `want` with original destination `orig`.
fn check(r: &[(String, Outcome, Outcome)], want: &[(&str, &str, &str)]) {
    for (label, ipt, smp) in r {
        assert_eq!(ipt, smp, "{label}: iptables {ipt:?}, sockmesh {smp:?}");
    }
    for (dst, listener, orig) in want {
        let (_, ipt, _) = r
            .iter()
            .find(|(l, _, _)| l.ends_with(dst))
            .unwrap_or_else(|| panic!("no case for {dst}"));
        assert_eq!(landed(ipt), Some((*listener, *orig)), "vm -> {dst}");
    }
}

#[test]
fn vm_calls_to_remote_addresses_go_to_the_outbound_port() {
    let r = forwarded(
        &profile("kube-virt-interface"),
        &["192.0.2.20:80", "198.51.100.10:8081"],
    );
    check(
        &r,
        &[
            ("192.0.2.20:80", "pod:15001", "192.0.2.20:80"),
            ("198.51.100.10:8081", "pod:15001", "198.51.100.10:8081"),
        ],
    );
    // The proxy sees the VM as the client under both (the same outcome, checked above).
    assert!(matches!(&r[0].1, Outcome::Ok { client_ip, .. } if client_ip.starts_with(PEER2)));
}

#[test]
fn with_an_include_list_only_listed_destinations_are_captured() {
    let r = forwarded(
        &profile("kube-virt-interface-cidrs"),
        &["198.51.100.10:80", "192.0.2.20:80"],
    );
    check(
        &r,
        &[
            ("198.51.100.10:80", "pod:15001", "198.51.100.10:80"),
            // Not in -i: forwarded to the peer untouched (which has no NAT record to read).
            ("192.0.2.20:80", "peer:80", "errno:2"),
        ],
    );
}

/// The pod's tcx link pins under the agent's bpffs folder, and its `-k` policy rule.
fn leftovers(lab: &Lab, pod: &Pod) -> (Vec<String>, bool) {
    let pins = std::fs::read_dir(lab.bpffs.join("links"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("tcx-"))
                .collect()
        })
        .unwrap_or_default();
    let rules = run(pod.ns.exec("ip").arg("rule")).unwrap();
    let rule = String::from_utf8_lossy(&rules.stdout).contains("lookup 15001");
    (pins, rule)
}

#[test]
fn a_missing_interface_registers_nothing_a_restart_keeps_it_and_unregistering_takes_it_away() {
    let p = profile("kube-virt-interface");
    let mut lab = Lab::new("fwdc").unwrap();
    lab.agent_args = forwarded_capture();
    lab.start_agent().unwrap();
    let pod = pods::pod_transparent(&mut lab, "s", &p, Mode::Sockmesh, &[15001]).unwrap();
    route_through(&pod);
    let vm = Caller {
        origin: Origin::Peer2,
        ..Caller::new("vm", 0, 0)
    };
    let case = Case::new(vm, "192.0.2.20:80".parse().unwrap());

    // -k naming an interface the pod does not have: a clear error, nothing of the pod captured.
    let mut bad = p.clone();
    bad.kube_virt_ifaces = vec!["eth1", "eth9"];
    let err = format!("{:#}", pods::apply_sockmesh(&lab, &pod, &bad).unwrap_err());
    assert!(err.contains("eth9"), "{err}");
    assert!(lab.dump().unwrap()["pods"].as_array().unwrap().is_empty());
    assert_eq!(leftovers(&lab, &pod), (vec![], false));
    let direct = pods::probe(&lab, &pod, &case).unwrap();
    assert_eq!(direct.listener(), Some("peer:80"), "{direct:?}");

    pods::apply_sockmesh(&lab, &pod, &p).unwrap();
    let (pins, rule) = leftovers(&lab, &pod);
    assert_eq!((pins.len(), rule), (1, true), "{pins:?}");
    let captured = pods::probe(&lab, &pod, &case).unwrap();
    assert_eq!(landed(&captured), Some(("pod:15001", "192.0.2.20:80")));

    // SIGTERM leaves capture in force; a new agent switches the tcx link to its program.
    lab.stop_agent(libc::SIGTERM).unwrap();
    let during = pods::probe(&lab, &pod, &case).unwrap();
    assert_eq!(landed(&during), Some(("pod:15001", "192.0.2.20:80")));
    lab.agent_args = forwarded_capture();
    lab.start_agent().unwrap();
    assert!(
        lab.agent_log()
            .contains("-k interface programs of registered pods replaced in place"),
        "{}",
        lab.agent_log()
    );
    let (pins, rule) = leftovers(&lab, &pod);
    assert_eq!((pins.len(), rule), (1, true), "{pins:?}");
    let restarted = pods::probe(&lab, &pod, &case).unwrap();
    assert_eq!(landed(&restarted), Some(("pod:15001", "192.0.2.20:80")));

    // --cleanup-only: the tc program and the policy route go; the VM's calls go around again.
    run(lab
        .sockmesh_in(&pod.ns)
        .unwrap()
        .args(["init", "istio", "--cleanup-only"]))
    .unwrap();
    assert_eq!(leftovers(&lab, &pod), (vec![], false));
    let after = pods::probe(&lab, &pod, &case).unwrap();
    assert_eq!(after.listener(), Some("peer:80"), "{after:?}");
}

/// The departure (docs/design.md): with an outbound listener that is not IP_TRANSPARENT the
/// kernel has no route for the SYN-ACK from the original destination, so the forwarded
/// connection is assigned, counted, and times out (istio-iptables' REDIRECT needs no such
/// listener). It is never forwarded around the proxy.
#[test]
fn an_outbound_listener_that_is_not_transparent_gets_nothing() {
    let p = profile("kube-virt-interface");
    let mut lab = Lab::new("fwdt").unwrap();
    lab.agent_args = forwarded_capture();
    lab.start_agent().unwrap();
    let pod = pods::pod(&mut lab, "s", &p, Mode::Sockmesh).unwrap();
    pods::apply_sockmesh(&lab, &pod, &p).unwrap();
    route_through(&pod);
    let vm = Caller {
        origin: Origin::Peer2,
        ..Caller::new("vm", 0, 0)
    };
    let case = Case::new(vm, "192.0.2.20:80".parse().unwrap());
    let o = pods::probe(&lab, &pod, &case).unwrap();
    assert_eq!(o, Outcome::Timeout);
    let dump = lab.dump().unwrap();
    let n = &dump["pods"][0]["counters"]["kube_virt_redirect"];
    assert!(n.as_u64().unwrap_or(0) >= 1, "{dump:#}");
}

/// A pod whose netns is gone: its interfaces took the tc links with them, and the agent drops
/// their pins when it forgets the pod (here at its next start).
#[test]
fn a_pod_whose_netns_is_gone_leaves_no_tc_link() {
    let p = profile("kube-virt-interface");
    let mut lab = Lab::new("fwdg").unwrap();
    lab.agent_args = forwarded_capture();
    lab.start_agent().unwrap();
    // No process in the pod, so deleting its netns destroys it.
    let pod = pods::captured(&mut lab, "s", &p, Mode::Sockmesh, &[]).unwrap();
    assert_eq!(leftovers(&lab, &pod).0.len(), 1);
    lab.stop_agent(libc::SIGTERM).unwrap();
    let (peer, vm) = (pod.peer.clone(), pod.peer2.clone().expect("a second link"));
    lab.remove_netns(&pod.ns).unwrap();
    lab.remove_netns(&peer).unwrap();
    lab.remove_netns(&vm).unwrap();
    // The kernel destroys a namespace in the background.
    std::thread::sleep(std::time::Duration::from_secs(2));
    lab.agent_args = forwarded_capture();
    lab.start_agent().unwrap();
    let pins: Vec<String> = std::fs::read_dir(lab.bpffs.join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("tcx-") || n.starts_with("sk_lookup-"))
        .collect();
    assert!(pins.is_empty(), "{pins:?}\n{}", lab.agent_log());
    assert!(lab.dump().unwrap()["pods"].as_array().unwrap().is_empty());
}

/// The agent's default (`--forwarded-capture off`): a VM's call to a remote address is
/// forwarded untouched, reaching the remote itself, as before the setting existed.
#[test]
fn with_forwarded_capture_off_a_vm_reaches_the_remote_directly() {
    let p = profile("kube-virt-interface");
    let mut lab = Lab::new("fwdo").unwrap();
    lab.start_agent().unwrap();
    let pod = pods::pod_transparent(&mut lab, "s", &p, Mode::Sockmesh, &[15001]).unwrap();
    pods::apply_sockmesh(&lab, &pod, &p).unwrap();
    route_through(&pod);
    let vm = Caller {
        origin: Origin::Peer2,
        ..Caller::new("vm", 0, 0)
    };
    let case = Case::new(vm, "192.0.2.20:80".parse().unwrap());
    let o = pods::probe(&lab, &pod, &case).unwrap();
    assert_eq!(o.listener(), Some("peer:80"), "{o:?}");
}

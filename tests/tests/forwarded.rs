//! `-k` for traffic forwarded *through* the pod: a "VM" behind the pod's `-k` interface (eth1,
//! the lab's second host, whose default route goes through the pod) calls remote addresses
//! on the pod's peer. Under istio-iptables (rules loaded by the real iptables-restore) nat
//! PREROUTING `-i eth1 [-d CIDR] -j ISTIO_REDIRECT` sends those connections to the outbound
//! port; under sockmesh the tc program on eth1 does. Both must land on the same listener with
//! the same SO_ORIGINAL_DST, client address and peer name; a destination the `-i` list leaves
//! alone reaches the remote directly under both, and with no proxy listening both refuse.
//! The proxy's listener is a plain one, as Envoy's outbound listener in REDIRECT mode.

use sockmesh_tests::{
    kit::Outcome,
    lab::{run, Lab},
    pods::{self, Caller, Case, Mode, Origin, Pod, PEER2, POD_ETH1, POD_PORTS, POD_V4, POD_V6},
    profiles::{self, Profile},
};

fn profile(name: &str) -> Profile {
    profiles::all()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no profile {name}"))
}

/// Make the pod a router for its second host: forwarding on, the VM's default route through
/// the pod, and the peer's route back to the VM's network through the pod; for a profile with
/// IPv6 rules, the same in IPv6 (the pod's and the VM's addresses on that link first, before
/// the pod is registered: the agent reads the pod's routes then).
fn route_through(pod: &Pod, p: &Profile) {
    run(pod.ns.exec("sysctl").args(["-qw", "net.ipv4.ip_forward=1"])).unwrap();
    let vm = pod.peer2.as_ref().expect("a second link");
    vm.ip(&["route", "add", "default", "via", POD_ETH1])
        .unwrap();
    pod.peer
        .ip(&["route", "add", "198.18.0.0/24", "via", POD_V4])
        .unwrap();
    if p.ipv6_rules() {
        run(pod
            .ns
            .exec("sysctl")
            .args(["-qw", "net.ipv6.conf.all.forwarding=1"]))
        .unwrap();
        let on_link = |ns: &sockmesh_tests::lab::Netns, addr: &str, dev: &str| {
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                dev,
                "nodad",
            ])
            .unwrap();
        };
        on_link(&pod.ns, POD_ETH1_V6, "eth1");
        on_link(vm, VM_V6, "eth0");
        vm.ip(&["-6", "route", "add", "default", "via", POD_ETH1_V6])
            .unwrap();
        pod.peer
            .ip(&["-6", "route", "add", "2001:db8:18::/64", "via", POD_V6])
            .unwrap();
    }
}

/// The pod's and the VM's IPv6 addresses on the `-k` link.
const POD_ETH1_V6: &str = "2001:db8:18::10";
const VM_V6: &str = "2001:db8:18::20";

/// The VM's calls to `dsts`, under iptables and under sockmesh, with the pods listening on
/// `pod_ports`; each case's outcome under both.
fn forwarded(p: &Profile, pod_ports: &[u16], dsts: &[&str]) -> Vec<(String, Outcome, Outcome)> {
    sockmesh_tests::lab::require_tools(&["ip", "iptables-restore", "sysctl"]).unwrap();
    let mut lab = Lab::new("fwd").unwrap();
    lab.start_agent().unwrap();
    let ipt = pods::pod_with(&mut lab, "i", p, Mode::Iptables, pod_ports).unwrap();
    route_through(&ipt, p);
    pods::apply_iptables(&ipt, p).unwrap();
    let smp = pods::pod_with(&mut lab, "s", p, Mode::Sockmesh, pod_ports).unwrap();
    route_through(&smp, p);
    pods::apply_sockmesh(&lab, &smp, p).unwrap();
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
        &POD_PORTS,
        &["192.0.2.20:80", "198.51.100.10:8081", "198.18.0.10:8080"],
    );
    check(
        &r,
        &[
            ("192.0.2.20:80", "pod:15001", "192.0.2.20:80"),
            ("198.51.100.10:8081", "pod:15001", "198.51.100.10:8081"),
            // The pod's own address on the -k interface (sk_lookup's case): outbound too.
            ("198.18.0.10:8080", "pod:15001", "198.18.0.10:8080"),
        ],
    );
    // The proxy sees the VM as the client under both (the same outcome, checked above).
    assert!(matches!(&r[0].1, Outcome::Ok { client_ip, .. } if client_ip.starts_with(PEER2)));
}

#[test]
fn with_an_include_list_only_listed_destinations_are_captured() {
    let r = forwarded(
        &profile("kube-virt-interface-cidrs"),
        &POD_PORTS,
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

/// In TPROXY mode mangle PREROUTING's ISTIO_INBOUND sees the VM's connection before nat's
/// `-k` rule, and the inbound listener its TPROXY picked keeps it: a VM's call goes to the
/// inbound port. Only a port ISTIO_INBOUND returns (an excluded inbound port) meets the `-k`
/// rule and goes to the outbound port.
#[test]
fn in_tproxy_mode_vm_calls_go_where_mangle_sends_them_first() {
    let p = Profile {
        name: "kube-virt-interface-tproxy",
        tproxy: true,
        inbound_exclude: vec![15090],
        ..profile("kube-virt-interface")
    };
    let own = format!("{POD_ETH1}:8080");
    let r = forwarded(&p, &POD_PORTS, &["192.0.2.20:80", "192.0.2.20:15090", &own]);
    check(
        &r,
        &[
            ("192.0.2.20:80", "pod:15006", "192.0.2.20:80"),
            ("192.0.2.20:15090", "pod:15001", "192.0.2.20:15090"),
            // The pod's own address on the -k interface: sk_lookup decides it, the same way.
            (&own, "pod:15006", &own),
        ],
    );
}

/// A dual-stack pod with IPv6 rules: a VM's IPv6 calls through the pod go to the outbound
/// port too, with the same SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST) under both, and its IPv4
/// calls as before.
#[test]
fn ipv6_vm_calls_go_to_the_outbound_port() {
    let p = Profile {
        name: "kube-virt-interface-dual-stack",
        pod_v4: true,
        pod_v6: true,
        dual_stack: true,
        ..profile("kube-virt-interface")
    };
    assert!(p.ipv6_rules());
    let r = forwarded(&p, &POD_PORTS, &["[2001:db8::20]:80", "192.0.2.20:80"]);
    check(
        &r,
        &[
            ("[2001:db8::20]:80", "pod:15001v6", "[2001:db8::20]:80"),
            ("192.0.2.20:80", "pod:15001", "192.0.2.20:80"),
        ],
    );
}

/// No proxy on the outbound port: the VM's connection is refused under both (REDIRECT's RST
/// from the pod, translated back), never sent around the proxy to the remote.
#[test]
fn with_no_proxy_listening_a_vm_call_is_refused_not_forwarded() {
    let r = forwarded(&profile("kube-virt-interface"), &[8080], &["192.0.2.20:80"]);
    let (label, ipt, smp) = &r[0];
    assert_eq!(ipt, smp, "{label}: iptables {ipt:?}, sockmesh {smp:?}");
    assert_eq!(*smp, Outcome::Refused, "{label}");
}

/// The pod's tcx link pins under the agent's bpffs folder, and whether a policy rule of the
/// earlier design (`lookup 15001`) is in the pod: there must be none.
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
    lab.start_agent().unwrap();
    let pod = pods::pod(&mut lab, "s", &p, Mode::Sockmesh).unwrap();
    route_through(&pod, &p);
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
    assert_eq!((pins.len(), rule), (2, false), "{pins:?}");
    let captured = pods::probe(&lab, &pod, &case).unwrap();
    assert_eq!(landed(&captured), Some(("pod:15001", "192.0.2.20:80")));

    // SIGTERM leaves capture in force; a new agent switches the tcx link to its program.
    lab.stop_agent(libc::SIGTERM).unwrap();
    let during = pods::probe(&lab, &pod, &case).unwrap();
    assert_eq!(landed(&during), Some(("pod:15001", "192.0.2.20:80")));
    lab.start_agent().unwrap();
    assert!(
        lab.agent_log()
            .contains("-k interface programs of registered pods replaced in place"),
        "{}",
        lab.agent_log()
    );
    let (pins, rule) = leftovers(&lab, &pod);
    assert_eq!((pins.len(), rule), (2, false), "{pins:?}");
    let restarted = pods::probe(&lab, &pod, &case).unwrap();
    assert_eq!(landed(&restarted), Some(("pod:15001", "192.0.2.20:80")));

    // --cleanup-only: the tc programs go; the VM's calls reach the remote again.
    run(lab
        .sockmesh_in(&pod.ns)
        .unwrap()
        .args(["init", "istio", "--cleanup-only"]))
    .unwrap();
    assert_eq!(leftovers(&lab, &pod), (vec![], false));
    let after = pods::probe(&lab, &pod, &case).unwrap();
    assert_eq!(after.listener(), Some("peer:80"), "{after:?}");
}

/// A pod whose netns is gone: its interfaces took the tc links with them, and the agent drops
/// their pins when it forgets the pod (here at its next start).
#[test]
fn a_pod_whose_netns_is_gone_leaves_no_tc_link() {
    let p = profile("kube-virt-interface");
    let mut lab = Lab::new("fwdg").unwrap();
    lab.start_agent().unwrap();
    // No process in the pod, so deleting its netns destroys it.
    let pod = pods::captured(&mut lab, "s", &p, Mode::Sockmesh, &[]).unwrap();
    assert_eq!(leftovers(&lab, &pod).0.len(), 2);
    lab.stop_agent(libc::SIGTERM).unwrap();
    let (peer, vm) = (pod.peer.clone(), pod.peer2.clone().expect("a second link"));
    lab.remove_netns(&pod.ns).unwrap();
    lab.remove_netns(&peer).unwrap();
    lab.remove_netns(&vm).unwrap();
    // The kernel destroys a namespace in the background.
    std::thread::sleep(std::time::Duration::from_secs(2));
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

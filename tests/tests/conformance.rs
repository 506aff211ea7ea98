//! Conformance: every case runs in a pod captured by istio-iptables' rules loaded with the real
//! iptables-restore, and in a pod captured by sockmesh, in fresh namespaces. Both must land on
//! the same listener, report the same SO_ORIGINAL_DST, and show the app the same peer.

use std::net::SocketAddr;

use sockmesh_tests::{
    kit::{Connect, Hold, Identity, Outcome},
    lab::{run, Lab, Place},
    pods::{self, Mode, Pod, POD_V4},
    profiles::{self, Profile},
};

fn profile(name: &str) -> Profile {
    profiles::all()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no profile {name}"))
}

fn listener(o: &Outcome) -> Option<(&str, &str)> {
    match o {
        Outcome::Ok { listener, orig, .. } => Some((listener.as_str(), orig.as_str())),
        _ => None,
    }
}

/// Case `label` of the reference `r` landed on `want`.
fn lands(r: &[(String, Outcome)], label: &str, want: &str) {
    assert_eq!(outcome(r, label).listener(), Some(want), "{label}");
}

/// Case `label` of the reference `r` landed on `want` with original destination `orig`.
fn lands_with(r: &[(String, Outcome)], label: &str, want: &str, orig: &str) {
    assert_eq!(listener(outcome(r, label)), Some((want, orig)), "{label}");
}

/// Run every case of `p` both ways; return the iptables outcomes for extra checks.
fn conformance(p: &Profile) -> Vec<(String, Outcome)> {
    conformance_with(p, &[]).0
}

/// A lab whose agent runs with `agent_args`, and two pods with profile `p`: one with
/// istio-iptables' rules loaded by the real iptables, one registered with sockmesh.
fn pod_pair(p: &Profile, agent_args: &[&str]) -> (Lab, Pod, Pod) {
    sockmesh_tests::lab::require_tools(&["ip", "iptables-restore", "ip6tables-restore"]).unwrap();
    let mut lab = Lab::new("conf").unwrap();
    lab.agent_args = agent_args.iter().map(|a| a.to_string()).collect();
    lab.start_agent().unwrap();
    let ipt = pods::pod(&mut lab, "i", p, Mode::Iptables).unwrap();
    pods::apply_iptables(&ipt, p).unwrap();
    let smp = pods::pod(&mut lab, "s", p, Mode::Sockmesh).unwrap();
    pods::apply_sockmesh(&lab, &smp, p).unwrap();
    (lab, ipt, smp)
}

/// [`conformance`] with the agent started with `agent_args`; also the lab (its agent's log).
fn conformance_with(p: &Profile, agent_args: &[&str]) -> (Vec<(String, Outcome)>, Lab) {
    let (lab, ipt, smp) = pod_pair(p, agent_args);

    let mut diffs = Vec::new();
    let mut reference = Vec::new();
    let outbound = pods::cases(p);
    let inbound = pods::inbound_cases(p);
    let cases: Vec<&pods::Case> = outbound.iter().chain(&inbound).collect();
    for case in cases.iter().copied() {
        let want = pods::probe(&lab, &ipt, case).unwrap();
        let got = pods::probe(&lab, &smp, case).unwrap();
        if want != got {
            diffs.push(format!(
                "  {}\n    iptables: {want:?}\n    sockmesh: {got:?}",
                case.label()
            ));
        }
        if std::env::var_os("SOCKMESH_TEST_VERBOSE").is_some() {
            eprintln!("{:<48} {want:?}", case.label());
        }
        reference.push((case.label(), want));
    }
    assert!(
        diffs.is_empty(),
        "profile {}: {} of {} cases differ from istio-iptables:\n{}\nagent log:\n{}",
        p.name,
        diffs.len(),
        cases.len(),
        diffs.join("\n"),
        lab.agent_log()
    );
    // The reference itself must have captured something, or the comparison proves nothing.
    let captured = reference
        .iter()
        .filter(|(_, o)| listener(o).is_some_and(|(l, _)| l.starts_with("pod:1500")))
        .count();
    assert!(
        captured > 0,
        "profile {}: istio-iptables captured nothing",
        p.name
    );

    // Original-destination records leave with their sockets: every probe has closed.
    let dump = lab.dump().unwrap();
    let live = dump["original_destinations"].as_array().unwrap();
    assert!(live.is_empty(), "records outlived their sockets: {live:?}");
    assert_eq!(dump["pods"].as_array().unwrap().len(), 1, "{dump}");
    (reference, lab)
}

/// A TCP connect that fails before its SYN (no local port free for it) leaves nothing that a
/// later connect of the same socket would take for its own: the socket then connects to the
/// app's own port, which neither iptables nor sockmesh captures, and the listener's
/// SO_ORIGINAL_DST and the app's peer are its own, as under iptables.
#[test]
fn a_connect_that_failed_before_its_syn_leaves_no_record() {
    sockmesh_tests::lab::require_tools(&["sysctl"]).unwrap();
    let (mut lab, ipt, smp) = pod_pair(&profile("default-sidecar"), &[]);
    let peer: SocketAddr = format!("{}:80", pods::PEER_V4).parse().unwrap();
    let own: SocketAddr = format!("{POD_V4}:8080").parse().unwrap();
    let mut outcomes = Vec::new();
    for pod in [&ipt, &smp] {
        // One local port, held by a captured connection to `peer`.
        run(pod
            .ns
            .exec("sysctl")
            .args(["-w", "net.ipv4.ip_local_port_range=40000 40000"]))
        .unwrap();
        let place = Place::new(&pod.ns, pod.in_cgroup);
        let holder = Hold {
            dst: peer,
            count: 1,
            listen: None,
            keep: true,
            id: Identity::APP,
        };
        let cmd = lab.testkit(place, &holder).unwrap();
        let held = lab.spawn(cmd, Some("\"opened\":1")).unwrap();
        let retry = Connect {
            first: Some(peer),
            ..Connect::new(own, Identity::APP)
        };
        outcomes.push(pods::connect(&lab, Place::new(&pod.ns, pod.in_cgroup), &retry).unwrap());
        lab.kill(held).unwrap();
    }
    agree_on(&lab, &outcomes, ("pod:8080", "192.0.2.10:8080"));
}

/// A case's outcomes in a pod pair, iptables' first: iptables' landed on `want` (listener and
/// original destination), and sockmesh's is the same.
fn agree_on(lab: &Lab, outcomes: &[Outcome], want: (&str, &str)) {
    let (ipt, sm) = (&outcomes[0], &outcomes[1]);
    assert_eq!(listener(ipt), Some(want), "iptables: {ipt:?}");
    assert_eq!(
        ipt,
        sm,
        "iptables: {ipt:?}\nsockmesh: {sm:?}\n{}",
        lab.agent_log()
    );
}

/// TCP Fast Open without a cookie (`net.ipv4.tcp_fastopen` 5) defers a connect's SYN to its
/// first write; meanwhile the app connects another socket from the same thread. Both are
/// captured, and the deferred connection reaches the proxy with its own original destination,
/// as under iptables: sockmesh's connect programs leave each record in the task's slot for
/// sock_ops as the SYN goes out, so the second connect parks the first's record, and the first
/// SYN takes it back (the parked record leaves the map then).
#[test]
fn a_fast_open_syn_deferred_behind_another_connect_keeps_its_destination() {
    let lab = fast_open_behind_another(&[]);
    let parked = pinned_map(&lab, "SM_PARKED");
    assert_eq!(parked[0]["value"][0], "0x01", "SM_PARKED: {parked:?}");
}

/// [`a_fast_open_syn_deferred_behind_another_connect_keeps_its_destination`] where the agent
/// finds no kernel BTF, as on kernels whose connect and sock_ops programs cannot use task
/// storage (before 6.16): the records go through `SM_CONNECTING` by socket cookie, and none is
/// parked.
#[test]
fn a_fast_open_syn_deferred_behind_another_connect_without_task_storage() {
    let lab = fast_open_behind_another(&["--kernel-btf", "/nonexistent/vmlinux"]);
    let log = std::fs::read_to_string(lab.agent_log_path()).unwrap();
    assert!(
        log.contains("keep their records in SM_CONNECTING until established"),
        "{log}"
    );
    let parked = pinned_map(&lab, "SM_PARKED");
    assert_eq!(parked[0]["value"][0], "0x00", "SM_PARKED: {parked:?}");
}

/// The Fast Open case of both tests above, in a pod pair whose agent runs with `agent_args`:
/// iptables and sockmesh agree, the deferred connection lands on the outbound port with its own
/// destination, and no record is left in `SM_CONNECTING`.
fn fast_open_behind_another(agent_args: &[&str]) -> Lab {
    sockmesh_tests::lab::require_tools(&["sysctl", "bpftool"]).unwrap();
    let (lab, ipt, smp) = pod_pair(&profile("default-sidecar"), agent_args);
    let deferred: SocketAddr = format!("{}:80", pods::PEER_V4).parse().unwrap();
    let meanwhile: SocketAddr = format!("{}:9090", pods::PEER_V4).parse().unwrap();
    let mut outcomes = Vec::new();
    for pod in [&ipt, &smp] {
        run(pod
            .ns
            .exec("sysctl")
            .args(["-w", "net.ipv4.tcp_fastopen=5"]))
        .unwrap();
        let c = Connect {
            fastopen_behind: Some(meanwhile),
            ..Connect::new(deferred, Identity::APP)
        };
        outcomes.push(pods::connect(&lab, Place::new(&pod.ns, pod.in_cgroup), &c).unwrap());
    }
    agree_on(&lab, &outcomes, ("pod:15001", "192.0.2.20:80"));
    let left = pinned_map(&lab, "SM_CONNECTING");
    assert!(left.is_empty(), "records left in SM_CONNECTING: {left:?}");
    lab
}

/// The entries of the lab's pinned map `name` (bpftool's JSON, keys and values as bytes).
fn pinned_map(lab: &Lab, name: &str) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(lab.bpffs.join("maps").join(name))
        .output()
        .expect("bpftool");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    v.as_array().expect("a list of entries").clone()
}

fn outcome<'a>(r: &'a [(String, Outcome)], label: &str) -> &'a Outcome {
    &r.iter()
        .find(|(l, _)| l == label)
        .unwrap_or_else(|| panic!("no case {label}"))
        .1
}

/// Without the kernel's BTF the connect programs cannot read a socket's creator from the
/// socket: `sock_create` records it for every socket instead, and every case still lands as
/// under istio-iptables, a socket made by root and connected as the proxy's uid included.
#[test]
fn default_sidecar_without_the_kernels_btf() {
    let (r, lab) = conformance_with(
        &profile("default-sidecar"),
        &["--kernel-btf", "/nonexistent/vmlinux"],
    );
    let log = std::fs::read_to_string(lab.agent_log_path()).unwrap();
    assert!(
        log.contains("the kernel's BTF does not place a socket's creator"),
        "{log}"
    );
    // iptables' owner match sees the socket's creator (root), not the proxy's uid: captured.
    let root_socket = format!("proxy-on-a-root-socket -> {}:80", pods::PEER_V4);
    lands_with(&r, &root_socket, "pod:15001", "192.0.2.20:80");
}

#[test]
fn default_sidecar() {
    let r = conformance(&profile("default-sidecar"));
    // Anchors from istio-iptables' documented behaviour, independent of both implementations.
    let peer = format!("app -> {}:80", pods::PEER_V4);
    lands_with(&r, &peer, "pod:15001", "192.0.2.20:80");
    let own = format!("proxy-uid -> {POD_V4}:8080");
    lands_with(&r, &own, "pod:15006", "192.0.2.10:8080");
    let app_own = format!("app -> {POD_V4}:8080");
    lands(&r, &app_own, "pod:8080");
    lands_with(
        &r,
        "proxy-uid -> 127.0.0.2:8080",
        "pod:15006",
        "127.0.0.2:8080",
    );
    let gid_only = format!("proxy-gid-only -> {}:80", pods::PEER_V4);
    lands(&r, &gid_only, "peer:80");
}

#[test]
fn exclude_ports_and_cidrs() {
    conformance(&profile("exclude-ports-and-cidrs"));
}

#[test]
fn include_cidrs() {
    conformance(&profile("include-cidrs"));
}

#[test]
fn include_cidrs_long() {
    conformance(&profile("include-cidrs-long"));
}

#[test]
fn outbound_ports() {
    conformance(&profile("outbound-ports"));
}

#[test]
fn owner_groups_include() {
    conformance(&profile("owner-groups-include"));
}

#[test]
fn owner_groups_exclude() {
    conformance(&profile("owner-groups-exclude"));
}

#[test]
fn loopback_cidr() {
    conformance(&profile("loopback-cidr"));
}

#[test]
fn loopback_include() {
    conformance(&profile("loopback-include"));
}

#[test]
fn multi_uid_gid() {
    conformance(&profile("multi-uid-gid"));
}

#[test]
fn inbound_ports_list() {
    let r = conformance(&profile("inbound-ports-list"));
    lands_with(
        &r,
        &format!("peer -> {POD_V4}:9090"),
        "pod:15006",
        "192.0.2.10:9090",
    );
    lands(&r, &format!("peer -> {POD_V4}:22"), "pod:22");
}

#[test]
fn ipv6_dual_stack() {
    let r = conformance(&profile("ipv6-dual-stack"));
    lands_with(
        &r,
        &format!("app -> [{}]:80", pods::PEER_V6),
        "pod:15001v6",
        "[2001:db8::20]:80",
    );
}

#[test]
fn ipv6_only_pod() {
    conformance(&profile("ipv6-only-pod"));
}

#[test]
fn dns_capture_all() {
    let r = conformance(&profile("dns-capture-all"));
    lands_with(
        &r,
        &format!("app -> {}:53 (udp, connected)", pods::PEER_V4),
        "dns-proxy",
        "udp",
    );
}

#[test]
fn dns_resolv_conf() {
    let r = conformance(&profile("dns-resolv-conf"));
    // The resolv.conf server is captured, and its answer comes from the server asked.
    match outcome(
        &r,
        &format!("app -> {}:53 (udp, unconnected)", pods::PEER_V4),
    ) {
        Outcome::Ok {
            listener, peername, ..
        } => {
            assert_eq!(listener, "dns-proxy");
            assert_eq!(peername, "192.0.2.20:53");
        }
        other => panic!("{other:?}"),
    }
    // Another server is not; over tcp it falls through to the outbound port.
    lands(&r, "app -> 198.51.100.10:53 (udp, connected)", "peer:53");
    lands(&r, "app -> 198.51.100.10:53", "pod:15001");
}

#[test]
fn dns_resolv_conf_v6() {
    conformance(&profile("dns-resolv-conf-v6"));
}

#[test]
fn dns_no_servers() {
    conformance(&profile("dns-no-servers"));
}

#[test]
fn exclude_interface() {
    let r = conformance(&profile("exclude-interface"));
    // Routed out of eth1: not captured; arriving on eth1: not captured.
    lands(&r, "app -> 203.0.113.10:80", "peer2:80");
    lands(&r, &format!("peer2 -> {}:8080", pods::POD_ETH1), "pod:8080");
}

#[test]
fn kube_virt_interface() {
    let r = conformance(&profile("kube-virt-interface"));
    // Arriving on eth1, even for the pod's own address: the outbound port.
    lands_with(
        &r,
        &format!("peer2 -> {}:8080", pods::POD_ETH1),
        "pod:15001",
        "198.18.0.10:8080",
    );
}

#[test]
fn kube_virt_interface_cidrs() {
    conformance(&profile("kube-virt-interface-cidrs"));
}

#[test]
fn tproxy() {
    let r = conformance(&profile("tproxy"));
    // The proxy (0:1337) calling its own pod IP reaches the inbound listener unrewritten.
    lands_with(
        &r,
        &format!("tproxy-proxy -> {POD_V4}:8080"),
        "pod:15006",
        "192.0.2.10:8080",
    );
    // No tunnel-port exemption in TPROXY mode.
    lands_with(
        &r,
        &format!("peer -> {POD_V4}:15008"),
        "pod:15006",
        "192.0.2.10:15008",
    );
}

#[test]
fn tproxy_inbound_list() {
    conformance(&profile("tproxy-inbound-list"));
}

#[test]
fn linkerd_default() {
    let r = conformance(&profile("linkerd-default"));
    lands_with(
        &r,
        &format!("app -> {}:80", pods::PEER_V4),
        "pod:4140",
        "192.0.2.20:80",
    );
    lands_with(
        &r,
        &format!("peer -> {POD_V4}:8080"),
        "pod:4143",
        "192.0.2.10:8080",
    );
    // No 127.0.0.6 trick and no inbound redirect of the proxy's own calls: lo is skipped.
    lands(&r, &format!("linkerd-proxy -> {POD_V4}:8080"), "pod:8080");
}

#[test]
fn linkerd_options() {
    conformance(&profile("linkerd-options"));
}

#[test]
fn linkerd_redirect_list() {
    conformance(&profile("linkerd-redirect-list"));
}

#[test]
fn profiles_cover_every_listed_profile() {
    // Each profile of profiles::all() has a test above.
    let src = include_str!("conformance.rs");
    for p in profiles::all() {
        let f = format!("profile(\"{}\")", p.name);
        assert!(
            src.contains(&f),
            "profile {} has no conformance test",
            p.name
        );
    }
}

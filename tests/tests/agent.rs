//! The agent as a product: `explain` agrees with what happens, and capture has no gap while the
//! agent is killed, restarted and has its programs replaced under load.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use sockmesh_tests::{
    kit::{Hold, HoldReport, Identity, Load, LoadReport, Outcome},
    lab::{run, sockmesh_bin, value_of, Lab},
    pods::{self, Caller, Case, Mode, CALLERS, PEER_V4, POD_PORTS, POD_V4},
    profiles::Profile,
};

fn explain(lab: &Lab, pod: &pods::Pod, args: &[&str]) -> String {
    explain_at(lab, &pod.ns.path(), args)
}

/// `sockmesh explain` for the namespace at `netns`.
fn explain_at(lab: &Lab, netns: &std::path::Path, args: &[&str]) -> String {
    sockmesh_tests::lab::explain(&lab.bpffs, netns, args).unwrap()
}

/// A lab with its agent and a pod registered with istio's default sidecar profile.
fn registered_pod(tag: &str) -> (Lab, pods::Pod) {
    let mut lab = Lab::with_agent(tag).unwrap();
    let p = Profile::default_sidecar();
    let pod = pods::captured(&mut lab, "a", &p, Mode::Sockmesh, &POD_PORTS).unwrap();
    (lab, pod)
}

#[test]
fn explain_agrees_with_what_happens() {
    let mut lab = Lab::with_agent("expl").unwrap();
    let p = Profile::default_sidecar();
    let pod = pods::pod(&mut lab, "a", &p, Mode::Sockmesh).unwrap();
    // Before registration: nothing is touched.
    let text = explain(&lab, &pod, &["tcp", &format!("{PEER_V4}:80")]);
    assert!(text.contains("is not registered"), "{text}");
    pods::apply_sockmesh(&lab, &pod, &p).unwrap();

    let cases: [(Caller, String, &[&str], &str, &str); 5] = [
        (
            CALLERS[0],
            format!("{PEER_V4}:80"),
            &[],
            "redirect to localhost:15001",
            "pod:15001",
        ),
        (
            CALLERS[2],
            format!("{PEER_V4}:80"),
            &["--uid", "1337"],
            "pass: left alone",
            "peer:80",
        ),
        (
            CALLERS[2],
            format!("{POD_V4}:8080"),
            &["--uid", "1337"],
            "redirect to localhost:15006",
            "pod:15006",
        ),
        (
            CALLERS[0],
            format!("{POD_V4}:8080"),
            &[],
            "pass: left alone",
            "pod:8080",
        ),
        (
            Caller::new_peer(),
            format!("{POD_V4}:8080"),
            &["--inbound", "--src", PEER_V4],
            "redirect to localhost:15006",
            "pod:15006",
        ),
    ];
    for (caller, dst, extra, verdict, listener) in cases {
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["tcp", dst.as_str()]);
        let text = explain(&lab, &pod, &args);
        assert_eq!(value_of(&text, "verdict"), verdict, "{args:?}: {text}");
        assert!(!value_of(&text, "rule").is_empty());
        let o = pods::probe(&lab, &pod, &Case::new(caller, dst.parse().unwrap())).unwrap();
        assert_eq!(o.landed(), listener, "{args:?}");
    }
}

/// `explain --inbound` gives sk_lookup's answer, listener check included: an arrival from a peer
/// is refused when no proxy listens on the inbound port, and one made inside the pod (from its
/// own address) is left alone; the kernel does the same with the same connections.
#[test]
fn explain_inbound_agrees_with_the_kernel() {
    let mut lab = Lab::with_agent("exin").unwrap();
    let p = Profile::default_sidecar();
    let without_inbound: Vec<u16> = POD_PORTS.iter().copied().filter(|&p| p != 15006).collect();
    let pod = pods::captured(&mut lab, "a", &p, Mode::Sockmesh, &without_inbound).unwrap();
    let dst = format!("{POD_V4}:8080");

    let text = explain(&lab, &pod, &["--inbound", "--src", PEER_V4, "tcp", &dst]);
    assert_eq!(
        value_of(&text, "verdict"),
        "refused: nothing listens on port 15006",
        "{text}"
    );
    let case = Case::new(Caller::new_peer(), dst.parse().unwrap());
    assert_eq!(pods::probe(&lab, &pod, &case).unwrap(), Outcome::Refused);

    let text = explain(&lab, &pod, &["--inbound", "--src", POD_V4, "tcp", &dst]);
    assert_eq!(value_of(&text, "verdict"), "pass: left alone", "{text}");
    let case = Case::new(CALLERS[0], dst.parse().unwrap());
    assert_eq!(pods::probe(&lab, &pod, &case).unwrap().landed(), "pod:8080");
}

#[test]
fn no_capture_gap_across_kill_restart_and_program_replacement() {
    let (mut lab, pod) = registered_pod("restart");

    let stop = lab.dir.join("stop-load");
    let peer80 = format!("{PEER_V4}:80").parse().unwrap();
    let load = Load::new(peer80, "pod:15001", stop.clone(), Identity::APP);
    let mut load = lab.testkit(pod.place(), &load).unwrap();
    load.stdout(Stdio::piped());
    let child = load.spawn().unwrap();
    let pause = || std::thread::sleep(Duration::from_millis(300));

    pause();
    // Killed without warning: the pinned links keep the programs in force.
    lab.stop_agent(libc::SIGKILL).unwrap();
    pause();
    lab.start_agent().unwrap();
    pause();
    // A new agent: every program is loaded again and swapped in with BPF_LINK_UPDATE.
    let before = prog_ids();
    lab.stop_agent(libc::SIGTERM).unwrap();
    lab.start_agent().unwrap();
    let after = prog_ids();
    assert!(lab.agent_log().contains("Updated"), "{}", lab.agent_log());
    assert!(
        after.iter().any(|id| !before.contains(id)),
        "no new program was put in force: before {before:?}, after {after:?}"
    );
    pause();

    std::fs::write(&stop, "").unwrap();
    let out = child.wait_with_output().unwrap();
    let report: LoadReport = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(report.escaped, 0, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(
        report.captured > 50,
        "too few connections to mean anything: {report:?}"
    );
}

/// IDs of the loaded sockmesh connect4 programs (bpftool).
fn prog_ids() -> Vec<u64> {
    let out = run(Command::new("bpftool").args(["-j", "prog", "show"])).unwrap();
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    progs
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("sockmesh_conne"))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn metrics_liveness_and_readiness() {
    let (lab, pod) = registered_pod("metrics");
    for _ in 0..3 {
        let o = pods::probe(
            &lab,
            &pod,
            &Case::new(CALLERS[0], format!("{PEER_V4}:80").parse().unwrap()),
        )
        .unwrap();
        assert_eq!(o.landed(), "pod:15001");
    }
    let addr = lab.metrics_addr().unwrap();
    assert_eq!(http_get(addr, "/healthz").0, "HTTP/1.1 200 OK");
    assert_eq!(http_get(addr, "/readyz").0, "HTTP/1.1 200 OK");
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("sockmesh_agent_ready 1"), "{body}");
    assert!(body.contains("sockmesh_pods 1"), "{body}");
    let captured: u64 = body
        .lines()
        .find(|l| {
            l.starts_with("sockmesh_decisions_total{") && l.contains("reason=\"capture_all\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no capture_all counter in\n{body}"));
    assert!(captured >= 3, "{body}");
    assert!(body.contains("event=\"orig_dst_hit\""), "{body}");
    assert_eq!(http_get(addr, "/nope").0, "HTTP/1.1 404 Not Found");
}

#[test]
fn pinned_maps_of_another_layout_are_refused() {
    let lab = Lab::new("layout").unwrap();
    let maps = lab.bpffs.join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    // A pods map as a release with a smaller PodConfig would have left it.
    run(Command::new("bpftool")
        .args(["map", "create"])
        .arg(maps.join("SM_PODS"))
        .args([
            "type", "hash", "key", "8", "value", "84", "entries", "16", "name", "SM_PODS",
        ]))
    .unwrap();
    let out = Command::new(sockmesh_bin().unwrap())
        .args(lab.agent_argv())
        .args(["--metrics", "off"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another map layout"), "{err}");
    assert!(!lab.socket.exists());
    // Nothing was attached.
    assert!(!lab.bpffs.join("links").join("connect4").exists());
}

#[test]
fn pods_that_are_gone_are_forgotten_and_their_address_reused() {
    let mut lab = Lab::with_agent("gone").unwrap();
    let p = Profile::default_sidecar();
    // No process in the pod, so deleting its netns destroys it.
    let a = pods::captured(&mut lab, "a", &p, Mode::Sockmesh, &[]).unwrap();
    let bpffs = lab.bpffs.clone();
    let dump = move || sockmesh_tests::lab::dump(&bpffs).unwrap();
    let first = dump()["pods"][0]["netns_cookie"].as_u64().unwrap();
    let peer = a.peer.clone();
    lab.remove_netns(&a.ns).unwrap();
    lab.remove_netns(&peer).unwrap();
    // A new pod gets the same address: registering it finds the old owner gone.
    pods::captured(&mut lab, "b", &p, Mode::Sockmesh, &[]).unwrap();
    let d = dump();
    let cookies: Vec<u64> = d["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["netns_cookie"].as_u64().unwrap())
        .collect();
    assert_eq!(cookies.len(), 1, "{d}");
    assert_ne!(cookies[0], first, "{d}");
    assert!(lab
        .agent_log()
        .contains("forgot a pod whose network namespace is gone"));
}

/// Someone else takes capture out of force: a cgroup link detached, a link's pin removed, the
/// pod's entry deleted, a pod entry written for a namespace the agent never registered. Each
/// escape is seen first (so the tampering really worked), then the agent puts it back within
/// a few guard periods, and counts it.
#[test]
fn tampering_is_noticed_and_put_back() {
    let (lab, pod) = registered_pod("tamper");
    let to_peer = Case::new(CALLERS[0], format!("{PEER_V4}:80").parse().unwrap());
    let landed = || pods::probe(&lab, &pod, &to_peer).unwrap().landed();
    assert_eq!(landed(), "pod:15001");
    let link = lab.bpffs.join("links/connect4");
    let wait_captured = |what: &str| {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while landed() != "pod:15001" {
            assert!(
                std::time::Instant::now() < until,
                "{what}: not put back in 10 s; agent log:\n{}",
                lab.agent_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    run(Command::new("bpftool")
        .args(["link", "detach", "pinned"])
        .arg(&link))
    .unwrap();
    assert_eq!(
        landed(),
        "peer:80",
        "detaching the link did not stop capture"
    );
    wait_captured("a detached link");

    std::fs::remove_file(&link).unwrap();
    assert_eq!(
        landed(),
        "peer:80",
        "unpinning the link did not stop capture"
    );
    wait_captured("an unpinned link");

    let cookie = lab.dump().unwrap()["pods"][0]["netns_cookie"]
        .as_u64()
        .unwrap();
    let key: Vec<String> = cookie.to_le_bytes().iter().map(|b| b.to_string()).collect();
    let pods_map = lab.bpffs.join("maps/SM_PODS");
    run(Command::new("bpftool")
        .args(["map", "delete", "pinned"])
        .arg(&pods_map)
        .arg("key")
        .args(&key))
    .unwrap();
    assert_eq!(
        landed(),
        "peer:80",
        "deleting the pod's entry did not stop capture"
    );
    wait_captured("a deleted pod entry");

    // The peer's namespace given the pod's entry: the agent never registered it.
    let value = run(Command::new("bpftool")
        .args(["-j", "map", "lookup", "pinned"])
        .arg(&pods_map)
        .arg("key")
        .args(&key))
    .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&value.stdout).unwrap();
    let bytes: Vec<String> = value["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16)
                .unwrap()
                .to_string()
        })
        .collect();
    let peer = explain_at(&lab, &pod.peer.path(), &["tcp", "192.0.2.10:80"]);
    let peer_cookie: u64 = peer
        .split_whitespace()
        .skip_while(|w| *w != "cookie")
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no cookie in {peer}"));
    let peer_key: Vec<String> = peer_cookie
        .to_le_bytes()
        .iter()
        .map(|b| b.to_string())
        .collect();
    run(Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(&pods_map)
        .arg("key")
        .args(&peer_key)
        .arg("value")
        .args(&bytes))
    .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !explain_at(&lab, &pod.peer.path(), &["tcp", "192.0.2.10:80"])
        .contains("is not registered")
    {
        assert!(std::time::Instant::now() < until, "the foreign entry stays");
        std::thread::sleep(Duration::from_millis(200));
    }

    let (_, body) = http_get(lab.metrics_addr().unwrap(), "/metrics");
    for what in [
        "link detached",
        "link unpinned",
        "pod entries restored",
        "foreign pod entry removed",
    ] {
        assert!(
            body.contains(&format!(
                "sockmesh_agent_repairs_total{{what=\"{what}\"}} 1"
            )),
            "{what}:\n{body}"
        );
    }
    assert!(lab.agent_log().contains("put back"), "the repair is logged");
}

/// More live captured connections than the original-destination map holds (made small with
/// --orig-dst-entries). It is an LRU map: a new record always goes in, the oldest go out. A
/// proxy that reads the original destination as it accepts (the testkit's listener, as Envoy)
/// gets every one right; one that reads after the map turned over (`hold --listen`) reads its
/// own listener's address for the evicted ones, which it can tell from a real destination, and
/// never another connection's. Each loss is counted and logged.
#[test]
fn beyond_the_original_destination_limit_a_proxy_sees_its_own_address() {
    const ENTRIES: usize = 64;
    const HELD: usize = 100;
    let mut lab = Lab::new("limit").unwrap();
    lab.agent_args = vec!["--orig-dst-entries".into(), ENTRIES.to_string()];
    lab.start_agent().unwrap();
    let p = Profile::default_sidecar();
    let pod = pods::captured(&mut lab, "a", &p, Mode::Sockmesh, &[]).unwrap();
    let peer80 = format!("{PEER_V4}:80");
    let hold = Hold {
        dst: peer80.parse().unwrap(),
        count: HELD,
        listen: Some(15001),
        keep: false,
        id: Identity::APP,
    };
    let out = lab.output(pod.place(), &hold).unwrap();
    let report: HoldReport = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report.opened, HELD, "{report:?}");
    let right = report.orig.get(&peer80).copied().unwrap_or(0);
    let own = report.orig.get("127.0.0.1:15001").copied().unwrap_or(0);
    assert_eq!(
        right + own,
        HELD,
        "an original destination neither right nor the proxy's own: {report:?}"
    );
    assert!(own >= HELD - ENTRIES && right > 0, "{report:?}");
    let counted = lab.dump().unwrap()["pods"][0]["counters"]["orig_dst_lost"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(counted as usize, own, "each loss is counted");
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while !lab
        .agent_log()
        .contains("no original destination for a connection to capture port")
    {
        assert!(
            std::time::Instant::now() < until,
            "the loss is not logged:\n{}",
            lab.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Logged at powers of two of each CPU's count, not once each: a pod must not be able to
    // flood the agent's log at connection rate.
    std::thread::sleep(Duration::from_secs(1));
    let lines = lab
        .agent_log()
        .matches("no original destination for a connection to capture port")
        .count();
    let cpus = std::thread::available_parallelism().unwrap().get();
    let per_cpu = (usize::BITS - own.leading_zeros()) as usize;
    assert!(
        lines >= 1 && lines < own && lines <= cpus * per_cpu,
        "{lines} log lines for {own} losses on {cpus} CPUs:\n{}",
        lab.agent_log()
    );
    // A proxy that reads as it accepts: every one right, however many are held.
    pods::listen(&mut lab, &pod.ns, true, "pod", &[15001]).unwrap();
    let hold = Hold {
        listen: None,
        ..hold
    };
    let out = lab.output(pod.place(), &hold).unwrap();
    let report: HoldReport = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(report.orig.get(&peer80), Some(&HELD), "{report:?}");
}

/// Pinned maps of another size than the settings ask for (the original destinations', the
/// pods') are refused by name, with the fix.
#[test]
fn a_pinned_map_of_another_size_is_refused() {
    let mut lab = Lab::with_agent("resize").unwrap();
    lab.stop_agent(libc::SIGTERM).unwrap();
    let cases = [
        (
            ["--orig-dst-entries", "1024"],
            "SM_ORIG_DST holds 262144 entries, --orig-dst-entries asks for 1024",
            "pass --orig-dst-entries 262144",
        ),
        (
            ["--max-pods", "100"],
            "SM_PODS holds 16384 entries, --max-pods 100 asks for 100",
            "pass --max-pods 16384",
        ),
    ];
    for (args, what, fix) in cases {
        let mut argv = lab.agent_argv();
        argv.extend(args.map(Into::into));
        let out = Command::new(sockmesh_bin().unwrap())
            .args(&argv)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started: {err}");
        assert!(err.contains(what) && err.contains(fix), "{err}");
    }
}

/// `sock_create` is put in force only where the programs cannot read a socket's creator from
/// the socket (no kernel BTF); an agent that can drops the link an earlier one left, and the
/// program leaves the cgroup.
#[test]
fn sock_create_is_in_force_only_without_the_kernels_btf() {
    let mut lab = Lab::new("create").unwrap();
    let link = lab.bpffs.join("links").join("sock_create");
    let attached = |lab: &Lab| {
        let out = run(Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(&lab.cgroup))
        .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("sockmesh_sock_create")
    };
    lab.agent_args = vec!["--kernel-btf".into(), "/nonexistent/vmlinux".into()];
    lab.start_agent().unwrap();
    assert!(link.exists(), "{}", lab.agent_log());
    assert!(attached(&lab), "{}", lab.agent_log());
    lab.stop_agent(libc::SIGTERM).unwrap();
    lab.agent_args.clear();
    lab.start_agent().unwrap();
    assert!(!link.exists(), "{}", lab.agent_log());
    assert!(!attached(&lab), "{}", lab.agent_log());
    assert!(lab.agent_log().contains("Removed"), "{}", lab.agent_log());
    // The other programs are in force.
    assert!(lab.bpffs.join("links").join("connect4").exists());
}

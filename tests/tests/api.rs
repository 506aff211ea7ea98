//! The registration API under attack: a caller speaks only for the network namespace it passes
//! as a file descriptor; garbage, truncated frames, idle and malformed callers and thousands of
//! concurrent clients leave the agent serving, and a refused registration leaves nothing behind.

use std::{
    io::Write,
    os::{fd::AsFd, unix::net::UnixStream},
    time::{Duration, Instant},
};

use sockmesh_tests::{
    api::{self, pb, raise_nofile, raw, send_preamble, PREAMBLE},
    lab::{Lab, Netns},
};
use tonic::Code;

/// A lab with its agent and `n` pods: namespaces with an address each (pod addresses are
/// unique on a node), joined to a peer by a veth pair.
///
/// The agent runs in a lab "node" namespace, which the tests pass as "the agent's own".
fn lab_with_pods(tag: &str, n: usize) -> (Lab, Netns, Vec<Netns>) {
    lab_with_pods_and(tag, n, &[])
}

/// [`lab_with_pods`], the agent started with `agent_args`.
fn lab_with_pods_and(tag: &str, n: usize, agent_args: &[&str]) -> (Lab, Netns, Vec<Netns>) {
    let mut lab = Lab::new(tag).unwrap();
    lab.agent_args = agent_args.iter().map(|a| a.to_string()).collect();
    let node = lab.netns("node").unwrap();
    lab.start_agent_in(Some(&node)).unwrap();
    let pods = (0..n)
        .map(|i| {
            let ns = lab.netns(&format!("p{i}")).unwrap();
            let peer = lab.netns(&format!("q{i}")).unwrap();
            lab.veth(&ns, "eth0", &peer, "eth0").unwrap();
            ns.ip(&[
                "addr",
                "add",
                &format!("192.0.2.{}/24", 10 + i),
                "dev",
                "eth0",
            ])
            .unwrap();
            ns
        })
        .collect();
    (lab, node, pods)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn status(lab: &Lab, pod: &Netns) -> pb::PodReply {
    let mut c = api::pod_client(&lab.socket, &pod.path()).await.unwrap();
    c.status(pb::StatusRequest {}).await.unwrap().into_inner()
}

async fn register(
    lab: &Lab,
    pod: &Netns,
    s: pb::PodSettings,
) -> Result<pb::PodReply, tonic::Status> {
    let mut c = api::pod_client(&lab.socket, &pod.path()).await.unwrap();
    c.register(pb::RegisterRequest { settings: Some(s) })
        .await
        .map(|r| r.into_inner())
}

/// Register the default settings over a connection whose preamble carries `fds`.
async fn register_carrying(
    sock: &std::path::Path,
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<pb::PodReply, tonic::Status> {
    let mut c = api::client(sock, PREAMBLE, fds).await.unwrap();
    c.register(pb::RegisterRequest {
        settings: Some(api::default_settings()),
    })
    .await
    .map(|r| r.into_inner())
}

fn expect_refused(r: Result<pb::PodReply, tonic::Status>, code: Code, needle: &str) {
    match r {
        Ok(reply) => panic!("accepted ({reply:?}), want {code:?} naming {needle:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{s:?}");
            assert!(
                s.message().contains(needle),
                "want {needle:?} in {:?}",
                s.message()
            );
        }
    }
}

#[test]
fn a_caller_speaks_only_for_the_namespace_it_passes() {
    let (lab, node, pods) = lab_with_pods("apiid", 2);
    let (a, b) = (&pods[0], &pods[1]);
    runtime().block_on(async {
        let ra = register(&lab, a, api::default_settings()).await.unwrap();
        assert!(ra.registered && ra.netns_cookie != 0);
        let sb = status(&lab, b).await;
        assert!(!sb.registered);
        assert_ne!(
            sb.netns_cookie, ra.netns_cookie,
            "each namespace has its own cookie"
        );

        // Update changes a registered pod only: B is not registered, A is.
        let mut cb = api::pod_client(&lab.socket, &b.path()).await.unwrap();
        let r = cb
            .update(pb::RegisterRequest {
                settings: Some(api::default_settings()),
            })
            .await
            .map(|r| r.into_inner());
        expect_refused(r, Code::NotFound, "not registered");
        assert!(
            !status(&lab, b).await.registered,
            "Update started capturing a pod"
        );
        let mut ca = api::pod_client(&lab.socket, &a.path()).await.unwrap();
        let mut changed = api::default_settings();
        changed.outbound_port = 15101;
        let u = ca
            .update(pb::RegisterRequest {
                settings: Some(changed),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(u.netns_cookie, ra.netns_cookie);
        let dump = sockmesh_tests::lab::run(
            std::process::Command::new(sockmesh_tests::lab::sockmesh_bin().unwrap())
                .arg("dump")
                .arg("--bpffs")
                .arg(&lab.bpffs),
        )
        .unwrap();
        let dump = String::from_utf8_lossy(&dump.stdout);
        assert!(
            dump.contains("15101"),
            "the update is not in the maps:\n{dump}"
        );

        // B's unregister removes B (nothing), never A.
        let mut cb = api::pod_client(&lab.socket, &b.path()).await.unwrap();
        let u = cb
            .unregister(pb::UnregisterRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(u.netns_cookie, sb.netns_cookie);
        assert!(status(&lab, a).await.registered, "B's unregister touched A");

        // No fd: no identity.
        let r = register_carrying(&lab.socket, vec![]).await;
        expect_refused(r, Code::Unauthenticated, "no network namespace");
        // An fd that is not a network namespace.
        let devnull = std::fs::File::open("/dev/null").unwrap();
        let r = register_carrying(&lab.socket, vec![devnull.into()]).await;
        expect_refused(r, Code::Unauthenticated, "not a network namespace");
        // The node's own namespace (the agent's).
        let host = std::fs::File::open(node.path()).unwrap();
        let r = register_carrying(&lab.socket, vec![host.into()]).await;
        expect_refused(r, Code::PermissionDenied, "own network namespace");
        // Two namespaces at once: which one would it be? The connection is refused.
        let two = vec![
            std::fs::File::open(b.path()).unwrap().into(),
            std::fs::File::open(a.path()).unwrap().into(),
        ];
        let refused = match api::client(&lab.socket, PREAMBLE, two).await {
            Err(_) => true,
            Ok(mut c) => c.unregister(pb::UnregisterRequest {}).await.is_err(),
        };
        assert!(refused, "a connection carrying two namespaces was served");
        assert!(status(&lab, a).await.registered);
        assert!(!status(&lab, b).await.registered);

        // The operator's list holds A only.
        let mut c = api::client(&lab.socket, PREAMBLE, vec![]).await.unwrap();
        let list = c.list(pb::ListRequest {}).await.unwrap().into_inner();
        assert_eq!(list.netns_cookies, vec![ra.netns_cookie]);
    });
    assert!(
        lab.agent_log().contains("request refused"),
        "refusals are logged"
    );
}

#[test]
fn malformed_settings_are_refused_by_field_and_leave_nothing() {
    let (lab, _node, pods) = lab_with_pods("apibad", 1);
    let pod = &pods[0];
    runtime().block_on(async {
        let mut c = api::pod_client(&lab.socket, &pod.path()).await.unwrap();
        let r = c
            .register(pb::RegisterRequest { settings: None })
            .await
            .map(|r| r.into_inner());
        expect_refused(r, Code::InvalidArgument, "settings");

        type Edit = fn(&mut pb::PodSettings);
        let cases: [(&str, Edit); 12] = [
            ("unknown bits", |s| s.flags |= 1 << 30),
            ("contradictory settings: inbound capture", |s| {
                s.flags |= sockmesh_common::PodFlags::INBOUND_LIST.bits()
            }),
            ("contradictory settings: TPROXY", |s| {
                s.flags |= sockmesh_common::PodFlags::TPROXY.bits()
            }),
            ("outbound_port", |s| s.outbound_port = 70_000),
            ("ports must be 1-65535", |s| s.inbound_port = 0),
            ("loopback_v4", |s| s.loopback_v4 = vec![127, 0, 6]),
            ("loopback CIDR", |s| s.loopback_v4 = vec![10, 0, 0, 6]),
            ("uids", |s| s.uids = vec![1; 100]),
            ("members: unknown kind", |s| {
                s.members.push(pb::Member { kind: 99, value: 1 })
            }),
            ("10.0.0.0/40", |s| {
                s.prefixes.push(pb::Prefix {
                    kind: 1,
                    cidr: "10.0.0.0/40".into(),
                })
            }),
            ("cannot be set by the caller", |s| {
                s.prefixes.push(pb::Prefix {
                    kind: 12,
                    cidr: "0.0.0.0/0".into(),
                })
            }),
            ("members: 70000 entries", |s| {
                s.members = (0..70_000)
                    .map(|v| pb::Member { kind: 1, value: v })
                    .collect()
            }),
        ];
        for (needle, edit) in cases {
            let mut s = api::default_settings();
            edit(&mut s);
            expect_refused(register(&lab, pod, s).await, Code::InvalidArgument, needle);
            assert!(
                !status(&lab, pod).await.registered,
                "{needle}: half registered"
            );
        }
        // Valid in form, impossible in the pod: an interface it does not have.
        let mut s = api::default_settings();
        s.flags |= sockmesh_common::PodFlags::EXCLUDE_IFACES.bits();
        s.exclude_interfaces = vec!["nope0".into()];
        expect_refused(
            register(&lab, pod, s).await,
            Code::FailedPrecondition,
            "nope0",
        );
        assert!(!status(&lab, pod).await.registered);
        // Larger than any message the agent accepts.
        let mut s = api::default_settings();
        s.exclude_interfaces = vec!["x".repeat(1 << 20); 5];
        let err = register(&lab, pod, s).await.unwrap_err();
        assert_ne!(err.code(), Code::Ok);
        assert!(!status(&lab, pod).await.registered);

        // A registered pod keeps its settings when a later registration is refused.
        register(&lab, pod, api::default_settings()).await.unwrap();
        let mut s = api::default_settings();
        s.outbound_port = 0;
        expect_refused(register(&lab, pod, s).await, Code::InvalidArgument, "ports");
        assert!(status(&lab, pod).await.registered);
    });
}

#[test]
fn garbage_truncated_and_idle_connections_do_not_stop_the_agent() {
    let (mut lab, _node, pods) = lab_with_pods("apijunk", 1);
    let pod = &pods[0];
    // HTTP/2 without the preamble, random bytes, an empty connection.
    let closed = raw(&lab.socket, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    assert!(
        closed.is_empty(),
        "the agent answered a caller without a preamble"
    );
    let noise: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    raw(&lab.socket, &noise).unwrap();
    raw(&lab.socket, &[]).unwrap();
    // A valid preamble, then garbage; then a truncated HTTP/2 frame; then a hang-up mid-frame.
    let ns = std::fs::File::open(pod.path()).unwrap();
    for tail in [
        &noise[..4096],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00".as_slice(),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x40\x00\x01\x00"
            .as_slice(),
    ] {
        let mut s = UnixStream::connect(&lab.socket).unwrap();
        send_preamble(&s, PREAMBLE, &[ns.as_fd()]).unwrap();
        let _ = s.write_all(tail);
        drop(s);
    }
    // Callers that connect and say nothing, held open while a real registration goes through.
    raise_nofile().unwrap();
    let idle: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(&lab.socket).unwrap())
        .collect();
    let started = Instant::now();
    runtime().block_on(async {
        let r = register(&lab, pod, api::default_settings()).await.unwrap();
        assert!(r.registered);
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "idle callers held up a registration for {:?}",
        started.elapsed()
    );
    drop(idle);
    assert!(
        lab.agent_running().unwrap(),
        "the agent died:\n{}",
        lab.agent_log()
    );
    // The whole log: the idle callers' 300 warnings come after, so a tail may miss it.
    let log = std::fs::read_to_string(lab.agent_log_path()).unwrap();
    assert!(
        log.contains("is not sockmesh's"),
        "a wrong preamble is logged:\n{log}"
    );
}

#[test]
fn thousands_of_concurrent_clients_are_all_served() {
    let (mut lab, _node, pods) = lab_with_pods("apimany", 2);
    raise_nofile().unwrap();
    const CLIENTS: usize = 2000;
    let rt = runtime();
    let (registered, statuses) = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..CLIENTS {
            let sock = lab.socket.clone();
            let ns = pods[i % 2].path();
            tasks.push(tokio::spawn(async move {
                let mut c = api::pod_client(&sock, &ns).await?;
                let reply = if i % 10 < 2 {
                    c.register(pb::RegisterRequest {
                        settings: Some(api::default_settings()),
                    })
                    .await?
                } else {
                    c.status(pb::StatusRequest {}).await?
                };
                anyhow::Ok((i % 10 < 2, reply.into_inner()))
            }));
        }
        let (mut registered, mut statuses) = (0, 0);
        for t in tasks {
            match t.await.unwrap() {
                Ok((true, r)) => {
                    assert!(r.registered);
                    registered += 1
                }
                Ok((false, _)) => statuses += 1,
                Err(e) => panic!("a client failed: {e:#}"),
            }
        }
        (registered, statuses)
    });
    assert_eq!((registered, statuses), (CLIENTS / 5, CLIENTS - CLIENTS / 5));
    rt.block_on(async {
        for p in &pods {
            assert!(status(&lab, p).await.registered);
        }
    });
    assert!(
        lab.agent_running().unwrap(),
        "the agent died:\n{}",
        lab.agent_log()
    );
}

/// The registration API flooded while a pod's traffic is captured: thousands of clients
/// registering another pod over and over, asking for status, and sending garbage, while the
/// first pod's connections open and close without pause. None of them escapes or fails.
#[test]
fn a_flood_of_api_calls_while_traffic_is_captured() {
    use sockmesh_tests::{
        kit::{Identity, Load, LoadReport},
        pods::{self, Mode, PEER_V4, POD_PORTS},
        profiles::Profile,
    };
    let mut lab = Lab::with_agent("apiflood").unwrap();
    raise_nofile().unwrap();
    let p = Profile::default_sidecar();
    let busy = pods::captured(&mut lab, "a", &p, Mode::Sockmesh, &POD_PORTS).unwrap();
    let other = lab.netns("b").unwrap();
    let stop = lab.dir.join("stop-load");
    let load = Load::new(
        format!("{PEER_V4}:80").parse().unwrap(),
        "pod:15001",
        stop.clone(),
        Identity::APP,
    );
    let load = lab
        .testkit(busy.place(), &load)
        .unwrap()
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    const CLIENTS: usize = 2000;
    let rt = runtime();
    let served = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..CLIENTS {
            let sock = lab.socket.clone();
            let ns = other.path();
            tasks.push(tokio::spawn(async move {
                if i % 10 == 9 {
                    let _ = tokio::task::spawn_blocking(move || raw(&sock, b"\x01garbage")).await;
                    return anyhow::Ok(false);
                }
                let mut c = api::pod_client(&sock, &ns).await?;
                if i % 2 == 0 {
                    c.register(pb::RegisterRequest {
                        settings: Some(api::default_settings()),
                    })
                    .await?;
                } else {
                    c.status(pb::StatusRequest {}).await?;
                }
                anyhow::Ok(true)
            }));
        }
        let mut served = 0;
        for t in tasks {
            if t.await
                .unwrap()
                .unwrap_or_else(|e| panic!("a client failed: {e:#}"))
            {
                served += 1;
            }
        }
        served
    });
    std::fs::write(&stop, "").unwrap();
    let out = load.wait_with_output().unwrap();
    let report: LoadReport = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(served, CLIENTS - CLIENTS / 10);
    assert_eq!(report.escaped, 0, "{report:?}");
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.captured > 50, "too few to tell: {report:?}");
    assert!(
        lab.agent_running().unwrap(),
        "the agent died:\n{}",
        lab.agent_log()
    );
}

/// Entries of each map a registration writes, and the pods' sk_lookup links: what a refused
/// registration must leave as it found it.
fn what_pods_hold(lab: &Lab) -> Vec<(&'static str, usize)> {
    use sockmesh_common::names;
    let mut held: Vec<(&'static str, usize)> = [
        names::PODS,
        names::MEMBERS,
        names::CIDRS,
        names::LOCAL_ADDRS,
        names::ADDR_POD,
        names::ROUTE_SRC,
    ]
    .into_iter()
    .map(|name| {
        let out = sockmesh_tests::lab::run(std::process::Command::new("bpftool").args([
            "-j",
            "map",
            "dump",
            "pinned",
            &lab.bpffs.join("maps").join(name).to_string_lossy(),
        ]))
        .unwrap();
        let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (name, entries.as_array().unwrap().len())
    })
    .collect();
    let links = std::fs::read_dir(lab.bpffs.join("links")).unwrap().count();
    held.push(("links", links));
    held
}

/// Outbound ports to leave alone: `n` set members.
fn excluded_ports(n: u32) -> Vec<pb::Member> {
    (0..n)
        .map(|i| pb::Member {
            kind: sockmesh_common::MemberKind::OutboundExcludePort as u32,
            value: 20_000 + i,
        })
        .collect()
}

/// The node's maps sized for 3 pods (`--max-pods 3`: 48 set members, 12 addresses): a
/// registration that finds one full is refused whole, with the map and the fix named, by the
/// API (RESOURCE_EXHAUSTED) and by `init` (exit status non-zero); a re-registration that does
/// not fit leaves the pod's earlier capture in force; once pods leave, it fits.
#[test]
fn a_full_map_refuses_a_registration_whole() {
    sockmesh_tests::lab::require_tools(&["bpftool"]).unwrap();
    let (lab, _node, pods) = lab_with_pods_and("apifull", 4, &["--max-pods", "3"]);
    let members = |n| {
        let mut s = api::default_settings();
        s.members.extend(excluded_ports(n));
        s
    };
    let full = |r: Result<pb::PodReply, tonic::Status>, map: &str| {
        expect_refused(r, Code::ResourceExhausted, &format!("map {map} is full"));
    };
    runtime().block_on(async {
        // 3 + 43 of the 48 set members.
        register(&lab, &pods[0], members(43)).await.unwrap();
        let held = what_pods_hold(&lab);
        assert_eq!(held[1], ("SM_MEMBERS", 46), "{held:?}");

        // The next pod's 3 members: 2 go in, the third finds the map full, and all of it goes.
        let r = register(&lab, &pods[1], api::default_settings()).await;
        assert!(
            matches!(&r, Err(s) if s.message().contains("--max-pods")),
            "{r:?}"
        );
        full(r, "SM_MEMBERS");
        assert!(!status(&lab, &pods[1]).await.registered);
        assert_eq!(what_pods_hold(&lab), held);

        // A registered pod whose new settings do not fit keeps its old ones.
        full(register(&lab, &pods[0], members(46)).await, "SM_MEMBERS");
        assert!(status(&lab, &pods[0]).await.registered);
        assert_eq!(what_pods_hold(&lab), held);
        let settings = |dump: serde_json::Value| dump["pods"][0]["settings"].clone();
        let before = settings(lab.dump().unwrap());

        // Fewer entries fit, and leave room.
        register(&lab, &pods[0], api::default_settings())
            .await
            .unwrap();
        assert_ne!(settings(lab.dump().unwrap()), before);
        register(&lab, &pods[1], api::default_settings())
            .await
            .unwrap();
        register(&lab, &pods[2], api::default_settings())
            .await
            .unwrap();

        // A fourth pod finds a map full (its addresses', or the pods'), and nothing of it stays.
        let held = what_pods_hold(&lab);
        assert_eq!(held[0], ("SM_PODS", 3), "{held:?}");
        let r = register(&lab, &pods[3], api::default_settings()).await;
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains(" is full") && e.message().contains("--max-pods"));
        assert!(!status(&lab, &pods[3]).await.registered);
        assert_eq!(what_pods_hold(&lab), held);
    });

    // init says so and fails.
    let out = lab
        .sockmesh_in(&pods[3])
        .unwrap()
        .args([
            "init", "istio", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
        ])
        .args(["-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ResourceExhausted")
            && stderr.contains(" is full")
            && stderr.contains("--max-pods"),
        "{stderr}"
    );

    runtime().block_on(async {
        assert!(!status(&lab, &pods[3]).await.registered);
        let mut c = api::pod_client(&lab.socket, &pods[1].path()).await.unwrap();
        c.unregister(pb::UnregisterRequest {}).await.unwrap();
        register(&lab, &pods[3], api::default_settings())
            .await
            .unwrap();
    });
}

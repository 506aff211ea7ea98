//! The sidecar dies: HAProxy and sockmesh-proxy SIGKILLed mid-transfer, under iptables and
//! under sockmesh. The transfer in flight ends the same way under both; while the proxy is
//! down a new connection is refused (never sent around it); a restarted proxy gets traffic
//! again with nothing asked of the agent.

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sockmesh_tests::{
    kit::{Connect, HttpGet, HttpServe, HttpStream, HttpUpstream, Identity, Outcome},
    lab::{sibling_bin, Lab},
    pods::{self, Mode, PEER_V4},
    profiles::Profile,
};

/// The upstream on the peer: slow chunks, so a transfer is in flight when the proxy dies.
const UPSTREAM_PORT: u16 = 18081;
const CHUNKS: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Proxy {
    HaProxy,
    SockmeshProxy,
}

/// The proxy's command at the pod, as uid 1337 (HAProxy drops to it, sockmesh-proxy too).
fn proxy_command(lab: &Lab, pod: &pods::Pod, proxy: Proxy) -> Command {
    match proxy {
        Proxy::HaProxy => {
            let cfg = lab.dir.join("haproxy.cfg");
            std::fs::write(
                &cfg,
                format!(
                    "global\n  uid 1337\n  gid 1337\n\
                     defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                     frontend out\n  bind 0.0.0.0:15001\n  default_backend peer\n\
                     backend peer\n  server p {PEER_V4}:{UPSTREAM_PORT}\n"
                ),
            )
            .unwrap();
            let mut cmd = lab.command_at(pod.place(), "haproxy").unwrap();
            cmd.arg("-db").arg("-f").arg(cfg);
            cmd
        }
        Proxy::SockmeshProxy => {
            // No route: each connection goes to its original destination.
            let cfg = lab.dir.join("proxy.yaml");
            std::fs::write(
                &cfg,
                "listeners:\n  - {name: outbound, address: \"0.0.0.0:15001\", direction: outbound}\n",
            )
            .unwrap();
            let bin = sibling_bin("sockmesh-proxy", "SOCKMESH_PROXY_BIN").unwrap();
            let mut cmd = lab.command_at(pod.place(), bin).unwrap();
            cmd.arg("--config").arg(cfg);
            cmd
        }
    }
}

/// Start the proxy and wait until a request through it is answered.
fn start_proxy(lab: &mut Lab, pod: &pods::Pod, proxy: Proxy) -> usize {
    let cmd = proxy_command(lab, pod, proxy);
    let idx = lab.spawn(cmd, None).unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while !get(lab, pod).contains("s1 GET /") {
        assert!(Instant::now() < until, "{proxy:?} does not serve");
        std::thread::sleep(Duration::from_millis(100));
    }
    idx
}

fn upstream() -> SocketAddr {
    format!("{PEER_V4}:{UPSTREAM_PORT}").parse().unwrap()
}

/// One GET through the pod's capture, as the app.
fn get(lab: &Lab, pod: &pods::Pod) -> String {
    let g = HttpGet::new(upstream(), "/", "up", Identity::APP);
    match lab.testkit(pod.place(), &g).unwrap().output() {
        Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
        Err(e) => e.to_string(),
    }
}

/// What the app saw, in each phase.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    in_flight: &'static str,
    while_down: String,
    after_restart: &'static str,
}

fn run(mode: Mode, proxy: Proxy) -> Seen {
    let tag = match (mode, proxy) {
        (Mode::Iptables, Proxy::HaProxy) => "dieih",
        (Mode::Iptables, Proxy::SockmeshProxy) => "dieis",
        (Mode::Sockmesh, Proxy::HaProxy) => "diesh",
        (Mode::Sockmesh, Proxy::SockmeshProxy) => "diess",
    };
    let mut lab = pods::lab_for(tag, mode).unwrap();
    let p = Profile::default_sidecar();
    let pod = pods::captured(&mut lab, "d", &p, mode, &[]).unwrap();
    let up = HttpServe::new([HttpUpstream::new("s1", upstream())]);
    lab.start(pod.peer_place(), &up).unwrap();
    let idx = start_proxy(&mut lab, &pod, proxy);
    let registrations = lab.agent_log().matches("pod registered").count();

    // A transfer in flight: chunks 200 ms apart; the proxy is killed after the first few.
    let stream = HttpStream {
        chunks: CHUNKS,
        ..HttpStream::new(upstream(), "up", Identity::APP)
    };
    let mut cmd = lab.testkit(pod.place(), &stream).unwrap();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    lab.kill(idx).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let complete = format!("chunks={CHUNKS} ");
    let in_flight = if out.status.success() && text.contains(&complete) {
        "completed"
    } else if out.status.success() || String::from_utf8_lossy(&out.stderr).contains("reset") {
        // Ended early, with an end of stream or a reset: cut either way.
        "cut"
    } else {
        panic!(
            "the stream ended some other way: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    };

    // While the proxy is down: refused, and never the peer itself.
    let c = Connect::new(format!("{PEER_V4}:80").parse().unwrap(), Identity::APP);
    let o = pods::connect(&lab, pod.place(), &c).unwrap();
    let while_down = match o {
        Outcome::Refused => "refused".to_string(),
        other => format!("{other:?}"),
    };

    // Back again: traffic flows, and the agent was not asked for anything.
    start_proxy(&mut lab, &pod, proxy);
    let after_restart = if get(&lab, &pod).contains("s1 GET /") {
        "served"
    } else {
        "not served"
    };
    assert_eq!(
        lab.agent_log().matches("pod registered").count(),
        registrations,
        "the agent was asked to act"
    );
    Seen {
        in_flight,
        while_down,
        after_restart,
    }
}

#[test]
fn a_killed_proxy_is_as_under_iptables_for_haproxy_and_sockmesh_proxy() {
    for proxy in [Proxy::HaProxy, Proxy::SockmeshProxy] {
        let iptables = run(Mode::Iptables, proxy);
        let sockmesh = run(Mode::Sockmesh, proxy);
        assert_eq!(iptables, sockmesh, "{proxy:?}: iptables vs sockmesh");
        assert_eq!(
            sockmesh,
            Seen {
                in_flight: "cut",
                while_down: "refused".into(),
                after_restart: "served",
            },
            "{proxy:?}"
        );
    }
}

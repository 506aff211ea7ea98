//! The demo lab behind `cargo xtask lab`: a pod and a peer host in network namespaces, the
//! agent on a child cgroup and a private bpffs, `sockmesh init istio` with the injector's
//! default arguments, a listener on 15001 that prints each original destination, real
//! connections from the app and from the proxy, and `sockmesh dump`. Everything is removed at
//! the end.

use std::{process::Command, time::Duration};

use anyhow::Result;

use sockmesh_tests::{
    kit::{Connect, Identity, Outcome},
    lab::{require_tools, run as run_cmd, sockmesh_bin, Lab},
    pods::{self, Caller, Case, Mode, CALLERS, PEER_V4, PEER_V6, POD_V4},
    profiles::Profile,
};

fn step(s: &str) {
    println!("\n== {s}");
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Ok {
            listener,
            orig,
            peername,
            client_ip,
            ..
        } => format!(
            "landed on {listener}, SO_ORIGINAL_DST={orig}, the listener saw the client at \
             {client_ip}, the app's getpeername()={peername}"
        ),
        other => format!("{other:?}"),
    }
}

pub fn run() -> Result<()> {
    require_tools(&["ip", "mount", "umount"])?;
    std::env::set_var("SOCKMESH_TESTKIT_LOG", "1");
    step("lab: child cgroup, private bpffs, agent");
    let mut lab = Lab::new("demo")?;
    println!(
        "cgroup {}\nbpffs  {}\nsocket {}",
        lab.cgroup.display(),
        lab.bpffs.display(),
        lab.socket.display()
    );
    lab.start_agent()?;
    println!("agent ready");

    step("pods: 'pod' (192.0.2.10, 2001:db8::10) and 'peer' (192.0.2.20, 2001:db8::20) joined by veth");
    let mut profile = Profile::default_sidecar();
    profile.dual_stack = true;
    let pod = pods::pod(&mut lab, "d", &profile, Mode::Sockmesh)?;
    println!(
        "listeners: pod {:?}, peer {:?} (IPv4 and IPv6)",
        pods::POD_PORTS,
        pods::PEER_PORTS
    );

    step("sockmesh init istio (the injector's default argv, plus --dual-stack)");
    let argv = profile.argv();
    let shown: Vec<String> = argv
        .iter()
        .map(|a| match a.as_str() {
            "" => "''".to_string(),
            "*" => "'*'".to_string(),
            a => a.to_string(),
        })
        .collect();
    println!("$ sockmesh init istio {}", shown.join(" "));
    print!("{}", pods::apply_sockmesh(&lab, &pod, &profile)?);

    step("connections from the pod");
    let proxy = CALLERS[2];
    let app = CALLERS[0];
    let cases: Vec<(Caller, String, &str)> = vec![
        (
            app,
            format!("{PEER_V4}:80"),
            "the app calls a remote service: captured",
        ),
        (
            app,
            "198.51.100.10:80".into(),
            "another remote address: captured",
        ),
        (
            app,
            format!("[{PEER_V6}]:80"),
            "IPv6 (dual-stack pod): captured",
        ),
        (
            proxy,
            format!("{PEER_V4}:80"),
            "the proxy (uid 1337) calls out: not captured",
        ),
        (
            proxy,
            format!("{POD_V4}:8080"),
            "the proxy calls its own pod IP: inbound port",
        ),
        (
            app,
            "127.0.0.1:8080".into(),
            "the app calls localhost: not captured",
        ),
        (
            Caller::new_peer(),
            format!("{POD_V4}:8080"),
            "a peer host calls the app's port: inbound capture (sk_lookup), no NAT",
        ),
        (
            Caller::new_peer(),
            format!("{POD_V4}:15008"),
            "a peer host calls the tunnel port: never captured",
        ),
    ];
    for (caller, dst, what) in cases {
        println!("{what}\n  {} -> {dst}", caller.name);
        let case = Case::new(caller, dst.parse()?);
        let o = pods::probe(&lab, &pod, &case)?;
        println!("  {}", describe(&o));
    }

    step("a connection held open while we look at the maps");
    let held = Connect {
        hold_ms: 3000,
        ..Connect::new(format!("{PEER_V4}:9090").parse()?, Identity::APP)
    };
    let mut hold = lab.testkit(pod.place(), &held)?;
    hold.stdout(std::process::Stdio::null());
    let child = hold.spawn()?;
    std::thread::sleep(Duration::from_millis(500));

    step("sockmesh dump");
    let out = run_cmd(
        Command::new(sockmesh_bin()?)
            .arg("dump")
            .arg("--bpffs")
            .arg(&lab.bpffs),
    )?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let _ = child.wait_with_output();

    step("clean-up: namespaces, cgroup, bpffs and agent are removed");
    drop(lab);
    println!("done");
    Ok(())
}

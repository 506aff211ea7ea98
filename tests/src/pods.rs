//! The standard topology of the suites: a pod and a peer host joined by a veth pair, listeners
//! in both, and connections made from the pod as different callers.
//!
//! Addresses come from the documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24,
//! 2001:db8::/32) and exist only inside the lab's namespaces.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};

use crate::{
    kit::{Connect, Identity, Listen, Listener, ListenerKind, Outcome, UdpMode},
    lab::{run, Lab, Netns, Place},
    profiles::Profile,
};

pub const POD_V4: &str = "192.0.2.10";
pub const PEER_V4: &str = "192.0.2.20";
pub const POD_V6: &str = "2001:db8::10";
pub const PEER_V6: &str = "2001:db8::20";

/// Extra addresses the peer answers on (routed through it), to exercise CIDR lists.
pub const PEER_EXTRA: [&str; 5] = [
    "198.51.100.10",
    "198.51.100.200",
    "203.0.113.10",
    "2001:db8:1::10",
    "2001:db8:2::10",
];

/// Ports the peer listens on.
pub const PEER_PORTS: [u16; 5] = [80, 8081, 9090, 9091, 15008];
/// Ports listened on in the pod: outbound/inbound capture, and the app (8080, 22, 9090) and
/// the proxy's own ports (15090, 15008) for what inbound capture must leave alone.
pub const POD_PORTS: [u16; 9] = [15001, 15006, 4140, 4143, 8080, 22, 9090, 15090, 15008];

/// Ports the peer connects to on the pod.
pub const INBOUND_PORTS: [u16; 11] = [
    8080, 22, 9090, 15008, 15090, 15021, 15020, 15001, 15006, 4143, 4191,
];

pub struct Pod {
    pub ns: Netns,
    pub peer: Netns,
    /// A second host on a second interface (eth1), for `-c` and `-k`.
    pub peer2: Option<Netns>,
    pub in_cgroup: bool,
}

impl Pod {
    /// In the pod (and in the lab's cgroup when it is captured by sockmesh), as root.
    pub fn place(&self) -> Place<'_> {
        Place::new(&self.ns, self.in_cgroup)
    }

    /// On the pod's peer host, as root.
    pub fn peer_place(&self) -> Place<'_> {
        Place::new(&self.peer, false)
    }
}

/// The pod's second link (eth1): the pod and the second host, and what is routed there.
pub const POD_ETH1: &str = "198.18.0.10";
pub const PEER2: &str = "198.18.0.20";
pub const VIA_ETH1: &str = "203.0.113.0/24";

/// How a pod is captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Sockmesh,
}

/// A lab for pods captured by `mode`: with its agent running when sockmesh captures them.
pub fn lab_for(tag: &str, mode: Mode) -> Result<Lab> {
    match mode {
        Mode::Iptables => Lab::new(tag),
        Mode::Sockmesh => Lab::with_agent(tag),
    }
}

/// Capture `pod` by `mode`: `profile`'s istio-iptables rules, or registration with sockmesh.
pub fn capture(lab: &Lab, pod: &Pod, profile: &Profile, mode: Mode) -> Result<()> {
    match mode {
        Mode::Iptables => apply_iptables(pod, profile),
        Mode::Sockmesh => apply_sockmesh(lab, pod, profile).map(|_| ()),
    }
}

/// [`pod_with`], then [`capture`]: a pod captured by `mode`, listening on `pod_ports`.
pub fn captured(
    lab: &mut Lab,
    tag: &str,
    profile: &Profile,
    mode: Mode,
    pod_ports: &[u16],
) -> Result<Pod> {
    let pod = pod_with(lab, tag, profile, mode, pod_ports)?;
    capture(lab, &pod, profile, mode)?;
    Ok(pod)
}

/// Build a pod and its peer in `lab`, with the standard listeners, for `profile`.
pub fn pod(lab: &mut Lab, tag: &str, profile: &Profile, mode: Mode) -> Result<Pod> {
    pod_with(lab, tag, profile, mode, &POD_PORTS)
}

/// [`pod`], listening in the pod only on `pod_ports`.
pub fn pod_with(
    lab: &mut Lab,
    tag: &str,
    profile: &Profile,
    mode: Mode,
    pod_ports: &[u16],
) -> Result<Pod> {
    let ns = lab.netns(&format!("{tag}p"))?;
    pod_in(lab, ns, tag, profile, mode, pod_ports)
}

/// [`pod_with`] in the namespace `ns` made already (one owned by a user namespace of its own,
/// say).
pub fn pod_in(
    lab: &mut Lab,
    ns: Netns,
    tag: &str,
    profile: &Profile,
    mode: Mode,
    pod_ports: &[u16],
) -> Result<Pod> {
    // TPROXY only hands connections to transparent listeners (as Envoy's with
    // `transparent: true`).
    let transparent: &[u16] = if profile.tproxy { &[15006] } else { &[] };
    pod_in_with(lab, ns, tag, profile, mode, pod_ports, transparent)
}

fn pod_in_with(
    lab: &mut Lab,
    ns: Netns,
    tag: &str,
    profile: &Profile,
    mode: Mode,
    pod_ports: &[u16],
    transparent: &[u16],
) -> Result<Pod> {
    let peer = lab.netns(&format!("{tag}q"))?;
    lab.veth(&ns, "eth0", &peer, "eth0")?;
    peer.ip(&["addr", "add", &format!("{PEER_V4}/24"), "dev", "eth0"])?;
    peer.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{PEER_V6}/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    for a in PEER_EXTRA {
        if a.contains(':') {
            peer.ip(&["-6", "addr", "add", &format!("{a}/128"), "dev", "lo"])?;
        } else {
            peer.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
        }
    }
    if profile.pod_v4 {
        ns.ip(&["addr", "add", &format!("{POD_V4}/24"), "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", PEER_V4])?;
    }
    if profile.pod_v6 {
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{POD_V6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&["-6", "route", "add", "default", "via", PEER_V6])?;
    }
    let in_cgroup = mode == Mode::Sockmesh;
    if !pod_ports.is_empty() {
        listen_with(lab, &ns, in_cgroup, "pod", pod_ports, transparent)?;
    }
    listen(lab, &peer, false, "peer", &PEER_PORTS)?;
    let peer2 = if profile.second_link() {
        let p2 = lab.netns(&format!("{tag}w"))?;
        lab.veth(&ns, "eth1", &p2, "eth0")?;
        ns.ip(&["addr", "add", &format!("{POD_ETH1}/24"), "dev", "eth1"])?;
        ns.ip(&["route", "add", VIA_ETH1, "via", PEER2])?;
        p2.ip(&["addr", "add", &format!("{PEER2}/24"), "dev", "eth0"])?;
        p2.ip(&["addr", "add", "203.0.113.10/32", "dev", "lo"])?;
        listen(lab, &p2, false, "peer2", &PEER_PORTS)?;
        Some(p2)
    } else {
        None
    };
    if profile.dns.is_some() {
        // A resolver on the peer and one in the pod (tcp and udp 53), and the DNS proxy on
        // localhost:15053 owned by the proxy user, as istio-agent runs it.
        // UDP servers answer from the address they were asked at: one socket per address.
        let peer_dns = Listen {
            listeners: vec![
                Listener::report("peer:53", any_v4(53)),
                Listener::report("peer:53v6", any_v6(53)),
                udp("peer:53", SocketAddr::new(PEER_V4.parse()?, 53)),
                udp("peer:53", SocketAddr::new(PEER_EXTRA[0].parse()?, 53)),
                udp("peer:53v6", SocketAddr::new(PEER_V6.parse()?, 53)),
            ],
        };
        let pod_dns = Listen {
            listeners: vec![
                Listener::report("pod:53", any_v4(53)),
                Listener::report("pod:53v6", any_v6(53)),
                udp("pod:53", any_v4(53)),
                udp("pod:53v6", any_v6(53)),
            ],
        };
        let (lo4, lo6) = ("127.0.0.1:15053".parse()?, "[::1]:15053".parse()?);
        let dns_proxy = Listen {
            listeners: vec![
                Listener::report("dns-proxy", lo4),
                Listener::report("dns-proxyv6", lo6),
                udp("dns-proxy", lo4),
                udp("dns-proxyv6", lo6),
            ],
        };
        lab.start(Place::new(&peer, false), &peer_dns)?;
        let in_pod = Place::new(&ns, in_cgroup);
        lab.start(in_pod, &pod_dns)?;
        lab.start(in_pod.as_user(1337), &dns_proxy)?;
    }
    Ok(Pod {
        ns,
        peer,
        peer2,
        in_cgroup,
    })
}

/// Start testkit listeners named `name:PORT` (and `name:PORTv6`) on every address of `ns`.
pub fn listen(lab: &mut Lab, ns: &Netns, in_cgroup: bool, name: &str, ports: &[u16]) -> Result<()> {
    listen_with(lab, ns, in_cgroup, name, ports, &[])
}

/// [`listen`], with the `transparent` ports' listeners IP_TRANSPARENT.
pub fn listen_with(
    lab: &mut Lab,
    ns: &Netns,
    in_cgroup: bool,
    name: &str,
    ports: &[u16],
    transparent: &[u16],
) -> Result<()> {
    let mut listeners = Vec::new();
    for &p in ports {
        let kind = if transparent.contains(&p) {
            ListenerKind::Transparent
        } else {
            ListenerKind::Report
        };
        listeners.push(Listener::new(kind, format!("{name}:{p}"), any_v4(p)));
        listeners.push(Listener::new(kind, format!("{name}:{p}v6"), any_v6(p)));
    }
    lab.start(Place::new(ns, in_cgroup), &Listen { listeners })
        .map(|_| ())
}

/// 0.0.0.0:`port`.
pub fn any_v4(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

/// [::]:`port`.
pub fn any_v6(port: u16) -> SocketAddr {
    SocketAddr::from(([0u16; 8], port))
}

/// A UDP listener.
fn udp(name: &str, addr: SocketAddr) -> Listener {
    Listener::new(ListenerKind::Udp, name, addr)
}

/// Load `profile`'s istio-iptables rules into the pod with the real iptables-restore (and, as
/// istio-iptables does when IPv6 is on, put ::6 on lo).
pub fn apply_iptables(pod: &Pod, profile: &Profile) -> Result<()> {
    if profile.ipv6_rules() {
        pod.ns
            .ip(&["-6", "addr", "add", "::6/128", "dev", "lo", "nodad"])?;
    }
    if profile.tproxy {
        // istio-iptables' TPROXY routing: marked packets are delivered locally.
        pod.ns
            .ip(&["rule", "add", "fwmark", "1337", "lookup", "133"])?;
        pod.ns.ip(&[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "133",
        ])?;
        if profile.ipv6_rules() {
            pod.ns
                .ip(&["-6", "rule", "add", "fwmark", "1337", "lookup", "133"])?;
            pod.ns.ip(&[
                "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "133",
            ])?;
        }
    }
    for (v6, bin) in [(false, "iptables-restore"), (true, "ip6tables-restore")] {
        if v6 && !profile.ipv6_rules() {
            continue;
        }
        let rules = profile.rules(v6);
        let path =
            std::env::temp_dir().join(format!("{}-{}.rules", pod.ns.name, if v6 { 6 } else { 4 }));
        std::fs::write(&path, &rules)?;
        let file = std::fs::File::open(&path)?;
        let out = pod
            .ns
            .exec(bin)
            .arg("--noflush")
            .stdin(file)
            .output()
            .with_context(|| format!("running {bin}"))?;
        let _ = std::fs::remove_file(&path);
        if !out.status.success() {
            bail!(
                "{bin} rejected the {} rules: {}\n{rules}",
                profile.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// Register the pod with the lab's agent through `sockmesh init istio` and the profile's argv.
pub fn apply_sockmesh(lab: &Lab, pod: &Pod, profile: &Profile) -> Result<String> {
    apply_sockmesh_env(lab, pod, profile, &[])
}

/// [`apply_sockmesh`] with more environment for `init` (sockmesh's own settings, such as
/// `SOCKMESH_ACCELERATION`).
pub fn apply_sockmesh_env(
    lab: &Lab,
    pod: &Pod,
    profile: &Profile,
    env: &[(&str, &str)],
) -> Result<String> {
    let mut cmd = lab.sockmesh_in(&pod.ns)?;
    cmd.envs(env.iter().copied());
    cmd.args(profile.init_args());
    if let Some(d) = &profile.dns {
        // The pod's resolv.conf (istio-iptables reads /etc/resolv.conf in the pod).
        let path = lab.dir.join(format!("{}-resolv.conf", pod.ns.name));
        std::fs::write(&path, d.resolv_conf())?;
        cmd.env("SOCKMESH_RESOLV_CONF", path);
    }
    for (k, v) in profile.env() {
        cmd.env(k, v);
    }
    let out = run(&mut cmd).with_context(|| format!("agent log:\n{}", lab.agent_log()))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Who makes a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub name: &'static str,
    pub uid: u32,
    pub gid: u32,
    pub bind: Option<&'static str>,
    pub v4_mapped: bool,
    /// The socket is created by root; the caller takes on uid/gid only before connect().
    pub socket_by_root: bool,
    /// Where the connection starts.
    pub origin: Origin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Pod,
    Peer,
    Peer2,
}

impl Caller {
    pub const fn new(name: &'static str, uid: u32, gid: u32) -> Self {
        Caller {
            name,
            uid,
            gid,
            bind: None,
            v4_mapped: false,
            socket_by_root: false,
            origin: Origin::Pod,
        }
    }
    const fn bound(self, addr: &'static str) -> Self {
        Caller {
            bind: Some(addr),
            ..self
        }
    }
    const fn mapped(self) -> Self {
        Caller {
            v4_mapped: true,
            ..self
        }
    }
    /// The peer host connecting to the pod.
    pub const fn new_peer() -> Self {
        Caller {
            origin: Origin::Peer,
            ..Caller::new("peer", 0, 0)
        }
    }
    const fn socket_by_root(self) -> Self {
        Caller {
            socket_by_root: true,
            ..self
        }
    }
}

pub const CALLERS: [Caller; 11] = [
    Caller::new("app", 1000, 1000),
    Caller::new("root", 0, 0),
    Caller::new("proxy-uid", 1337, 1337),
    Caller::new("proxy-gid-only", 1000, 1337),
    Caller::new("second-proxy-uid", 1338, 1338),
    Caller::new("group-2001", 1000, 2001),
    Caller::new("group-2002", 1000, 2002),
    Caller::new("app-v4-mapped", 1000, 1000).mapped(),
    Caller::new("proxy-on-a-root-socket", 1337, 1337).socket_by_root(),
    Caller::new("linkerd-proxy", 2102, 2102),
    // Envoy in TPROXY mode runs as uid 0, gid 1337.
    Caller::new("tproxy-proxy", 0, 1337),
];

/// Callers bound to the inbound passthrough source (only for local destinations).
pub const PASSTHROUGH_CALLERS: [Caller; 2] = [
    Caller::new("app-from-127.0.0.6", 1000, 1000).bound("127.0.0.6"),
    Caller::new("proxy-from-127.0.0.6", 1337, 1337).bound("127.0.0.6"),
];

pub const PASSTHROUGH_CALLERS_V6: [Caller; 1] =
    [Caller::new("proxy-from-::6", 1337, 1337).bound("::6")];

/// Destinations from the pod: (address, is local to the pod).
pub fn destinations(profile: &Profile) -> Vec<(SocketAddr, bool)> {
    let mut d: Vec<(String, bool)> = Vec::new();
    if profile.pod_v4 {
        for p in [80, 8081, 9090, 9091, 15008] {
            d.push((format!("{PEER_V4}:{p}"), false));
        }
        for a in &PEER_EXTRA[..3] {
            d.push((format!("{a}:80"), false));
        }
        d.push((format!("{POD_V4}:8080"), true));
        d.push((format!("{POD_V4}:15008"), true));
    }
    d.push(("127.0.0.1:8080".into(), true));
    d.push(("127.0.0.2:8080".into(), true));
    d.push(("127.1.2.3:8080".into(), true));
    if profile.pod_v6 {
        d.push((format!("[{PEER_V6}]:80"), false));
        d.push((format!("[{PEER_V6}]:9090"), false));
        for a in &PEER_EXTRA[3..] {
            d.push((format!("[{a}]:80"), false));
        }
        d.push((format!("[{POD_V6}]:8080"), true));
        d.push(("[::1]:8080".into(), true));
    }
    d.into_iter()
        .map(|(a, l)| (a.parse().expect("valid test address"), l))
        .collect()
}

/// One probe: a caller and a destination.
#[derive(Clone, Debug)]
pub struct Case {
    pub caller: Caller,
    pub dst: SocketAddr,
    /// A UDP datagram instead of a TCP connection.
    pub udp: Option<UdpMode>,
}

impl Case {
    pub fn new(caller: Caller, dst: SocketAddr) -> Self {
        Case {
            caller,
            dst,
            udp: None,
        }
    }

    /// The testkit's `connect` that makes this probe.
    pub fn launcher(&self) -> Connect {
        let c = &self.caller;
        Connect {
            bind: c.bind.map(|b| b.parse().expect("valid test address")),
            v4_mapped: c.v4_mapped,
            creds_after_socket: c.socket_by_root,
            udp: self.udp,
            ..Connect::new(self.dst, Identity::of(c.uid, c.gid))
        }
    }

    pub fn label(&self) -> String {
        let proto = match self.udp {
            None => "",
            Some(UdpMode::Connected) => " (udp, connected)",
            Some(UdpMode::Unconnected) => " (udp, unconnected)",
        };
        format!("{} -> {}{proto}", self.caller.name, self.dst)
    }
}

/// DNS cases: tcp and udp (connected and not) to the resolv.conf server, another server, the
/// pod itself and localhost, as the app, root and the proxy.
fn dns_cases(profile: &Profile) -> Vec<Case> {
    let mut dsts = vec!["127.0.0.1:53".to_string()];
    if profile.pod_v4 {
        dsts.extend([
            format!("{PEER_V4}:53"),
            "198.51.100.10:53".into(),
            format!("{POD_V4}:53"),
        ]);
    }
    if profile.pod_v6 {
        dsts.extend([format!("[{PEER_V6}]:53"), "[::1]:53".into()]);
    }
    let mut out = Vec::new();
    for dst in dsts {
        let dst: SocketAddr = dst.parse().expect("addr");
        for caller in [CALLERS[0], CALLERS[1], CALLERS[2], CALLERS[3]] {
            for udp in [None, Some(UdpMode::Connected), Some(UdpMode::Unconnected)] {
                out.push(Case { caller, dst, udp });
            }
        }
    }
    out
}

pub fn cases(profile: &Profile) -> Vec<Case> {
    let mut out = Vec::new();
    for (dst, local) in destinations(profile) {
        for caller in CALLERS {
            if caller.v4_mapped && !dst.is_ipv4() {
                continue;
            }
            out.push(Case::new(caller, dst));
        }
        if local && dst.is_ipv4() {
            for caller in PASSTHROUGH_CALLERS {
                out.push(Case::new(caller, dst));
            }
        }
        if local && dst.is_ipv6() {
            for caller in PASSTHROUGH_CALLERS_V6 {
                out.push(Case::new(caller, dst));
            }
        }
    }
    if profile.dns.is_some() {
        out.extend(dns_cases(profile));
    }
    out
}

/// Connections from the peer host to the pod's addresses (inbound capture), and from the second
/// host to the pod's second address when there is one.
pub fn inbound_cases(profile: &Profile) -> Vec<Case> {
    let peer = Caller::new_peer();
    let mut out = Vec::new();
    for port in INBOUND_PORTS {
        if profile.pod_v4 {
            out.push(Case::new(
                peer,
                format!("{POD_V4}:{port}").parse().expect("addr"),
            ));
        }
        if profile.pod_v6 {
            out.push(Case::new(
                peer,
                format!("[{POD_V6}]:{port}").parse().expect("addr"),
            ));
        }
        if profile.second_link() {
            let peer2 = Caller {
                origin: Origin::Peer2,
                ..Caller::new("peer2", 0, 0)
            };
            out.push(Case::new(
                peer2,
                format!("{POD_ETH1}:{port}").parse().expect("addr"),
            ));
        }
    }
    out
}

/// Make the connection of `case` from the peer host to the pod.
pub fn probe_from_peer(lab: &Lab, pod: &Pod, case: &Case) -> Result<Outcome> {
    probe_in(lab, &pod.peer, false, case)
}

/// Make the connection of `case` from where its caller is (the pod, or a peer host) and
/// report where it landed.
pub fn probe(lab: &Lab, pod: &Pod, case: &Case) -> Result<Outcome> {
    match case.caller.origin {
        Origin::Pod => probe_in(lab, &pod.ns, pod.in_cgroup, case),
        Origin::Peer => probe_from_peer(lab, pod, case),
        Origin::Peer2 => {
            let p2 = pod.peer2.as_ref().context("this pod has no second link")?;
            probe_in(lab, p2, false, case)
        }
    }
}

fn probe_in(lab: &Lab, ns: &Netns, in_cgroup: bool, case: &Case) -> Result<Outcome> {
    connect(lab, Place::new(ns, in_cgroup), &case.launcher())
}

/// Run the testkit's `connect` at `place`; where it landed.
pub fn connect(lab: &Lab, place: Place, program: &Connect) -> Result<Outcome> {
    let out = lab.output(place, program)?;
    serde_json::from_str(&out).with_context(|| format!("testkit output: {out}"))
}

/// Two pods, A (192.0.2.10) and B (192.0.2.11), on a bridge in a third namespace (the node).
pub struct TwoPods {
    pub a: Pod,
    pub b: Pod,
}

pub const POD_B_V4: &str = "192.0.2.11";

pub fn two_pods(lab: &mut Lab, tag: &str, mode: Mode) -> Result<TwoPods> {
    let node = lab.netns(&format!("{tag}n"))?;
    node.ip(&["link", "add", "br0", "type", "bridge"])?;
    node.ip(&["addr", "add", "192.0.2.1/24", "dev", "br0"])?;
    node.ip(&["link", "set", "br0", "up"])?;
    let in_cgroup = mode == Mode::Sockmesh;
    let mut pods = Vec::new();
    for (name, ip) in [("a", POD_V4), ("b", POD_B_V4)] {
        let ns = lab.netns(&format!("{tag}{name}"))?;
        let port = format!("v{name}");
        lab.veth(&ns, "eth0", &node, &port)?;
        node.ip(&["link", "set", &port, "master", "br0"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.ip(&["route", "add", "default", "via", "192.0.2.1"])?;
        pods.push(Pod {
            ns,
            peer: node.clone(),
            peer2: None,
            in_cgroup,
        });
    }
    let b = pods.pop().expect("two pods");
    let a = pods.pop().expect("two pods");
    Ok(TwoPods { a, b })
}

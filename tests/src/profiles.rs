//! istio-iptables profiles: the `istio-iptables` argv and environment of each, and the nat rules
//! istio-iptables programs for it, as text for the real `iptables-restore --noflush`.
//!
//! These are the reference rules of the conformance suite: for each profile, the output of
//! istio-iptables' rule builder (its nat table in REDIRECT mode: the ISTIO_OUTPUT,
//! ISTIO_REDIRECT, ISTIO_IN_REDIRECT and ISTIO_INBOUND chains and, with DNS capture, their DNS
//! rules; in TPROXY mode its mangle table as well), written out here by hand with the same
//! chains, the same rules and the same order, and linkerd2-proxy-init's for the linkerd
//! profiles. They are deliberately not derived from sockmesh's decision function, so the suite
//! compares sockmesh with an independent reference that the kernel's netfilter evaluates.

/// linkerd2-proxy-init's settings (its flags of the same names).
#[derive(Clone, Debug)]
pub struct Linkerd {
    pub inbound_ignore: Vec<&'static str>,
    pub outbound_ignore: Vec<&'static str>,
    pub subnets_ignore: Vec<&'static str>,
    pub redirect_ports: Vec<u16>,
    pub ipv6: bool,
}

/// istio's DNS capture: `--redirect-dns`, with `--capture-all-dns` or the pod's resolv.conf.
#[derive(Clone, Debug)]
pub struct Dns {
    pub capture_all: bool,
    /// The pod's resolv.conf nameservers.
    pub servers: Vec<&'static str>,
}

impl Dns {
    /// Whether istio would capture DNS at all (without capture-all it needs a server).
    pub fn enabled(&self) -> bool {
        self.capture_all || !self.servers.is_empty()
    }

    /// Whether the DNS chain exists for a family.
    fn chain(&self, v6: bool) -> bool {
        self.capture_all || self.servers.iter().any(|s| s.contains(':') == v6)
    }

    pub fn resolv_conf(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("nameserver {s}\n"))
            .collect()
    }
}

/// A capture profile: istio-iptables' (the fields below) or, when `linkerd` is set,
/// linkerd2-proxy-init's (ports, `uids`/`gids` as the proxy uid/gid, and the `Linkerd` fields).
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: &'static str,
    pub linkerd: Option<Linkerd>,
    pub dns: Option<Dns>,
    /// `-c`
    pub exclude_ifaces: Vec<&'static str>,
    /// `-k`
    pub kube_virt_ifaces: Vec<&'static str>,
    /// `-m TPROXY` (mark 1337, table 133)
    pub tproxy: bool,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub tunnel_port: u16,
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    /// `-i`: `*`, or CIDRs.
    pub include: Vec<String>,
    /// `-x`
    pub exclude: Vec<String>,
    /// `-q`
    pub outbound_ports: Vec<u16>,
    /// `-o`
    pub outbound_exclude_ports: Vec<u16>,
    /// `-b`: `*`, or ports.
    pub inbound: Vec<String>,
    /// `-d`
    pub inbound_exclude: Vec<u16>,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` (None = `*`).
    pub owner_groups: Option<Vec<u32>>,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`
    pub owner_groups_exclude: Vec<u32>,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`
    pub loopback_cidr: Option<&'static str>,
    /// `--dual-stack`
    pub dual_stack: bool,
    /// Pod addresses: whether the pod has an IPv4 and an IPv6 address.
    pub pod_v4: bool,
    pub pod_v6: bool,
}

impl Profile {
    /// The injector's default sidecar argv (`-i '*' -b '*' -d 15090,15021,15020`).
    pub fn default_sidecar() -> Self {
        Profile {
            name: "default-sidecar",
            linkerd: None,
            dns: None,
            exclude_ifaces: vec![],
            kube_virt_ifaces: vec![],
            tproxy: false,
            outbound_port: 15001,
            inbound_port: 15006,
            tunnel_port: 15008,
            uids: vec![1337],
            gids: vec![1337],
            include: vec!["*".into()],
            exclude: vec![],
            outbound_ports: vec![],
            outbound_exclude_ports: vec![],
            inbound: vec!["*".into()],
            inbound_exclude: vec![15090, 15021, 15020],
            owner_groups: None,
            owner_groups_exclude: vec![],
            loopback_cidr: None,
            dual_stack: false,
            pod_v4: true,
            pod_v6: true,
        }
    }

    fn join<T: ToString>(v: &[T]) -> String {
        v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
    }

    /// linkerd's injector default: 4143/4140, uid 2102, ports 4190,4191,4567,4568 and
    /// 4567,4568 ignored, IPv6 on.
    pub fn linkerd_default() -> Self {
        Profile {
            name: "linkerd-default",
            outbound_port: 4140,
            inbound_port: 4143,
            uids: vec![2102],
            gids: vec![],
            linkerd: Some(Linkerd {
                inbound_ignore: vec!["4190", "4191", "4567", "4568"],
                outbound_ignore: vec!["4567", "4568"],
                subnets_ignore: vec![],
                redirect_ports: vec![],
                ipv6: true,
            }),
            ..Profile::default_sidecar()
        }
    }

    /// `sockmesh` arguments that register this profile.
    pub fn init_args(&self) -> Vec<String> {
        let Some(l) = &self.linkerd else {
            let mut a = vec!["init".to_string(), "istio".to_string()];
            a.extend(self.argv());
            return a;
        };
        let mut a: Vec<String> = vec![
            "init".into(),
            "linkerd".into(),
            "--incoming-proxy-port".into(),
            self.inbound_port.to_string(),
            "--outgoing-proxy-port".into(),
            self.outbound_port.to_string(),
        ];
        if let Some(u) = self.uids.first() {
            a.extend(["--proxy-uid".into(), u.to_string()]);
        }
        if let Some(g) = self.gids.first() {
            a.extend(["--proxy-gid".into(), g.to_string()]);
        }
        for (flag, list) in [
            ("--inbound-ports-to-ignore", &l.inbound_ignore),
            ("--outbound-ports-to-ignore", &l.outbound_ignore),
            ("--subnets-to-ignore", &l.subnets_ignore),
        ] {
            if !list.is_empty() {
                a.extend([flag.to_string(), list.join(",")]);
            }
        }
        if !l.redirect_ports.is_empty() {
            a.extend(["--ports-to-redirect".into(), Self::join(&l.redirect_ports)]);
        }
        a.push(format!("--ipv6={}", l.ipv6));
        a
    }

    /// linkerd2-proxy-init's nat rules (its PROXY_INIT_* chains), for iptables-restore.
    fn linkerd_rules(&self, l: &Linkerd, v6: bool) -> String {
        let family = |c: &&&str| c.contains(':') == v6;
        // multiport takes at most 15 ports (a range counts as two); ranges are a:b.
        let chunks = |ports: &[&str]| -> Vec<String> {
            let mut out = Vec::new();
            let mut cur: Vec<String> = Vec::new();
            let mut weight = 0;
            for p in ports {
                let w = if p.contains('-') { 2 } else { 1 };
                if weight + w > 15 {
                    out.push(cur.join(","));
                    cur.clear();
                    weight = 0;
                }
                cur.push(p.replace('-', ":"));
                weight += w;
            }
            if !cur.is_empty() {
                out.push(cur.join(","));
            }
            out
        };
        let mut r = vec!["* nat".to_string(), "-N PROXY_INIT_REDIRECT".into()];
        for c in chunks(&l.inbound_ignore) {
            r.push(format!(
                "-A PROXY_INIT_REDIRECT -p tcp --match multiport --dports {c} -j RETURN"
            ));
        }
        for s in l.subnets_ignore.iter().filter(family) {
            r.push(format!("-A PROXY_INIT_REDIRECT -p all -s {s} -j RETURN"));
        }
        if l.redirect_ports.is_empty() {
            r.push(format!(
                "-A PROXY_INIT_REDIRECT -p tcp -j REDIRECT --to-port {}",
                self.inbound_port
            ));
        } else {
            for p in &l.redirect_ports {
                r.push(format!(
                    "-A PROXY_INIT_REDIRECT -p tcp --destination-port {p} -j REDIRECT --to-port {}",
                    self.inbound_port
                ));
            }
        }
        r.push("-A PREROUTING -j PROXY_INIT_REDIRECT".into());
        r.push("-N PROXY_INIT_OUTPUT".into());
        for u in &self.uids {
            r.push(format!(
                "-A PROXY_INIT_OUTPUT -m owner --uid-owner {u} -j RETURN"
            ));
        }
        for g in &self.gids {
            r.push(format!(
                "-A PROXY_INIT_OUTPUT -m owner --gid-owner {g} -j RETURN"
            ));
        }
        r.push("-A PROXY_INIT_OUTPUT -o lo -j RETURN".into());
        for c in chunks(&l.outbound_ignore) {
            r.push(format!(
                "-A PROXY_INIT_OUTPUT -p tcp --match multiport --dports {c} -j RETURN"
            ));
        }
        r.push(format!(
            "-A PROXY_INIT_OUTPUT -p tcp -j REDIRECT --to-port {}",
            self.outbound_port
        ));
        r.push("-A OUTPUT -j PROXY_INIT_OUTPUT".into());
        r.push("COMMIT".into());
        let mut text = r.join("\n");
        text.push('\n');
        text
    }

    /// istio-iptables' mangle table in TPROXY mode: inbound TPROXY to the inbound port, the proxy's
    /// own calls to local addresses marked 1338 and TPROXYed too, CONNMARK for replies.
    fn tproxy_mangle(&self, lo_cidr: &str, passthrough: &str) -> Vec<String> {
        const MARK: u32 = 1337;
        let mut r = vec![
            "* mangle".to_string(),
            "-N ISTIO_DIVERT".into(),
            "-N ISTIO_TPROXY".into(),
            "-N ISTIO_INBOUND".into(),
            format!("-A ISTIO_DIVERT -j MARK --set-mark {MARK}"),
            "-A ISTIO_DIVERT -j ACCEPT".into(),
            format!(
                "-A ISTIO_TPROXY ! -d {lo_cidr} -p tcp -j TPROXY --tproxy-mark {MARK}/0xffffffff --on-port {}",
                self.inbound_port
            ),
            "-A PREROUTING -p tcp -j ISTIO_INBOUND".into(),
            format!("-A ISTIO_INBOUND -p tcp -m mark --mark {MARK} -j RETURN"),
            format!("-A ISTIO_INBOUND -p tcp -s {passthrough} -i lo -j RETURN"),
            "-A ISTIO_INBOUND -p tcp -i lo -m mark ! --mark 1338 -j RETURN".into(),
        ];
        let est = "-m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT";
        if self.inbound == ["*"] {
            for d in &self.inbound_exclude {
                r.push(format!("-A ISTIO_INBOUND -p tcp --dport {d} -j RETURN"));
            }
            r.push(format!("-A ISTIO_INBOUND -p tcp {est}"));
            r.push("-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY".into());
        } else {
            for b in &self.inbound {
                r.push(format!("-A ISTIO_INBOUND -p tcp --dport {b} {est}"));
                r.push(format!(
                    "-A ISTIO_INBOUND -p tcp --dport {b} -j ISTIO_TPROXY"
                ));
            }
        }
        r.push(format!(
            "-A PREROUTING -p tcp -m mark --mark {MARK} -j CONNMARK --save-mark"
        ));
        r.push(format!(
            "-A OUTPUT -p tcp -o lo -m mark --mark {MARK} -j RETURN"
        ));
        for (ids, flag) in [(&self.uids, "--uid-owner"), (&self.gids, "--gid-owner")] {
            for id in ids {
                r.push(format!(
                    "-A OUTPUT ! -d {lo_cidr} -p tcp -o lo -m owner {flag} {id} -j MARK --set-mark 1338"
                ));
            }
        }
        r.push(format!(
            "-A OUTPUT -p tcp -m connmark --mark {MARK} -j CONNMARK --restore-mark"
        ));
        r.push("COMMIT".into());
        r
    }

    /// The `istio-iptables` arguments (without argv[0]).
    pub fn argv(&self) -> Vec<String> {
        let mut a = vec![
            "-p".into(),
            self.outbound_port.to_string(),
            "-z".into(),
            self.inbound_port.to_string(),
            "-u".into(),
            Self::join(&self.uids),
            "-g".into(),
            Self::join(&self.gids),
            "-m".into(),
            if self.tproxy { "TPROXY" } else { "REDIRECT" }.into(),
            "-i".into(),
            Self::join(&self.include),
            "-x".into(),
            Self::join(&self.exclude),
            "-b".into(),
            Self::join(&self.inbound),
            "-d".into(),
            Self::join(&self.inbound_exclude),
        ];
        if !self.outbound_ports.is_empty() {
            a.push("-q".into());
            a.push(Self::join(&self.outbound_ports));
        }
        if !self.outbound_exclude_ports.is_empty() {
            a.push("-o".into());
            a.push(Self::join(&self.outbound_exclude_ports));
        }
        if self.dual_stack {
            a.push("--dual-stack".into());
        }
        if !self.exclude_ifaces.is_empty() {
            a.push("-c".into());
            a.push(self.exclude_ifaces.join(","));
        }
        if !self.kube_virt_ifaces.is_empty() {
            a.push("-k".into());
            a.push(self.kube_virt_ifaces.join(","));
        }
        if let Some(d) = &self.dns {
            a.push("--redirect-dns".into());
            if d.capture_all {
                a.push("--capture-all-dns".into());
            }
        }
        a
    }

    /// Environment variables for `istio-iptables`.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut e = Vec::new();
        if let Some(g) = &self.owner_groups {
            e.push(("ISTIO_OUTBOUND_OWNER_GROUPS".into(), Self::join(g)));
        }
        if !self.owner_groups_exclude.is_empty() {
            e.push((
                "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE".into(),
                Self::join(&self.owner_groups_exclude),
            ));
        }
        if let Some(c) = self.loopback_cidr {
            e.push(("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR".into(), c.into()));
        }
        e
    }

    /// Whether the pod needs a second interface (for `-c` / `-k`).
    pub fn second_link(&self) -> bool {
        !self.exclude_ifaces.is_empty() || !self.kube_virt_ifaces.is_empty()
    }

    /// Whether istio would install ip6tables rules: the first non-loopback address is v6
    /// (a v6-only pod here), or `--dual-stack` with a v6 address.
    pub fn ipv6_rules(&self) -> bool {
        match &self.linkerd {
            Some(l) => l.ipv6,
            None => self.pod_v6 && (!self.pod_v4 || self.dual_stack),
        }
    }

    /// The nat table the init container feeds to iptables-restore (`v6`: ip6tables-restore).
    pub fn rules(&self, v6: bool) -> String {
        if let Some(l) = &self.linkerd {
            return self.linkerd_rules(l, v6);
        }
        let (passthrough, lo_cidr) = if v6 {
            ("::6/128".to_string(), "::1/128".to_string())
        } else {
            (
                "127.0.0.6/32".to_string(),
                self.loopback_cidr.unwrap_or("127.0.0.1/32").to_string(),
            )
        };
        let family = |c: &String| c.contains(':') == v6;
        let mut r = vec![
            "* nat".to_string(),
            "-N ISTIO_INBOUND".into(),
            "-N ISTIO_REDIRECT".into(),
            "-N ISTIO_IN_REDIRECT".into(),
            "-N ISTIO_OUTPUT".into(),
            format!(
                "-A ISTIO_INBOUND -p tcp --dport {} -j RETURN",
                self.tunnel_port
            ),
            format!(
                "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports {}",
                self.outbound_port
            ),
            format!(
                "-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports {}",
                self.inbound_port
            ),
        ];
        // -c: appended to PREROUTING and OUTPUT ahead of the jumps to istio's chains.
        for x in &self.exclude_ifaces {
            r.push(format!("-A PREROUTING -i {x} -j RETURN"));
            r.push(format!("-A OUTPUT -o {x} -j RETURN"));
        }
        // In TPROXY mode inbound capture lives in the mangle table instead.
        if !self.inbound.is_empty() && !self.tproxy {
            r.push("-A PREROUTING -p tcp -j ISTIO_INBOUND".into());
            if self.inbound == ["*"] {
                for d in &self.inbound_exclude {
                    r.push(format!("-A ISTIO_INBOUND -p tcp --dport {d} -j RETURN"));
                }
                r.push("-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT".into());
            } else {
                for b in &self.inbound {
                    r.push(format!(
                        "-A ISTIO_INBOUND -p tcp --dport {b} -j ISTIO_IN_REDIRECT"
                    ));
                }
            }
        }
        r.push("-A OUTPUT -j ISTIO_OUTPUT".into());
        for o in &self.outbound_exclude_ports {
            r.push(format!("-A ISTIO_OUTPUT -p tcp --dport {o} -j RETURN"));
            r.push(format!("-A ISTIO_OUTPUT -p udp --dport {o} -j RETURN"));
        }
        r.push(format!("-A ISTIO_OUTPUT -o lo -s {passthrough} -j RETURN"));
        let lo_in_include = self
            .include
            .iter()
            .any(|c| c.starts_with("127.") || c.starts_with("::1/"));
        let dns = self.dns.as_ref().filter(|d| d.enabled());
        for (ids, flag) in [(&self.uids, "--uid-owner"), (&self.gids, "--gid-owner")] {
            for id in ids {
                // With DNS capture the uid rule spares 53 as well; the gid rule does not.
                let ports = if dns.is_some() && flag == "--uid-owner" {
                    format!("-m multiport ! --dports 53,{}", self.tunnel_port)
                } else {
                    format!("! --dport {}", self.tunnel_port)
                };
                r.push(format!(
                    "-A ISTIO_OUTPUT -o lo ! -d {lo_cidr} -p tcp {ports} -m owner {flag} {id} -j ISTIO_IN_REDIRECT"
                ));
                if !lo_in_include {
                    let proto = if dns.is_some() {
                        "-p tcp ! --dport 53 "
                    } else {
                        ""
                    };
                    r.push(format!(
                        "-A ISTIO_OUTPUT -o lo {proto}-m owner ! {flag} {id} -j RETURN"
                    ));
                }
                r.push(format!("-A ISTIO_OUTPUT -m owner {flag} {id} -j RETURN"));
            }
        }
        match &self.owner_groups {
            Some(groups) => {
                let matches: Vec<String> = groups
                    .iter()
                    .map(|g| format!("-m owner ! --gid-owner {g}"))
                    .collect();
                r.push(format!("-A ISTIO_OUTPUT {} -j RETURN", matches.join(" ")));
            }
            None => {
                for g in &self.owner_groups_exclude {
                    r.push(format!(
                        "-A ISTIO_OUTPUT -m owner --gid-owner {g} -j RETURN"
                    ));
                }
            }
        }
        let dns_chain = dns.filter(|d| d.chain(v6));
        if let Some(d) = dns_chain {
            r.push("-N ISTIO_OUTPUT_DNS".into());
            r.push("-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS".into());
            let servers: Vec<String> = if d.capture_all {
                vec![String::new()]
            } else {
                let len = if v6 { 128 } else { 32 };
                d.servers
                    .iter()
                    .filter(|s| s.contains(':') == v6)
                    .map(|s| format!("-d {s}/{len} "))
                    .collect()
            };
            for s in &servers {
                r.push(format!(
                    "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 {s}-j REDIRECT --to-ports 15053"
                ));
                r.push(format!(
                    "-A ISTIO_OUTPUT_DNS -p udp --dport 53 {s}-j REDIRECT --to-port 15053"
                ));
            }
        }
        r.push(format!("-A ISTIO_OUTPUT -d {lo_cidr} -j RETURN"));
        for x in self.exclude.iter().filter(|c| family(c)) {
            r.push(format!("-A ISTIO_OUTPUT -d {x} -j RETURN"));
        }
        for q in &self.outbound_ports {
            r.push(format!(
                "-A ISTIO_OUTPUT -p tcp --dport {q} -j ISTIO_REDIRECT"
            ));
        }
        if self.include == ["*"] {
            r.push("-A ISTIO_OUTPUT -j ISTIO_REDIRECT".into());
        } else {
            for i in self.include.iter().filter(|c| family(c)) {
                r.push(format!("-A ISTIO_OUTPUT -d {i} -j ISTIO_REDIRECT"));
            }
        }
        // -k: inserted at the top of PREROUTING; with an -i list, a RETURN first and the
        // per-CIDR redirects above it.
        for k in &self.kube_virt_ifaces {
            if self.include == ["*"] {
                r.push(format!("-I PREROUTING 1 -i {k} -j ISTIO_REDIRECT"));
            } else {
                r.push(format!("-I PREROUTING 1 -i {k} -j RETURN"));
                for i in self.include.iter().filter(|c| family(c)) {
                    r.push(format!("-I PREROUTING 1 -i {k} -d {i} -j ISTIO_REDIRECT"));
                }
            }
        }
        r.push("COMMIT".into());
        if self.tproxy && !self.inbound.is_empty() {
            r.extend(self.tproxy_mangle(&lo_cidr, &passthrough));
        }
        // The raw table's conntrack zones keep the two legs of a proxied DNS exchange apart.
        if let Some(d) = dns_chain {
            r.push("* raw".into());
            r.push("-N ISTIO_OUTPUT_DNS".into());
            r.push("-N ISTIO_INBOUND".into());
            r.push("-A OUTPUT -j ISTIO_OUTPUT_DNS".into());
            for (ids, flag) in [(&self.uids, "--uid-owner"), (&self.gids, "--gid-owner")] {
                for id in ids {
                    r.push(format!(
                        "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner {flag} {id} -j CT --zone 1"
                    ));
                    r.push(format!("-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner {flag} {id} -j CT --zone 2"));
                }
            }
            r.push("-A PREROUTING -j ISTIO_INBOUND".into());
            let servers: Vec<&str> = if d.capture_all {
                vec![""]
            } else {
                d.servers
                    .iter()
                    .copied()
                    .filter(|s| s.contains(':') == v6)
                    .collect()
            };
            for s in servers {
                let (dst, src) = if s.is_empty() {
                    (String::new(), String::new())
                } else {
                    (format!("-d {s} "), format!("-s {s} "))
                };
                r.push(format!(
                    "-A ISTIO_OUTPUT_DNS -p udp --dport 53 {dst}-j CT --zone 2"
                ));
                r.push(format!(
                    "-A ISTIO_INBOUND -p udp --sport 53 {src}-j CT --zone 1"
                ));
            }
            r.push("COMMIT".into());
        }
        let mut text = r.join("\n");
        text.push('\n');
        text
    }
}

/// The profiles the conformance suite runs.
pub fn all() -> Vec<Profile> {
    let d = Profile::default_sidecar;
    vec![
        d(),
        Profile {
            name: "exclude-ports-and-cidrs",
            outbound_exclude_ports: vec![9090],
            exclude: vec!["198.51.100.128/25".into(), "2001:db8:2::/48".into()],
            ..d()
        },
        Profile {
            name: "include-cidrs",
            include: vec![
                "198.51.100.0/26".into(),
                "203.0.113.0/24".into(),
                "2001:db8:1::/48".into(),
            ],
            ..d()
        },
        Profile {
            name: "include-cidrs-long",
            // Hundreds of entries: the LPM trie has no small cap.
            include: (0..=255)
                .map(|i| format!("10.{i}.0.0/16"))
                .chain(["203.0.113.0/25".into()])
                .collect(),
            ..d()
        },
        Profile {
            name: "outbound-ports",
            include: vec![],
            inbound: vec![],
            inbound_exclude: vec![],
            outbound_ports: vec![8081, 9091],
            ..d()
        },
        Profile {
            name: "owner-groups-include",
            owner_groups: Some(vec![2001, 2003]),
            ..d()
        },
        Profile {
            name: "owner-groups-exclude",
            owner_groups_exclude: vec![2002],
            ..d()
        },
        Profile {
            name: "loopback-cidr",
            loopback_cidr: Some("127.0.0.1/8"),
            ..d()
        },
        Profile {
            name: "loopback-include",
            include: vec!["127.1.2.3/32".into(), "198.51.100.0/24".into()],
            ..d()
        },
        Profile {
            name: "multi-uid-gid",
            uids: vec![1337, 1338],
            gids: vec![1337, 1339],
            ..d()
        },
        Profile {
            name: "inbound-ports-list",
            inbound: vec!["8080".into(), "9090".into()],
            // Ignored by istio with a -b list.
            inbound_exclude: vec![8080],
            ..d()
        },
        Profile {
            name: "ipv6-dual-stack",
            dual_stack: true,
            exclude: vec!["2001:db8:2::/48".into()],
            ..d()
        },
        Profile {
            name: "ipv6-only-pod",
            pod_v4: false,
            ..d()
        },
        Profile {
            name: "dns-capture-all",
            dual_stack: true,
            dns: Some(Dns {
                capture_all: true,
                servers: vec![],
            }),
            ..d()
        },
        Profile {
            name: "dns-resolv-conf",
            dns: Some(Dns {
                capture_all: false,
                servers: vec!["192.0.2.20"],
            }),
            ..d()
        },
        Profile {
            name: "dns-resolv-conf-v6",
            dual_stack: true,
            dns: Some(Dns {
                capture_all: false,
                servers: vec!["2001:db8::20", "127.0.0.1"],
            }),
            ..d()
        },
        Profile {
            name: "dns-no-servers",
            dns: Some(Dns {
                capture_all: false,
                servers: vec![],
            }),
            ..d()
        },
        Profile {
            name: "exclude-interface",
            exclude_ifaces: vec!["eth1"],
            ..d()
        },
        Profile {
            name: "kube-virt-interface",
            kube_virt_ifaces: vec!["eth1"],
            ..d()
        },
        Profile {
            name: "kube-virt-interface-cidrs",
            kube_virt_ifaces: vec!["eth1"],
            include: vec!["198.18.0.0/25".into(), "198.51.100.0/24".into()],
            ..d()
        },
        Profile {
            name: "tproxy",
            tproxy: true,
            ..d()
        },
        Profile {
            name: "tproxy-inbound-list",
            tproxy: true,
            inbound: vec!["8080".into(), "15008".into()],
            dual_stack: true,
            ..d()
        },
        Profile::linkerd_default(),
        Profile {
            name: "linkerd-options",
            gids: vec![1337],
            linkerd: Some(Linkerd {
                inbound_ignore: vec!["4190-4191", "9090"],
                outbound_ignore: vec!["9090-9091", "15008"],
                subnets_ignore: vec!["2001:db8::/120"],
                redirect_ports: vec![],
                ipv6: true,
            }),
            ..Profile::linkerd_default()
        },
        Profile {
            name: "linkerd-redirect-list",
            linkerd: Some(Linkerd {
                inbound_ignore: vec![],
                outbound_ignore: vec![],
                subnets_ignore: vec!["192.0.2.16/28"],
                redirect_ports: vec![8080, 22],
                ipv6: false,
            }),
            ..Profile::linkerd_default()
        },
    ]
}

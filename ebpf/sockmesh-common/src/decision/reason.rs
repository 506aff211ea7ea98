//! Why a connection was or was not captured: one row per reason, with its counter value, its
//! short name (counters, JSON) and the rule it stands for (`explain`, `--dry-run`).

/// Defines [`Reason`] from one table: each row gives the variant, its value (the counter key
/// in the maps: never reuse one), its name and its rule.
macro_rules! reasons {
    ($(
        $(#[doc = $doc:literal])*
        $variant:ident = $value:literal => $name:literal, $rule:literal;
    )*) => {
        /// Why a connection was or was not redirected: the rule that made the decision.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Reason {
            $($(#[doc = $doc])* $variant = $value,)*
        }

        impl Reason {
            /// Every reason, in value order (values run 1, 2, ... without gaps).
            pub const ALL: &'static [Reason] = &[$(Reason::$variant),*];

            /// Short snake_case name, used for counters and JSON.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }

            /// The istio-iptables (or linkerd proxy-init) rule this reason stands for, numbered
            /// as in docs/design.md's reference rules.
            pub const fn rule(self) -> &'static str {
                match self {
                    $(Self::$variant => $rule,)*
                }
            }
        }
    };
}

reasons! {
    /// IPv6 traffic of a pod whose IPv6 capture is off: istio installs no ip6tables rules.
    NoIpv6Rules = 1 => "no_ipv6_rules",
        "no ip6tables rules: IPv6 capture is off (pod's first address is IPv4, no --dual-stack)";
    /// Rule 1: destination port is in `-o`.
    OutboundPortExcluded = 2 => "outbound_port_excluded",
        "rule 1: -p tcp|udp --dport P -j RETURN (-o)";
    /// Rule 2: bound to 127.0.0.6 / ::6 towards a local address (inbound passthrough).
    InboundPassthrough = 3 => "inbound_passthrough",
        "rule 2: -o lo -s 127.0.0.6/32 (::6) -j RETURN";
    /// Rule 3a: the proxy uid connects to a local, non-localhost address: inbound port.
    ProxyUidToLocal = 4 => "proxy_uid_to_local",
        "rule 3a: -o lo ! -d LOOPBACK -p tcp ! --dport TUNNEL -m owner --uid-owner U -j ISTIO_IN_REDIRECT";
    /// Rule 3b: another uid talks to a local address.
    LocalTrafficUid = 5 => "local_traffic_uid",
        "rule 3b: -o lo -m owner ! --uid-owner U -j RETURN";
    /// Rule 3c: the proxy uid's own traffic.
    ProxyUid = 6 => "proxy_uid",
        "rule 3c: -m owner --uid-owner U -j RETURN";
    /// Rule 4a: the proxy gid connects to a local, non-localhost address: inbound port.
    ProxyGidToLocal = 7 => "proxy_gid_to_local",
        "rule 4a: -o lo ! -d LOOPBACK -p tcp ! --dport TUNNEL -m owner --gid-owner G -j ISTIO_IN_REDIRECT";
    /// Rule 4b: another gid talks to a local address.
    LocalTrafficGid = 8 => "local_traffic_gid",
        "rule 4b: -o lo -m owner ! --gid-owner G -j RETURN";
    /// Rule 4c: the proxy gid's own traffic.
    ProxyGid = 9 => "proxy_gid",
        "rule 4c: -m owner --gid-owner G -j RETURN";
    /// Rule 5: gid not in `ISTIO_OUTBOUND_OWNER_GROUPS`.
    OwnerGroupNotIncluded = 10 => "owner_group_not_included",
        "rule 5: -m owner ! --gid-owner g1 ... -j RETURN (ISTIO_OUTBOUND_OWNER_GROUPS)";
    /// Rule 5: gid in `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`.
    OwnerGroupExcluded = 11 => "owner_group_excluded",
        "rule 5: -m owner --gid-owner g -j RETURN (ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE)";
    /// Rule 7: destination in the loopback CIDR (127.0.0.1/32 by default, ::1/128).
    LoopbackDestination = 12 => "loopback_destination",
        "rule 7: -d LOOPBACK -j RETURN";
    /// Rule 8: destination in `-x`.
    CidrExcluded = 13 => "cidr_excluded",
        "rule 8: -d CIDR -j RETURN (-x)";
    /// Rule 9: TCP destination port in `-q`.
    OutboundPortIncluded = 14 => "outbound_port_included",
        "rule 9: -p tcp --dport P -j ISTIO_REDIRECT (-q)";
    /// Rule 10: `-i '*'`.
    CaptureAll = 15 => "capture_all",
        "rule 10: -j ISTIO_REDIRECT (-i '*')";
    /// Rule 10: destination in `-i`.
    CidrIncluded = 16 => "cidr_included",
        "rule 10: -d CIDR -j ISTIO_REDIRECT (-i)";
    /// Rule 11: nothing matched.
    NoMatch = 17 => "no_match",
        "rule 11: end of ISTIO_OUTPUT, no rule matched";
    /// Rules 9/10 matched, but istio only redirects TCP.
    NotTcp = 18 => "not_tcp",
        "rule 9/10 matched, but ISTIO_REDIRECT only redirects tcp";
    /// Inbound: the tunnel (HBONE) port is never redirected.
    InboundTunnelPort = 19 => "inbound_tunnel_port",
        "inbound: ISTIO_INBOUND -p tcp --dport TUNNEL -j RETURN";
    /// Inbound: `-b '*'` and the port is in `-d`.
    InboundPortExcluded = 20 => "inbound_port_excluded",
        "inbound: ISTIO_INBOUND -p tcp --dport P -j RETURN (-d)";
    /// Inbound: `-b '*'`.
    InboundCaptureAll = 21 => "inbound_capture_all",
        "inbound: ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT (-b '*')";
    /// Inbound: the port is in the `-b` list.
    InboundPortIncluded = 22 => "inbound_port_included",
        "inbound: ISTIO_INBOUND -p tcp --dport P -j ISTIO_IN_REDIRECT (-b)";
    /// Inbound: a `-b` list without this port.
    InboundPortNotListed = 23 => "inbound_port_not_listed",
        "inbound: end of ISTIO_INBOUND, port not in -b";
    /// Inbound: `-b ''`, no inbound capture.
    InboundOff = 24 => "inbound_off",
        "inbound: -b '' (no PREROUTING jump)";
    /// Inbound: captured, but no proxy listens on the inbound port: refused, as with iptables.
    InboundNoListener = 25 => "inbound_no_listener",
        "inbound: redirected, but nothing listens on the inbound port (refused)";
    /// linkerd: `-o lo -j RETURN`, everything local is left alone.
    LoopbackInterface = 26 => "loopback_interface",
        "linkerd: PROXY_INIT_OUTPUT -o lo -j RETURN";
    /// linkerd inbound: the source is in `--subnets-to-ignore`.
    InboundSubnetIgnored = 27 => "inbound_subnet_ignored",
        "linkerd inbound: PROXY_INIT_REDIRECT -s SUBNET -j RETURN (--subnets-to-ignore)";
    /// Rule 6: DNS (port 53) sent to the DNS proxy on 15053.
    DnsCaptured = 28 => "dns_captured",
        "rule 6: ISTIO_OUTPUT_DNS -p tcp|udp --dport 53 [-d SERVER] -j REDIRECT --to-ports 15053";
    /// Rule 0 (`-c`): the route leaves through an excluded interface, or the connection arrived
    /// on one.
    InterfaceExcluded = 29 => "interface_excluded",
        "rule 0: OUTPUT -o IF -j RETURN / PREROUTING -i IF -j RETURN (-c)";
    /// `-k`: arrived on a kube-virt interface, sent to the outbound port.
    KubeVirtRedirect = 30 => "kube_virt_redirect",
        "inbound: PREROUTING -i IF [-d CIDR] -j ISTIO_REDIRECT (-k)";
    /// `-k` with an `-i` list: arrived on a kube-virt interface for a destination outside it.
    KubeVirtReturn = 31 => "kube_virt_return",
        "inbound: PREROUTING -i IF -j RETURN (-k)";
    /// TPROXY mode: the proxy user calls a local address; marked 1338 and TPROXYed to the
    /// inbound port.
    TproxyToLocal = 32 => "tproxy_to_local",
        "TPROXY: mangle OUTPUT -o lo --uid/gid-owner -j MARK 1338, then ISTIO_TPROXY";
    /// Not a decision: a connection made inside the pod from a non-local (transparent) source
    /// address, remembered so inbound capture leaves it alone as iptables does with lo traffic.
    LocalOrigin = 33 => "local_origin",
        "local traffic from a transparent source: PREROUTING -i lo rules leave it alone";
}

impl Reason {
    pub const fn from_u32(v: u32) -> Option<Reason> {
        if v >= 1 && v <= Self::ALL.len() as u32 {
            // SAFETY: Reason is repr(u32) with the contiguous values 1..=ALL.len()
            // (checked by the reason_table_is_consistent test). No table lookup: in the kernel
            // a bounds-checked index would leave a panic path the verifier rejects.
            Some(unsafe { core::mem::transmute::<u32, Reason>(v) })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn reason_table_is_consistent() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32 + 1);
            assert_eq!(Reason::from_u32(*r as u32), Some(*r));
        }
        assert_eq!(Reason::from_u32(0), None);
        assert_eq!(Reason::from_u32(Reason::ALL.len() as u32 + 1), None);
    }
}

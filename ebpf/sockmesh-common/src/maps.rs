//! The maps' names, sizes, keys and values: one definition for the kernel and for userspace.

use crate::{
    accel::SockKey,
    addr::{from_words, Addr},
    decision::{Arrival, Reason},
    pod::{CidrKind, NetnsCookie},
};

/// Pinned map names (also the file names under the agent's bpffs folder).
pub mod names {
    pub const PODS: &str = "SM_PODS";
    pub const MEMBERS: &str = "SM_MEMBERS";
    pub const CIDRS: &str = "SM_CIDRS";
    pub const LOCAL_ADDRS: &str = "SM_LOCAL_ADDRS";
    pub const ORIG_DST: &str = "SM_ORIG_DST";
    pub const SOCK_DST: &str = "SM_SOCK_DST";
    pub const SOCK_OWNER: &str = "SM_SOCK_OWNER";
    pub const LISTENERS: &str = "SM_LISTENERS";
    pub const ADDR_POD: &str = "SM_ADDR_POD";
    pub const ROUTE_SRC: &str = "SM_ROUTE_SRC";
    pub const COUNTERS: &str = "SM_COUNTERS";
    pub const SOCKS: &str = "SM_SOCKS";
    pub const SOCK_TCP: &str = "SM_SOCK_TCP";
    pub const PEER_SK: &str = "SM_PEER_SK";
    pub const LISTENER_OWNER: &str = "SM_LISTENER_OWNER";
    pub const CONNECTING: &str = "SM_CONNECTING";
    pub const TIMING: &str = "SM_TIMING";
    pub const HANDOFF: &str = "SM_HANDOFF";
    pub const PARKED: &str = "SM_PARKED";
    pub const ALL: [&str; 19] = [
        PODS,
        MEMBERS,
        CIDRS,
        LOCAL_ADDRS,
        ORIG_DST,
        SOCK_DST,
        SOCK_OWNER,
        LISTENERS,
        ADDR_POD,
        ROUTE_SRC,
        COUNTERS,
        SOCKS,
        SOCK_TCP,
        PEER_SK,
        LISTENER_OWNER,
        CONNECTING,
        TIMING,
        HANDOFF,
        PARKED,
    ];
}

/// Map sizes. Per-pod sets share one map keyed by netns cookie, so there is no per-pod cap other
/// than the map's total. The maps written for registered pods are sized by the node's pod limit
/// (the agent's `--max-pods`, [`PODS`] by default) times their entries per pod ([`per_pod`]).
pub mod sizes {
    pub const PODS: u32 = 16_384;
    pub const MEMBERS: u32 = PODS * per_pod::MEMBERS;
    pub const CIDRS: u32 = PODS * per_pod::CIDRS;
    pub const LOCAL_ADDRS: u32 = PODS * per_pod::LOCAL_ADDRS;
    pub const COUNTERS: u32 = PODS * per_pod::COUNTERS;
    pub const LISTENERS: u32 = PODS * per_pod::LISTENERS;
    pub const ADDR_POD: u32 = PODS * per_pod::ADDR_POD;
    pub const ROUTE_SRC: u32 = PODS * per_pod::ROUTE_SRC;

    /// Entries per pod, on average over the node's pods, of the maps sized by the pod limit
    /// (a pod may take more, leaving less for the others).
    pub mod per_pod {
        /// Set members (ports, groups, interface indexes).
        pub const MEMBERS: u32 = 16;
        /// CIDRs, port ranges and routes.
        pub const CIDRS: u32 = 16;
        /// Interface addresses.
        pub const LOCAL_ADDRS: u32 = 4;
        /// Routable addresses (and forwarded interfaces' keys).
        pub const ADDR_POD: u32 = 4;
        /// Routes' source addresses.
        pub const ROUTE_SRC: u32 = 4;
        /// Listening sockets.
        pub const LISTENERS: u32 = 4;
        /// Counters.
        pub const COUNTERS: u32 = 4;
    }

    /// The maps sized by the pod limit, each with its entries per pod.
    pub const BY_PODS: [(&str, u32); 9] = [
        (super::names::PODS, 1),
        (super::names::MEMBERS, per_pod::MEMBERS),
        (super::names::CIDRS, per_pod::CIDRS),
        (super::names::LOCAL_ADDRS, per_pod::LOCAL_ADDRS),
        (super::names::ADDR_POD, per_pod::ADDR_POD),
        (super::names::ROUTE_SRC, per_pod::ROUTE_SRC),
        (super::names::LISTENERS, per_pod::LISTENERS),
        (super::names::LISTENER_OWNER, per_pod::LISTENERS),
        (super::names::COUNTERS, per_pod::COUNTERS),
    ];

    /// The largest pod limit: every map's size must fit a u32.
    pub const MAX_PODS: u32 = u32::MAX / per_pod::MEMBERS;

    pub const ORIG_DST: u32 = 262_144;
    pub const SOCKS: u32 = 65_536;
    /// Redirected TCP connects whose SYN waits while their task connects again (TCP Fast Open,
    /// a connect that failed before its SYN), node-wide; where the programs cannot use task
    /// storage, every redirected connect until its handshake's end.
    pub const CONNECTING: u32 = 32_768;
}

/// Key of the `MEMBERS` hash: "is `value` in set `kind` of pod `netns`".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub netns: NetnsCookie,
    pub kind: u32,
    pub value: u32,
}

/// Data part of an LPM-trie key in the `CIDRS` map. The prefix length of the trie key is
/// `CIDR_KEY_FIXED_BITS` plus the CIDR's own prefix length; for IPv4 the address sits in the
/// first four bytes of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrKey {
    pub netns: [u8; 8],
    pub kind: [u8; 4],
    pub addr: [u8; 16],
}

/// Bits of `CidrKey` before the address: netns cookie and kind always match exactly.
pub const CIDR_KEY_FIXED_BITS: u32 = 96;

impl CidrKey {
    /// The key for port `port` in port-range list `kind` of pod `netns`; its full-length
    /// prefix is `CIDR_KEY_FIXED_BITS + 16`.
    pub fn port(netns: NetnsCookie, kind: CidrKind, port: u16) -> Self {
        let p = port.to_be_bytes();
        CidrKey {
            netns: netns.get().to_be_bytes(),
            kind: (kind as u32).to_be_bytes(),
            addr: from_words([u32::from_ne_bytes([p[0], p[1], 0, 0]), 0, 0, 0]),
        }
    }

    /// The key for `kind` of pod `netns`; `addr` is in [`Addr`] form (v4-mapped for IPv4).
    pub fn new(netns: NetnsCookie, kind: CidrKind, addr: &Addr) -> Self {
        let a = if kind.is_v6() {
            *addr
        } else {
            from_words([
                u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
                0,
                0,
                0,
            ])
        };
        CidrKey {
            netns: netns.get().to_be_bytes(),
            kind: (kind as u32).to_be_bytes(),
            addr: a,
        }
    }
}

/// Key of `LOCAL_ADDRS`: an address assigned to an interface of pod `netns` (its pod IPs, `::6`).
/// 127/8 and `::1` are local everywhere and not stored.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalAddrKey {
    pub netns: NetnsCookie,
    pub addr: Addr,
}

/// Key of `ORIG_DST`: a redirected connection as the client sees it, so the proxy's accepted
/// socket finds it by (its peer, its local address) and its netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns: NetnsCookie,
    pub client: Addr,
    pub server: Addr,
    pub client_port: u16,
    pub server_port: u16,
    pub _pad: u32,
}

impl ConnKey {
    /// The key of an arriving connection in pod `netns`: its source is the client.
    pub const fn arrival(netns: NetnsCookie, a: &Arrival) -> Self {
        ConnKey {
            netns,
            client: a.src,
            server: a.dst,
            client_port: a.sport,
            server_port: a.dport,
            _pad: 0,
        }
    }

    /// The key of the connection socket `s` (its own 4-tuple) is the client of: an app's
    /// redirected socket.
    pub const fn of_client(s: &SockKey) -> Self {
        ConnKey {
            netns: s.netns,
            client: s.local,
            server: s.remote,
            client_port: s.local_port,
            server_port: s.remote_port,
            _pad: 0,
        }
    }

    /// The key of the connection socket `s` is the server of: a proxy's accepted socket, whose
    /// peer is the client.
    pub const fn of_server(s: &SockKey) -> Self {
        ConnKey {
            netns: s.netns,
            client: s.remote,
            server: s.local,
            client_port: s.remote_port,
            server_port: s.local_port,
            _pad: 0,
        }
    }
}

/// Value of `ORIG_DST`, `CONNECTING` and the per-socket `SOCK_DST` storage: where the connection
/// was going.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: Addr,
    pub port: u16,
    /// `AF_INET` when the original destination was IPv4 (also when dialed v4-mapped).
    pub family: u16,
    /// The [`Reason`] that redirected it.
    pub reason: u32,
}

impl OrigDst {
    /// Whether the record was made for `reason`.
    pub const fn is(&self, reason: Reason) -> bool {
        self.reason == reason as u32
    }

    /// Whether the connection was steered by TPROXY (its destination left alone, the inbound
    /// proxy reached by sk_lookup), not redirected to the proxy: sock_ops publishes a TPROXY
    /// record before the SYN goes out.
    pub const fn is_tproxy(&self) -> bool {
        self.is(Reason::TproxyToLocal) || self.is(Reason::LocalOrigin)
    }
}

/// A task's last redirected TCP connect, from `connect4`/`connect6` to sock_ops'
/// `TCP_CONNECT_CB` (value of the task storage `HANDOFF`): both run in the task's connect(), so
/// the record passes without a map insert and delete. `cookie` 0: taken (or none yet).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handoff {
    /// The socket cookie of the connect.
    pub cookie: u64,
    pub record: OrigDst,
    /// The port the connect was rewritten to (on loopback), 0 if its destination was left
    /// alone (TPROXY): a record is published only for a socket still going there.
    pub target_port: u16,
    pub _pad: u16,
}

impl Handoff {
    /// Whether the connect's destination was left alone (TPROXY): its record is published as
    /// the SYN goes out, before sk_lookup runs. A redirected one's may wait until established
    /// where records go by socket cookie (before the proxy's socket exists all the same).
    pub const fn left_alone(&self) -> bool {
        self.target_port == 0
    }

    /// Whether a socket whose peer is `remote`:`remote_port` is still going where its connect
    /// sent it: a redirected one to the capture port on loopback, a TPROXY one to its original
    /// destination. A socket whose captured connect failed may connect again, uncaptured,
    /// elsewhere: its record is not published for that connection.
    pub fn still_going(&self, remote: &Addr, remote_port: u16) -> bool {
        if self.left_alone() {
            *remote == self.record.addr && remote_port == self.record.port
        } else {
            crate::is_loopback(remote) && remote_port == self.target_port
        }
    }
}

/// Key of the `LISTENERS` sockhash: a listening TCP socket of netns `netns` on `port`.
/// `family` is `AF_INET` or `AF_INET6` (a dual-stack IPv6 listener is stored as `AF_INET6`).
/// Also the key of `LISTENER_OWNER`, with `slot` 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns: NetnsCookie,
    pub port: u32,
    pub family: u32,
    /// One of `LISTENER_SLOTS`: the first free one when the socket started listening.
    pub slot: u32,
    pub _pad: u32,
}

/// Listening sockets kept per (netns, port, family).
pub const LISTENER_SLOTS: u32 = 8;

/// The listener families sk_lookup tries, in order, for a connection of family `v4` or not: a
/// listener of the connection's family first; for IPv4, a dual-stack IPv6 one next.
pub const fn listener_families(v4: bool) -> [u32; 2] {
    if v4 {
        [crate::addr::AF_INET as u32, crate::addr::AF_INET6 as u32]
    } else {
        [crate::addr::AF_INET6 as u32, crate::addr::AF_INET6 as u32]
    }
}

/// Key of the per-CPU `COUNTERS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub netns: NetnsCookie,
    pub counter: u32,
    pub _pad: u32,
}

/// Counters kept per pod besides one per decision [`Reason`] (those use the reason's value).
pub mod counters {
    /// SO_ORIGINAL_DST answered from a redirect record.
    pub const ORIG_DST_HIT: u32 = 100;
    /// SO_ORIGINAL_DST answered with the socket's own local address (not redirected, as conntrack).
    pub const ORIG_DST_LOCAL: u32 = 101;
    /// getpeername rewritten to the original destination.
    pub const PEERNAME_REWRITE: u32 = 102;
    /// A redirect record could not be stored (map full): by connect4, the connect was refused;
    /// by sock_ops (`SM_ORIG_DST`), the connection goes on and the proxy sees the capture port.
    pub const ORIG_DST_STORE_FAILED: u32 = 103;
    /// A redirect record was removed when its socket closed.
    pub const ORIG_DST_RELEASED: u32 = 104;
    /// A listening socket could not be recorded (the listener map is full).
    pub const LISTENER_STORE_FAILED: u32 = 105;
    /// An established local connection's socket entered the acceleration map.
    pub const ACCEL_SOCK_ADDED: u32 = 106;
    /// It could not (`SOCKS` or `PEER_SK` is full, or the socket was gone): that socket stays
    /// on TCP/IP.
    pub const ACCEL_SOCK_FULL: u32 = 107;
    /// A sender of an accelerated connection went by TCP because its reader had
    /// `ACCEL_WINDOW` unread (or how much could not be read): TCP's back pressure holds it
    /// until the reader has read all of it (`ACCEL_RESUMED`).
    pub const ACCEL_WINDOW_FULL: u32 = 108;
    /// A sender that had gone by TCP went back to redirecting, its TCP data all read.
    pub const ACCEL_RESUMED: u32 = 109;
    /// SO_ORIGINAL_DST asked on the outbound capture port and no redirect record there: the
    /// record was evicted (`SM_ORIG_DST` is an LRU map of `--orig-dst-entries`; the oldest
    /// records go first) or never stored. The proxy reads its own address.
    pub const ORIG_DST_LOST: u32 = 110;
    /// A connection forwarded from a `-k` interface was to be captured, but the pod has no
    /// address toward its client (no route source of that family): dropped, as REDIRECT
    /// drops what arrives on an interface without an address.
    pub const FORWARD_NO_ADDRESS: u32 = 111;

    /// Whether the kernel logs an event whose count so far (per pod and CPU) is `n`: the 1st,
    /// 2nd, 4th, 8th... Every one is counted, but what a pod or its peers can repeat at
    /// connection rate must not cost a log line each: the agent, which writes the kernel's
    /// lines, would spend more on them than the kernel on the connections.
    pub const fn worth_logging(n: u64) -> bool {
        n & n.wrapping_sub(1) == 0
    }

    pub const fn name(c: u32) -> Option<&'static str> {
        match c {
            ORIG_DST_HIT => Some("orig_dst_hit"),
            ORIG_DST_LOCAL => Some("orig_dst_local"),
            PEERNAME_REWRITE => Some("getpeername_rewritten"),
            ORIG_DST_STORE_FAILED => Some("orig_dst_store_failed"),
            ORIG_DST_RELEASED => Some("orig_dst_released"),
            LISTENER_STORE_FAILED => Some("listener_store_failed"),
            ACCEL_SOCK_ADDED => Some("accel_sock_added"),
            ACCEL_SOCK_FULL => Some("accel_sock_full"),
            ACCEL_WINDOW_FULL => Some("accel_window_full"),
            ACCEL_RESUMED => Some("accel_resumed"),
            ORIG_DST_LOST => Some("orig_dst_lost"),
            FORWARD_NO_ADDRESS => Some("forward_no_address"),
            _ => None,
        }
    }
}

#[cfg(feature = "user")]
mod pod_impls {
    use crate::{
        accel::{AccelSock, KernelOffsets, SockKey},
        pod::{CredOffsets, NetnsCookie, PodConfig},
    };

    // SAFETY: all of these are #[repr(C)] (or transparent) plain data with explicit padding.
    unsafe impl aya::Pod for NetnsCookie {}
    unsafe impl aya::Pod for PodConfig {}
    unsafe impl aya::Pod for super::MemberKey {}
    unsafe impl aya::Pod for super::CidrKey {}
    unsafe impl aya::Pod for super::LocalAddrKey {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for CredOffsets {}
    unsafe impl aya::Pod for AccelSock {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::v4_mapped;

    /// The agent sizes these maps by `--max-pods`: at its default they keep the sizes the
    /// kernel object declares.
    #[test]
    fn maps_sized_by_pods_keep_their_declared_sizes_by_default() {
        let declared = |name| match name {
            names::PODS => sizes::PODS,
            names::MEMBERS => sizes::MEMBERS,
            names::CIDRS => sizes::CIDRS,
            names::LOCAL_ADDRS => sizes::LOCAL_ADDRS,
            names::ADDR_POD => sizes::ADDR_POD,
            names::ROUTE_SRC => sizes::ROUTE_SRC,
            names::LISTENERS | names::LISTENER_OWNER => sizes::LISTENERS,
            names::COUNTERS => sizes::COUNTERS,
            other => panic!("{other} is not sized by pods"),
        };
        for (name, per_pod) in sizes::BY_PODS {
            assert_eq!(sizes::PODS * per_pod, declared(name), "{name}");
            assert!(sizes::MAX_PODS.checked_mul(per_pod).is_some(), "{name}");
        }
        assert_eq!(sizes::MEMBERS, 262_144);
    }

    #[test]
    fn repeated_events_are_logged_at_powers_of_two() {
        let logged: Vec<u64> = (1..=100).filter(|&n| counters::worth_logging(n)).collect();
        assert_eq!(logged, [1, 2, 4, 8, 16, 32, 64]);
        assert!(counters::worth_logging(1 << 40));
    }

    #[test]
    fn both_ends_of_a_connection_find_one_key() {
        let netns = NetnsCookie(7);
        let (app, lo) = (v4_mapped([10, 0, 0, 5]), v4_mapped([127, 0, 0, 1]));
        let app_end = SockKey {
            netns,
            local: app,
            remote: lo,
            local_port: 40000,
            remote_port: 15001,
            _pad: 0,
        };
        let proxy_end = SockKey {
            netns,
            local: lo,
            remote: app,
            local_port: 15001,
            remote_port: 40000,
            _pad: 0,
        };
        let key = ConnKey::of_client(&app_end);
        assert_eq!(ConnKey::of_server(&proxy_end), key);
        assert_eq!((key.client, key.client_port), (app, 40000));
        assert_eq!((key.server, key.server_port), (lo, 15001));
    }

    #[test]
    fn a_record_is_published_only_while_its_socket_goes_where_its_connect_sent_it() {
        let dst = v4_mapped([10, 0, 0, 9]);
        let lo = v4_mapped([127, 0, 0, 1]);
        let record = OrigDst {
            addr: dst,
            port: 80,
            family: crate::AF_INET,
            reason: Reason::CaptureAll as u32,
        };
        let redirected = Handoff {
            cookie: 7,
            record,
            target_port: 15001,
            _pad: 0,
        };
        assert!(!redirected.left_alone());
        assert!(redirected.still_going(&lo, 15001));
        assert!(redirected.still_going(&v4_mapped([127, 0, 0, 6]), 15001));
        assert!(redirected.still_going(&crate::V6_LOOPBACK, 15001));
        // Connected again elsewhere after a failed connect: not the capture port, or not local.
        assert!(!redirected.still_going(&lo, 15006));
        assert!(!redirected.still_going(&dst, 80));
        assert!(!redirected.still_going(&dst, 15001));
        let tproxy = Handoff {
            target_port: 0,
            record: OrigDst {
                reason: Reason::TproxyToLocal as u32,
                ..record
            },
            ..redirected
        };
        assert!(tproxy.left_alone());
        assert!(tproxy.still_going(&dst, 80));
        assert!(!tproxy.still_going(&dst, 81));
        assert!(!tproxy.still_going(&lo, 80));
        assert!(!tproxy.still_going(&v4_mapped([10, 0, 0, 8]), 80));
    }

    #[test]
    fn tproxy_records_are_told_from_redirects() {
        let record = |reason: Reason| OrigDst {
            addr: v4_mapped([10, 0, 0, 9]),
            port: 80,
            family: crate::AF_INET,
            reason: reason as u32,
        };
        let tproxy: Vec<Reason> = Reason::ALL
            .iter()
            .copied()
            .filter(|&r| record(r).is_tproxy())
            .collect();
        assert_eq!(tproxy, [Reason::TproxyToLocal, Reason::LocalOrigin]);
    }
}

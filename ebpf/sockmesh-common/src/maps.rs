//! Map names, keys and values. One definition for the kernel and for userspace.

/// An address in IPv6 form, network byte order. IPv4 is stored v4-mapped (`::ffff:a.b.c.d`), so
/// one key layout serves both families and a dual-stack socket dialing `::ffff:a.b.c.d` needs no
/// special case.
pub type Addr = [u8; 16];

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Most proxy uids (and, separately, gids) a pod may list with `-u`/`-g`. istio emits one set of
/// rules per entry in list order; the kernel walks them in that order, so they live in the config
/// value rather than in a set map.
pub const MAX_OWNERS: usize = 8;

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
    pub const ALL: [&str; 14] = [
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
    ];
}

/// Map sizes. Per-pod sets share one map keyed by netns cookie, so there is no per-pod cap other
/// than the map's total.
pub mod sizes {
    pub const PODS: u32 = 16_384;
    pub const MEMBERS: u32 = 262_144;
    pub const CIDRS: u32 = 262_144;
    pub const LOCAL_ADDRS: u32 = 65_536;
    pub const ORIG_DST: u32 = 262_144;
    pub const COUNTERS: u32 = 65_536;
    pub const LISTENERS: u32 = 65_536;
    pub const ADDR_POD: u32 = 65_536;
    pub const ROUTE_SRC: u32 = 65_536;
    pub const SOCKS: u32 = 65_536;
}

/// `PodConfig::flags` bits.
pub mod flags {
    /// `-i '*'`: every TCP destination not excluded goes to the outbound port.
    pub const OUTBOUND_ALL: u32 = 1 << 0;
    /// IPv6 rules exist for this pod (istio: first non-loopback address is v6, or `--dual-stack`
    /// with a v6 address present). Without it IPv6 traffic is never touched.
    pub const IPV6: u32 = 1 << 1;
    /// An `-i` entry (of either family) is a loopback address: istio leaves the
    /// "-o lo ! --uid-owner U -j RETURN" rules (and the gid ones) out of both tables.
    pub const NO_LO_RETURN: u32 = 1 << 2;
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` is a list (not `*`): capture only those gids.
    pub const OWNER_GROUPS_INCLUDE: u32 = 1 << 4;
    /// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE` is set (and the include list is `*`).
    pub const OWNER_GROUPS_EXCLUDE: u32 = 1 << 5;
    /// `-b '*'`: inbound capture of every port but the `-d` list.
    pub const INBOUND_ALL: u32 = 1 << 6;
    /// `-b p1,p2`: inbound capture of the listed ports.
    pub const INBOUND_LIST: u32 = 1 << 7;
    /// linkerd2-proxy-init's rules instead of istio-iptables' (see `decide`).
    pub const LINKERD: u32 = 1 << 8;
    /// DNS capture is in force (`--redirect-dns` with servers or `--capture-all-dns`): the
    /// owner rules take istio's DNS forms.
    pub const DNS: u32 = 1 << 9;
    /// An IPv4 DNS chain exists (IPv4 servers, or capture-all).
    pub const DNS_V4: u32 = 1 << 10;
    /// An IPv6 DNS chain exists.
    pub const DNS_V6: u32 = 1 << 11;
    /// `--capture-all-dns`: every port-53 destination, not only resolv.conf's servers.
    pub const DNS_ALL: u32 = 1 << 12;
    /// `-c`: some interfaces are excluded (see `MemberKind::ExcludedIfindex`, `CidrKind::Route*`).
    pub const EXCLUDE_IFACES: u32 = 1 << 13;
    /// `-k`: some interfaces carry outbound traffic in (see `MemberKind::KubeVirtIfindex`).
    pub const KUBE_VIRT: u32 = 1 << 14;
    /// `-m TPROXY`: inbound connections keep their destination (as sk_lookup does anyway), the
    /// tunnel port is not exempt, and the proxy's own calls to the pod's addresses reach the
    /// inbound listener unrewritten.
    pub const TPROXY: u32 = 1 << 15;
    /// No socket acceleration for this pod (its local hops go through TCP/IP, as with iptables).
    pub const NO_ACCEL: u32 = 1 << 16;
    /// Socket acceleration for the app's sockets as well as the proxy's
    /// (`SOCKMESH_ACCELERATION=all`): the app's writes to its proxy skip TCP/IP too, but its
    /// socket then reads through the kernel's sk_msg path, whose blocking reads can return
    /// EAGAIN early. Without it only the proxy's sockets are accelerated.
    pub const ACCEL_APPS: u32 = 1 << 17;
    /// Every bit above.
    pub const ALL: u32 = OUTBOUND_ALL
        | IPV6
        | NO_LO_RETURN
        | OWNER_GROUPS_INCLUDE
        | OWNER_GROUPS_EXCLUDE
        | INBOUND_ALL
        | INBOUND_LIST
        | LINKERD
        | DNS
        | DNS_V4
        | DNS_V6
        | DNS_ALL
        | EXCLUDE_IFACES
        | KUBE_VIRT
        | TPROXY
        | NO_ACCEL
        | ACCEL_APPS;
}

/// A registered pod's settings in istio terms. Value of the `PODS` map, keyed by netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    pub flags: u32,
    /// `-p`: outbound capture port.
    pub outbound_port: u16,
    /// `-z`: inbound capture port.
    pub inbound_port: u16,
    /// `-e`: inbound tunnel (HBONE) port, never IN_REDIRECTed.
    pub tunnel_port: u16,
    /// Prefix length of `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`.
    pub loopback_v4_prefix: u8,
    pub n_uids: u8,
    pub n_gids: u8,
    pub _pad: [u8; 3],
    /// Address of `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`, network order.
    pub loopback_v4: [u8; 4],
    pub uids: [u32; MAX_OWNERS],
    pub gids: [u32; MAX_OWNERS],
    /// The pod's primary IPv4 address (istio's "local IP"), zero if none. A redirected socket
    /// that is not bound is bound to it, so the proxy sees the same peer address as after
    /// iptables' REDIRECT. Filled by the agent.
    pub src_v4: [u8; 4],
    /// The pod's primary IPv6 address, zero if none.
    pub src_v6: [u8; 16],
    /// `-t`: the TPROXY mark (TPROXY mode).
    pub tproxy_mark: u32,
    /// `-r`: the TPROXY routing table (TPROXY mode).
    pub tproxy_table: u32,
}

impl PodConfig {
    pub const fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Whether any inbound connection can be captured (linkerd always captures inbound).
    pub const fn inbound_capture(&self) -> bool {
        self.has(flags::INBOUND_ALL | flags::INBOUND_LIST | flags::LINKERD)
    }

    /// Whether a socket created by `owner` is the proxy's: its uid is one of `-u`'s or its gid
    /// one of `-g`'s (the owner matches by which istio-iptables knows the proxy's traffic).
    pub const fn is_proxy(&self, owner: &SockOwner) -> bool {
        let mut i = 0;
        while i < MAX_OWNERS {
            if (i < self.n_uids as usize && self.uids[i] == owner.uid)
                || (i < self.n_gids as usize && self.gids[i] == owner.gid)
            {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Which per-pod set a `MemberKey` belongs to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub enum MemberKind {
    /// `-o`: local outbound ports never captured (tcp and udp).
    OutboundExcludePort = 1,
    /// `-q`: TCP ports always sent to the outbound port.
    OutboundIncludePort = 2,
    /// `-b` list: inbound ports captured.
    InboundPort = 3,
    /// `-d`: inbound ports skipped with `-b '*'`.
    InboundExcludePort = 4,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS`.
    OwnerGroupInclude = 5,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`.
    OwnerGroupExclude = 6,
    /// `-c`: interface indexes (in the pod's netns) never captured.
    ExcludedIfindex = 7,
    /// `-k`: interface indexes whose inbound traffic is treated as outbound.
    KubeVirtIfindex = 8,
}

impl MemberKind {
    pub const ALL: [MemberKind; 8] = [
        MemberKind::OutboundExcludePort,
        MemberKind::OutboundIncludePort,
        MemberKind::InboundPort,
        MemberKind::InboundExcludePort,
        MemberKind::OwnerGroupInclude,
        MemberKind::OwnerGroupExclude,
        MemberKind::ExcludedIfindex,
        MemberKind::KubeVirtIfindex,
    ];

    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::OutboundExcludePort),
            2 => Some(Self::OutboundIncludePort),
            3 => Some(Self::InboundPort),
            4 => Some(Self::InboundExcludePort),
            5 => Some(Self::OwnerGroupInclude),
            6 => Some(Self::OwnerGroupExclude),
            7 => Some(Self::ExcludedIfindex),
            8 => Some(Self::KubeVirtIfindex),
            _ => None,
        }
    }

    /// The istio-iptables flag or variable this set comes from.
    pub const fn istio_name(self) -> &'static str {
        match self {
            Self::OutboundExcludePort => "-o",
            Self::OutboundIncludePort => "-q",
            Self::InboundPort => "-b",
            Self::InboundExcludePort => "-d",
            Self::OwnerGroupInclude => "ISTIO_OUTBOUND_OWNER_GROUPS",
            Self::OwnerGroupExclude => "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE",
            Self::ExcludedIfindex => "-c",
            Self::KubeVirtIfindex => "-k",
        }
    }
}

/// Key of the `MEMBERS` hash: "is `value` in set `kind` of pod `netns`".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub netns: u64,
    pub kind: u32,
    pub value: u32,
}

/// Which per-pod prefix list a `CidrKey` belongs to: CIDR lists (families are separate lists, as
/// istio keeps separate iptables and ip6tables rules) and port-range lists (a range is stored as
/// the prefixes of the 16-bit port space that cover it).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub enum CidrKind {
    /// `-x`, IPv4 entries.
    ExcludeV4 = 1,
    /// `-x`, IPv6 entries.
    ExcludeV6 = 2,
    /// `-i`, IPv4 entries.
    IncludeV4 = 3,
    /// `-i`, IPv6 entries.
    IncludeV6 = 4,
    /// linkerd `--outbound-ports-to-ignore` (ports and ranges).
    OutboundIgnorePorts = 5,
    /// linkerd `--inbound-ports-to-ignore`.
    InboundIgnorePorts = 6,
    /// linkerd `--ports-to-redirect` (inbound).
    RedirectPorts = 7,
    /// linkerd `--subnets-to-ignore`, IPv4 (inbound, matched on the source).
    IgnoreSubnetV4 = 8,
    /// linkerd `--subnets-to-ignore`, IPv6.
    IgnoreSubnetV6 = 9,
    /// DNS servers of the pod's resolv.conf, IPv4.
    DnsServerV4 = 10,
    /// DNS servers of the pod's resolv.conf, IPv6.
    DnsServerV6 = 11,
    /// The pod's IPv4 main routing table: value 1 where the route leaves through an interface
    /// excluded with `-c`, 0 elsewhere (a longest-prefix match gives the route's verdict).
    RouteV4 = 12,
    /// Same, IPv6.
    RouteV6 = 13,
}

impl CidrKind {
    pub const fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::ExcludeV4),
            2 => Some(Self::ExcludeV6),
            3 => Some(Self::IncludeV4),
            4 => Some(Self::IncludeV6),
            5 => Some(Self::OutboundIgnorePorts),
            6 => Some(Self::InboundIgnorePorts),
            7 => Some(Self::RedirectPorts),
            8 => Some(Self::IgnoreSubnetV4),
            9 => Some(Self::IgnoreSubnetV6),
            10 => Some(Self::DnsServerV4),
            11 => Some(Self::DnsServerV6),
            12 => Some(Self::RouteV4),
            13 => Some(Self::RouteV6),
            _ => None,
        }
    }

    pub const fn is_v6(self) -> bool {
        matches!(
            self,
            Self::ExcludeV6
                | Self::IncludeV6
                | Self::IgnoreSubnetV6
                | Self::DnsServerV6
                | Self::RouteV6
        )
    }

    /// A list of port ranges rather than CIDRs.
    pub const fn is_port(self) -> bool {
        matches!(
            self,
            Self::OutboundIgnorePorts | Self::InboundIgnorePorts | Self::RedirectPorts
        )
    }
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
    pub fn port(netns: u64, kind: CidrKind, port: u16) -> Self {
        let p = port.to_be_bytes();
        CidrKey {
            netns: netns.to_be_bytes(),
            kind: (kind as u32).to_be_bytes(),
            addr: [p[0], p[1], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    /// The key for `kind` of pod `netns`; `addr` is in [`Addr`] form (v4-mapped for IPv4).
    pub fn new(netns: u64, kind: CidrKind, addr: &Addr) -> Self {
        let mut a = [0u8; 16];
        if kind.is_v6() {
            a = *addr;
        } else {
            a[0] = addr[12];
            a[1] = addr[13];
            a[2] = addr[14];
            a[3] = addr[15];
        }
        CidrKey {
            netns: netns.to_be_bytes(),
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
    pub netns: u64,
    pub addr: Addr,
}

/// Key of `ORIG_DST`: a redirected connection as the client sees it, so the proxy's accepted
/// socket finds it by (its peer, its local address) and its netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns: u64,
    pub client: Addr,
    pub server: Addr,
    pub client_port: u16,
    pub server_port: u16,
    pub _pad: u32,
}

/// Key of the `SOCKS` socket hash (sk_msg acceleration): one end of an established local TCP
/// connection, by its pod's netns and its own 4-tuple. Its peer's key is [`SockKey::peer`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns: u64,
    pub local: Addr,
    pub remote: Addr,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

/// Whether `a` is a loopback address (127.0.0.0/8 v4-mapped, or ::1).
pub const fn is_loopback(a: &Addr) -> bool {
    if is_v4_mapped(a) {
        return a[12] == 127;
    }
    let mut i = 0;
    while i < 15 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    a[15] == 1
}

impl SockKey {
    /// The socket's key when its connection can be shortcut, given the netns of the pod that
    /// owns the remote address (`remote_pod`, from `ADDR_POD`): a loopback peer is in the same
    /// netns; a peer at a pod address of this node is in that pod's. Any other peer is not
    /// local: `None`.
    pub const fn local_conn(
        netns: u64,
        local: Addr,
        local_port: u16,
        remote: Addr,
        remote_port: u16,
        remote_pod: Option<u64>,
    ) -> Option<SockKey> {
        if !is_loopback(&remote) && remote_pod.is_none() {
            return None;
        }
        Some(SockKey {
            netns,
            local,
            remote,
            local_port,
            remote_port,
            _pad: 0,
        })
    }

    /// The key under which the other end of this socket's connection is (or would be)
    /// stored: the 4-tuple reversed, in the netns that owns this socket's remote address.
    pub const fn peer(&self, remote_pod: Option<u64>) -> SockKey {
        let netns = match remote_pod {
            Some(n) if !is_loopback(&self.remote) => n,
            _ => self.netns,
        };
        SockKey {
            netns,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Most bytes sk_msg leaves unread in a socket's queue of redirected data. TCP stops a writer
/// when the reader's buffers are full; a redirect has no such limit, so sk_msg keeps to this
/// window and, past it, sends the rest of the connection by TCP, whose back pressure then holds
/// (data already queued is read first, so the order stays). 1 MiB: room for a bulk transfer's
/// writes while its reader catches up, and no more than a TCP receive buffer grows to (6 MiB
/// by default).
pub const ACCEL_WINDOW: u64 = 1 << 20;

/// Whether `size` more bytes may be redirected to a socket with `unread` bytes queued
/// (`None`: not known) without passing [`ACCEL_WINDOW`].
pub const fn window_has_room(unread: Option<u64>, size: u64) -> bool {
    match unread {
        Some(u) => u.saturating_add(size) <= ACCEL_WINDOW,
        None => false,
    }
}

/// Where the kernel keeps what sk_msg needs to know of two sockets that it cannot ask through
/// its context; the agent reads these offsets from the running kernel's BTF and gives them to
/// the programs at load time (zero: unknown, nothing is redirected).
/// - What sk_msg has queued for a socket and its reader has not taken: `struct sock`'s
///   `sk_user_data` points (low bits are flags) to the socket's `struct sk_psock`, whose
///   `msg_tot_len` counts those bytes.
/// - Whether a sender's TCP data has all been read (see [`tcp_drained`]): `struct tcp_sock`'s
///   `write_seq` and `snd_una` of the sender, `rcv_nxt` and `copied_seq` of its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub sk_user_data: u32,
    pub psock_msg_tot_len: u32,
    pub tcp_write_seq: u32,
    pub tcp_snd_una: u32,
    pub tcp_rcv_nxt: u32,
    pub tcp_copied_seq: u32,
}

impl KernelOffsets {
    pub const fn known(&self) -> bool {
        self.sk_user_data != 0
            && self.psock_msg_tot_len != 0
            && self.tcp_write_seq != 0
            && self.tcp_snd_una != 0
            && self.tcp_rcv_nxt != 0
            && self.tcp_copied_seq != 0
    }
}

/// Whether a sender that went by TCP may go back to redirecting without its data being read
/// out of order: everything it wrote is acknowledged (`write_seq == snd_una`: on a local
/// connection, in the peer's receive queue) and its peer has read all it received
/// (`rcv_nxt == copied_seq`). A reader takes redirected data before TCP's, so redirecting
/// with TCP data unread would let later bytes overtake earlier ones.
pub const fn tcp_drained(write_seq: u32, snd_una: u32, rcv_nxt: u32, copied_seq: u32) -> bool {
    write_seq == snd_una && rcv_nxt == copied_seq
}

/// Value of `PEER_SK`: an accelerated socket's kernel address, and whether sk_msg may send to
/// it (`receives`, 1): only sockets of a pod's proxy, whose readers are event loops that do
/// not splice (Envoy, linkerd2-proxy, sockmesh-proxy). An app's socket never receives
/// redirected data (it gets it by TCP), so whatever way the app reads (blocking reads,
/// splice(2)) sees TCP's behaviour; its own writes to the proxy are redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccelSock {
    pub addr: u64,
    pub receives: u32,
    pub _pad: u32,
}

/// Flag bits in the low end of `sk_user_data` (SK_USER_DATA_NOCOPY, _BPF, _PSOCK).
pub const SK_USER_DATA_FLAGS: u64 = 7;

/// Value of `ORIG_DST` and of the per-socket `SOCK_DST` storage: where the connection was going.
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

/// Key of the `LISTENERS` sockhash: a listening TCP socket of netns `netns` on `port`.
/// `family` is `AF_INET` or `AF_INET6` (a dual-stack IPv6 listener is stored as `AF_INET6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub netns: u64,
    pub port: u32,
    pub family: u32,
    /// One of `LISTENER_SLOTS`: the first free one when the socket started listening.
    pub slot: u32,
    pub _pad: u32,
}

/// Listening sockets kept per (netns, port, family).
pub const LISTENER_SLOTS: u32 = 8;

/// Value of the per-socket `SOCK_OWNER` storage: the credentials of the task that created the
/// socket, which is what iptables' owner match looks at (the socket file's credentials).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOwner {
    pub uid: u32,
    pub gid: u32,
}

/// Key of the per-CPU `COUNTERS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub netns: u64,
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
            _ => None,
        }
    }
}

/// `::ffff:a.b.c.d` from four octets.
pub const fn v4_mapped(o: [u8; 4]) -> Addr {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, o[0], o[1], o[2], o[3],
    ]
}

pub const fn is_v4_mapped(a: &Addr) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

pub const fn v4_octets(a: &Addr) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

#[cfg(feature = "user")]
mod pod_impls {
    // SAFETY: all of these are #[repr(C)] plain data with explicit padding.
    unsafe impl aya::Pod for super::PodConfig {}
    unsafe impl aya::Pod for super::MemberKey {}
    unsafe impl aya::Pod for super::CidrKey {}
    unsafe impl aya::Pod for super::LocalAddrKey {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::CounterKey {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::AccelSock {}
}

#[cfg(test)]
mod accel_tests {
    use super::*;

    #[test]
    fn the_window_holds_what_a_reader_has_not_taken() {
        assert!(window_has_room(Some(0), ACCEL_WINDOW));
        assert!(!window_has_room(Some(0), ACCEL_WINDOW + 1));
        assert!(window_has_room(Some(ACCEL_WINDOW - 100), 100));
        assert!(!window_has_room(Some(ACCEL_WINDOW - 100), 101));
        assert!(!window_has_room(Some(u64::MAX), 1), "no wrap-around");
        // Not knowing how much is unread is no room: TCP.
        assert!(!window_has_room(None, 1));
    }

    #[test]
    fn proxy_sockets_are_known_by_their_owner() {
        let mut cfg: PodConfig = unsafe { core::mem::zeroed() };
        cfg.uids[0] = 1337;
        cfg.n_uids = 1;
        cfg.gids[0] = 1338;
        cfg.n_gids = 1;
        let owner = |uid, gid| SockOwner { uid, gid };
        assert!(cfg.is_proxy(&owner(1337, 0)));
        assert!(cfg.is_proxy(&owner(1000, 1338)), "by gid, as -g");
        assert!(!cfg.is_proxy(&owner(1000, 1000)));
        // Entries past the counts do not count.
        cfg.uids[1] = 1000;
        assert!(!cfg.is_proxy(&owner(1000, 1000)));
    }

    #[test]
    fn back_to_redirecting_only_once_tcp_data_is_all_read() {
        assert!(tcp_drained(1000, 1000, 500, 500));
        // Written, not yet acknowledged (maybe not yet in the peer's queue).
        assert!(!tcp_drained(1001, 1000, 500, 500));
        // In the peer's queue, not yet read.
        assert!(!tcp_drained(1000, 1000, 501, 500));
        // Sequence numbers wrap: only equality counts.
        assert!(tcp_drained(3, 3, u32::MAX, u32::MAX));
    }

    const POD: Addr = v4_mapped([10, 0, 0, 5]);
    const OTHER_POD: Addr = v4_mapped([10, 0, 0, 6]);
    const LO: Addr = v4_mapped([127, 0, 0, 1]);
    const LO6: Addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const REMOTE: Addr = v4_mapped([192, 0, 2, 20]);

    #[test]
    fn loopback_is_127_slash_8_and_the_v6_one() {
        assert!(is_loopback(&LO) && is_loopback(&v4_mapped([127, 9, 9, 6])) && is_loopback(&LO6));
        assert!(!is_loopback(&POD) && !is_loopback(&[0; 16]));
    }

    #[test]
    fn the_app_to_proxy_hop_pairs_its_two_ends() {
        // The app's socket (bound to the pod address by the redirect) and the proxy's accepted
        // one, in the same pod.
        let app = SockKey::local_conn(7, POD, 40000, LO, 15001, None).unwrap();
        let proxy = SockKey::local_conn(7, LO, 15001, POD, 40000, Some(7)).unwrap();
        assert_eq!(app.peer(None), proxy);
        assert_eq!(proxy.peer(Some(7)), app);
    }

    #[test]
    fn proxy_to_proxy_on_one_node_crosses_netns() {
        let client = SockKey::local_conn(7, POD, 40001, OTHER_POD, 15006, Some(8)).unwrap();
        let server = SockKey::local_conn(8, OTHER_POD, 15006, POD, 40001, Some(7)).unwrap();
        assert_eq!(client.peer(Some(8)), server);
        assert_eq!(server.peer(Some(7)), client);
    }

    #[test]
    fn a_peer_off_the_node_is_not_shortcut() {
        assert_eq!(SockKey::local_conn(7, POD, 40002, REMOTE, 80, None), None);
    }
}

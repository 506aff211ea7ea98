//! A registered pod as the kernel sees it: its network namespace's cookie, its settings in
//! istio terms ([`PodConfig`], with [`PodFlags`]) and the kinds of its per-pod sets.

use core::ops::{BitOr, BitOrAssign};

/// A network namespace's cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`): how every map
/// names the pod a key belongs to.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsCookie(pub u64);

impl NetnsCookie {
    pub const fn get(self) -> u64 {
        self.0
    }
}

#[cfg(feature = "user")]
impl core::fmt::Display for NetnsCookie {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(&self.0, f)
    }
}

/// Most proxy uids (and, separately, gids) a pod may list with `-u`/`-g`. istio emits one set of
/// rules per entry in list order; the kernel walks them in that order, so they live in the config
/// value rather than in a set map.
pub const MAX_OWNERS: usize = 8;

/// The bits of [`PodConfig::flags`]: which of istio's (or linkerd's) chains a pod has.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodFlags(u32);

impl PodFlags {
    /// No flag: nothing is captured outbound or inbound.
    pub const NONE: Self = Self(0);
    /// `-i '*'`: every TCP destination not excluded goes to the outbound port.
    pub const OUTBOUND_ALL: Self = Self(1 << 0);
    /// IPv6 rules exist for this pod (istio: first non-loopback address is v6, or `--dual-stack`
    /// with a v6 address present). Without it IPv6 traffic is never touched.
    pub const IPV6: Self = Self(1 << 1);
    /// An `-i` entry (of either family) is a loopback address: istio leaves the
    /// "-o lo ! --uid-owner U -j RETURN" rules (and the gid ones) out of both tables.
    pub const NO_LO_RETURN: Self = Self(1 << 2);
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` is a list (not `*`): capture only those gids.
    pub const OWNER_GROUPS_INCLUDE: Self = Self(1 << 4);
    /// `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE` is set (and the include list is `*`).
    pub const OWNER_GROUPS_EXCLUDE: Self = Self(1 << 5);
    /// `-b '*'`: inbound capture of every port but the `-d` list.
    pub const INBOUND_ALL: Self = Self(1 << 6);
    /// `-b p1,p2`: inbound capture of the listed ports.
    pub const INBOUND_LIST: Self = Self(1 << 7);
    /// linkerd2-proxy-init's rules instead of istio-iptables' (see `decide`).
    pub const LINKERD: Self = Self(1 << 8);
    /// DNS capture is in force (`--redirect-dns` with servers or `--capture-all-dns`): the
    /// owner rules take istio's DNS forms.
    pub const DNS: Self = Self(1 << 9);
    /// An IPv4 DNS chain exists (IPv4 servers, or capture-all).
    pub const DNS_V4: Self = Self(1 << 10);
    /// An IPv6 DNS chain exists.
    pub const DNS_V6: Self = Self(1 << 11);
    /// `--capture-all-dns`: every port-53 destination, not only resolv.conf's servers.
    pub const DNS_ALL: Self = Self(1 << 12);
    /// `-c`: some interfaces are excluded (see `MemberKind::ExcludedIfindex`, `CidrKind::Route*`).
    pub const EXCLUDE_IFACES: Self = Self(1 << 13);
    /// `-k`: some interfaces carry outbound traffic in (see `MemberKind::KubeVirtIfindex`).
    pub const KUBE_VIRT: Self = Self(1 << 14);
    /// `-m TPROXY`: inbound connections keep their destination (as sk_lookup does anyway), the
    /// tunnel port is not exempt, and the proxy's own calls to the pod's addresses reach the
    /// inbound listener unrewritten.
    pub const TPROXY: Self = Self(1 << 15);
    /// No socket acceleration for this pod (its local hops go through TCP/IP, as with iptables).
    pub const NO_ACCEL: Self = Self(1 << 16);
    /// Socket acceleration for the app's sockets as well as the proxy's
    /// (`SOCKMESH_ACCELERATION=all`): the app's writes to its proxy skip TCP/IP too, but its
    /// socket then reads through the kernel's sk_msg path, whose blocking reads can return
    /// EAGAIN early. Without it only the proxy's sockets are accelerated.
    pub const ACCEL_APPS: Self = Self(1 << 17);
    /// Every bit above.
    pub const ALL: Self = Self(
        Self::OUTBOUND_ALL.0
            | Self::IPV6.0
            | Self::NO_LO_RETURN.0
            | Self::OWNER_GROUPS_INCLUDE.0
            | Self::OWNER_GROUPS_EXCLUDE.0
            | Self::INBOUND_ALL.0
            | Self::INBOUND_LIST.0
            | Self::LINKERD.0
            | Self::DNS.0
            | Self::DNS_V4.0
            | Self::DNS_V6.0
            | Self::DNS_ALL.0
            | Self::EXCLUDE_IFACES.0
            | Self::KUBE_VIRT.0
            | Self::TPROXY.0
            | Self::NO_ACCEL.0
            | Self::ACCEL_APPS.0,
    );

    /// The bits as the API and the maps carry them.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Flags from bits, or the bits this build does not know.
    pub const fn from_bits(bits: u32) -> Result<Self, u32> {
        let unknown = bits & !Self::ALL.0;
        if unknown == 0 {
            Ok(Self(bits))
        } else {
            Err(unknown)
        }
    }

    /// Whether any bit of `other` is set.
    pub const fn intersects(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub const fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }
}

impl BitOr for PodFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

impl BitOrAssign for PodFlags {
    fn bitor_assign(&mut self, rhs: Self) {
        *self = self.union(rhs);
    }
}

/// A registered pod's settings in istio terms. Value of the `PODS` map, keyed by netns cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    pub flags: PodFlags,
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
    /// The member sets ([`MemberKind::bit`]) the agent wrote no entry of for this pod, so the
    /// kernel skips looking them up. Set by the agent from what it writes, never taken from
    /// the caller; zero (as an earlier release left it) means every set is looked up.
    pub empty_members: u8,
    /// The same for the prefix lists ([`CidrKind::bit`]).
    pub empty_lists: u16,
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

/// The sets a pod's config marks empty ([`PodConfig::empty_members`], `empty_lists`): the
/// kernel answers "not in it" without a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmptySets {
    members: u8,
    lists: u16,
}

impl EmptySets {
    /// None known empty (a pod registered by an earlier release, or the pod's addresses
    /// alone): every set is looked up.
    pub const UNKNOWN: EmptySets = EmptySets {
        members: 0,
        lists: 0,
    };

    /// Whether member set `kind` is known to be empty.
    #[inline(always)]
    pub const fn no_members(self, kind: MemberKind) -> bool {
        self.members & kind.bit() != 0
    }

    /// Whether prefix list `kind` is known to be empty.
    #[inline(always)]
    pub const fn no_list(self, kind: CidrKind) -> bool {
        self.lists & kind.bit() != 0
    }
}

impl PodConfig {
    /// A config with `flags` and the capture ports, istio's default loopback CIDR
    /// (127.0.0.1/32), and no owner, source address or TPROXY setting yet.
    pub const fn new(
        flags: PodFlags,
        outbound_port: u16,
        inbound_port: u16,
        tunnel_port: u16,
    ) -> Self {
        PodConfig {
            flags,
            outbound_port,
            inbound_port,
            tunnel_port,
            loopback_v4_prefix: 32,
            n_uids: 0,
            n_gids: 0,
            empty_members: 0,
            empty_lists: 0,
            loopback_v4: [127, 0, 0, 1],
            uids: [0; MAX_OWNERS],
            gids: [0; MAX_OWNERS],
            src_v4: [0; 4],
            src_v6: [0; 16],
            tproxy_mark: 0,
            tproxy_table: 0,
        }
    }

    /// The same with the proxy's `-u` uids and `-g` gids, in order (at most [`MAX_OWNERS`] of
    /// each are kept).
    pub fn with_owners(mut self, uids: &[u32], gids: &[u32]) -> Self {
        let (nu, ng) = (uids.len().min(MAX_OWNERS), gids.len().min(MAX_OWNERS));
        self.uids = [0; MAX_OWNERS];
        self.gids = [0; MAX_OWNERS];
        self.uids[..nu].copy_from_slice(&uids[..nu]);
        self.gids[..ng].copy_from_slice(&gids[..ng]);
        self.n_uids = nu as u8;
        self.n_gids = ng as u8;
        self
    }

    /// The proxy's `-u` uids, in order.
    pub fn proxy_uids(&self) -> &[u32] {
        &self.uids[..(self.n_uids as usize).min(MAX_OWNERS)]
    }

    /// The proxy's `-g` gids, in order.
    pub fn proxy_gids(&self) -> &[u32] {
        &self.gids[..(self.n_gids as usize).min(MAX_OWNERS)]
    }

    /// The same with every set not in `members` or `lists` known empty (see
    /// [`PodConfig::empty_members`]).
    pub fn with_sets_present(
        mut self,
        members: impl IntoIterator<Item = MemberKind>,
        lists: impl IntoIterator<Item = CidrKind>,
    ) -> Self {
        self.empty_members = members.into_iter().fold(u8::MAX, |e, k| e & !k.bit());
        self.empty_lists = lists.into_iter().fold(u16::MAX, |e, k| e & !k.bit());
        self
    }

    /// The sets the agent marked empty for the pod.
    #[inline(always)]
    pub const fn empty_sets(&self) -> EmptySets {
        EmptySets {
            members: self.empty_members,
            lists: self.empty_lists,
        }
    }

    /// Whether any bit of `flag` is set.
    pub const fn has(&self, flag: PodFlags) -> bool {
        self.flags.intersects(flag)
    }

    /// Whether any inbound connection can be captured (linkerd always captures inbound).
    pub const fn inbound_capture(&self) -> bool {
        self.has(
            PodFlags::INBOUND_ALL
                .union(PodFlags::INBOUND_LIST)
                .union(PodFlags::LINKERD),
        )
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

/// Value of the per-socket `SOCK_OWNER` storage: the credentials of the task that created the
/// socket, which is what iptables' owner match looks at (the socket file's credentials).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOwner {
    pub uid: u32,
    pub gid: u32,
}

/// Where the running kernel keeps a socket's creator (iptables' owner match reads the socket
/// file's credentials, `sk->sk_socket->file->f_cred`, their `fsuid` and `fsgid`): the agent
/// reads these offsets from the kernel's BTF and gives them to the programs at load time. The
/// connect programs then read the creator from the socket itself; with an offset unknown
/// (zero), `sock_create` records every socket's creator in `SOCK_OWNER` instead.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CredOffsets {
    /// `struct sock`'s `sk_socket`.
    pub sk_socket: u32,
    /// `struct socket`'s `file`.
    pub socket_file: u32,
    /// `struct file`'s `f_cred`.
    pub file_cred: u32,
    /// `struct cred`'s `fsuid` and `fsgid`.
    pub cred_fsuid: u32,
    pub cred_fsgid: u32,
}

impl CredOffsets {
    /// Every offset found (none of these members is a struct's first).
    pub const fn known(&self) -> bool {
        self.sk_socket != 0
            && self.socket_file != 0
            && self.file_cred != 0
            && self.cred_fsuid != 0
            && self.cred_fsgid != 0
    }
}

/// Defines a `#[repr(u32)]` kind of per-pod set from one list of variants and values, with
/// `ALL` and `from_u32` (the values are map keys: never reuse one).
macro_rules! set_kinds {
    ($(#[doc = $kdoc:literal])* $name:ident {
        $($(#[doc = $doc:literal])* $variant:ident = $value:literal,)*
    }) => {
        $(#[doc = $kdoc])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
        pub enum $name {
            $($(#[doc = $doc])* $variant = $value,)*
        }

        impl $name {
            /// Every kind, in value order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub const fn from_u32(v: u32) -> Option<Self> {
                match v {
                    $($value => Some(Self::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

set_kinds! {
    /// Which per-pod set a `MemberKey` belongs to.
    MemberKind {
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
}

impl MemberKind {
    /// This set's bit in [`PodConfig::empty_members`].
    pub const fn bit(self) -> u8 {
        1 << (self as u32 - 1)
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

set_kinds! {
    /// Which per-pod prefix list a `CidrKey` belongs to: CIDR lists (families are separate lists, as
    /// istio keeps separate iptables and ip6tables rules) and port-range lists (a range is stored as
    /// the prefixes of the 16-bit port space that cover it).
    CidrKind {
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
}

impl CidrKind {
    /// This list's bit in [`PodConfig::empty_lists`].
    pub const fn bit(self) -> u16 {
        1 << (self as u32 - 1)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_sockets_are_known_by_their_owner() {
        let mut cfg =
            PodConfig::new(PodFlags::NONE, 15001, 15006, 15008).with_owners(&[1337], &[1338]);
        assert_eq!(
            (cfg.proxy_uids(), cfg.proxy_gids()),
            (&[1337][..], &[1338][..])
        );
        let owner = |uid, gid| SockOwner { uid, gid };
        assert!(cfg.is_proxy(&owner(1337, 0)));
        assert!(cfg.is_proxy(&owner(1000, 1338)), "by gid, as -g");
        assert!(!cfg.is_proxy(&owner(1000, 1000)));
        // Entries past the counts do not count.
        cfg.uids[1] = 1000;
        assert!(!cfg.is_proxy(&owner(1000, 1000)));
    }

    #[test]
    fn every_set_has_a_bit_of_its_own() {
        let members = MemberKind::ALL.iter().fold(0u32, |acc, k| {
            assert_eq!(acc & k.bit() as u32, 0, "{k:?}");
            acc | k.bit() as u32
        });
        assert_eq!(members.count_ones() as usize, MemberKind::ALL.len());
        let lists = CidrKind::ALL.iter().fold(0u32, |acc, k| {
            assert_eq!(acc & k.bit() as u32, 0, "{k:?}");
            acc | k.bit() as u32
        });
        assert_eq!(lists.count_ones() as usize, CidrKind::ALL.len());
    }

    #[test]
    fn sets_present_are_looked_up_and_the_rest_skipped() {
        let cfg = PodConfig::new(PodFlags::NONE, 15001, 15006, 15008);
        let empty = cfg.empty_sets();
        assert_eq!(empty, EmptySets::UNKNOWN);
        assert!(
            !empty.no_members(MemberKind::OutboundExcludePort),
            "unknown: look"
        );
        assert!(!empty.no_list(CidrKind::ExcludeV4), "unknown: look");
        let cfg = cfg.with_sets_present([MemberKind::InboundExcludePort], [CidrKind::IncludeV4]);
        let empty = cfg.empty_sets();
        assert!(!empty.no_members(MemberKind::InboundExcludePort));
        assert!(empty.no_members(MemberKind::OutboundExcludePort));
        assert!(!empty.no_list(CidrKind::IncludeV4));
        assert!(empty.no_list(CidrKind::ExcludeV4));
        assert!(empty.no_list(CidrKind::RouteV6));
    }

    #[test]
    fn the_config_keeps_its_layout() {
        // Pinned maps of an earlier release hold this layout: a new field takes padding only.
        assert_eq!(core::mem::size_of::<PodConfig>(), 112);
        assert_eq!(core::mem::offset_of!(PodConfig, empty_lists), 14);
    }

    #[test]
    fn unknown_flag_bits_are_named() {
        assert_eq!(PodFlags::from_bits(PodFlags::ALL.bits()), Ok(PodFlags::ALL));
        assert_eq!(PodFlags::from_bits(1 << 30 | 1), Err(1 << 30));
        // Bit 3 was never given out.
        assert_eq!(PodFlags::from_bits(1 << 3), Err(1 << 3));
    }
}

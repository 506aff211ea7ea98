use core::{
    ffi::c_void,
    ptr::{self, addr_of_mut},
};

use aya_ebpf::{
    bindings::{
        bpf_map_type, bpf_sock, BPF_ANY, BPF_F_CLONE, BPF_F_INGRESS, BPF_F_NO_PREALLOC,
        BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE,
    },
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_uid_gid, bpf_probe_read_kernel,
        generated::{
            bpf_bind, bpf_get_netns_cookie, bpf_sk_storage_get, bpf_sock_ops_cb_flags_set,
        },
    },
    macros::{
        btf_map, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, map, sk_lookup, sk_msg, sock_ops,
    },
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuHashMap, SockHash},
    programs::{
        SkLookupContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext, SockoptContext,
    },
    EbpfContext,
};
use sockmesh_common::{
    counters, decide, decide_inbound, flags, is_loopback, is_v4_mapped, sizes, tcp_drained,
    v4_mapped, window_has_room, AccelSock, Action, Addr, Arrival, CidrKey, CidrKind, Conn, ConnKey,
    CounterKey, KernelOffsets, ListenerKey, LocalAddrKey, MemberKey, MemberKind, OrigDst,
    PodConfig, Proto, Reason, Rules, SockKey, SockOwner, Verdict, AF_INET, AF_INET6,
    CIDR_KEY_FIXED_BITS, LISTENER_SLOTS, SK_USER_DATA_FLAGS,
};

// The hash maps that hold what registrations write are not preallocated (BPF_F_NO_PREALLOC):
// their memory follows the pods registered rather than the maps' sizes. LRU maps and socket
// hashes cannot be so made.

#[map(name = "SM_PODS")]
static PODS: HashMap<u64, PodConfig> = HashMap::with_max_entries(sizes::PODS, BPF_F_NO_PREALLOC);

#[map(name = "SM_MEMBERS")]
static MEMBERS: HashMap<MemberKey, u8> =
    HashMap::with_max_entries(sizes::MEMBERS, BPF_F_NO_PREALLOC);

#[map(name = "SM_CIDRS")]
static CIDRS: LpmTrie<CidrKey, u8> = LpmTrie::with_max_entries(sizes::CIDRS, BPF_F_NO_PREALLOC);

#[map(name = "SM_LOCAL_ADDRS")]
static LOCAL_ADDRS: HashMap<LocalAddrKey, u8> =
    HashMap::with_max_entries(sizes::LOCAL_ADDRS, BPF_F_NO_PREALLOC);

#[map(name = "SM_ORIG_DST")]
static ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::with_max_entries(sizes::ORIG_DST, 0);

#[map(name = "SM_COUNTERS")]
static COUNTERS: PerCpuHashMap<CounterKey, u64> =
    PerCpuHashMap::with_max_entries(sizes::COUNTERS, BPF_F_NO_PREALLOC);

/// The original destination of a redirected socket, for as long as the socket lives.
#[btf_map(name = "SM_SOCK_DST")]
static SOCK_DST: SkStorage<OrigDst> = SkStorage::new();

/// Listening TCP sockets of the attached cgroup, by (netns, port, family): where sk_lookup finds
/// a pod's inbound proxy. Recorded whether or not the pod is registered yet, so a proxy that
/// listened before `init` is found; entries leave with their sockets.
#[map(name = "SM_LISTENERS")]
static LISTENERS: SockHash<ListenerKey> = SockHash::with_max_entries(sizes::LISTENERS, 0);

/// A registered pod's own addresses → its netns cookie (sk_lookup cannot read the cookie).
#[map(name = "SM_ADDR_POD")]
static ADDR_POD: HashMap<Addr, u64> = HashMap::with_max_entries(sizes::ADDR_POD, BPF_F_NO_PREALLOC);

/// A pod's routes (keys as `CidrKind::RouteV4/V6`) → the source address the kernel picks for
/// them: what a redirected socket is bound to, so the proxy sees the usual client address.
#[map(name = "SM_ROUTE_SRC")]
static ROUTE_SRC: LpmTrie<CidrKey, Addr> =
    LpmTrie::with_max_entries(sizes::ROUTE_SRC, BPF_F_NO_PREALLOC);

/// Both ends of established local connections of registered pods (sk_msg acceleration).
#[map(name = "SM_SOCKS")]
static SOCKS: SockHash<SockKey> = SockHash::with_max_entries(sizes::SOCKS, 0);

/// The node's acceleration switch, set by the agent when it loads the programs (1: on).
#[no_mangle]
static SOCKMESH_ACCEL: u8 = 0;

/// Accelerated sockets sending by TCP (1) or redirecting (0): by TCP when the peer was not in
/// `SOCKS` yet or its window was full, until all of that TCP data has been read, since a
/// reader takes redirected data before TCP's.
#[btf_map(name = "SM_SOCK_TCP")]
static SOCK_TCP: SkStorage<u8> = SkStorage::new();

/// Each accelerated socket's kernel address (where sk_msg reads how much its reader has left
/// unread, see `unread`) and whether it receives redirected data, by its key. An LRU map, so
/// closed sockets' entries give way; a stale one is never used to send to (that goes by
/// `SOCKS`), only to size the window.
#[map(name = "SM_PEER_SK")]
static PEER_SK: LruHashMap<SockKey, AccelSock> = LruHashMap::with_max_entries(sizes::SOCKS, 0);

/// Where the fields sk_msg reads are in the running kernel's structs (see `KernelOffsets`),
/// set by the agent at load; zero: unknown, nothing is redirected.
#[no_mangle]
static SOCKMESH_KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    sk_user_data: 0,
    psock_msg_tot_len: 0,
    tcp_write_seq: 0,
    tcp_snd_una: 0,
    tcp_rcv_nxt: 0,
    tcp_copied_seq: 0,
};

/// Who created each socket of a registered pod.
/// Accepted sockets inherit their listener's (the map is made with BPF_F_CLONE), so a proxy's
/// accepted connections are known as the proxy's.
#[btf_map(name = "SM_SOCK_OWNER")]
static SOCK_OWNER: ClonedSkStorage<SockOwner> = ClonedSkStorage::new();

/// Socket storage whose values are copied to the sockets a listener accepts (BPF_F_CLONE),
/// which aya's `SkStorage` does not offer. Laid out as aya's BTF map definitions are: the
/// loader reads the map's type, flags and sizes from these fields' types.
#[repr(C)]
struct ClonedSkStorage<T> {
    r#type: *const [i32; bpf_map_type::BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; (BPF_F_NO_PREALLOC | BPF_F_CLONE) as usize],
}

// SAFETY: placeholders the loader patches; never dereferenced.
unsafe impl<T> Sync for ClonedSkStorage<T> {}

impl<T> ClonedSkStorage<T> {
    const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }

    /// The value of socket `sk` (a kernel socket pointer), if it has one.
    #[inline(always)]
    fn get(&self, sk: *mut c_void) -> *mut T {
        let map = ptr::from_ref(self).cast_mut().cast::<c_void>();
        unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), 0) }.cast()
    }
}

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
const SO_ORIGINAL_DST: i32 = 80;
const IPPROTO_TCP: u32 = 6;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

const V4_LOCALHOST: [u8; 4] = [127, 0, 0, 1];
const V6_LOCALHOST: Addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Set lookups of one pod, answered from the maps.
struct PodRules {
    netns: u64,
}

impl Rules for PodRules {
    #[inline(always)]
    fn member(&self, kind: MemberKind, value: u32) -> bool {
        let key = MemberKey {
            netns: self.netns,
            kind: kind as u32,
            value,
        };
        unsafe { MEMBERS.get(&key) }.is_some()
    }

    #[inline(always)]
    fn cidr(&self, kind: CidrKind, addr: &Addr) -> bool {
        let bits = if kind.is_v6() { 128 } else { 32 };
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + bits,
            CidrKey::new(self.netns, kind, addr),
        );
        CIDRS.get(&key).is_some()
    }

    #[inline(always)]
    fn route_excluded(&self, dst: &Addr) -> bool {
        let (kind, bits) = if is_v4_mapped(dst) {
            (CidrKind::RouteV4, 32)
        } else {
            (CidrKind::RouteV6, 128)
        };
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + bits,
            CidrKey::new(self.netns, kind, dst),
        );
        CIDRS.get(&key).is_some_and(|v| *v == 1)
    }

    #[inline(always)]
    fn port_range(&self, kind: CidrKind, port: u16) -> bool {
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + 16,
            CidrKey::port(self.netns, kind, port),
        );
        CIDRS.get(&key).is_some()
    }
}

// The helpers below are BPF subprograms (not inlined): each gets its own stack frame, which
// keeps the connect programs within the verifier's 512-byte combined stack limit.

#[inline(never)]
fn count(netns: u64, counter: u32) {
    let key = CounterKey {
        netns,
        counter,
        _pad: 0,
    };
    match COUNTERS.get_ptr_mut(&key) {
        Some(v) => unsafe { *v += 1 },
        None => {
            let _ = COUNTERS.insert(&key, &1, BPF_NOEXIST as u64);
        }
    }
}

#[inline(always)]
fn addr_from_words(w: [u32; 4]) -> Addr {
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        a[i * 4] = b[0];
        a[i * 4 + 1] = b[1];
        a[i * 4 + 2] = b[2];
        a[i * 4 + 3] = b[3];
        i += 1;
    }
    a
}

/// Read a `[u32; 4]` context field word by word: the verifier only allows context loads at
/// constant offsets from the unmodified context pointer, and LLVM would otherwise build a pointer.
macro_rules! read_words {
    ($ptr:expr, $field:ident) => {{
        // Reload the context pointer for every word so LLVM cannot share an interior pointer.
        let base = $ptr;
        let reload = || ptr::read_volatile(&base);
        addr_from_words([
            ptr::read_volatile(&(*reload()).$field[0]),
            ptr::read_volatile(&(*reload()).$field[1]),
            ptr::read_volatile(&(*reload()).$field[2]),
            ptr::read_volatile(&(*reload()).$field[3]),
        ])
    }};
}

#[inline(always)]
fn words_from_addr(a: &Addr) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// All zeroes, or v4-mapped 0.0.0.0 (an unbound socket's address).
#[inline(always)]
fn is_zero_addr(a: &Addr) -> bool {
    is_zero(a) || (is_v4_mapped(a) && a[12..16] == [0, 0, 0, 0])
}

#[inline(always)]
fn is_zero(a: &Addr) -> bool {
    let w = words_from_addr(a);
    w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == 0
}

/// Whether `dst` is an address of this netns, i.e. the route would leave through `lo`.
#[inline(never)]
fn is_local(netns: u64, dst: &Addr) -> bool {
    if is_v4_mapped(dst) {
        if dst[12] == 127 {
            return true;
        }
    } else if words_from_addr(dst) == words_from_addr(&V6_LOCALHOST) {
        return true;
    }
    let key = LocalAddrKey { netns, addr: *dst };
    unsafe { LOCAL_ADDRS.get(&key) }.is_some()
}

// ---------------------------------------------------------------------------------------------
// sock_create: remember who created each socket of a registered pod.

#[cgroup_sock(sock_create)]
pub fn sockmesh_sock_create(ctx: SockContext) -> i32 {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if unsafe { PODS.get(&netns) }.is_none() {
        return 1;
    }
    let ids = bpf_get_current_uid_gid();
    let map = ptr::from_ref(&SOCK_OWNER).cast_mut().cast::<c_void>();
    let owner = unsafe {
        bpf_sk_storage_get(
            map,
            ctx.sock.cast(),
            ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    };
    if !owner.is_null() {
        unsafe {
            *owner.cast::<SockOwner>() = SockOwner {
                uid: ids as u32,
                gid: (ids >> 32) as u32,
            }
        };
    }
    // Never refuse a socket.
    1
}

// ---------------------------------------------------------------------------------------------
// connect4 / connect6

#[cgroup_sock_addr(connect4)]
pub fn sockmesh_connect4(ctx: SockAddrContext) -> i32 {
    try_connect::<true, false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn sockmesh_connect6(ctx: SockAddrContext) -> i32 {
    try_connect::<true, true>(&ctx)
}

// sendmsg4/6: unconnected UDP sends (DNS capture).

#[cgroup_sock_addr(sendmsg4)]
pub fn sockmesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    try_connect::<false, false>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sockmesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    try_connect::<false, true>(&ctx)
}

/// Decide and redirect a connect() (`CONNECT`) or an unconnected UDP sendmsg(). Returns 1 to
/// let the call proceed (rewritten or not), 0 to refuse it with EPERM: only when a captured
/// call could not be recorded, so nothing escapes capture.
#[inline(always)]
fn try_connect<const CONNECT: bool, const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(cfg) = (unsafe { PODS.get(&netns) }) else {
        return 1;
    };
    let proto = match unsafe { (*sa).type_ } {
        SOCK_STREAM => Proto::Tcp,
        // UDP is only ever captured for DNS.
        SOCK_DGRAM if cfg.has(sockmesh_common::flags::DNS) => Proto::Udp,
        _ => return 1,
    };
    let mut conn = Conn {
        proto,
        dst: [0; 16],
        dport: 0,
        src: [0; 16],
        uid: 0,
        gid: 0,
        dst_is_local: false,
        mark: 0,
    };
    read_conn::<V6>(ctx, netns, &mut conn);
    let verdict = decide(cfg, &PodRules { netns }, &conn);
    count(netns, verdict.reason() as u32);
    if verdict.action == Action::Pass {
        if CONNECT
            && proto == Proto::Tcp
            && conn.dst_is_local
            && !is_zero_addr(&conn.src)
            && !is_local(netns, &conn.src)
        {
            // A transparent socket (original-source upstream) calling the pod: remember it so
            // that sk_lookup does not take it for inbound traffic.
            let local_origin = Verdict::tproxy(0, Reason::LocalOrigin);
            return redirect::<CONNECT, V6>(ctx, cfg, &conn, &local_origin);
        }
        // A socket connected again (UDP can) must not keep an earlier capture's record.
        if CONNECT {
            let sk = unsafe { (*sa).__bindgen_anon_1.sk };
            if !unsafe { SOCK_DST.get_ptr_mut(ctx) }.is_null() {
                let _ = unsafe { SOCK_DST.delete(sk) };
            }
        }
        return 1;
    }
    redirect::<CONNECT, V6>(ctx, cfg, &conn, &verdict)
}

/// Fill `conn` from the context: destination (0.0.0.0 / :: read as localhost), bound source,
/// port, the socket owner's credentials, and whether the destination is local. A BPF subprogram
/// (not inlined) to keep the caller's stack frame small.
#[inline(never)]
fn read_conn<const V6: bool>(ctx: &SockAddrContext, netns: u64, conn: &mut Conn) {
    let v6 = V6;
    let sa = ctx.sock_addr;
    let sk = unsafe { (*sa).__bindgen_anon_1.sk };
    let (mut dst, src) = if v6 {
        unsafe { (read_words!(sa, user_ip6), read_words!(sk, src_ip6)) }
    } else {
        (
            v4_mapped(unsafe { (*sa).user_ip4 }.to_ne_bytes()),
            v4_mapped(unsafe { (*sk).src_ip4 }.to_ne_bytes()),
        )
    };
    if is_zero(&dst) || (is_v4_mapped(&dst) && dst[12..16] == [0, 0, 0, 0]) {
        dst = if v6 && !is_v4_mapped(&dst) {
            V6_LOCALHOST
        } else {
            v4_mapped(V4_LOCALHOST)
        };
    }
    // The socket's creator, as iptables' owner match; the current task for sockets created
    // before the pod was registered.
    let owner = SOCK_OWNER.get(unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }.cast());
    let (uid, gid) = if owner.is_null() {
        let ids = bpf_get_current_uid_gid();
        (ids as u32, (ids >> 32) as u32)
    } else {
        let o = unsafe { *owner };
        (o.uid, o.gid)
    };
    conn.dst = dst;
    conn.src = src;
    conn.dport = u16::from_be(unsafe { (*sa).user_port } as u16);
    conn.uid = uid;
    conn.gid = gid;
    conn.dst_is_local = is_local(netns, &dst);
    conn.mark = unsafe { (*sk).mark };
}

/// Record the original destination and rewrite the call to localhost at the verdict's port;
/// for connect(), also bind the source (see [`bind_source`]). Returns the program's verdict.
#[inline(never)]
fn redirect<const CONNECT: bool, const V6: bool>(
    ctx: &SockAddrContext,
    cfg: &PodConfig,
    conn: &Conn,
    verdict: &Verdict,
) -> i32 {
    let v6 = V6;
    let (port, reason) = (verdict.port, verdict.reason);
    let rewrite = match verdict.action {
        Action::Redirect => true,
        // TPROXY: remembered (sock_ops publishes it for sk_lookup), destination left alone.
        Action::Tproxy => false,
        Action::Pass => return 1,
    };
    let sa = ctx.sock_addr;
    let v4_dst = is_v4_mapped(&conn.dst);
    let mut record = OrigDst {
        addr: conn.dst,
        port: conn.dport,
        family: if v4_dst { AF_INET } else { AF_INET6 },
        reason: reason as u32,
    };
    let stored = unsafe { SOCK_DST.get_or_insert_ptr_mut(ctx, Some(&mut record)) };
    if stored.is_null() {
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        count(netns, counters::ORIG_DST_STORE_FAILED);
        return 0;
    }
    unsafe { *stored = record };
    if !rewrite {
        return 1;
    }
    set_source::<CONNECT, V6>(ctx, cfg, conn);
    let port = u32::from_ne_bytes((port.to_be() as u32).to_ne_bytes());
    unsafe {
        if !v6 {
            ptr::write_volatile(
                addr_of_mut!((*sa).user_ip4),
                u32::from_ne_bytes(V4_LOCALHOST),
            );
        } else {
            let target = if v4_dst {
                v4_mapped(V4_LOCALHOST)
            } else {
                V6_LOCALHOST
            };
            let w = words_from_addr(&target);
            ptr::write_volatile(addr_of_mut!((*sa).user_ip6[0]), w[0]);
            ptr::write_volatile(addr_of_mut!((*sa).user_ip6[1]), w[1]);
            ptr::write_volatile(addr_of_mut!((*sa).user_ip6[2]), w[2]);
            ptr::write_volatile(addr_of_mut!((*sa).user_ip6[3]), w[3]);
        }
        ptr::write_volatile(addr_of_mut!((*sa).user_port), port);
    }
    1
}

#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: Addr,
    scope_id: u32,
}

/// The source address the kernel would have chosen for the original destination of an unbound
/// socket: the destination itself for the pod's own address, the pod's primary address for a
/// remote one, nothing (the default is right) for localhost or a bound socket.
#[inline(always)]
fn natural_source(netns: u64, cfg: &PodConfig, conn: &Conn) -> Option<Addr> {
    if !is_zero(&conn.src) && !(is_v4_mapped(&conn.src) && conn.src[12..16] == [0, 0, 0, 0]) {
        return None;
    }
    let v4 = is_v4_mapped(&conn.dst);
    if conn.dst_is_local {
        if (v4 && conn.dst[12] == 127)
            || (!v4 && words_from_addr(&conn.dst) == words_from_addr(&V6_LOCALHOST))
        {
            return None;
        }
        Some(conn.dst)
    } else {
        // The route's source address, else the pod's primary address.
        let (kind, bits) = if v4 {
            (CidrKind::RouteV4, 32)
        } else {
            (CidrKind::RouteV6, 128)
        };
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + bits,
            CidrKey::new(netns, kind, &conn.dst),
        );
        if let Some(src) = ROUTE_SRC.get(&key) {
            if !is_zero(src) {
                return Some(*src);
            }
        }
        if v4 {
            (cfg.src_v4 != [0, 0, 0, 0]).then(|| v4_mapped(cfg.src_v4))
        } else {
            (!is_zero(&cfg.src_v6)).then_some(cfg.src_v6)
        }
    }
}

/// Give a redirected call the source address it would have had without capture, so the proxy
/// sees the peer it sees after iptables' REDIRECT (the pod's address, not 127.0.0.1): bind the
/// socket (connect, with `bpf_bind`, port 0) or set the datagram's source (sendmsg). A failure
/// leaves the call as it was.
#[inline(never)]
fn set_source<const CONNECT: bool, const V6: bool>(
    ctx: &SockAddrContext,
    cfg: &PodConfig,
    conn: &Conn,
) {
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(source) = natural_source(netns, cfg, conn) else {
        return;
    };
    let sa = ctx.sock_addr;
    unsafe {
        if !CONNECT {
            if V6 {
                let w = words_from_addr(&source);
                ptr::write_volatile(addr_of_mut!((*sa).msg_src_ip6[0]), w[0]);
                ptr::write_volatile(addr_of_mut!((*sa).msg_src_ip6[1]), w[1]);
                ptr::write_volatile(addr_of_mut!((*sa).msg_src_ip6[2]), w[2]);
                ptr::write_volatile(addr_of_mut!((*sa).msg_src_ip6[3]), w[3]);
            } else {
                let ip = u32::from_ne_bytes([source[12], source[13], source[14], source[15]]);
                ptr::write_volatile(addr_of_mut!((*sa).msg_src_ip4), ip);
            }
        } else if V6 {
            let mut sa = SockaddrIn6 {
                family: AF_INET6,
                port: 0,
                flowinfo: 0,
                addr: source,
                scope_id: 0,
            };
            bpf_bind(
                ctx.sock_addr,
                ptr::from_mut(&mut sa).cast(),
                core::mem::size_of::<SockaddrIn6>() as i32,
            );
        } else {
            let mut sa = SockaddrIn {
                family: AF_INET,
                port: 0,
                addr: [source[12], source[13], source[14], source[15]],
                zero: [0; 8],
            };
            bpf_bind(
                ctx.sock_addr,
                ptr::from_mut(&mut sa).cast(),
                core::mem::size_of::<SockaddrIn>() as i32,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// recvmsg4 / recvmsg6: a captured DNS query's replies come from the server it asked.

#[cgroup_sock_addr(recvmsg4)]
pub fn sockmesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    try_recvmsg(&ctx, false);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sockmesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    try_recvmsg(&ctx, true);
    1
}

#[inline(always)]
fn try_recvmsg(ctx: &SockAddrContext, v6: bool) {
    let record = unsafe { SOCK_DST.get_ptr_mut(ctx) };
    if record.is_null() {
        return;
    }
    let record = unsafe { *record };
    if record.reason != Reason::DnsCaptured as u32 {
        return;
    }
    let sa = ctx.sock_addr;
    let (from, port) = unsafe {
        let from = if v6 {
            read_words!(sa, user_ip6)
        } else {
            v4_mapped((*sa).user_ip4.to_ne_bytes())
        };
        (from, u16::from_be((*sa).user_port as u16))
    };
    // Only datagrams from the DNS proxy the query was sent to.
    let from_proxy = if is_v4_mapped(&from) {
        from[12] == 127
    } else {
        words_from_addr(&from) == words_from_addr(&V6_LOCALHOST)
    };
    if !from_proxy || port != sockmesh_common::DNS_CAPTURE_PORT {
        return;
    }
    rewrite_user_addr(ctx, &record, v6);
}

/// Write `record`'s address and port into the context's user address (getpeername, recvmsg).
#[inline(always)]
fn rewrite_user_addr(ctx: &SockAddrContext, record: &OrigDst, v6: bool) {
    let sa = ctx.sock_addr;
    let port = u32::from_ne_bytes(((record.port.to_be()) as u32).to_ne_bytes());
    unsafe {
        if v6 {
            let w = words_from_addr(&record.addr);
            ptr::write_volatile(addr_of_mut!((*sa).user_ip6[0]), w[0]);
            ptr::write_volatile(addr_of_mut!((*sa).user_ip6[1]), w[1]);
            ptr::write_volatile(addr_of_mut!((*sa).user_ip6[2]), w[2]);
            ptr::write_volatile(addr_of_mut!((*sa).user_ip6[3]), w[3]);
        } else {
            let a = &record.addr;
            let ip = u32::from_ne_bytes([a[12], a[13], a[14], a[15]]);
            ptr::write_volatile(addr_of_mut!((*sa).user_ip4), ip);
        }
        ptr::write_volatile(addr_of_mut!((*sa).user_port), port);
    }
}

// ---------------------------------------------------------------------------------------------
// getpeername4 / getpeername6: the app sees where it meant to go, as with NAT.

#[cgroup_sock_addr(getpeername4)]
pub fn sockmesh_getpeername4(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, false);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn sockmesh_getpeername6(ctx: SockAddrContext) -> i32 {
    try_getpeername(&ctx, true);
    1
}

#[inline(always)]
fn try_getpeername(ctx: &SockAddrContext, v6: bool) {
    let record = unsafe { SOCK_DST.get_ptr_mut(ctx) };
    if record.is_null() {
        return;
    }
    let record = unsafe { *record };
    rewrite_user_addr(ctx, &record, v6);
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    count(netns, counters::PEERNAME_REWRITE);
}

// ---------------------------------------------------------------------------------------------
// sock_ops: publish the record under the 4-tuple once established; forget it on close.

#[sock_ops]
pub fn sockmesh_sockops(ctx: SockOpsContext) -> u32 {
    // Acceleration and the rest each in their own frame (the verifier adds up nested frames).
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        if let Some(counter) = accelerate(&ctx, netns) {
            count(netns, counter);
        }
    }
    try_sockops(&ctx);
    1
}

#[inline(always)]
fn sockops_conn_key(ctx: &SockOpsContext, netns: u64) -> ConnKey {
    let (client, server) = if ctx.family() == AF_INET as u32 {
        (
            v4_mapped(ctx.local_ip4().to_ne_bytes()),
            v4_mapped(ctx.remote_ip4().to_ne_bytes()),
        )
    } else {
        let ops = ctx.ops;
        unsafe { (read_words!(ops, local_ip6), read_words!(ops, remote_ip6)) }
    };
    ConnKey {
        netns,
        client,
        server,
        client_port: ctx.local_port() as u16,
        server_port: u32::from_be(ctx.remote_port()) as u16,
        _pad: 0,
    }
}

/// The sock_ops context's socket, if it has one.
#[inline(always)]
fn sockops_sk(ctx: &SockOpsContext) -> Option<*mut bpf_sock> {
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    (!sk.is_null()).then_some(sk)
}

/// The socket's key in `SOCKS` and `PEER_SK`: its 4-tuple as `sockops_conn_key` reads it.
#[inline(always)]
fn sockops_sock_key(ctx: &SockOpsContext, netns: u64) -> SockKey {
    let k = sockops_conn_key(ctx, netns);
    SockKey {
        netns,
        local: k.client,
        remote: k.server,
        local_port: k.client_port,
        remote_port: k.server_port,
        _pad: 0,
    }
}

#[inline(never)]
fn try_sockops(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
        && op != BPF_SOCK_OPS_TCP_LISTEN_CB
        && op != BPF_SOCK_OPS_TCP_CONNECT_CB
    {
        return;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if op == BPF_SOCK_OPS_TCP_LISTEN_CB {
        // Several sockets may listen on one port (SO_REUSEPORT workers): each takes a free
        // slot, so one closing (its entry leaves with it) does not hide the others.
        let mut slot = 0;
        while slot < LISTENER_SLOTS {
            let mut key = ListenerKey {
                netns,
                port: ctx.local_port(),
                family: ctx.family(),
                slot,
                _pad: 0,
            };
            if LISTENERS
                .update(&mut key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64)
                .is_ok()
            {
                return;
            }
            slot += 1;
        }
        count(netns, counters::LISTENER_STORE_FAILED);
        return;
    }
    if op == BPF_SOCK_OPS_STATE_CB {
        if ctx.arg(1) == BPF_TCP_CLOSE {
            let key = sockops_conn_key(ctx, netns);
            if ORIG_DST.remove(&key).is_ok() {
                count(netns, counters::ORIG_DST_RELEASED);
            }
            forget_address(ctx, netns);
        }
        return;
    }
    let Some(sk) = sockops_sk(ctx) else {
        return;
    };
    let map = ptr::from_ref(&SOCK_DST).cast_mut().cast::<c_void>();
    let record = unsafe { bpf_sk_storage_get(map, sk.cast(), ptr::null_mut(), 0) };
    if record.is_null() {
        return;
    }
    let record = unsafe { *record.cast::<OrigDst>() };
    // A TPROXY record must be published before the SYN goes out, for sk_lookup to see it;
    // redirected connections are published once established.
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB
        && record.reason != Reason::TproxyToLocal as u32
        && record.reason != Reason::LocalOrigin as u32
    {
        return;
    }
    let key = sockops_conn_key(ctx, netns);
    if ORIG_DST.insert(&key, &record, 0).is_err() {
        count(netns, counters::ORIG_DST_STORE_FAILED);
        aya_log_ebpf::error!(
            ctx,
            "pod netns {}: original destination not stored (map full?): the proxy will see \
             the capture port",
            netns
        );
        return;
    }
    unsafe { bpf_sock_ops_cb_flags_set(ctx.ops, BPF_SOCK_OPS_STATE_CB_FLAG as i32) };
}

/// Put an established socket of a registered pod in `SOCKS` when its peer is local (loopback,
/// or a pod address of this node) and acceleration is on for the node and the pod. The kernel
/// takes the entry out when the socket closes. The counter to count, if any (counted by the
/// caller: three frames deep would pass the verifier's stack limit).
#[inline(never)]
fn accelerate(ctx: &SockOpsContext, netns: u64) -> Option<u32> {
    if unsafe { ptr::read_volatile(&SOCKMESH_ACCEL) } == 0 {
        return None;
    }
    let pod = unsafe { PODS.get(&netns) }?;
    if pod.flags & flags::NO_ACCEL != 0 {
        return None;
    }
    // One key on the stack (the connect programs' frames leave little room), checked as
    // `SockKey::local_conn` would.
    let mut key = sockops_sock_key(ctx, netns);
    if !is_loopback(&key.remote) && unsafe { ADDR_POD.get(&key.remote) }.is_none() {
        return None;
    }
    // The proxy's sockets; an app's only if the pod says so (all).
    let proxy = is_proxy_socket(ctx, pod);
    if !proxy && pod.flags & flags::ACCEL_APPS == 0 {
        return None;
    }
    // Its address and role first: once in SOCKS the socket can be sent to.
    if !record_address(ctx, &key, proxy) {
        return Some(counters::ACCEL_SOCK_FULL);
    }
    match SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64) {
        Ok(()) => {
            // Told when it closes, to forget its address (see `forget_address`).
            unsafe { bpf_sock_ops_cb_flags_set(ctx.ops, BPF_SOCK_OPS_STATE_CB_FLAG as i32) };
            Some(counters::ACCEL_SOCK_ADDED)
        }
        Err(_) => Some(counters::ACCEL_SOCK_FULL),
    }
}

/// Whether the socket is `pod`'s proxy's: its creator (or its listener's, for an accepted
/// one) is one of the proxy's uids or gids.
#[inline(never)]
fn is_proxy_socket(ctx: &SockOpsContext, pod: &PodConfig) -> bool {
    let Some(sk) = sockops_sk(ctx) else {
        return false;
    };
    let owner = SOCK_OWNER.get(sk.cast());
    !owner.is_null() && pod.is_proxy(unsafe { &*owner })
}

/// An accelerated socket closed: its entry in `PEER_SK` goes, so that the LRU map only ever
/// has to make room by dropping closed sockets' entries that this missed.
#[inline(never)]
fn forget_address(ctx: &SockOpsContext, netns: u64) {
    let _ = PEER_SK.remove(&sockops_sock_key(ctx, netns));
}

/// Record the socket's kernel address under `key` (for senders to size its window), and
/// whether it receives redirected data (`proxy`: a socket of the pod's proxy). False if it
/// could not be stored.
#[inline(never)]
fn record_address(ctx: &SockOpsContext, key: &SockKey, proxy: bool) -> bool {
    let Some(sk) = sockops_sk(ctx) else {
        return false;
    };
    let value = AccelSock {
        addr: sk as u64,
        receives: u32::from(proxy),
        _pad: 0,
    };
    PEER_SK.insert(key, &value, BPF_ANY as u64).is_ok()
}

/// The kernel's field offsets the agent set at load, if it set them.
#[inline(always)]
fn kernel_offsets() -> Option<KernelOffsets> {
    let off = unsafe { ptr::read_volatile(&SOCKMESH_KERNEL_OFFSETS) };
    off.known().then_some(off)
}

/// Bytes sk_msg has queued for the socket at kernel address `sk` that its reader has not taken
/// (its psock's `msg_tot_len`), or `None` if they cannot be read.
#[inline(never)]
fn unread(sk: u64) -> Option<u64> {
    let off = kernel_offsets()?;
    let user_data: u64 =
        unsafe { bpf_probe_read_kernel((sk + u64::from(off.sk_user_data)) as *const u64) }.ok()?;
    let psock = user_data & !SK_USER_DATA_FLAGS;
    if psock == 0 {
        return None;
    }
    let len: u32 =
        unsafe { bpf_probe_read_kernel((psock + u64::from(off.psock_msg_tot_len)) as *const u32) }
            .ok()?;
    Some(u64::from(len))
}

// ---------------------------------------------------------------------------------------------
// sk_msg (attached to SOCKS): a message sent on one end of a local connection goes straight to
// the other end's receive queue, skipping TCP/IP, when that end receives redirected data (the
// proxy's) and its window has room; otherwise by TCP, until what went that way has been read.

#[sk_msg]
pub fn sockmesh_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) {
    let msg = ctx.msg;
    let sk = unsafe { (*msg).__bindgen_anon_3.sk };
    if sk.is_null() {
        return;
    }
    let netns = unsafe { bpf_get_netns_cookie(msg.cast()) };
    let (local, remote) = unsafe {
        if (*msg).family == AF_INET as u32 {
            (
                v4_mapped((*msg).local_ip4.to_ne_bytes()),
                v4_mapped((*msg).remote_ip4.to_ne_bytes()),
            )
        } else {
            (read_words!(msg, local_ip6), read_words!(msg, remote_ip6))
        }
    };
    let me = SockKey {
        netns,
        local,
        remote,
        local_port: unsafe { (*msg).local_port } as u16,
        remote_port: u32::from_be(unsafe { (*msg).remote_port }) as u16,
        _pad: 0,
    };
    let remote_pod = unsafe { ADDR_POD.get(&remote) }.copied();
    let mut peer = me.peer(remote_pod);
    let size = u64::from(unsafe { (*msg).size });
    // Whatever is not redirected here the caller sends by TCP; the socket is then marked so
    // that the rest follows, until all of it has been read (the two paths do not keep each
    // other's order: a reader takes redirected data first).
    let tcp = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&SOCK_TCP).cast_mut().cast::<c_void>(),
            sk.cast(),
            ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        )
    }
    .cast::<u8>();
    if tcp.is_null() {
        return;
    }
    // Both ends' kernel addresses: the peer's is missing until it is in SOCKS.
    let (Some(me_sk), Some(peer_sk)) = (unsafe { PEER_SK.get(&me) }, unsafe { PEER_SK.get(&peer) })
    else {
        unsafe { *tcp = 1 };
        return;
    };
    // An app's socket gets all its data by TCP.
    if peer_sk.receives == 0 {
        return;
    }
    let (me_sk, peer_sk) = (me_sk.addr, peer_sk.addr);
    let by_tcp = unsafe { *tcp } != 0;
    if by_tcp && !drained(me_sk, peer_sk) {
        return;
    }
    // Within the peer's window, redirected; SK_DROP when the peer is not in the map.
    if !window_has_room(unread(peer_sk), size) {
        if !by_tcp {
            unsafe { *tcp = 1 };
            count(netns, counters::ACCEL_WINDOW_FULL);
        }
        return;
    }
    let redirected = SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64;
    unsafe { *tcp = u8::from(!redirected) };
    if redirected && by_tcp {
        count(netns, counters::ACCEL_RESUMED);
    }
}

/// Whether all the TCP data the socket at kernel address `sender` sent its peer (at `peer`)
/// has been read ([`tcp_drained`]); false if the fields cannot be read.
#[inline(never)]
fn drained(sender: u64, peer: u64) -> bool {
    let Some(off) = kernel_offsets() else {
        return false;
    };
    let field = |sk: u64, at: u32| unsafe {
        bpf_probe_read_kernel((sk + u64::from(at)) as *const u32).ok()
    };
    match (
        field(sender, off.tcp_write_seq),
        field(sender, off.tcp_snd_una),
        field(peer, off.tcp_rcv_nxt),
        field(peer, off.tcp_copied_seq),
    ) {
        (Some(w), Some(u), Some(n), Some(c)) => tcp_drained(w, u, n, c),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// sk_lookup (attached per pod netns): steer new inbound connections to the proxy's listener.

const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn sockmesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

#[inline(always)]
fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    let (protocol, family, ifindex, port) = unsafe {
        (
            ptr::read_volatile(&(*l).protocol),
            ptr::read_volatile(&(*l).family),
            ptr::read_volatile(&(*l).ingress_ifindex),
            ptr::read_volatile(&(*l).local_port),
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let local = if family == AF_INET as u32 {
        v4_mapped(unsafe { ptr::read_volatile(&(*l).local_ip4) }.to_ne_bytes())
    } else {
        unsafe { read_words!(l, local_ip6) }
    };
    let Some(&netns) = (unsafe { ADDR_POD.get(&local) }) else {
        return SK_PASS;
    };
    let Some(cfg) = (unsafe { PODS.get(&netns) }) else {
        return SK_PASS;
    };
    let remote = if family == AF_INET as u32 {
        v4_mapped(unsafe { ptr::read_volatile(&(*l).remote_ip4) }.to_ne_bytes())
    } else {
        unsafe { read_words!(l, remote_ip6) }
    };
    let v4 = is_v4_mapped(&local);
    // Connections made inside the pod (arriving on lo, or from one of the pod's own addresses
    // even when the kernel reports another ingress) were decided by the outbound rules: only a
    // TPROXY-mode connection they marked for the inbound listener is steered.
    if ifindex == LOOPBACK_IFINDEX || is_local(netns, &remote) {
        let key = ConnKey {
            netns,
            client: remote,
            server: local,
            client_port: u16::from_be(unsafe { ptr::read_volatile(&(*l).remote_port) }),
            server_port: port as u16,
            _pad: 0,
        };
        let Some(record) = (unsafe { ORIG_DST.get(&key) }) else {
            return SK_PASS;
        };
        if record.reason != Reason::TproxyToLocal as u32 {
            return SK_PASS;
        }
        return steer(ctx, netns, cfg.inbound_port, v4, Reason::TproxyToLocal);
    }
    let arrival = Arrival {
        src: remote,
        dst: local,
        dport: port as u16,
        ifindex,
    };
    // A connection the pod made from a transparent source is local traffic, whatever it
    // looks like here.
    let key = ConnKey {
        netns,
        client: remote,
        server: local,
        client_port: u16::from_be(unsafe { ptr::read_volatile(&(*l).remote_port) }),
        server_port: port as u16,
        _pad: 0,
    };
    if unsafe { ORIG_DST.get(&key) }.is_some_and(|r| r.reason == Reason::LocalOrigin as u32) {
        return SK_PASS;
    }
    let verdict = decide_inbound(cfg, &PodRules { netns }, &arrival);
    if verdict.action != Action::Redirect {
        count(netns, verdict.reason as u32);
        return SK_PASS;
    }
    steer(ctx, netns, verdict.port, v4, verdict.reason)
}

/// Hand the connection to the pod's listener on `port`, or refuse it if there is none.
#[inline(always)]
fn steer(ctx: &SkLookupContext, netns: u64, port: u16, v4: bool, reason: Reason) -> u32 {
    // A listener of the connection's family first; for IPv4, a dual-stack IPv6 one next.
    let families: [u32; 2] = if v4 {
        [AF_INET as u32, AF_INET6 as u32]
    } else {
        [AF_INET6 as u32, AF_INET6 as u32]
    };
    let mut f = 0;
    while f < 2 {
        let mut slot = 0;
        while slot < LISTENER_SLOTS {
            let key = ListenerKey {
                netns,
                port: port as u32,
                family: families[f],
                slot,
                _pad: 0,
            };
            if LISTENERS.redirect_sk_lookup(ctx, key, 0).is_ok() {
                count(netns, reason as u32);
                return SK_PASS;
            }
            slot += 1;
        }
        f += 1;
    }
    // No proxy: refuse, as a REDIRECT to a closed port would.
    count(netns, Reason::InboundNoListener as u32);
    aya_log_ebpf::warn!(
        ctx,
        "pod netns {}: inbound connection refused: no listener on capture port {}",
        netns,
        port
    );
    SK_DROP
}

// ---------------------------------------------------------------------------------------------
// getsockopt: SO_ORIGINAL_DST (SOL_IP, 80) and IP6T_SO_ORIGINAL_DST (SOL_IPV6, 80).

#[cgroup_sockopt(getsockopt)]
pub fn sockmesh_getsockopt(ctx: SockoptContext) -> i32 {
    try_getsockopt(&ctx);
    1
}

#[inline(always)]
fn try_getsockopt(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return;
    }
    let sk: *mut bpf_sock = unsafe { (*so).__bindgen_anon_1.sk };
    if sk.is_null() {
        return;
    }
    let (family, protocol) = unsafe { ((*sk).family, (*sk).protocol) };
    if protocol != IPPROTO_TCP {
        return;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(cfg) = (unsafe { PODS.get(&netns) }) else {
        return;
    };
    let (client, server) = unsafe {
        if family == AF_INET as u32 {
            (
                v4_mapped((*sk).dst_ip4.to_ne_bytes()),
                v4_mapped((*sk).src_ip4.to_ne_bytes()),
            )
        } else {
            (read_words!(sk, dst_ip6), read_words!(sk, src_ip6))
        }
    };
    let client_port = u16::from_be(unsafe { (*sk).dst_port });
    if client_port == 0 {
        // Not connected: conntrack has nothing for it either.
        return;
    }
    let server_port = unsafe { (*sk).src_port } as u16;
    // conntrack answers SOL_IP for IPv4 flows (v4 sockets, or v6 sockets with a v4-mapped peer)
    // and SOL_IPV6 for IPv6 flows.
    let v4_flow = is_v4_mapped(&client);
    if (level == SOL_IP) != v4_flow {
        return;
    }
    let key = ConnKey {
        netns,
        client,
        server,
        client_port,
        server_port,
        _pad: 0,
    };
    let (addr, port, counter) = match unsafe { ORIG_DST.get(&key) } {
        Some(o) => (o.addr, o.port, counters::ORIG_DST_HIT),
        None => {
            // A flow that was not redirected: conntrack reports its own destination, but only
            // where the pod has rules for that family.
            if !v4_flow && !cfg.has(sockmesh_common::flags::IPV6) {
                return;
            }
            (server, server_port, counters::ORIG_DST_LOCAL)
        }
    };
    let optval = unsafe { (*so).__bindgen_anon_2.optval }.cast::<u8>();
    let optval_end = unsafe { (*so).__bindgen_anon_3.optval_end }.cast::<u8>();
    let len: usize = if v4_flow { 16 } else { 28 };
    if (optval as usize) + len > optval_end as usize {
        return;
    }
    unsafe {
        if (*so).optlen < len as i32 {
            return;
        }
        if v4_flow {
            write_sockaddr_in(optval, &addr, port);
        } else {
            write_sockaddr_in6(optval, &addr, port);
        }
        ptr::write_volatile(addr_of_mut!((*so).optlen), len as i32);
        ptr::write_volatile(addr_of_mut!((*so).retval), 0);
    }
    count(netns, counter);
}

/// `struct sockaddr_in` into the first 16 bytes of `out` (bounds checked by the caller).
#[inline(always)]
unsafe fn write_sockaddr_in(out: *mut u8, addr: &Addr, port: u16) {
    let fam = AF_INET.to_ne_bytes();
    let p = port.to_be_bytes();
    let bytes: [u8; 16] = [
        fam[0], fam[1], p[0], p[1], addr[12], addr[13], addr[14], addr[15], 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let mut i = 0;
    while i < 16 {
        unsafe { ptr::write_volatile(out.add(i), bytes[i]) };
        i += 1;
    }
}

/// `struct sockaddr_in6` into the first 28 bytes of `out` (bounds checked by the caller).
#[inline(always)]
unsafe fn write_sockaddr_in6(out: *mut u8, addr: &Addr, port: u16) {
    let fam = AF_INET6.to_ne_bytes();
    let p = port.to_be_bytes();
    let head: [u8; 8] = [fam[0], fam[1], p[0], p[1], 0, 0, 0, 0];
    let mut i = 0;
    while i < 8 {
        unsafe { ptr::write_volatile(out.add(i), head[i]) };
        i += 1;
    }
    let mut i = 0;
    while i < 16 {
        unsafe { ptr::write_volatile(out.add(8 + i), addr[i]) };
        i += 1;
    }
    let mut i = 0;
    while i < 4 {
        unsafe { ptr::write_volatile(out.add(24 + i), 0) };
        i += 1;
    }
}

//! The maps and globals every program shares, the pod's lookups answered from them, and the
//! per-pod counters.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{
        bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE, BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE,
        BPF_NOEXIST, BPF_SK_STORAGE_GET_F_CREATE,
    },
    btf_maps::SkStorage,
    helpers::generated::{bpf_get_current_task_btf, bpf_sk_storage_get, bpf_task_storage_get},
    macros::{btf_map, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuHashMap, SockHash},
};
use sockmesh_common::{
    is_v4_mapped, sizes, AccelSock, Addr, Arrival, CidrKey, CidrKind, ConnKey, CounterKey,
    CredOffsets, EmptySets, Handoff, KernelOffsets, ListenerKey, LocalAddrKey, Lookups, MemberKey,
    MemberKind, NetnsCookie, OrigDst, PodConfig, Reason, Rules, SockKey, SockOwner,
    CIDR_KEY_FIXED_BITS,
};

// The hash maps that hold what registrations write are not preallocated (BPF_F_NO_PREALLOC):
// their memory follows the pods registered rather than the maps' sizes. LRU maps and socket
// hashes cannot be so made.

#[map(name = "SM_PODS")]
pub static PODS: HashMap<NetnsCookie, PodConfig> =
    HashMap::with_max_entries(sizes::PODS, BPF_F_NO_PREALLOC);

#[map(name = "SM_MEMBERS")]
static MEMBERS: HashMap<MemberKey, u8> =
    HashMap::with_max_entries(sizes::MEMBERS, BPF_F_NO_PREALLOC);

#[map(name = "SM_CIDRS")]
static CIDRS: LpmTrie<CidrKey, u8> = LpmTrie::with_max_entries(sizes::CIDRS, BPF_F_NO_PREALLOC);

#[map(name = "SM_LOCAL_ADDRS")]
static LOCAL_ADDRS: HashMap<LocalAddrKey, u8> =
    HashMap::with_max_entries(sizes::LOCAL_ADDRS, BPF_F_NO_PREALLOC);

#[map(name = "SM_ORIG_DST")]
pub static ORIG_DST: LruHashMap<ConnKey, OrigDst> =
    LruHashMap::with_max_entries(sizes::ORIG_DST, 0);

#[map(name = "SM_COUNTERS")]
static COUNTERS: PerCpuHashMap<CounterKey, u64> =
    PerCpuHashMap::with_max_entries(sizes::COUNTERS, BPF_F_NO_PREALLOC);

/// The original destination of a redirected UDP socket (DNS), for as long as the socket lives.
#[btf_map(name = "SM_SOCK_DST")]
pub static SOCK_DST: SkStorage<OrigDst> = SkStorage::new();

/// The original destination of a redirected TCP socket, from `connect4` or `connect6` to
/// sock_ops' `TCP_CONNECT_CB`, which moves it to `ORIG_DST` under the connection's 4-tuple: in
/// the connecting task's storage (`HANDOFF`), since both run in the task's connect(). The slot
/// is made once per task and overwritten by each connect, where a map keyed by socket cookie
/// cost each connection an insert and a delete in a shared hash table (and socket storage an
/// allocation and its release). See [`handoff_slot`]; used where [`task_handoff`].
#[btf_map(name = "SM_HANDOFF")]
pub static HANDOFF: TaskStorage<Handoff> = TaskStorage::new();

/// The node's record handoff (1: through `HANDOFF`), set by the agent when the kernel lets the
/// connect and sock_ops programs use task storage (Linux 6.16); 0: through `CONNECTING` by
/// socket cookie, published once established. A constant to the verifier, which removes the
/// other way's code (and its helper calls, unknown to older kernels).
#[no_mangle]
pub static SOCKMESH_TASK_HANDOFF: u8 = 0;

/// Whether records go through `HANDOFF`.
#[inline(always)]
pub fn task_handoff() -> bool {
    (unsafe { ptr::read_volatile(&SOCKMESH_TASK_HANDOFF) }) != 0
}

/// Records `HANDOFF` could not pass on (their connect stopped before its SYN: it failed, or TCP
/// Fast Open deferred the SYN to the first write), by socket cookie: the next connect of their
/// task parks its slot's record here, where `TCP_CONNECT_CB` looks for it when its task's slot
/// is another socket's. An LRU map: a failed connect's record gives way. Without
/// `SOCKMESH_TASK_HANDOFF`, every redirected TCP connect's record, until established.
#[map(name = "SM_CONNECTING")]
pub static CONNECTING: LruHashMap<u64, Handoff> =
    LruHashMap::with_max_entries(sizes::CONNECTING, 0);

/// Slot 0: 1 once a record was parked in `CONNECTING` (until then `TCP_CONNECT_CB` does not
/// look there).
#[map(name = "SM_PARKED")]
pub static PARKED: Array<u32> = Array::with_max_entries(1, 0);

/// Task storage (`BPF_MAP_TYPE_TASK_STORAGE`), which aya-ebpf does not define yet: a BTF map
/// definition as its own socket storage's, for the loader.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields are placeholders the loader reads from BTF; nothing dereferences them.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        TaskStorage {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }
}

/// The current task's `HANDOFF` slot, made (zeroed) if `create` and it has none; null if it
/// has none (or it could not be made).
#[inline(always)]
pub fn handoff_slot(create: bool) -> *mut Handoff {
    let map = ptr::from_ref(&HANDOFF).cast_mut().cast::<c_void>();
    let flags = if create {
        u64::from(BPF_LOCAL_STORAGE_GET_F_CREATE)
    } else {
        0
    };
    unsafe { bpf_task_storage_get(map, bpf_get_current_task_btf(), ptr::null_mut(), flags) }.cast()
}

/// Listening TCP sockets of the attached cgroup, by (netns, port, family): where sk_lookup finds
/// a pod's inbound proxy. Recorded whether or not the pod is registered yet, so a proxy that
/// listened before `init` is found; entries leave with their sockets.
#[map(name = "SM_LISTENERS")]
pub static LISTENERS: SockHash<ListenerKey> = SockHash::with_max_entries(sizes::LISTENERS, 0);

/// A registered pod's own addresses → its netns cookie (sk_lookup cannot read the cookie).
#[map(name = "SM_ADDR_POD")]
pub static ADDR_POD: HashMap<Addr, NetnsCookie> =
    HashMap::with_max_entries(sizes::ADDR_POD, BPF_F_NO_PREALLOC);

/// A pod's routes (keys as `CidrKind::RouteV4/V6`) → the source address the kernel picks for
/// them: what a redirected socket is bound to, so the proxy sees the usual client address.
#[map(name = "SM_ROUTE_SRC")]
pub static ROUTE_SRC: LpmTrie<CidrKey, Addr> =
    LpmTrie::with_max_entries(sizes::ROUTE_SRC, BPF_F_NO_PREALLOC);

/// Both ends of established local connections of registered pods (sk_msg acceleration).
#[map(name = "SM_SOCKS")]
pub static SOCKS: SockHash<SockKey> = SockHash::with_max_entries(sizes::SOCKS, 0);

/// The node's acceleration switch, set by the agent when it loads the programs (1: on).
#[no_mangle]
pub static SOCKMESH_ACCEL: u8 = 0;

/// Accelerated sockets sending by TCP (1) or redirecting (0): by TCP when the peer was not in
/// `SOCKS` yet or its window was full, until all of that TCP data has been read, since a
/// reader takes redirected data before TCP's.
#[btf_map(name = "SM_SOCK_TCP")]
pub static SOCK_TCP: SkStorage<u8> = SkStorage::new();

/// Each accelerated socket's kernel address (where sk_msg reads how much its reader has left
/// unread, see `unread`) and whether it receives redirected data, by its key. An LRU map, so
/// closed sockets' entries give way; a stale one is never used to send to (that goes by
/// `SOCKS`), only to size the window.
#[map(name = "SM_PEER_SK")]
pub static PEER_SK: LruHashMap<SockKey, AccelSock> = LruHashMap::with_max_entries(sizes::SOCKS, 0);

/// Where the fields sk_msg reads are in the running kernel's structs (see `KernelOffsets`),
/// set by the agent at load; zero: unknown, nothing is redirected.
#[no_mangle]
pub static SOCKMESH_KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    sk_user_data: 0,
    psock_msg_tot_len: 0,
    tcp_write_seq: 0,
    tcp_snd_una: 0,
    tcp_rcv_nxt: 0,
    tcp_copied_seq: 0,
};

/// Where the kernel keeps a socket's creator (see `CredOffsets`), set by the agent at load;
/// zero: unknown, `sock_create` records every creator in `SOCK_OWNER`.
#[no_mangle]
pub static SOCKMESH_CRED_OFFSETS: CredOffsets = CredOffsets {
    sk_socket: 0,
    socket_file: 0,
    file_cred: 0,
    cred_fsuid: 0,
    cred_fsgid: 0,
};

/// Who created a socket, without the kernel's BTF: every socket of a registered pod (recorded
/// by `sock_create`). With it the creator is read from the socket and nothing is recorded.
#[btf_map(name = "SM_SOCK_OWNER")]
pub static SOCK_OWNER: SkStorage<SockOwner> = SkStorage::new();

/// Who created the listener of each (netns, port, family) (`ListenerKey`, slot 0), recorded by
/// sock_ops when it listens: an accepted socket has no file to read its creator from until it
/// is accepted, and takes its listener's (acceleration tells a proxy's sockets by it). An LRU
/// map: an entry outlives its listener until the next listener of its port replaces it or
/// room is needed; only a socket that listener accepted reads it.
#[map(name = "SM_LISTENER_OWNER")]
pub static LISTENER_OWNER: LruHashMap<ListenerKey, SockOwner> =
    LruHashMap::with_max_entries(sizes::LISTENERS, 0);

/// Socket `sk`'s value in socket storage `map` (a kernel socket pointer), if it has one:
/// what aya's `SkStorage` offers only for sock_addr contexts.
#[inline(always)]
pub fn sk_storage_of<T>(map: &SkStorage<T>, sk: *mut c_void) -> *mut T {
    let map = ptr::from_ref(map).cast_mut().cast::<c_void>();
    unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), 0) }.cast()
}

/// Socket `sk`'s value in socket storage `map`, made (zeroed) if it has none; null if the
/// kernel could not make it.
#[inline(always)]
pub fn sk_storage_create<T>(map: &SkStorage<T>, sk: *mut c_void) -> *mut T {
    let map = ptr::from_ref(map).cast_mut().cast::<c_void>();
    let create = u64::from(BPF_SK_STORAGE_GET_F_CREATE);
    unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), create) }.cast()
}

/// The registered pod of netns `netns`, if it is one.
#[inline(always)]
pub fn pod(netns: NetnsCookie) -> Option<&'static PodConfig> {
    unsafe { PODS.get(&netns) }
}

/// Set lookups of one pod, answered from the maps, but for the sets its config says are
/// empty.
pub struct PodRules {
    pub netns: NetnsCookie,
    empty: EmptySets,
}

impl PodRules {
    /// The lookups of pod `netns`, whose config is `cfg`.
    #[inline(always)]
    pub fn of(netns: NetnsCookie, cfg: &PodConfig) -> Self {
        PodRules {
            netns,
            empty: cfg.empty_sets(),
        }
    }

    /// The lookups of pod `netns` with every set looked up (for its addresses alone).
    #[inline(always)]
    pub fn addrs(netns: NetnsCookie) -> Self {
        PodRules {
            netns,
            empty: EmptySets::UNKNOWN,
        }
    }
}

impl Rules for PodRules {
    #[inline(always)]
    fn member(&self, kind: MemberKind, value: u32) -> bool {
        if self.empty.no_members(kind) {
            return false;
        }
        let key = MemberKey {
            netns: self.netns,
            kind: kind as u32,
            value,
        };
        unsafe { MEMBERS.get(&key) }.is_some()
    }

    #[inline(always)]
    fn cidr(&self, kind: CidrKind, addr: &Addr) -> bool {
        if self.empty.no_list(kind) {
            return false;
        }
        let bits = if kind.is_v6() { 128 } else { 32 };
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + bits,
            CidrKey::new(self.netns, kind, addr),
        );
        CIDRS.get(&key).is_some()
    }

    #[inline(always)]
    fn route_excluded(&self, dst: &Addr) -> bool {
        CIDRS
            .get(&route_key(self.netns, dst))
            .is_some_and(|v| *v == 1)
    }

    #[inline(always)]
    fn port_range(&self, kind: CidrKind, port: u16) -> bool {
        if self.empty.no_list(kind) {
            return false;
        }
        let key = Key::new(
            CIDR_KEY_FIXED_BITS + 16,
            CidrKey::port(self.netns, kind, port),
        );
        CIDRS.get(&key).is_some()
    }
}

impl Lookups for PodRules {
    #[inline(always)]
    fn pod_addr(&self, addr: &Addr) -> bool {
        let key = LocalAddrKey {
            netns: self.netns,
            addr: *addr,
        };
        unsafe { LOCAL_ADDRS.get(&key) }.is_some()
    }

    #[inline(always)]
    fn recorded(&self, a: &Arrival) -> Option<Reason> {
        let record = unsafe { ORIG_DST.get(&ConnKey::arrival(self.netns, a)) }?;
        Reason::from_u32(record.reason)
    }
}

/// The key of `dst`'s route in pod `netns`'s routing table (`CidrKind::RouteV4/V6`).
#[inline(always)]
pub fn route_key(netns: NetnsCookie, dst: &Addr) -> Key<CidrKey> {
    let (kind, bits) = if is_v4_mapped(dst) {
        (CidrKind::RouteV4, 32)
    } else {
        (CidrKind::RouteV6, 128)
    };
    Key::new(CIDR_KEY_FIXED_BITS + bits, CidrKey::new(netns, kind, dst))
}

/// The source address of pod `netns`'s route to `dst` (what the agent stored in `ROUTE_SRC`),
/// if it has one.
#[inline(always)]
pub fn route_source(netns: NetnsCookie, dst: &Addr) -> Option<Addr> {
    ROUTE_SRC
        .get(&route_key(netns, dst))
        .filter(|a| !crate::ctx::is_zero(a))
        .copied()
}

/// Whether `dst` is an address of pod `netns`, i.e. the route would leave through `lo`.
/// A BPF subprogram (not inlined) to keep its callers' stack frames small.
#[inline(never)]
pub fn is_local(netns: NetnsCookie, dst: &Addr) -> bool {
    sockmesh_common::is_local(&PodRules::addrs(netns), dst)
}

/// Add one to pod `netns`'s `counter` (a [`Reason`]'s value, or one of `counters`); returns
/// this CPU's count of it so far (see `counters::worth_logging`).
#[inline(never)]
pub fn count(netns: NetnsCookie, counter: u32) -> u64 {
    let key = CounterKey {
        netns,
        counter,
        _pad: 0,
    };
    match COUNTERS.get_ptr_mut(&key) {
        Some(v) => unsafe {
            *v += 1;
            *v
        },
        None => {
            let _ = COUNTERS.insert(&key, &1, BPF_NOEXIST as u64);
            1
        }
    }
}

//! Loading the kernel object, pinning its maps, and attaching its cgroup programs through pinned
//! BPF links.
//!
//! Links are made and pinned with the raw `bpf(2)` commands (aya 0.14 cannot pin a getsockopt
//! link). A link that is already pinned is updated in place with `BPF_LINK_UPDATE`, so a restarted
//! or upgraded agent swaps programs atomically and capture never lapses.

use std::{
    fs,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::LpmTrie, HashMap, Map, MapData, MapError, PerCpuHashMap, SockHash},
    programs::{CgroupSock, CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use sockmesh_common::{
    names, AccelSock, CidrKey, ConnKey, CounterKey, KernelOffsets, LocalAddrKey, MemberKey,
    OrigDst, PodConfig, SockKey,
};

use crate::sys::{self, SyscallError};

/// The kernel object, built by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockmesh-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error(transparent)]
    Syscall(#[from] SyscallError),
    #[error("loading the kernel object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name} at {path}: {source}")]
    Map {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("{0}")]
    Setup(String),
}

/// The cgroup programs and where each is attached.
pub struct Attachment {
    pub program: &'static str,
    pub attach_type: u32,
    pub link_name: &'static str,
    kind: ProgKind,
}

#[derive(Clone, Copy)]
enum ProgKind {
    Sock,
    SockAddr,
    SockOps,
    Sockopt,
}

// enum bpf_attach_type (include/uapi/linux/bpf.h).
const BPF_CGROUP_INET_SOCK_CREATE: u32 = 2;
const BPF_CGROUP_SOCK_OPS: u32 = 3;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
const BPF_CGROUP_UDP6_RECVMSG: u32 = 20;
const BPF_CGROUP_GETSOCKOPT: u32 = 21;
const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;

pub const ATTACHMENTS: [Attachment; 11] = [
    Attachment {
        program: "sockmesh_sendmsg4",
        attach_type: BPF_CGROUP_UDP4_SENDMSG,
        link_name: "sendmsg4",
        kind: ProgKind::SockAddr,
    },
    Attachment {
        program: "sockmesh_sendmsg6",
        attach_type: BPF_CGROUP_UDP6_SENDMSG,
        link_name: "sendmsg6",
        kind: ProgKind::SockAddr,
    },
    Attachment {
        program: "sockmesh_recvmsg4",
        attach_type: BPF_CGROUP_UDP4_RECVMSG,
        link_name: "recvmsg4",
        kind: ProgKind::SockAddr,
    },
    Attachment {
        program: "sockmesh_recvmsg6",
        attach_type: BPF_CGROUP_UDP6_RECVMSG,
        link_name: "recvmsg6",
        kind: ProgKind::SockAddr,
    },
    Attachment {
        program: "sockmesh_sock_create",
        attach_type: BPF_CGROUP_INET_SOCK_CREATE,
        link_name: "sock_create",
        kind: ProgKind::Sock,
    },
    Attachment {
        program: "sockmesh_connect4",
        attach_type: BPF_CGROUP_INET4_CONNECT,
        link_name: "connect4",
        kind: ProgKind::SockAddr,
    },
    Attachment {
        program: "sockmesh_connect6",
        attach_type: BPF_CGROUP_INET6_CONNECT,
        link_name: "connect6",
        kind: ProgKind::SockAddr,
    },
    Attachment {
        program: "sockmesh_getpeername4",
        attach_type: BPF_CGROUP_INET4_GETPEERNAME,
        link_name: "getpeername4",
        kind: ProgKind::SockAddr,
    },
    Attachment {
        program: "sockmesh_getpeername6",
        attach_type: BPF_CGROUP_INET6_GETPEERNAME,
        link_name: "getpeername6",
        kind: ProgKind::SockAddr,
    },
    Attachment {
        program: "sockmesh_sockops",
        attach_type: BPF_CGROUP_SOCK_OPS,
        link_name: "sockops",
        kind: ProgKind::SockOps,
    },
    Attachment {
        program: "sockmesh_getsockopt",
        attach_type: BPF_CGROUP_GETSOCKOPT,
        link_name: "getsockopt",
        kind: ProgKind::Sockopt,
    },
];

pub fn maps_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("maps")
}

pub fn links_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("links")
}

/// Check that `dir` is (inside) a mounted bpf filesystem, creating it if needed.
pub fn prepare_bpffs(dir: &Path) -> Result<(), BpfError> {
    let parent = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if sys::fs_magic(parent)? != sys::BPF_FS_MAGIC {
        return Err(BpfError::Setup(format!(
            "{} is not on a bpf filesystem: mount one first (mount -t bpf bpf {}) or pass \
             --bpffs with a folder under a bpffs mount",
            dir.display(),
            parent.display()
        )));
    }
    for d in [maps_dir(dir), links_dir(dir)] {
        fs::create_dir_all(&d)
            .map_err(|e| BpfError::Setup(format!("cannot create {}: {e}", d.display())))?;
    }
    Ok(())
}

/// Open `dir` as a cgroup v2 directory.
pub fn open_cgroup2(dir: &Path) -> Result<fs::File, BpfError> {
    let magic = sys::fs_magic(dir)
        .map_err(|e| BpfError::Setup(format!("--cgroup {}: {e}", dir.display())))?;
    if magic != sys::CGROUP2_SUPER_MAGIC {
        return Err(BpfError::Setup(format!(
            "--cgroup {} is not a cgroup v2 directory (cgroup v1 cannot carry socket programs): \
             pass the cgroup2 mount or a folder under it (see `mount -t cgroup2`)",
            dir.display()
        )));
    }
    fs::File::open(dir)
        .map_err(|e| BpfError::Setup(format!("--cgroup {}: cannot open: {e}", dir.display())))
}

/// Key and value sizes of every pinned map, as this build lays them out.
fn map_layouts() -> [(&'static str, usize, usize); 14] {
    use sockmesh_common::{ListenerKey, SockKey, SockOwner};
    use std::mem::size_of;
    // LPM-trie keys carry a 4-byte prefix length before the data.
    let lpm = 4 + size_of::<CidrKey>();
    [
        (names::PODS, size_of::<u64>(), size_of::<PodConfig>()),
        (names::MEMBERS, size_of::<MemberKey>(), 1),
        (names::CIDRS, lpm, 1),
        (names::LOCAL_ADDRS, size_of::<LocalAddrKey>(), 1),
        (names::ORIG_DST, size_of::<ConnKey>(), size_of::<OrigDst>()),
        (names::SOCK_DST, 4, size_of::<OrigDst>()),
        (names::SOCK_OWNER, 4, size_of::<SockOwner>()),
        (names::LISTENERS, size_of::<ListenerKey>(), 4),
        (names::ADDR_POD, 16, 8),
        (names::ROUTE_SRC, lpm, 16),
        (names::COUNTERS, size_of::<CounterKey>(), 8),
        (names::SOCKS, size_of::<SockKey>(), 4),
        (names::SOCK_TCP, 4, 1),
        (names::PEER_SK, size_of::<SockKey>(), size_of::<AccelSock>()),
    ]
}

/// Refuse pinned maps whose layout this build does not share (left by an older or newer
/// release): reusing them would corrupt every lookup.
fn check_pinned_layouts(dir: &Path) -> Result<(), BpfError> {
    for (name, key, value) in map_layouts() {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|source| BpfError::Map {
            name,
            path: path.clone(),
            source,
        })?;
        let (k, v) = (info.key_size() as usize, info.value_size() as usize);
        if (k, v) != (key, value) {
            return Err(BpfError::Setup(format!(
                "pinned map {} has key/value sizes {k}/{v}, this build needs {key}/{value}: it \
                 was left by a release with another map layout; migrate it, or start on a new \
                 --bpffs folder and register the pods again",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Load the object with every map pinned (or reused) under `bpffs/maps`.
pub fn load(bpffs: &Path, accel: bool) -> Result<Ebpf, BpfError> {
    let dir = maps_dir(bpffs);
    check_pinned_layouts(&dir)?;
    // sk_msg reads a few kernel fields whose offsets the BTF gives; without acceleration they
    // are left unknown (nothing is redirected).
    let offsets = if accel {
        crate::btf::kernel_offsets().map_err(|e| {
            BpfError::Setup(format!(
                "socket acceleration reads how much each reader has left unread from a kernel \
                 field found through the kernel's BTF, and that failed: {e}. Use a kernel with \
                 CONFIG_DEBUG_INFO_BTF (and sockmap's msg_tot_len, 6.x), or run with \
                 --acceleration off"
            ))
        })?
    } else {
        KernelOffsets::default()
    };
    let accel = u8::from(accel);
    let mut loader = EbpfLoader::new();
    loader.override_global("SOCKMESH_ACCEL", &accel, true);
    loader.override_global("SOCKMESH_KERNEL_OFFSETS", &offsets, true);
    let paths: Vec<(&'static str, PathBuf)> =
        names::ALL.iter().map(|n| (*n, dir.join(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.clone());
    }
    Ok(loader.load(OBJECT)?)
}

fn bpf_syscall(cmd: u32, attr: &mut [u64; 8], call: &'static str) -> Result<i64, SyscallError> {
    // SAFETY: attr is a zeroed, 64-byte bpf_attr prefix laid out for `cmd`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_long,
        )
    };
    if rc < 0 {
        Err(sys::last_err(call))
    } else {
        Ok(rc)
    }
}

const BPF_OBJ_PIN: u32 = 6;
const BPF_OBJ_GET: u32 = 7;
const BPF_LINK_CREATE: u32 = 28;
const BPF_LINK_UPDATE: u32 = 29;

fn u32_pair(lo: u32, hi: u32) -> u64 {
    lo as u64 | ((hi as u64) << 32)
}

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("path without NUL")
}

/// BPF_LINK_CREATE for a cgroup program.
fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> Result<OwnedFd, SyscallError> {
    let mut attr = [0u64; 8];
    attr[0] = u32_pair(prog.as_raw_fd() as u32, cgroup.as_raw_fd() as u32);
    attr[1] = u32_pair(attach_type, 0);
    let fd = bpf_syscall(BPF_LINK_CREATE, &mut attr, "bpf(BPF_LINK_CREATE)")?;
    // SAFETY: the kernel returned a new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<(), SyscallError> {
    let c = cpath(path);
    let mut attr = [0u64; 8];
    attr[0] = c.as_ptr() as u64;
    attr[1] = u32_pair(fd.as_raw_fd() as u32, 0);
    bpf_syscall(BPF_OBJ_PIN, &mut attr, "bpf(BPF_OBJ_PIN)").map(|_| ())
}

fn obj_get(path: &Path) -> Result<OwnedFd, SyscallError> {
    let c = cpath(path);
    let mut attr = [0u64; 8];
    attr[0] = c.as_ptr() as u64;
    let fd = bpf_syscall(BPF_OBJ_GET, &mut attr, "bpf(BPF_OBJ_GET)")?;
    // SAFETY: the kernel returned a new fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> Result<(), SyscallError> {
    let mut attr = [0u64; 8];
    attr[0] = u32_pair(link.as_raw_fd() as u32, prog.as_raw_fd() as u32);
    bpf_syscall(BPF_LINK_UPDATE, &mut attr, "bpf(BPF_LINK_UPDATE)").map(|_| ())
}

/// How a program came to be in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkAction {
    Created,
    Updated,
}

/// Load every cgroup program and put it in force on `cgroup` through a link pinned under
/// `bpffs/links`: a new link if none is pinned, else the pinned link is switched to the new
/// program atomically.
pub fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: BorrowedFd<'_>,
    bpffs: &Path,
) -> Result<Vec<(&'static str, LinkAction)>, BpfError> {
    // Load every program first, so a verifier rejection leaves nothing half attached.
    let mut loaded = Vec::new();
    for a in &ATTACHMENTS {
        let prog = ebpf.program_mut(a.program).ok_or_else(|| {
            BpfError::Setup(format!("the kernel object has no program {}", a.program))
        })?;
        let wrap = |source| BpfError::Program {
            name: a.program,
            source,
        };
        let fd = match a.kind {
            ProgKind::Sock => {
                let p: &mut CgroupSock = prog.try_into().map_err(wrap)?;
                p.load().map_err(wrap)?;
                p.fd().map_err(wrap)?.as_fd().try_clone_to_owned()
            }
            ProgKind::SockAddr => {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(wrap)?;
                p.load().map_err(wrap)?;
                p.fd().map_err(wrap)?.as_fd().try_clone_to_owned()
            }
            ProgKind::SockOps => {
                let p: &mut SockOps = prog.try_into().map_err(wrap)?;
                p.load().map_err(wrap)?;
                p.fd().map_err(wrap)?.as_fd().try_clone_to_owned()
            }
            ProgKind::Sockopt => {
                let p: &mut CgroupSockopt = prog.try_into().map_err(wrap)?;
                p.load().map_err(wrap)?;
                p.fd().map_err(wrap)?.as_fd().try_clone_to_owned()
            }
        }
        .map_err(|source| SyscallError {
            call: "dup(prog)",
            source,
        })?;
        loaded.push((a, fd));
    }
    let mut done = Vec::new();
    for (a, fd) in loaded {
        let pin = links_dir(bpffs).join(a.link_name);
        let action = if pin.exists() {
            let link = obj_get(&pin)?;
            link_update(link.as_fd(), fd.as_fd())?;
            LinkAction::Updated
        } else {
            let link = link_create(fd.as_fd(), cgroup, a.attach_type)?;
            obj_pin(link.as_fd(), &pin)?;
            LinkAction::Created
        };
        done.push((a.link_name, action));
    }
    Ok(done)
}

/// Load the sk_msg program and attach it to the acceleration socket map. The attachment stays
/// with the pinned map (a later agent's replaces it); it is not a pinned link.
pub fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<(), BpfError> {
    const NAME: &str = "sockmesh_sk_msg";
    let wrap = |source| BpfError::Program { name: NAME, source };
    let socks: SockHash<MapData, SockKey> = ebpf
        .take_map(names::SOCKS)
        .ok_or_else(|| BpfError::Setup(format!("the kernel object has no map {}", names::SOCKS)))?
        .try_into()
        .map_err(|source| BpfError::Map {
            name: names::SOCKS,
            path: PathBuf::from(names::SOCKS),
            source,
        })?;
    let prog = ebpf
        .program_mut(NAME)
        .ok_or_else(|| BpfError::Setup(format!("the kernel object has no program {NAME}")))?;
    let p: &mut SkMsg = prog.try_into().map_err(wrap)?;
    p.load().map_err(wrap)?;
    let id = p.attach(socks.fd()).map_err(wrap)?;
    // Dropping the link would detach the program; it stays attached for the map's life.
    std::mem::forget(p.take_link(id).map_err(wrap)?);
    Ok(())
}

/// Load the sk_lookup program (attached per pod netns, not to the cgroup).
pub fn load_sk_lookup(ebpf: &mut Ebpf) -> Result<OwnedFd, BpfError> {
    const NAME: &str = "sockmesh_sk_lookup";
    let wrap = |source| BpfError::Program { name: NAME, source };
    let prog = ebpf
        .program_mut(NAME)
        .ok_or_else(|| BpfError::Setup(format!("the kernel object has no program {NAME}")))?;
    let p: &mut SkLookup = prog.try_into().map_err(wrap)?;
    p.load().map_err(wrap)?;
    Ok(p.fd()
        .map_err(wrap)?
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| SyscallError {
            call: "dup(prog)",
            source,
        })?)
}

const NETNS_LINK_PREFIX: &str = "sk_lookup-";

fn netns_link_pin(bpffs: &Path, netns: u64) -> PathBuf {
    links_dir(bpffs).join(format!("{NETNS_LINK_PREFIX}{netns}"))
}

/// Put the sk_lookup program in force in pod netns `netns` (fd `ns`) through a pinned link.
pub fn attach_netns(
    prog: BorrowedFd<'_>,
    ns: BorrowedFd<'_>,
    bpffs: &Path,
    netns: u64,
) -> Result<LinkAction, BpfError> {
    let pin = netns_link_pin(bpffs, netns);
    if pin.exists() {
        let link = obj_get(&pin)?;
        link_update(link.as_fd(), prog)?;
        return Ok(LinkAction::Updated);
    }
    let link = link_create(prog, ns, BPF_SK_LOOKUP)?;
    obj_pin(link.as_fd(), &pin)?;
    Ok(LinkAction::Created)
}

/// Detach the sk_lookup program from pod netns `netns` (dropping the pin releases the link).
pub fn detach_netns(bpffs: &Path, netns: u64) -> bool {
    fs::remove_file(netns_link_pin(bpffs, netns)).is_ok()
}

/// Switch every pod's sk_lookup link to `prog`. Links whose netns is gone are dropped; their
/// cookies are returned.
pub fn update_netns_links(
    prog: BorrowedFd<'_>,
    bpffs: &Path,
) -> Result<(usize, Vec<u64>), BpfError> {
    let mut updated = 0;
    let mut gone = Vec::new();
    let Ok(rd) = fs::read_dir(links_dir(bpffs)) else {
        return Ok((0, gone));
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(cookie) = name
            .strip_prefix(NETNS_LINK_PREFIX)
            .and_then(|c| c.parse().ok())
        else {
            continue;
        };
        let link = obj_get(&e.path())?;
        match link_update(link.as_fd(), prog) {
            Ok(()) => updated += 1,
            // A link whose netns died is defunct: forget it.
            Err(e2) if e2.source.raw_os_error() == Some(libc::ENOLINK) => {
                let _ = fs::remove_file(e.path());
                gone.push(cookie);
            }
            Err(e2) => return Err(e2.into()),
        }
    }
    Ok((updated, gone))
}

const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;

/// Whether the netns a pinned netns link is attached to still exists (a link is detached,
/// `netns_ino` 0, when its namespace is destroyed).
fn netns_link_alive(pin: &Path) -> Result<bool, SyscallError> {
    let link = obj_get(pin)?;
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose netns member is
    // { netns_ino, attach_type }.
    let mut info = [0u32; 16];
    let mut attr = [0u64; 8];
    attr[0] = u32_pair(link.as_raw_fd() as u32, std::mem::size_of_val(&info) as u32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf_syscall(
        BPF_OBJ_GET_INFO_BY_FD,
        &mut attr,
        "bpf(BPF_OBJ_GET_INFO_BY_FD)",
    )?;
    Ok(info[4] != 0)
}

/// Netns cookies of registered pods whose namespace no longer exists; their pins are removed.
pub fn dead_pods(bpffs: &Path) -> Result<Vec<u64>, BpfError> {
    let mut gone = Vec::new();
    let Ok(rd) = fs::read_dir(links_dir(bpffs)) else {
        return Ok(gone);
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(cookie) = name
            .strip_prefix(NETNS_LINK_PREFIX)
            .and_then(|c| c.parse().ok())
        else {
            continue;
        };
        if !netns_link_alive(&e.path())? {
            let _ = fs::remove_file(e.path());
            gone.push(cookie);
        }
    }
    Ok(gone)
}

/// Typed handles on the pinned maps.
pub struct PinnedMaps {
    pub pods: HashMap<MapData, u64, PodConfig>,
    pub members: HashMap<MapData, MemberKey, u8>,
    pub cidrs: LpmTrie<MapData, CidrKey, u8>,
    pub local_addrs: HashMap<MapData, LocalAddrKey, u8>,
    pub addr_pod: HashMap<MapData, [u8; 16], u64>,
    pub route_src: LpmTrie<MapData, CidrKey, [u8; 16]>,
    pub orig_dst: HashMap<MapData, ConnKey, OrigDst>,
    pub counters: PerCpuHashMap<MapData, CounterKey, u64>,
    /// Sockets of local connections that sk_msg shortcuts (entries leave with their sockets).
    pub socks: SockHash<MapData, SockKey>,
}

/// The map pinned as `name`, as the type `T` that this build gives it.
fn open_map<T>(bpffs: &Path, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = maps_dir(bpffs).join(name);
    let err = |source| BpfError::Map {
        name,
        path: path.clone(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    Map::from_map_data(data)
        .map_err(err)?
        .try_into()
        .map_err(err)
}

impl PinnedMaps {
    pub fn open(bpffs: &Path) -> Result<Self, BpfError> {
        Ok(PinnedMaps {
            pods: open_map(bpffs, names::PODS)?,
            members: open_map(bpffs, names::MEMBERS)?,
            cidrs: open_map(bpffs, names::CIDRS)?,
            local_addrs: open_map(bpffs, names::LOCAL_ADDRS)?,
            addr_pod: open_map(bpffs, names::ADDR_POD)?,
            route_src: open_map(bpffs, names::ROUTE_SRC)?,
            orig_dst: open_map(bpffs, names::ORIG_DST)?,
            counters: open_map(bpffs, names::COUNTERS)?,
            socks: open_map(bpffs, names::SOCKS)?,
        })
    }
}

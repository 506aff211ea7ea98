//! The loader: the kernel object loaded with its maps pinned (or reused), its cgroup programs
//! attached through pinned BPF links, sk_lookup attached per pod netns.
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
    maps::{MapData, MapError, SockHash},
    programs::{
        CgroupSock, CgroupSockAddr, CgroupSockopt, Program, ProgramError, SchedClassifier,
        SkLookup, SkMsg, SockOps,
    },
    Ebpf, EbpfLoader,
};
use sockmesh_common::{names, sizes, CredOffsets, KernelOffsets, NetnsCookie, SockKey};

use super::{
    maps::{check_pinned_layouts, maps_dir},
    sys::{self, SyscallError},
};

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
    #[error("the kernel object has no {0}: was it built from this source?")]
    Missing(String),
    #[error(
        "{dir} is not on a bpf filesystem: mount one first (mount -t bpf bpf {parent}) or pass \
         --bpffs with a folder under a bpffs mount"
    )]
    NotBpffs { dir: PathBuf, parent: PathBuf },
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--cgroup {dir}: {source}")]
    Cgroup {
        dir: PathBuf,
        #[source]
        source: SyscallError,
    },
    #[error(
        "--cgroup {0} is not a cgroup v2 directory (cgroup v1 cannot carry socket programs): \
         pass the cgroup2 mount or a folder under it (see `mount -t cgroup2`)"
    )]
    NotCgroup2(PathBuf),
    #[error("--cgroup {dir}: cannot open: {source}")]
    OpenCgroup {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pinned map {path} has key/value sizes {found:?}, this build needs {wanted:?}: it was \
         left by a release with another map layout; migrate it, or start on a new --bpffs \
         folder and register the pods again"
    )]
    Layout {
        path: PathBuf,
        found: (usize, usize),
        wanted: (usize, usize),
    },
    #[error(
        "pinned map {path} holds {pinned} entries, {setting} asks for {wanted}: a map's size is \
         fixed when it is made; pass {fix}, or start on a new --bpffs folder (a node restart) to \
         resize it"
    )]
    PinnedSize {
        path: PathBuf,
        pinned: u32,
        /// The setting as given (`--max-pods 2`), or its name where it is the size.
        setting: String,
        wanted: u32,
        /// The setting that fits the pinned map.
        fix: String,
    },
    #[error(
        "socket acceleration reads how much each reader has left unread from a kernel field \
         found through the kernel's BTF, and that failed: {0}. Use a kernel with \
         CONFIG_DEBUG_INFO_BTF (and sockmap's msg_tot_len, 6.x), or run with --acceleration off"
    )]
    Btf(#[source] super::btf::BtfError),
}

/// The cgroup programs and where each is attached.
pub struct Attachment {
    pub program: &'static str,
    pub attach_type: u32,
    pub link_name: &'static str,
    kind: ProgKind,
    need: Need,
}

/// When a cgroup program is put in force.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    Always,
    /// Only where the programs cannot read a socket's creator from the socket (no kernel
    /// BTF): `sock_create` records it instead.
    WithoutCreator,
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
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

pub const ATTACHMENTS: [Attachment; 11] = [
    Attachment {
        program: "sockmesh_sendmsg4",
        attach_type: BPF_CGROUP_UDP4_SENDMSG,
        link_name: "sendmsg4",
        kind: ProgKind::SockAddr,
        need: Need::Always,
    },
    Attachment {
        program: "sockmesh_sendmsg6",
        attach_type: BPF_CGROUP_UDP6_SENDMSG,
        link_name: "sendmsg6",
        kind: ProgKind::SockAddr,
        need: Need::Always,
    },
    Attachment {
        program: "sockmesh_recvmsg4",
        attach_type: BPF_CGROUP_UDP4_RECVMSG,
        link_name: "recvmsg4",
        kind: ProgKind::SockAddr,
        need: Need::Always,
    },
    Attachment {
        program: "sockmesh_recvmsg6",
        attach_type: BPF_CGROUP_UDP6_RECVMSG,
        link_name: "recvmsg6",
        kind: ProgKind::SockAddr,
        need: Need::Always,
    },
    Attachment {
        program: "sockmesh_sock_create",
        attach_type: BPF_CGROUP_INET_SOCK_CREATE,
        link_name: "sock_create",
        kind: ProgKind::Sock,
        need: Need::WithoutCreator,
    },
    Attachment {
        program: "sockmesh_connect4",
        attach_type: BPF_CGROUP_INET4_CONNECT,
        link_name: "connect4",
        kind: ProgKind::SockAddr,
        need: Need::Always,
    },
    Attachment {
        program: "sockmesh_connect6",
        attach_type: BPF_CGROUP_INET6_CONNECT,
        link_name: "connect6",
        kind: ProgKind::SockAddr,
        need: Need::Always,
    },
    Attachment {
        program: "sockmesh_getpeername4",
        attach_type: BPF_CGROUP_INET4_GETPEERNAME,
        link_name: "getpeername4",
        kind: ProgKind::SockAddr,
        need: Need::Always,
    },
    Attachment {
        program: "sockmesh_getpeername6",
        attach_type: BPF_CGROUP_INET6_GETPEERNAME,
        link_name: "getpeername6",
        kind: ProgKind::SockAddr,
        need: Need::Always,
    },
    Attachment {
        program: "sockmesh_sockops",
        attach_type: BPF_CGROUP_SOCK_OPS,
        link_name: "sockops",
        kind: ProgKind::SockOps,
        need: Need::Always,
    },
    Attachment {
        program: "sockmesh_getsockopt",
        attach_type: BPF_CGROUP_GETSOCKOPT,
        link_name: "getsockopt",
        kind: ProgKind::Sockopt,
        need: Need::Always,
    },
];

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
        return Err(BpfError::NotBpffs {
            dir: dir.to_owned(),
            parent: parent.to_owned(),
        });
    }
    for path in [maps_dir(dir), links_dir(dir)] {
        fs::create_dir_all(&path).map_err(|source| BpfError::CreateDir { path, source })?;
    }
    Ok(())
}

/// Open `dir` as a cgroup v2 directory.
pub fn open_cgroup2(dir: &Path) -> Result<fs::File, BpfError> {
    let magic = sys::fs_magic(dir).map_err(|source| BpfError::Cgroup {
        dir: dir.to_owned(),
        source,
    })?;
    if magic != sys::CGROUP2_SUPER_MAGIC {
        return Err(BpfError::NotCgroup2(dir.to_owned()));
    }
    fs::File::open(dir).map_err(|source| BpfError::OpenCgroup {
        dir: dir.to_owned(),
        source,
    })
}

/// The loaded object, and what its programs were told of the kernel.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// The programs read a socket's creator from the socket (the kernel's BTF placed the
    /// fields): `sock_create` is not needed.
    pub creator_known: bool,
}

/// How the agent loads the object: its settings that the programs read.
#[derive(Clone, Copy)]
pub struct LoadSettings<'a> {
    /// Socket acceleration for the node (`--acceleration on`).
    pub accel: bool,
    /// `ORIG_DST`'s size (`--orig-dst-entries`).
    pub orig_dst_entries: u32,
    /// The node's pod limit (`--max-pods`), which sizes the maps written for pods.
    pub max_pods: u32,
    /// The kernel's BTF, where the offsets of the kernel fields the programs read are found.
    pub btf: &'a Path,
    /// Section timing into `SM_TIMING` (`--section-timing`).
    pub timing: bool,
}

/// Load the object with every map pinned (or reused) under `bpffs/maps`.
pub fn load(bpffs: &Path, settings: &LoadSettings) -> Result<Loaded, BpfError> {
    let LoadSettings {
        accel,
        orig_dst_entries,
        max_pods,
        btf,
        timing,
    } = *settings;
    let dir = maps_dir(bpffs);
    check_pinned_layouts(&dir)?;
    // A pinned map is reused as it is: its size must be the one asked for.
    let orig_dst = SizedMap {
        name: names::ORIG_DST,
        entries: orig_dst_entries,
        setting: "--orig-dst-entries".into(),
        flag: "--orig-dst-entries",
        per: 1,
    };
    orig_dst.check_pinned(&dir)?;
    let by_pods = sizes::BY_PODS.map(|(name, per)| SizedMap {
        name,
        entries: max_pods * per,
        setting: format!("--max-pods {max_pods}"),
        flag: "--max-pods",
        per,
    });
    for map in &by_pods {
        map.check_pinned(&dir)?;
    }
    // The kernel's BTF, read once. The programs read a socket's creator from the socket,
    // through fields it places; without them `sock_create` records every socket's creator (the
    // same answer, at a socket storage per socket). sk_msg reads a few kernel fields it places
    // too, which acceleration cannot do without; without acceleration they are left unknown
    // (nothing is redirected).
    let no_creator = |e: &super::btf::BtfError| {
        tracing::warn!(
            error = %e,
            "the kernel's BTF does not place a socket's creator: every socket of a registered pod \
             gets its creator recorded at creation instead (a socket storage each)"
        );
        CredOffsets::default()
    };
    let data = match super::btf::read(btf) {
        Ok(data) => Some(data),
        Err(e) if accel => return Err(BpfError::Btf(e)),
        Err(e) => {
            no_creator(&e);
            None
        }
    };
    let offsets = match &data {
        Some(data) if accel => super::btf::kernel_offsets(data).map_err(BpfError::Btf)?,
        _ => KernelOffsets::default(),
    };
    let creds = match data.as_deref().map(super::btf::cred_offsets) {
        Some(Ok(creds)) => creds,
        Some(Err(e)) => no_creator(&e),
        None => CredOffsets::default(),
    };
    let handoff = task_handoff(data.is_some());
    let accel = u8::from(accel);
    let mut loader = EbpfLoader::new();
    // SM_HANDOFF is task storage, which aya creates and pins without a typed wrapper (the
    // agent never reads it).
    loader.allow_unsupported_maps();
    loader.map_max_entries(names::ORIG_DST, orig_dst_entries);
    for map in &by_pods {
        loader.map_max_entries(map.name, map.entries);
    }
    loader.override_global("SOCKMESH_ACCEL", &accel, true);
    loader.override_global("SOCKMESH_KERNEL_OFFSETS", &offsets, true);
    loader.override_global("SOCKMESH_CRED_OFFSETS", &creds, true);
    let timing = u8::from(timing);
    loader.override_global("SOCKMESH_TIMING", &timing, true);
    let handoff = u8::from(handoff);
    loader.override_global("SOCKMESH_TASK_HANDOFF", &handoff, true);
    let paths: Vec<(&'static str, PathBuf)> =
        names::ALL.iter().map(|n| (*n, dir.join(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.clone());
    }
    Ok(Loaded {
        ebpf: loader.load(OBJECT)?,
        creator_known: creds.known(),
    })
}

/// A map whose size a setting gives: `entries`, `per` entries for each unit of `flag`.
struct SizedMap {
    name: &'static str,
    entries: u32,
    /// The setting as given, for the error.
    setting: String,
    flag: &'static str,
    per: u32,
}

impl SizedMap {
    /// A pinned map of this name must have the size asked for (it is reused as it is).
    fn check_pinned(&self, dir: &Path) -> Result<(), BpfError> {
        let path = dir.join(self.name);
        if !path.exists() {
            return Ok(());
        }
        let pinned = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map(|i| i.max_entries())
            .map_err(|source| BpfError::Map {
                name: self.name,
                path: path.clone(),
                source,
            })?;
        if pinned == self.entries {
            return Ok(());
        }
        Err(BpfError::PinnedSize {
            path,
            pinned,
            setting: self.setting.clone(),
            wanted: self.entries,
            fix: format!("{} {}", self.flag, pinned / self.per),
        })
    }
}

/// Whether a redirected connect can hand its record to sock_ops through the connecting task's
/// storage (`SM_HANDOFF`): the connect and sock_ops programs may call the task storage helpers
/// (Linux 6.16 and later) and the kernel has BTF (`btf`: the agent read it), which the current
/// task's pointer needs. Otherwise the record goes through `SM_CONNECTING` by socket cookie,
/// published once established (one insert, lookup and delete more per connection).
fn task_handoff(btf: bool) -> bool {
    use aya::{
        programs::ProgramType,
        sys::{is_helper_supported, BpfHelper},
    };
    let helpers = [
        BpfHelper::BPF_FUNC_get_current_task_btf,
        BpfHelper::BPF_FUNC_task_storage_get,
    ];
    let supported = [ProgramType::CgroupSockAddr, ProgramType::SockOps]
        .into_iter()
        .all(|ty| {
            helpers
                .iter()
                .all(|h| matches!(is_helper_supported(ty, *h), Ok(true)))
        });
    if btf && supported {
        tracing::info!("redirected connects hand their records over in task storage");
    } else {
        tracing::info!(
            kernel_btf = btf,
            task_storage_helpers = supported,
            "redirected connects keep their records in SM_CONNECTING until established (task \
             storage needs Linux 6.16 or later and the kernel's BTF)"
        );
    }
    btf && supported
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

/// The object's program `name`.
fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Program, BpfError> {
    ebpf.program_mut(name)
        .ok_or_else(|| BpfError::Missing(format!("program {name}")))
}

/// Load `$prog` as a `$ty` program and return a copy of its fd (aya's program types share no
/// trait for `load` and `fd`).
macro_rules! load_fd {
    ($prog:expr, $ty:ty, $name:expr) => {{
        let wrap = |source| BpfError::Program {
            name: $name,
            source,
        };
        let p: &mut $ty = $prog.try_into().map_err(wrap)?;
        p.load().map_err(wrap)?;
        p.fd()
            .map_err(wrap)?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| SyscallError {
                call: "dup(prog)",
                source,
            })?
    }};
}

/// How a program came to be in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkAction {
    Created,
    Updated,
    /// Not needed by this agent (see [`Loaded::creator_known`]): an earlier agent's link was
    /// dropped.
    Removed,
}

/// A cgroup program the agent keeps in force: which link, and the loaded program.
pub struct InForce {
    pub link_name: &'static str,
    attach_type: u32,
    prog: OwnedFd,
    prog_id: u32,
}

/// What was wrong with a cgroup link, and was put right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRepair {
    /// Its pin was gone (and with it the link): a new link, pinned.
    Unpinned,
    /// It was detached from the cgroup (`bpftool link detach`): a new link, pinned.
    Detached,
    /// It ran another program: switched back.
    Replaced,
}

impl LinkRepair {
    pub fn name(self) -> &'static str {
        match self {
            LinkRepair::Unpinned => "link unpinned",
            LinkRepair::Detached => "link detached",
            LinkRepair::Replaced => "program replaced",
        }
    }
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info`.
fn obj_info(fd: BorrowedFd<'_>, info: &mut [u32]) -> Result<(), SyscallError> {
    let mut attr = [0u64; 8];
    attr[0] = u32_pair(fd.as_raw_fd() as u32, std::mem::size_of_val(info) as u32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf_syscall(
        BPF_OBJ_GET_INFO_BY_FD,
        &mut attr,
        "bpf(BPF_OBJ_GET_INFO_BY_FD)",
    )
    .map(|_| ())
}

impl InForce {
    fn new(a: &Attachment, prog: OwnedFd) -> Result<InForce, BpfError> {
        // struct bpf_prog_info: type, id, ...
        let mut info = [0u32; 4];
        obj_info(prog.as_fd(), &mut info)?;
        Ok(InForce {
            link_name: a.link_name,
            attach_type: a.attach_type,
            prog,
            prog_id: info[1],
        })
    }

    /// Check the pinned link on `cgroup` and put it right if it was unpinned, detached or
    /// switched to another program.
    pub fn keep(
        &self,
        cgroup: BorrowedFd<'_>,
        bpffs: &Path,
    ) -> Result<Option<LinkRepair>, BpfError> {
        let pin = links_dir(bpffs).join(self.link_name);
        let link = match obj_get(&pin) {
            Ok(link) => link,
            Err(e) if e.source.raw_os_error() == Some(libc::ENOENT) => {
                let link = link_create(self.prog.as_fd(), cgroup, self.attach_type)?;
                obj_pin(link.as_fd(), &pin)?;
                return Ok(Some(LinkRepair::Unpinned));
            }
            Err(e) => return Err(e.into()),
        };
        // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose cgroup member
        // is { cgroup_id (u64), attach_type }: cgroup_id 0 once detached.
        let mut info = [0u32; 8];
        obj_info(link.as_fd(), &mut info)?;
        let cgroup_id = info[4] as u64 | (info[5] as u64) << 32;
        if cgroup_id == 0 {
            let _ = fs::remove_file(&pin);
            let link = link_create(self.prog.as_fd(), cgroup, self.attach_type)?;
            obj_pin(link.as_fd(), &pin)?;
            return Ok(Some(LinkRepair::Detached));
        }
        if info[2] != self.prog_id {
            link_update(link.as_fd(), self.prog.as_fd())?;
            return Ok(Some(LinkRepair::Replaced));
        }
        Ok(None)
    }
}

/// Load every cgroup program `loaded` needs and put it in force on `cgroup` through a link
/// pinned under `bpffs/links`: a new link if none is pinned, else the pinned link is switched
/// to the new program atomically. The link of a program it does not need (left by an earlier
/// agent) is dropped. Returns what was done, and the programs to keep in force.
#[allow(clippy::type_complexity)]
pub fn attach_all(
    loaded: &mut Loaded,
    cgroup: BorrowedFd<'_>,
    bpffs: &Path,
) -> Result<(Vec<(&'static str, LinkAction)>, Vec<InForce>), BpfError> {
    let ebpf = &mut loaded.ebpf;
    let needed = |a: &Attachment| match a.need {
        Need::Always => true,
        Need::WithoutCreator => !loaded.creator_known,
    };
    let mut done = Vec::new();
    // Load every program first, so a verifier rejection leaves nothing half attached.
    let mut progs = Vec::new();
    for a in &ATTACHMENTS {
        if !needed(a) {
            continue;
        }
        let prog = program(ebpf, a.program)?;
        let fd = match a.kind {
            ProgKind::Sock => load_fd!(prog, CgroupSock, a.program),
            ProgKind::SockAddr => load_fd!(prog, CgroupSockAddr, a.program),
            ProgKind::SockOps => load_fd!(prog, SockOps, a.program),
            ProgKind::Sockopt => load_fd!(prog, CgroupSockopt, a.program),
        };
        progs.push((a, fd));
    }
    for a in ATTACHMENTS.iter().filter(|a| !needed(a)) {
        // Dropping the pin releases the link, which detaches its program.
        if fs::remove_file(links_dir(bpffs).join(a.link_name)).is_ok() {
            done.push((a.link_name, LinkAction::Removed));
        }
    }
    let mut in_force = Vec::new();
    for (a, fd) in progs {
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
        in_force.push(InForce::new(a, fd)?);
    }
    Ok((done, in_force))
}

/// Load the sk_msg program and attach it to the acceleration socket map. The attachment stays
/// with the pinned map (a later agent's replaces it); it is not a pinned link.
pub fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<(), BpfError> {
    const NAME: &str = "sockmesh_sk_msg";
    let wrap = |source| BpfError::Program { name: NAME, source };
    let socks: SockHash<MapData, SockKey> = ebpf
        .take_map(names::SOCKS)
        .ok_or_else(|| BpfError::Missing(format!("map {}", names::SOCKS)))?
        .try_into()
        .map_err(|source| BpfError::Map {
            name: names::SOCKS,
            path: PathBuf::from(names::SOCKS),
            source,
        })?;
    let p: &mut SkMsg = program(ebpf, NAME)?.try_into().map_err(wrap)?;
    p.load().map_err(wrap)?;
    let id = p.attach(socks.fd()).map_err(wrap)?;
    // Dropping the link would detach the program; it stays attached for the map's life.
    std::mem::forget(p.take_link(id).map_err(wrap)?);
    Ok(())
}

/// Load the sk_lookup program (attached per pod netns, not to the cgroup).
pub fn load_sk_lookup(ebpf: &mut Ebpf) -> Result<OwnedFd, BpfError> {
    const NAME: &str = "sockmesh_sk_lookup";
    Ok(load_fd!(program(ebpf, NAME)?, SkLookup, NAME))
}

const NETNS_LINK_PREFIX: &str = "sk_lookup-";

fn netns_link_pin(bpffs: &Path, netns: NetnsCookie) -> PathBuf {
    links_dir(bpffs).join(format!("{NETNS_LINK_PREFIX}{netns}"))
}

/// The pinned sk_lookup links: (pod netns cookie, pin path).
fn netns_links(bpffs: &Path) -> Vec<(NetnsCookie, PathBuf)> {
    let Ok(rd) = fs::read_dir(links_dir(bpffs)) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let cookie = name.strip_prefix(NETNS_LINK_PREFIX)?.parse().ok()?;
            Some((NetnsCookie(cookie), e.path()))
        })
        .collect()
}

/// Put the sk_lookup program in force in pod netns `netns` (fd `ns`) through a pinned link.
pub fn attach_netns(
    prog: BorrowedFd<'_>,
    ns: BorrowedFd<'_>,
    bpffs: &Path,
    netns: NetnsCookie,
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

/// Detach the sk_lookup program from pod netns `netns` (dropping the pin releases the link),
/// and the tc program from its `-k` interfaces.
pub fn detach_netns(bpffs: &Path, netns: NetnsCookie) -> bool {
    detach_forward(bpffs, netns);
    fs::remove_file(netns_link_pin(bpffs, netns)).is_ok()
}

/// Switch every pod's sk_lookup link to `prog`. Links whose netns is gone are dropped; their
/// cookies are returned.
pub fn update_netns_links(
    prog: BorrowedFd<'_>,
    bpffs: &Path,
) -> Result<(usize, Vec<NetnsCookie>), BpfError> {
    let mut updated = 0;
    let mut gone = Vec::new();
    for (cookie, pin) in netns_links(bpffs) {
        if switch_pinned(&pin, prog)? {
            updated += 1;
        } else {
            detach_forward(bpffs, cookie);
            gone.push(cookie);
        }
    }
    Ok((updated, gone))
}

/// Switch the link pinned at `pin` to `prog`. A link whose netns or interface is gone is
/// defunct: its pin is removed and `false` returned.
fn switch_pinned(pin: &Path, prog: BorrowedFd<'_>) -> Result<bool, BpfError> {
    let link = obj_get(pin)?;
    match link_update(link.as_fd(), prog) {
        Ok(()) => Ok(true),
        Err(e) if e.source.raw_os_error() == Some(libc::ENOLINK) => {
            let _ = fs::remove_file(pin);
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// The two tc programs of `-k` interfaces (attached per pod interface, through tcx): ingress
/// captures and translates what the VM sends, egress translates what the proxy answers.
pub struct ForwardProgs {
    pub ingress: OwnedFd,
    pub egress: OwnedFd,
}

impl ForwardProgs {
    fn of(&self, dir: TcDirection) -> BorrowedFd<'_> {
        match dir {
            TcDirection::Ingress => self.ingress.as_fd(),
            TcDirection::Egress => self.egress.as_fd(),
        }
    }
}

/// Which side of an interface a tcx link is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcDirection {
    Ingress,
    Egress,
}

impl TcDirection {
    const BOTH: [TcDirection; 2] = [TcDirection::Ingress, TcDirection::Egress];

    /// The word in the link's pin name.
    fn pin_word(self) -> &'static str {
        match self {
            TcDirection::Ingress => "in",
            TcDirection::Egress => "out",
        }
    }

    /// `BPF_TCX_INGRESS` or `BPF_TCX_EGRESS`.
    fn attach_type(self) -> u32 {
        match self {
            TcDirection::Ingress => BPF_TCX_INGRESS,
            TcDirection::Egress => BPF_TCX_EGRESS,
        }
    }
}

/// Load the tc programs of `-k` interfaces.
pub fn load_forward(ebpf: &mut Ebpf) -> Result<ForwardProgs, BpfError> {
    const INGRESS: &str = "sockmesh_forward";
    const EGRESS: &str = "sockmesh_forward_egress";
    let ingress = load_fd!(program(ebpf, INGRESS)?, SchedClassifier, INGRESS);
    let egress = load_fd!(program(ebpf, EGRESS)?, SchedClassifier, EGRESS);
    Ok(ForwardProgs { ingress, egress })
}

const FORWARD_LINK_PREFIX: &str = "tcx-";

fn forward_link_pin(bpffs: &Path, netns: NetnsCookie, ifindex: u32, dir: TcDirection) -> PathBuf {
    let word = dir.pin_word();
    links_dir(bpffs).join(format!("{FORWARD_LINK_PREFIX}{word}-{netns}-{ifindex}"))
}

/// A pinned tcx link of a pod's `-k` interface.
struct ForwardLink {
    netns: NetnsCookie,
    ifindex: u32,
    dir: TcDirection,
    pin: PathBuf,
}

/// The pinned tcx links, from their names `tcx-<in|out>-<cookie>-<ifindex>`.
fn forward_links(bpffs: &Path) -> Vec<ForwardLink> {
    let Ok(rd) = fs::read_dir(links_dir(bpffs)) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let (word, rest) = name.strip_prefix(FORWARD_LINK_PREFIX)?.split_once('-')?;
            let dir = TcDirection::BOTH
                .into_iter()
                .find(|d| d.pin_word() == word)?;
            let (cookie, ifindex) = rest.split_once('-')?;
            Some(ForwardLink {
                netns: NetnsCookie(cookie.parse().ok()?),
                ifindex: ifindex.parse().ok()?,
                dir,
                pin: e.path(),
            })
        })
        .collect()
}

/// Put the tc programs in force on both sides of each of pod `netns`'s (fd `ns`) `-k`
/// interfaces `ifindexes`, through tcx links pinned under
/// `<bpffs>/links/tcx-<in|out>-<cookie>-<ifindex>` (an existing link is switched to the
/// program); the pod's links on other interfaces go. On an error the links made so far stay:
/// the caller undoes the pod with [`detach_forward`].
pub fn attach_forward(
    progs: &ForwardProgs,
    ns: BorrowedFd<'_>,
    bpffs: &Path,
    netns: NetnsCookie,
    ifindexes: &[u32],
) -> Result<(), BpfError> {
    for &ifindex in ifindexes {
        for dir in TcDirection::BOTH {
            let prog = progs.of(dir);
            let pin = forward_link_pin(bpffs, netns, ifindex, dir);
            if pin.exists() {
                let link = obj_get(&pin)?;
                link_update(link.as_fd(), prog)?;
                continue;
            }
            let prog = prog.try_clone_to_owned().map_err(|source| SyscallError {
                call: "dup(prog)",
                source,
            })?;
            // tcx resolves the ifindex in the caller's netns: create the link inside the pod's.
            let link = sys::in_netns(ns, move || {
                let mut attr = [0u64; 8];
                attr[0] = u32_pair(prog.as_raw_fd() as u32, ifindex);
                attr[1] = u32_pair(dir.attach_type(), 0);
                let fd = bpf_syscall(BPF_LINK_CREATE, &mut attr, "bpf(BPF_LINK_CREATE tcx)")?;
                // SAFETY: the kernel returned a new fd.
                Ok::<_, SyscallError>(unsafe { OwnedFd::from_raw_fd(fd as i32) })
            })??;
            obj_pin(link.as_fd(), &pin)?;
        }
    }
    for l in forward_links(bpffs) {
        if l.netns == netns && !ifindexes.contains(&l.ifindex) {
            let _ = fs::remove_file(l.pin);
        }
    }
    Ok(())
}

/// Detach the tc programs from every interface of pod `netns` (dropping a pin releases its
/// link).
pub fn detach_forward(bpffs: &Path, netns: NetnsCookie) {
    for l in forward_links(bpffs) {
        if l.netns == netns {
            let _ = fs::remove_file(l.pin);
        }
    }
}

/// Switch every pod's tcx links to `progs`; links whose interface is gone are dropped.
pub fn update_forward_links(progs: &ForwardProgs, bpffs: &Path) -> Result<usize, BpfError> {
    let mut updated = 0;
    for l in forward_links(bpffs) {
        updated += usize::from(switch_pinned(&l.pin, progs.of(l.dir))?);
    }
    Ok(updated)
}

const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;

/// Whether the netns a pinned netns link is attached to still exists (a link is detached,
/// `netns_ino` 0, when its namespace is destroyed).
fn netns_link_alive(pin: &Path) -> Result<bool, SyscallError> {
    let link = obj_get(pin)?;
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose netns member is
    // { netns_ino, attach_type }.
    let mut info = [0u32; 16];
    obj_info(link.as_fd(), &mut info)?;
    Ok(info[4] != 0)
}

/// Netns cookies of registered pods whose namespace no longer exists; their pins are removed.
pub fn dead_pods(bpffs: &Path) -> Result<Vec<NetnsCookie>, BpfError> {
    let mut gone = Vec::new();
    for (cookie, pin) in netns_links(bpffs) {
        if !netns_link_alive(&pin)? {
            detach_netns(bpffs, cookie);
            gone.push(cookie);
        }
    }
    Ok(gone)
}

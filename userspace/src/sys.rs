//! Thin wrappers over the system calls sockmesh needs beyond aya: network namespaces, netns
//! cookies, interface addresses, user and group names, filesystem magic numbers.

use std::{
    ffi::{CStr, CString},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

/// `SO_NETNS_COOKIE` (Linux 5.14).
const SO_NETNS_COOKIE: libc::c_int = 71;
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// An error from a named system call, aya-style.
#[derive(Debug, thiserror::Error)]
#[error("{call} failed: {source}")]
pub struct SyscallError {
    pub call: &'static str,
    #[source]
    pub source: io::Error,
}

pub fn last_err(call: &'static str) -> SyscallError {
    SyscallError {
        call,
        source: io::Error::last_os_error(),
    }
}

/// (device, inode) of a namespace file or fd.
fn ns_id(fd: BorrowedFd<'_>) -> Result<(u64, u64), SyscallError> {
    // SAFETY: st is written by fstat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(last_err("fstat(netns)"));
    }
    Ok((st.st_dev, st.st_ino))
}

/// Run `f` in the network namespace `ns` and return its result: directly if the calling thread
/// is already there (no privilege needed), else on a fresh thread that joins it (setns needs
/// CAP_SYS_ADMIN). The caller's own threads never change namespace.
pub fn in_netns<T: Send + 'static>(
    ns: BorrowedFd<'_>,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, SyscallError> {
    let own = open_netns(Path::new("/proc/thread-self/ns/net"))?;
    if ns_id(own.as_fd())? == ns_id(ns)? {
        return Ok(f());
    }
    let fd = ns.try_clone_to_owned().map_err(|source| SyscallError {
        call: "dup(netns)",
        source,
    })?;
    std::thread::spawn(move || {
        // SAFETY: setns on this thread only; the fd is a valid descriptor we own.
        if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(last_err("setns(CLONE_NEWNET)"));
        }
        Ok(f())
    })
    .join()
    .expect("netns worker thread panicked")
}

/// The cookie of the calling thread's network namespace.
pub fn current_netns_cookie() -> Result<u64, SyscallError> {
    // SAFETY: plain socket(2); the fd is owned immediately.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(last_err("socket(AF_INET, SOCK_DGRAM)"));
    }
    // SAFETY: raw is a fresh, valid fd.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie/len point to valid memory of the advertised size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(last_err("getsockopt(SO_NETNS_COOKIE)"));
    }
    Ok(cookie)
}

/// The cookie of network namespace `ns`.
pub fn netns_cookie(ns: BorrowedFd<'_>) -> Result<u64, SyscallError> {
    in_netns(ns, current_netns_cookie)?
}

/// One address of an interface of the calling thread's netns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddr {
    pub ifname: String,
    pub ip: IpAddr,
}

/// The calling thread's interface addresses, in the kernel's dump order (IPv4 first), as
/// getifaddrs(3) reports them.
pub fn interface_addrs() -> Result<Vec<InterfaceAddr>, SyscallError> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills head; we free it below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(last_err("getifaddrs"));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur walks the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let ifname = unsafe { CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null; the family tells which sockaddr it is.
        let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
        let ip = match family {
            libc::AF_INET => {
                // SAFETY: family is AF_INET.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: family is AF_INET6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        out.push(InterfaceAddr { ifname, ip });
    }
    // SAFETY: head came from getifaddrs.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

fn name_lookup(name: &str, group: bool) -> Option<u32> {
    let c = CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    if group {
        // SAFETY: all pointers are valid; getgrnam_r writes within buf.
        unsafe {
            let mut grp: libc::group = std::mem::zeroed();
            let mut res: *mut libc::group = std::ptr::null_mut();
            let rc = libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut res);
            (rc == 0 && !res.is_null()).then_some(grp.gr_gid)
        }
    } else {
        // SAFETY: all pointers are valid; getpwnam_r writes within buf.
        unsafe {
            let mut pwd: libc::passwd = std::mem::zeroed();
            let mut res: *mut libc::passwd = std::ptr::null_mut();
            let rc = libc::getpwnam_r(c.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut res);
            (rc == 0 && !res.is_null()).then_some(pwd.pw_uid)
        }
    }
}

pub fn uid_by_name(name: &str) -> Option<u32> {
    name_lookup(name, false)
}

pub fn gid_by_name(name: &str) -> Option<u32> {
    name_lookup(name, true)
}

/// The filesystem magic of the filesystem holding `path`.
pub fn fs_magic(path: &Path) -> Result<i64, SyscallError> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| SyscallError {
        call: "statfs",
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"),
    })?;
    // SAFETY: st is written by statfs.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated; st is valid.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(last_err("statfs"));
    }
    Ok(st.f_type)
}

/// Open a netns file (e.g. /proc/self/ns/net, /var/run/netns/NAME).
pub fn open_netns(path: &Path) -> Result<OwnedFd, SyscallError> {
    let f = std::fs::File::open(path).map_err(|source| SyscallError {
        call: "open(netns)",
        source,
    })?;
    Ok(OwnedFd::from(f))
}

/// Credentials of the peer of a Unix socket.
pub fn peer_cred(sock: BorrowedFd<'_>) -> Result<libc::ucred, SyscallError> {
    // SAFETY: cred is plain data written by getsockopt.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: pointers valid for the given length.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(last_err("getsockopt(SO_PEERCRED)"));
    }
    Ok(cred)
}

/// Whether `fd` refers to a network namespace (`ioctl(NS_GET_NSTYPE)`), whether it was opened
/// from /proc/PID/ns/net or from a bind mount such as /var/run/netns/NAME.
pub fn is_netns_fd(fd: impl AsFd) -> bool {
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: NS_GET_NSTYPE takes no argument; on a non-namespace fd it fails with ENOTTY.
    let t = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), NS_GET_NSTYPE as _) };
    t == libc::CLONE_NEWNET
}

/// The index of interface `name` in the calling thread's netns.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is NUL-terminated.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// A route of the main table.
#[derive(Clone, Debug)]
pub struct Route {
    pub dst: crate::spec::Cidr,
    pub dev: String,
    /// `src` of the route, if it names one.
    pub prefsrc: Option<IpAddr>,
}

/// The main routing table of the calling thread's netns, both families, read with
/// `ip -j route`. Routes without a device (unreachable, blackhole) are left out.
pub fn main_routes() -> Result<Vec<Route>, String> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        let o = std::process::Command::new("ip")
            .args(["-j", family, "route", "show", "table", "main"])
            .output()
            .map_err(|e| format!("running ip (iproute2) to read the pod's routes: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "reading the pod's routes failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        let routes: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout)
            .map_err(|e| format!("ip -j route printed something unexpected: {e}"))?;
        for r in routes {
            let (Some(dst), Some(dev)) = (r["dst"].as_str(), r["dev"].as_str()) else {
                continue;
            };
            let (ip, len) = match dst {
                "default" if family == "-4" => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
                "default" => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
                d => match d.split_once('/') {
                    Some((a, l)) => match (a.parse::<IpAddr>(), l.parse::<u8>()) {
                        (Ok(a), Ok(l)) => (a, l),
                        _ => continue,
                    },
                    None => match d.parse::<IpAddr>() {
                        Ok(a) => (a, if a.is_ipv4() { 32 } else { 128 }),
                        Err(_) => continue,
                    },
                },
            };
            out.push(Route {
                dst: crate::spec::Cidr::new(ip, len),
                dev: dev.to_string(),
                prefsrc: r["prefsrc"].as_str().and_then(|s| s.parse().ok()),
            });
        }
    }
    Ok(out)
}

/// Raise the open-file limit to its hard limit: each API connection holds a socket and a
/// namespace fd. Returns the new limit.
pub fn raise_nofile() -> Result<u64, SyscallError> {
    // SAFETY: plain data in and out.
    let mut r: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: r is valid for writing.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(last_err("getrlimit(RLIMIT_NOFILE)"));
    }
    r.rlim_cur = r.rlim_max;
    // SAFETY: r is a valid limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(last_err("setrlimit(RLIMIT_NOFILE)"));
    }
    Ok(r.rlim_cur)
}

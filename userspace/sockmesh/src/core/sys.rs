//! Thin wrappers over the system calls sockmesh needs beyond aya: network namespaces, netns
//! cookies, interface addresses, user and group names, filesystem magic numbers.

use std::{
    ffi::{CStr, CString},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use sockmesh_common::NetnsCookie;

use super::net::Cidr;

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
pub fn current_netns_cookie() -> Result<NetnsCookie, SyscallError> {
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
    Ok(NetnsCookie(cookie))
}

/// The cookie of network namespace `ns`.
pub fn netns_cookie(ns: BorrowedFd<'_>) -> Result<NetnsCookie, SyscallError> {
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

/// The hardware (MAC) address of interface `name` in the calling thread's netns, if it has an
/// Ethernet one.
pub fn hwaddr(name: &str) -> Option<[u8; 6]> {
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: a plain datagram socket, closed by OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a new descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = b as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills req.ifr_ifru.ifru_hwaddr.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return None;
    }
    // SAFETY: the ioctl succeeded, so the union holds the hardware address.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    if sa.sa_family != libc::ARPHRD_ETHER {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *d as u8;
    }
    Some(mac)
}

/// A route of the main table.
#[derive(Clone, Debug)]
pub struct Route {
    pub dst: Cidr,
    pub dev: String,
    /// `src` of the route, if it names one.
    pub prefsrc: Option<IpAddr>,
}

/// The main routing table of the calling thread's netns, both families, from a netlink route
/// dump (as `ip route show table main` lists it). Routes without a device (unreachable,
/// blackhole, multipath) are left out.
pub fn main_routes() -> Result<Vec<Route>, SyscallError> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        dump_routes(family, &mut out).map_err(|source| SyscallError {
            call: "reading the pod's routes (netlink RTM_GETROUTE)",
            source,
        })?;
    }
    Ok(out)
}

// Netlink route messages (linux/netlink.h, linux/rtnetlink.h).
const NLMSG_HDR: usize = 16;
const RTMSG: usize = 12;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u32 = 254;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn ip_from(family: i32, b: &[u8]) -> Option<IpAddr> {
    match (family, b.len()) {
        (libc::AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(b).ok()?)),
        (libc::AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(b).ok()?)),
        _ => None,
    }
}

fn if_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname needs.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// One route message's route, if it is in the main table and has a device.
fn parse_route(family: i32, msg: &[u8]) -> Option<Route> {
    let rtm = msg.get(NLMSG_HDR..NLMSG_HDR + RTMSG)?;
    let dst_len = rtm[1];
    let mut table = rtm[4] as u32;
    let (mut dst, mut oif, mut prefsrc) = (None, None, None);
    let mut at = NLMSG_HDR + RTMSG;
    while at + 4 <= msg.len() {
        let len = u16::from_ne_bytes([msg[at], msg[at + 1]]) as usize;
        let kind = u16::from_ne_bytes([msg[at + 2], msg[at + 3]]);
        if len < 4 || at + len > msg.len() {
            break;
        }
        let data = &msg[at + 4..at + len];
        match kind {
            RTA_DST => dst = ip_from(family, data),
            RTA_OIF if data.len() == 4 => oif = Some(u32::from_ne_bytes(data.try_into().ok()?)),
            RTA_PREFSRC => prefsrc = ip_from(family, data),
            RTA_TABLE if data.len() == 4 => table = u32::from_ne_bytes(data.try_into().ok()?),
            _ => {}
        }
        at += align4(len);
    }
    if table != RT_TABLE_MAIN {
        return None;
    }
    let dev = if_name(oif?)?;
    let ip = dst.unwrap_or(if family == libc::AF_INET {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(Ipv6Addr::UNSPECIFIED)
    });
    Some(Route {
        dst: Cidr::new(ip, dst_len),
        dev,
        prefsrc,
    })
}

fn dump_routes(family: i32, out: &mut Vec<Route>) -> io::Result<()> {
    // SAFETY: a new socket; owned below.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a new fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = [0u8; NLMSG_HDR + RTMSG];
    req[0..4].copy_from_slice(&((NLMSG_HDR + RTMSG) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETROUTE.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDR] = family as u8;
    // SAFETY: send from a buffer of its length.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: recv into a buffer of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut at = 0;
        let n = n as usize;
        while at + NLMSG_HDR <= n {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            if len < NLMSG_HDR || at + len > n {
                return Err(io::Error::other("truncated netlink message"));
            }
            match kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let code = buf
                        .get(at + NLMSG_HDR..at + NLMSG_HDR + 4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    return Ok(());
                }
                RTM_NEWROUTE => out.extend(parse_route(family, &buf[at..at + len])),
                _ => {}
            }
            at += align4(len);
        }
    }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// The netlink dump agrees with iproute2 on this machine's own main table (read only).
    #[test]
    fn netlink_routes_are_what_ip_route_shows() {
        let ours: BTreeSet<String> = super::main_routes()
            .unwrap()
            .iter()
            .map(|r| format!("{} dev {} src {:?}", r.dst, r.dev, r.prefsrc))
            .collect();
        let mut theirs = BTreeSet::new();
        for family in ["-4", "-6"] {
            let o = std::process::Command::new("ip")
                .args(["-j", family, "route", "show", "table", "main"])
                .output()
                .expect("ip (iproute2) is needed by this test: apt install iproute2");
            let routes: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
            for r in routes {
                let (Some(dst), Some(dev)) = (r["dst"].as_str(), r["dev"].as_str()) else {
                    continue;
                };
                let dst = match dst {
                    "default" if family == "-4" => "0.0.0.0/0".to_string(),
                    "default" => "::/0".to_string(),
                    d if d.contains('/') => d.to_string(),
                    d if d.contains(':') => format!("{d}/128"),
                    d => format!("{d}/32"),
                };
                let src: Option<std::net::IpAddr> =
                    r["prefsrc"].as_str().and_then(|s| s.parse().ok());
                theirs.insert(format!("{dst} dev {dev} src {src:?}"));
            }
        }
        assert!(!ours.is_empty(), "no route at all?");
        assert_eq!(ours, theirs);
    }
}

//! Pods with a user namespace of their own (Kubernetes `hostUsers: false`).
//!
//! A pod's settings name its proxy's uid and gid as the pod sees them (1337). iptables' owner
//! match reads them in the user namespace that owns the pod's network namespace, and compares
//! the socket owner's kernel id with the id that maps to. The kernel programs see kernel ids
//! (those of the initial user namespace), so the agent writes the ids the pod's ones map to: the
//! same decision as iptables', made once at registration.

use std::{
    fs::File,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
};

/// `NS_GET_USERNS` and `NS_GET_PARENT` (linux/nsfs.h): the owning user namespace of a
/// namespace, the parent of a user namespace.
const NS_GET_USERNS: libc::c_ulong = 0xb701;
const NS_GET_PARENT: libc::c_ulong = 0xb702;

/// Why a pod's ids could not be read or mapped.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error("{call} on the pod's namespace: {source}")]
    Syscall {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the pod's user namespace is nested below another pod-level user namespace; sockmesh \
         maps ids through one level only (the pod's, below the node's)"
    )]
    Nested,
    #[error(
        "the pod's user namespace maps no {kind} {id}: the proxy cannot run as it there; fix \
         the pod's {flag} or its id mapping"
    )]
    Unmapped {
        kind: &'static str,
        flag: &'static str,
        id: u32,
    },
    #[error("the pod's {file} is not an id map: {line:?}")]
    BadMap { file: &'static str, line: String },
}

/// One `uid_map`/`gid_map`: ranges of ids inside mapped to ids outside.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap {
    /// (first inside, first outside, count)
    ranges: Vec<(u32, u32, u32)>,
}

impl IdMap {
    /// Parse a map file's text (`inside outside count` per line).
    pub fn parse(text: &str, file: &'static str) -> Result<IdMap, UsernsError> {
        let mut ranges = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let f: Vec<u32> = line
                .split_whitespace()
                .map(str::parse)
                .collect::<Result<_, _>>()
                .map_err(|_| UsernsError::BadMap {
                    file,
                    line: line.into(),
                })?;
            let [inside, outside, count] = f[..] else {
                return Err(UsernsError::BadMap {
                    file,
                    line: line.into(),
                });
            };
            ranges.push((inside, outside, count));
        }
        Ok(IdMap { ranges })
    }

    /// The id outside that `id` inside maps to, if any.
    pub fn outside(&self, id: u32) -> Option<u32> {
        self.ranges.iter().find_map(|&(inside, outside, count)| {
            let off = id.checked_sub(inside)?;
            (off < count).then(|| outside + off)
        })
    }
}

/// The id maps of a pod's user namespace, as seen from the agent's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodIds {
    pub uids: IdMap,
    pub gids: IdMap,
}

impl PodIds {
    /// The kernel uid of the pod's `uid` (`-u`).
    pub fn uid(&self, uid: u32) -> Result<u32, UsernsError> {
        self.uids.outside(uid).ok_or(UsernsError::Unmapped {
            kind: "uid",
            flag: "-u",
            id: uid,
        })
    }

    /// The kernel gid of the pod's `gid` (`-g`, owner groups).
    pub fn gid(&self, gid: u32) -> Result<u32, UsernsError> {
        self.gids.outside(gid).ok_or(UsernsError::Unmapped {
            kind: "gid",
            flag: "-g",
            id: gid,
        })
    }
}

fn syscall(call: &'static str) -> UsernsError {
    UsernsError::Syscall {
        call,
        source: std::io::Error::last_os_error(),
    }
}

fn ns_ioctl(
    fd: BorrowedFd<'_>,
    req: libc::c_ulong,
    call: &'static str,
) -> Result<OwnedFd, UsernsError> {
    // SAFETY: an nsfs ioctl that returns a new fd or -1.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _) };
    if r < 0 {
        return Err(syscall(call));
    }
    // SAFETY: a new fd the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(r) })
}

fn same_ns(a: &File, b: &File) -> Result<bool, UsernsError> {
    let (ma, mb) = (
        a.metadata().map_err(|source| UsernsError::Syscall {
            call: "fstat",
            source,
        })?,
        b.metadata().map_err(|source| UsernsError::Syscall {
            call: "fstat",
            source,
        })?,
    );
    Ok(ma.ino() == mb.ino() && ma.dev() == mb.dev())
}

/// The id maps of the user namespace owning the network namespace `netns`, or None when it is
/// the agent's own (a pod that shares the node's ids).
pub fn pod_ids(netns: BorrowedFd<'_>) -> Result<Option<PodIds>, UsernsError> {
    let userns = File::from(ns_ioctl(netns, NS_GET_USERNS, "ioctl(NS_GET_USERNS)")?);
    let own = File::open("/proc/self/ns/user").map_err(|source| UsernsError::Syscall {
        call: "open(/proc/self/ns/user)",
        source,
    })?;
    if same_ns(&userns, &own)? {
        return Ok(None);
    }
    let parent = File::from(ns_ioctl(
        std::os::fd::AsFd::as_fd(&userns),
        NS_GET_PARENT,
        "ioctl(NS_GET_PARENT)",
    )?);
    if !same_ns(&parent, &own)? {
        return Err(UsernsError::Nested);
    }
    let (uid_map, gid_map) = read_maps(&userns)?;
    Ok(Some(PodIds {
        uids: IdMap::parse(&uid_map, "uid_map")?,
        gids: IdMap::parse(&gid_map, "gid_map")?,
    }))
}

/// Read `uid_map` and `gid_map` from inside `userns`: there they list each range with the id
/// it has in the parent namespace (the agent's). A forked child joins the namespace (a
/// multithreaded process cannot) and writes both files to a pipe; it only makes system calls.
fn read_maps(userns: &File) -> Result<(String, String), UsernsError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(syscall("pipe2"));
    }
    // SAFETY: fresh fds from pipe2.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let ns = userns.as_raw_fd();
    // SAFETY: the child makes only async-signal-safe system calls on memory it already has,
    // then _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(syscall("fork"));
    }
    if pid == 0 {
        // SAFETY: as above.
        unsafe { child_write_maps(ns, wr.as_raw_fd()) }
    }
    drop(wr);
    let mut out = Vec::new();
    let mut file = File::from(rd);
    let read = std::io::Read::read_to_end(&mut file, &mut out);
    let mut status = 0;
    // SAFETY: our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    read.map_err(|source| UsernsError::Syscall {
        call: "read",
        source,
    })?;
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(UsernsError::Syscall {
            call: "setns(CLONE_NEWUSER) in a child",
            source: std::io::Error::from_raw_os_error(if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                libc::EINTR
            }),
        });
    }
    let text = String::from_utf8_lossy(&out);
    let (uid, gid) = text.split_once('\0').unwrap_or((&text, ""));
    Ok((uid.to_string(), gid.to_string()))
}

/// The forked child: join the namespace, copy uid_map, a NUL, gid_map to `out`, and exit with
/// 0, or with the errno of the call that failed.
unsafe fn child_write_maps(ns: libc::c_int, out: libc::c_int) -> ! {
    unsafe {
        if libc::setns(ns, libc::CLONE_NEWUSER) != 0 {
            libc::_exit(*libc::__errno_location());
        }
        let mut buf = [0u8; 4096];
        for (i, path) in [c"/proc/self/uid_map", c"/proc/self/gid_map"]
            .iter()
            .enumerate()
        {
            if i == 1 {
                libc::write(out, c"".as_ptr().cast(), 1);
            }
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                libc::_exit(*libc::__errno_location());
            }
            loop {
                let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                if n <= 0 {
                    break;
                }
                libc::write(out, buf.as_ptr().cast(), n as usize);
            }
            libc::close(fd);
        }
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_translate_ids_inside_their_ranges_only() {
        let m = IdMap::parse("         0     200000      65536\n", "uid_map").unwrap();
        assert_eq!(m.outside(0), Some(200000));
        assert_eq!(m.outside(1337), Some(201337));
        assert_eq!(m.outside(65535), Some(265535));
        assert_eq!(m.outside(65536), None);
        let two = IdMap::parse("0 1000 1\n1337 301337 1\n", "uid_map").unwrap();
        assert_eq!(two.outside(1337), Some(301337));
        assert_eq!(two.outside(1), None);
        assert!(IdMap::parse("0 1000\n", "uid_map").is_err());
        assert!(IdMap::parse("a b c\n", "gid_map").is_err());
        let ids = PodIds {
            uids: two.clone(),
            gids: two,
        };
        assert!(matches!(
            ids.uid(7),
            Err(UsernsError::Unmapped {
                kind: "uid",
                id: 7,
                ..
            })
        ));
    }

    #[test]
    fn a_namespace_of_the_agents_own_user_namespace_maps_nothing() {
        let netns = File::open("/proc/self/ns/net").unwrap();
        assert_eq!(pod_ids(std::os::fd::AsFd::as_fd(&netns)).unwrap(), None);
    }
}

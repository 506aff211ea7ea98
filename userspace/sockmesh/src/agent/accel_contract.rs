//! What socket acceleration changes on the running kernel, said when `--acceleration on`
//! starts: the three places where a socket in the sockmap differs from TCP (see
//! docs/operations.md, "Socket acceleration"). FIONREAD's answer depends on the kernel:
//!
//! - before upstream 929e30f93125 ("bpf, sockmap: Fix FIONREAD for sockmap"), FIONREAD is
//!   TCP's and never counts what sk_msg queued;
//! - with it (it adds `tcp_bpf_ioctl`), it counts only what sk_msg queued when the socket has
//!   no stream verdict program, as sockmesh's sockets have not;
//! - with 04af4efde58a ("bpf, sockmap: Account for receive queue in FIONREAD without a verdict
//!   program") too, it counts both, as TCP would.

use std::fs;

/// What FIONREAD counts on a socket in the sockmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fionread {
    /// TCP's receive queue only: data sk_msg queued is not counted.
    TcpQueueOnly,
    /// sk_msg's queue only: data that came by TCP is not counted.
    RedirectedOnly,
    /// Both, as TCP would count.
    Both,
}

/// The first kernel release taken to have 04af4efde58a (upstream 7.2's merge window).
const BOTH_SINCE: (u32, u32) = (7, 2);

impl Fionread {
    /// From whether the kernel has `tcp_bpf_ioctl` and its release (major, minor).
    pub fn of(has_tcp_bpf_ioctl: bool, release: (u32, u32)) -> Fionread {
        match (has_tcp_bpf_ioctl, release >= BOTH_SINCE) {
            (false, _) => Fionread::TcpQueueOnly,
            (true, false) => Fionread::RedirectedOnly,
            (true, true) => Fionread::Both,
        }
    }

    /// The running kernel's, from /proc/kallsyms and its release (major, minor); `None` when
    /// /proc/kallsyms cannot be read.
    pub fn running(release: (u32, u32)) -> Option<Fionread> {
        let syms = fs::read_to_string("/proc/kallsyms").ok()?;
        let has = syms
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some("tcp_bpf_ioctl"));
        Some(Fionread::of(has, release))
    }

    /// What a user sees, or `None` when it is TCP's behaviour.
    pub fn warning(self) -> Option<&'static str> {
        match self {
            Fionread::TcpQueueOnly => Some(
                "FIONREAD on a socket in the acceleration map does not count data sk_msg \
                 queued for it (this kernel lacks upstream 929e30f93125): a reader that sizes \
                 its reads by FIONREAD can see 0 with data waiting",
            ),
            Fionread::RedirectedOnly => Some(
                "FIONREAD on a socket in the acceleration map counts only data sk_msg queued \
                 for it, not what came by TCP (this kernel has upstream 929e30f93125 without \
                 04af4efde58a): a reader that sizes its reads by FIONREAD can see 0 with data \
                 waiting",
            ),
            Fionread::Both => None,
        }
    }
}

/// What holds on every kernel.
pub const ALWAYS: [&str; 2] = [
    "splice(2) from a socket that receives accelerated data never sees that data (the \
     kernel's sockmap has no splice_read): a proxy that splices must run with acceleration off",
    "a blocking read on a socket in the acceleration map can fail early with EAGAIN: apps \
     that read with blocking calls belong with SOCKMESH_ACCELERATION=proxies (the default)",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fionread_by_kernel() {
        assert_eq!(Fionread::of(false, (6, 1)), Fionread::TcpQueueOnly);
        assert_eq!(Fionread::of(true, (6, 18)), Fionread::RedirectedOnly);
        assert_eq!(Fionread::of(true, (7, 0)), Fionread::RedirectedOnly);
        assert_eq!(Fionread::of(true, (7, 2)), Fionread::Both);
        assert_eq!(Fionread::of(false, (7, 3)), Fionread::TcpQueueOnly);
        assert!(Fionread::Both.warning().is_none());
        assert!(Fionread::RedirectedOnly
            .warning()
            .unwrap()
            .contains("929e30f93125"));
    }
}

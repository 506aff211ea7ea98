//! Reading and writing the programs' contexts: addresses as 32-bit words, the netns cookie,
//! and the socket-address rewrites connect, recvmsg and getpeername share.

use core::ptr::{self, addr_of_mut};

use aya_ebpf::{
    bindings::bpf_sock,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
    EbpfContext,
};
use sockmesh_common::{v4_mapped, Addr, NetnsCookie, SockKey, AF_INET};

pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;
pub const SO_ORIGINAL_DST: i32 = 80;
pub const IPPROTO_TCP: u32 = 6;
pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;

/// The context's socket's cookie (made on first use, unique while the machine runs).
#[inline(always)]
pub fn cookie<C: EbpfContext>(ctx: &C) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The network namespace of the context's socket.
#[inline(always)]
pub fn netns<C: EbpfContext>(ctx: &C) -> NetnsCookie {
    NetnsCookie(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) })
}

#[inline(always)]
pub fn addr_from_words(w: [u32; 4]) -> Addr {
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
        let reload = || core::ptr::read_volatile(&base);
        $crate::ctx::addr_from_words([
            core::ptr::read_volatile(&(*reload()).$field[0]),
            core::ptr::read_volatile(&(*reload()).$field[1]),
            core::ptr::read_volatile(&(*reload()).$field[2]),
            core::ptr::read_volatile(&(*reload()).$field[3]),
        ])
    }};
}
pub(crate) use read_words;

/// Socket `sk`'s own 4-tuple in pod `netns` (IPv4 addresses v4-mapped, ports in host order;
/// a remote port of 0: not connected).
#[inline(always)]
pub fn sock_key(sk: *mut bpf_sock, netns: NetnsCookie) -> SockKey {
    unsafe {
        let (local, remote) = if (*sk).family == AF_INET as u32 {
            (
                v4_mapped((*sk).src_ip4.to_ne_bytes()),
                v4_mapped((*sk).dst_ip4.to_ne_bytes()),
            )
        } else {
            (read_words!(sk, src_ip6), read_words!(sk, dst_ip6))
        };
        SockKey {
            netns,
            local,
            remote,
            local_port: (*sk).src_port as u16,
            remote_port: u16::from_be((*sk).dst_port),
            _pad: 0,
        }
    }
}

/// Write a `[u32; 4]` context field word by word (see [`read_words`]).
macro_rules! write_words {
    ($ptr:expr, $field:ident, $addr:expr) => {{
        let w = $crate::ctx::words_from_addr($addr);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*$ptr).$field[0]), w[0]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*$ptr).$field[1]), w[1]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*$ptr).$field[2]), w[2]);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*$ptr).$field[3]), w[3]);
    }};
}
pub(crate) use write_words;

/// All zeroes (an address the agent left unset), compared a word at a time.
#[inline(always)]
pub fn is_zero(a: &Addr) -> bool {
    let w = words_from_addr(a);
    w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == 0
}

#[inline(always)]
pub fn words_from_addr(a: &Addr) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// An IPv4 address (the last four bytes of a v4-mapped `a`) as the context's `u32` holds it.
#[inline(always)]
pub fn v4_word(a: &Addr) -> u32 {
    u32::from_ne_bytes([a[12], a[13], a[14], a[15]])
}

/// A port in network order, as the context's `u32` user_port holds it.
#[inline(always)]
pub fn port_word(port: u16) -> u32 {
    u32::from_ne_bytes((port.to_be() as u32).to_ne_bytes())
}

/// Write `addr` and `port` into the context's user address (connect, getpeername, recvmsg):
/// `user_ip6` when `v6`, else `user_ip4` from the v4-mapped `addr`.
#[inline(always)]
pub fn write_user_addr(ctx: &SockAddrContext, addr: &Addr, port: u16, v6: bool) {
    let sa = ctx.sock_addr;
    unsafe {
        if v6 {
            write_words!(sa, user_ip6, addr);
        } else {
            ptr::write_volatile(addr_of_mut!((*sa).user_ip4), v4_word(addr));
        }
        ptr::write_volatile(addr_of_mut!((*sa).user_port), port_word(port));
    }
}

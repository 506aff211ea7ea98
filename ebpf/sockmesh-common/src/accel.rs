//! Socket acceleration (sock_ops + sk_msg): how the two ends of a local connection find each
//! other, and when sk_msg may hand a message straight to the other end.

use crate::{
    addr::{is_loopback, Addr},
    pod::NetnsCookie,
};

/// Key of the `SOCKS` socket hash (sk_msg acceleration): one end of an established local TCP
/// connection, by its pod's netns and its own 4-tuple. Its peer's key is [`SockKey::peer`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns: NetnsCookie,
    pub local: Addr,
    pub remote: Addr,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

impl SockKey {
    /// Whether a connection to `remote` stays on this node, so its two ends can be paired: a
    /// loopback peer, or one at the address of a pod of this node (`remote_is_pod`, from
    /// `ADDR_POD`).
    pub const fn local_peer(remote: &Addr, remote_is_pod: bool) -> bool {
        is_loopback(remote) || remote_is_pod
    }

    /// The socket's key when its connection can be shortcut, given the netns of the pod that
    /// owns the remote address (`remote_pod`, from `ADDR_POD`): a loopback peer is in the same
    /// netns; a peer at a pod address of this node is in that pod's. Any other peer is not
    /// local: `None`.
    pub const fn local_conn(
        netns: NetnsCookie,
        local: Addr,
        local_port: u16,
        remote: Addr,
        remote_port: u16,
        remote_pod: Option<NetnsCookie>,
    ) -> Option<SockKey> {
        if !Self::local_peer(&remote, remote_pod.is_some()) {
            return None;
        }
        Some(SockKey {
            netns,
            local,
            remote,
            local_port,
            remote_port,
            _pad: 0,
        })
    }

    /// The key under which the other end of this socket's connection is (or would be)
    /// stored: the 4-tuple reversed, in the netns that owns this socket's remote address.
    pub const fn peer(&self, remote_pod: Option<NetnsCookie>) -> SockKey {
        let netns = match remote_pod {
            Some(n) if !is_loopback(&self.remote) => n,
            _ => self.netns,
        };
        SockKey {
            netns,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Most bytes sk_msg leaves unread in a socket's queue of redirected data. TCP stops a writer
/// when the reader's buffers are full; a redirect has no such limit, so sk_msg keeps to this
/// window and, past it, sends the rest of the connection by TCP, whose back pressure then holds
/// (data already queued is read first, so the order stays). 1 MiB: room for a bulk transfer's
/// writes while its reader catches up, and no more than a TCP receive buffer grows to (6 MiB
/// by default).
pub const ACCEL_WINDOW: u64 = 1 << 20;

/// Whether `size` more bytes may be redirected to a socket with `unread` bytes queued
/// (`None`: not known) without passing [`ACCEL_WINDOW`].
pub const fn window_has_room(unread: Option<u64>, size: u64) -> bool {
    match unread {
        Some(u) => u.saturating_add(size) <= ACCEL_WINDOW,
        None => false,
    }
}

/// Where the kernel keeps what sk_msg needs to know of two sockets that it cannot ask through
/// its context; the agent reads these offsets from the running kernel's BTF and gives them to
/// the programs at load time (zero: unknown, nothing is redirected).
/// - What sk_msg has queued for a socket and its reader has not taken: `struct sock`'s
///   `sk_user_data` points (low bits are flags) to the socket's `struct sk_psock`, whose
///   `msg_tot_len` counts those bytes.
/// - Whether a sender's TCP data has all been read (see [`tcp_drained`]): `struct tcp_sock`'s
///   `write_seq` and `snd_una` of the sender, `rcv_nxt` and `copied_seq` of its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub sk_user_data: u32,
    pub psock_msg_tot_len: u32,
    pub tcp_write_seq: u32,
    pub tcp_snd_una: u32,
    pub tcp_rcv_nxt: u32,
    pub tcp_copied_seq: u32,
}

impl KernelOffsets {
    pub const fn known(&self) -> bool {
        self.sk_user_data != 0
            && self.psock_msg_tot_len != 0
            && self.tcp_write_seq != 0
            && self.tcp_snd_una != 0
            && self.tcp_rcv_nxt != 0
            && self.tcp_copied_seq != 0
    }
}

/// Whether a sender that went by TCP may go back to redirecting without its data being read
/// out of order: everything it wrote is acknowledged (`write_seq == snd_una`: on a local
/// connection, in the peer's receive queue) and its peer has read all it received
/// (`rcv_nxt == copied_seq`). A reader takes redirected data before TCP's, so redirecting
/// with TCP data unread would let later bytes overtake earlier ones.
pub const fn tcp_drained(write_seq: u32, snd_una: u32, rcv_nxt: u32, copied_seq: u32) -> bool {
    write_seq == snd_una && rcv_nxt == copied_seq
}

/// Value of `PEER_SK`: an accelerated socket's kernel address, and whether sk_msg may send to
/// it (`receives`, 1): only sockets of a pod's proxy, whose readers are event loops that do
/// not splice (Envoy, linkerd2-proxy, sockmesh-proxy). An app's socket never receives
/// redirected data (it gets it by TCP), so whatever way the app reads (blocking reads,
/// splice(2)) sees TCP's behaviour; its own writes to the proxy are redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccelSock {
    pub addr: u64,
    pub receives: u32,
    pub _pad: u32,
}

/// Flag bits in the low end of `sk_user_data` (SK_USER_DATA_NOCOPY, _BPF, _PSOCK).
pub const SK_USER_DATA_FLAGS: u64 = 7;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::v4_mapped;

    #[test]
    fn the_window_holds_what_a_reader_has_not_taken() {
        assert!(window_has_room(Some(0), ACCEL_WINDOW));
        assert!(!window_has_room(Some(0), ACCEL_WINDOW + 1));
        assert!(window_has_room(Some(ACCEL_WINDOW - 100), 100));
        assert!(!window_has_room(Some(ACCEL_WINDOW - 100), 101));
        assert!(!window_has_room(Some(u64::MAX), 1), "no wrap-around");
        // Not knowing how much is unread is no room: TCP.
        assert!(!window_has_room(None, 1));
    }

    #[test]
    fn back_to_redirecting_only_once_tcp_data_is_all_read() {
        assert!(tcp_drained(1000, 1000, 500, 500));
        // Written, not yet acknowledged (maybe not yet in the peer's queue).
        assert!(!tcp_drained(1001, 1000, 500, 500));
        // In the peer's queue, not yet read.
        assert!(!tcp_drained(1000, 1000, 501, 500));
        // Sequence numbers wrap: only equality counts.
        assert!(tcp_drained(3, 3, u32::MAX, u32::MAX));
    }

    const N7: NetnsCookie = NetnsCookie(7);
    const N8: NetnsCookie = NetnsCookie(8);
    const POD: Addr = v4_mapped([10, 0, 0, 5]);
    const OTHER_POD: Addr = v4_mapped([10, 0, 0, 6]);
    const LO: Addr = v4_mapped([127, 0, 0, 1]);
    const REMOTE: Addr = v4_mapped([192, 0, 2, 20]);

    #[test]
    fn the_app_to_proxy_hop_pairs_its_two_ends() {
        // The app's socket (bound to the pod address by the redirect) and the proxy's accepted
        // one, in the same pod.
        let app = SockKey::local_conn(N7, POD, 40000, LO, 15001, None).unwrap();
        let proxy = SockKey::local_conn(N7, LO, 15001, POD, 40000, Some(N7)).unwrap();
        assert_eq!(app.peer(None), proxy);
        assert_eq!(proxy.peer(Some(N7)), app);
    }

    #[test]
    fn proxy_to_proxy_on_one_node_crosses_netns() {
        let client = SockKey::local_conn(N7, POD, 40001, OTHER_POD, 15006, Some(N8)).unwrap();
        let server = SockKey::local_conn(N8, OTHER_POD, 15006, POD, 40001, Some(N7)).unwrap();
        assert_eq!(client.peer(Some(N8)), server);
        assert_eq!(server.peer(Some(N7)), client);
    }

    #[test]
    fn a_peer_off_the_node_is_not_shortcut() {
        assert_eq!(SockKey::local_conn(N7, POD, 40002, REMOTE, 80, None), None);
    }
}

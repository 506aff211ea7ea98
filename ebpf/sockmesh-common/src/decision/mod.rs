//! Every capture decision, written once. The kernel's programs, `sockmesh init --dry-run` and
//! `sockmesh explain` all call these functions; only the lookups differ (maps in the kernel,
//! in-memory sets or pinned maps on the host), behind the [`Rules`] and [`Lookups`] traits.
//!
//! - [`decide`]: a connect() or a UDP send from the pod (istio's nat OUTPUT chain, or
//!   linkerd's), and [`local_origin`], the connections it must remember though it leaves them
//!   alone.
//! - [`decide_arrival`]: a new TCP connection to one of the pod's addresses (sk_lookup), with
//!   [`decide_inbound`] for those that come from outside (istio's PREROUTING rules), and
//!   [`Verdict::no_listener`] for a capture no proxy answers; [`decide_forwarded`], a new TCP
//!   connection forwarded through the pod from a `-k` interface (tc ingress).
//!
//! Rule numbers are those of docs/design.md's reference rules.

mod inbound;
mod outbound;
mod reason;
#[cfg(test)]
mod tests;

pub use inbound::{decide_arrival, decide_forwarded, decide_inbound};
pub use outbound::{decide, in_loopback_cidr, local_origin};
pub use reason::Reason;

use crate::{
    addr::{is_loopback, is_v4_mapped, Addr},
    pod::{CidrKind, MemberKind},
};

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp = 6,
    Udp = 17,
}

/// What the kernel knows about a connect() (or a UDP send) when it decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    pub proto: Proto,
    /// Destination, IPv6 form (IPv4 v4-mapped).
    pub dst: Addr,
    pub dport: u16,
    /// Address the socket is bound to, or all zeroes (IPv6 form; a v4 socket's is v4-mapped).
    pub src: Addr,
    /// Owner of the socket (see docs/design.md "Owner matching").
    pub uid: u32,
    pub gid: u32,
    /// The destination is an address of this netns: the route would leave through `lo`.
    pub dst_is_local: bool,
    /// The socket's mark (SO_MARK).
    pub mark: u32,
}

impl Conn {
    pub const fn is_v4(&self) -> bool {
        is_v4_mapped(&self.dst)
    }
}

/// A new TCP connection arriving at one of the pod's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    /// The peer it comes from.
    pub src: Addr,
    pub sport: u16,
    /// The pod address it is for.
    pub dst: Addr,
    pub dport: u16,
    /// The interface it arrives on, in the pod's netns ([`LOOPBACK_IFINDEX`]: made inside).
    pub ifindex: u32,
}

/// The loopback interface's index in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// What to do with a connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Leave the connection alone.
    Pass,
    /// Send it to localhost:`port` (the outbound or the inbound capture port).
    Redirect,
    /// TPROXY mode: leave the destination alone; inbound capture hands the connection to the
    /// listener on `port` (what iptables' TPROXY target does).
    Tproxy,
    /// Refuse it: captured for a listener on `port`, where nothing listens (as a REDIRECT to a
    /// closed port is refused).
    Refuse,
}

/// The outcome of a decision. A plain struct rather than an enum with data: every field is
/// defined on every path, which the BPF verifier needs (an enum's unused payload can hold a
/// stale pointer in a register).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub action: Action,
    /// The capture port (0 for `Pass`).
    pub port: u16,
    pub reason: Reason,
}

impl Verdict {
    pub const fn pass(reason: Reason) -> Self {
        Verdict {
            action: Action::Pass,
            port: 0,
            reason,
        }
    }

    pub const fn redirect(port: u16, reason: Reason) -> Self {
        Verdict {
            action: Action::Redirect,
            port,
            reason,
        }
    }

    pub const fn tproxy(port: u16, reason: Reason) -> Self {
        Verdict {
            action: Action::Tproxy,
            port,
            reason,
        }
    }

    /// What becomes of an inbound capture to `port` when no proxy listens there.
    pub const fn no_listener(port: u16) -> Self {
        Verdict {
            action: Action::Refuse,
            port,
            reason: Reason::InboundNoListener,
        }
    }

    pub const fn reason(self) -> Reason {
        self.reason
    }
}

/// Per-pod set membership, answered by maps in the kernel and by in-memory sets on the host.
pub trait Rules {
    fn member(&self, kind: MemberKind, value: u32) -> bool;
    /// Whether `addr` (IPv6 form) lies in one of the CIDRs of list `kind`.
    fn cidr(&self, kind: CidrKind, addr: &Addr) -> bool;
    /// Whether `port` lies in one of the ranges of port-range list `kind`.
    fn port_range(&self, kind: CidrKind, port: u16) -> bool;
    /// Whether the pod's route to `dst` leaves through an interface excluded with `-c`.
    fn route_excluded(&self, dst: &Addr) -> bool;
}

/// What the decisions need to know of the pod's live state besides its rules: its addresses,
/// and the records the kernel keeps of connections made inside it.
pub trait Lookups: Rules {
    /// Whether `addr` is assigned to an interface of the pod (its pod IPs; loopback aside).
    fn pod_addr(&self, addr: &Addr) -> bool;
    /// The reason recorded (`ORIG_DST`) for the connection `a` is the far end of, if any.
    fn recorded(&self, a: &Arrival) -> Option<Reason>;
}

/// Whether `addr` is an address of the pod's netns: loopback, or one of its own. A connection
/// to it is routed through `lo`.
#[inline(always)]
pub fn is_local<L: Lookups>(lookups: &L, addr: &Addr) -> bool {
    is_loopback(addr) || lookups.pod_addr(addr)
}

/// DNS, and the port istio's DNS proxy listens on (fixed in istio).
pub const DNS_PORT: u16 = 53;
pub const DNS_CAPTURE_PORT: u16 = 15053;

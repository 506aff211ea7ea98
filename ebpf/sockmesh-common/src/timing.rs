//! Section timing: where the programs' time goes, section by section, when the agent runs with
//! `--section-timing` (for `cargo xtask profile`). Each section adds its nanoseconds and its runs
//! to the per-CPU array `SM_TIMING`: the time at index `section`, the runs at
//! `section + SECTIONS`. Off (the default), the programs' timing code is removed by the
//! verifier, which sees the switch as a constant.

/// A timed part of a program, in the order of a connection's life.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// Two clock reads back to back: what timing a section itself adds to it.
    Timer,
    /// connect4/6: the netns cookie and the pod's config.
    ConnectPod,
    /// connect4/6: the socket's creator (for the owner rules).
    ConnectCreator,
    /// connect4/6: whether the destination is one of the pod's addresses.
    ConnectLocal,
    /// connect4/6: the decision.
    ConnectDecide,
    /// connect4/6: the decision's counter.
    ConnectCount,
    /// connect4/6: keeping the original destination (socket cookie, the task's `HANDOFF` slot).
    ConnectRecord,
    /// connect4/6: the source address the socket would have had (route source lookup).
    ConnectSource,
    /// connect4/6: binding that source (`bpf_bind`).
    ConnectBind,
    /// connect4/6: the whole program, for a call it redirects.
    ConnectRedirected,
    /// connect4/6: the whole program, for a call it leaves alone (registered pods).
    ConnectPassed,
    /// sock_ops: the callbacks with nothing to do (timeout, window and ECN init, ...).
    SockopsIdle,
    /// sock_ops: the SYN about to go out (`TCP_CONNECT_CB`: publish the record).
    SockopsConnect,
    /// sock_ops: the client's end established.
    SockopsActive,
    /// sock_ops: the server's end established.
    SockopsPassive,
    /// sock_ops: a watched socket's change of state, other than its close.
    SockopsState,
    /// sock_ops: a watched socket's close (the record released).
    SockopsClose,
    /// sock_ops: a socket listening.
    SockopsListen,
    /// getsockopt: the `ORIG_DST` lookup of SO_ORIGINAL_DST.
    GetsockoptLookup,
    /// getsockopt: the whole program, for SO_ORIGINAL_DST.
    GetsockoptOrigDst,
}

/// How many sections there are.
pub const SECTIONS: u32 = Section::GetsockoptOrigDst as u32 + 1;

impl Section {
    /// Every section, in order.
    pub const ALL: [Section; SECTIONS as usize] = [
        Section::Timer,
        Section::ConnectPod,
        Section::ConnectCreator,
        Section::ConnectLocal,
        Section::ConnectDecide,
        Section::ConnectCount,
        Section::ConnectRecord,
        Section::ConnectSource,
        Section::ConnectBind,
        Section::ConnectRedirected,
        Section::ConnectPassed,
        Section::SockopsIdle,
        Section::SockopsConnect,
        Section::SockopsActive,
        Section::SockopsPassive,
        Section::SockopsState,
        Section::SockopsClose,
        Section::SockopsListen,
        Section::GetsockoptLookup,
        Section::GetsockoptOrigDst,
    ];

    /// Its name in reports: program, then part.
    pub fn name(self) -> &'static str {
        match self {
            Section::Timer => "timer (two clock reads)",
            Section::ConnectPod => "connect4: netns and pod config",
            Section::ConnectCreator => "connect4: socket creator",
            Section::ConnectLocal => "connect4: destination local?",
            Section::ConnectDecide => "connect4: decision",
            Section::ConnectCount => "connect4: decision counter",
            Section::ConnectRecord => "connect4: record (cookie, task slot)",
            Section::ConnectSource => "connect4: source address lookup",
            Section::ConnectBind => "connect4: bpf_bind",
            Section::ConnectRedirected => "connect4: whole, redirected",
            Section::ConnectPassed => "connect4: whole, left alone",
            Section::SockopsIdle => "sock_ops: callbacks with nothing to do",
            Section::SockopsConnect => "sock_ops: SYN out, TCP_CONNECT_CB (publish)",
            Section::SockopsActive => "sock_ops: client established",
            Section::SockopsPassive => "sock_ops: server established",
            Section::SockopsState => "sock_ops: state change",
            Section::SockopsClose => "sock_ops: close (release)",
            Section::SockopsListen => "sock_ops: listen",
            Section::GetsockoptLookup => "getsockopt: ORIG_DST lookup",
            Section::GetsockoptOrigDst => "getsockopt: whole, SO_ORIGINAL_DST",
        }
    }

    /// Whether the section is a whole program run (the others are parts of one).
    pub fn is_whole(self) -> bool {
        matches!(
            self,
            Section::ConnectRedirected
                | Section::ConnectPassed
                | Section::SockopsIdle
                | Section::SockopsConnect
                | Section::SockopsActive
                | Section::SockopsPassive
                | Section::SockopsState
                | Section::SockopsClose
                | Section::SockopsListen
                | Section::GetsockoptOrigDst
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_section_at_its_index() {
        for (i, s) in Section::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{s:?}");
        }
    }
}

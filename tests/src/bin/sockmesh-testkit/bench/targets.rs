//! The report's end: each target (issues #6 and #15) against the figure that answers it, then
//! why the figures are what they are.

use super::{
    capture::Capture,
    hop::Hop,
    mesh::Mesh,
    pod_scale::PodScale,
    proxies::{Proxies, HTTP_MODES, ROLES},
    rules::Rules,
    stats::{fmt2, miss, verdict},
};

/// The sections, measured.
pub struct Figures<'a> {
    pub capture: &'a Capture,
    pub hop: &'a Hop,
    pub rules: &'a Rules,
    pub pod_scale: &'a PodScale,
    pub proxies: &'a Proxies,
    pub mesh: &'a Mesh,
}

/// A row of the targets' table.
fn row(r: &mut String, target: &str, measured: String, verdict: String) {
    r.push_str(&format!("| {target} | {measured} | {verdict} |\n"));
}

pub fn report(f: &Figures, r: &mut String) {
    r.push_str("## Targets\n\n| target | measured | verdict |\n|---|---|---|\n");
    let connect = f.capture.to_direct();
    row(
        r,
        "connect-time capture within 5% of direct (>= 0.95)",
        fmt2(connect),
        verdict(connect.0 >= 0.95, miss(0.95 - connect.0)),
    );
    // Hop paths: iptables, sockmesh, sockmesh + sk_msg, Unix socket; figures: 64 B p50 first,
    // bulk last.
    let p50 = f.hop.ratio(2, 0, 0);
    row(
        r,
        "hop round-trip p50 at most 0.8x iptables' (sockmesh + sk_msg, 64 B)",
        fmt2(p50),
        verdict(p50.0 <= 0.8, miss(p50.0 - 0.8)),
    );
    let vs_unix = f.hop.ratio(2, 3, 0);
    row(
        r,
        "hop round-trip p50 within 1.25x of the Unix socket's",
        fmt2(vs_unix),
        verdict(vs_unix.0 <= 1.25, miss(vs_unix.0 - 1.25)),
    );
    let thr = f.hop.ratio(2, 0, 4);
    row(
        r,
        "hop bulk throughput at least 1.5x iptables' (sockmesh + sk_msg)",
        fmt2(thr),
        verdict(thr.0 >= 1.5, miss(1.5 - thr.0)),
    );
    let (scale, most_rules) = f.rules.sockmesh_scale();
    row(
        r,
        &format!("per-connect cost with {most_rules} exclusions within 5% of 1 (>= 0.95)"),
        format!("{scale:.2}"),
        verdict(scale >= 0.95, miss(0.95 - scale)),
    );
    let most = f.pod_scale.most();
    let total = f.pod_scale.total_registration();
    row(
        r,
        &format!("registering {most} pods in under 2 s"),
        format!("{total:.2} s"),
        verdict(total < 2.0, format!("{:.2} s", total - 2.0)),
    );
    let peak = f.pod_scale.peak_rss();
    row(
        r,
        &format!("agent under 30 MiB RSS with {most} pods"),
        format!("{peak:.1} MiB"),
        verdict(peak < 30.0, format!("{:.1} MiB", peak - 30.0)),
    );
    for (k, (_, proto, mode, _)) in ROLES.into_iter().enumerate() {
        let [rps, _, p99, cpu, _] = f.proxies.ratios(k);
        row(
            r,
            &format!("proxy requests/s at least HAProxy's ({proto} {mode}, >= 1.00)"),
            fmt2(rps),
            verdict(rps.0 >= 1.0, miss(1.0 - rps.0)),
        );
        row(
            r,
            &format!("proxy p99 at most HAProxy's ({proto} {mode}, <= 1.00)"),
            fmt2(p99),
            verdict(p99.0 <= 1.0, miss(p99.0 - 1.0)),
        );
        row(
            r,
            &format!("proxy CPU per request at most HAProxy's ({proto} {mode}, <= 1.00)"),
            fmt2(cpu),
            verdict(cpu.0 <= 1.0, miss(cpu.0 - 1.0)),
        );
    }
    let (sm, accel) = f.mesh.ratios();
    row(
        r,
        "mesh request through two sidecars, one node, new connections: sockmesh requests/s at \
         least 1.1x iptables'",
        fmt2(sm),
        verdict(sm.0 >= 1.1, miss(1.1 - sm.0)),
    );
    for ((mode, _), a) in HTTP_MODES.into_iter().zip(accel) {
        row(
            r,
            &format!(
                "acceleration's effect on the mesh request, one node, {mode} (shown as measured)"
            ),
            format!("{} of sockmesh's without it", fmt2(a)),
            "shown".into(),
        );
    }
    r.push('\n');
    r.push_str(WHY);
    r.push_str(NOTES);
}

/// Why, from the figures.
const WHY: &str = "Why, from the figures above: capture at connect costs sockmesh its programs' \
     time per connection (section 1's program table, measured with the kernel's statistics on, \
     which add to each run) plus what any redirected connection pays (iptables' path is as far \
     from direct); section 1's row of connections sockmesh's programs see but do not redirect \
     measures what their being there costs (each hook's run, and the kernel's calls to sock_ops \
     at every step of the handshake whether or not the program has work), and the distance from \
     that row to sockmesh's is capture's own work; docs/profile.md times the programs part by \
     part (the agent's `--section-timing`, on these connections): the largest parts of a \
     captured connection's program time are keeping its original destination (left in the \
     connecting task's storage at connect, put under the connection's 4-tuple as the SYN goes \
     out, looked up for SO_ORIGINAL_DST and removed at close: the last three hash-map \
     operations, in a map sized for the node's live connections), then bpf_bind (the source address the connection would \
     have had, which the proxy sees as its peer as after iptables' REDIRECT) and the socket \
     creator's read for the owner rules, each a few hundred ns, none alone the distance to the \
     target; a round trip through the hop has four legs \
     (app to forwarder, forwarder to upstream and back over the veth, forwarder to app) and \
     sk_msg shortcuts only the first (an app's socket never receives redirected data, so the \
     answer reaches it by TCP; the veth legs are not local; the Unix socket skips TCP/IP on \
     both legs between app and forwarder), while the forwarder's and the upstream's wakeups \
     take most of the time, so it changes latency little; in bulk the app outruns the forwarder \
     (whose upstream is slower than a local write), so sk_msg fills the forwarder's 1 MiB \
     window, the rest goes by TCP with TCP's back pressure, and bulk gains little (before \
     sk_msg kept back pressure, this hop measured 1.64x to 2.75x iptables by letting the app's \
     writes pile up unbounded in kernel memory); a registration's wall time against the agent's \
     CPU time in it (section 4) says how much is the agent's work and how much the API round \
     trip; the proxies' CPU time per request (section 5) is why one serves more than the other \
     on 2 shared cores.\n\nWhere sockmesh-proxy's CPU goes, from a profile: `cargo xtask \
     profile` (docs/profile.md) counts both proxies' user-space instructions per request in \
     section 5's roles under callgrind, and shares sockmesh-proxy's out. For HTTP/1.1 most go \
     to hyper's HTTP/1 codecs (the server's towards the client; the client's towards the \
     upstream, with its channel to the upstream connection's task), tokio's task and I/O \
     machinery (much of it inlined into its callers), the allocator and memory copies \
     (futures and messages moved by value), about a fifth to the proxy's own request \
     handling, routing and pool. With keep-alive and with new connections that is fewer \
     instructions per request than HAProxy's event loop runs (which has one buffer per \
     connection, no task per request, no future to move): the profile-guided build (below) \
     inlines and lays out the code by the paths requests take, where a plain build of the \
     same code runs about as many instructions as HAProxy. \
     Wherever sockmesh-proxy's CPU per request is at or below HAProxy's, its requests/s and p99 \
     fall within what moves from round to round (the brackets), and a miss there by a few \
     hundredths is that spread, not a cost. With new connections each connection adds a task \
     and hyper's buffers; like HAProxy, sockmesh-proxy reads and writes a new connection \
     directly and registers it with epoll only when it would wait (tokio alone registers each \
     one: an epoll_ctl to add and one to delete); sockmesh-proxy also asks each connection's \
     SO_ORIGINAL_DST (one getsockopt), which HAProxy's configuration here does without (its \
     by-call table in docs/profile.md counts these). Section 5 splits each proxy's CPU per \
     request into user and system time, measured in the same rounds, so a CPU gap shows on \
     which side it lies: the user side is what the profile counts; the system side is the \
     proxy's system calls and the kernel's TCP work done in its context (a loopback peer's \
     receive among it). The profile also counts, by callgrind's cache simulation, each proxy's \
     first-level cache misses per request, a measure of how much code and data a request \
     touches: where a role's user-time ratio in section 5 is above its instruction ratio in the \
     profile, the excess is more time per instruction, not more instructions. The simulation \
     counts more data misses per request for sockmesh-proxy than for HAProxy (its futures, \
     tasks and buffers) and about as many instruction misses or fewer, but it sees neither the kernel's work between two requests (which evicts much of either proxy's \
     cache) nor the processor's prefetching, so its miss counts rank the proxies and do not \
     measure that time. h2c runs \
     the h2 crate on both sides (under hyper's server towards the client; directly towards \
     the upstream, the request's task opening its stream, where hyper's client added a \
     dispatch task and a task per response), HAProxy its own multiplexer: in the profile \
     sockmesh-proxy runs more instructions per h2c request than HAProxy: over half are \
     hyper's and the h2 crate's (frames, HPACK, stream state, a task per client stream), \
     memory copies (frames queued by value, futures) and the rest of the C library about a \
     fifth, the proxy's own handling about a tenth; so what is left of that gap is the HTTP/2 \
     implementation's, not routing or capture work. It makes fewer system calls per request \
     than HAProxy (the by-call table), which is why its CPU per request in section 5 can be \
     below HAProxy's with more instructions. The TCP relay parses nothing: \
     each proxy's event loop and system calls are what is left. In the profile sockmesh-proxy \
     runs fewer instructions than HAProxy per exchange with keep-alive and per connection with \
     new connections (its relay's buffers are not zeroed: tokio's copy zeroed 16 KiB per \
     connection, half of a new connection's instructions before), with about as many system \
     calls; so there too a requests/s or p99 miss of a few hundredths, with CPU per request at \
     or below HAProxy's, is the spread between rounds.\n\nThe mesh request (section 6) goes \
     through two proxies, whose CPU is most of a request's cost on 2 shared cores: capture \
     removes conntrack and NAT from each of the four legs' connects, which shows with new \
     connections and little with keep-alive (connections made once). Acceleration shortcuts \
     only proxy-to-proxy sockets on one node, a leg that is one of several and dominated by the \
     proxies' own work; its effect is shown as measured.\n\n";

/// How the proxies and acceleration were set up.
const NOTES: &str =
    "Both proxies keep upstream connections alive (sockmesh-proxy pools HTTP/1.1 per \
     endpoint and shares one h2c connection per endpoint; HAProxy with `http-reuse always`). \
     Both run as uid 1337, in the pod. sockmesh-proxy is built as `cargo xtask bench` \
     builds it: the workspace's release profile (fat LTO, one codegen unit) with \
     profile-guided optimisation, whose profile an instrumented build of the proxy took in \
     section 5's own roles at smoke sizes (xtask/src/pgo.rs), so it fits the requests \
     measured here; it allocates with mimalloc (through its plain calls for ordinary \
     alignments).\n\n\
     sk_msg acceleration is off by default: on this kernel it still differs from TCP where a \
     user can see it (splice readers of redirected data get none of it; on a socket in the \
     map, FIONREAD counts only redirected data and blocking reads can fail early with \
     EAGAIN; tests/tests/accel.rs pins these down). \
     The hop's pod has it for all its sockets (`SOCKMESH_ACCELERATION=all`), the app's \
     included. The hop's forwarder reads as \
     an event loop does, so the hop measures what it gives where it is safe.\n";

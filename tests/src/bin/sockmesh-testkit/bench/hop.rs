//! Section 2, the app-to-proxy hop: from the app through a minimal forwarder on the outbound
//! port (as the proxy user) to an upstream on the peer host: round trips of 64 B and 4 KiB and
//! a bulk transfer, under istio's iptables rules, under sockmesh, under sockmesh with sk_msg
//! acceleration, and over a Unix socket to the same forwarder.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use sockmesh_tests::{
    kit::Identity,
    lab::Lab,
    pods::{self, Mode, Pod, PEER_V4},
};

use super::{
    stats::{column, fmt, fmt1, fmt2, in_order, ratio_of, Spread},
    Bench,
};
use crate::hop::{HopBulk, HopDst, HopForward, HopRr, HopUpstream};

/// The paths, in the report's order.
const PATHS: [&str; 4] = [
    "iptables REDIRECT (istio rules)",
    "sockmesh",
    "sockmesh + sk_msg",
    "Unix socket",
];

/// One round of one path: 64 B p50 and p99 µs, 4 KiB p50 and p99 µs, bulk MB/s.
type HopRound = [f64; 5];

pub struct Hop {
    /// A pod with istio's rules and no listener (its forwarder comes and goes).
    ipt: Pod,
    /// The upstream, on each pod's peer.
    upstream: SocketAddr,
    /// Where the forwarders (uid 1337) make their Unix sockets.
    dir: PathBuf,
    /// Per path, each round.
    rounds: [Vec<HopRound>; 4],
}

impl Hop {
    /// The iptables pod, and the upstreams on both pods' peers.
    pub fn new(b: &mut Bench) -> Result<Hop> {
        let p = b.profile.clone();
        let ipt = pods::pod_with(&mut b.lab, "h", &p, Mode::Iptables, &[])?;
        pods::apply_iptables(&ipt, &p)?;
        let upstream = SocketAddr::new(PEER_V4.parse()?, 18100);
        for pod in [&ipt, &b.sm] {
            b.lab
                .start(pod.peer_place(), &HopUpstream { addr: upstream })?;
        }
        let dir = b.lab.dir.join("hop");
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777))?;
        Ok(Hop {
            ipt,
            upstream,
            dir,
            rounds: Default::default(),
        })
    }

    /// The forwarder on the pod's outbound port (and a Unix socket), as the proxy user.
    fn forwarder(&self, lab: &mut Lab, pod: &Pod, unix: &Path) -> Result<usize> {
        let forward = HopForward {
            listen: pods::any_v4(15001),
            unix: Some(unix.to_path_buf()),
            upstream: self.upstream,
        };
        lab.start(pod.place().as_user(1337), &forward)
    }

    /// One round of every path, each with its forwarder, in reverse order every other round.
    pub fn round(&mut self, b: &mut Bench) -> Result<()> {
        let sm_sock = self.dir.join("hop.sock");
        let fi = self.forwarder(&mut b.lab, &self.ipt, &self.dir.join("hop-ipt.sock"))?;
        let fs = self.forwarder(&mut b.lab, &b.sm, &sm_sock)?;
        let tcp = HopDst::Tcp(self.upstream);
        let paths = [
            (&self.ipt, &tcp, false),
            (&b.sm, &tcp, false),
            (&b.sm, &tcp, true),
            (&b.sm, &HopDst::Unix(sm_sock.clone()), false),
        ];
        let mut results: [HopRound; 4] = Default::default();
        for (k, (pod, dst, accel)) in in_order(paths, self.rounds[0].len()) {
            if k > 0 {
                // The hop's app writes to its forwarder (the proxy): acceleration for all the
                // pod's sockets, or none.
                let accel = if accel { "all" } else { "off" };
                b.register(&b.sm, &b.profile, accel, true)?;
            }
            let (a50, a99) = round_trips(b, pod, dst, 64)?;
            let (b50, b99) = round_trips(b, pod, dst, 4096)?;
            let mb = bulk(b, pod, dst)?;
            results[k] = [a50, a99, b50, b99, mb];
        }
        for (k, result) in results.into_iter().enumerate() {
            self.rounds[k].push(result);
        }
        b.lab.kill(fi)?;
        b.lab.kill(fs)
    }

    /// Path `a`'s figure `i` against path `b`'s (indices into [`PATHS`]), round by round.
    pub fn ratio(&self, a: usize, b: usize, i: usize) -> Spread {
        ratio_of(&self.rounds[a], &self.rounds[b], |x| x[i])
    }

    /// Per path, the spread of each figure.
    pub fn figures(&self) -> Vec<[Spread; 5]> {
        self.rounds
            .iter()
            .map(|v| std::array::from_fn(|i| column(v, |x| x[i])))
            .collect()
    }

    pub fn report(&self, b: &Bench, r: &mut String) {
        r.push_str("## 2. The app-to-proxy hop\n\n");
        r.push_str(&format!(
            "From the app (uid 1000) through a minimal forwarder on the outbound port (one \
             thread, an event loop as proxies are, as uid 1337) to an upstream on the peer host: round trips of 64 B and \
             4 KiB on one connection for {} s (latency per round trip), and {} MiB in 64 KiB \
             writes to a sink that answers with the count (throughput to the answer). Paths: \
             istio's iptables rules; sockmesh (its own pod settings: no sk_msg); sockmesh with \
             sk_msg acceleration for the pod; and the app reaching the same forwarder over a \
             Unix socket.\n\n\
             | path | 64 B p50 µs | 64 B p99 µs | 4 KiB p50 µs | 4 KiB p99 µs | bulk MB/s |\n\
             |---|---|---|---|---|---|\n",
            b.sizes.secs,
            b.sizes.bulk >> 20
        ));
        let hop = self.figures();
        for (name, h) in PATHS.iter().zip(&hop) {
            r.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} |\n",
                fmt1(h[0]),
                fmt1(h[1]),
                fmt1(h[2]),
                fmt1(h[3]),
                fmt(h[4])
            ));
        }
        let x = |a, b, i| fmt2(self.ratio(a, b, i));
        r.push_str(&format!(
            "\n64 B p50 against iptables: sockmesh {}, sockmesh + sk_msg {}, Unix socket {}; \
             sockmesh + sk_msg against the Unix socket {}. Bulk against iptables: sockmesh {}, \
             sockmesh + sk_msg {}, Unix socket {}.\n\n",
            x(1, 0, 0),
            x(2, 0, 0),
            x(3, 0, 0),
            x(2, 3, 0),
            x(1, 0, 4),
            x(2, 0, 4),
            x(3, 0, 4),
        ));
    }
}

/// (p50 µs, p99 µs) of `size`-byte round trips through `dst` from the pod's app.
fn round_trips(b: &Bench, pod: &Pod, dst: &HopDst, size: usize) -> Result<(f64, f64)> {
    let rr = HopRr {
        dst: dst.clone(),
        size,
        secs: b.sizes.secs,
        id: Identity::APP,
    };
    let out = b.output(pod, true, &rr)?;
    let f: Vec<f64> = out.split(' ').filter_map(|x| x.parse().ok()).collect();
    if f.len() != 3 || f[0] == 0.0 {
        bail!("hop-rr gave {out:?}");
    }
    Ok((f[1], f[2]))
}

/// MB/s of the bulk transfer through `dst` to the upstream's sink, from the pod's app.
fn bulk(b: &Bench, pod: &Pod, dst: &HopDst) -> Result<f64> {
    let bulk = HopBulk {
        dst: dst.clone(),
        bytes: b.sizes.bulk,
        id: Identity::APP,
    };
    let out = b.output(pod, true, &bulk)?;
    let bps: f64 = out
        .parse()
        .with_context(|| format!("hop-bulk gave {out:?}"))?;
    Ok(bps / 1e6)
}

//! Section 3, rule scale: the connect-time cost from pods whose capture excludes n CIDRs and n
//! ports, none of them the destination: iptables (a rule per exclusion) against sockmesh (an
//! LPM trie entry per CIDR, a hash entry per port).

use anyhow::Result;
use sockmesh_tests::{
    pods::{self, Mode, Pod},
    profiles::Profile,
};

use super::{
    lean_listener, peer80,
    stats::{fmt, stats, Spread},
    Bench,
};

/// One size: its number of exclusions of each kind, its iptables pod, its profile, and each
/// round's connections per second under iptables and under sockmesh.
struct Scaled {
    n: usize,
    ipt: Pod,
    profile: Profile,
    ipt_rate: Vec<f64>,
    sm_rate: Vec<f64>,
}

pub struct Rules {
    scaled: Vec<Scaled>,
}

/// `n` excluded CIDRs (`-x`) and `n` excluded ports (`-o`), none of them the benchmark's
/// destination (peer:80).
fn exclusions(n: usize) -> (Vec<String>, Vec<u16>) {
    let cidrs = (0..n)
        .map(|i| format!("1.{}.{}.0/24", i / 100, i % 100))
        .collect();
    let ports = (0..n).map(|i| 20_000 + i as u16).collect();
    (cidrs, ports)
}

impl Rules {
    /// For each size, a pod with istio's iptables rules, n excluded CIDRs and n excluded ports,
    /// and its own listener on 15001; sockmesh's side is the sockmesh pod, registered again with
    /// the same exclusions (pod addresses are unique on a node).
    pub fn new(b: &mut Bench) -> Result<Rules> {
        let mut scaled = Vec::new();
        for (k, &n) in b.sizes.rules.iter().enumerate() {
            let mut profile = b.profile.clone();
            (profile.exclude, profile.outbound_exclude_ports) = exclusions(n);
            let ipt = pods::pod_with(&mut b.lab, &format!("ri{k}"), &profile, Mode::Iptables, &[])?;
            lean_listener(&mut b.lab, &ipt, false)?;
            pods::apply_iptables(&ipt, &profile)?;
            scaled.push(Scaled {
                n,
                ipt,
                profile,
                ipt_rate: Vec::new(),
                sm_rate: Vec::new(),
            });
        }
        Ok(Rules { scaled })
    }

    /// One round of each size, both ways; the sockmesh pod is left with the plain profile.
    pub fn round(&mut self, b: &Bench) -> Result<()> {
        for s in &mut self.scaled {
            s.ipt_rate.push(b.connects(&s.ipt, false, peer80())?);
            b.reregister(&s.profile)?;
            s.sm_rate.push(b.connects(&b.sm, true, peer80())?);
        }
        b.reregister(&b.profile)
    }

    /// Per size: (exclusions, iptables' rate, sockmesh's rate).
    pub fn figures(&self) -> Vec<(usize, Spread, Spread)> {
        self.scaled
            .iter()
            .map(|s| (s.n, stats(&s.ipt_rate), stats(&s.sm_rate)))
            .collect()
    }

    /// sockmesh's rate with the most exclusions against with the fewest, and the most.
    pub fn sockmesh_scale(&self) -> (f64, usize) {
        let f = self.figures();
        let (first, last) = (&f[0], &f[f.len() - 1]);
        (last.2 .0 / first.2 .0, last.0)
    }

    pub fn report(&self, r: &mut String) {
        r.push_str("## 3. Rule scale\n\n");
        r.push_str(
            "The same short connections from pods whose capture excludes n CIDRs (`-x`, /24s) and \
             n ports (`-o`), none of them the destination, so every exclusion is checked. \
             iptables holds one rule per exclusion; sockmesh an LPM trie entry per CIDR and a \
             hash entry per port.\n\n\
             | exclusions (each kind) | iptables conn/s | iptables vs 1 | sockmesh conn/s | sockmesh vs 1 |\n\
             |---|---|---|---|---|\n",
        );
        let f = self.figures();
        let (base_ipt, base_sm) = (f[0].1 .0, f[0].2 .0);
        for (n, ri, rm) in &f {
            r.push_str(&format!(
                "| {n} | {} | {:.2} | {} | {:.2} |\n",
                fmt(*ri),
                ri.0 / base_ipt,
                fmt(*rm),
                rm.0 / base_sm
            ));
        }
    }
}

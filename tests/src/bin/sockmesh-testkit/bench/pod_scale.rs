//! Section 4, pod scale: n network namespaces registered with the agent one after the other
//! over its API, then unregistered; the agent's memory, its BPF maps' memory and its CPU time
//! per registration; and the capture cost of a pod with the most others registered.

use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{Context, Result};
use sockmesh_tests::{
    api::{self, pb},
    lab::Lab,
};

use super::{
    host::{cpu_secs, map_memory_mib, new_netns, rss_mib},
    peer80,
    stats::{fmt, fmt2, stats},
    Bench,
};

/// What the section asks of the agent for each namespace.
#[derive(Clone, Copy)]
enum PodCall {
    Register,
    Unregister,
}

pub struct PodScale {
    agent: u32,
    /// The most pods registered at once.
    most: usize,
    /// Namespaces to register (made by the benchmark itself, no process in them).
    spare: Vec<OwnedFd>,
    rt: tokio::runtime::Runtime,
    /// Per size, each round: seconds per registration and per unregistration, the agent's RSS
    /// and BPF map memory (MiB) with that many registered.
    reg: Vec<Vec<f64>>,
    unreg: Vec<Vec<f64>>,
    rss: Vec<Vec<f64>>,
    mem: Vec<Vec<f64>>,
    /// The agent's CPU seconds per registration at the most.
    cpu_reg: Vec<f64>,
    /// The sockmesh pod's connections per second alone, and with the most others registered.
    cap_before: Vec<f64>,
    cap_after: Vec<f64>,
}

impl PodScale {
    pub fn new(b: &Bench) -> Result<PodScale> {
        let sizes = b.sizes.pods.len();
        let most = *b.sizes.pods.iter().max().unwrap_or(&1);
        Ok(PodScale {
            agent: b.lab.agent_pid().context("the agent's pid")?,
            most,
            spare: (0..most).map(|_| new_netns()).collect::<Result<_>>()?,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            reg: vec![Vec::new(); sizes],
            unreg: vec![Vec::new(); sizes],
            rss: vec![Vec::new(); sizes],
            mem: vec![Vec::new(); sizes],
            cpu_reg: Vec::new(),
            cap_before: Vec::new(),
            cap_after: Vec::new(),
        })
    }

    /// Register n pods, read the agent's memory, (at the most) measure the sockmesh pod's
    /// capture, unregister them; for each size.
    pub fn round(&mut self, b: &Bench) -> Result<()> {
        self.cap_before.push(b.connects(&b.sm, true, peer80())?);
        for (k, &n) in b.sizes.pods.iter().enumerate() {
            let cpu0 = cpu_secs(self.agent)?;
            let took = self.call_each(&b.lab, n, PodCall::Register)?;
            self.reg[k].push(took / n as f64);
            if n == self.most {
                self.cpu_reg.push((cpu_secs(self.agent)? - cpu0) / n as f64);
            }
            self.rss[k].push(rss_mib(self.agent)?);
            self.mem[k].push(map_memory_mib(self.agent)?);
            if n == self.most {
                self.cap_after.push(b.connects(&b.sm, true, peer80())?);
            }
            let took = self.call_each(&b.lab, n, PodCall::Unregister)?;
            self.unreg[k].push(took / n as f64);
        }
        Ok(())
    }

    /// Make `call` for the first `n` spare namespaces one after the other (as init containers
    /// do, each its own connection); seconds taken.
    fn call_each(&self, lab: &Lab, n: usize, call: PodCall) -> Result<f64> {
        let t = std::time::Instant::now();
        self.rt.block_on(async {
            for fd in &self.spare[..n] {
                let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
                let mut c = api::pod_client(&lab.socket, std::path::Path::new(&path)).await?;
                match call {
                    PodCall::Register => c
                        .register(pb::RegisterRequest {
                            settings: Some(api::default_settings()),
                        })
                        .await
                        .context("registering a pod")?,
                    PodCall::Unregister => c
                        .unregister(pb::UnregisterRequest {})
                        .await
                        .context("unregistering a pod")?,
                };
            }
            anyhow::Ok(())
        })?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// The most pods registered at once.
    pub fn most(&self) -> usize {
        self.most
    }

    /// Seconds to register the most pods, one after the other.
    pub fn total_registration(&self) -> f64 {
        stats(&self.reg[self.reg.len() - 1]).0 * self.most as f64
    }

    /// The agent's RSS with the most pods, MiB.
    pub fn peak_rss(&self) -> f64 {
        stats(&self.rss[self.rss.len() - 1]).0
    }

    pub fn report(&self, b: &Bench, r: &mut String) {
        let most = self.most;
        r.push_str("\n## 4. Pod scale\n\n");
        r.push_str(&format!(
            "n network namespaces registered with the agent one after the other over its API (a \
             connection each, istio's default settings), then unregistered the same way; \
             the agent's resident memory and its BPF maps' kernel memory (memlock) with n \
             registered. Then the capture cost of a registered pod with {most} others registered, \
             against the same pod alone, in the same round.\n\n\
             | pods | ms per registration | ms per unregistration | agent RSS MiB | BPF map memory MiB |\n|---|---|---|---|---|\n"
        ));
        let ms = |v: &[f64]| stats(&v.iter().map(|x| x * 1000.0).collect::<Vec<_>>());
        for (k, n) in b.sizes.pods.iter().enumerate() {
            r.push_str(&format!(
                "| {n} | {} | {} | {} | {} |\n",
                fmt2(ms(&self.reg[k])),
                fmt2(ms(&self.unreg[k])),
                fmt2(stats(&self.rss[k])),
                fmt2(stats(&self.mem[k]))
            ));
        }
        let (before, after) = (stats(&self.cap_before), stats(&self.cap_after));
        r.push_str(&format!(
            "\nCapture of one pod, connections/s: alone {}, with {most} others registered {} \
             (ratio {:.2}).\n\n",
            fmt(before),
            fmt(after),
            after.0 / before.0
        ));
        let reg_cpu = stats(&self.cpu_reg).0 * 1000.0;
        let reg_wall = stats(&self.reg[self.reg.len() - 1]).0 * 1000.0;
        r.push_str(&format!(
            "The agent's CPU time per registration (of {most}): {reg_cpu:.2} ms, of {reg_wall:.2} ms \
             from the caller's connect to its answer.\n\n"
        ));
    }
}

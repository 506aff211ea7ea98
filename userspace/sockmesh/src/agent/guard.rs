//! The guard: what the agent put in force stays in force. Every period it checks each cgroup
//! link (pinned, attached, running the agent's program) and every pod's entries in the maps
//! against what the agent wrote, puts back what someone else changed, logs it and counts it
//! (`sockmesh_agent_repairs_total`), so a node never stays silently uncaptured.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use std::os::unix::fs::MetadataExt;

use tracing::{error, info, warn};

use crate::core::{loader::InForce, maps::PinnedMaps, registry};

/// Repairs so far, by what was put right.
#[derive(Default)]
pub struct Repairs(Mutex<BTreeMap<&'static str, u64>>);

impl Repairs {
    fn count(&self, what: &'static str) {
        *self
            .0
            .lock()
            .expect("repairs lock")
            .entry(what)
            .or_default() += 1;
    }

    /// Every count, by what was put right.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().expect("repairs lock").clone()
    }
}

/// What the guard keeps in force.
pub struct Guard {
    /// The registration socket and the inode this agent bound there: once another agent has
    /// taken the path (an upgrade), what it puts in force is its own, and this guard stops.
    pub socket: PathBuf,
    pub socket_ino: u64,
    pub cgroup: OwnedFd,
    pub in_force: Vec<InForce>,
    pub bpffs: PathBuf,
    pub maps: Arc<Mutex<PinnedMaps>>,
    pub repairs: Arc<Repairs>,
}

impl Guard {
    /// Whether another agent now serves the registration socket.
    fn superseded(&self) -> bool {
        std::fs::metadata(&self.socket).map_or(true, |m| m.ino() != self.socket_ino)
    }

    /// One round of checks.
    pub fn check(&self) {
        for f in &self.in_force {
            match f.keep(self.cgroup.as_fd(), &self.bpffs) {
                Ok(None) => {}
                Ok(Some(r)) => {
                    warn!(
                        link = f.link_name,
                        what = r.name(),
                        "cgroup program was taken out of force; put back"
                    );
                    self.repairs.count(r.name());
                }
                Err(e) => {
                    error!(link = f.link_name, error = %e, "cannot check or restore a cgroup link")
                }
            }
        }
        let mut maps = self.maps.lock().expect("maps lock");
        match registry::repair(&mut maps) {
            Ok(r) => {
                for netns in r.restored {
                    warn!(%netns, "a registered pod's map entries were changed or removed; written again");
                    self.repairs.count("pod entries restored");
                }
                for netns in r.foreign {
                    warn!(%netns, "a pod entry the agent never wrote was found; removed");
                    self.repairs.count("foreign pod entry removed");
                }
            }
            Err(e) => error!(error = %e, "cannot restore the pods' map entries"),
        }
    }
}

/// Run the guard every `period` on a thread of its own, until another agent takes over.
pub fn spawn(guard: Guard, period: Duration) {
    std::thread::spawn(move || loop {
        std::thread::sleep(period);
        if guard.superseded() {
            info!(
                socket = %guard.socket.display(),
                "another agent serves the socket: this one stops guarding"
            );
            return;
        }
        guard.check();
    });
}

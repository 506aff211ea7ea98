//! What is in force and how it changes: the file and the control plane's resources, merged.
//!
//! The merge goes to the listeners bound for it and to the snapshot connections use. A change
//! is installed completely or not at all: listeners it adds are bound first, and a failure
//! leaves everything as it was.

use std::{
    collections::{hash_map::Entry, HashMap},
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex},
};

use tokio::sync::watch;
use tracing::info;

use crate::{
    config::{Config, Direction},
    listener::{self, ListenerSpec},
    restart::Inherited,
    snapshot::{Shared, Snapshot},
    transport::{self, Listener},
    xds,
};

/// Why a change is refused (and everything stays as it was).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The control plane's resources do not translate, or the whole does not check out.
    #[error(transparent)]
    Xds(#[from] xds::Error),
    /// A new listener's address cannot be bound.
    #[error("listener {name:?} ({address}): bind: {error}")]
    Bind {
        name: String,
        address: SocketAddr,
        error: io::Error,
    },
}

/// The running proxy's configuration sources and listeners.
pub struct Control {
    /// The configuration file as last loaded.
    file: Config,
    /// The control plane's resources as last accepted.
    dynamic: xds::Resources,
    /// Bound listeners by address; sending `None` closes one.
    listeners: HashMap<SocketAddr, watch::Sender<Option<ListenerSpec>>>,
    /// Their sockets, for a successor to take over (see `restart`).
    fds: HashMap<SocketAddr, RawFd>,
    /// Listening sockets taken over from a predecessor, used instead of binding.
    inherited: Inherited,
    shared: Option<Shared>,
    /// Which listeners a change may bind: once the proxy stops accepting on some, a later
    /// change (a reload, the control plane's update) does not bind them again.
    accepting: Accepting,
}

/// The listeners the proxy accepts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accepting {
    All,
    /// Its pod is going away: only the outbound ones, for the app's calls as it shuts down.
    Outbound,
    /// A successor accepts on them.
    None,
}

impl Accepting {
    fn allows(self, direction: Direction) -> bool {
        match self {
            Accepting::All => true,
            Accepting::Outbound => direction == Direction::Outbound,
            Accepting::None => false,
        }
    }
}

impl Control {
    pub fn new(file: Config, inherited: Inherited) -> Control {
        Control {
            file,
            dynamic: xds::Resources::default(),
            listeners: HashMap::new(),
            fds: HashMap::new(),
            inherited,
            shared: None,
            accepting: Accepting::All,
        }
    }

    /// Bind the file's listeners that were not inherited, without serving them yet: the
    /// proxy binds as root and serves once it runs as its own user ([`Control::start`] takes
    /// them up). A request served as root would open its upstream connection (and a health
    /// check its probe) as root, which capture does not exclude: it would come back through
    /// the proxy.
    pub fn bind_file_listeners(&mut self) -> Result<(), Refused> {
        for l in &self.file.listeners {
            if let Entry::Vacant(e) = self.inherited.entry(l.address) {
                e.insert(transport::listen(l.address).map_err(|error| Refused::Bind {
                    name: l.name.clone(),
                    address: l.address,
                    error,
                })?);
            }
        }
        Ok(())
    }

    /// Every listening socket, for a successor.
    pub fn listening(&self) -> Vec<(SocketAddr, RawFd)> {
        self.fds.iter().map(|(a, fd)| (*a, *fd)).collect()
    }

    /// Stop accepting on every listener (a successor accepts on them now); established
    /// connections go on.
    pub fn stop_accepting(&mut self) {
        self.accepting = Accepting::None;
        self.close_stopped();
    }

    /// Stop accepting on the inbound listeners (the pod is going away: no new request is to
    /// reach it) and keep the outbound ones, so the app can still call out as it shuts down;
    /// established connections go on.
    pub fn stop_inbound(&mut self) {
        if self.accepting == Accepting::All {
            self.accepting = Accepting::Outbound;
        }
        self.close_stopped();
    }

    /// Close the listeners the proxy no longer accepts on (`accepting`), as
    /// [`Control::install`] leaves them unbound.
    fn close_stopped(&mut self) {
        let (fds, accepting) = (&mut self.fds, self.accepting);
        self.listeners.retain(|address, tx| {
            let keep = matches!(&*tx.borrow(), Some(s) if accepting.allows(s.direction));
            if !keep {
                let _ = tx.send(None);
                fds.remove(address);
            }
            keep
        });
    }

    /// The snapshot connections use (after the first install).
    pub fn shared(&self) -> Shared {
        self.shared.clone().expect("installed")
    }

    /// Put a new configuration file in force with the current dynamic resources.
    pub fn set_file(&mut self, file: Config) -> Result<(), Refused> {
        let merged = xds::merge(&file, &self.dynamic)?;
        self.install(&merged)?;
        self.file = file;
        Ok(())
    }

    /// Put a control plane's resources in force with the file's configuration.
    pub fn set_dynamic(&mut self, dynamic: xds::Resources) -> Result<(), Refused> {
        let merged = xds::merge(&self.file, &dynamic)?;
        self.install(&merged)?;
        self.dynamic = dynamic;
        Ok(())
    }

    /// The file's configuration alone (the first install, before any control plane).
    pub fn start(&mut self) -> Result<(), Refused> {
        let file = self.file.clone();
        self.install(&file)
    }

    fn install(&mut self, c: &Config) -> Result<(), Refused> {
        // Bind what is new first: a listener that cannot be bound refuses the whole change.
        // What the proxy no longer accepts on stays unbound.
        let mut bound = Vec::new();
        for l in &c.listeners {
            if !self.listeners.contains_key(&l.address) && self.accepting.allows(l.direction) {
                let bind_err = |error| Refused::Bind {
                    name: l.name.clone(),
                    address: l.address,
                    error,
                };
                let socket = match self.inherited.remove(&l.address) {
                    Some(taken) => Listener::new(taken),
                    None => transport::bind(l.address),
                }
                .map_err(bind_err)?;
                bound.push((l, socket));
            }
        }
        let previous = self.shared.as_ref().map(Shared::load);
        let snap = Arc::new(Snapshot::new(c, previous.as_deref()));
        snap.start_health_checks();
        let shared = match &self.shared {
            Some(s) => {
                s.store(snap);
                s.clone()
            }
            None => {
                let s = Shared::new(snap);
                self.shared = Some(s.clone());
                s
            }
        };
        // Listeners that stay take their new settings; removed ones stop accepting.
        self.listeners.retain(
            |addr, tx| match c.listeners.iter().find(|l| l.address == *addr) {
                Some(l) => {
                    let spec = ListenerSpec::of(l);
                    tx.send_if_modified(|cur| {
                        let changed = cur.as_ref() != Some(&spec);
                        *cur = Some(spec);
                        changed
                    });
                    true
                }
                None => {
                    let _ = tx.send(None);
                    self.fds.remove(addr);
                    false
                }
            },
        );
        for (l, socket) in bound {
            info!(name = l.name, address = %l.address, direction = ?l.direction, "listening");
            let (tx, rx) = watch::channel(Some(ListenerSpec::of(l)));
            self.listeners.insert(l.address, tx);
            self.fds.insert(l.address, socket.as_raw_fd());
            tokio::spawn(listener::serve(socket, rx, shared.clone()));
        }
        crate::http::set_access_log(c.access_log);
        Ok(())
    }
}

/// The xDS stream installs into the control, locked for each step.
impl xds::Install for Arc<Mutex<Control>> {
    type Error = Refused;

    fn in_force(&self) -> xds::Resources {
        self.lock().expect("control lock").dynamic.clone()
    }

    fn install(&self, next: xds::Resources) -> Result<(), Refused> {
        self.lock().expect("control lock").set_dynamic(next)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{ErrorKind, Read, Write},
        net::TcpStream,
        time::Duration,
    };

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn file_listeners_are_bound_first_and_served_only_once_started() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = free.local_addr().unwrap();
        drop(free);
        let yaml =
            format!("listeners:\n  - {{name: out, address: \"{address}\", direction: outbound}}\n");
        let mut control = Control::new(Config::parse("t.yaml", &yaml).unwrap(), Inherited::new());
        control.bind_file_listeners().unwrap();
        assert!(control.listening().is_empty(), "nothing serves yet");
        // Bound: the connection waits in the backlog, and nothing answers it.
        let mut client = TcpStream::connect(address).unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 64];
        let err = client.read(&mut buf).expect_err("answered before start");
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err}"
        );
        // Started: the same socket serves. The connection came straight to the proxy, not
        // redirected, so the proxy closes it (see `listener::connection`).
        control.start().unwrap();
        assert_eq!(control.listening().len(), 1);
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The request it did not read makes the close a reset.
        let read = tokio::task::spawn_blocking(move || client.read(&mut buf))
            .await
            .unwrap();
        let closed = match &read {
            Ok(n) => *n == 0,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
        };
        assert!(closed, "not closed by the proxy: {read:?}");
    }

    /// A free port's address on loopback.
    fn free_address() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// Whether `address` refuses connections within 2 s (a closed listener goes with its task).
    async fn refused(address: SocketAddr) -> bool {
        for _ in 0..40 {
            match tokio::net::TcpStream::connect(address).await {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => return true,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        false
    }

    /// A change after the proxy stopped accepting on some listeners (its pod going away, or a
    /// successor serving) does not bind them again: a reload, as the control plane's updates
    /// do, leaves them closed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_change_while_draining_binds_no_stopped_listener() {
        let (out, inb) = (free_address(), free_address());
        let yaml = format!(
            "listeners:\n  - {{name: out, address: \"{out}\", direction: outbound}}\n  - \
             {{name: in, address: \"{inb}\", direction: inbound}}\n"
        );
        let config = Config::parse("t.yaml", &yaml).unwrap();
        let mut control = Control::new(config.clone(), Inherited::new());
        control.start().unwrap();
        assert_eq!(control.listening().len(), 2);

        control.stop_inbound();
        assert!(
            refused(inb).await,
            "inbound still accepts after stop_inbound"
        );
        control.set_file(config.clone()).unwrap();
        let listening: Vec<SocketAddr> = control.listening().iter().map(|(a, _)| *a).collect();
        assert_eq!(listening, [out]);
        assert!(
            refused(inb).await,
            "a reload bound the inbound listener again"
        );

        control.stop_accepting();
        assert!(
            refused(out).await,
            "outbound still accepts after stop_accepting"
        );
        control.set_file(config).unwrap();
        assert!(control.listening().is_empty());
        assert!(
            refused(out).await && refused(inb).await,
            "a reload bound a listener again"
        );
    }
}

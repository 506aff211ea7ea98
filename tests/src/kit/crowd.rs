//! `crowd`: many captured connections held open at once. In one pod it listens on the capture
//! port as a proxy would (reading each accepted connection's SO_ORIGINAL_DST as it accepts),
//! then, as the app, opens `count` connections, each to its own destination port, and keeps
//! them all open until told to let go. It reports how many were made, accepted, and got their
//! own destination back.

use std::{
    collections::HashMap,
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd,
    path::PathBuf,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::{sockaddr, socket, take_credentials, Args, ConnectSpec, Identity, Launch};

/// The line `crowd` prints once every connection is open (and its report is written).
pub const HELD: &str = "crowd: held";

/// How long the whole crowd may take to open, and to be accepted.
const LIMIT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct Crowd {
    /// The destination address; connection i goes to port `first_port + i`.
    pub dst: std::net::IpAddr,
    #[arg(long)]
    pub first_port: u16,
    #[arg(long)]
    pub count: usize,
    /// The capture port to listen on as the proxy (0.0.0.0).
    #[arg(long)]
    pub listen: u16,
    /// Where the report goes (JSON) once all are open.
    #[arg(long)]
    pub report: PathBuf,
    /// Hold every connection until this file exists.
    #[arg(long)]
    pub release: PathBuf,
    #[command(flatten)]
    pub id: Identity,
}

/// What the crowd saw, written once every connection is open.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CrowdReport {
    /// Connections the app made.
    pub opened: usize,
    /// Connections that failed to open.
    pub failed: usize,
    /// Connections the listener accepted.
    pub accepted: usize,
    /// Accepted connections whose SO_ORIGINAL_DST was the one their app dialled.
    pub right: usize,
    /// Accepted connections with another original destination, or none (up to 10 shown).
    pub wrong: usize,
    pub examples: Vec<String>,
    /// Seconds to open them all.
    pub open_secs: f64,
}

impl Launch for Crowd {
    const NAME: &'static str = "crowd";

    fn args(&self) -> Args {
        Args::new()
            .arg(self.dst)
            .opt("--first-port", self.first_port)
            .opt("--count", self.count)
            .opt("--listen", self.listen)
            .path("--report", &self.report)
            .path("--release", &self.release)
            .id(self.id)
    }
}

impl Crowd {
    pub fn run(self) -> Result<()> {
        ensure!(
            usize::from(self.first_port) + self.count <= 65536,
            "--first-port + --count passes port 65535"
        );
        raise_fd_limit(2 * self.count + 64)?;
        let listener =
            socket::bind_listener(SocketAddr::from(([0, 0, 0, 0], self.listen)), false, false)?;
        // SAFETY: a listening socket; listen again only widens its backlog.
        if unsafe { libc::listen(listener.as_raw_fd(), 4096) } != 0 {
            anyhow::bail!("listen: {}", std::io::Error::last_os_error());
        }
        // Opened while still root: the lab's folder is root's.
        let mut report_file = std::fs::File::create(&self.report)
            .with_context(|| format!("creating {}", self.report.display()))?;
        let first = SocketAddr::new(self.dst, self.first_port);
        take_credentials(&ConnectSpec::to(first, self.id))?;
        // The proxy: accept and read each original destination as it comes, keyed by the
        // client's address; keep every socket.
        let (want_tx, want_rx) = mpsc::channel::<usize>();
        let acceptor = std::thread::spawn(
            move || -> Result<(HashMap<SocketAddr, String>, Vec<TcpStream>)> {
                let mut seen = HashMap::new();
                let mut held = Vec::new();
                let mut want = usize::MAX;
                let until = Instant::now() + LIMIT;
                listener.set_nonblocking(true)?;
                while seen.len() < want && Instant::now() < until {
                    if let Ok(n) = want_rx.try_recv() {
                        want = n;
                    }
                    match listener.accept() {
                        Ok((conn, peer)) => {
                            let orig = sockaddr::original_dst_text(conn.as_raw_fd(), peer);
                            seen.insert(sockaddr::unmap(peer), orig);
                            held.push(conn);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) => return Err(e).context("accept"),
                    }
                }
                Ok((seen, held))
            },
        );
        let started = Instant::now();
        let mut report = CrowdReport::default();
        let mut open = Vec::with_capacity(self.count);
        let mut dialled = Vec::with_capacity(self.count);
        for i in 0..self.count {
            let dst = SocketAddr::new(self.dst, self.first_port + i as u16);
            match TcpStream::connect_timeout(&dst, Duration::from_secs(5)) {
                Ok(s) => {
                    dialled.push((sockaddr::unmap(s.local_addr()?), dst));
                    open.push(s);
                }
                Err(_) => report.failed += 1,
            }
            if started.elapsed() > LIMIT {
                anyhow::bail!("{i} connections opened in {LIMIT:?}; giving up");
            }
        }
        report.open_secs = started.elapsed().as_secs_f64();
        report.opened = open.len();
        let _ = want_tx.send(open.len());
        let (seen, held) = acceptor.join().expect("acceptor")?;
        report.accepted = seen.len();
        for (client, dst) in &dialled {
            match seen.get(client) {
                Some(orig) if *orig == dst.to_string() => report.right += 1,
                other => {
                    report.wrong += 1;
                    if report.examples.len() < 10 {
                        report
                            .examples
                            .push(format!("{client} dialled {dst}, proxy read {other:?}"));
                    }
                }
            }
        }
        std::io::Write::write_all(&mut report_file, &serde_json::to_vec(&report)?)?;
        drop(report_file);
        println!("{HELD}");
        while !self.release.exists() {
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(open);
        drop(held);
        Ok(())
    }
}

/// Raise the soft open-files limit to at least `want`, within the hard limit.
fn raise_fd_limit(want: usize) -> Result<()> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain data.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    ensure!(
        rl.rlim_max as usize >= want,
        "{want} open files needed, the hard limit is {}: spread the connections over more pods",
        rl.rlim_max
    );
    rl.rlim_cur = rl.rlim_max;
    // SAFETY: plain data.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
        anyhow::bail!("setrlimit: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

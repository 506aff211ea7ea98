//! `churn`: connections one after another for a while, each ended a different way (the
//! client closes first, the server closes first, an RST, a half-close), or DNS queries over
//! UDP; counts those that did not get the answer they should. The soak runs several at once.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::{take_credentials, Args, ConnectSpec, Identity, Launch};

/// `churn`: for `secs`, TCP connections to `dst` ended in turn by the client, by the server,
/// by an RST and by a half-close (`--udp`: DNS-sized datagrams, each waiting for its answer).
#[derive(clap::Args, Clone, Debug, PartialEq)]
pub struct Churn {
    pub dst: SocketAddr,
    #[arg(long)]
    pub secs: f64,
    /// Datagrams instead of connections.
    #[arg(long)]
    pub udp: bool,
    #[command(flatten)]
    pub id: Identity,
}

impl Launch for Churn {
    const NAME: &'static str = "churn";

    fn args(&self) -> Args {
        Args::new()
            .arg(self.dst)
            .opt("--secs", self.secs)
            .switch("--udp", self.udp)
            .id(self.id)
    }
}

/// What a churn run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChurnReport {
    pub done: u64,
    pub failed: u64,
    /// The first few failures.
    pub samples: Vec<String>,
}

impl Churn {
    pub fn run(self) -> Result<()> {
        take_credentials(&ConnectSpec::to(self.dst, self.id))?;
        let end = Instant::now() + Duration::from_secs_f64(self.secs);
        let mut report = ChurnReport::default();
        let mut i = 0u64;
        while Instant::now() < end {
            let r = if self.udp {
                datagram(self.dst)
            } else {
                connection(self.dst, i % 4)
            };
            match r {
                Ok(()) => report.done += 1,
                Err(e) => {
                    report.failed += 1;
                    if report.samples.len() < 5 {
                        report.samples.push(format!("{e:#}"));
                    }
                }
            }
            i += 1;
        }
        println!("{}", serde_json::to_string(&report)?);
        Ok(())
    }
}

/// One connection, ended by `how`: 0 the client closes first (after the first line), 1 the
/// server closes first (read to the end), 2 an RST (linger 0), 3 a half-close then the rest.
fn connection(dst: SocketAddr, how: u64) -> Result<()> {
    let s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut r = BufReader::new(&s);
    match how {
        0 => {
            // The first line: a proxy's hop line, or the listener's report.
            let mut line = String::new();
            r.read_line(&mut line)?;
            anyhow::ensure!(
                line.contains("listener=") || line.contains("hop="),
                "nothing came back: {line:?}"
            );
        }
        1 => {
            let mut all = String::new();
            r.read_to_string(&mut all)?;
            anyhow::ensure!(all.contains("listener="), "no report: {all:?}");
        }
        2 => {
            let mut line = String::new();
            r.read_line(&mut line)?;
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt on our socket with a valid struct.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&linger as *const libc::linger).cast(),
                    std::mem::size_of::<libc::linger>() as u32,
                )
            };
        }
        _ => {
            s.shutdown(Shutdown::Write)?;
            let mut all = String::new();
            r.read_to_string(&mut all)?;
            anyhow::ensure!(all.contains("listener="), "no report: {all:?}");
        }
    }
    drop(r);
    (&s).flush()?;
    Ok(())
}

/// One datagram and its answer.
fn datagram(dst: SocketAddr) -> Result<()> {
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let s = UdpSocket::bind(bind)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.connect(dst)?;
    s.send(&[0u8; 40])?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf)?;
    anyhow::ensure!(n > 0, "an empty answer");
    Ok(())
}

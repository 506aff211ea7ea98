//! `proxy`: a minimal transparent proxy, as a sidecar would run it. On the outbound port it
//! forwards to the original destination; on the inbound port it forwards to the original
//! destination from the inbound passthrough source (127.0.0.6 / ::6), as Istio's Envoy does.
//! Before relaying, it tells the client which hop it is and what original destination it saw.

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{Context, Result};

use super::{
    sockaddr::{original_dst, unmap},
    socket::{bind_listener, connect_from},
    Args, Launch,
};

/// `proxy`: the proxy on the outbound and inbound capture ports.
///
/// With `tproxy_mark`, the proxy works as Istio's Envoy in TPROXY mode: its inbound listener is
/// transparent and its upstream connection to the app keeps the client's address as source
/// (IP_TRANSPARENT, SO_MARK).
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct Proxy {
    /// Its name in the hop it reports (`NAME-outbound`, `NAME-inbound`).
    #[arg(long)]
    pub name: String,
    #[arg(long, default_value = "15001")]
    pub outbound: u16,
    #[arg(long, default_value = "15006")]
    pub inbound: u16,
    /// TPROXY mode: transparent inbound listener, original-source upstream with this mark.
    #[arg(long)]
    pub tproxy_mark: Option<u32>,
}

impl Proxy {
    /// A proxy named `name` on istio's ports, in REDIRECT mode.
    pub fn new(name: impl Into<String>) -> Proxy {
        Proxy {
            name: name.into(),
            outbound: 15001,
            inbound: 15006,
            tproxy_mark: None,
        }
    }

    /// Serve until killed; prints "ready" once bound.
    pub fn run(self) -> Result<()> {
        let mut threads = Vec::new();
        for (port, dir) in [(self.outbound, "outbound"), (self.inbound, "inbound")] {
            let upstream = match (dir, self.tproxy_mark) {
                ("outbound", _) => Upstream::Direct,
                (_, Some(mark)) => Upstream::OriginalSource(mark),
                _ => Upstream::Passthrough,
            };
            let transparent = matches!(upstream, Upstream::OriginalSource(_));
            for addr in [format!("0.0.0.0:{port}"), format!("[::]:{port}")] {
                let listener = bind_listener(addr.parse()?, transparent, false)
                    .with_context(|| format!("binding {addr}"))?;
                let hop = format!("{}-{dir}", self.name);
                threads.push(std::thread::spawn(move || {
                    for conn in listener.incoming().flatten() {
                        let hop = hop.clone();
                        std::thread::spawn(move || relay(conn, &hop, upstream));
                    }
                }));
            }
        }
        super::say_ready()?;
        super::join_all(threads);
        Ok(())
    }
}

impl Launch for Proxy {
    const NAME: &'static str = "proxy";

    fn args(&self) -> Args {
        Args::new()
            .opt("--name", &self.name)
            .opt("--outbound", self.outbound)
            .opt("--inbound", self.inbound)
            .opt_some("--tproxy-mark", self.tproxy_mark)
    }
}

/// How the proxy connects upstream.
#[derive(Clone, Copy)]
enum Upstream {
    /// Outbound: straight to the original destination.
    Direct,
    /// Inbound (REDIRECT mode): from 127.0.0.6 / ::6.
    Passthrough,
    /// Inbound (TPROXY mode): from the client's own address, with this mark.
    OriginalSource(u32),
}

impl Upstream {
    /// A connection to `orig` for a client at `peer`.
    fn connect(self, orig: SocketAddr, peer: SocketAddr) -> Result<TcpStream> {
        match self {
            Upstream::Passthrough => {
                let src: IpAddr = if orig.is_ipv4() {
                    Ipv4Addr::new(127, 0, 0, 6).into()
                } else {
                    Ipv6Addr::from(6u128).into()
                };
                connect_from(src, orig, None)
            }
            Upstream::OriginalSource(mark) => connect_from(unmap(peer).ip(), orig, Some(mark)),
            Upstream::Direct => Ok(TcpStream::connect_timeout(&orig, Duration::from_secs(2))?),
        }
    }
}

/// Say which hop this is, then relay `client` to its original destination both ways.
fn relay(mut client: TcpStream, hop: &str, mode: Upstream) {
    let Ok(peer) = client.peer_addr() else { return };
    let orig = match original_dst(client.as_raw_fd(), peer) {
        Ok(o) => unmap(o),
        Err(e) => {
            let _ = writeln!(client, "hop={hop} orig={e}");
            return;
        }
    };
    let upstream = mode.connect(orig, peer);
    let _ = writeln!(client, "hop={hop} orig={orig} client={}", unmap(peer).ip());
    let Ok(upstream) = upstream else {
        let _ = writeln!(client, "hop={hop} upstream-error");
        return;
    };
    let (Ok(mut c2), Ok(mut u2)) = (client.try_clone(), upstream.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(std::net::Shutdown::Write);
    });
    let mut upstream = upstream;
    let _ = std::io::copy(&mut upstream, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

//! TLS: a client that sends a ClientHello naming a server and prints what comes back, for the
//! proxy's TLS passthrough by server name (it routes without terminating TLS).

use std::{
    io::{Read, Write},
    net::SocketAddr,
};

use anyhow::Result;

use super::{Args, ConnectSpec, Identity, Launch};

/// `tls-hello`: send a TLS ClientHello naming `sni` to `dst`; print what comes back.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct TlsHello {
    pub dst: SocketAddr,
    #[arg(long)]
    pub sni: String,
    #[command(flatten)]
    pub id: Identity,
}

impl TlsHello {
    pub fn run(self) -> Result<()> {
        let mut s = ConnectSpec::to(self.dst, self.id).open()?;
        s.write_all(&client_hello(&self.sni))?;
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        print!("{out}");
        Ok(())
    }
}

impl Launch for TlsHello {
    const NAME: &'static str = "tls-hello";

    fn args(&self) -> Args {
        Args::new()
            .arg(self.dst)
            .opt("--sni", &self.sni)
            .id(self.id)
    }
}

/// A TLS record holding a ClientHello whose server_name extension names `server`.
fn client_hello(server: &str) -> Vec<u8> {
    let name = server.as_bytes();
    // server_name extension: list length, host_name entry (type 0), name.
    let mut ext = ((name.len() + 3) as u16).to_be_bytes().to_vec();
    ext.push(0);
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(name);
    let mut exts = vec![0, 0];
    exts.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    exts.extend_from_slice(&ext);
    // ClientHello: version, random, empty session id, one suite, null compression, extensions.
    let mut hello = vec![0x03, 0x03];
    hello.extend_from_slice(&[42u8; 32]);
    hello.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    hello.extend_from_slice(&exts);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&((hello.len() + 4) as u16).to_be_bytes());
    record.push(0x01);
    record.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    record.extend_from_slice(&hello);
    record
}

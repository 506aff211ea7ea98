//! The registration API as the attack tests speak it: the `sockmesh-api` crate's client and
//! preamble (so the tests reach the agent as any program on the node would), with the knobs an
//! attacker turns: no fd, another fd, several fds, another preamble, raw bytes.

use std::{io::Write, os::unix::net::UnixStream, path::Path};

use anyhow::{bail, Result};
pub use sockmesh_api::{pb, send_preamble, Client, PREAMBLE};

/// A gRPC client whose connection starts with `byte` and `fds`.
pub async fn client(sock: &Path, byte: u8, fds: Vec<std::os::fd::OwnedFd>) -> Result<Client> {
    Ok(sockmesh_api::connect_with(sock, byte, fds).await?)
}

/// A client speaking for the network namespace at `netns` (a /var/run/netns path or
/// /proc/PID/ns/net).
pub async fn pod_client(sock: &Path, netns: &Path) -> Result<Client> {
    client(sock, PREAMBLE, vec![std::fs::File::open(netns)?.into()]).await
}

/// Connect and write `bytes` as they are, then read what comes back until the agent closes or
/// a second passes.
pub fn raw(sock: &Path, bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Ok(out)
}

/// The settings `sockmesh init istio` sends for istio's default sidecar argv
/// (`-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020`).
pub fn default_settings() -> pb::PodSettings {
    use sockmesh_common::{MemberKind, PodFlags};
    pb::PodSettings {
        flags: (PodFlags::OUTBOUND_ALL | PodFlags::INBOUND_ALL).bits(),
        outbound_port: 15001,
        inbound_port: 15006,
        tunnel_port: 15008,
        uids: vec![1337],
        gids: vec![1337],
        loopback_v4: vec![127, 0, 0, 6],
        loopback_v4_prefix: 32,
        members: [15090, 15021, 15020]
            .into_iter()
            .map(|p| pb::Member {
                kind: MemberKind::InboundExcludePort as u32,
                value: p,
            })
            .collect(),
        ..Default::default()
    }
}

/// Raise this process's open-file limit to its hard limit (for many concurrent clients).
pub fn raise_nofile() -> Result<u64> {
    // SAFETY: plain data in and out.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        r.rlim_cur = r.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
        Ok(r.rlim_cur)
    }
}

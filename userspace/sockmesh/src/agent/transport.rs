//! The registration API's server side of the connection: accept callers on the Unix socket,
//! read each one's preamble (its network namespace) without holding up the others, and hand
//! tonic the connections that sent a valid one. A caller's identity travels with its
//! connection as [`Caller`].

use std::{
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use sockmesh_api::PREAMBLE;
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::UnixStream,
};

use crate::core::sys;

/// Most connections served at once; further callers wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 4096;
/// Time a caller has to send its preamble.
pub const PREAMBLE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection's preamble established: the caller's namespace (if it sent one) and who
/// the peer is, for logs.
#[derive(Clone, Debug)]
pub struct Caller {
    pub netns: Option<Arc<OwnedFd>>,
    pub peer: String,
}

/// An accepted connection whose preamble has been read.
pub struct PodStream {
    io: UnixStream,
    caller: Caller,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for PodStream {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for PodStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PodStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accept connections on `listener`, read each preamble (without holding up the others), and
/// yield the connections that sent a valid one. Bad preambles are logged and closed.
pub fn incoming(
    listener: tokio::net::UnixListener,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<PodStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore never closed");
            let io = match listener.accept().await {
                Ok((io, _)) => io,
                Err(e) => {
                    // EMFILE and the like: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let peer = peer_of(&io);
                match tokio::time::timeout(PREAMBLE_TIMEOUT, read_preamble(&io)).await {
                    Ok(Ok(netns)) => {
                        let caller = Caller {
                            netns: netns.map(Arc::new),
                            peer,
                        };
                        let _ = tx
                            .send(Ok(PodStream {
                                io,
                                caller,
                                _permit: permit,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::warn!(peer, error = %e, "connection refused"),
                    Err(_) => tracing::warn!(peer, "connection refused: no preamble in time"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn peer_of(io: &UnixStream) -> String {
    sys::peer_cred(io.as_fd())
        .map(|c| format!("pid={} uid={} gid={}", c.pid, c.uid, c.gid))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Read the one preamble byte and the fd that came with it (at most one).
async fn read_preamble(io: &UnixStream) -> io::Result<Option<OwnedFd>> {
    let preamble = io
        .async_io(Interest::READABLE, || {
            // SAFETY: the fd is owned by `io`, which outlives the borrow.
            let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(io.as_raw_fd()) };
            sockmesh_api::recv_preamble(fd)
        })
        .await?;
    match preamble.byte {
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "closed before the preamble",
        )),
        Some(PREAMBLE) => Ok(preamble.fd),
        Some(b) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "preamble byte {b:#04x} is not sockmesh's ({PREAMBLE:#04x}): speak the sockmesh \
                 registration protocol (sockmesh init, or sockmesh_api::connect)"
            ),
        )),
    }
}

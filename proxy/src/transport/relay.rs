//! Bytes relayed both ways between two connections, each half-close passed on: what a TCP
//! route and an upgraded HTTP/1.1 connection do.
//!
//! tokio's `copy_bidirectional` does the same with buffers it zeroes when it makes them: 16 KiB
//! of `memset` per relayed connection, more than half of a short connection's instructions
//! (`cargo xtask profile`, the TCP relay with new connections). These buffers are not zeroed:
//! a read fills the part that is then written.

use std::{
    future::poll_fn,
    io,
    mem::MaybeUninit,
    pin::Pin,
    task::{ready, Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read at once in each direction, as tokio's copy reads.
const BUF_SIZE: usize = 8 * 1024;

/// One direction: what was read and not yet written, and how far it has gone.
struct Half {
    buf: Box<[MaybeUninit<u8>]>,
    /// Written up to `pos` of the `filled` bytes the last read gave.
    pos: usize,
    filled: usize,
    /// Bytes written since the writer was last flushed.
    unflushed: bool,
    /// The reader reached its end.
    eof: bool,
    /// The end was passed on (the writer shut down).
    done: bool,
}

impl Half {
    fn new() -> Half {
        Half {
            buf: Box::new_uninit_slice(BUF_SIZE),
            pos: 0,
            filled: 0,
            unflushed: false,
            eof: false,
            done: false,
        }
    }

    /// Copy from `r` to `w` until `r` ends, then shut `w` down, unless `last`: the other
    /// direction has ended, so `w` has nothing left to read and its close, as the relay ends,
    /// tells its peer the same (a system call fewer).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        last: bool,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.filled && !self.eof {
                let mut rb = ReadBuf::uninit(&mut self.buf);
                match r.as_mut().poll_read(cx, &mut rb) {
                    Poll::Ready(result) => result?,
                    Poll::Pending => {
                        // Nothing more to write for now: what was written goes out.
                        if self.unflushed {
                            ready!(w.as_mut().poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                }
                let n = rb.filled().len();
                if n == 0 {
                    self.eof = true;
                } else {
                    (self.pos, self.filled) = (0, n);
                }
            }
            while self.pos < self.filled {
                // SAFETY: the last read initialised the first `filled` bytes of `buf`.
                let data = unsafe {
                    &*(std::ptr::from_ref(&self.buf[self.pos..self.filled]) as *const [u8])
                };
                let n = ready!(w.as_mut().poll_write(cx, data))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.unflushed = true;
            }
            if self.eof {
                if last {
                    if self.unflushed {
                        ready!(w.as_mut().poll_flush(cx))?;
                    }
                } else {
                    ready!(w.as_mut().poll_shutdown(cx))?;
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Relay `a`'s bytes to `b` and `b`'s to `a` until both have ended, the first end passed on
/// as a shutdown of the other's writing side (the second goes with the caller's close); the
/// first error of either direction ends both. The caller closes both once this returns.
pub async fn relay<A, B>(a: &mut A, b: &mut B) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a_to_b, mut b_to_a) = (Half::new(), Half::new());
    poll_fn(|cx| {
        if !a_to_b.done {
            let last = b_to_a.done;
            if let Poll::Ready(r) = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b), last)
            {
                r?;
            }
        }
        if !b_to_a.done {
            let last = a_to_b.done;
            if let Poll::Ready(r) = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a), last)
            {
                r?;
            }
        }
        if a_to_b.done && b_to_a.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    /// More than a buffer's worth each way, in both directions at once, then each side's end
    /// reaches the other.
    #[tokio::test]
    async fn relays_both_ways_and_passes_each_end_on() {
        let (mut client, mut down) = duplex(1024);
        let (mut up, mut server) = duplex(1024);
        let relayed = tokio::spawn(async move { relay(&mut down, &mut up).await });
        let out: Vec<u8> = (0..3 * BUF_SIZE + 7).map(|i| (i % 251) as u8).collect();
        let back: Vec<u8> = out.iter().rev().copied().collect();
        let (o, b) = (out.clone(), back.clone());
        let client_side = tokio::spawn(async move {
            client.write_all(&o).await.unwrap();
            // Half-closed: the server still answers.
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        // The ends must arrive: a relay that did not pass one on would leave a read waiting.
        let within = std::time::Duration::from_secs(10);
        let mut got = Vec::new();
        tokio::time::timeout(within, server.read_to_end(&mut got))
            .await
            .expect("the client's end reaches the server")
            .unwrap();
        assert_eq!(got, out, "client to server");
        server.write_all(&b).await.unwrap();
        server.shutdown().await.unwrap();
        let got = tokio::time::timeout(within, client_side)
            .await
            .expect("the server's end reaches the client");
        assert_eq!(got.unwrap(), back, "server to client");
        relayed.await.unwrap().unwrap();
    }

    /// A side that fails ends the relay with its error.
    #[tokio::test]
    async fn an_error_on_either_side_ends_the_relay() {
        let (client, mut down) = duplex(64);
        let (mut up, server) = duplex(64);
        drop(server);
        let mut client = client;
        client.write_all(b"hello").await.unwrap();
        let err = relay(&mut down, &mut up).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}

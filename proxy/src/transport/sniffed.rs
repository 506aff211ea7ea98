//! A connection whose first bytes were read to tell its protocol (or a TLS server name): they
//! are read again first, then the socket. Reading them, rather than peeking, leaves them for
//! the codec without a second system call for the same bytes.

use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Conn;

/// How much one read of the first bytes takes: a request head usually fits; the rest of a
/// larger first segment stays in the socket for the codec.
const READ_SIZE: usize = 4096;

thread_local! {
    /// Where the first bytes are read, on this thread: they are then copied to a buffer of
    /// their own size. A buffer of `READ_SIZE` per connection, freed again once the codec has
    /// read the bytes, would cost an allocation of the allocator's slower size classes.
    static SCRATCH: RefCell<[u8; READ_SIZE]> = const { RefCell::new([0; READ_SIZE]) };
}

/// An accepted connection and the first bytes read from it that nobody has read again yet.
pub struct Sniffed {
    first: BytesMut,
    stream: Conn,
}

impl Sniffed {
    /// A connection of which nothing has been read.
    pub fn new(stream: Conn) -> Sniffed {
        Sniffed {
            first: BytesMut::new(),
            stream,
        }
    }

    /// The bytes read so far and not read again.
    pub fn first(&self) -> &[u8] {
        &self.first
    }

    /// Wait for bytes and add what has arrived to the first bytes (one `recvfrom` once the
    /// socket is readable). Ok(0): the client closed its side. A short read means the socket
    /// is drained, so the codec's next read waits for readiness instead of trying (see
    /// [`Conn`]).
    pub async fn read_more(&mut self) -> io::Result<usize> {
        poll_fn(|cx| self.poll_read_more(cx)).await
    }

    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut buf = ReadBuf::new(scratch);
            ready!(Pin::new(&mut self.stream).poll_read(cx, &mut buf))?;
            self.first.extend_from_slice(buf.filled());
            Poll::Ready(Ok(buf.filled().len()))
        })
    }
}

impl AsyncRead for Sniffed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.first.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let n = this.first.len().min(buf.remaining());
        buf.put_slice(&this.first[..n]);
        this.first.advance(n);
        if this.first.is_empty() {
            // Read again in full: its buffer is not kept for the connection's life.
            this.first = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Sniffed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
    };

    /// An accepted tokio stream, as the listener hands connections on.
    fn accepted(s: TcpStream) -> Conn {
        Conn::new(s.into_std().unwrap())
    }

    #[tokio::test]
    async fn the_first_bytes_are_read_again_before_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (a, _) = listener.accept().await.unwrap();
        let mut conn = Sniffed::new(accepted(a));
        client.write_all(b"GET ").await.unwrap();
        assert_eq!(conn.read_more().await.unwrap(), 4);
        assert_eq!(conn.first(), b"GET ");
        client.write_all(b"/ HTTP/1.1\r\n").await.unwrap();
        client.shutdown().await.unwrap();
        let mut all = Vec::new();
        conn.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n");
        // Writes go to the socket.
        conn.write_all(b"ok").await.unwrap();
        drop(conn);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"ok");
    }

    /// An accepted connection and its client.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        (listener.accept().await.unwrap().0, client)
    }

    #[tokio::test]
    async fn a_split_method_and_a_split_client_hello_are_read_whole() {
        use crate::transport::{client_hello, client_hello_sni, sniff, Protocol};
        let (a, mut client) = pair().await;
        let writer = tokio::spawn(async move {
            client.write_all(b"G").await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            client.write_all(b"ET / HTTP/1.1\r\n\r\n").await.unwrap();
            client
        });
        let (protocol, mut conn) = sniff(accepted(a), std::time::Duration::ZERO).await.unwrap();
        assert_eq!(protocol, Protocol::Http1);
        drop(writer.await.unwrap());
        let mut all = Vec::new();
        conn.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET / HTTP/1.1\r\n\r\n");

        let (a, mut client) = pair().await;
        let hello = client_hello("api.example.com");
        let sent = hello.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent[..10]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            client.write_all(&sent[10..]).await.unwrap();
            client
        });
        let (protocol, mut conn) = sniff(accepted(a), std::time::Duration::ZERO).await.unwrap();
        assert_eq!(protocol, Protocol::Tls);
        let name = client_hello_sni(&mut conn).await;
        assert_eq!(name.as_deref(), Some("api.example.com"));
        drop(writer.await.unwrap());
        let mut all = Vec::new();
        conn.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, hello, "the relay sends the whole ClientHello on");
    }
}

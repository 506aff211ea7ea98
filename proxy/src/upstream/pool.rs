//! Upstream connections, per endpoint and direction: HTTP/1.1 ones pooled, HTTP/2 ones shared.
//!
//! HTTP/1.1 ones are kept alive: a connection goes back to the pool when its response has been
//! read to the end, by the response body itself (no task per request), and is taken again only
//! once its codec says it is ready for another request. Idle ones are closed after
//! [`IDLE_TIMEOUT`].
//!
//! HTTP/2 ones are shared: one connection per endpoint carries every request as a stream.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, LazyLock, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{
    future::{ready, Either},
    FutureExt, TryFutureExt,
};
use hyper::{
    body::{Body as _, Frame, Incoming, SizeHint},
    client::conn::{http1::SendRequest, TrySendError},
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;

use super::{
    body::Body,
    target::{Failure, Upstream},
};
use crate::{fxhash::FxHashMap, transport::connect};

/// How long an unused connection stays open.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// An endpoint, and whether the connection is inbound (from the passthrough source).
type Key = (SocketAddr, bool);

type Sender = SendRequest<Body>;

struct Idle {
    send: Sender,
    since: Instant,
}

static IDLE: LazyLock<Mutex<FxHashMap<Key, Vec<Idle>>>> = LazyLock::new(Default::default);

/// Every tenth of the idle timeout, close the HTTP/1.1 connections that have idled past it
/// and forget the HTTP/2 slots whose connection has closed (endpoints come and go), for as
/// long as the runtime it is spawned on runs (the proxy's one; started by `main`).
pub async fn reap_idle() {
    let mut tick = tokio::time::interval(IDLE_TIMEOUT / 10);
    loop {
        tick.tick().await;
        reap(Instant::now());
    }
}

fn reap(now: Instant) {
    IDLE.lock().expect("pool lock").retain(|_, list| {
        list.retain(|i| fresh(i, now));
        !list.is_empty()
    });
    // A slot being opened (locked) stays.
    H2_POOL.lock().expect("h2 pool lock").retain(|_, slot| {
        slot.opening.try_lock().is_err() || slot.open.as_ref().is_some_and(|h| !h.is_closed())
    });
}

/// Whether an idle connection may still be used.
fn fresh(i: &Idle, now: Instant) -> bool {
    !i.send.is_closed() && now.duration_since(i.since) < IDLE_TIMEOUT
}

/// The most recently used idle connection to the endpoint that can take a request now, if
/// any; the ones that closed or idled out are dropped. One not ready yet (its request body
/// still going out after an early response) stays for later: nothing waits for it.
fn checkout(key: Key) -> Option<Sender> {
    let now = Instant::now();
    let mut idle = IDLE.lock().expect("pool lock");
    let list = idle.get_mut(&key)?;
    list.retain(|i| fresh(i, now));
    let ready = list.iter().rposition(|i| i.send.is_ready())?;
    Some(list.remove(ready).send)
}

/// Keep `send` for the endpoint's next request; drop its idle connections that are closed or
/// past the timeout.
fn checkin(key: Key, send: Sender) {
    let now = Instant::now();
    let mut idle = IDLE.lock().expect("pool lock");
    let list = idle.entry(key).or_default();
    list.retain(|i| fresh(i, now));
    list.push(Idle { send, since: now });
}

/// A new TCP connection to the endpoint, for either protocol.
async fn dial(to: &Upstream) -> Result<tokio::net::TcpStream, Failure> {
    connect(to.addr, to.direction, to.connect_timeout)
        .await
        .map_err(|e| Failure::Connect(e.to_string()))
}

/// A new HTTP/1.1 connection to the endpoint.
async fn open(to: Upstream) -> Result<Sender, Failure> {
    // One buffer per message, as the server side writes (see `http::serve_http1`).
    let (send, conn) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(dial(&to).await?))
        .await
        .map_err(|e| Failure::Connect(e.to_string()))?;
    tokio::spawn(conn.with_upgrades());
    Ok(send)
}

/// Send `req` (origin-form URI) to `to` over a pooled connection, or a new one. A request
/// that a pooled connection closed on before sending any of it goes again on a new one.
///
/// Made of combinators, not an async block: each step's future takes the place of the one
/// before, where an async block would keep its captures (the request's space among them)
/// beside the future it awaits, and each move of the attempt copies the whole of it
/// (`cargo xtask profile`). A pooled connection takes the request at once. A new connection,
/// or a second try, is boxed: its connect and handshake futures are large and rarely needed.
pub fn send_http1(
    req: Request<Body>,
    to: Upstream,
) -> impl Future<Output = Result<Response<Body>, Failure>> {
    let key = to.pool_key();
    let answered = match checkout(key) {
        Some(mut send) => {
            Either::Left(send.try_send_request(req).then(move |answer| match answer {
                Ok(resp) => Either::Left(ready(Ok((resp, send)))),
                Err(e) => Either::Right(Box::pin(resend(e, to))),
            }))
        }
        None => Either::Right(Box::pin(send_new(req, to))),
    };
    answered.map(move |answer| {
        let (resp, send) = answer?;
        // An upgraded connection is the client's now.
        let home = (resp.status() != StatusCode::SWITCHING_PROTOCOLS).then_some((key, send));
        Ok(resp.map(|body| super::body::boxed(Returning { body, home })))
    })
}

/// The request a pooled connection closed on, on a new connection if none of it was sent.
async fn resend(
    mut e: TrySendError<Request<Body>>,
    to: Upstream,
) -> Result<(Response<Incoming>, Sender), Failure> {
    match e.take_message() {
        Some(req) => send_new(req, to).await,
        None => Err(Failure::Reset(e.into_error().to_string())),
    }
}

/// `req` on a new connection, and the connection.
async fn send_new(
    req: Request<Body>,
    to: Upstream,
) -> Result<(Response<Incoming>, Sender), Failure> {
    let mut send = open(to).await?;
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| Failure::Reset(e.to_string()))?;
    Ok((resp, send))
}

/// An endpoint's HTTP/2 connection: h2's handle to open streams on it, and whether its
/// connection task has ended.
#[derive(Clone)]
pub struct H2 {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl H2 {
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Wait until the connection can open another stream (its peer's limit on streams). A
    /// connection that can open none (it failed, or its peer is going away) counts as closed
    /// from then: the next request opens a new one.
    pub fn ready(self) -> impl Future<Output = Result<h2::client::SendRequest<Bytes>, h2::Error>> {
        let closed = self.closed;
        self.send
            .ready()
            .inspect_err(move |_| closed.store(true, Ordering::Release))
    }
}

/// One endpoint's HTTP/2 connection (none yet, or closed), and the async lock held while one
/// is opened.
#[derive(Default)]
struct H2Slot {
    open: Option<H2>,
    opening: Arc<tokio::sync::Mutex<()>>,
}

/// HTTP/2 upstream connections, one per endpoint and direction, shared by all requests
/// (streams multiplexed); a closed one is replaced on next use.
static H2_POOL: LazyLock<Mutex<FxHashMap<Key, H2Slot>>> = LazyLock::new(Default::default);

/// The endpoint's open HTTP/2 connection, if it has one.
fn h2_open(key: Key) -> Option<H2> {
    let pool = H2_POOL.lock().expect("h2 pool lock");
    pool.get(&key)?
        .open
        .as_ref()
        .filter(|h| !h.is_closed())
        .cloned()
}

/// The pooled HTTP/2 (h2c, prior knowledge) connection to `to`, opened if needed: at once
/// when it is open (no future of its own to move around), else boxed. Requests that arrive
/// while it is being opened wait for it rather than open their own; if opening fails, the
/// next of them tries in turn.
pub fn h2_connection(to: Upstream) -> impl Future<Output = Result<H2, Failure>> {
    match h2_open(to.pool_key()) {
        Some(h) => Either::Left(ready(Ok(h))),
        None => Either::Right(Box::pin(h2_connection_opened(to))),
    }
}

/// The endpoint's connection, opened under its slot's async lock unless a request that held
/// the lock first opened it.
async fn h2_connection_opened(to: Upstream) -> Result<H2, Failure> {
    let key = to.pool_key();
    let opening = H2_POOL
        .lock()
        .expect("h2 pool lock")
        .entry(key)
        .or_default()
        .opening
        .clone();
    let _opening = opening.lock().await;
    if let Some(h) = h2_open(key) {
        return Ok(h);
    }
    let h = open_h2(to).await?;
    H2_POOL
        .lock()
        .expect("h2 pool lock")
        .entry(key)
        .or_default()
        .open = Some(h.clone());
    Ok(h)
}

/// A new HTTP/2 connection to the endpoint, with hyper's client settings (windows of 2 MiB
/// per stream and 5 MiB per connection, no server push), its connection driven by a task of
/// its own.
async fn open_h2(to: Upstream) -> Result<H2, Failure> {
    let tcp = dial(&to).await?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(2 << 20)
        .initial_connection_window_size(5 << 20)
        .max_frame_size(16 << 10)
        .max_header_list_size(16 << 10)
        .max_send_buffer_size(1 << 20)
        .enable_push(false)
        .handshake(tcp)
        .await
        .map_err(|e| Failure::Connect(e.to_string()))?;
    let closed = Arc::new(AtomicBool::new(false));
    let ended = closed.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "HTTP/2 upstream connection ended");
        }
        ended.store(true, Ordering::Release);
    });
    Ok(H2 { send, closed })
}

/// A response body that puts its connection back in the pool once it has been read to the
/// end (or, being empty, is dropped unread). A body dropped half read takes the connection
/// with it.
struct Returning {
    body: Incoming,
    home: Option<(Key, Sender)>,
}

impl Returning {
    fn go_home(&mut self) {
        if let Some((key, send)) = self.home.take() {
            checkin(key, send);
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.go_home(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.go_home(),
            Poll::Ready(Some(Err(_))) => self.home = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if self.body.is_end_stream() {
            self.go_home();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Empty};
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;
    use crate::config::Direction;
    use crate::upstream::BodyError;

    /// An upstream on loopback answering "ok" to each request; after `per_conn` answers it
    /// closes the connection (without saying so, as an idle timeout does). Counts connections.
    async fn upstream(per_conn: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        counting(move |mut c| async move {
            for _ in 0..per_conn {
                if !read_head(&mut c).await {
                    return;
                }
                let body = "x".repeat(100_000);
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                if c.write_all(head.as_bytes()).await.is_err()
                    || c.write_all(body.as_bytes()).await.is_err()
                {
                    return;
                }
            }
        })
        .await
    }

    /// An upstream on loopback that runs `serve` on each connection it accepts, and counts
    /// them.
    async fn counting<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(c));
            }
        });
        (addr, accepted)
    }

    /// Read up to the end of a request's head (the requests here have no body); false when
    /// the connection ended first.
    async fn read_head(c: &mut tokio::net::TcpStream) -> bool {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match c.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    }

    /// Outbound to `addr`, HTTP/1.1, with the default connect timeout.
    fn to(addr: SocketAddr) -> Upstream {
        Upstream {
            addr,
            direction: Direction::Outbound,
            http2: false,
            connect_timeout: crate::transport::ORIG_DST_CONNECT_TIMEOUT,
        }
    }

    fn get() -> Request<Body> {
        Request::get("/")
            .header("host", "up")
            .body(
                Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed(),
            )
            .unwrap()
    }

    async fn read_all(r: Response<Body>) -> usize {
        r.into_body().collect().await.unwrap().to_bytes().len()
    }

    #[tokio::test]
    async fn a_response_read_to_the_end_gives_its_connection_back() {
        let (addr, accepted) = upstream(usize::MAX).await;
        for _ in 0..3 {
            let r = send_http1(get(), to(addr)).await.ok().unwrap();
            assert_eq!(read_all(r).await, 100_000);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_dropped_half_read_takes_its_connection_along() {
        let (addr, accepted) = upstream(usize::MAX).await;
        let r = send_http1(get(), to(addr)).await.ok().unwrap();
        let mut body = r.into_body();
        body.frame().await.unwrap().unwrap();
        drop(body);
        let r = send_http1(get(), to(addr)).await.ok().unwrap();
        assert_eq!(read_all(r).await, 100_000);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_pooled_connection_the_upstream_closed_is_replaced_unseen() {
        let (addr, accepted) = upstream(1).await;
        for _ in 0..3 {
            let r = send_http1(get(), to(addr)).await.ok().unwrap();
            assert_eq!(read_all(r).await, 100_000);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    /// The race [`resend`] is for: an idle pooled connection that the upstream closes after
    /// the proxy checks it out and before hyper's connection task has read the close. Here
    /// the test's runtime (one thread) is blocked while the close arrives, so the task reads
    /// it only once the request is queued on the connection: the request comes back unsent,
    /// and goes again on a new connection.
    #[tokio::test]
    async fn a_request_its_pooled_connection_closed_on_unsent_goes_on_a_new_one() {
        // The upstream on a thread of its own: it runs while the runtime is blocked.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (close, closed) = std::sync::mpsc::channel::<()>();
        let upstream = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut heads = Vec::new();
            for _ in 0..2 {
                let (mut c, _) = l.accept().unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).unwrap() == 1 {
                    head.push(byte[0]);
                }
                c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .unwrap();
                heads.push(head.len());
                if heads.len() == 1 {
                    // Idle in the proxy's pool until the test says; then closed.
                    closed.recv().unwrap();
                } else {
                    // What else came on the second connection: nothing, until it closes.
                    let mut rest = Vec::new();
                    let _ = c.read_to_end(&mut rest);
                    heads.push(rest.len());
                }
            }
            heads
        });
        let r = send_http1(get(), to(addr)).await.ok().unwrap();
        assert_eq!(read_all(r).await, 2);
        close.send(()).unwrap();
        // Blocking, not awaiting: the close arrives, and the connection's task cannot run.
        std::thread::sleep(Duration::from_millis(200));
        // tokio's current-thread scheduler polls its I/O driver (the close makes the
        // connection's task ready to run) and then resumes this test before that task.
        tokio::task::yield_now().await;
        let r = match send_http1(get(), to(addr)).await {
            Ok(r) => r,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(read_all(r).await, 2);
        // Close the pool's connections to this upstream, so its thread sees the end.
        // (Joined off the runtime, which runs the connection's task that closes it.)
        IDLE.lock().unwrap().remove(&to(addr).pool_key());
        let heads = tokio::task::spawn_blocking(move || upstream.join().unwrap())
            .await
            .unwrap();
        assert!(heads[0] > 0 && heads[1] > 0, "{heads:?}");
        assert_eq!(
            heads[2], 0,
            "a second request on the new connection: {heads:?}"
        );
    }

    /// An upstream that answers 401 as soon as a request's head is in and then reads (and
    /// drops) whatever else comes, for ever. Counts connections.
    async fn early_answers() -> (SocketAddr, Arc<AtomicUsize>) {
        counting(|mut c| async move {
            if !read_head(&mut c).await {
                return;
            }
            let answer = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
            if c.write_all(answer).await.is_err() {
                return;
            }
            let mut chunk = [0u8; 1024];
            while matches!(c.read(&mut chunk).await, Ok(n) if n > 0) {}
        })
        .await
    }

    #[tokio::test]
    async fn a_connection_still_sending_its_request_is_not_waited_for() {
        let (addr, accepted) = early_answers().await;
        // An upload whose client stalls after its first piece: the answer comes first.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BodyError>>(1);
        tx.send(Ok(Frame::data(Bytes::from_static(b"first piece"))))
            .await
            .unwrap();
        let upload =
            http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let req = Request::post("/upload")
            .header("host", "up")
            .header("content-length", "1000000")
            .body(upload.boxed())
            .unwrap();
        let r = send_http1(req, to(addr)).await.ok().unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(read_all(r).await, 0);
        // The next request does not queue behind the stalled upload.
        let next = tokio::time::timeout(Duration::from_secs(5), send_http1(get(), to(addr)))
            .await
            .expect("the next request waited for the stalled upload's connection");
        assert_eq!(next.ok().unwrap().status(), StatusCode::UNAUTHORIZED);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        drop(tx);
    }

    #[tokio::test]
    async fn closed_connections_are_forgotten() {
        // An HTTP/2 upstream that takes the preface and closes; an HTTP/1.1 one that answers.
        let (h2, _) = counting(|mut c| async move {
            let mut preface = [0u8; 24];
            let _ = c.read_exact(&mut preface).await;
        })
        .await;
        let (h1, _) = upstream(usize::MAX).await;
        let r = send_http1(get(), to(h1)).await.ok().unwrap();
        read_all(r).await;
        let send = h2_connection(to(h2)).await.ok().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !send.is_closed() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(send.is_closed());
        let has = || {
            (
                IDLE.lock().unwrap().contains_key(&(h1, false)),
                H2_POOL.lock().unwrap().contains_key(&(h2, false)),
            )
        };
        assert_eq!(has(), (true, true));
        // The HTTP/1.1 one is still fresh, and stops being so at the idle timeout (reaping
        // then would close other tests' connections too).
        reap(Instant::now());
        assert_eq!(has(), (true, false));
        let idle = IDLE.lock().unwrap();
        let i = &idle[&(h1, false)][0];
        assert!(fresh(i, Instant::now()));
        assert!(!fresh(i, i.since + IDLE_TIMEOUT));
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_a_connection() {
        let (addr, accepted) = upstream(usize::MAX).await;
        let (a, b) = tokio::join!(send_http1(get(), to(addr)), send_http1(get(), to(addr)));
        let (a, b) = (a.ok().unwrap(), b.ok().unwrap());
        assert_eq!(read_all(a).await + read_all(b).await, 200_000);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        // Both went back: two more at once need no new connection.
        let (a, b) = tokio::join!(send_http1(get(), to(addr)), send_http1(get(), to(addr)));
        assert_eq!(
            read_all(a.ok().unwrap()).await + read_all(b.ok().unwrap()).await,
            200_000
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}

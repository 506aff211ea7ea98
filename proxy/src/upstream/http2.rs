//! Requests over HTTP/2 (h2c, prior knowledge): streams of the endpoint's shared connection,
//! sent with h2 directly. hyper's HTTP/2 client adds a dispatch task between the request and
//! the connection and a task per response, each a few task polls and wakes per request
//! (`cargo xtask profile`); here the request's own task opens the stream, and the response's
//! body reads it.

use std::{
    future::poll_fn,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::Bytes;
use futures_util::{
    future::{ready as done, Either},
    FutureExt, TryFutureExt,
};
use http_body_util::BodyExt;
use hyper::{
    body::{Body as _, Frame, SizeHint},
    header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING, UPGRADE},
    HeaderMap, Method, Request, Response, Uri, Version,
};

use super::{
    body::{Body, BodyError},
    pool,
    target::{Failure, Upstream},
};

fn reset(e: h2::Error) -> Failure {
    Failure::Reset(e.to_string())
}

/// Send `req` over the endpoint's HTTP/2 connection; the response's body streams. The
/// client's authority becomes `:authority`.
///
/// Combinators, not an async fn: each step's future takes the place of the one before (see
/// `pool::send_http1`).
pub fn send(
    req: Request<Body>,
    to: Upstream,
    authority: &str,
) -> impl std::future::Future<Output = Result<Response<Body>, Failure>> {
    let req = match for_http2(req, authority) {
        Ok(req) => req,
        Err(e) => return Either::Left(done(Err(e))),
    };
    let ready = pool::h2_connection(to).and_then(move |h| {
        h.ready().then(move |ready| match ready {
            Ok(send) => Either::Left(done(Ok(send))),
            // The connection went, or its peer is going away (GOAWAY), before this request's
            // stream: nothing was sent, so once more on a new connection.
            Err(_) => Either::Right(Box::pin(
                pool::h2_connection(to).and_then(|h| h.ready().map_err(reset)),
            )),
        })
    });
    Either::Right(ready.and_then(move |mut send| {
        let (head, body) = req.into_parts();
        let eos = body.is_end_stream();
        let opened = send
            .send_request(Request::from_parts(head, ()), eos)
            .map_err(reset);
        match opened {
            Ok((answer, stream)) => {
                if !eos {
                    tokio::spawn(pipe(body, stream));
                }
                Either::Left(answer.map(|resp| match resp {
                    Ok(resp) => {
                        let length = content_length(resp.headers());
                        Ok(resp.map(|stream| Recv::new(stream, length).boxed()))
                    }
                    Err(e) => Err(reset(e)),
                }))
            }
            Err(e) => Either::Right(done(Err(e))),
        }
    }))
}

/// `req` as an HTTP/2 request: its URI absolute (`:scheme`, `:authority`, `:path`), no `Host`,
/// none of the headers HTTP/2 forbids (the hop-by-hop ones the proxy keeps for an HTTP/1.1
/// upgrade, and `Transfer-Encoding`), and its length when its body's is known, as hyper's
/// client sends it.
fn for_http2(mut req: Request<Body>, authority: &str) -> Result<Request<Body>, Failure> {
    let host = if authority.is_empty() {
        "localhost"
    } else {
        authority
    };
    // An HTTP/2 client's request has this URI already.
    let uri = req.uri();
    let same = uri.scheme_str() == Some("http") && uri.authority().is_some_and(|a| a == host);
    if !same {
        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        *req.uri_mut() = format!("http://{host}{pq}")
            .parse::<Uri>()
            .map_err(|e| Failure::Reset(e.to_string()))?;
    }
    *req.version_mut() = Version::HTTP_2;
    let length = req.body().size_hint().exact();
    let payload = !matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    );
    let headers = req.headers_mut();
    headers.remove(HOST);
    strip_connection_headers(headers);
    if let Some(len) = length.filter(|&len| len != 0 || payload) {
        headers.entry(CONTENT_LENGTH).or_insert(len.into());
    }
    Ok(req)
}

/// Remove what HTTP/2 forbids that may be left after the proxy's hop-by-hop strip: an
/// upgrade's `Connection` and `Upgrade`, and `Transfer-Encoding`. One pass over the names; the
/// removals only where one is there.
fn strip_connection_headers(headers: &mut HeaderMap) {
    let forbidden = [CONNECTION, UPGRADE, TRANSFER_ENCODING];
    if headers.keys().any(|k| forbidden.contains(k)) {
        for name in forbidden {
            headers.remove(name);
        }
    }
}

/// A request body into its stream: each piece whole, with the stream's end on the last one
/// (as hyper's client sends it, no empty frame to end it), its trailers last. h2 queues a
/// piece and sends it as the peer's window allows; the next piece is read only once the stream
/// has some room, so a slow peer holds back at most a piece. A body that fails resets the
/// stream.
async fn pipe(mut body: Body, mut stream: h2::SendStream<Bytes>) {
    loop {
        if stream.capacity() == 0 {
            stream.reserve_capacity(1);
            loop {
                match poll_fn(|cx| stream.poll_capacity(cx)).await {
                    Some(Ok(0)) => {}
                    Some(Ok(_)) => break,
                    // Reset by the peer, or the connection went.
                    Some(Err(_)) | None => return,
                }
            }
        }
        let Some(frame) = body.frame().await else {
            let _ = stream.send_data(Bytes::new(), true);
            return;
        };
        let frame = match frame {
            Ok(frame) => frame,
            Err(_) => {
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
        };
        match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                if stream.send_data(data, end).is_err() || end {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                }
                return;
            }
        }
    }
}

/// A response's `Content-Length`, if it has one that parses.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A response's body from its HTTP/2 stream: its data (each piece's window given back as it
/// is read), then its trailers. Its size is what its `Content-Length` has left, if it had one.
struct Recv {
    stream: h2::RecvStream,
    left: Option<u64>,
    data_done: bool,
    done: bool,
}

impl Recv {
    fn new(stream: h2::RecvStream, left: Option<u64>) -> Recv {
        let done = stream.is_end_stream();
        Recv {
            stream,
            left,
            data_done: done,
            done,
        }
    }
}

impl hyper::body::Body for Recv {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    self.left = self.left.map(|n| n.saturating_sub(data.len() as u64));
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                None => self.data_done = true,
            }
        }
        let trailers = ready!(self.stream.poll_trailers(cx));
        self.done = true;
        Poll::Ready(match trailers {
            Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
            Ok(None) => None,
            Err(e) => Some(Err(e.into())),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.stream.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            _ if self.done => SizeHint::with_exact(0),
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::SocketAddr,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc,
        },
        time::Duration,
    };

    use futures_util::stream;
    use http_body_util::StreamBody;
    use hyper::StatusCode;
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::Direction;

    /// An h2c upstream answering each request with its body's length and the headers it got
    /// (by name), then a trailer.
    /// Also how many connections it accepted. `going_away`: a connection tells its peer it is
    /// going away (GOAWAY) as its first stream arrives; the first connection holds that
    /// stream's end (its trailers, so the connection stays) until the next connection comes.
    async fn counting_upstream(going_away: bool) -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let next = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                let first = count.fetch_add(1, Ordering::SeqCst) == 0;
                if !first {
                    next.notify_one();
                }
                let next = next.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.unwrap();
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        if going_away {
                            conn.graceful_shutdown();
                        }
                        let next = (going_away && first).then(|| next.clone());
                        tokio::spawn(answer(req, respond, next));
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// The request's body length, URI and header names; the trailer once `next` (if any) says.
    async fn answer(
        req: Request<h2::RecvStream>,
        mut respond: h2::server::SendResponse<Bytes>,
        next: Option<Arc<tokio::sync::Notify>>,
    ) {
        let (head, mut body) = req.into_parts();
        let mut n = 0;
        while let Some(data) = body.data().await {
            let data = data.unwrap();
            n += data.len();
            body.flow_control().release_capacity(data.len()).unwrap();
        }
        let mut names: Vec<&str> = head.headers.keys().map(|k| k.as_str()).collect();
        names.sort();
        let text = format!("{n} {} {}", head.uri, names.join(","));
        let resp = Response::builder()
            .header(CONTENT_LENGTH, text.len())
            .body(())
            .unwrap();
        let mut send = respond.send_response(resp, false).unwrap();
        send.send_data(Bytes::from(text), false).unwrap();
        if let Some(next) = next {
            next.notified().await;
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        send.send_trailers(trailers).unwrap();
    }

    fn get() -> Request<Body> {
        let body = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed();
        Request::get("/").body(body).unwrap()
    }

    fn to(addr: SocketAddr) -> Upstream {
        Upstream {
            addr,
            direction: Direction::Outbound,
            http2: true,
            connect_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn a_request_body_larger_than_the_window_goes_and_the_answer_keeps_its_trailers() {
        let (addr, _) = counting_upstream(false).await;
        // 3 MiB in 64 KiB pieces: more than the upstream's window (h2's default, 64 KiB).
        let pieces =
            (0..48).map(|_| Ok::<_, BodyError>(Frame::data(Bytes::from(vec![7; 64 << 10]))));
        let body = StreamBody::new(stream::iter(pieces.collect::<Vec<_>>())).boxed();
        // What an HTTP/1.1 client's upgrade leaves after the hop-by-hop strip, which HTTP/2
        // forbids, and a chunked request's Transfer-Encoding.
        let req = Request::post("/upload?x=1")
            .header(HOST, "up")
            .header(CONNECTION, "upgrade")
            .header(UPGRADE, "websocket")
            .header(TRANSFER_ENCODING, "chunked")
            .header("x-kept", "1")
            .body(body)
            .unwrap();
        let exchange = async {
            let resp = send(req, to(addr), "up.svc:80").await.ok().unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let size = resp.body().size_hint().exact();
            (size, resp.into_body().collect().await.unwrap())
        };
        let (size, got) = tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .expect("the upload stalled");
        let text = "3145728 http://up.svc:80/upload?x=1 x-kept";
        assert_eq!(size, Some(text.len() as u64));
        assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(got.to_bytes(), text);
    }

    #[tokio::test]
    async fn requests_share_the_endpoints_connection_and_an_empty_body_ends_the_stream() {
        let (addr, accepted) = counting_upstream(false).await;
        let (a, b) = tokio::join!(send(get(), to(addr), ""), send(get(), to(addr), ""));
        for resp in [a.ok().unwrap(), b.ok().unwrap()] {
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got, "0 http://localhost/ ");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_request_after_the_upstream_said_it_is_going_away_goes_on_a_new_connection() {
        let (addr, accepted) = counting_upstream(true).await;
        let exchange = async {
            // The first response's end waits for the second connection: its connection is
            // still open, going away, when the second request comes.
            let first = send(get(), to(addr), "").await.ok().unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            let second = send(get(), to(addr), "").await.ok().unwrap();
            for resp in [second, first] {
                let got = resp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(got, "0 http://localhost/ ");
            }
        };
        tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .expect("the second request waited for the first one's connection");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}

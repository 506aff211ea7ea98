//! HTTP/2 with prior knowledge (h2c) for the benchmark: keep-alive upstreams that answer every
//! stream with `200 ok` (`h2c-keepalive`), `bench-http --wire h2c`'s client and
//! `http-get --h2c`'s single GET.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{service::service_fn, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

use super::{load::micros, Args, Launch};

/// `h2c-keepalive`: h2c upstreams on `addrs`, one thread serving them all; every stream gets
/// `200 ok`. Prints "ready".
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct H2cKeepalive {
    pub addrs: Vec<SocketAddr>,
}

impl H2cKeepalive {
    pub fn run(self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut listeners = Vec::new();
            for addr in &self.addrs {
                let l = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                listeners.push(l);
            }
            super::say_ready()?;
            let serving: Vec<_> = listeners
                .into_iter()
                .map(|l| tokio::spawn(serve(l)))
                .collect();
            for s in serving {
                s.await?;
            }
            Ok(())
        })
    }
}

impl Launch for H2cKeepalive {
    const NAME: &'static str = "h2c-keepalive";

    fn args(&self) -> Args {
        self.addrs.iter().fold(Args::new(), Args::arg)
    }
}

/// Accept h2c connections on `l` and answer their streams.
async fn serve(l: TcpListener) {
    loop {
        let Ok((conn, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = conn.set_nodelay(true);
        tokio::spawn(async move {
            let ok = service_fn(|_req: Request<hyper::body::Incoming>| async {
                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(conn), ok)
                .await;
        });
    }
}

/// One h2c client's GETs of `host` at `dst` until `end`, one stream at a time: each one's
/// latency in µs. With `new_conn` every request has a connection (and handshake) of its own.
pub fn client(dst: SocketAddr, host: &str, new_conn: bool, end: Instant) -> Result<Vec<u32>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let uri: hyper::Uri = format!("http://{host}/").parse()?;
    rt.block_on(async {
        type Send = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;
        let open = || async {
            let s = TcpStream::connect(dst)
                .await
                .with_context(|| format!("connect {dst}"))?;
            s.set_nodelay(true)?;
            handshake(s).await
        };
        let mut conn: Option<Send> = if new_conn { None } else { Some(open().await?) };
        let mut lat = Vec::new();
        while Instant::now() < end {
            let t = Instant::now();
            let send = match &mut conn {
                Some(c) => c,
                slot => slot.insert(open().await?),
            };
            let req = Request::get(uri.clone()).body(Empty::new())?;
            let resp = send.send_request(req).await.context("an h2c request")?;
            if !resp.status().is_success() {
                bail!("h2c answer {}", resp.status());
            }
            resp.into_body().collect().await?;
            if new_conn {
                conn = None;
            }
            lat.push(micros(t));
        }
        Ok(lat)
    })
}

/// One h2c GET of `path` from `host` over `s` (connected already): the response as
/// "HTTP/2 <status>", a blank line and the body.
pub fn get(s: std::net::TcpStream, host: &str, path: &str) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let uri: hyper::Uri = format!("http://{host}{path}").parse()?;
    rt.block_on(async {
        s.set_nonblocking(true)?;
        let mut send = handshake(TcpStream::from_std(s)?).await?;
        let resp = send
            .send_request(Request::get(uri).body(Empty::<Bytes>::new())?)
            .await
            .context("an h2c request")?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(format!(
            "HTTP/2 {status}\r\n\r\n{}",
            String::from_utf8_lossy(&body)
        ))
    })
}

/// An h2c client connection over `s`, its connection task spawned.
async fn handshake<B>(s: TcpStream) -> Result<hyper::client::conn::http2::SendRequest<B>>
where
    B: hyper::body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .context("h2c handshake")?;
    tokio::spawn(conn);
    Ok(send)
}

//! gRPC over HTTP/2: an upstream serving the agent's API (`grpc-serve`) and clients of it
//! (`grpc-call`), for HTTP/2, trailers and upstream connection reuse through the proxy.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use anyhow::Result;

use super::{take_credentials, Args, ConnectSpec, Identity, Launch};
use crate::api::pb;

/// `grpc-serve`: a gRPC upstream on `addr`. Prints "ready" once bound.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct GrpcServe {
    pub addr: SocketAddr,
}

impl Launch for GrpcServe {
    const NAME: &'static str = "grpc-serve";

    fn args(&self) -> Args {
        Args::new().arg(self.addr)
    }
}

/// The agent's API as an upstream: Status answers with the number of connections accepted as
/// the cookie; Unregister fails with a status carried in trailers; the rest is not served.
struct Upstream(Arc<AtomicU64>);

/// What the upstream answers to the calls it does not serve.
fn not_served<T>() -> Result<tonic::Response<T>, tonic::Status> {
    Err(tonic::Status::unimplemented("test upstream"))
}

#[tonic::async_trait]
impl pb::agent_server::Agent for Upstream {
    async fn register(
        &self,
        _: tonic::Request<pb::RegisterRequest>,
    ) -> Result<tonic::Response<pb::PodReply>, tonic::Status> {
        not_served()
    }

    async fn update(
        &self,
        _: tonic::Request<pb::RegisterRequest>,
    ) -> Result<tonic::Response<pb::PodReply>, tonic::Status> {
        not_served()
    }

    async fn unregister(
        &self,
        _: tonic::Request<pb::UnregisterRequest>,
    ) -> Result<tonic::Response<pb::PodReply>, tonic::Status> {
        // An error travels in the trailers: the proxy must pass them on.
        Err(tonic::Status::permission_denied("trailers arrived"))
    }

    async fn status(
        &self,
        _: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::PodReply>, tonic::Status> {
        Ok(tonic::Response::new(pb::PodReply {
            netns_cookie: self.0.load(Ordering::Relaxed),
            registered: true,
        }))
    }

    async fn list(
        &self,
        _: tonic::Request<pb::ListRequest>,
    ) -> Result<tonic::Response<pb::ListReply>, tonic::Status> {
        not_served()
    }
}

impl GrpcServe {
    pub fn run(self) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(self.addr).await?;
            super::say_ready()?;
            let accepted = Arc::new(AtomicU64::new(0));
            let counter = accepted.clone();
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                move |c| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    c
                },
            );
            tonic::transport::Server::builder()
                .add_service(pb::agent_server::AgentServer::new(Upstream(accepted)))
                .serve_with_incoming(incoming)
                .await?;
            anyhow::Ok(())
        })
    }
}

/// `grpc-call`: gRPC calls through `dst` with `authority`: Status, then Unregister (which
/// fails with a status carried in trailers); prints both outcomes. With `together`, that many
/// clients connect first, then all call Status at once; prints how many calls succeeded.
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct GrpcCall {
    pub dst: SocketAddr,
    #[arg(long)]
    pub authority: String,
    /// Instead: this many clients connect, then all call Status at once; prints the
    /// number of calls that succeeded.
    #[arg(long)]
    pub together: Option<usize>,
    #[command(flatten)]
    pub id: Identity,
}

impl GrpcCall {
    /// One client's Status and Unregister through `dst` to `authority`, as `id`.
    pub fn new(dst: SocketAddr, authority: &str, id: Identity) -> GrpcCall {
        GrpcCall {
            dst,
            authority: authority.into(),
            together: None,
            id,
        }
    }

    pub fn run(self) -> Result<()> {
        take_credentials(&ConnectSpec::to(self.dst, self.id))?;
        let out = match self.together {
            None => self.status_then_unregister()?,
            Some(n) => self.calls_together(n)?,
        };
        println!("{out}");
        Ok(())
    }

    /// A client of the agent's API through `dst`, asking for `authority`.
    async fn client(&self) -> Result<pb::agent_client::AgentClient<tonic::transport::Channel>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.dst))?
            .origin(format!("http://{}", self.authority).parse()?)
            .connect()
            .await?;
        Ok(pb::agent_client::AgentClient::new(channel))
    }

    fn status_then_unregister(&self) -> Result<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut c = self.client().await?;
            let s = c.status(pb::StatusRequest {}).await?.into_inner();
            let u = c.unregister(pb::UnregisterRequest {}).await.unwrap_err();
            Ok(format!(
                "status cookie={} registered={}; unregister {:?}: {}",
                s.netns_cookie,
                s.registered,
                u.code(),
                u.message()
            ))
        })
    }

    /// `n` clients connect first, then all call Status at once (their requests reach the proxy
    /// together): "N of N calls succeeded".
    fn calls_together(&self, n: usize) -> Result<String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut clients = Vec::new();
            for _ in 0..n {
                clients.push(self.client().await?);
            }
            let go = Arc::new(tokio::sync::Barrier::new(n));
            let mut calls = tokio::task::JoinSet::new();
            for mut c in clients {
                let go = go.clone();
                calls.spawn(async move {
                    go.wait().await;
                    c.status(pb::StatusRequest {}).await
                });
            }
            let mut ok = 0;
            while let Some(r) = calls.join_next().await {
                ok += usize::from(matches!(r, Ok(Ok(_))));
            }
            anyhow::Ok(format!("{ok} of {n} calls succeeded"))
        })
    }
}

impl Launch for GrpcCall {
    const NAME: &'static str = "grpc-call";

    fn args(&self) -> Args {
        Args::new()
            .arg(self.dst)
            .opt("--authority", &self.authority)
            .opt_some("--together", self.together)
            .id(self.id)
    }
}

//! The registration API's service: each call acts on the network namespace its connection's
//! preamble carried ([`Caller`]), checked here before [`pods`] writes anything.

use std::{
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use sockmesh_api::pb;
use sockmesh_common::{NetnsCookie, PodFlags};
use tonic::Status;
use tracing::{info, warn};

use super::{
    pods::{self, State},
    routing,
    transport::Caller,
};
use crate::core::{
    loader,
    registry::{self, RegistryError},
    spec::PodSpec,
    sys,
};

/// The gRPC service: each call acts on the network namespace its connection's preamble carried.
pub struct Api {
    pub state: Arc<State>,
}

fn caller<T>(req: &tonic::Request<T>) -> Caller {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .unwrap_or_else(|| Caller {
            netns: None,
            peer: "unknown".into(),
        })
}

/// Run `f` (map writes, netlink) off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<tonic::Response<T>, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map(tonic::Response::new),
        Err(e) => Err(Status::internal(format!("request handler failed: {e}"))),
    }
}

fn refused(peer: &str, status: Status) -> Status {
    warn!(peer, code = ?status.code(), error = status.message(), "request refused");
    status
}

impl Api {
    /// Register, or with `existing_only` update, the caller's pod.
    async fn apply(
        &self,
        req: tonic::Request<pb::RegisterRequest>,
        existing_only: bool,
    ) -> Result<tonic::Response<pb::PodReply>, Status> {
        let caller = caller(&req);
        let settings = req.into_inner().settings.ok_or_else(|| {
            refused(
                &caller.peer,
                Status::invalid_argument("settings: missing (RegisterRequest.settings)"),
            )
        })?;
        let spec = PodSpec::try_from(settings)
            .map_err(|e| e.to_string())
            .and_then(|s| s.validate().map(|()| s).map_err(|e| e.to_string()))
            .map_err(|e| {
                refused(
                    &caller.peer,
                    Status::invalid_argument(format!("invalid settings: {e}")),
                )
            })?;
        let state = self.state.clone();
        blocking(move || {
            let (netns, fd) = pod_netns(&state, &caller).map_err(|s| refused(&caller.peer, s))?;
            if existing_only {
                let maps = state.maps.lock().expect("maps lock");
                if maps.pod(netns).is_none() {
                    return Err(refused(
                        &caller.peer,
                        Status::not_found(format!(
                            "netns cookie {netns} is not registered: Register it first"
                        )),
                    ));
                }
            }
            pods::register(&state, netns, fd.as_fd(), &spec).map_err(|e| {
                let status = match e {
                    pods::RegisterError::Registry(RegistryError::Full { .. }) => {
                        Status::resource_exhausted(e.to_string())
                    }
                    _ => Status::failed_precondition(e.to_string()),
                };
                refused(&caller.peer, status)
            })?;
            let what = if existing_only {
                "pod updated"
            } else {
                "pod registered"
            };
            info!(peer = caller.peer, %netns, "{what}");
            Ok(pb::PodReply {
                netns_cookie: netns.get(),
                registered: true,
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for Api {
    async fn register(
        &self,
        req: tonic::Request<pb::RegisterRequest>,
    ) -> Result<tonic::Response<pb::PodReply>, Status> {
        self.apply(req, false).await
    }

    async fn update(
        &self,
        req: tonic::Request<pb::RegisterRequest>,
    ) -> Result<tonic::Response<pb::PodReply>, Status> {
        self.apply(req, true).await
    }

    async fn unregister(
        &self,
        req: tonic::Request<pb::UnregisterRequest>,
    ) -> Result<tonic::Response<pb::PodReply>, Status> {
        let caller = caller(&req);
        let state = self.state.clone();
        blocking(move || {
            let (netns, fd) = pod_netns(&state, &caller).map_err(|s| refused(&caller.peer, s))?;
            let mut maps = state.maps.lock().expect("maps lock");
            let before = maps.pod(netns);
            let result = registry::unregister(&mut maps, netns);
            loader::detach_netns(&state.bpffs, netns);
            if let Some(c) = before.filter(|c| c.has(PodFlags::TPROXY)) {
                let _ = routing::tproxy_routing(
                    fd.as_fd(),
                    c.tproxy_mark,
                    c.tproxy_table,
                    c.has(PodFlags::IPV6),
                    false,
                );
            }
            let was = result.map_err(|e| refused(&caller.peer, Status::internal(e.to_string())))?;
            info!(
                peer = caller.peer,
                %netns,
                was_registered = was,
                "pod unregistered"
            );
            Ok(pb::PodReply {
                netns_cookie: netns.get(),
                registered: false,
            })
        })
        .await
    }

    async fn status(
        &self,
        req: tonic::Request<pb::StatusRequest>,
    ) -> Result<tonic::Response<pb::PodReply>, Status> {
        let caller = caller(&req);
        let state = self.state.clone();
        blocking(move || {
            if caller.netns.is_none() {
                return Ok(pb::PodReply::default());
            }
            let (netns, _) = pod_netns(&state, &caller)?;
            let maps = state.maps.lock().expect("maps lock");
            Ok(pb::PodReply {
                netns_cookie: netns.get(),
                registered: maps.pod(netns).is_some(),
            })
        })
        .await
    }

    async fn list(
        &self,
        _req: tonic::Request<pb::ListRequest>,
    ) -> Result<tonic::Response<pb::ListReply>, Status> {
        let state = self.state.clone();
        blocking(move || {
            let maps = state.maps.lock().expect("maps lock");
            let netns_cookies = maps
                .pod_cookies()
                .map_err(|e| Status::internal(format!("reading the pods map: {e}")))?
                .into_iter()
                .map(NetnsCookie::get)
                .collect();
            Ok(pb::ListReply { netns_cookies })
        })
        .await
    }
}

/// The caller's pod: its netns cookie and fd, from the connection's preamble.
fn pod_netns(state: &State, caller: &Caller) -> Result<(NetnsCookie, Arc<OwnedFd>), Status> {
    let fd = caller.netns.clone().ok_or_else(|| {
        Status::unauthenticated(
            "no network namespace fd came with the connection's preamble (send \
             /proc/self/ns/net with SCM_RIGHTS; sockmesh init does)",
        )
    })?;
    if !sys::is_netns_fd(&*fd) {
        return Err(Status::unauthenticated(
            "the fd sent with the preamble is not a network namespace",
        ));
    }
    let cookie = sys::netns_cookie(fd.as_fd()).map_err(|e| Status::internal(e.to_string()))?;
    if cookie == state.own_netns {
        return Err(Status::permission_denied(
            "refusing to capture the agent's own network namespace (the node's): only pod \
             namespaces can be registered",
        ));
    }
    Ok((cookie, fd))
}

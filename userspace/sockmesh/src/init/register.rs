//! Registering the pod with the agent (or, with `--cleanup-only`, unregistering it) over the
//! registration API, speaking for the pod's network namespace.

use std::{
    io::Write,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    time::Duration,
};

use sockmesh_api::pb;

use super::action::InitAction;
use crate::core::spec::PodSpec;

/// How long the agent has to answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the agent did not put the pod's capture in force.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "cannot reach the sockmesh agent at {}: {detail}: start it (sockmesh agent) and make \
         its socket available here (--agent-socket / SOCKMESH_AGENT_SOCKET)",
        .sock.display()
    )]
    Unreachable { sock: PathBuf, detail: String },
    #[error(
        "the sockmesh agent at {} did not answer within {}s: it may be overloaded; the \
         registration may still complete, run init again to be sure",
        .sock.display(),
        AGENT_TIMEOUT.as_secs()
    )]
    Timeout { sock: PathBuf },
    #[error("the agent refused ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Register `spec` for the netns `netns` (or unregister it), as `action` says; reports the
/// outcome on `out`.
pub fn apply(
    action: &InitAction,
    spec: &PodSpec,
    netns: &OwnedFd,
    out: &mut dyn Write,
) -> Result<(), AgentError> {
    let sock = &action.agent_socket;
    let unreachable = |detail: String| AgentError::Unreachable {
        sock: sock.clone(),
        detail,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    let call = async {
        let mut client = sockmesh_api::connect(sock, Some(netns.as_fd()))
            .await
            .map_err(|e| unreachable(source_chain(&e)))?;
        let reply = if action.cleanup_only {
            client.unregister(pb::UnregisterRequest {}).await
        } else {
            client
                .register(pb::RegisterRequest {
                    settings: Some(pb::PodSettings::from(spec)),
                })
                .await
        };
        reply.map(|r| r.into_inner()).map_err(|status| {
            if status.code() == tonic::Code::Unavailable {
                unreachable(status.message().to_string())
            } else {
                AgentError::Refused {
                    code: status.code(),
                    message: status.message().to_string(),
                }
            }
        })
    };
    let reply = rt
        .block_on(async { tokio::time::timeout(AGENT_TIMEOUT, call).await })
        .map_err(|_| AgentError::Timeout { sock: sock.clone() })??;
    let cookie = reply.netns_cookie;
    if action.cleanup_only {
        let _ = writeln!(out, "sockmesh: capture removed for netns cookie {cookie}");
    } else {
        let _ = writeln!(out, "sockmesh: capture in force for netns cookie {cookie}");
    }
    Ok(())
}

/// An error and its causes, "a: b: c".
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

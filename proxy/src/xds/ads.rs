//! The ADS client: one aggregated xDS stream, state of the world, reconnected with a backoff.
//!
//! Each response is offered to what installs resources ([`Install`]); the answer is an ACK
//! when they are in force and a NACK (with the reason) when they are refused.

use std::{collections::BTreeMap, collections::BTreeSet, fmt::Display, time::Duration};

use envoy_types::pb::{
    envoy::{
        config::core::v3 as core,
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DiscoveryRequest, DiscoveryResponse,
        },
    },
    google::{protobuf::Any, rpc::Status},
};
use tracing::{info, warn};

use super::{error::Error, kind::Kind, resources::Resources};
use crate::config::XdsSettings;

/// Puts a control plane's resources in force (with everything else, whole) or refuses them.
pub trait Install {
    /// Why resources are refused; its message goes back in the NACK.
    type Error: Display + From<Error>;

    /// The control plane's resources in force.
    fn in_force(&self) -> Resources;

    /// Put `next` in force instead of the resources in force, or refuse it and keep them.
    fn install(&self, next: Resources) -> Result<(), Self::Error>;
}

/// The client's view of the stream: per type, the version in force and the last nonce.
#[derive(Default)]
struct Stream {
    version: BTreeMap<Kind, String>,
    nonce: BTreeMap<Kind, String>,
    /// Names asked for (endpoints and routes).
    asked: BTreeMap<Kind, BTreeSet<String>>,
}

/// Follow the control plane for the life of the process: reconnect with a backoff when the
/// stream ends; the resources in force stay meanwhile, as Envoy keeps them.
pub async fn run<I: Install>(settings: XdsSettings, installer: I) {
    const FIRST: Duration = Duration::from_millis(250);
    let mut backoff = FIRST;
    loop {
        let mut answered = false;
        match session(&settings, &installer, &mut answered).await {
            Ok(()) => warn!(
                address = settings.address,
                "xDS stream closed by the control plane"
            ),
            Err(e) => warn!(address = settings.address, "xDS stream: {e:#}"),
        }
        // A stream that got answers starts the backoff over.
        if answered {
            backoff = FIRST;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// A gRPC channel to `address`: `unix:PATH` or `http://HOST:PORT`.
async fn channel(address: &str) -> anyhow::Result<tonic::transport::Channel> {
    if let Some(path) = address.strip_prefix("unix:") {
        let path = std::path::PathBuf::from(path);
        // The URI is required by the builder and ignored by the connector.
        let ch = tonic::transport::Endpoint::from_static("http://xds")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(&path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await?;
        return Ok(ch);
    }
    Ok(
        tonic::transport::Endpoint::from_shared(address.to_string())?
            .connect()
            .await?,
    )
}

/// One stream, until it ends or fails; `answered` tells whether a response came.
async fn session<I: Install>(
    settings: &XdsSettings,
    installer: &I,
    answered: &mut bool,
) -> anyhow::Result<()> {
    let ch = channel(&settings.address).await?;
    let mut client = AggregatedDiscoveryServiceClient::new(ch);
    let (tx, rx) = tokio::sync::mpsc::channel::<DiscoveryRequest>(16);
    let node = core::Node {
        id: settings.node_id.clone(),
        cluster: settings.node_cluster.clone(),
        user_agent_name: "sockmesh-proxy".into(),
        ..Default::default()
    };
    let mut st = Stream::default();
    let current = installer.in_force();
    let request = |st: &Stream, kind: Kind, error: Option<String>| DiscoveryRequest {
        version_info: st.version.get(&kind).cloned().unwrap_or_default(),
        node: Some(node.clone()),
        resource_names: st
            .asked
            .get(&kind)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default(),
        type_url: kind.type_url(),
        response_nonce: st.nonce.get(&kind).cloned().unwrap_or_default(),
        error_detail: error.map(|message| Status {
            code: tonic::Code::InvalidArgument as i32,
            message,
            details: Vec::new(),
        }),
        ..Default::default()
    };
    // Ask for clusters and listeners (and what they named, on a reconnect).
    for kind in Kind::ALL {
        if kind.wildcard() || !current.wanted(kind).is_empty() {
            st.asked.insert(kind, current.wanted(kind));
            tx.send(request(&st, kind, None)).await?;
        }
    }
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    info!(
        address = settings.address,
        node = settings.node_id,
        "xDS stream open"
    );
    while let Some(resp) = responses.message().await? {
        *answered = true;
        let DiscoveryResponse {
            version_info,
            resources,
            type_url,
            nonce,
            ..
        } = resp;
        let Some(kind) = Kind::of(&type_url) else {
            warn!(type_url, "xDS: a resource type not asked for: ignored");
            continue;
        };
        st.nonce.insert(kind, nonce);
        let wanted = st.asked.get(&kind).cloned().unwrap_or_default();
        match offer(installer, kind, &resources, &wanted) {
            Ok(next) => {
                info!(
                    ?kind,
                    version = version_info,
                    resources = resources.len(),
                    "xDS: in force (ACK)"
                );
                st.version.insert(kind, version_info);
                tx.send(request(&st, kind, None)).await?;
                // New names to ask for: the endpoints of new EDS clusters, the routes of new
                // listeners.
                for follow in [Kind::Endpoint, Kind::Route] {
                    let wanted = next.wanted(follow);
                    if st.asked.get(&follow) != Some(&wanted) {
                        st.asked.insert(follow, wanted);
                        tx.send(request(&st, follow, None)).await?;
                    }
                }
            }
            Err(e) => {
                warn!(
                    ?kind,
                    version = version_info,
                    "xDS: refused (NACK), the previous resources stay: {e}"
                );
                tx.send(request(&st, kind, Some(e.to_string()))).await?;
            }
        }
    }
    Ok(())
}

/// The resources in force with a response's resources of `kind` taken in, once installed.
fn offer<I: Install>(
    installer: &I,
    kind: Kind,
    resources: &[Any],
    wanted: &BTreeSet<String>,
) -> Result<Resources, I::Error> {
    let mut next = installer.in_force();
    next.take(kind, resources, wanted)?;
    installer.install(next.clone())?;
    Ok(next)
}

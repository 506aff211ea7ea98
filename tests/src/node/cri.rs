//! kubelet's side of CRI v1: the calls the node suite makes on containerd's socket, in the order
//! kubelet makes them.

use std::{collections::HashMap, path::Path, time::Duration};

use anyhow::{bail, Context, Result};
pub use k8s_cri::v1 as api;
use k8s_cri::v1::{
    image_service_client::ImageServiceClient, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::Channel;

/// A CRI client on a runtime's socket.
#[derive(Clone)]
pub struct Cri {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// A pod sandbox that runs: its id, the config it was made from, its IP (none on the node's
/// network).
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub id: String,
    pub config: api::PodSandboxConfig,
    pub ip: Option<String>,
}

/// How a container ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub reason: String,
}

impl Cri {
    /// Connect to the runtime at `sock` and check that it speaks CRI v1.
    pub async fn connect(sock: &Path) -> Result<Cri> {
        let sock = sock.to_path_buf();
        // The URI is required by the builder and ignored by the connector.
        let channel = tonic::transport::Endpoint::from_static("http://cri")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let sock = sock.clone();
                async move {
                    let io = tokio::net::UnixStream::connect(&sock).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
                }
            }))
            .await
            .context("connecting to the runtime's CRI socket")?;
        let mut cri = Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        };
        let v = cri
            .runtime
            .version(api::VersionRequest {
                version: "v1".into(),
            })
            .await
            .context("CRI Version")?
            .into_inner();
        if v.runtime_api_version != "v1" {
            bail!("the runtime speaks CRI {}, not v1", v.runtime_api_version);
        }
        Ok(cri)
    }

    /// The runtime's name and version, as `crictl version` prints them.
    pub async fn version(&mut self) -> Result<String> {
        let v = self
            .runtime
            .version(api::VersionRequest {
                version: "v1".into(),
            })
            .await?
            .into_inner();
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// Whether the runtime holds `image` (kubelet's IfNotPresent check: nothing is pulled here).
    pub async fn has_image(&mut self, image: &str) -> Result<bool> {
        let r = self
            .images
            .image_status(api::ImageStatusRequest {
                image: Some(image_spec(image)),
                verbose: false,
            })
            .await
            .context("CRI ImageStatus")?
            .into_inner();
        Ok(r.image.is_some())
    }

    /// RunPodSandbox, then PodSandboxStatus for its IP.
    pub async fn run_pod(&mut self, config: api::PodSandboxConfig) -> Result<Sandbox> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self
            .runtime
            .run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .map_err(|s| status_error(s, &format!("RunPodSandbox {name}")))?
            .into_inner()
            .pod_sandbox_id;
        let status = self
            .runtime
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: false,
            })
            .await
            .map_err(|s| status_error(s, "PodSandboxStatus"))?
            .into_inner()
            .status
            .context("PodSandboxStatus without a status")?;
        let ip = status.network.map(|n| n.ip).filter(|ip| !ip.is_empty());
        Ok(Sandbox { id, config, ip })
    }

    /// CreateContainer then StartContainer; the container's id.
    pub async fn start(&mut self, pod: &Sandbox, config: api::ContainerConfig) -> Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let id = self
            .runtime
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config),
                sandbox_config: Some(pod.config.clone()),
            })
            .await
            .map_err(|s| status_error(s, &format!("CreateContainer {name}")))?
            .into_inner()
            .container_id;
        self.runtime
            .start_container(api::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .map_err(|s| status_error(s, &format!("StartContainer {name}")))?;
        Ok(id)
    }

    /// The container's status.
    pub async fn status(&mut self, id: &str) -> Result<api::ContainerStatus> {
        self.runtime
            .container_status(api::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .map_err(|s| status_error(s, "ContainerStatus"))?
            .into_inner()
            .status
            .context("ContainerStatus without a status")
    }

    /// The container's exit, once it has exited (None while it runs).
    pub async fn exit(&mut self, id: &str) -> Result<Option<Exit>> {
        let s = self.status(id).await?;
        Ok(
            (s.state == api::ContainerState::ContainerExited as i32).then(|| Exit {
                code: s.exit_code,
                reason: format!("{} {}", s.reason, s.message).trim().to_string(),
            }),
        )
    }

    /// Wait up to `limit` for the container to exit (an init container runs to completion
    /// before the next starts).
    pub async fn wait_exit(&mut self, id: &str, limit: Duration) -> Result<Exit> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            if let Some(e) = self.exit(id).await? {
                return Ok(e);
            }
            if tokio::time::Instant::now() > until {
                bail!("container {id} still runs after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// StopContainer with a grace period (kubelet's terminationGracePeriodSeconds).
    pub async fn stop(&mut self, id: &str, grace_secs: i64) -> Result<()> {
        self.runtime
            .stop_container(api::StopContainerRequest {
                container_id: id.into(),
                timeout: grace_secs,
            })
            .await
            .map_err(|s| status_error(s, "StopContainer"))?;
        Ok(())
    }

    /// RemoveContainer.
    pub async fn remove(&mut self, id: &str) -> Result<()> {
        self.runtime
            .remove_container(api::RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .map_err(|s| status_error(s, "RemoveContainer"))?;
        Ok(())
    }

    /// ExecSync: run `cmd` in the container; its exit code, stdout and stderr.
    pub async fn exec(&mut self, id: &str, cmd: &[&str], timeout_secs: i64) -> Result<Exec> {
        let r = self
            .runtime
            .exec_sync(api::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: timeout_secs,
            })
            .await
            .map_err(|s| status_error(s, &format!("ExecSync {cmd:?}")))?
            .into_inner();
        Ok(Exec {
            code: r.exit_code,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        })
    }

    /// StopPodSandbox then RemovePodSandbox, as kubelet deletes a pod.
    pub async fn delete_pod(&mut self, pod_id: &str) -> Result<()> {
        self.runtime
            .stop_pod_sandbox(api::StopPodSandboxRequest {
                pod_sandbox_id: pod_id.into(),
            })
            .await
            .map_err(|s| status_error(s, "StopPodSandbox"))?;
        self.runtime
            .remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: pod_id.into(),
            })
            .await
            .map_err(|s| status_error(s, "RemovePodSandbox"))?;
        Ok(())
    }

    /// Every sandbox the runtime has, by id.
    pub async fn pods(&mut self) -> Result<Vec<String>> {
        Ok(self
            .runtime
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
            .await
            .map_err(|s| status_error(s, "ListPodSandbox"))?
            .into_inner()
            .items
            .into_iter()
            .map(|p| p.id)
            .collect())
    }

    /// The pid of a sandbox's pause process (from the verbose status's info): its
    /// /proc/PID/ns/net is the pod's network namespace.
    pub async fn sandbox_pid(&mut self, id: &str) -> Result<u32> {
        let r = self
            .runtime
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            })
            .await
            .map_err(|s| status_error(s, "PodSandboxStatus"))?
            .into_inner();
        info_pid(&r.info)
    }

    /// The pid of a running container's first process (from the verbose status's info).
    pub async fn pid(&mut self, id: &str) -> Result<u32> {
        let r = self
            .runtime
            .container_status(api::ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            })
            .await
            .map_err(|s| status_error(s, "ContainerStatus"))?
            .into_inner();
        info_pid(&r.info)
    }
}

/// The `pid` in a verbose status's `info` JSON.
fn info_pid(info: &HashMap<String, String>) -> Result<u32> {
    let info: serde_json::Value =
        serde_json::from_str(info.get("info").context("a verbose status without info")?)?;
    info["pid"]
        .as_u64()
        .map(|p| p as u32)
        .with_context(|| format!("no pid in the status's info: {info}"))
}

/// What ExecSync returned.
#[derive(Clone, Debug)]
pub struct Exec {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// An image reference as CRI takes it.
pub fn image_spec(image: &str) -> api::ImageSpec {
    api::ImageSpec {
        image: image.into(),
        annotations: HashMap::new(),
        user_specified_image: image.into(),
        runtime_handler: String::new(),
    }
}

fn status_error(s: tonic::Status, call: &str) -> anyhow::Error {
    anyhow::anyhow!("CRI {call}: {:?}: {}", s.code(), s.message())
}

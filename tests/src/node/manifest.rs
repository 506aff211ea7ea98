//! From Kubernetes pod specs to CRI calls, as kubelet turns them: the manifests under deploy/
//! rendered with kustomize, Istio's injection merged by strategic merge, and each container's
//! args, env, mounts, security context and resources carried into a CRI config.
//!
//! Only what the pods of this repository use is read; any other field a container sets is an
//! error here, so that a manifest never asks for something the test silently drops.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

use super::cri::{api, image_spec};

/// `kubectl kustomize DIR`: every resource it renders.
pub fn render(dir: &Path) -> Result<Vec<Value>> {
    let out = crate::lab::run(Command::new("kubectl").arg("kustomize").arg(dir))
        .with_context(|| format!("kubectl kustomize {}", dir.display()))?;
    let text = String::from_utf8(out.stdout)?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// The resource of `kind` named `name` among `docs`.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .with_context(|| format!("no {kind} {name} in the rendered manifests"))
}

/// A pod as kubelet receives it: metadata and spec.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub labels: Mapping,
    pub annotations: Mapping,
    pub spec: Value,
}

impl Pod {
    /// The pod a DaemonSet (or any workload) template makes, named `name`.
    pub fn from_template(workload: &Value, name: &str) -> Result<Pod> {
        let t = &workload["spec"]["template"];
        if t.is_null() {
            bail!("{:?} has no pod template", workload["metadata"]["name"]);
        }
        Ok(Pod {
            name: name.into(),
            namespace: workload["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .into(),
            labels: t["metadata"]["labels"]
                .as_mapping()
                .cloned()
                .unwrap_or_default(),
            annotations: t["metadata"]["annotations"]
                .as_mapping()
                .cloned()
                .unwrap_or_default(),
            spec: t["spec"].clone(),
        })
    }

    /// A pod from a whole Pod document.
    pub fn from_doc(doc: &Value) -> Result<Pod> {
        Ok(Pod {
            name: doc["metadata"]["name"]
                .as_str()
                .context("a pod without a name")?
                .into(),
            namespace: doc["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .into(),
            labels: doc["metadata"]["labels"]
                .as_mapping()
                .cloned()
                .unwrap_or_default(),
            annotations: doc["metadata"]["annotations"]
                .as_mapping()
                .cloned()
                .unwrap_or_default(),
            spec: doc["spec"].clone(),
        })
    }

    pub fn host_network(&self) -> bool {
        self.spec["hostNetwork"].as_bool().unwrap_or(false)
    }

    /// The init containers, in order.
    pub fn init_containers(&self) -> Vec<&Value> {
        seq(&self.spec["initContainers"])
    }

    /// The containers, in order.
    pub fn containers(&self) -> Vec<&Value> {
        seq(&self.spec["containers"])
    }

    /// The container (init or not) named `name`.
    pub fn container(&self, name: &str) -> Result<&Value> {
        self.init_containers()
            .into_iter()
            .chain(self.containers())
            .find(|c| c["name"].as_str() == Some(name))
            .with_context(|| format!("pod {} has no container {name}", self.name))
    }

    /// Replace every container's image `from` by `to` (a second tag of the same image).
    pub fn set_image(&mut self, container: &str, image: &str) {
        for list in ["initContainers", "containers"] {
            if let Some(s) = self.spec[list].as_sequence_mut() {
                for c in s {
                    if c["name"].as_str() == Some(container) {
                        c["image"] = Value::from(image);
                    }
                }
            }
        }
    }
}

fn seq(v: &Value) -> Vec<&Value> {
    v.as_sequence()
        .map(|s| s.iter().collect())
        .unwrap_or_default()
}

fn str_map(m: &Mapping) -> HashMap<String, String> {
    m.iter()
        .filter_map(|(k, v)| Some((k.as_str()?.to_string(), scalar(v)?)))
        .collect()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Istio's injector merges each template into the pod with a strategic merge patch: maps
/// merge, lists of named things merge by their key (containers, volumes and env by `name`,
/// volume mounts by `mountPath`), other lists are replaced.
pub fn strategic_merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Mapping(b), Value::Mapping(p)) => {
            for (k, pv) in p {
                let key = k.as_str().unwrap_or_default();
                match b.get_mut(k) {
                    Some(bv) => match (merge_key(key), bv, pv) {
                        (Some(mk), Value::Sequence(bs), Value::Sequence(ps)) => {
                            for item in ps {
                                let id = &item[mk];
                                match bs.iter_mut().find(|x| &x[mk] == id) {
                                    Some(x) => strategic_merge(x, item),
                                    None => bs.push(item.clone()),
                                }
                            }
                        }
                        (_, bv, pv) => strategic_merge(bv, pv),
                    },
                    None => {
                        b.insert(k.clone(), pv.clone());
                    }
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers" | "initContainers" | "volumes" | "env" => Some("name"),
        "volumeMounts" => Some("mountPath"),
        _ => None,
    }
}

/// Where the node's host paths are. A manifest's hostPath is found under `root` (so the test
/// never touches the machine's /etc/cni, /opt/cni or /run), except the cgroup2 root, which
/// is the test's child cgroup holding the pods, and the bpffs, which is the test's own mount.
#[derive(Clone, Debug)]
pub struct HostPaths {
    pub root: PathBuf,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
}

impl HostPaths {
    /// The node's path for a manifest's `hostPath`.
    pub fn resolve(&self, host_path: &str) -> PathBuf {
        let under = |base: &str| {
            host_path
                .strip_prefix(base)
                .map(|r| r.trim_start_matches('/').to_string())
        };
        if let Some(r) = under("/sys/fs/cgroup") {
            return self.cgroup.join(r);
        }
        if let Some(r) = under("/sys/fs/bpf") {
            return self.bpffs.join(r);
        }
        self.root.join(host_path.trim_start_matches('/'))
    }
}

/// What the node gives a pod besides its spec: where it lives, its config files.
pub struct PodPlace {
    pub host: HostPaths,
    /// cgroupfs path of the pod's cgroup parent, e.g. `/smt-node-1/pods/agent`.
    pub cgroup_parent: String,
    /// The pod's folder on the node (logs, emptyDir and configMap volumes).
    pub dir: PathBuf,
    /// configMap volumes: name → folder holding its files.
    pub config_maps: HashMap<String, PathBuf>,
}

/// A readiness probe as kubelet polls it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProbe {
    pub path: String,
    pub port: u16,
}

/// The pod's sandbox config, as kubelet builds it.
pub fn sandbox_config(pod: &Pod, place: &PodPlace, attempt: u32) -> api::PodSandboxConfig {
    let network = if pod.host_network() {
        api::NamespaceMode::Node
    } else {
        api::NamespaceMode::Pod
    };
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: pod.name.clone(),
            uid: format!("{}-{}-uid", pod.namespace, pod.name),
            namespace: pod.namespace.clone(),
            attempt,
        }),
        // kubelet names the host of a pod with its own network only: a hostNetwork pod
        // shares the node's UTS namespace.
        hostname: if pod.host_network() {
            String::new()
        } else {
            pod.name.clone()
        },
        log_directory: place.dir.join("logs").to_string_lossy().into_owned(),
        labels: str_map(&pod.labels),
        annotations: str_map(&pod.annotations),
        linux: Some(api::LinuxPodSandboxConfig {
            cgroup_parent: place.cgroup_parent.clone(),
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    network: network as i32,
                    pid: api::NamespaceMode::Container as i32,
                    ipc: api::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One container's CRI config, with exactly what its spec asks for. Host folders of
/// `DirectoryOrCreate` volumes are made, as kubelet makes them.
pub fn container_config(
    pod: &Pod,
    container: &Value,
    place: &PodPlace,
) -> Result<api::ContainerConfig> {
    let name = container["name"]
        .as_str()
        .context("a container without a name")?;
    let what = format!("pod {} container {name}", pod.name);
    check_known(container, &what)?;
    let strings = |v: &Value| -> Vec<String> { seq(v).into_iter().filter_map(scalar).collect() };
    let mut envs = Vec::new();
    for e in seq(&container["env"]) {
        if !e["valueFrom"].is_null() {
            bail!(
                "{what}: env {:?} uses valueFrom, which the node suite does not fill",
                e["name"]
            );
        }
        envs.push(api::KeyValue {
            key: e["name"].as_str().context("env without a name")?.into(),
            value: scalar(&e["value"]).unwrap_or_default(),
        });
    }
    let mut mounts = Vec::new();
    for m in seq(&container["volumeMounts"]) {
        mounts.push(mount(pod, m, place, &what)?);
    }
    let sc = security_context(pod, container, &what)?;
    let image = container["image"]
        .as_str()
        .context("a container without an image")?;
    Ok(api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(image_spec(image)),
        command: strings(&container["command"]),
        args: strings(&container["args"]),
        envs,
        mounts,
        log_path: format!("{name}.log"),
        linux: Some(api::LinuxContainerConfig {
            resources: Some(resources(container)?),
            security_context: Some(sc),
        }),
        ..Default::default()
    })
}

/// The fields a container of this repository may set; anything else is an error.
fn check_known(container: &Value, what: &str) -> Result<()> {
    const KNOWN: &[&str] = &[
        "name",
        "image",
        "command",
        "args",
        "env",
        "ports",
        "volumeMounts",
        "securityContext",
        "resources",
        "livenessProbe",
        "readinessProbe",
        "imagePullPolicy",
    ];
    for k in container.as_mapping().into_iter().flat_map(|m| m.keys()) {
        let k = k.as_str().unwrap_or_default();
        if !KNOWN.contains(&k) {
            bail!("{what}: field {k} is not carried by the node suite");
        }
    }
    Ok(())
}

fn mount(pod: &Pod, m: &Value, place: &PodPlace, what: &str) -> Result<api::Mount> {
    let vname = m["name"].as_str().context("volumeMount without a name")?;
    let volume = seq(&pod.spec["volumes"])
        .into_iter()
        .find(|v| v["name"].as_str() == Some(vname))
        .with_context(|| format!("{what}: no volume {vname}"))?;
    let host_path = if let Some(path) = volume["hostPath"]["path"].as_str() {
        let p = place.host.resolve(path);
        match volume["hostPath"]["type"].as_str().unwrap_or("") {
            "DirectoryOrCreate" => std::fs::create_dir_all(&p)
                .with_context(|| format!("{what}: creating hostPath {}", p.display()))?,
            "Directory" if !p.is_dir() => {
                bail!(
                    "{what}: hostPath {path} ({}) is not a directory",
                    p.display()
                )
            }
            "Directory" | "" => {}
            other => bail!("{what}: hostPath type {other} is not carried by the node suite"),
        }
        p
    } else if let Some(cm) = volume["configMap"]["name"].as_str() {
        place
            .config_maps
            .get(cm)
            .cloned()
            .with_context(|| format!("{what}: configMap {cm} was not given to the node"))?
    } else if volume.get("emptyDir").is_some() {
        let p = place.dir.join("volumes").join(vname);
        std::fs::create_dir_all(&p)?;
        p
    } else {
        bail!("{what}: volume {vname} is of a kind the node suite does not carry");
    };
    let propagation = match m["mountPropagation"].as_str() {
        None | Some("None") => api::MountPropagation::PropagationPrivate,
        Some("HostToContainer") => api::MountPropagation::PropagationHostToContainer,
        Some("Bidirectional") => api::MountPropagation::PropagationBidirectional,
        Some(other) => bail!("{what}: mountPropagation {other}"),
    };
    Ok(api::Mount {
        container_path: m["mountPath"]
            .as_str()
            .context("volumeMount without mountPath")?
            .into(),
        host_path: host_path.to_string_lossy().into_owned(),
        readonly: m["readOnly"].as_bool().unwrap_or(false),
        propagation: propagation as i32,
        ..Default::default()
    })
}

/// The container's security context over the pod's, as kubelet resolves it.
fn security_context(
    pod: &Pod,
    container: &Value,
    what: &str,
) -> Result<api::LinuxContainerSecurityContext> {
    let c = &container["securityContext"];
    let p = &pod.spec["securityContext"];
    let pick = |k: &str| if c[k].is_null() { &p[k] } else { &c[k] };
    let run_as_user = pick("runAsUser").as_i64();
    if pick("runAsNonRoot").as_bool() == Some(true) && run_as_user.unwrap_or(0) == 0 {
        bail!("{what}: runAsNonRoot with no non-root runAsUser (kubelet refuses it)");
    }
    let caps = |k: &str| -> Vec<String> {
        seq(&c["capabilities"][k])
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    let network = if pod.host_network() {
        api::NamespaceMode::Node
    } else {
        api::NamespaceMode::Pod
    };
    Ok(api::LinuxContainerSecurityContext {
        capabilities: Some(api::Capability {
            add_capabilities: caps("add"),
            drop_capabilities: caps("drop"),
            add_ambient_capabilities: vec![],
        }),
        privileged: c["privileged"].as_bool().unwrap_or(false),
        namespace_options: Some(api::NamespaceOption {
            network: network as i32,
            pid: api::NamespaceMode::Container as i32,
            ipc: api::NamespaceMode::Pod as i32,
            ..Default::default()
        }),
        run_as_user: run_as_user.map(|value| api::Int64Value { value }),
        run_as_group: pick("runAsGroup")
            .as_i64()
            .map(|value| api::Int64Value { value }),
        readonly_rootfs: c["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
        // kubelet sets no_new_privs unless privilege escalation is allowed.
        no_new_privs: c["allowPrivilegeEscalation"].as_bool() == Some(false),
        // kubelet's default masked and read-only /proc paths, as for any unprivileged pod.
        masked_paths: DEFAULT_MASKED.iter().map(|s| s.to_string()).collect(),
        readonly_paths: DEFAULT_READONLY.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

/// The paths kubelet asks the runtime to mask in an unprivileged container.
const DEFAULT_MASKED: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// The paths kubelet asks the runtime to make read-only in an unprivileged container.
const DEFAULT_READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn resources(container: &Value) -> Result<api::LinuxContainerResources> {
    let r = &container["resources"];
    let mut out = api::LinuxContainerResources::default();
    if let Some(m) = r["limits"]["memory"].as_str() {
        out.memory_limit_in_bytes = quantity_bytes(m)?;
    }
    // kubelet: cpu shares from the request, 1024 a core, at least 2.
    let milli = match r["requests"]["cpu"].as_str() {
        Some(c) => quantity_milli(c)?,
        None => 0,
    };
    out.cpu_shares = (milli * 1024 / 1000).max(2);
    Ok(out)
}

fn quantity_bytes(q: &str) -> Result<i64> {
    let (num, mul) = [("Ki", 1i64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)]
        .into_iter()
        .find_map(|(s, m)| q.strip_suffix(s).map(|n| (n, m)))
        .unwrap_or((q, 1));
    Ok(num
        .parse::<i64>()
        .with_context(|| format!("memory quantity {q}"))?
        * mul)
}

fn quantity_milli(q: &str) -> Result<i64> {
    match q.strip_suffix('m') {
        Some(n) => n.parse().with_context(|| format!("cpu quantity {q}")),
        None => Ok(q
            .parse::<i64>()
            .with_context(|| format!("cpu quantity {q}"))?
            * 1000),
    }
}

/// The container's readiness probe, if it has one (httpGet only; a named port is looked up
/// in the container's ports).
pub fn readiness_probe(container: &Value) -> Result<Option<HttpProbe>> {
    let p = &container["readinessProbe"];
    if p.is_null() {
        return Ok(None);
    }
    let get = &p["httpGet"];
    if get.is_null() {
        bail!("readinessProbe without httpGet: the node suite polls HTTP only");
    }
    let port = match &get["port"] {
        Value::Number(n) => n.as_u64().context("probe port")? as u16,
        Value::String(name) => seq(&container["ports"])
            .into_iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .with_context(|| format!("probe port {name} is not a container port"))?
            as u16,
        other => bail!("probe port {other:?}"),
    };
    Ok(Some(HttpProbe {
        path: get["path"].as_str().unwrap_or("/").into(),
        port,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(s: &str) -> Value {
        serde_yaml::from_str(s).unwrap()
    }

    #[test]
    fn strategic_merge_merges_named_lists_and_replaces_others() {
        let mut base = yaml(concat!(
            "initContainers:\n",
            "  - name: istio-init\n",
            "    image: proxyv2\n",
            "    args: [istio-iptables, -p, '15001']\n",
            "    securityContext:\n",
            "      capabilities: {add: [NET_ADMIN, NET_RAW], drop: [ALL]}\n",
            "      runAsUser: 0\n",
            "containers: [{name: app, image: app}]\n",
        ));
        let patch = yaml(concat!(
            "initContainers:\n",
            "  - name: istio-init\n",
            "    image: sockmesh\n",
            "    securityContext: {capabilities: {add: []}}\n",
            "    volumeMounts: [{name: s, mountPath: /run/sockmesh}]\n",
            "volumes: [{name: s, hostPath: {path: /run/sockmesh}}]\n",
        ));
        strategic_merge(&mut base, &patch);
        let init = &base["initContainers"][0];
        assert_eq!(init["image"], yaml("sockmesh"));
        assert_eq!(init["args"], yaml("[istio-iptables, -p, '15001']"));
        assert_eq!(init["securityContext"]["capabilities"]["add"], yaml("[]"));
        assert_eq!(
            init["securityContext"]["capabilities"]["drop"],
            yaml("[ALL]")
        );
        assert_eq!(init["securityContext"]["runAsUser"], yaml("0"));
        assert_eq!(base["containers"][0]["name"], yaml("app"));
        assert_eq!(base["volumes"][0]["name"], yaml("s"));
    }

    #[test]
    fn host_paths_stay_under_the_node() {
        let h = HostPaths {
            root: "/t/host".into(),
            cgroup: "/sys/fs/cgroup/unified/smt-node-1/pods".into(),
            bpffs: "/t/bpffs".into(),
        };
        assert_eq!(h.resolve("/sys/fs/cgroup"), h.cgroup);
        assert_eq!(h.resolve("/sys/fs/bpf"), PathBuf::from("/t/bpffs"));
        assert_eq!(
            h.resolve("/etc/cni/net.d"),
            PathBuf::from("/t/host/etc/cni/net.d")
        );
        assert_eq!(
            h.resolve("/run/sockmesh"),
            PathBuf::from("/t/host/run/sockmesh")
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("128Mi").unwrap(), 128 << 20);
        assert_eq!(quantity_milli("10m").unwrap(), 10);
        assert_eq!(quantity_milli("2").unwrap(), 2000);
        assert!(quantity_bytes("lots").is_err());
    }
}

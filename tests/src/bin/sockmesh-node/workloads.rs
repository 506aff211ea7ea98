//! The node suite's pods: the agent's DaemonSet pod as deploy/ renders it, and workload pods
//! as Istio's injector leaves them (its `istio-init` with the default sidecar template's
//! arguments, merged with the sockmesh template of deploy/overlays/istio), with
//! sockmesh-proxy as the sidecar and the testkit as the app.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde_yaml::Value;
use sockmesh_tests::node::manifest::{self, strategic_merge, Pod};

/// The images `cargo xtask image` writes, by reference.
pub const SOCKMESH_IMAGE: &str = "ghcr.io/sockmesh/sockmesh:0.1.0";
pub const SOCKMESH_IMAGE_NEXT: &str = "ghcr.io/sockmesh/sockmesh:0.1.1";
pub const PROXY_IMAGE: &str = "ghcr.io/sockmesh/sockmesh-proxy:0.1.0";
pub const TESTKIT_IMAGE: &str = "localhost/sockmesh/testkit:dev";

/// Two service addresses (no route leads there: only capture makes them reachable), each
/// routed by the client's proxy to one upstream of the server pod.
pub const VIP_V1: &str = "10.96.0.10:80";
pub const VIP_V2: &str = "10.96.0.11:80";
/// A TCP service (server-first): the server's testkit listener, through both proxies.
pub const VIP_ECHO: &str = "10.96.0.12:9000";

/// deploy/ rendered with the istio overlay.
pub fn rendered() -> Result<Vec<Value>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/overlays/istio");
    manifest::render(&dir)
}

/// The agent's pod on this node, from the DaemonSet.
pub fn agent_pod(docs: &[Value]) -> Result<Pod> {
    let ds = manifest::find(docs, "DaemonSet", "sockmesh-agent")?;
    Pod::from_template(ds, "sockmesh-agent-node")
}

/// The overlay's injection template (`sidecarInjectorWebhook.templates.sockmesh`), parsed.
fn sockmesh_template(docs: &[Value]) -> Result<Value> {
    let cm = manifest::find(docs, "ConfigMap", "sockmesh-istiod-values")?;
    let values: Value = serde_yaml::from_str(
        cm["data"]["values.yaml"]
            .as_str()
            .context("the ConfigMap has no values.yaml")?,
    )?;
    let t = values["sidecarInjectorWebhook"]["templates"]["sockmesh"]
        .as_str()
        .context("the values have no sockmesh template")?;
    Ok(serde_yaml::from_str(t)?)
}

/// The init container as Istio's sidecar template renders it with the default values (the
/// image is the proxy's, whose entrypoint is pilot-agent; the arguments are istio-iptables').
fn istio_init(extra_args: &[&str]) -> Value {
    let mut args: Vec<Value> = [
        "istio-iptables",
        "-p",
        "15001",
        "-z",
        "15006",
        "-u",
        "1337",
        "-m",
        "REDIRECT",
        "-i",
        "*",
        "-x",
        "",
        "-b",
        "*",
        "-d",
        "15090,15021,15020",
        "--log_output_level=default:info",
    ]
    .iter()
    .map(|a| Value::from(*a))
    .collect();
    args.extend(extra_args.iter().map(|a| Value::from(*a)));
    serde_yaml::from_str::<Value>(
        r#"
name: istio-init
image: docker.io/istio/proxyv2:1.24.0
securityContext:
  allowPrivilegeEscalation: false
  privileged: false
  readOnlyRootFilesystem: false
  runAsGroup: 0
  runAsNonRoot: false
  runAsUser: 0
  capabilities:
    add: [NET_ADMIN, NET_RAW]
    drop: [ALL]
resources:
  limits: {cpu: "2", memory: 1Gi}
  requests: {cpu: 10m, memory: 40Mi}
"#,
    )
    .map(|mut v| {
        v["args"] = Value::Sequence(args);
        v
    })
    .expect("a YAML literal")
}

/// What a workload pod runs besides the sidecar: testkit containers, each with its
/// arguments, as uid 1000 unless given another.
pub struct App {
    containers: Vec<(String, Vec<String>, u32)>,
}

impl App {
    pub fn new(containers: &[(&str, Vec<std::ffi::OsString>)]) -> App {
        App {
            containers: containers
                .iter()
                .map(|(n, argv)| {
                    let args = argv
                        .iter()
                        .map(|a| a.to_string_lossy().into_owned())
                        .collect();
                    (n.to_string(), args, 1000)
                })
                .collect(),
        }
    }

    /// Run `container` as `uid` (and the same gid).
    pub fn with_uid(mut self, container: &str, uid: u32) -> App {
        for c in &mut self.containers {
            if c.0 == container {
                c.2 = uid;
            }
        }
        self
    }
}

/// A pod as the injector leaves it: `istio-init` (unless `cni`, where the CNI plugin
/// captures instead), the sidecar as `istio-proxy` (uid 1337, reading the configMap
/// `proxy-config`), then the app as uid 1000. `init_extra` adds arguments to istio-init.
pub fn injected_pod(
    docs: &[Value],
    name: &str,
    namespace: &str,
    app: &App,
    cni: bool,
    init_extra: &[&str],
) -> Result<Pod> {
    let init_names = if cni {
        "istio-validation"
    } else {
        "istio-init"
    };
    let status = format!(
        r#"{{"initContainers":["{init_names}"],"containers":["istio-proxy"],"volumes":["proxy-config"],"revision":"default"}}"#
    );
    let mut doc: Value = serde_yaml::from_str(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {namespace}
  labels: {{app: {name}, security.istio.io/tlsMode: istio}}
  annotations: {{}}
spec:
  containers:
    - name: istio-proxy
      image: {PROXY_IMAGE}
      args: [--config, /etc/istio/proxy/proxy.yaml]
      securityContext:
        runAsUser: 1337
        runAsGroup: 1337
        runAsNonRoot: true
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities: {{drop: [ALL]}}
      volumeMounts:
        - {{name: proxy-config, mountPath: /etc/istio/proxy, readOnly: true}}
  volumes:
    - {{name: proxy-config, configMap: {{name: {name}-proxy}}}}
    - {{name: control, emptyDir: {{}}}}
"#
    ))?;
    doc["metadata"]["annotations"]["sidecar.istio.io/status"] = Value::from(status);
    let containers = doc["spec"]["containers"]
        .as_sequence_mut()
        .expect("the literal has containers");
    for (cname, args, uid) in &app.containers {
        let mut c: Value = serde_yaml::from_str(&format!(
            r#"
name: {cname}
image: {TESTKIT_IMAGE}
securityContext: {{runAsUser: {uid}, runAsGroup: {uid}}}
volumeMounts:
  - {{name: control, mountPath: /control}}
"#
        ))?;
        c["args"] = Value::Sequence(args.iter().map(|a| Value::from(a.as_str())).collect());
        containers.push(c);
    }
    if !cni {
        doc["spec"]["initContainers"] = Value::Sequence(vec![istio_init(init_extra)]);
        // The injector applies its templates in order: sidecar, then sockmesh.
        let template = sockmesh_template(docs)?;
        strategic_merge(&mut doc, &template);
    }
    Pod::from_doc(&doc)
}

/// A hostNetwork pod running the testkit with `args`.
pub fn host_network_pod(name: &str, args: &[&str]) -> Result<Pod> {
    let mut doc: Value = serde_yaml::from_str(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  hostNetwork: true
  containers:
    - name: app
      image: {TESTKIT_IMAGE}
      securityContext: {{runAsUser: 1000, runAsGroup: 1000}}
"#
    ))?;
    doc["spec"]["containers"][0]["args"] =
        Value::Sequence(args.iter().map(|a| Value::from(*a)).collect());
    Pod::from_doc(&doc)
}

/// The sidecar's configuration. The client's routes each service address to one upstream of
/// the server (adding `x-via` so the server can tell the request came through the client's
/// proxy); the TCP service goes to the server's listener on 9000, declared TCP on both sides
/// (it speaks first).
pub fn proxy_config(server_ip: Option<&str>) -> String {
    let mut s = String::from(
        "admin: {address: \"127.0.0.1:15000\"}\n\
         listeners:\n  \
         - {name: outbound, address: \"0.0.0.0:15001\", direction: outbound}\n  \
         - {name: inbound, address: \"0.0.0.0:15006\", direction: inbound}\n",
    );
    match server_ip {
        Some(ip) => s.push_str(&format!(
            "virtual_hosts:\n  \
             - name: v1\n    domains: [\"{VIP_V1}\"]\n    routes:\n      \
             - route: {{cluster: v1}}\n        request_headers_to_add: [{{name: x-via, value: client-proxy}}]\n  \
             - name: v2\n    domains: [\"{VIP_V2}\"]\n    routes:\n      - route: {{cluster: v2}}\n\
             clusters:\n  \
             - {{name: v1, endpoints: [{{address: \"{ip}:8080\"}}]}}\n  \
             - {{name: v2, endpoints: [{{address: \"{ip}:8081\"}}]}}\n  \
             - {{name: echo, endpoints: [{{address: \"{ip}:9000\"}}]}}\n\
             tcp_routes:\n  - {{destination: \"9000\", cluster: echo}}\n"
        )),
        None => s.push_str("tcp_routes:\n  - {destination: \"9000\"}\n"),
    }
    s
}

/// The configMap folders of a pod: `NAME-proxy` holding proxy.yaml.
pub fn config_maps(dir: &Path, pod: &str, proxy_yaml: &str) -> Result<HashMap<String, PathBuf>> {
    let d = dir.join("configmaps").join("proxy");
    std::fs::create_dir_all(&d)?;
    std::fs::write(d.join("proxy.yaml"), proxy_yaml)?;
    Ok(HashMap::from([(format!("{pod}-proxy"), d)]))
}

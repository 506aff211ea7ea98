//! `sockmesh cni`: a chained CNI plugin (CNI spec 1.0 and 1.1) that registers a pod with the
//! agent, with the settings istio-cni derives from the pod's annotations.
//!
//! A container runtime runs the binary with no arguments, `CNI_COMMAND` and friends in the
//! environment and the network configuration on stdin. The pod's annotations come from the
//! runtime, through the `io.kubernetes.cri.pod-annotations` capability (containerd fills
//! `runtimeConfig` with them when the plugin's configuration declares the capability), so the
//! plugin needs no Kubernetes API access.

use std::{
    collections::BTreeMap,
    ffi::OsString,
    io::Read,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_json::{json, Value};

use sockmesh_api::pb;

use crate::{
    core::sys,
    init::{self, action::ACCELERATION_ENV, register::AgentError, InitError},
};

/// The CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A pod annotation: the pod's socket acceleration, as `SOCKMESH_ACCELERATION` (`off`,
/// `proxies`, `all`).
pub const ACCELERATION_ANNOTATION: &str = "sockmesh.io/acceleration";

/// The runtime capability that carries pod annotations.
pub const ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

/// The plugin's network configuration (the runtime's stdin).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    /// The agent's registration socket on the node.
    #[serde(default = "default_socket", rename = "agent_socket")]
    pub agent_socket: PathBuf,
    /// Kubernetes namespaces whose pods are never captured.
    #[serde(default = "default_excluded", rename = "exclude_namespaces")]
    pub exclude_namespaces: Vec<String>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    #[serde(default)]
    pub prev_result: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct RuntimeConfig {
    #[serde(rename = "io.kubernetes.cri.pod-annotations")]
    pub pod_annotations: Option<BTreeMap<String, String>>,
}

fn default_socket() -> PathBuf {
    PathBuf::from("/run/sockmesh/agent.sock")
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
}

/// A CNI error: its code (spec section "Error") and message.
#[derive(Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// Codes from the CNI specification, and sockmesh's own (100 and up).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    pub const NOT_CAPTURED: u32 = 100;
    pub const REGISTRATION_FAILED: u32 = 101;
}

/// What the runtime asked, from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (K8S_POD_NAMESPACE, K8S_POD_NAME, ...).
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = var("CNI_COMMAND").ok_or_else(|| {
            CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set", "sockmesh cni is run by a container runtime, with CNI_COMMAND=ADD|DEL|CHECK|STATUS|GC|VERSION")
        })?;
        let args = var("CNI_ARGS")
            .unwrap_or_default()
            .split(';')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Invocation {
            command,
            container_id: var("CNI_CONTAINERID").unwrap_or_default(),
            netns: var("CNI_NETNS").unwrap_or_default(),
            ifname: var("CNI_IFNAME").unwrap_or_default(),
            args,
        })
    }

    fn pod(&self) -> String {
        format!(
            "{}/{}",
            self.args
                .get("K8S_POD_NAMESPACE")
                .map_or("?", String::as_str),
            self.args.get("K8S_POD_NAME").map_or("?", String::as_str)
        )
    }

    fn require(&self, what: &str, value: &str) -> Result<(), CniError> {
        if value.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("{what} is not set for {}", self.command),
                "",
            ));
        }
        Ok(())
    }
}

/// Whether the pod is to be captured, and if not, why.
#[derive(Debug, PartialEq, Eq)]
pub enum Capture {
    Yes,
    No(String),
}

/// istio-cni's rule: a pod is captured when the sidecar injector has run on it (it left the
/// `sidecar.istio.io/status` annotation), injection is not turned off for it, and its
/// namespace is not excluded. A pod injected with the `istio-init` container (the status
/// lists it among its init containers) is left to that container, which registers it once
/// it runs: as istio-cni leaves alone a pod that carries istio-init.
pub fn should_capture(conf: &NetConf, inv: &Invocation) -> Capture {
    if let Some(ns) = inv.args.get("K8S_POD_NAMESPACE") {
        if conf.exclude_namespaces.iter().any(|n| n == ns) {
            return Capture::No(format!("namespace {ns} is excluded"));
        }
    }
    let Some(ann) = &conf.runtime_config.pod_annotations else {
        return Capture::No(format!(
            "the runtime passed no pod annotations: declare \"capabilities\": \
             {{\"{ANNOTATIONS_CAPABILITY}\": true}} in the plugin's configuration (containerd \
             then passes them)"
        ));
    };
    if ann.get("sidecar.istio.io/inject").map(String::as_str) == Some("false") {
        return Capture::No("sidecar.istio.io/inject is false".into());
    }
    let Some(status) = ann.get("sidecar.istio.io/status") else {
        return Capture::No("no sidecar was injected (no sidecar.istio.io/status)".into());
    };
    if has_istio_init(status) {
        return Capture::No("its istio-init container registers it".into());
    }
    Capture::Yes
}

/// Whether the injector's status annotation lists `istio-init` among the init containers.
fn has_istio_init(status: &str) -> bool {
    serde_json::from_str::<Value>(status).is_ok_and(|s| {
        s["initContainers"]
            .as_array()
            .is_some_and(|i| i.iter().any(|c| c == "istio-init"))
    })
}

/// istio-iptables' arguments for a pod, from its annotations with istio-cni's defaults: as the
/// injection template's, except that outbound port 15020 is excluded by default and 15020,
/// 15021 and 15090 are always appended to the inbound exclusions.
pub fn istio_argv(ann: &BTreeMap<String, String>) -> Vec<String> {
    let get = |k: &str, default: &str| {
        ann.get(k)
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| default.to_string())
    };
    let mut exclude_inbound: Vec<String> = Vec::new();
    let listed = get("traffic.sidecar.istio.io/excludeInboundPorts", "15020");
    for p in listed
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .chain(["15020", "15021", "15090"])
    {
        if !exclude_inbound.iter().any(|q| q == p) {
            exclude_inbound.push(p.to_string());
        }
    }
    let reroute = ann
        .get("istio.io/reroute-virtual-interfaces")
        .or_else(|| ann.get("traffic.sidecar.istio.io/kubevirtInterfaces"))
        .cloned()
        .unwrap_or_default();
    let mut argv: Vec<String> = [
        "-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "-m",
    ]
    .map(String::from)
    .to_vec();
    argv.push(get("sidecar.istio.io/interceptionMode", "REDIRECT"));
    for (flag, key, default) in [
        (
            "-i",
            "traffic.sidecar.istio.io/includeOutboundIPRanges",
            "*",
        ),
        ("-x", "traffic.sidecar.istio.io/excludeOutboundIPRanges", ""),
        ("-b", "traffic.sidecar.istio.io/includeInboundPorts", "*"),
        (
            "-o",
            "traffic.sidecar.istio.io/excludeOutboundPorts",
            "15020",
        ),
        ("-q", "traffic.sidecar.istio.io/includeOutboundPorts", ""),
        ("-c", "traffic.sidecar.istio.io/excludeInterfaces", ""),
    ] {
        argv.push(flag.into());
        argv.push(get(key, default));
    }
    argv.push("-d".into());
    argv.push(exclude_inbound.join(","));
    argv.push("-k".into());
    argv.push(reroute);
    argv
}

/// The error as the runtime reads it: JSON on stdout.
pub fn error_json(version: &str, e: &CniError) -> Value {
    let mut v = json!({ "cniVersion": version, "code": e.code, "msg": e.msg });
    if !e.details.is_empty() {
        v["details"] = json!(e.details);
    }
    v
}

/// Run the plugin: read the environment and stdin, act, print the result. Returns the exit code.
pub fn main() -> i32 {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| "1.0.0".into());
    match run(&stdin, |k| std::env::var(k).ok()) {
        Ok(Some(out)) => {
            println!("{out}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            eprintln!(
                "sockmesh cni: {}{}",
                e.msg,
                if e.details.is_empty() {
                    String::new()
                } else {
                    format!(": {}", e.details)
                }
            );
            println!("{}", error_json(&version, &e));
            1
        }
    }
}

fn run(stdin: &[u8], var: impl Fn(&str) -> Option<String>) -> Result<Option<Value>, CniError> {
    let inv = Invocation::from_env(&var)?;
    if inv.command == "VERSION" {
        return Ok(Some(json!({
            "cniVersion": SUPPORTED_VERSIONS.last(),
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf = decode_conf(stdin)?;
    match inv.command.as_str() {
        "ADD" => add(&conf, &inv).map(Some),
        "DEL" => del(&conf, &inv).map(|()| None),
        "CHECK" => check(&conf, &inv).map(|()| None),
        "STATUS" => agent_status(&conf.agent_socket, None).map(|_| None),
        "GC" => Ok(None),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_COMMAND {other} is not known"),
            "want ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
    }
}

/// The network configuration on stdin, decoded, in a CNI version this plugin speaks.
pub fn decode_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "cannot decode the network configuration on stdin",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {} is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    Ok(conf)
}

/// The previous plugin's result, passed on (a chained plugin must output it).
pub fn pass_through(conf: &NetConf) -> Result<Value, CniError> {
    let mut prev = conf.prev_result.clone().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "no prevResult: sockmesh is a chained plugin",
            "list it after the plugin that sets up the pod's interface (bridge, ptp, a CNI \
             provider) in the same .conflist",
        )
    })?;
    if let Some(o) = prev.as_object_mut() {
        o.insert("cniVersion".into(), json!(conf.cni_version));
    }
    Ok(prev)
}

fn add(conf: &NetConf, inv: &Invocation) -> Result<Value, CniError> {
    let result = pass_through(conf)?;
    inv.require("CNI_NETNS", &inv.netns)?;
    match should_capture(conf, inv) {
        Capture::No(why) => {
            eprintln!("sockmesh cni: pod {} not captured: {why}", inv.pod());
            return Ok(result);
        }
        Capture::Yes => {}
    }
    let ann = conf
        .runtime_config
        .pod_annotations
        .as_ref()
        .expect("should_capture checked the annotations");
    let mut argv: Vec<OsString> = vec!["istio-iptables".into()];
    argv.extend(istio_argv(ann).into_iter().map(OsString::from));
    argv.extend(["--network-namespace".into(), OsString::from(&inv.netns)]);
    argv.extend(["--agent-socket".into(), conf.agent_socket.clone().into()]);
    // sockmesh's per-pod acceleration switch, as init reads it.
    if let Some(v) = ann.get(ACCELERATION_ANNOTATION) {
        std::env::set_var(ACCELERATION_ENV, v);
    }
    init::run_for_cni(argv).map_err(|e| {
        CniError::new(
            code::REGISTRATION_FAILED,
            format!("pod {} could not be captured", inv.pod()),
            e.to_string(),
        )
    })?;
    eprintln!("sockmesh cni: pod {} captured", inv.pod());
    Ok(result)
}

/// DEL is idempotent: a namespace that is gone, or an agent that is down, is not an error (the
/// agent forgets pods whose namespace is gone).
fn del(conf: &NetConf, inv: &Invocation) -> Result<(), CniError> {
    if inv.netns.is_empty() || !Path::new(&inv.netns).exists() {
        return Ok(());
    }
    let argv: Vec<OsString> = vec![
        "istio-iptables".into(),
        "--cleanup-only".into(),
        "--network-namespace".into(),
        OsString::from(&inv.netns),
        "--agent-socket".into(),
        conf.agent_socket.clone().into(),
    ];
    if let Err(e) = init::run_for_cni(argv) {
        if matches!(e, InitError::Agent(AgentError::Unreachable { .. })) {
            eprintln!(
                "sockmesh cni: DEL for {}: {e}; the agent forgets the pod when its namespace goes",
                inv.pod()
            );
            return Ok(());
        }
        return Err(CniError::new(
            code::REGISTRATION_FAILED,
            format!("pod {}: removing capture failed", inv.pod()),
            e.to_string(),
        ));
    }
    Ok(())
}

fn check(conf: &NetConf, inv: &Invocation) -> Result<(), CniError> {
    pass_through(conf)?;
    inv.require("CNI_NETNS", &inv.netns)?;
    let want = should_capture(conf, inv) == Capture::Yes;
    let ns = sys::open_netns(Path::new(&inv.netns)).map_err(|e| {
        CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {}", inv.netns),
            e.to_string(),
        )
    })?;
    let reply = agent_status(&conf.agent_socket, Some(std::os::fd::AsFd::as_fd(&ns)))?;
    match (want, reply.registered) {
        (true, false) => Err(CniError::new(
            code::NOT_CAPTURED,
            format!("pod {} should be captured and is not", inv.pod()),
            "run ADD again (or restart the pod)",
        )),
        (false, true) => Err(CniError::new(
            code::NOT_CAPTURED,
            format!("pod {} is captured and should not be", inv.pod()),
            "",
        )),
        _ => Ok(()),
    }
}

/// The agent's Status for `netns` (or for none: is the agent up).
fn agent_status(
    sock: &Path,
    netns: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<pb::PodReply, CniError> {
    let down = |e: String| {
        CniError::new(
            code::PLUGIN_NOT_AVAILABLE,
            format!("the sockmesh agent at {} is not available", sock.display()),
            e,
        )
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            CniError::new(
                code::TRY_AGAIN_LATER,
                "starting the async runtime",
                e.to_string(),
            )
        })?;
    rt.block_on(async {
        let call = async {
            let mut c = sockmesh_api::connect(sock, netns)
                .await
                .map_err(|e| down(e.to_string()))?;
            c.status(pb::StatusRequest {})
                .await
                .map(|r| r.into_inner())
                .map_err(|s| down(s.message().to_string()))
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), call)
            .await
            .map_err(|_| down("no answer within 10 s".into()))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn flag<'a>(argv: &'a [String], f: &str) -> &'a str {
        let i = argv.iter().position(|a| a == f).unwrap();
        &argv[i + 1]
    }

    #[test]
    fn istio_cni_defaults() {
        let argv = istio_argv(&ann(&[("sidecar.istio.io/status", "{}")]));
        assert_eq!(flag(&argv, "-m"), "REDIRECT");
        assert_eq!(flag(&argv, "-i"), "*");
        assert_eq!(flag(&argv, "-x"), "");
        assert_eq!(flag(&argv, "-b"), "*");
        assert_eq!(flag(&argv, "-o"), "15020");
        assert_eq!(flag(&argv, "-d"), "15020,15021,15090");
        assert_eq!(flag(&argv, "-u"), "1337");
    }

    #[test]
    fn annotations_map_to_flags_and_inbound_excludes_are_appended_once() {
        let argv = istio_argv(&ann(&[
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "10.0.0.0/8",
            ),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.1.0.0/16",
            ),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "9000"),
            ("traffic.sidecar.istio.io/includeOutboundPorts", "7000"),
            ("traffic.sidecar.istio.io/excludeInboundPorts", "8080,15021"),
            ("traffic.sidecar.istio.io/includeInboundPorts", "80,8080"),
            ("traffic.sidecar.istio.io/excludeInterfaces", "eth9"),
            ("traffic.sidecar.istio.io/kubevirtInterfaces", "old0"),
            ("istio.io/reroute-virtual-interfaces", "net1"),
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
        ]));
        assert_eq!(flag(&argv, "-i"), "10.0.0.0/8");
        assert_eq!(flag(&argv, "-x"), "10.1.0.0/16");
        assert_eq!(flag(&argv, "-o"), "9000");
        assert_eq!(flag(&argv, "-q"), "7000");
        assert_eq!(flag(&argv, "-d"), "8080,15021,15020,15090");
        assert_eq!(flag(&argv, "-b"), "80,8080");
        assert_eq!(flag(&argv, "-c"), "eth9");
        assert_eq!(flag(&argv, "-k"), "net1", "reroute-virtual-interfaces wins");
        assert_eq!(flag(&argv, "-m"), "TPROXY");
    }

    fn conf(annotations: Option<&[(&str, &str)]>) -> NetConf {
        let mut v = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "sockmesh"});
        if let Some(a) = annotations {
            v["runtimeConfig"] = json!({ ANNOTATIONS_CAPABILITY: ann(a) });
        }
        serde_json::from_value(v).unwrap()
    }

    fn inv(ns: &str) -> Invocation {
        Invocation::from_env(|k| match k {
            "CNI_COMMAND" => Some("ADD".into()),
            "CNI_ARGS" => Some(format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=web"
            )),
            _ => None,
        })
        .unwrap()
    }

    #[test]
    fn which_pods_are_captured() {
        let injected: &[(&str, &str)] = &[("sidecar.istio.io/status", "{}")];
        assert_eq!(
            should_capture(&conf(Some(injected)), &inv("default")),
            Capture::Yes
        );
        assert!(
            matches!(should_capture(&conf(Some(injected)), &inv("kube-system")), Capture::No(w) if w.contains("excluded"))
        );
        assert!(
            matches!(should_capture(&conf(Some(&[])), &inv("default")), Capture::No(w) if w.contains("no sidecar"))
        );
        let off: &[(&str, &str)] = &[
            ("sidecar.istio.io/status", "{}"),
            ("sidecar.istio.io/inject", "false"),
        ];
        assert!(matches!(
            should_capture(&conf(Some(off)), &inv("default")),
            Capture::No(_)
        ));
        assert!(
            matches!(should_capture(&conf(None), &inv("default")), Capture::No(w) if w.contains(ANNOTATIONS_CAPABILITY))
        );
        let with_init: &[(&str, &str)] = &[(
            "sidecar.istio.io/status",
            r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#,
        )];
        assert!(
            matches!(should_capture(&conf(Some(with_init)), &inv("default")), Capture::No(w) if w.contains("istio-init"))
        );
        let with_validation: &[(&str, &str)] = &[(
            "sidecar.istio.io/status",
            r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"]}"#,
        )];
        assert_eq!(
            should_capture(&conf(Some(with_validation)), &inv("default")),
            Capture::Yes
        );
    }

    #[test]
    fn version_and_bad_input() {
        let out = run(b"", |k| (k == "CNI_COMMAND").then(|| "VERSION".into()))
            .unwrap()
            .unwrap();
        assert!(out["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0")));
        let e = run(b"{}", |_| None).unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        let e = run(b"not json", |k| (k == "CNI_COMMAND").then(|| "ADD".into())).unwrap_err();
        assert_eq!(e.code, code::DECODE);
        let e = run(br#"{"cniVersion":"9.9.9"}"#, |k| {
            (k == "CNI_COMMAND").then(|| "ADD".into())
        })
        .unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = run(br#"{"cniVersion":"1.0.0"}"#, |k| match k {
            "CNI_COMMAND" => Some("ADD".into()),
            "CNI_NETNS" => Some("/nonexistent".into()),
            _ => None,
        })
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG, "{e:?}");
        let e = run(br#"{"cniVersion":"1.0.0"}"#, |k| {
            (k == "CNI_COMMAND").then(|| "FROB".into())
        })
        .unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
    }
}

//! `sockmesh cni` run as a container runtime runs a chained plugin: after the real bridge and
//! host-local plugins (Debian's containernetworking-plugins) have given a pod its interface, with
//! the environment and stdin configuration libcni builds, and the pod's annotations passed
//! through the `io.kubernetes.cri.pod-annotations` capability. Everything runs in a lab "node"
//! namespace, so the bridge never touches the machine's network.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
};

use serde_json::{json, Value};
use sockmesh_tests::{
    api::{self, pb},
    kit::{Connect, Identity, Outcome},
    lab::{sockmesh_bin, Lab, Netns, Place},
    pods,
};

const CNI_PLUGINS: &str = "/usr/lib/cni";
const GATEWAY: &str = "10.250.0.1";

struct Runtime {
    node: Netns,
    bin: PathBuf,
    conflist: Value,
    /// The configuration file, and the cluster's list before sockmesh was chained in.
    file: PathBuf,
    primary: Value,
}

/// What a plugin answered: its exit code and its stdout as JSON (Null when empty).
struct Answer {
    ok: bool,
    out: Value,
    stderr: String,
}

impl Runtime {
    fn new(lab: &mut Lab, node: Netns) -> Runtime {
        for p in ["bridge", "host-local", "loopback"] {
            let path = Path::new(CNI_PLUGINS).join(p);
            assert!(
                path.is_file(),
                "{} is missing: install containernetworking-plugins (cargo xtask setup does)",
                path.display()
            );
        }
        let bin = lab.dir.join("cni-bin");
        std::fs::create_dir_all(&bin).unwrap();
        for p in ["bridge", "host-local", "loopback"] {
            std::os::unix::fs::symlink(Path::new(CNI_PLUGINS).join(p), bin.join(p)).unwrap();
        }
        // The cluster's network: bridge alone, as its installer left it.
        let conf_dir = lab.dir.join("net.d");
        std::fs::create_dir_all(&conf_dir).unwrap();
        let primary = json!({
            "cniVersion": "1.0.0",
            "name": "lab-net",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "smcni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{ "subnet": "10.250.0.0/24", "gateway": GATEWAY }]],
                        "routes": [{ "dst": "0.0.0.0/0" }],
                        "dataDir": lab.dir.join("ipam"),
                    },
                },
            ],
        });
        let file = conf_dir.join("10-lab.conflist");
        std::fs::write(&file, serde_json::to_vec(&primary).unwrap()).unwrap();
        // sockmesh's installer puts the plugin in and chains it, twice (idempotent).
        for _ in 0..2 {
            sockmesh_tests::lab::run(std::process::Command::new(sockmesh_bin().unwrap()).args([
                "install-cni".as_ref(),
                "--cni-conf-dir".as_ref(),
                conf_dir.as_os_str(),
                "--cni-bin-dir".as_ref(),
                bin.as_os_str(),
                "--agent-socket".as_ref(),
                lab.socket.as_os_str(),
            ]))
            .unwrap();
        }
        let conflist: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let plugins = conflist["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2, "{conflist}");
        assert_eq!(plugins[0], primary["plugins"][0]);
        assert_eq!(plugins[1]["type"], "sockmesh");
        assert!(bin.join("sockmesh").is_file());
        Runtime {
            node,
            bin,
            conflist,
            file,
            primary,
        }
    }

    /// CHECK of `pod` by sockmesh's plugin, after an ADD that answered `prev`.
    fn check(
        &self,
        lab: &Lab,
        pod: &Netns,
        name: &str,
        annotations: &Value,
        prev: &Value,
    ) -> Answer {
        self.invoke(
            lab,
            self.sockmesh(),
            "CHECK",
            pod,
            name,
            annotations,
            Some(prev),
        )
    }

    /// Run one plugin as libcni does: network name and version copied in, prevResult and the
    /// declared capabilities' runtimeConfig added, CNI_* in the environment.
    #[allow(clippy::too_many_arguments)]
    fn invoke(
        &self,
        lab: &Lab,
        plugin: &Value,
        command: &str,
        pod: &Netns,
        name: &str,
        annotations: &Value,
        prev: Option<&Value>,
    ) -> Answer {
        let mut conf = plugin.clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        if plugin["capabilities"]["io.kubernetes.cri.pod-annotations"] == json!(true) {
            conf["runtimeConfig"] = json!({ "io.kubernetes.cri.pod-annotations": annotations });
        }
        let exe = self.bin.join(plugin["type"].as_str().unwrap());
        let mut cmd = lab.command(&self.node, false, &exe).unwrap();
        cmd.env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("ctr-{name}"))
            .env("CNI_NETNS", pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.bin)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name}"),
            )
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&serde_json::to_vec(&conf).unwrap())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        Answer {
            ok: out.status.success(),
            out: if stdout.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&stdout).unwrap_or_else(|e| {
                    panic!("{exe:?} {command}: stdout is not JSON ({e}): {stdout}")
                })
            },
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// ADD through the whole list; the last answer (or the first failure).
    fn add(&self, lab: &Lab, pod: &Netns, name: &str, annotations: &Value) -> Answer {
        let mut prev: Option<Value> = None;
        let plugins = self.conflist["plugins"].as_array().unwrap();
        let mut last = None;
        for p in plugins {
            let a = self.invoke(lab, p, "ADD", pod, name, annotations, prev.as_ref());
            if !a.ok {
                return a;
            }
            prev = Some(a.out.clone());
            last = Some(a);
        }
        last.unwrap()
    }

    /// DEL through the list in reverse; every answer must be a success.
    fn del(&self, lab: &Lab, pod: &Netns, name: &str, annotations: &Value) {
        for p in self.conflist["plugins"].as_array().unwrap().iter().rev() {
            let a = self.invoke(lab, p, "DEL", pod, name, annotations, None);
            assert!(a.ok, "DEL by {}: {:?} {}", p["type"], a.out, a.stderr);
        }
    }

    fn sockmesh(&self) -> &Value {
        &self.conflist["plugins"][1]
    }
}

fn registered(lab: &Lab, pod: &Netns) -> bool {
    status(lab, pod).registered
}

/// The agent's answer to the pod's Status call.
fn status(lab: &Lab, pod: &Netns) -> pb::PodReply {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = api::pod_client(&lab.socket, &pod.path()).await.unwrap();
        c.status(pb::StatusRequest {}).await.unwrap().into_inner()
    })
}

/// The pod's socket acceleration as the agent holds it (dump's settings of its registration).
fn acceleration(lab: &Lab, pod: &Netns) -> String {
    let cookie = status(lab, pod).netns_cookie;
    let dump = lab.dump().unwrap();
    let reg = dump["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["netns_cookie"] == json!(cookie))
        .unwrap_or_else(|| panic!("pod {cookie} not in the dump: {dump}"));
    reg["settings"]["socket acceleration (SOCKMESH_ACCELERATION)"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Connect from the pod (in the captured cgroup, as an app's uid) and report where it landed.
fn connect(lab: &Lab, pod: &Netns, dst: &str) -> Outcome {
    let program = Connect::new(dst.parse().unwrap(), Identity::APP);
    pods::connect(lab, Place::new(pod, true), &program).unwrap()
}

/// ADD of `pod` (named cache) with bad `annotations` fails with an error the runtime can show
/// (code 101, details naming each of `why`) and registers nothing; then DEL.
fn refused(rt: &Runtime, lab: &Lab, pod: &Netns, annotations: &Value, why: &[&str]) {
    let c = rt.add(lab, pod, "cache", annotations);
    assert!(!c.ok, "bad annotations accepted: {annotations}");
    assert_eq!(c.out["code"], 101, "{}", c.out);
    let details = c.out["details"].as_str().unwrap_or_default();
    assert!(why.iter().all(|w| details.contains(w)), "{}", c.out);
    assert!(!registered(lab, pod));
    rt.del(lab, pod, "cache", annotations);
}

#[test]
fn chained_after_bridge_captures_injected_pods_as_istio_cni_would() {
    let mut lab = Lab::new("cni").unwrap();
    let node = lab.netns("node").unwrap();
    lab.start_agent_in(Some(&node)).unwrap();
    let rt = Runtime::new(&mut lab, node);
    let injected = json!({
        "sidecar.istio.io/status": "{\"containers\":[\"istio-proxy\"]}",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "9000",
    });
    let plain = json!({ "app": "web" });

    // An injected pod: the bridge's result passes through, and the pod is captured.
    let web = lab.netns("web").unwrap();
    let a = rt.add(&lab, &web, "web", &injected);
    assert!(
        a.ok,
        "ADD failed: {:?}\n{}\n{}",
        a.out,
        a.stderr,
        lab.agent_log()
    );
    assert_eq!(a.out["cniVersion"], "1.0.0");
    let ip = a.out["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        ip.starts_with("10.250.0."),
        "the bridge's result is passed on: {}",
        a.out
    );
    assert!(a.stderr.contains("captured"), "{}", a.stderr);
    assert!(registered(&lab, &web));
    assert!(
        acceleration(&lab, &web).starts_with("proxies"),
        "the default"
    );
    pods::listen(&mut lab, &web, true, "proxy", &[15001]).unwrap();
    match connect(&lab, &web, &format!("{GATEWAY}:80")) {
        Outcome::Ok { listener, orig, .. } => {
            assert_eq!(listener, "proxy:15001");
            assert_eq!(orig, format!("{GATEWAY}:80"));
        }
        other => panic!("outbound not captured: {other:?}"),
    }
    // The annotation's excluded port bypasses the proxy. It replaces istio-cni's default
    // exclusion (15020), so 15020 is captured here.
    assert_eq!(
        connect(&lab, &web, &format!("{GATEWAY}:9000")),
        Outcome::Refused,
        "port 9000 should bypass the proxy"
    );
    assert!(matches!(
        connect(&lab, &web, &format!("{GATEWAY}:15020")),
        Outcome::Ok { listener, .. } if listener == "proxy:15001"
    ));
    // Without the annotation, istio-cni's default applies: 15020 bypasses the proxy.
    let api_pod = lab.netns("api").unwrap();
    // (Its acceleration annotation is sockmesh's own, read as SOCKMESH_ACCELERATION is.)
    let defaults = json!({
        "sidecar.istio.io/status": "{}",
        "sockmesh.io/acceleration": "all",
    });
    let d = rt.add(&lab, &api_pod, "api", &defaults);
    assert!(d.ok, "{:?} {}", d.out, d.stderr);
    assert!(acceleration(&lab, &api_pod).starts_with("all"));
    pods::listen(&mut lab, &api_pod, true, "proxy", &[15001]).unwrap();
    assert_eq!(
        connect(&lab, &api_pod, &format!("{GATEWAY}:15020")),
        Outcome::Refused
    );
    assert!(matches!(
        connect(&lab, &api_pod, &format!("{GATEWAY}:9000")),
        Outcome::Ok { listener, .. } if listener == "proxy:15001"
    ));
    rt.del(&lab, &api_pod, "api", &defaults);
    let check = rt.check(&lab, &web, "web", &injected, &a.out);
    assert!(check.ok, "CHECK: {:?} {}", check.out, check.stderr);

    // A pod without a sidecar: passed through untouched.
    let db = lab.netns("db").unwrap();
    let b = rt.add(&lab, &db, "db", &plain);
    assert!(b.ok, "{:?} {}", b.out, b.stderr);
    assert!(b.stderr.contains("not captured"), "{}", b.stderr);
    assert!(!registered(&lab, &db));
    let check = rt.check(&lab, &db, "db", &plain, &b.out);
    assert!(check.ok, "CHECK: {:?} {}", check.out, check.stderr);
    // CHECK notices a pod that should be captured and is not.
    let check = rt.check(&lab, &db, "db", &injected, &b.out);
    assert!(!check.ok);
    assert_eq!(check.out["code"], 100, "{}", check.out);

    // Bad annotations: an error the runtime can show, and nothing registered.
    let bad = json!({
        "sidecar.istio.io/status": "{}",
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/99",
    });
    let cache = lab.netns("cache").unwrap();
    refused(&rt, &lab, &cache, &bad, &["10.0.0.0/99"]);
    // A bad acceleration value too.
    let bad_accel = json!({
        "sidecar.istio.io/status": "{}",
        "sockmesh.io/acceleration": "fast",
    });
    let why = ["SOCKMESH_ACCELERATION=\"fast\"", "want off"];
    refused(&rt, &lab, &cache, &bad_accel, &why);

    // DEL removes the capture, and is idempotent.
    rt.del(&lab, &web, "web", &injected);
    assert!(!registered(&lab, &web));
    rt.del(&lab, &web, "web", &injected);
    rt.del(&lab, &db, "db", &plain);

    // VERSION, and STATUS (agent up).
    let v = rt.invoke(&lab, rt.sockmesh(), "VERSION", &web, "web", &plain, None);
    assert!(
        v.ok && v.out["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0"))
    );
    let s = rt.invoke(&lab, rt.sockmesh(), "STATUS", &web, "web", &plain, None);
    assert!(s.ok, "STATUS: {:?} {}", s.out, s.stderr);

    // The installer takes sockmesh out again: the cluster's list as it was, no binary.
    sockmesh_tests::lab::run(std::process::Command::new(sockmesh_bin().unwrap()).args([
        "install-cni".as_ref(),
        "--uninstall".as_ref(),
        "--cni-conf-dir".as_ref(),
        rt.file.parent().unwrap().as_os_str(),
        "--cni-bin-dir".as_ref(),
        rt.bin.as_os_str(),
    ]))
    .unwrap();
    let after: Value = serde_json::from_slice(&std::fs::read(&rt.file).unwrap()).unwrap();
    assert_eq!(after, rt.primary);
    assert!(!rt.bin.join("sockmesh").exists());
}

/// A node whose maps are full (the agent's `--max-pods 1`, one pod in): the next pod's ADD
/// fails with an error the runtime shows (code 101, naming the full map and the setting), the
/// pod is not captured at all, the first stays captured, and once the first's DEL has run the
/// second's ADD succeeds (as the kubelet retries it).
#[test]
fn on_a_full_node_the_add_fails_and_captures_nothing() {
    let mut lab = Lab::new("cnifull").unwrap();
    lab.agent_args = vec!["--max-pods".into(), "1".into()];
    let node = lab.netns("node").unwrap();
    lab.start_agent_in(Some(&node)).unwrap();
    let rt = Runtime::new(&mut lab, node);
    let injected = json!({ "sidecar.istio.io/status": "{}" });
    let first = lab.netns("first").unwrap();
    let a = rt.add(&lab, &first, "first", &injected);
    assert!(a.ok, "{:?} {}", a.out, a.stderr);
    assert!(registered(&lab, &first));

    let second = lab.netns("second").unwrap();
    let b = rt.add(&lab, &second, "second", &injected);
    assert!(!b.ok, "ADD on a full node succeeded: {:?}", b.out);
    assert_eq!(b.out["code"], 101, "{}", b.out);
    let details = b.out["details"].as_str().unwrap_or_default();
    assert!(
        details.contains(" is full") && details.contains("--max-pods"),
        "{}",
        b.out
    );
    assert!(!registered(&lab, &second));
    assert!(registered(&lab, &first));
    rt.del(&lab, &second, "second", &injected);

    rt.del(&lab, &first, "first", &injected);
    assert!(!registered(&lab, &first));
    let b = rt.add(&lab, &second, "second", &injected);
    assert!(b.ok, "{:?} {}", b.out, b.stderr);
    assert!(registered(&lab, &second));
    rt.del(&lab, &second, "second", &injected);
}

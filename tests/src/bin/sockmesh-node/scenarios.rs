//! The node suite's scenarios, run in order on one node. Each is a function; a failure is
//! reported and the next scenario still runs.

use std::{
    collections::{BTreeSet, HashMap},
    ffi::OsString,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use serde_yaml::Value;
use sockmesh_tests::{
    kit::{
        Connect, HttpGet, HttpServe, HttpUpstream, Identity, Launch, Listen, Listener,
        ListenerKind, Load, LoadReport,
    },
    lab::value_of,
    node::{
        cri::{Cri, Exit, Sandbox},
        in_netns,
        manifest::{self, Pod, PodPlace},
        Node,
    },
};

use crate::workloads::{self, App, VIP_ECHO, VIP_V1, VIP_V2};

/// A pod the suite started: its spec, sandbox and containers.
pub struct Running {
    pub pod: Pod,
    pub sandbox: Sandbox,
    /// Container ids by name.
    pub containers: HashMap<String, String>,
    /// The first init container that failed, if one did (the pod's containers then never
    /// start, as with kubelet).
    pub init_failed: Option<(String, Exit)>,
    pub dir: PathBuf,
    attempts: u32,
}

impl Running {
    fn id(&self, container: &str) -> Result<&str> {
        self.containers
            .get(container)
            .map(String::as_str)
            .with_context(|| format!("pod {} has no running {container}", self.pod.name))
    }

    /// A container's log, without CRI's timestamp, stream and tag columns.
    pub fn log(&self, container: &str) -> String {
        let raw = std::fs::read_to_string(self.dir.join("logs").join(format!("{container}.log")))
            .unwrap_or_default();
        raw.lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

pub struct Suite {
    node: Node,
    cri: Cri,
    docs: Vec<Value>,
    agent: Option<Running>,
    pods: Vec<Running>,
    server_ip: String,
}

const AGENT_METRICS: &str = "127.0.0.1:15094";

/// Programs run in a container as the container's own user (its securityContext's).
const AS_IS: Identity = Identity {
    uid: None,
    gid: None,
};

impl Suite {
    pub fn new(node: Node, cri: Cri) -> Result<Suite> {
        Ok(Suite {
            docs: workloads::rendered()?,
            node,
            cri,
            agent: None,
            pods: Vec::new(),
            server_ip: String::new(),
        })
    }

    /// Every scenario in order; prints each and the total; the number that failed.
    pub async fn run_all(&mut self) -> usize {
        let mut passed = 0;
        let mut failed = 0;
        for (n, name) in SCENARIOS.iter().enumerate() {
            println!("scenario {}: {name}", n + 1);
            let started = Instant::now();
            let r = match n {
                0 => self.init_container_path().await,
                1 => self.cni_path().await,
                2 => self.agent_restart_and_upgrade_under_traffic().await,
                3 => self.pod_deleted_while_agent_down().await,
                4 => self.never_captured().await,
                _ => self.bad_input().await,
            };
            match r {
                Ok(()) => {
                    passed += 1;
                    println!("  ok ({:.1} s)", started.elapsed().as_secs_f64());
                }
                Err(e) => {
                    failed += 1;
                    println!("  FAILED: {e:#}");
                    let log = self.node.log(200);
                    let errors: Vec<&str> =
                        log.lines().filter(|l| l.contains("level=error")).collect();
                    if !errors.is_empty() {
                        println!(
                            "  containerd errors (last):\n{}",
                            indent(&tail(&errors.join("\n"), 5))
                        );
                    }
                    if let Some(a) = &self.agent {
                        println!(
                            "  agent log (last lines):\n{}",
                            indent(&tail(&a.log("agent"), 15))
                        );
                    }
                }
            }
        }
        println!("{passed} passed, {failed} failed");
        failed
    }

    /// Delete every pod as kubelet would (so CNI DEL runs), the agent last.
    pub async fn tear_down(mut self) {
        for p in std::mem::take(&mut self.pods) {
            let _ = self.cri.delete_pod(&p.sandbox.id).await;
        }
        if let Some(a) = self.agent.take() {
            let _ = self.cri.delete_pod(&a.sandbox.id).await;
        }
        for id in self.cri.pods().await.unwrap_or_default() {
            let _ = self.cri.delete_pod(&id).await;
        }
        drop(self.node);
    }

    // ---- kubelet's part ----

    /// RunPodSandbox, init containers to completion, then the containers in order, each
    /// waited for (its readiness probe, or its "ready" line when it prints one).
    async fn run_pod(&mut self, pod: Pod, proxy_yaml: Option<&str>) -> Result<Running> {
        self.run_pod_waiting(pod, proxy_yaml, true).await
    }

    /// [`Suite::run_pod`], waiting for each container to be up only when `wait`.
    async fn run_pod_waiting(
        &mut self,
        pod: Pod,
        proxy_yaml: Option<&str>,
        wait: bool,
    ) -> Result<Running> {
        let dir = self.node.pod_dir(&pod.name)?;
        let config_maps = match proxy_yaml {
            Some(y) => workloads::config_maps(&dir, &pod.name, y)?,
            None => HashMap::new(),
        };
        let place = PodPlace {
            host: self.node.host.clone(),
            cgroup_parent: self.node.cgroup_parent(&pod.name),
            dir: dir.clone(),
            config_maps,
        };
        let sandbox = self
            .cri
            .run_pod(manifest::sandbox_config(&pod, &place, 0))
            .await?;
        let mut running = Running {
            pod: pod.clone(),
            sandbox,
            containers: HashMap::new(),
            init_failed: None,
            dir,
            attempts: 0,
        };
        for c in pod.init_containers() {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            let config = manifest::container_config(&pod, c, &place)?;
            let id = self.cri.start(&running.sandbox, config).await?;
            running.containers.insert(name.clone(), id.clone());
            let exit = self.cri.wait_exit(&id, Duration::from_secs(60)).await?;
            if exit.code != 0 {
                running.init_failed = Some((name, exit));
                return Ok(running);
            }
        }
        for c in pod.containers() {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            let config = manifest::container_config(&pod, c, &place)?;
            let id = self.cri.start(&running.sandbox, config).await?;
            running.containers.insert(name.clone(), id);
            if wait {
                self.wait_started(&running, c).await?;
            }
        }
        Ok(running)
    }

    /// A container is up when its readiness probe answers 200, or (without a probe) when it
    /// prints "ready" if it is a server, else at once.
    async fn wait_started(&mut self, running: &Running, c: &Value) -> Result<()> {
        let name = c["name"].as_str().unwrap_or_default();
        if let Some(probe) = manifest::readiness_probe(c)? {
            let ip = match &running.sandbox.ip {
                Some(ip) if !running.pod.host_network() => ip.clone(),
                _ => "127.0.0.1".into(),
            };
            let addr: SocketAddr = format!("{ip}:{}", probe.port).parse()?;
            return self.wait_ready(running, name, addr, &probe.path).await;
        }
        // The sidecar, and the testkit's servers, print "ready" once they serve.
        let program = c["args"]
            .as_sequence()
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .unwrap_or_default();
        let says_ready = c["image"] == workloads::PROXY_IMAGE
            || (c["image"] == workloads::TESTKIT_IMAGE
                && [HttpServe::NAME, Listen::NAME].contains(&program));
        if says_ready {
            let until = Instant::now() + Duration::from_secs(30);
            while !running.log(name).lines().any(|l| l.trim() == "ready") {
                let id = running.id(name)?;
                if let Some(e) = self.cri.exit(id).await? {
                    bail!(
                        "{} {name} exited ({e:?}):\n{}",
                        running.pod.name,
                        running.log(name)
                    );
                }
                if Instant::now() > until {
                    bail!(
                        "{} {name} is not ready after 30 s:\n{}",
                        running.pod.name,
                        running.log(name)
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Poll `path` at `addr` from the node's network until it answers 200 (60 s).
    async fn wait_ready(
        &mut self,
        running: &Running,
        name: &str,
        addr: SocketAddr,
        path: &str,
    ) -> Result<()> {
        let until = Instant::now() + Duration::from_secs(60);
        let mut last;
        loop {
            match self.node.http_get(addr, path) {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("{code} {}", body.trim()),
                Err(e) => last = format!("{e:#}"),
            }
            let id = running.id(name)?;
            if let Some(e) = self.cri.exit(id).await? {
                bail!(
                    "{} {name} exited ({e:?}); log:\n{}",
                    running.pod.name,
                    tail(&running.log(name), 20)
                );
            }
            if Instant::now() > until {
                bail!(
                    "{} {name}: {path} on {addr} not ready after 60 s (last: {last}); log:\n{}",
                    running.pod.name,
                    tail(&running.log(name), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The agent's DaemonSet pod with `image`, `change` applied to its spec, started and ready.
    async fn start_agent(&mut self, image: &str) -> Result<()> {
        let mut pod = workloads::agent_pod(&self.docs)?;
        pod.set_image("agent", image);
        pod.set_image("install-cni", image);
        let running = self.run_pod(pod, None).await?;
        self.agent = Some(running);
        Ok(())
    }

    /// SIGKILL the agent's container, as an OOM kill or a crash would end it.
    async fn kill_agent_container(&mut self) -> Result<()> {
        let a = self.agent.as_ref().context("no agent")?;
        let id = a.id("agent")?.to_string();
        let pid = self.cri.pid(&id).await?;
        // SAFETY: a signal to a process of the node.
        ensure!(
            unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0,
            "kill {pid}"
        );
        self.cri.wait_exit(&id, Duration::from_secs(10)).await?;
        Ok(())
    }

    /// kubelet's restart of the agent's container in its pod: a new container, next attempt.
    async fn restart_agent_container(&mut self) -> Result<()> {
        let mut a = self.agent.take().context("no agent")?;
        let r = async {
            let old = a.id("agent")?.to_string();
            self.cri.remove(&old).await?;
            a.attempts += 1;
            let c = a.pod.container("agent")?.clone();
            let place = PodPlace {
                host: self.node.host.clone(),
                cgroup_parent: self.node.cgroup_parent(&a.pod.name),
                dir: a.dir.clone(),
                config_maps: HashMap::new(),
            };
            let mut config = manifest::container_config(&a.pod, &c, &place)?;
            if let Some(m) = config.metadata.as_mut() {
                m.attempt = a.attempts;
            }
            config.log_path = format!("agent.{}.log", a.attempts);
            let id = self.cri.start(&a.sandbox, config).await?;
            a.containers.insert("agent".into(), id);
            let addr: SocketAddr = AGENT_METRICS.parse()?;
            self.wait_ready(&a, "agent", addr, "/readyz").await
        }
        .await;
        self.agent = Some(a);
        r
    }

    /// Delete the agent's pod (StopPodSandbox, RemovePodSandbox).
    async fn delete_agent(&mut self) -> Result<()> {
        if let Some(a) = self.agent.take() {
            self.cri.delete_pod(&a.sandbox.id).await?;
        }
        Ok(())
    }

    async fn delete(&mut self, name: &str) -> Result<()> {
        let i = self
            .pods
            .iter()
            .position(|p| p.pod.name == name)
            .with_context(|| format!("no pod {name}"))?;
        let p = self.pods.remove(i);
        self.cri.delete_pod(&p.sandbox.id).await
    }

    fn pod(&self, name: &str) -> Result<&Running> {
        self.pods
            .iter()
            .find(|p| p.pod.name == name)
            .with_context(|| format!("no pod {name}"))
    }

    /// The pod's network namespace, through its pause process.
    async fn netns(&mut self, sandbox: &Sandbox) -> Result<PathBuf> {
        Ok(PathBuf::from(format!(
            "/proc/{}/ns/net",
            self.cri.sandbox_pid(&sandbox.id).await?
        )))
    }

    /// `sockmesh explain` for a connection from the pod at `netns`.
    fn explain(&self, netns: &std::path::Path, args: &[&str]) -> Result<String> {
        sockmesh_tests::lab::explain(&self.node.host.bpffs.join("sockmesh"), netns, args)
    }

    /// The netns cookies of the pods the agent has registered (from the pinned maps).
    fn registered(&self) -> Result<BTreeSet<u64>> {
        let dump = sockmesh_tests::lab::dump(&self.node.host.bpffs.join("sockmesh"))?;
        Ok(dump["pods"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["netns_cookie"].as_u64())
            .collect())
    }

    /// Whether the pod at `netns` is captured, as `explain` reads the maps: the verdict for
    /// the app's connection to a service address.
    fn verdict(&self, netns: &std::path::Path) -> Result<String> {
        let text = self.explain(netns, &["tcp", VIP_V1])?;
        if text.contains("is not registered") {
            return Ok("not registered".into());
        }
        Ok(value_of(&text, "verdict").to_string())
    }

    /// Run a testkit program in a container (ExecSync, as `kubectl exec`).
    async fn exec<P: Launch>(
        &mut self,
        pod: &str,
        container: &str,
        program: &P,
    ) -> Result<sockmesh_tests::node::cri::Exec> {
        let id = self.pod(pod)?.id(container)?.to_string();
        let mut argv = vec!["/usr/local/bin/sockmesh-testkit".to_string()];
        argv.extend(
            program
                .argv()
                .iter()
                .map(|a: &OsString| a.to_string_lossy().into_owned()),
        );
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.cri.exec(&id, &argv, 60).await
    }

    // ---- the scenarios ----

    /// Scenario 1: the agent from the DaemonSet; two pods as Istio's injector renders them
    /// with the overlay's template; traffic between them through both sidecars.
    async fn init_container_path(&mut self) -> Result<()> {
        self.start_agent(workloads::SOCKMESH_IMAGE).await?;
        println!("  agent ready ({}); install-cni running", AGENT_METRICS);
        let server = workloads::injected_pod(
            &self.docs,
            "server",
            "default",
            &App::new(&[
                (
                    "app",
                    HttpServe::new([
                        HttpUpstream::new("v1", "0.0.0.0:8080".parse()?),
                        HttpUpstream::new("v2", "0.0.0.0:8081".parse()?),
                    ])
                    .argv(),
                ),
                (
                    "echo",
                    Listen {
                        listeners: vec![Listener::new(
                            ListenerKind::Report,
                            "echo",
                            "0.0.0.0:9000".parse()?,
                        )],
                    }
                    .argv(),
                ),
            ]),
            false,
            &[],
        )?;
        let server = self
            .run_pod(server, Some(&workloads::proxy_config(None)))
            .await?;
        check_init(&server)?;
        self.server_ip = server
            .sandbox
            .ip
            .clone()
            .context("the server pod has no IP")?;
        self.pods.push(server);
        let client = workloads::injected_pod(
            &self.docs,
            "client",
            "default",
            &App::new(&[
                ("app", vec!["pause".into()]),
                ("as-proxy", vec!["pause".into()]),
            ])
            .with_uid("as-proxy", 1337),
            false,
            &[],
        )?;
        let client = self
            .run_pod(
                client,
                Some(&workloads::proxy_config(Some(&self.server_ip))),
            )
            .await?;
        check_init(&client)?;
        let (server_ns, client_ns) = (
            self.netns(&self.pod("server")?.sandbox.clone()).await?,
            self.netns(&client.sandbox.clone()).await?,
        );
        self.pods.push(client);
        for ns in [&server_ns, &client_ns] {
            let v = self.verdict(ns)?;
            ensure!(
                v == "redirect to localhost:15001",
                "explain after istio-init exited 0: {v}"
            );
        }
        println!("  istio-init exited 0 in both pods, with capture in force (explain: redirect to 15001)");

        // Outbound through the client's sidecar: each service address to its own upstream,
        // so the sidecar read each connection's original destination.
        for (vip, want) in [
            (VIP_V1, "v1 GET / host=reviews from=127.0.0.6"),
            (VIP_V2, "v2 GET / host=reviews from=127.0.0.6"),
        ] {
            let r = self
                .exec(
                    "client",
                    "app",
                    &HttpGet::new(vip.parse()?, "/", "reviews", AS_IS),
                )
                .await?;
            ensure!(
                r.code == 0 && r.stdout.contains(want),
                "GET {vip} from the app: {r:?}, want {want:?}"
            );
        }
        println!("  app -> {VIP_V1} and {VIP_V2}: routed by original destination to v1 and v2, arriving through the server's inbound (from 127.0.0.6)");
        let r = self
            .exec(
                "client",
                "app",
                &HttpGet::new(VIP_V1.parse()?, "/headers", "reviews", AS_IS),
            )
            .await?;
        ensure!(
            r.stdout.contains("x-via"),
            "the request did not come through the client's sidecar: {r:?}"
        );
        // The proxy's own uid is left alone: its call to a service address goes nowhere.
        let r = self
            .exec(
                "client",
                "as-proxy",
                &HttpGet::new(VIP_V1.parse()?, "/", "reviews", AS_IS),
            )
            .await?;
        ensure!(
            r.code != 0 && !r.stdout.contains("200"),
            "uid 1337 reached {VIP_V1}, so it was captured: {r:?}"
        );
        // Its call to the server pod's address is captured there (inbound), not here.
        let direct: SocketAddr = format!("{}:8080", self.server_ip).parse()?;
        let r = self
            .exec(
                "client",
                "as-proxy",
                &HttpGet::new(direct, "/headers", "reviews", AS_IS),
            )
            .await?;
        ensure!(
            r.code == 0 && !r.stdout.contains("x-via"),
            "uid 1337 to {direct}: {r:?}"
        );
        let r = self
            .exec(
                "client",
                "as-proxy",
                &HttpGet::new(direct, "/", "reviews", AS_IS),
            )
            .await?;
        ensure!(
            r.stdout.contains("from=127.0.0.6"),
            "inbound to the server did not pass its sidecar: {r:?}"
        );
        println!("  uid 1337: not captured outbound; inbound to the server pod reaches its 15006");
        // Server-first TCP through both sidecars: the server's listener answers first.
        let r = self
            .exec("client", "app", &Connect::new(VIP_ECHO.parse()?, AS_IS))
            .await?;
        ensure!(
            r.stdout.contains("\"listener\":\"echo\""),
            "TCP to {VIP_ECHO}: {r:?}"
        );
        println!(
            "  app -> {VIP_ECHO} (server-first TCP): relayed by both sidecars to the echo listener"
        );
        Ok(())
    }

    /// Scenario 2: install-cni chained the plugin; pods are captured at RunPodSandbox from
    /// their annotations, or not.
    async fn cni_path(&mut self) -> Result<()> {
        let conf_dir = self.node.host.resolve("/etc/cni/net.d");
        let conf = std::fs::read_to_string(conf_dir.join("10-bridge.conflist"))?;
        let conf: serde_json::Value = serde_json::from_str(&conf)?;
        let plugins = conf["plugins"]
            .as_array()
            .context("no plugins in the conflist")?;
        ensure!(
            plugins.last().is_some_and(|p| p["type"] == "sockmesh"),
            "install-cni did not chain sockmesh last: {conf}"
        );
        ensure!(
            self.node.host.resolve("/opt/cni/bin/sockmesh").is_file(),
            "install-cni did not install the plugin binary"
        );
        println!("  install-cni chained sockmesh into the node's conflist");
        let before = self.registered()?;
        let injected = workloads::injected_pod(
            &self.docs,
            "cni-app",
            "default",
            &App::new(&[("app", vec!["pause".into()])]),
            true,
            &[],
        )?;
        // Captured at RunPodSandbox, before any container: check between the two.
        let dir = self.node.pod_dir("cni-app")?;
        let place = PodPlace {
            host: self.node.host.clone(),
            cgroup_parent: self.node.cgroup_parent("cni-app"),
            dir: dir.clone(),
            config_maps: workloads::config_maps(
                &dir,
                "cni-app",
                &workloads::proxy_config(Some(&self.server_ip)),
            )?,
        };
        let sandbox = self
            .cri
            .run_pod(manifest::sandbox_config(&injected, &place, 0))
            .await?;
        let ns = self.netns(&sandbox).await?;
        let v = self.verdict(&ns)?;
        ensure!(
            v == "redirect to localhost:15001",
            "after RunPodSandbox of an injected pod: {v}"
        );
        let mut running = Running {
            pod: injected.clone(),
            sandbox,
            containers: HashMap::new(),
            init_failed: None,
            dir,
            attempts: 0,
        };
        for c in injected.containers() {
            let name = c["name"].as_str().unwrap_or_default().to_string();
            let id = self
                .cri
                .start(
                    &running.sandbox,
                    manifest::container_config(&injected, c, &place)?,
                )
                .await?;
            running.containers.insert(name, id);
            self.wait_started(&running, c).await?;
        }
        self.pods.push(running);
        let r = self
            .exec(
                "cni-app",
                "app",
                &HttpGet::new(VIP_V1.parse()?, "/", "reviews", AS_IS),
            )
            .await?;
        ensure!(
            r.stdout.contains("v1 GET / host=reviews from=127.0.0.6"),
            "GET {VIP_V1} from cni-app: {r:?}"
        );
        let added: Vec<u64> = self.registered()?.difference(&before).copied().collect();
        ensure!(added.len() == 1, "one pod more registered, got {added:?}");
        println!("  annotated pod: captured at RunPodSandbox; its app reaches {VIP_V1} through its sidecar");

        for (name, namespace, annotated) in [
            ("cni-plain", "default", false),
            ("cni-system", "kube-system", true),
        ] {
            let mut pod = workloads::injected_pod(
                &self.docs,
                name,
                namespace,
                &App::new(&[("app", vec!["pause".into()])]),
                true,
                &[],
            )?;
            if !annotated {
                pod.annotations.clear();
            }
            let running = self
                .run_pod(pod, Some(&workloads::proxy_config(None)))
                .await?;
            let ns = self.netns(&running.sandbox).await?;
            self.pods.push(running);
            let v = self.verdict(&ns)?;
            ensure!(
                v == "not registered",
                "{name} ({namespace}, annotated: {annotated}): {v}"
            );
        }
        println!("  a pod without the annotation, and one in kube-system: not captured");
        self.delete("cni-app").await?;
        let now = self.registered()?;
        ensure!(
            !now.contains(&added[0]),
            "cni-app is still registered after RemovePodSandbox"
        );
        println!("  StopPodSandbox/RemovePodSandbox: unregistered");
        for name in ["cni-plain", "cni-system"] {
            self.delete(name).await?;
        }
        Ok(())
    }

    /// Scenario 3: connections open and close without pause while the agent's container is
    /// SIGKILLed and recreated, then its pod replaced by one of another image tag.
    async fn agent_restart_and_upgrade_under_traffic(&mut self) -> Result<()> {
        let client = self.pod("client")?;
        let app = client.id("app")?.to_string();
        let stop_file = client.dir.join("volumes/control/stop");
        let _ = std::fs::remove_file(&stop_file);
        // Through both sidecars: the echo listener sees the server's sidecar (127.0.0.6).
        let load = Load {
            max_ms: 180_000,
            from: Some("127.0.0.6".into()),
            ..Load::new(VIP_ECHO.parse()?, "echo", "/control/stop".into(), AS_IS)
        };
        let mut argv = vec!["/usr/local/bin/sockmesh-testkit".to_string()];
        argv.extend(load.argv().iter().map(|a| a.to_string_lossy().into_owned()));
        let mut cri = self.cri.clone();
        let traffic = tokio::spawn(async move {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            cri.exec(&app, &argv, 240).await
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.kill_agent_container().await?;
        println!("  agent container SIGKILLed");
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.restart_agent_container().await?;
        println!("  agent container recreated and ready");
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.delete_agent().await?;
        println!("  agent pod deleted (DaemonSet roll)");
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.start_agent(workloads::SOCKMESH_IMAGE_NEXT).await?;
        println!("  agent pod of {} ready", workloads::SOCKMESH_IMAGE_NEXT);
        tokio::time::sleep(Duration::from_secs(2)).await;
        std::fs::write(&stop_file, "")?;
        let out = traffic.await??;
        let report: LoadReport = serde_json::from_str(out.stdout.trim())
            .with_context(|| format!("load's report: {out:?}"))?;
        println!(
            "  connections: {} through both sidecars, {} escaped, {} failed",
            report.captured, report.escaped, report.failed
        );
        ensure!(
            report.escaped == 0 && report.failed == 0,
            "connections escaped or failed: {report:?}"
        );
        ensure!(
            report.captured >= 100,
            "too few connections to tell: {report:?}"
        );
        Ok(())
    }

    /// Scenario 4: a pod deleted while the agent is down is forgotten once it is back.
    async fn pod_deleted_while_agent_down(&mut self) -> Result<()> {
        let before = self.registered()?;
        let pod = workloads::injected_pod(
            &self.docs,
            "short",
            "default",
            &App::new(&[("app", vec!["pause".into()])]),
            true,
            &[],
        )?;
        let running = self
            .run_pod(pod, Some(&workloads::proxy_config(None)))
            .await?;
        self.pods.push(running);
        let added: Vec<u64> = self.registered()?.difference(&before).copied().collect();
        ensure!(added.len() == 1, "the pod was not registered: {added:?}");
        self.kill_agent_container().await?;
        self.delete("short").await?;
        println!("  agent down; pod deleted (CNI DEL with no agent succeeded)");
        ensure!(
            self.registered()?.contains(&added[0]),
            "the entry went without an agent?"
        );
        self.restart_agent_container().await?;
        let until = Instant::now() + Duration::from_secs(30);
        while self.registered()?.contains(&added[0]) {
            if Instant::now() > until {
                bail!("the deleted pod is still registered 30 s after the agent came back");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        println!("  agent back: the deleted pod is forgotten");
        Ok(())
    }

    /// Scenario 5: the node's own traffic and a hostNetwork pod are never captured. A trap
    /// listens on 127.0.0.1:15001 of the node: a captured connection would land there.
    async fn never_captured(&mut self) -> Result<()> {
        let trap = Listen {
            listeners: vec![Listener::new(
                ListenerKind::Report,
                "trap",
                "127.0.0.1:15001".parse()?,
            )],
        };
        let args: Vec<String> = trap
            .argv()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pod = workloads::host_network_pod("hostnet", &args)?;
        let running = self.run_pod(pod, None).await?;
        self.pods.push(running);
        let r = self
            .exec(
                "hostnet",
                "app",
                &Connect::new("127.0.0.1:15001".parse()?, AS_IS),
            )
            .await?;
        ensure!(
            r.stdout.contains("\"listener\":\"trap\""),
            "the trap does not answer: {r:?}"
        );
        let r = self
            .exec("hostnet", "app", &Connect::new(VIP_V1.parse()?, AS_IS))
            .await?;
        ensure!(
            !r.stdout.contains("\"listener\":\"trap\""),
            "the hostNetwork pod was captured: {r:?}"
        );
        let vip: SocketAddr = VIP_V1.parse()?;
        let node_try = in_netns(&self.node.netns_path(), move || {
            Ok(std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(1)).is_ok())
        })?;
        ensure!(
            !node_try,
            "the node's own connection to {VIP_V1} was taken by something"
        );
        let v = self.verdict(&self.node.netns_path())?;
        ensure!(v == "not registered", "the node's netns: {v}");
        println!("  hostNetwork pod and the node itself: {VIP_V1} not redirected (the trap on 15001 saw nothing)");
        self.delete("hostnet").await?;
        Ok(())
    }

    /// Scenario 6: an init container with a bad flag exits non-zero and leaves the pod
    /// uncaptured; the agent with no bpffs or no cgroup2 mount is never ready and says why.
    async fn bad_input(&mut self) -> Result<()> {
        let pod = workloads::injected_pod(
            &self.docs,
            "bad-flag",
            "default",
            &App::new(&[("app", vec!["pause".into()])]),
            false,
            &["--no-such-flag"],
        )?;
        let running = self
            .run_pod(pod, Some(&workloads::proxy_config(None)))
            .await?;
        let (name, exit) = running
            .init_failed
            .clone()
            .context("istio-init with a bad flag exited 0")?;
        let log = running.log(&name);
        let ns = self.netns(&running.sandbox).await?;
        self.pods.push(running);
        ensure!(
            exit.code != 0 && log.contains("no-such-flag"),
            "{name}: {exit:?}, log:\n{log}"
        );
        let v = self.verdict(&ns)?;
        ensure!(v == "not registered", "a pod whose init failed: {v}");
        println!(
            "  istio-init with a bad flag: exit {}, '{}', pod not captured",
            exit.code,
            first_line(&log)
        );
        self.delete("bad-flag").await?;

        self.delete_agent().await?;
        for (volume, want) in [("bpffs", "bpf"), ("cgroup", "cgroup")] {
            let mut pod = workloads::agent_pod(&self.docs)?;
            pod.name = format!("agent-no-{volume}");
            // The node lacks the mount: the hostPath is a plain folder.
            set_host_path(&mut pod, volume, &format!("/var/lib/not-{volume}"))?;
            if let Some(c) = pod.spec["containers"].as_sequence_mut() {
                c.retain(|c| c["name"] == "agent");
            }
            let running = self.run_pod_waiting(pod, None, false).await?;
            let addr: SocketAddr = AGENT_METRICS.parse()?;
            let until = Instant::now() + Duration::from_secs(10);
            while Instant::now() < until {
                if matches!(self.node.http_get(addr, "/readyz"), Ok((200, _))) {
                    bail!("the agent without its {volume} mount became ready");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let exit = self.cri.exit(running.id("agent")?).await?;
            let log = running.log("agent");
            self.cri.delete_pod(&running.sandbox.id).await?;
            ensure!(
                log.to_lowercase().contains(want),
                "the agent without its {volume} mount does not say why:\n{log}"
            );
            println!(
                "  agent without its {volume} mount: never ready ({}); its log: '{}'",
                match exit {
                    Some(e) => format!("exited {}", e.code),
                    None => "running".into(),
                },
                last_line(&log)
            );
        }
        // The node's real agent again, for what follows.
        self.start_agent(workloads::SOCKMESH_IMAGE).await?;
        Ok(())
    }
}

/// The scenarios' names, in order.
const SCENARIOS: &[&str] = &[
    "init container path (istio's injection with the sockmesh template)",
    "CNI path (install-cni, annotations at RunPodSandbox)",
    "agent SIGKILLed, recreated and upgraded under traffic",
    "pod deleted while the agent is down",
    "never captured: the node, a hostNetwork pod",
    "bad input: a bad init flag, an agent without bpffs or cgroup2",
];

fn check_init(p: &Running) -> Result<()> {
    if let Some((name, exit)) = &p.init_failed {
        bail!("{} {name} exited {exit:?}:\n{}", p.pod.name, p.log(name));
    }
    Ok(())
}

fn set_host_path(pod: &mut Pod, volume: &str, path: &str) -> Result<()> {
    let v = pod.spec["volumes"]
        .as_sequence_mut()
        .and_then(|vs| vs.iter_mut().find(|v| v["name"] == volume))
        .with_context(|| format!("no volume {volume}"))?;
    v["hostPath"] = serde_yaml::from_str(&format!("{{path: {path}, type: DirectoryOrCreate}}"))?;
    Ok(())
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn indent(s: &str) -> String {
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn last_line(s: &str) -> &str {
    s.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
}

fn first_line(s: &str) -> &str {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or("")
}

//! sockmesh-proxy in a pod, behind istio's iptables rules (loaded by the real iptables) and
//! behind sockmesh: the same requests must reach the same upstreams, through the same routes.

use std::net::SocketAddr;

use sockmesh_tests::{
    kit::{
        checksum, pattern, Connect, GrpcCall, GrpcServe, HttpGet, HttpKeepalive, HttpServe,
        HttpStream, HttpTransfer, HttpUpgrade, HttpUpstream, Identity, Launch, Listen, Listener,
        Outcome, TlsHello,
    },
    lab::{sibling_bin, Lab, Place},
    pods::{self, Mode, Pod, PEER_V4, PEER_V6, POD_V4, POD_V6},
    profiles::Profile,
};

const VIP: &str = "10.96.0.10";

/// `ip`:`port`.
fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// The service VIP's port 80, which capture sends to the proxy.
fn vip() -> SocketAddr {
    at(VIP, 80)
}

/// An upstream named `name` on the peer's `port`.
fn upstream(name: &str, port: u16) -> HttpUpstream {
    HttpUpstream::new(name, at(PEER_V4, port))
}

fn proxy_config(lab: &Lab) -> std::path::PathBuf {
    let path = lab.dir.join("proxy.yaml");
    let yaml = format!(
        r#"
admin: {{address: "127.0.0.1:15000"}}
listeners:
  - {{name: outbound, address: "0.0.0.0:15001", direction: outbound}}
  - {{name: inbound, address: "0.0.0.0:15006", direction: inbound}}
virtual_hosts:
  - name: grpc
    domains: ["grpc-svc"]
    routes: [{{route: {{cluster: grpc}}}}]
  - name: reviews-v2
    domains: ["reviews-v2"]
    routes: [{{route: {{cluster: reviews-v2}}}}]
  - name: keepalive
    domains: ["keepalive"]
    routes: [{{route: {{cluster: keepalive}}}}]
  - name: reviews
    domains: ["reviews", "{VIP}:80"]
    routes:
      - match: {{prefix: /v2}}
        route: {{cluster: reviews-v2}}
      - match: {{prefix: /, headers: [{{name: x-user, present: true}}]}}
        route: {{cluster: reviews-sticky}}
      - route: {{cluster: reviews}}
        response_headers_to_add: [{{name: x-route, value: default}}]
tls_routes:
  - {{sni: "*.secure.example", cluster: tls}}
tcp_routes:
  - {{destination: "9090"}}
clusters:
  - name: tls
    endpoints: [{{address: "{PEER_V4}:9090"}}]
  - name: grpc
    http2: true
    endpoints: [{{address: "{PEER_V4}:18096"}}]
  - name: reviews
    lb_policy: round_robin
    endpoints: [{{address: "{PEER_V4}:18081"}}, {{address: "{PEER_V4}:18082"}}]
  - name: reviews-v2
    endpoints: [{{address: "{PEER_V4}:18083"}}]
  - name: keepalive
    endpoints: [{{address: "{PEER_V4}:18084"}}]
  - name: reviews-sticky
    lb_policy: maglev
    hash_policy: {{header: x-user}}
    endpoints: [{{address: "{PEER_V4}:18081"}}, {{address: "{PEER_V4}:18082"}}]
"#
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

/// The app's GET (uid 1000) of `path` from `host` at `dst`, with headers `hdr`, from the pod or
/// from its peer; the whole response.
fn get(
    lab: &Lab,
    pod: &Pod,
    from_peer: bool,
    dst: SocketAddr,
    path: &str,
    host: &str,
    hdr: &[&str],
) -> String {
    let place = if from_peer {
        pod.peer_place()
    } else {
        pod.place()
    };
    let get = HttpGet {
        headers: hdr.iter().map(|h| h.to_string()).collect(),
        ..HttpGet::new(dst, path, host, Identity::APP)
    };
    lab.output(place, &get).unwrap()
}

/// The proxy's admin endpoint (localhost is never captured): the answer to `path`.
fn admin(lab: &Lab, pod: &Pod, path: &str) -> String {
    get(lab, pod, false, at("127.0.0.1", 15000), path, "admin", &[])
}

/// A lab for pods captured by `mode`, tagged `tag` and the mode's initial.
fn lab_for(tag: &str, mode: Mode) -> Lab {
    let initial = match mode {
        Mode::Iptables => 'i',
        Mode::Sockmesh => 's',
    };
    pods::lab_for(&format!("{tag}{initial}"), mode).unwrap()
}

/// Start the testkit's server `program` at `place`.
fn serve<P: Launch>(lab: &mut Lab, place: Place, program: &P) {
    lab.start(place, program).unwrap();
}

/// Start sockmesh-proxy in the pod with `config`, then capture the pod's traffic to it (with
/// istio's iptables rules, or by sockmesh).
fn start_proxy(lab: &mut Lab, pod: &Pod, config: &std::path::Path, mode: Mode, p: &Profile) {
    let bin = sibling_bin("sockmesh-proxy", "SOCKMESH_PROXY_BIN").unwrap();
    let mut proxy = lab.command_at(pod.place(), bin).unwrap();
    proxy.arg("--config").arg(config);
    lab.spawn(proxy, Some("ready")).unwrap();
    pods::capture(lab, pod, p, mode).unwrap();
}

/// Run the testkit's client `program` in the pod (in its cgroup); its stdout, trimmed.
fn in_pod<P: Launch>(lab: &Lab, pod: &Pod, program: &P) -> String {
    lab.output(pod.place(), program).unwrap().trim().to_string()
}

/// Run the testkit's client `program` on the pod's peer (the client of inbound traffic); its
/// stdout, trimmed.
fn on_peer<P: Launch>(lab: &Lab, pod: &Pod, program: &P) -> String {
    lab.output(pod.peer_place(), program)
        .unwrap()
        .trim()
        .to_string()
}

/// A TCP connection's outcome, as `what` and where it landed from which client.
fn tcp_summary(what: &str, out: &str) -> String {
    match serde_json::from_str::<Outcome>(out).unwrap() {
        Outcome::Ok {
            listener,
            client_ip,
            ..
        } => format!("{what} {listener} from={client_ip}"),
        other => format!("{what} {other:?}"),
    }
}

/// The body line of a response (the upstream's report), with the x-route header if any.
fn summary(resp: &str) -> String {
    let route = resp
        .lines()
        .find_map(|l| l.strip_prefix("x-route: "))
        .map(|r| format!(" [route {r}]"))
        .unwrap_or_default();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or(resp).trim();
    format!("{body}{route}")
}

/// Run the scenario with the pod captured by `mode`; what each request produced.
fn scenario(mode: Mode) -> Vec<String> {
    let mut lab = lab_for("px", mode);
    let p = Profile::default_sidecar();
    let pod = pods::pod_with(&mut lab, "p", &p, mode, &[]).unwrap();
    // Upstreams on the peer; the app in the pod.
    let ups = HttpServe::new([
        upstream("up1", 18081),
        upstream("up2", 18082),
        upstream("v2", 18083),
        upstream("direct", 18090),
    ]);
    serve(&mut lab, pod.peer_place(), &ups);
    let keepalive = HttpKeepalive {
        addrs: vec![at(PEER_V4, 18084)],
    };
    serve(&mut lab, pod.peer_place(), &keepalive);
    let grpc = GrpcServe {
        addr: at(PEER_V4, 18096),
    };
    serve(&mut lab, pod.peer_place(), &grpc);
    let app = HttpServe::new([HttpUpstream::new("app", pods::any_v4(8080))]);
    serve(&mut lab, pod.place(), &app);
    let app_grpc = GrpcServe {
        addr: pods::any_v4(8096),
    };
    serve(&mut lab, pod.place(), &app_grpc);
    let app_tcp = Listen {
        listeners: vec![Listener::report("app-tcp", pods::any_v4(9090))],
    };
    serve(&mut lab, pod.place(), &app_tcp);
    let config = proxy_config(&lab);
    start_proxy(&mut lab, &pod, &config, mode, &p);

    let mut seen = Vec::new();
    let vip = vip();
    // The app's GET to `dst`, summarized.
    let app_get = |dst: SocketAddr, path: &str, host: &str, hdr: &[&str]| {
        summary(&get(&lab, &pod, false, dst, path, host, hdr))
    };
    // Round robin over the VIP's cluster, by Host and by original destination.
    for _ in 0..2 {
        seen.push(app_get(vip, "/a", "reviews", &[]));
    }
    for _ in 0..2 {
        seen.push(app_get(vip, "/b", "unknown.host", &[]));
    }
    // A prefix route.
    seen.push(app_get(vip, "/v2/x", "reviews", &[]));
    // Consistent hashing on a header: the same user, the same upstream.
    let sticky: Vec<String> = (0..4)
        .map(|_| app_get(vip, "/", "reviews", &["x-user: alice"]))
        .collect();
    assert!(sticky.windows(2).all(|w| w[0] == w[1]), "{sticky:?}");
    seen.extend(sticky);
    // No route: passed through to the original destination.
    seen.push(app_get(at(PEER_V4, 18090), "/", "elsewhere", &[]));
    // Raw TCP (server-first): relayed to the original destination.
    let out = in_pod(&lab, &pod, &Connect::new(at(PEER_V4, 9090), Identity::APP));
    seen.push(tcp_summary("tcp", &out));
    // Inbound: from the peer to the app, through the inbound listener, from 127.0.0.6.
    let app = at(POD_V4, 8080);
    seen.push(summary(&get(&lab, &pod, true, app, "/in", "app", &[])));
    // A WebSocket-style upgrade through a routed cluster, with a half-close after it.
    let upgrade = HttpUpgrade::new(vip, "reviews-v2", "hello", Identity::APP);
    seen.push(in_pod(&lab, &pod, &upgrade));
    // Large bodies both ways, streamed through a route without retries (5 MB each).
    for (path, bytes) in [("/upload", 5_000_000), ("/bytes/5000000", 0)] {
        let transfer = HttpTransfer::new(vip, path, "reviews-v2", bytes, Identity::APP);
        seen.push(in_pod(&lab, &pod, &transfer));
    }
    // gRPC (HTTP/2 with prior knowledge, status in trailers) routed by authority: first eight
    // clients whose calls reach the proxy together, before it has an upstream connection, then
    // two more; the upstream counts its connections, one shared by all their streams.
    let call = GrpcCall::new(vip, "grpc-svc", Identity::APP);
    let burst = GrpcCall {
        together: Some(8),
        ..call.clone()
    };
    assert_eq!(in_pod(&lab, &pod, &burst), "8 of 8 calls succeeded");
    for _ in 0..2 {
        seen.push(in_pod(&lab, &pod, &call));
    }
    // TLS passed through by server name: a named one to its cluster, another to where it went.
    for sni in ["api.secure.example", "other.example"] {
        let hello = TlsHello {
            dst: at(PEER_V4, 9091),
            sni: sni.into(),
            id: Identity::APP,
        };
        let text = in_pod(&lab, &pod, &hello);
        let first = text.split(' ').next().unwrap_or_default();
        seen.push(format!("tls {sni} -> {first}"));
    }
    // HTTP/1.1 asking to upgrade to h2c is answered in HTTP/1.1, and the upgrade does not
    // reach the upstream (which would switch and echo).
    let h2c = [
        "upgrade: h2c",
        "http2-settings: AAMAAABkAAQCAAAAAAIAAAAA",
        "connection: Upgrade, HTTP2-Settings",
    ];
    let r = get(&lab, &pod, false, vip, "/h2c", "reviews-v2", &h2c);
    seen.push(format!(
        "{} {}",
        r.lines().next().unwrap_or_default(),
        summary(&r)
    ));
    // Inbound, through the inbound listener to the app: an upgrade with a half-close, large
    // bodies both ways, gRPC with trailers.
    let upgrade = HttpUpgrade::new(app, "app", "hello", Identity::ROOT);
    seen.push(on_peer(&lab, &pod, &upgrade));
    for (path, bytes) in [("/upload", 5_000_000), ("/bytes/5000000", 0)] {
        let transfer = HttpTransfer::new(app, path, "app", bytes, Identity::ROOT);
        seen.push(on_peer(&lab, &pod, &transfer));
    }
    let app_call = GrpcCall::new(at(POD_V4, 8096), "app", Identity::ROOT);
    seen.push(on_peer(&lab, &pod, &app_call));
    // Raw TCP inbound (server-first, its port declared): to the app from 127.0.0.6.
    let out = on_peer(&lab, &pod, &Connect::new(at(POD_V4, 9090), Identity::ROOT));
    seen.push(tcp_summary("tcp inbound", &out));
    // A response streamed in chunks 200 ms apart arrives as it is sent, both ways.
    let out = HttpStream::new(vip, "reviews-v2", Identity::APP);
    seen.push(format!("outbound {}", in_pod(&lab, &pod, &out)));
    let inb = HttpStream::new(app, "app", Identity::ROOT);
    seen.push(format!("inbound {}", on_peer(&lab, &pod, &inb)));
    // Hop-by-hop headers stay on their hop: the upstream sees neither `connection` nor what it
    // names, nor keep-alive, but `te: trailers` and the end-to-end ones.
    let hop = [
        "connection: close, x-hop",
        "x-hop: 1",
        "keep-alive: timeout=5",
        "te: trailers",
        "x-end: 2",
    ];
    seen.push(app_get(vip, "/headers", "reviews-v2", &hop));
    // So a client's `connection: close` closes its own connection, and the proxy's upstream
    // connection (a keep-alive upstream) serves the next client too.
    let on_conn: Vec<String> = (0..2)
        .map(|_| {
            let r = get(&lab, &pod, false, vip, "/", "keepalive", &[]);
            r.lines()
                .find_map(|l| l.strip_prefix("x-request-on-connection: "))
                .unwrap_or("none")
                .trim()
                .to_string()
        })
        .collect();
    seen.push(format!(
        "upstream requests on its connection: {}",
        on_conn.join(" ")
    ));
    // A connection made to the proxy's outbound port itself (by the proxy's user, to
    // localhost, so not captured) is closed: relaying it to its "original destination" would
    // loop back.
    let own = Connect::new(at("127.0.0.1", 15001), Identity::PROXY);
    let out: Outcome = serde_json::from_str(&in_pod(&lab, &pod, &own)).unwrap();
    seen.push(match out {
        // Closed without a byte: no listener's report.
        Outcome::Ok { listener, .. } if listener.is_empty() => "to the proxy itself: closed".into(),
        other => format!("to the proxy itself: {other:?}"),
    });
    // A client that shuts its side once its request is sent (`nc -N`, some HTTP/1.0 clients)
    // still gets the response.
    let half = HttpGet {
        half_close: true,
        ..HttpGet::new(vip, "/half", "reviews-v2", Identity::APP)
    };
    seen.push(format!(
        "half-closed client: {}",
        summary(&in_pod(&lab, &pod, &half))
    ));
    // The admin endpoint (localhost is never captured): stats and endpoint health.
    let stats = admin(&lab, &pod, "/stats/prometheus");
    for endpoint in [18081, 18082] {
        let line = format!(
            "sockmesh_proxy_upstream_rq_total{{cluster=\"reviews\",endpoint=\"{PEER_V4}:{endpoint}\",code_class=\"2xx\"}} 2"
        );
        assert!(stats.contains(&line), "no {line} in\n{stats}");
    }
    let sticky = "sockmesh_proxy_requests_total{route=\"reviews/1\",cluster=\"reviews-sticky\",code_class=\"2xx\"} 4";
    assert!(stats.contains(sticky), "no {sticky} in\n{stats}");
    let inbound = "sockmesh_proxy_downstream_cx_total{listener=\"inbound\"} 7";
    assert!(stats.contains(inbound), "no {inbound} in\n{stats}");
    let clusters = admin(&lab, &pod, "/clusters");
    let healthy = format!("reviews::{PEER_V4}:18081::health_flags::healthy");
    assert!(clusters.contains(&healthy), "{clusters}");
    seen
}

#[test]
fn routes_and_balances_the_same_under_iptables_and_sockmesh() {
    let ipt = scenario(Mode::Iptables);
    let expected_prefix = [
        format!("up1 GET /a host=reviews from={POD_V4} [route default]"),
        format!("up2 GET /a host=reviews from={POD_V4} [route default]"),
        // By original destination (VIP:port) when the authority is unknown.
        format!("up1 GET /b host=unknown.host from={POD_V4} [route default]"),
        format!("up2 GET /b host=unknown.host from={POD_V4} [route default]"),
        format!("v2 GET /v2/x host=reviews from={POD_V4}"),
    ];
    assert_eq!(ipt[..5], expected_prefix, "{ipt:#?}");
    assert_eq!(ipt[9], format!("direct GET / host=elsewhere from={POD_V4}"));
    assert_eq!(ipt[10], format!("tcp peer:9090 from={POD_V4}"));
    assert_eq!(ipt[11], "app GET /in host=app from=127.0.0.6");
    assert_eq!(
        ipt[12],
        "v2 echoes: hello (client closed its side; v2 says bye)"
    );
    // Large bodies arrive whole, in both directions.
    let five_mb = pattern(5_000_000);
    let upload = format!("v2 got 5000000 bytes sum={:016x}\n", checksum(&five_mb));
    assert_eq!(
        ipt[13],
        format!(
            "status=200 len={} sum={:016x}",
            upload.len(),
            checksum(upload.as_bytes())
        )
    );
    assert_eq!(
        ipt[14],
        format!("status=200 len=5000000 sum={:016x}", checksum(&five_mb))
    );
    for grpc in &ipt[15..17] {
        assert_eq!(
            grpc,
            "status cookie=1 registered=true; unregister PermissionDenied: trailers arrived"
        );
    }
    assert_eq!(ipt[17], "tls api.secure.example -> listener=peer:9090");
    assert_eq!(ipt[18], "tls other.example -> listener=peer:9091");
    assert_eq!(
        ipt[19],
        format!("HTTP/1.1 200 X v2 GET /h2c host=reviews-v2 from={POD_V4}")
    );
    assert_eq!(
        ipt[20],
        "app echoes: hello (client closed its side; app says bye)"
    );
    let app_upload = format!("app got 5000000 bytes sum={:016x}\n", checksum(&five_mb));
    assert_eq!(
        ipt[21],
        format!(
            "status=200 len={} sum={:016x}",
            app_upload.len(),
            checksum(app_upload.as_bytes())
        )
    );
    assert_eq!(ipt[22], ipt[14], "the 5 MB download, inbound");
    assert_eq!(ipt[24], "tcp inbound app-tcp from=127.0.0.6");
    assert_eq!(
        ipt[25..27],
        [
            "outbound chunks=4 streamed=true",
            "inbound chunks=4 streamed=true"
        ]
    );
    assert_eq!(
        ipt[23],
        "status cookie=1 registered=true; unregister PermissionDenied: trailers arrived"
    );
    assert_eq!(ipt[27], "v2 headers: host,te,x-end");
    assert_eq!(ipt[28], "upstream requests on its connection: 1 2");
    assert_eq!(ipt[29], "to the proxy itself: closed");
    assert_eq!(
        ipt[30],
        format!("half-closed client: v2 GET /half host=reviews-v2 from={POD_V4}")
    );
    let smesh = scenario(Mode::Sockmesh);
    assert_eq!(smesh, ipt, "sockmesh and iptables disagree");
}

/// Retries, outlier ejection, fault injection and mirroring, seen from the upstreams, with the
/// proxy behind iptables and behind sockmesh.
#[test]
fn retries_ejection_faults_and_mirroring_are_seen_by_the_upstreams() {
    resilience(Mode::Iptables);
    resilience(Mode::Sockmesh);
}

fn resilience(mode: Mode) {
    let mut lab = lab_for("pxr", mode);
    let p = Profile::default_sidecar();
    let pod = pods::pod_with(&mut lab, "p", &p, mode, &[]).unwrap();
    let log = lab.dir.join("upstreams.log");
    let failing = |name: &str, port: u16| HttpUpstream::failing(name, at(PEER_V4, port), 503);
    let ups = HttpServe {
        log: Some(log.clone()),
        ..HttpServe::new([
            failing("bad", 18091),
            upstream("good", 18092),
            failing("bad2", 18093),
            upstream("good2", 18094),
            upstream("shadow", 18095),
        ])
    };
    serve(&mut lab, pod.peer_place(), &ups);
    let config = lab.dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
admin: {{address: "127.0.0.1:15000"}}
listeners:
  - {{name: outbound, address: "0.0.0.0:15001", direction: outbound}}
virtual_hosts:
  - name: hc
    domains: [hc]
    routes: [{{route: {{cluster: hc}}}}]
  - name: flaky
    domains: [flaky]
    routes:
      - route: {{cluster: flaky, retry_policy: {{retry_on: "5xx", num_retries: 2, base_interval_ms: 1}}}}
  - name: eject
    domains: [eject]
    routes: [{{route: {{cluster: eject}}}}]
  - name: faults
    domains: [faults]
    routes:
      - match: {{prefix: /abort}}
        fault: {{abort: {{http_status: 418}}}}
        route: {{cluster: good}}
      - match: {{prefix: /delay}}
        fault: {{delay: {{fixed_delay_ms: 300}}}}
        route: {{cluster: good}}
  - name: shop
    domains: [shop]
    routes:
      - route: {{cluster: good, request_mirror_policies: [{{cluster: shadow}}]}}
  - name: slow
    domains: [slow]
    routes: [{{route: {{cluster: good, timeout_ms: 300}}}}]
clusters:
  - name: flaky
    endpoints: [{{address: "{PEER_V4}:18091"}}, {{address: "{PEER_V4}:18092"}}]
  - name: eject
    outlier_detection: {{consecutive_5xx: 2, base_ejection_time_ms: 60000, max_ejection_percent: 50}}
    endpoints: [{{address: "{PEER_V4}:18093"}}, {{address: "{PEER_V4}:18094"}}]
  - name: good
    endpoints: [{{address: "{PEER_V4}:18092"}}]
  - name: shadow
    endpoints: [{{address: "{PEER_V4}:18095"}}]
  - name: hc
    health_check: {{interval_ms: 100, unhealthy_threshold: 2, http_path: /healthz}}
    endpoints: [{{address: "{PEER_V4}:18091"}}, {{address: "{PEER_V4}:18092"}}]
  - name: tcp-hc
    health_check: {{interval_ms: 100, unhealthy_threshold: 2}}
    endpoints: [{{address: "{PEER_V4}:18099"}}, {{address: "{PEER_V4}:18092"}}]
"#
        ),
    )
    .unwrap();
    start_proxy(&mut lab, &pod, &config, mode, &p);
    let vip = vip();
    let status = |resp: &str| resp.split(' ').nth(1).unwrap_or_default().to_string();
    let seen = |name: &str, path: &str| {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&format!("{name} ")) && l.contains(&format!(" {path} ")))
            .count()
    };

    // Retries: every answer is the good upstream's, though half the first tries hit the bad one.
    for i in 0..4 {
        let r = get(&lab, &pod, false, vip, &format!("/r{i}"), "flaky", &[]);
        assert_eq!(status(&r), "200", "{r}");
        assert!(summary(&r).starts_with("good "), "{r}");
    }
    let bad_tries: usize = (0..4).map(|i| seen("bad", &format!("/r{i}"))).sum();
    assert!(bad_tries >= 2, "the retried upstream saw {bad_tries} tries");

    // Outlier ejection: after two 503s in a row bad2 is ejected; it sees no more requests.
    let answers: Vec<String> = (0..10)
        .map(|i| {
            status(&get(
                &lab,
                &pod,
                false,
                vip,
                &format!("/e{i}"),
                "eject",
                &[],
            ))
        })
        .collect();
    let bad2: usize = (0..10).map(|i| seen("bad2", &format!("/e{i}"))).sum();
    assert_eq!(
        bad2, 2,
        "bad2 should see exactly the two requests that ejected it"
    );
    assert_eq!(
        answers.iter().filter(|s| *s == "503").count(),
        2,
        "{answers:?}"
    );
    assert!(answers[4..].iter().all(|s| s == "200"), "{answers:?}");

    // Fault injection: an abort never reaches the upstream; a delay holds the request.
    let r = get(&lab, &pod, false, vip, "/abort", "faults", &[]);
    assert_eq!(status(&r), "418", "{r}");
    assert_eq!(seen("good", "/abort"), 0);
    let t = std::time::Instant::now();
    let r = get(&lab, &pod, false, vip, "/delay", "faults", &[]);
    assert_eq!(status(&r), "200", "{r}");
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(300),
        "no delay: {:?}",
        t.elapsed()
    );

    // Mirroring: the shadow sees a copy with "-shadow" on its Host; the client gets good's.
    let r = get(&lab, &pod, false, vip, "/buy", "shop", &[]);
    assert!(summary(&r).starts_with("good GET /buy host=shop "), "{r}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text
            .lines()
            .any(|l| l == "shadow GET /buy host=shop-shadow")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no shadow request:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // Active health checks: the endpoint answering 503 to /healthz gets no traffic.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let failing = format!("hc::{PEER_V4}:18091::health_flags::/failed_active_hc");
    // The TCP check: nothing listens on 18099.
    let tcp_failing = format!("tcp-hc::{PEER_V4}:18099::health_flags::/failed_active_hc");
    let tcp_healthy = format!("tcp-hc::{PEER_V4}:18092::health_flags::healthy");
    loop {
        let clusters = admin(&lab, &pod, "/clusters");
        if clusters.contains(&failing)
            && clusters.contains(&tcp_failing)
            && clusters.contains(&tcp_healthy)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no failed health check:\n{clusters}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for i in 0..6 {
        let r = get(&lab, &pod, false, vip, &format!("/hc{i}"), "hc", &[]);
        assert!(summary(&r).starts_with("good "), "{r}");
    }
    assert_eq!(
        (0..6)
            .map(|i| seen("bad", &format!("/hc{i}")))
            .sum::<usize>(),
        0
    );

    // A per-route timeout: the client gets 504 long before the upstream, which got the
    // request, answers.
    let t = std::time::Instant::now();
    let r = get(&lab, &pod, false, vip, "/sleep/1500", "slow", &[]);
    assert_eq!(status(&r), "504", "{r}");
    assert!(
        t.elapsed() < std::time::Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while seen("good", "/sleep/1500") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the upstream never got the timed-out request"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // Reload on file change: shop now goes to the shadow cluster; a request in flight on a
    // connection made before goes on with the configuration it started with; a broken file
    // is refused and the running configuration kept.
    let in_flight = std::thread::scope(|s| {
        let before = s.spawn(|| get(&lab, &pod, false, vip, "/sleep/2500", "shop", &[]));
        std::thread::sleep(std::time::Duration::from_millis(300));
        reload_to_shadow(&lab, &pod, &config, vip);
        before.join().unwrap()
    });
    assert!(
        summary(&in_flight).starts_with("good GET /sleep/2500 host=shop "),
        "{in_flight}"
    );
    std::fs::write(&config, "listeners: [ this is not valid").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let r = get(&lab, &pod, false, vip, "/still", "shop", &[]);
    assert!(summary(&r).starts_with("shadow GET /still"), "{r}");
}

/// The access log is off by default (as Istio's meshConfig leaves it); `access_log: true` in
/// the file, reloaded, turns it on; written to a file, it has no terminal colour codes.
#[test]
fn the_access_log_is_off_until_configured_and_plain_text_in_a_file() {
    let mode = Mode::Sockmesh;
    let mut lab = lab_for("pxlog", mode);
    let p = Profile::default_sidecar();
    let pod = pods::pod_with(&mut lab, "p", &p, mode, &[]).unwrap();
    serve(
        &mut lab,
        pod.peer_place(),
        &HttpServe::new([upstream("up1", 18081)]),
    );
    let config = lab.dir.join("proxy.yaml");
    let yaml = format!(
        r#"
listeners:
  - {{name: outbound, address: "0.0.0.0:15001", direction: outbound}}
virtual_hosts:
  - name: reviews
    domains: ["reviews"]
    routes: [{{route: {{cluster: reviews}}}}]
clusters:
  - name: reviews
    endpoints: [{{address: "{PEER_V4}:18081"}}]
"#
    );
    std::fs::write(&config, &yaml).unwrap();
    let log = lab.dir.join("proxy.log");
    let bin = sibling_bin("sockmesh-proxy", "SOCKMESH_PROXY_BIN").unwrap();
    let mut proxy = lab.command_at(pod.place(), bin).unwrap();
    proxy.arg("--config").arg(&config);
    lab.spawn_logged(proxy, Some("ready"), &log).unwrap();
    pods::capture(&lab, &pod, &p, mode).unwrap();
    let vip = vip();

    let r = get(&lab, &pod, false, vip, "/quiet", "reviews", &[]);
    assert!(summary(&r).starts_with("up1 GET /quiet"), "{r}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("/quiet"),
        "access log written by default:\n{text}"
    );
    assert!(text.contains("listening"), "no log at all:\n{text}");

    // Turned on in the file, which the proxy reloads when it changes.
    std::fs::write(&config, format!("access_log: true\n{yaml}")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let line = loop {
        let r = get(&lab, &pod, false, vip, "/loud", "reviews", &[]);
        assert!(summary(&r).starts_with("up1 GET /loud"), "{r}");
        let text = std::fs::read_to_string(&log).unwrap();
        if let Some(l) = text.lines().find(|l| l.contains("GET /loud 200")) {
            break l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no access line:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(line.contains("access"), "{line}");
    assert!(line.contains(&format!("orig={vip}")), "{line}");
    assert!(line.contains("cluster=reviews"), "{line}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains('\u{1b}'), "colour codes in a file:\n{text}");
}

/// Rewrite the resilience test's file so that shop goes to the shadow cluster; wait until the
/// proxy has it.
fn reload_to_shadow(lab: &Lab, pod: &Pod, config: &std::path::Path, vip: SocketAddr) {
    let text = std::fs::read_to_string(config).unwrap();
    let changed = text.replace(
        "{cluster: good, request_mirror_policies: [{cluster: shadow}]}",
        "{cluster: shadow}",
    );
    assert_ne!(changed, text);
    std::fs::write(config, &changed).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let r = get(lab, pod, false, vip, "/after", "shop", &[]);
        if summary(&r).starts_with("shadow GET /after") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not reloaded: {r}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// A dual-stack pod (istio's `ISTIO_DUAL_STACK`): the proxy's listeners are IPv6 sockets that
/// also take IPv4, so IPv4 connections arrive v4-mapped and their original destination must
/// still be read at the IPv4 level.
fn dual_stack_scenario(mode: Mode) -> Vec<String> {
    let mut lab = lab_for("p6", mode);
    let mut p = Profile::default_sidecar();
    p.dual_stack = true;
    let pod = pods::pod_with(&mut lab, "p", &p, mode, &[]).unwrap();
    let ups = HttpServe::new([
        HttpUpstream::new("direct6", at(PEER_V6, 18090)),
        HttpUpstream::new("up6", at(PEER_V6, 18081)),
        upstream("direct4", 18091),
    ]);
    serve(&mut lab, pod.peer_place(), &ups);
    let app = HttpServe::new([HttpUpstream::new("app", pods::any_v6(8080))]);
    serve(&mut lab, pod.place(), &app);
    let config = lab.dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
listeners:
  - {{name: outbound, address: "[::]:15001", direction: outbound}}
  - {{name: inbound, address: "[::]:15006", direction: inbound}}
virtual_hosts:
  - name: svc6
    domains: [svc6]
    routes: [{{route: {{cluster: up6}}}}]
clusters:
  - name: up6
    endpoints: [{{address: "[{PEER_V6}]:18081"}}]
"#
        ),
    )
    .unwrap();
    start_proxy(&mut lab, &pod, &config, mode, &p);
    // (from the peer, destination, path, host) of each request.
    let requests = [
        (false, at(PEER_V6, 18090), "/", "elsewhere"),
        (false, at(PEER_V6, 80), "/", "svc6"),
        (false, at(PEER_V4, 18091), "/", "v4"),
        (true, at(POD_V6, 8080), "/in6", "app"),
        (true, at(POD_V4, 8080), "/in4", "app"),
    ];
    requests
        .into_iter()
        .map(|(from_peer, dst, path, host)| {
            summary(&get(&lab, &pod, from_peer, dst, path, host, &[]))
        })
        .collect()
}

#[test]
fn dual_stack_pod_the_same_under_iptables_and_sockmesh() {
    let ipt = dual_stack_scenario(Mode::Iptables);
    assert_eq!(
        ipt,
        [
            format!("direct6 GET / host=elsewhere from={POD_V6}"),
            format!("up6 GET / host=svc6 from={POD_V6}"),
            format!("direct4 GET / host=v4 from={POD_V4}"),
            "app GET /in6 host=app from=::6".to_string(),
            "app GET /in4 host=app from=::ffff:127.0.0.6".to_string(),
        ]
    );
    assert_eq!(dual_stack_scenario(Mode::Sockmesh), ipt);
}

/// Three requests at once to `/sleep/MS` of `host` through the VIP; their status codes.
fn concurrent_statuses(lab: &Lab, pod: &Pod, host: &str, ms: u64) -> Vec<String> {
    let vip = vip();
    let path = format!("/sleep/{ms}");
    let mut out: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| get(lab, pod, false, vip, &path, host, &[])))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                r.split(' ').nth(1).unwrap_or("none").to_string()
            })
            .collect()
    });
    out.sort();
    out
}

#[test]
fn a_control_plane_drives_listeners_routes_clusters_and_endpoints_over_ads() {
    use sockmesh_tests::xds::{self, ControlPlane, Verdict, CLUSTER, ENDPOINT, LISTENER, ROUTE};
    use std::time::Duration;
    let mut lab = lab_for("pxx", Mode::Sockmesh);
    let p = Profile::default_sidecar();
    let pod = pods::pod_with(&mut lab, "p", &p, Mode::Sockmesh, &[]).unwrap();
    let ups = HttpServe::new([
        upstream("up1", 18081),
        upstream("up2", 18082),
        upstream("v2", 18083),
    ]);
    serve(&mut lab, pod.peer_place(), &ups);
    let app = HttpServe::new([HttpUpstream::new("app", pods::any_v4(8080))]);
    serve(&mut lab, pod.place(), &app);

    // The control plane's first state: clusters, their endpoints, one listener, its routes.
    let cp = ControlPlane::start(&lab.dir.join("xds.sock")).unwrap();
    let ep = |port: u16| at(PEER_V4, port);
    use envoy_types::pb::envoy::config::cluster::v3::cluster::LbPolicy;
    let clusters = |extra: Option<(String, envoy_types::pb::google::protobuf::Any)>| {
        let mut v = vec![
            xds::eds_cluster("reviews", LbPolicy::RoundRobin, None),
            xds::eds_cluster("reviews-v2", LbPolicy::RoundRobin, None),
            xds::eds_cluster("limited", LbPolicy::RoundRobin, Some((1, 1))),
        ];
        v.extend(extra);
        v
    };
    let c1 = cp.set(CLUSTER, clusters(None));
    let endpoints = |reviews: &[u16]| {
        vec![
            xds::assignment(
                "reviews",
                &reviews.iter().map(|p| ep(*p)).collect::<Vec<_>>(),
            ),
            xds::assignment("reviews-v2", &[ep(18083)]),
            xds::assignment("limited", &[ep(18081)]),
        ]
    };
    let e1 = cp.set(ENDPOINT, endpoints(&[18081, 18082]));
    let outbound = || {
        xds::listener(
            "outbound",
            "0.0.0.0:15001".parse().unwrap(),
            false,
            Some("80"),
        )
    };
    let l1 = cp.set(LISTENER, vec![outbound()]);
    let routes = |default: &str| {
        xds::route_config(
            "80",
            vec![
                (
                    "reviews",
                    vec!["reviews".into(), format!("{VIP}:80")],
                    vec![
                        xds::route("/v2", "reviews-v2", "v2"),
                        xds::route("/", default, "xds"),
                    ],
                ),
                (
                    "limited",
                    vec!["limited".into()],
                    vec![xds::route("/", "limited", "limited")],
                ),
            ],
        )
    };
    let r1 = cp.set(ROUTE, vec![routes("reviews")]);

    // The proxy knows only the control plane and its admin address.
    let config = lab.dir.join("proxy.yaml");
    let sock = lab.dir.join("xds.sock");
    std::fs::write(
        &config,
        format!(
            "admin: {{address: \"127.0.0.1:15000\"}}\nxds: {{address: \"unix:{}\", node_id: \"sidecar~{POD_V4}~p.lab~lab.svc.cluster.local\"}}\n",
            sock.display()
        ),
    )
    .unwrap();
    start_proxy(&mut lab, &pod, &config, Mode::Sockmesh, &p);

    let wait = Duration::from_secs(10);
    for (type_url, v) in [(CLUSTER, c1), (ENDPOINT, e1), (LISTENER, l1), (ROUTE, r1)] {
        assert_eq!(
            cp.answer(type_url, v, wait).unwrap(),
            Verdict::Ack,
            "{type_url} v{v}"
        );
    }
    let node = cp.seen();
    assert!(
        node.iter()
            .any(|s| s.type_url == ENDPOINT && s.resource_names.iter().any(|n| n == "limited")),
        "EDS is asked for by cluster name: {node:#?}"
    );
    let vip = vip();
    let ask = |path: &str, host: &str| summary(&get(&lab, &pod, false, vip, path, host, &[]));
    // Round robin over the EDS endpoints; a prefix route; by Host and by VIP.
    let mut rr = vec![ask("/a", "reviews"), ask("/a", "reviews")];
    rr.sort();
    assert_eq!(
        rr,
        [
            format!("up1 GET /a host=reviews from={POD_V4} [route xds]"),
            format!("up2 GET /a host=reviews from={POD_V4} [route xds]"),
        ]
    );
    assert_eq!(
        ask("/v2/x", "unknown.host"),
        format!("v2 GET /v2/x host=unknown.host from={POD_V4} [route v2]")
    );

    // Endpoints change (EDS): up1 leaves the cluster.
    let e2 = cp.set(ENDPOINT, endpoints(&[18082]));
    assert_eq!(cp.answer(ENDPOINT, e2, wait).unwrap(), Verdict::Ack);
    for _ in 0..3 {
        assert!(ask("/e", "reviews").starts_with("up2 "));
    }
    // Routes change (RDS): the default route goes to reviews-v2.
    let r2 = cp.set(ROUTE, vec![routes("reviews-v2")]);
    assert_eq!(cp.answer(ROUTE, r2, wait).unwrap(), Verdict::Ack);
    assert_eq!(
        ask("/r", "reviews"),
        format!("v2 GET /r host=reviews from={POD_V4} [route xds]")
    );

    // A cluster the proxy cannot honour: refused with the reason, the previous clusters stay.
    let bad = xds::eds_cluster("odd", LbPolicy::ClusterProvided, None);
    let c2 = cp.set(CLUSTER, clusters(Some(bad)));
    let Verdict::Nack(nack) = cp.answer(CLUSTER, c2, wait).unwrap() else {
        panic!("the cluster with an lb_policy it cannot honour was accepted");
    };
    assert!(
        nack.contains("Cluster \"odd\"") && nack.contains("lb_policy"),
        "{nack}"
    );
    assert_eq!(
        ask("/after-nack", "reviews"),
        format!("v2 GET /after-nack host=reviews from={POD_V4} [route xds]")
    );

    // Circuit breakers from CDS: one request in flight, one waiting, the third refused.
    assert_eq!(
        concurrent_statuses(&lab, &pod, "limited", 1500),
        ["200", "200", "503"]
    );

    // Listeners change (LDS): an inbound listener is added, then the outbound one removed.
    let inbound = xds::listener("inbound", "0.0.0.0:15006".parse().unwrap(), true, None);
    let l2 = cp.set(LISTENER, vec![outbound(), inbound.clone()]);
    assert_eq!(cp.answer(LISTENER, l2, wait).unwrap(), Verdict::Ack);
    let from_peer = summary(&get(&lab, &pod, true, at(POD_V4, 8080), "/in", "app", &[]));
    assert_eq!(from_peer, "app GET /in host=app from=127.0.0.6");
    let l3 = cp.set(LISTENER, vec![inbound]);
    assert_eq!(cp.answer(LISTENER, l3, wait).unwrap(), Verdict::Ack);
    let gone = HttpGet::new(vip, "/gone", "reviews", Identity::APP);
    let gone = lab.testkit(pod.place(), &gone).unwrap().output().unwrap();
    let text = String::from_utf8_lossy(&gone.stdout);
    assert!(
        !gone.status.success() && !text.contains("GET /gone"),
        "the outbound listener was removed, yet: {text}"
    );
    let dump = admin(&lab, &pod, "/config_dump");
    assert!(
        dump.contains("from the control plane") && dump.contains("\"inbound\""),
        "{dump}"
    );
}

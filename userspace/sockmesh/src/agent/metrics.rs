//! The agent's HTTP endpoint: Prometheus metrics (`/metrics`), liveness (`/healthz`) and
//! readiness (`/readyz`, once the programs are in force and registrations are served).

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use sockmesh_common::{counters as ev, Reason};
use tracing::warn;

use crate::core::maps::PinnedMaps;

/// Shared with the agent: the maps (once loaded) and whether it is ready.
#[derive(Default)]
pub struct Health {
    pub ready: AtomicBool,
    pub maps: Mutex<Option<Arc<Mutex<PinnedMaps>>>>,
    /// What the guard put right.
    pub repairs: Arc<super::guard::Repairs>,
}

/// Serve on `addr` from a background thread.
pub fn serve(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let bound = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let health = health.clone();
            std::thread::spawn(move || {
                if let Err(e) = answer(conn, &health) {
                    warn!(error = %e, "metrics request failed");
                }
            });
        }
    });
    Ok(bound)
}

fn answer(conn: TcpStream, health: &Health) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut first = String::new();
    let mut reader = BufReader::new(&conn);
    reader.read_line(&mut first)?;
    // Drain the headers.
    loop {
        let mut l = String::new();
        if reader.read_line(&mut l)? == 0 || l == "\r\n" || l == "\n" {
            break;
        }
    }
    let path = first.split_whitespace().nth(1).unwrap_or("/");
    let ready = health.ready.load(Ordering::SeqCst);
    let (status, body) = match path {
        "/healthz" => ("200 OK", "ok\n".to_string()),
        "/readyz" if ready => ("200 OK", "ready\n".to_string()),
        "/readyz" => ("503 Service Unavailable", "not ready\n".to_string()),
        "/metrics" => match render(health) {
            Ok(b) => ("200 OK", b),
            Err(e) => ("500 Internal Server Error", format!("{e}\n")),
        },
        _ => (
            "404 Not Found",
            "not found: try /metrics, /healthz, /readyz\n".to_string(),
        ),
    };
    let mut out = &conn;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Prometheus text format.
pub fn render(health: &Health) -> anyhow::Result<String> {
    let mut out = String::new();
    let ready = health.ready.load(Ordering::SeqCst);
    writeln!(out, "# HELP sockmesh_agent_ready Whether the agent has its programs in force and serves registrations.")?;
    writeln!(out, "# TYPE sockmesh_agent_ready gauge")?;
    writeln!(out, "sockmesh_agent_ready {}", ready as u8)?;
    writeln!(out, "# HELP sockmesh_agent_repairs_total What the agent put back after someone else changed it: cgroup links unpinned, detached or switched to another program, pods' map entries changed or removed, foreign pod entries.")?;
    writeln!(out, "# TYPE sockmesh_agent_repairs_total counter")?;
    for (what, n) in health.repairs.counts() {
        writeln!(out, "sockmesh_agent_repairs_total{{what=\"{what}\"}} {n}")?;
    }
    let Some(maps) = health.maps.lock().expect("lock").clone() else {
        return Ok(out);
    };
    let maps = maps.lock().expect("maps lock");
    let pods = maps.pods.keys().flatten().count();
    let live = maps.orig_dst.keys().flatten().count();
    let counts = maps.counters()?;
    writeln!(out, "# HELP sockmesh_pods Registered pods.")?;
    writeln!(out, "# TYPE sockmesh_pods gauge")?;
    writeln!(out, "sockmesh_pods {pods}")?;
    writeln!(
        out,
        "# HELP sockmesh_original_destinations Live original-destination records."
    )?;
    writeln!(out, "# TYPE sockmesh_original_destinations gauge")?;
    writeln!(out, "sockmesh_original_destinations {live}")?;
    writeln!(out, "# HELP sockmesh_decisions_total Capture decisions, by pod (netns cookie) and the rule that made them.")?;
    writeln!(out, "# TYPE sockmesh_decisions_total counter")?;
    for (netns, c) in &counts {
        for r in Reason::ALL {
            if let Some(n) = c.get(r.name()) {
                writeln!(
                    out,
                    "sockmesh_decisions_total{{netns=\"{netns}\",reason=\"{}\"}} {n}",
                    r.name()
                )?;
            }
        }
    }
    writeln!(out, "# HELP sockmesh_events_total Original-destination lookups, getpeername rewrites and other events, by pod.")?;
    writeln!(out, "# TYPE sockmesh_events_total counter")?;
    for (netns, c) in &counts {
        for code in [
            ev::ORIG_DST_HIT,
            ev::ORIG_DST_LOCAL,
            ev::PEERNAME_REWRITE,
            ev::ORIG_DST_STORE_FAILED,
            ev::ORIG_DST_LOST,
            ev::ORIG_DST_RELEASED,
            ev::LISTENER_STORE_FAILED,
            ev::ACCEL_SOCK_ADDED,
            ev::ACCEL_SOCK_FULL,
        ] {
            let name = ev::name(code).expect("named counter");
            if let Some(n) = c.get(name) {
                writeln!(
                    out,
                    "sockmesh_events_total{{netns=\"{netns}\",event=\"{name}\"}} {n}"
                )?;
            }
        }
    }
    Ok(out)
}

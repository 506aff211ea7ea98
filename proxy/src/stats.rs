//! Counters, gauges and latency histograms, rendered in Prometheus' text format.
//!
//! Series are keyed by metric name and labels, found by a hash of the borrowed name and
//! labels: counting an existing series allocates nothing. A series counted on every
//! connection or request is looked up once into a handle ([`Counter`], [`Gauge`],
//! [`Latency`]) held by what it counts (a listener, a route, an endpoint), which then counts
//! with atomic adds and no lookup; [`ByClass`] and [`RouteStats`] make them per status class.

use std::{
    fmt::Write,
    hash::{Hash, Hasher},
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, LazyLock, Mutex, OnceLock,
    },
};

use crate::fxhash::{Fx, FxHashMap};

type Labels = Vec<(&'static str, String)>;

struct Series<T> {
    name: &'static str,
    labels: Labels,
    value: T,
}

/// Series of one kind, by the hash of their name and labels (collisions share a bucket).
struct Table<T>(FxHashMap<u64, Vec<Series<T>>>);

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table(FxHashMap::default())
    }
}

impl<T: Default> Table<T> {
    fn get(&mut self, name: &'static str, l: &[(&'static str, &str)]) -> &mut T {
        let mut h = Fx::default();
        name.hash(&mut h);
        l.hash(&mut h);
        let bucket = self.0.entry(h.finish()).or_default();
        let same = |s: &Series<T>| {
            s.name == name
                && s.labels.len() == l.len()
                && s.labels
                    .iter()
                    .zip(l)
                    .all(|((k, v), (k2, v2))| k == k2 && v == v2)
        };
        let i = match bucket.iter().position(same) {
            Some(i) => i,
            None => {
                bucket.push(Series {
                    name,
                    labels: labels(l),
                    value: T::default(),
                });
                bucket.len() - 1
            }
        };
        &mut bucket[i].value
    }
}

impl<T> Table<T> {
    /// Every series, by name and then labels.
    fn sorted(&self) -> Vec<&Series<T>> {
        let mut all: Vec<&Series<T>> = self.0.values().flatten().collect();
        all.sort_by(|a, b| (a.name, &a.labels).cmp(&(b.name, &b.labels)));
        all
    }
}

/// Latency bucket bounds, in milliseconds.
const BUCKETS_MS: [f64; 14] = [
    0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];

/// A latency histogram: requests by the first bucket they fit (cumulated when rendered), their
/// sum in microseconds, and their number.
#[derive(Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS_MS.len()],
    sum_us: AtomicU64,
    total: AtomicU64,
}

impl Histogram {
    fn observe_ms(&self, ms: f64) {
        if let Some(i) = BUCKETS_MS.iter().position(|bound| ms <= *bound) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us
            .fetch_add((ms * 1000.0) as u64, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Registry {
    counters: Table<Arc<AtomicU64>>,
    gauges: Table<Arc<AtomicI64>>,
    histograms: Table<Arc<Histogram>>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Default::default);

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

/// The series `name` with labels `l` in the registry's table for its kind (`table`), made if
/// new: the one lookup behind every handle.
fn lookup<T: Default>(
    table: fn(&mut Registry) -> &mut Table<Arc<T>>,
    name: &'static str,
    l: &[(&'static str, &str)],
) -> Arc<T> {
    let mut registry = REGISTRY.lock().expect("stats lock");
    Arc::clone(table(&mut registry).get(name, l))
}

/// Count one in the counter series `name` with labels `l` (for rare events: what is counted
/// often holds a [`Counter`]).
pub fn inc(name: &'static str, l: &[(&'static str, &str)]) {
    counter(name, l).inc();
}

/// One counter series, looked up once.
#[derive(Clone)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// The counter series `name` with labels `l` (made at 0 if new).
pub fn counter(name: &'static str, l: &[(&'static str, &str)]) -> Counter {
    Counter(lookup(|r| &mut r.counters, name, l))
}

/// One gauge series, looked up once.
#[derive(Clone)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn add(&self, delta: i64) {
        self.0.fetch_add(delta, Ordering::Relaxed);
    }
}

/// The gauge series `name` with labels `l` (made at 0 if new).
pub fn gauge(name: &'static str, l: &[(&'static str, &str)]) -> Gauge {
    Gauge(lookup(|r| &mut r.gauges, name, l))
}

/// One latency histogram series, looked up once.
#[derive(Clone)]
pub struct Latency(Arc<Histogram>);

impl Latency {
    pub fn observe_ms(&self, ms: f64) {
        self.0.observe_ms(ms);
    }
}

/// The histogram series `name` with labels `l` (made empty if new).
pub fn latency(name: &'static str, l: &[(&'static str, &str)]) -> Latency {
    Latency(lookup(|r| &mut r.histograms, name, l))
}

/// A counter series for each status class (its `code_class` label), each looked up the first
/// time a response of its class is counted: classes never seen make no series.
#[derive(Default)]
pub struct ByClass([OnceLock<Counter>; 5]);

impl ByClass {
    pub const fn new() -> ByClass {
        ByClass([const { OnceLock::new() }; 5])
    }

    /// Count a response of `status`; `lookup(class)` finds its series the first time.
    pub fn inc(&self, status: u16, lookup: impl FnOnce(&'static str) -> Counter) {
        let i = class_index(status);
        self.0[i].get_or_init(|| lookup(CLASSES[i])).inc();
    }
}

/// A route's requests to one of its clusters: their responses by status class and, in the
/// cluster's series, their latency; each series looked up on first use.
#[derive(Default)]
pub struct RouteStats {
    responses: ByClass,
    latency: OnceLock<Latency>,
}

/// `sockmesh_proxy_requests_total`: requests by route, cluster and status class.
const REQUESTS: &str = "sockmesh_proxy_requests_total";

/// `sockmesh_proxy_request_duration_ms`: request latency by cluster.
const DURATION: &str = "sockmesh_proxy_request_duration_ms";

impl RouteStats {
    pub const fn new() -> RouteStats {
        RouteStats {
            responses: ByClass::new(),
            latency: OnceLock::new(),
        }
    }

    /// Count a request of `route` to `cluster` answered with `status` after `ms`.
    pub fn done(&self, route: &str, cluster: &str, status: u16, ms: f64) {
        self.responses.inc(status, |class| {
            counter(
                REQUESTS,
                &[
                    ("route", route),
                    ("cluster", cluster),
                    ("code_class", class),
                ],
            )
        });
        self.latency
            .get_or_init(|| latency(DURATION, &[("cluster", cluster)]))
            .observe_ms(ms);
    }
}

impl std::fmt::Debug for RouteStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RouteStats")
    }
}

impl std::fmt::Debug for ByClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ByClass")
    }
}

/// The `code_class` labels, by [`class_index`].
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A status code's class: 1xx to 4xx by their hundreds, anything else 5xx.
fn class_index(status: u16) -> usize {
    match status / 100 {
        h @ 1..=4 => usize::from(h - 1),
        _ => 4,
    }
}

fn series(out: &mut String, name: &str, l: &Labels, extra: Option<(&str, &str)>, value: &str) {
    out.push_str(name);
    let all: Vec<String> = l
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")))
        .chain(extra.map(|(k, v)| format!("{k}=\"{v}\"")))
        .collect();
    if !all.is_empty() {
        let _ = write!(out, "{{{}}}", all.join(","));
    }
    let _ = writeln!(out, " {value}");
}

/// Every series, in Prometheus' text exposition format.
pub fn render() -> String {
    let r = REGISTRY.lock().expect("stats lock");
    let mut out = String::new();
    let mut last = "";
    render_kind(&mut out, &mut last, "counter", &r.counters, |out, s| {
        scalar(out, s, s.value.load(Ordering::Relaxed))
    });
    render_kind(&mut out, &mut last, "gauge", &r.gauges, |out, s| {
        scalar(out, s, s.value.load(Ordering::Relaxed))
    });
    render_kind(&mut out, &mut last, "histogram", &r.histograms, histogram);
    out
}

/// The series of one kind of metric, each name's first after a `# TYPE` line (`last` is the
/// name written before).
fn render_kind<T>(
    out: &mut String,
    last: &mut &'static str,
    kind: &str,
    table: &Table<T>,
    write_series: impl Fn(&mut String, &Series<T>),
) {
    for s in table.sorted() {
        if s.name != *last {
            let _ = writeln!(out, "# TYPE {} {kind}", s.name);
            *last = s.name;
        }
        write_series(out, s);
    }
}

/// A counter's or a gauge's one line, with its `value` read.
fn scalar<T>(out: &mut String, s: &Series<T>, value: impl ToString) {
    series(out, s.name, &s.labels, None, &value.to_string());
}

/// A histogram's buckets, sum and count.
fn histogram(out: &mut String, s: &Series<Arc<Histogram>>) {
    let Series {
        name,
        labels: l,
        value: h,
    } = s;
    let bucket = format!("{name}_bucket");
    let mut below = 0;
    for (count, bound) in h.counts.iter().zip(BUCKETS_MS) {
        below += count.load(Ordering::Relaxed);
        series(
            out,
            &bucket,
            l,
            Some(("le", &bound.to_string())),
            &below.to_string(),
        );
    }
    let total = h.total.load(Ordering::Relaxed).to_string();
    series(out, &bucket, l, Some(("le", "+Inf")), &total);
    let sum_ms = h.sum_us.load(Ordering::Relaxed) as f64 / 1000.0;
    series(out, &format!("{name}_sum"), l, None, &sum_ms.to_string());
    series(out, &format!("{name}_count"), l, None, &total);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        inc("t_requests_total", &[("cluster", "a\"b")]);
        counter("t_requests_total", &[("cluster", "a\"b")]).inc();
        gauge("t_active", &[("listener", "outbound")]).add(2);
        gauge("t_active", &[("listener", "outbound")]).add(-1);
        latency("t_latency_ms", &[("cluster", "a")]).observe_ms(3.0);
        let text = render();
        assert!(
            text.contains(
                "# TYPE t_requests_total counter\nt_requests_total{cluster=\"a\\\"b\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains("t_active{listener=\"outbound\"} 1"), "{text}");
        assert!(
            text.contains("t_latency_ms_bucket{cluster=\"a\",le=\"2.5\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("t_latency_ms_bucket{cluster=\"a\",le=\"5\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("t_latency_ms_count{cluster=\"a\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn buckets_are_cumulative_and_classes_counted_apart() {
        let h = latency("t2_latency_ms", &[("cluster", "c")]);
        h.observe_ms(0.2);
        h.observe_ms(7.0);
        // Beyond the last bound: only in +Inf.
        h.observe_ms(20_000.0);
        let route = RouteStats::new();
        route.done("r/0", "c", 200, 1.0);
        route.done("r/0", "c", 204, 1.0);
        route.done("r/0", "c", 503, 1.0);
        let text = render();
        for line in [
            "t2_latency_ms_bucket{cluster=\"c\",le=\"0.5\"} 1",
            "t2_latency_ms_bucket{cluster=\"c\",le=\"5\"} 1",
            "t2_latency_ms_bucket{cluster=\"c\",le=\"10\"} 2",
            "t2_latency_ms_bucket{cluster=\"c\",le=\"10000\"} 2",
            "t2_latency_ms_bucket{cluster=\"c\",le=\"+Inf\"} 3",
            "t2_latency_ms_sum{cluster=\"c\"} 20007.2",
            "sockmesh_proxy_requests_total{route=\"r/0\",cluster=\"c\",code_class=\"2xx\"} 2",
            "sockmesh_proxy_requests_total{route=\"r/0\",cluster=\"c\",code_class=\"5xx\"} 1",
            "sockmesh_proxy_request_duration_ms_count{cluster=\"c\"} 3",
        ] {
            assert!(text.contains(line), "no {line} in\n{text}");
        }
        // No response of a class, no series of it.
        let none = "route=\"r/0\",cluster=\"c\",code_class=\"4xx\"";
        assert!(!text.contains(none), "{text}");
    }
}

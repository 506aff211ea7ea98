//! Counters, gauges and latency histograms, rendered in Prometheus' text format.
//!
//! Series are keyed by metric name and labels, found by a hash of the borrowed name and
//! labels: counting an existing series allocates nothing. A series counted on every
//! connection with labels known beforehand (a listener's) is resolved once into a
//! [`Counter`] or [`Gauge`] handle, which counts with one atomic add and no lookup.

use std::{
    collections::HashMap,
    fmt::Write,
    hash::{BuildHasherDefault, Hash, Hasher},
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc, LazyLock, Mutex,
    },
};

type Labels = Vec<(&'static str, String)>;

struct Series<T> {
    name: &'static str,
    labels: Labels,
    value: T,
}

/// A fast hash (rustc's Fx: a rotate, xor and multiply per 8 bytes) for the series table, whose
/// keys are the proxy's own metric names and labels (from its configuration), not a client's:
/// counting is on every request's path, and SipHash took a tenth of a request's instructions
/// (`cargo xtask profile`).
#[derive(Default, Clone, Copy)]
struct Fx(u64);

impl Fx {
    const K: u64 = 0x517c_c1b7_2722_0a95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::K);
    }
}

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, b: u8) {
        self.add(b.into());
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Series of one kind, by the hash of their name and labels (collisions share a bucket).
struct Table<T>(HashMap<u64, Vec<Series<T>>, BuildHasherDefault<Fx>>);

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table(HashMap::default())
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

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS_MS.len()],
    sum: f64,
    total: u64,
}

#[derive(Default)]
struct Registry {
    counters: Table<Arc<AtomicU64>>,
    gauges: Table<Arc<AtomicI64>>,
    histograms: Table<Histogram>,
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(Default::default);

fn labels(l: &[(&'static str, &str)]) -> Labels {
    l.iter().map(|(k, v)| (*k, v.to_string())).collect()
}

pub fn inc(name: &'static str, l: &[(&'static str, &str)]) {
    REGISTRY
        .lock()
        .expect("stats lock")
        .counters
        .get(name, l)
        .fetch_add(1, Ordering::Relaxed);
}

pub fn gauge(name: &'static str, l: &[(&'static str, &str)], delta: i64) {
    REGISTRY
        .lock()
        .expect("stats lock")
        .gauges
        .get(name, l)
        .fetch_add(delta, Ordering::Relaxed);
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
    Counter(
        REGISTRY
            .lock()
            .expect("stats lock")
            .counters
            .get(name, l)
            .clone(),
    )
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
pub fn gauge_series(name: &'static str, l: &[(&'static str, &str)]) -> Gauge {
    Gauge(
        REGISTRY
            .lock()
            .expect("stats lock")
            .gauges
            .get(name, l)
            .clone(),
    )
}

pub fn observe_ms(name: &'static str, l: &[(&'static str, &str)], ms: f64) {
    let mut r = REGISTRY.lock().expect("stats lock");
    let h = r.histograms.get(name, l);
    for (i, bound) in BUCKETS_MS.iter().enumerate() {
        if ms <= *bound {
            h.counts[i] += 1;
        }
    }
    h.sum += ms;
    h.total += 1;
}

/// `2xx`, `4xx`, ... for a status code.
pub fn class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
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
    render_kind(&mut out, &mut last, "counter", &r.counters, counter_line);
    render_kind(&mut out, &mut last, "gauge", &r.gauges, gauge_line);
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

/// A counter's one line.
fn counter_line(out: &mut String, s: &Series<Arc<AtomicU64>>) {
    let value = s.value.load(Ordering::Relaxed);
    series(out, s.name, &s.labels, None, &value.to_string());
}

/// A gauge's one line.
fn gauge_line(out: &mut String, s: &Series<Arc<AtomicI64>>) {
    let value = s.value.load(Ordering::Relaxed);
    series(out, s.name, &s.labels, None, &value.to_string());
}

/// A histogram's buckets, sum and count.
fn histogram(out: &mut String, s: &Series<Histogram>) {
    let Series {
        name,
        labels: l,
        value: h,
    } = s;
    let bucket = format!("{name}_bucket");
    for (count, bound) in h.counts.iter().zip(BUCKETS_MS) {
        series(
            out,
            &bucket,
            l,
            Some(("le", &bound.to_string())),
            &count.to_string(),
        );
    }
    series(out, &bucket, l, Some(("le", "+Inf")), &h.total.to_string());
    series(out, &format!("{name}_sum"), l, None, &h.sum.to_string());
    series(out, &format!("{name}_count"), l, None, &h.total.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        inc("t_requests_total", &[("cluster", "a\"b")]);
        counter("t_requests_total", &[("cluster", "a\"b")]).inc();
        gauge("t_active", &[("listener", "outbound")], 2);
        gauge_series("t_active", &[("listener", "outbound")]).add(-1);
        observe_ms("t_latency_ms", &[("cluster", "a")], 3.0);
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
}

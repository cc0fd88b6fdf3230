//! Metrics in the Prometheus text format (version 0.0.4), served on `metrics.listen`.
//!
//! One process-wide registry ([`METRICS`]), as Prometheus client libraries keep one: the
//! parts of the request path add to it where things happen (requests when their audit
//! record is final, connections when they end, each stage's latency, the broker's round
//! trips, the audit writer's batches), and [`Metrics::render`] writes it out. Counters and
//! histograms are atomics; the few labelled families are small maps behind a mutex, keyed
//! by values from a bounded set (governed hosts, decisions, modes, codes).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, LazyLock, Mutex, OnceLock,
    },
    time::Duration,
};

use crate::tls::leaf::LeafCache;

/// Latency buckets, seconds: 100 µs to 10 s.
const BUCKETS: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| s <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }
}

/// A request's labels after its host: decision, mode, status class.
type OutcomeLabels = (&'static str, &'static str, &'static str);

/// Everything wl counts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests by host, then by (decision, mode, status class). Keyed by host first so
    /// that counting a request looks its host up by `&str` and allocates nothing once the
    /// host has been seen.
    requests: Mutex<BTreeMap<String, BTreeMap<OutcomeLabels, u64>>>,
    /// Connections by what wl did with them.
    connections: Mutex<BTreeMap<&'static str, u64>>,
    /// Time to decide a request (Cedar).
    pub policy_seconds: Histogram,
    /// Time from sending a request upstream to its response head.
    pub upstream_seconds: Histogram,
    /// Time from a request's head to the end of its response.
    pub request_seconds: Histogram,
    /// Broker round trips (issue and redeem) for injected credentials.
    pub broker_seconds: Histogram,
    /// Credentials obtained and failures by code.
    credentials: Mutex<BTreeMap<String, u64>>,
    /// Leaves minted by the beacon CA.
    pub leaf_mints: AtomicU64,
    leaf_cache: OnceLock<Arc<LeafCache>>,
    /// Records handed to the audit writer.
    pub audit_records: AtomicU64,
    /// Records lost (queue full, or the disk refused them beyond what memory keeps).
    pub audit_dropped: AtomicU64,
    /// Failed batch writes.
    pub audit_write_errors: AtomicU64,
    /// Records waiting in memory for the disk.
    pub audit_retained: AtomicU64,
    /// Time to write each batch (and fsync it, when it holds a durable record or a
    /// checkpoint).
    pub audit_batch_seconds: Histogram,
    /// Records queued for the writer.
    pub audit_queued: AtomicU64,
    /// Requests whose response head has not been returned yet.
    pub requests_in_flight: AtomicU64,
    /// Idle HTTP/1.1 keep-alive connections parked without hyper's state.
    pub connections_parked: AtomicU64,
    /// Accepted connections waiting for a handshake slot (`proxy::admission`).
    pub connections_waiting: AtomicU64,
    /// Parked connections with a request waiting for a resume slot (`proxy::admission`).
    pub resumptions_waiting: AtomicU64,
    /// HTTP/2 connections opened to an upstream because every open one was full
    /// (`proxy::upstream::Lanes`).
    pub upstream_lanes_added: AtomicU64,
    /// Upstream HTTP/2 streams the server did not process (REFUSED_STREAM, GOAWAY).
    pub upstream_unprocessed_streams: AtomicU64,
}

/// Counts one unit of work in progress on a gauge for as long as it lives.
pub struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    /// Adds one to `gauge` until the guard is dropped.
    pub fn enter(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The registry.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    *map.lock().expect("metrics poisoned").entry(key).or_insert(0) += 1;
}

/// Escapes a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    /// A finished request.
    pub fn request(
        &self,
        host: &str,
        decision: Option<&'static str>,
        mode: Option<&'static str>,
        status: u16,
    ) {
        let class = match status {
            0 => "none",
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        let outcome = (decision.unwrap_or("none"), mode.unwrap_or("none"), class);
        let mut requests = self.requests.lock().expect("metrics poisoned");
        let by_outcome = match requests.get_mut(host) {
            Some(by_outcome) => by_outcome,
            None => requests.entry(host.to_owned()).or_default(),
        };
        *by_outcome.entry(outcome).or_insert(0) += 1;
    }

    /// A finished connection.
    pub fn connection(&self, action: &'static str) {
        bump(&self.connections, action);
    }

    /// A credential obtained (`injected`) or not (the failure's code).
    pub fn credential(&self, outcome: &str) {
        bump(&self.credentials, outcome.to_owned());
    }

    /// The leaf cache whose size is reported.
    pub fn watch_leaf_cache(&self, cache: Arc<LeafCache>) {
        let _ = self.leaf_cache.set(cache);
    }

    /// Requests so far by decision (for `wlctl status`).
    pub fn requests_by_decision(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for by_outcome in self.requests.lock().expect("metrics poisoned").values() {
            for ((decision, _, _), n) in by_outcome {
                *out.entry(*decision).or_insert(0) += n;
            }
        }
        out
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut out,
            "wl_requests_total",
            "counter",
            "HTTP requests, by host, policy decision, mode and status class.",
        );
        for (host, by_outcome) in self.requests.lock().expect("metrics poisoned").iter() {
            let host = label(host);
            for ((decision, mode, class), n) in by_outcome {
                let _ = writeln!(
                    out,
                    "wl_requests_total{{host=\"{host}\",decision=\"{decision}\",mode=\"{mode}\",status=\"{class}\"}} {n}"
                );
            }
        }
        family(
            &mut out,
            "wl_connections_total",
            "counter",
            "Intercepted connections, by what wl did with them.",
        );
        for (action, n) in self.connections.lock().expect("metrics poisoned").iter() {
            let _ = writeln!(out, "wl_connections_total{{action=\"{action}\"}} {n}");
        }
        family(&mut out, "wl_stage_duration_seconds", "histogram", "Latency per stage of the request path.");
        self.policy_seconds.render(&mut out, "wl_stage_duration_seconds", "stage=\"policy\"");
        self.upstream_seconds.render(&mut out, "wl_stage_duration_seconds", "stage=\"upstream\"");
        self.request_seconds.render(&mut out, "wl_stage_duration_seconds", "stage=\"request\"");
        family(
            &mut out,
            "wl_broker_duration_seconds",
            "histogram",
            "Secrets broker round trips (issue and redeem) per credential.",
        );
        self.broker_seconds.render(&mut out, "wl_broker_duration_seconds", "");
        family(&mut out, "wl_credentials_total", "counter", "Credentials injected, and failures by code.");
        for (outcome, n) in self.credentials.lock().expect("metrics poisoned").iter() {
            let _ = writeln!(out, "wl_credentials_total{{outcome=\"{}\"}} {n}", label(outcome));
        }
        family(
            &mut out,
            "wl_upstream_lanes_added_total",
            "counter",
            &format!(
                "HTTP/2 connections opened to an upstream because every open one carried {} streams.",
                crate::proxy::upstream::STREAMS_PER_LANE
            ),
        );
        let _ = writeln!(
            out,
            "wl_upstream_lanes_added_total {}",
            self.upstream_lanes_added.load(Ordering::Relaxed)
        );
        family(
            &mut out,
            "wl_upstream_unprocessed_streams_total",
            "counter",
            "Upstream HTTP/2 streams the server did not process (REFUSED_STREAM, or above its GOAWAY's last stream); a request whose body is known whole is sent again.",
        );
        let _ = writeln!(
            out,
            "wl_upstream_unprocessed_streams_total {}",
            self.upstream_unprocessed_streams.load(Ordering::Relaxed)
        );
        family(&mut out, "wl_leaf_mints_total", "counter", "Leaf certificates minted by the beacon CA.");
        let _ = writeln!(out, "wl_leaf_mints_total {}", self.leaf_mints.load(Ordering::Relaxed));
        family(&mut out, "wl_leaf_cache_entries", "gauge", "Server names with a cached leaf certificate.");
        let _ = writeln!(out, "wl_leaf_cache_entries {}", self.leaf_cache.get().map_or(0, |c| c.len()));
        family(&mut out, "wl_audit_records_total", "counter", "Records handed to the audit writer.");
        let _ = writeln!(out, "wl_audit_records_total {}", self.audit_records.load(Ordering::Relaxed));
        family(
            &mut out,
            "wl_audit_dropped_records_total",
            "counter",
            "Audit records lost (queue full, or kept in memory beyond its bound while the disk refused).",
        );
        let _ =
            writeln!(out, "wl_audit_dropped_records_total {}", self.audit_dropped.load(Ordering::Relaxed));
        family(
            &mut out,
            "wl_audit_write_errors_total",
            "counter",
            "Audit batch writes that failed (and were retried).",
        );
        let _ =
            writeln!(out, "wl_audit_write_errors_total {}", self.audit_write_errors.load(Ordering::Relaxed));
        family(
            &mut out,
            "wl_audit_retained_records",
            "gauge",
            "Audit records waiting in memory for the disk.",
        );
        let _ = writeln!(out, "wl_audit_retained_records {}", self.audit_retained.load(Ordering::Relaxed));
        family(
            &mut out,
            "wl_audit_queue_depth",
            "gauge",
            "Records queued for the audit writer (the write lag, in records).",
        );
        let _ = writeln!(out, "wl_audit_queue_depth {}", self.audit_queued.load(Ordering::Relaxed));
        family(
            &mut out,
            "wl_requests_in_flight",
            "gauge",
            "Requests received whose response head has not been returned yet.",
        );
        let _ = writeln!(out, "wl_requests_in_flight {}", self.requests_in_flight.load(Ordering::Relaxed));
        family(
            &mut out,
            "wl_connections_parked",
            "gauge",
            "Idle HTTP/1.1 keep-alive connections parked: only their TLS session is kept until the next request.",
        );
        let _ = writeln!(out, "wl_connections_parked {}", self.connections_parked.load(Ordering::Relaxed));
        family(
            &mut out,
            "wl_connections_waiting",
            "gauge",
            &format!(
                "Accepted connections waiting for one of the handshake slots (at most {} connections are in their handshake at once).",
                crate::proxy::admission::HANDSHAKE_SLOTS
            ),
        );
        let _ = writeln!(out, "wl_connections_waiting {}", self.connections_waiting.load(Ordering::Relaxed));
        family(
            &mut out,
            "wl_resumptions_waiting",
            "gauge",
            &format!(
                "Parked connections whose next request waits for one of the resume slots (at most {} resumed connections serve a request at once).",
                crate::proxy::admission::RESUME_SLOTS
            ),
        );
        let _ = writeln!(out, "wl_resumptions_waiting {}", self.resumptions_waiting.load(Ordering::Relaxed));
        family(
            &mut out,
            "wl_audit_batch_duration_seconds",
            "histogram",
            "Time to write each audit batch, with its fsync when it has one.",
        );
        self.audit_batch_seconds.render(&mut out, "wl_audit_batch_duration_seconds", "");
        out
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener) {
    use http_body_util::Full;
    use hyper::{body::Bytes, server::conn::http1, service::service_fn, Response, StatusCode};
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        tokio::spawn(async move {
            let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let resp = if req.uri().path() == "/metrics" {
                    Response::builder()
                        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                        .body(Full::new(Bytes::from(METRICS.render())))
                } else {
                    Response::builder()
                        .status(StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from("try /metrics\n")))
                };
                Ok::<_, std::convert::Infallible>(resp.expect("static response parts are valid"))
            });
            let _ =
                http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(stream), service).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_host_and_outcome() {
        let m = Metrics::default();
        m.request("api.openai.com", Some("allow"), Some("observe"), 200);
        m.request("api.openai.com", Some("allow"), Some("observe"), 204);
        m.request("api.openai.com", Some("deny"), Some("enforce"), 403);
        m.request("a\"b", None, None, 0);
        let text = m.render();
        assert!(text.contains(
            "wl_requests_total{host=\"api.openai.com\",decision=\"allow\",mode=\"observe\",status=\"2xx\"} 2\n"
        ));
        assert!(text.contains(
            "wl_requests_total{host=\"api.openai.com\",decision=\"deny\",mode=\"enforce\",status=\"4xx\"} 1\n"
        ));
        assert!(text.contains(
            "wl_requests_total{host=\"a\\\"b\",decision=\"none\",mode=\"none\",status=\"none\"} 1\n"
        ));
        let by_decision = m.requests_by_decision();
        assert_eq!((by_decision["allow"], by_decision["deny"], by_decision["none"]), (2, 1, 1));
    }
}

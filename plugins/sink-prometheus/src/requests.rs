//! The sink's own metrics, aggregated from the gateway's request records: counts, durations,
//! bytes and upstream errors, labelled by API and operation (never by raw path).

use std::sync::Mutex;

use outpost_plugin_sdk::RequestRecord;
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::config::Settings;
use crate::guard::{SeriesGuard, OTHER};

/// The label value for a request that matched no API (or no operation).
pub const NONE: &str = "(none)";

/// Requests, by API, operation, method and status.
pub const REQUESTS: &str = "outpost_http_requests_total";
/// Time to the response head.
pub const DURATION: &str = "outpost_http_request_duration_seconds";
/// Time the backend took to answer with its head.
pub const BACKEND_DURATION: &str = "outpost_http_backend_duration_seconds";
/// Total minus backend time.
pub const GATEWAY_DURATION: &str = "outpost_http_gateway_duration_seconds";
/// Declared request body bytes.
pub const REQUEST_BYTES: &str = "outpost_http_request_bytes_total";
/// Response body bytes known at the head.
pub const RESPONSE_BYTES: &str = "outpost_http_response_bytes_total";
/// Backend calls that failed without an answer.
pub const UPSTREAM_ERRORS: &str = "outpost_upstream_errors_total";
/// Records whose labels were folded into `(other)`.
pub const FOLDED: &str = "outpost_prometheus_folded_total";

/// Every family name this module renders (re-exported metrics never use them).
pub const NAMES: [&str; 8] = [
    REQUESTS,
    DURATION,
    BACKEND_DURATION,
    GATEWAY_DURATION,
    REQUEST_BYTES,
    RESPONSE_BYTES,
    UPSTREAM_ERRORS,
    FOLDED,
];

/// Methods that keep their name as a label; any other is `OTHER` (as OpenTelemetry does).
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// A method as a bounded label value.
pub fn method_label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("OTHER")
}

/// One guard per family, in the order of [`NAMES`] (the last one, `FOLDED`, needs none: its
/// only label is a family name).
struct Guards([SeriesGuard; 7]);

/// The request metrics, in a registry of their own.
pub struct Requests {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    backend: HistogramVec,
    gateway: HistogramVec,
    bytes_in: IntCounterVec,
    bytes_out: IntCounterVec,
    upstream_errors: IntCounterVec,
    folded: IntCounterVec,
    guards: Mutex<Guards>,
}

fn counter(name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, String> {
    IntCounterVec::new(Opts::new(name, help), labels).map_err(|e| format!("{name}: {e}"))
}

fn histogram(
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> Result<HistogramVec, String> {
    HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .map_err(|e| format!("{name}: {e}"))
}

fn nonempty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

impl Requests {
    /// Defines every family (the buckets were validated with the configuration).
    pub fn new(s: &Settings) -> Result<Self, String> {
        const OP: [&str; 2] = ["api", "operation"];
        let r = Requests {
            registry: Registry::new(),
            requests: counter(
                REQUESTS,
                "Requests answered, by API, operation, method and status.",
                &["api", "operation", "method", "status"],
            )?,
            duration: histogram(
                DURATION,
                "Time from the request's arrival to the response head, in seconds.",
                &s.buckets,
                &OP,
            )?,
            backend: histogram(
                BACKEND_DURATION,
                "Time the backend took to answer with its head, in seconds (requests whose backend answered).",
                &s.buckets,
                &OP,
            )?,
            gateway: histogram(
                GATEWAY_DURATION,
                "Time the gateway itself spent on a request (total minus backend), in seconds.",
                &s.gateway_buckets,
                &OP,
            )?,
            bytes_in: counter(
                REQUEST_BYTES,
                "Request body bytes, as declared by Content-Length.",
                &OP,
            )?,
            bytes_out: counter(
                RESPONSE_BYTES,
                "Response body bytes, when the length was known as the head was sent.",
                &OP,
            )?,
            upstream_errors: counter(
                UPSTREAM_ERRORS,
                "Backend calls that failed without an answer, by API and kind (the gateway's error code).",
                &["api", "kind"],
            )?,
            folded: counter(
                FOLDED,
                "Request records whose labels were folded into (other) because the metric reached max_series label sets.",
                &["metric"],
            )?,
            guards: Mutex::new(Guards(std::array::from_fn(|_| {
                SeriesGuard::new(s.max_series)
            }))),
        };
        for c in [
            Box::new(r.requests.clone()) as Box<dyn Collector>,
            Box::new(r.duration.clone()),
            Box::new(r.backend.clone()),
            Box::new(r.gateway.clone()),
            Box::new(r.bytes_in.clone()),
            Box::new(r.bytes_out.clone()),
            Box::new(r.upstream_errors.clone()),
            Box::new(r.folded.clone()),
        ] {
            r.registry.register(c).map_err(|e| e.to_string())?;
        }
        Ok(r)
    }

    /// Adds one request record.
    pub fn record(&self, r: &RequestRecord<'_>) {
        let api = nonempty(r.api_id.as_str()).unwrap_or(NONE);
        let operation = nonempty(r.operation_id.as_str())
            .or_else(|| nonempty(r.route.as_str()))
            .unwrap_or(NONE);
        let method = method_label(r.method.as_str());
        let status = r.status.to_string();
        let status = status.as_str();
        let total = r.total_us as f64 / 1e6;
        let own = r.total_us.saturating_sub(r.backend_us) as f64 / 1e6;

        let mut guards = self.guards.lock().unwrap_or_else(|e| e.into_inner());
        let g = &mut guards.0;
        let mut fold = |i: usize, labels: &[&str]| -> bool {
            let ok = g[i].admit(labels);
            if !ok {
                self.folded.with_label_values(&[NAMES[i]]).inc();
            }
            ok
        };
        let op = |ok: bool| if ok { [api, operation] } else { [OTHER, OTHER] };

        let [a, o] = op(fold(0, &[api, operation, method, status]));
        self.requests
            .with_label_values(&[a, o, method, status])
            .inc();
        self.duration
            .with_label_values(&op(fold(1, &[api, operation])))
            .observe(total);
        // The backend answered: its time is known (0 otherwise, and not a sample).
        if r.backend_status != 0 {
            self.backend
                .with_label_values(&op(fold(2, &[api, operation])))
                .observe(r.backend_us as f64 / 1e6);
        }
        self.gateway
            .with_label_values(&op(fold(3, &[api, operation])))
            .observe(own);
        self.bytes_in
            .with_label_values(&op(fold(4, &[api, operation])))
            .inc_by(r.bytes_in);
        self.bytes_out
            .with_label_values(&op(fold(5, &[api, operation])))
            .inc_by(r.bytes_out);
        if r.error_source.as_str() == "backend" {
            let kind = nonempty(r.error_reason.as_str()).unwrap_or("unknown");
            let a = if fold(6, &[api, kind]) { api } else { OTHER };
            self.upstream_errors.with_label_values(&[a, kind]).inc();
        }
    }

    /// The families as they are now.
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }
}

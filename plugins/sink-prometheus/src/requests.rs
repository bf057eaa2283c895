//! The sink's own metrics, aggregated from the gateway's request records: counts, durations,
//! bytes and upstream errors, labelled by API and operation (never by raw path).
//!
//! The record path runs once per proxied request, so it keeps the series it has resolved:
//! a record whose label sets were seen before costs one hash lookup of its labels (no
//! allocation, no label vector, no guard), counters are summed and histograms observed
//! locally, and each series touched is written to once per batch.

use std::collections::HashMap;
use std::sync::Mutex;

use outpost_plugin_sdk::RequestRecord;
use prometheus::core::Collector;
use prometheus::local::LocalHistogram;
use prometheus::proto::MetricFamily;
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

use crate::config::Settings;
use crate::guard::{SeriesGuard, OTHER};
use crate::key::{push_prefixed, FxBuild};

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

/// A method's place in [`METHODS`] (`METHODS.len()`: `OTHER`).
fn method_index(method: &str) -> usize {
    METHODS
        .iter()
        .position(|m| *m == method)
        .unwrap_or(METHODS.len())
}

/// A method as a bounded label value.
pub fn method_label(method: &str) -> &'static str {
    METHODS
        .get(method_index(method))
        .copied()
        .unwrap_or("OTHER")
}

/// Guards, in the order of [`NAMES`] (the last one, `FOLDED`, needs none: its only label is a
/// family name).
const REQUESTS_GUARD: usize = 0;
const DURATION_GUARD: usize = 1;
const BACKEND_GUARD: usize = 2;
const GATEWAY_GUARD: usize = 3;
const REQUEST_BYTES_GUARD: usize = 4;
const RESPONSE_BYTES_GUARD: usize = 5;
const UPSTREAM_ERRORS_GUARD: usize = 6;

/// The families, as registered.
struct Families {
    requests: IntCounterVec,
    duration: HistogramVec,
    backend: HistogramVec,
    gateway: HistogramVec,
    bytes_in: IntCounterVec,
    bytes_out: IntCounterVec,
    upstream_errors: IntCounterVec,
    folded: IntCounterVec,
}

/// The request metrics, in a registry of their own.
pub struct Requests {
    registry: Registry,
    families: Families,
    state: Mutex<State>,
}

/// A counter series and what the current batch has added to it.
struct Count {
    counter: IntCounter,
    pending: u64,
}

impl Count {
    fn new(counter: IntCounter) -> Self {
        Self {
            counter,
            pending: 0,
        }
    }

    fn flush(&mut self) {
        if self.pending > 0 {
            self.counter.inc_by(self.pending);
            self.pending = 0;
        }
    }
}

/// The series of one label set of `outpost_http_requests_total`.
struct RequestSeries {
    count: Count,
    /// Its API and operation's series, in [`State::ops`].
    op: usize,
    /// Folded into `(other)` by the guard.
    folded: bool,
}

/// The series of one API and operation in the families labelled by those two.
struct OpSeries {
    duration: LocalHistogram,
    /// Resolved at the first record the backend answered, as the guard saw only those.
    backend: Option<(LocalHistogram, bool)>,
    gateway: LocalHistogram,
    bytes_in: Count,
    bytes_out: Count,
    /// The guards (`1 << guard`) that folded this API and operation, the backend's aside.
    folds: u8,
    /// In [`State::touched_ops`].
    touched: bool,
}

/// The series of one API and kind of `outpost_upstream_errors_total`.
struct ErrorSeries {
    count: Count,
    folded: bool,
}

/// Guards that count a record once per record (the backend's counts only records it answered).
const OP_GUARDS: [usize; 4] = [
    DURATION_GUARD,
    GATEWAY_GUARD,
    REQUEST_BYTES_GUARD,
    RESPONSE_BYTES_GUARD,
];

/// A record's labels in `outpost_http_requests_total`, before the guard.
struct RequestLabels<'a> {
    api: &'a str,
    operation: &'a str,
    /// In [`METHODS`].
    method: usize,
    status: u16,
}

/// What the record path keeps between batches: the guards and the series resolved so far.
///
/// Resolving a label set is what the guards decide for it plus the handle of the series it
/// lands in. A guard's answer for a label set never changes (admitted stays admitted; refused
/// means the guard was full, and it stays full), so a resolution can be kept, and thrown away
/// and made again, without changing a single value.
struct State {
    guards: [SeriesGuard; 7],
    /// Label sets (see [`key`](crate::key)) to their series.
    requests: HashMap<Box<[u8]>, usize, FxBuild>,
    ops: HashMap<Box<[u8]>, usize, FxBuild>,
    errors: HashMap<Box<[u8]>, usize, FxBuild>,
    request_series: Vec<RequestSeries>,
    op_series: Vec<OpSeries>,
    error_series: Vec<ErrorSeries>,
    /// Series this batch added to, to write once it is through.
    touched_requests: Vec<usize>,
    touched_ops: Vec<usize>,
    touched_errors: Vec<usize>,
    /// Folds per guard in this batch, and the `FOLDED` series, made at the first fold.
    folds: [u64; 7],
    folded: [Option<IntCounter>; 7],
    /// Most series kept: past it the cache is emptied between batches, so that label sets
    /// beyond every guard's bound (all folded) cannot grow it without end.
    limit: usize,
    /// Reused for every key.
    key: Vec<u8>,
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

/// The labels of the API and operation series: their own, or `(other)` when folded.
fn op_labels<'a>(own: bool, api: &'a str, operation: &'a str) -> [&'a str; 2] {
    if own {
        [api, operation]
    } else {
        [OTHER, OTHER]
    }
}

impl Requests {
    /// Defines every family (the buckets were validated with the configuration).
    pub fn new(s: &Settings) -> Result<Self, String> {
        const OP: [&str; 2] = ["api", "operation"];
        let families = Families {
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
        };
        let registry = Registry::new();
        let f = &families;
        for c in [
            Box::new(f.requests.clone()) as Box<dyn Collector>,
            Box::new(f.duration.clone()),
            Box::new(f.backend.clone()),
            Box::new(f.gateway.clone()),
            Box::new(f.bytes_in.clone()),
            Box::new(f.bytes_out.clone()),
            Box::new(f.upstream_errors.clone()),
            Box::new(f.folded.clone()),
        ] {
            registry.register(c).map_err(|e| e.to_string())?;
        }
        let state = State {
            guards: std::array::from_fn(|_| SeriesGuard::new(s.max_series)),
            requests: HashMap::default(),
            ops: HashMap::default(),
            errors: HashMap::default(),
            request_series: Vec::new(),
            op_series: Vec::new(),
            error_series: Vec::new(),
            touched_requests: Vec::new(),
            touched_ops: Vec::new(),
            touched_errors: Vec::new(),
            folds: [0; 7],
            folded: Default::default(),
            // Within every bound, the three caches hold at most `max_series` each.
            limit: s.max_series.saturating_mul(4).saturating_add(256),
            key: Vec::with_capacity(128),
        };
        Ok(Requests {
            registry,
            families,
            state: Mutex::new(state),
        })
    }

    /// Adds a batch of request records.
    pub fn records(&self, batch: &[RequestRecord<'_>]) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.trim();
        for r in batch {
            state.record(&self.families, r);
        }
        state.flush(&self.families);
    }

    /// The families as they are now.
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }
}

impl State {
    /// Empties the cache once it holds more than its limit (between batches: nothing is
    /// pending then).
    fn trim(&mut self) {
        if self.request_series.len() + self.op_series.len() + self.error_series.len() > self.limit {
            self.requests.clear();
            self.ops.clear();
            self.errors.clear();
            self.request_series.clear();
            self.op_series.clear();
            self.error_series.clear();
        }
    }

    /// Adds one request record to the batch's sums.
    fn record(&mut self, f: &Families, r: &RequestRecord<'_>) {
        let api = nonempty(r.api_id.as_str()).unwrap_or(NONE);
        let operation = nonempty(r.operation_id.as_str())
            .or_else(|| nonempty(r.route.as_str()))
            .unwrap_or(NONE);
        let method = method_index(r.method.as_str());
        let total = r.total_us as f64 / 1e6;
        let own = r.total_us.saturating_sub(r.backend_us) as f64 / 1e6;

        // The key of the API and operation, then with the method and status after it.
        let mut key = std::mem::take(&mut self.key);
        key.clear();
        push_prefixed(&mut key, api);
        key.extend_from_slice(operation.as_bytes());
        let op_len = key.len();
        key.push(method as u8);
        key.extend_from_slice(&r.status.to_le_bytes());
        let ri = match self.requests.get(key.as_slice()) {
            Some(&i) => i,
            None => {
                let labels = RequestLabels {
                    api,
                    operation,
                    method,
                    status: r.status,
                };
                self.resolve_request(f, &key, op_len, labels)
            }
        };

        let rs = &mut self.request_series[ri];
        if rs.count.pending == 0 {
            self.touched_requests.push(ri);
        }
        rs.count.pending += 1;
        if rs.folded {
            self.folds[REQUESTS_GUARD] += 1;
        }
        let oi = rs.op;
        let o = &mut self.op_series[oi];
        if !o.touched {
            o.touched = true;
            self.touched_ops.push(oi);
        }
        o.duration.observe(total);
        // The backend answered: its time is known (0 otherwise, and not a sample).
        if r.backend_status != 0 {
            let (h, folded) = o.backend.get_or_insert_with(|| {
                let ok = self.guards[BACKEND_GUARD].admit(&[api, operation]);
                let h = f.backend.with_label_values(&op_labels(ok, api, operation));
                (h.local(), !ok)
            });
            h.observe(r.backend_us as f64 / 1e6);
            if *folded {
                self.folds[BACKEND_GUARD] += 1;
            }
        }
        o.gateway.observe(own);
        o.bytes_in.pending += r.bytes_in;
        o.bytes_out.pending += r.bytes_out;
        if o.folds != 0 {
            for g in OP_GUARDS {
                if o.folds & (1 << g) != 0 {
                    self.folds[g] += 1;
                }
            }
        }

        if r.error_source.as_str() == "backend" {
            let kind = nonempty(r.error_reason.as_str()).unwrap_or("unknown");
            key.clear();
            push_prefixed(&mut key, api);
            key.extend_from_slice(kind.as_bytes());
            let ei = match self.errors.get(key.as_slice()) {
                Some(&i) => i,
                None => {
                    let ok = self.guards[UPSTREAM_ERRORS_GUARD].admit(&[api, kind]);
                    let a = if ok { api } else { OTHER };
                    let counter = f.upstream_errors.with_label_values(&[a, kind]);
                    self.error_series.push(ErrorSeries {
                        count: Count::new(counter),
                        folded: !ok,
                    });
                    let i = self.error_series.len() - 1;
                    self.errors.insert(key.as_slice().into(), i);
                    i
                }
            };
            let e = &mut self.error_series[ei];
            if e.count.pending == 0 {
                self.touched_errors.push(ei);
            }
            e.count.pending += 1;
            if e.folded {
                self.folds[UPSTREAM_ERRORS_GUARD] += 1;
            }
        }
        self.key = key;
    }

    /// A label set of `outpost_http_requests_total` seen for the first time (since the last
    /// trim): asks the guards, makes the series, and keeps them under `key`.
    fn resolve_request(
        &mut self,
        f: &Families,
        key: &[u8],
        op_len: usize,
        labels: RequestLabels<'_>,
    ) -> usize {
        let RequestLabels {
            api,
            operation,
            method,
            status,
        } = labels;
        let op = match self.ops.get(&key[..op_len]) {
            Some(&i) => i,
            None => {
                let mut admit = |g: usize| -> (bool, u8) {
                    let ok = self.guards[g].admit(&[api, operation]);
                    (ok, if ok { 0 } else { 1 << g })
                };
                let (duration, d) = admit(DURATION_GUARD);
                let (gateway, g) = admit(GATEWAY_GUARD);
                let (bytes_in, i) = admit(REQUEST_BYTES_GUARD);
                let (bytes_out, o) = admit(RESPONSE_BYTES_GUARD);
                let labels = |ok| op_labels(ok, api, operation);
                self.op_series.push(OpSeries {
                    duration: f.duration.with_label_values(&labels(duration)).local(),
                    backend: None,
                    gateway: f.gateway.with_label_values(&labels(gateway)).local(),
                    bytes_in: Count::new(f.bytes_in.with_label_values(&labels(bytes_in))),
                    bytes_out: Count::new(f.bytes_out.with_label_values(&labels(bytes_out))),
                    folds: d | g | i | o,
                    touched: false,
                });
                let i = self.op_series.len() - 1;
                self.ops.insert(key[..op_len].into(), i);
                i
            }
        };
        let method = METHODS.get(method).copied().unwrap_or("OTHER");
        let status = status.to_string();
        let ok = self.guards[REQUESTS_GUARD].admit(&[api, operation, method, &status]);
        let [a, o] = op_labels(ok, api, operation);
        let counter = f.requests.with_label_values(&[a, o, method, &status]);
        self.request_series.push(RequestSeries {
            count: Count::new(counter),
            op,
            folded: !ok,
        });
        let i = self.request_series.len() - 1;
        self.requests.insert(key.into(), i);
        i
    }

    /// Writes the batch's sums to the series, request counts last: a scrape that sees a
    /// batch's requests sees everything else of it.
    fn flush(&mut self, f: &Families) {
        for i in self.touched_ops.drain(..) {
            let o = &mut self.op_series[i];
            o.touched = false;
            o.duration.flush();
            if let Some((h, _)) = &o.backend {
                h.flush();
            }
            o.gateway.flush();
            o.bytes_in.flush();
            o.bytes_out.flush();
        }
        for i in self.touched_errors.drain(..) {
            self.error_series[i].count.flush();
        }
        for (g, n) in self.folds.iter_mut().enumerate() {
            if *n > 0 {
                self.folded[g]
                    .get_or_insert_with(|| f.folded.with_label_values(&[NAMES[g]]))
                    .inc_by(*n);
                *n = 0;
            }
        }
        for i in self.touched_requests.drain(..) {
            self.request_series[i].count.flush();
        }
    }
}

//! What the gateway offers a plugin: logging into its `tracing`, metrics, the clock and the
//! gateway's identity. Available once the gateway has initialised the library; before that,
//! and in unit tests without a gateway, logs are dropped, metrics are inert and the clock is
//! the system's.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::api::abi_stable::std_types::{RSlice, RStr};
use crate::api::HostBox;

static HOST: OnceLock<HostBox> = OnceLock::new();

pub(crate) fn install(host: HostBox) {
    let _ = HOST.set(host);
}

/// Logs through the gateway's `tracing` ([`crate::level`] constants).
pub fn log(level: u8, message: &str) {
    if let Some(host) = HOST.get() {
        if host.log_enabled(level) {
            host.log(level, message.into());
        }
    }
}

/// Whether a log level is enabled (to skip building a message).
pub fn log_enabled(level: u8) -> bool {
    HOST.get().is_some_and(|h| h.log_enabled(level))
}

/// Wall-clock time in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
    match HOST.get() {
        Some(h) => h.now_unix_ms(),
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    }
}

/// A monotonic clock in nanoseconds (only differences mean something).
pub fn monotonic_ns() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    match HOST.get() {
        Some(h) => h.monotonic_ns(),
        None => START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64,
    }
}

/// The gateway's id ("" without a gateway).
pub fn gateway_id() -> &'static str {
    HOST.get().map_or("", |h| h.gateway_id().as_str())
}

/// The gateway process's instance id ("" without a gateway).
pub fn instance_id() -> &'static str {
    HOST.get().map_or("", |h| h.instance_id().as_str())
}

/// A metric defined with the gateway; bumping it costs one call, no allocation. Sinks see it
/// with the gateway's own metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric(u32);

impl Metric {
    /// Defines a counter (`name` in Prometheus style, ending in `_total`). Define metrics when
    /// an instance is created, not per request. Inert without a gateway or when the gateway
    /// refused the definition (invalid name, or the same name with another kind or labels).
    pub fn counter(name: &str, help: &str, labels: &[&str]) -> Metric {
        Self::define(name, help, crate::api::metric::COUNTER, labels)
    }

    /// Defines a gauge.
    pub fn gauge(name: &str, help: &str, labels: &[&str]) -> Metric {
        Self::define(name, help, crate::api::metric::GAUGE, labels)
    }

    fn define(name: &str, help: &str, kind: u8, labels: &[&str]) -> Metric {
        let labels: Vec<RStr<'_>> = labels.iter().map(|l| RStr::from(*l)).collect();
        Metric(HOST.get().map_or(0, |h| {
            h.define_metric(name.into(), help.into(), kind, labels.as_slice().into())
        }))
    }

    /// Whether the gateway accepted the definition.
    pub fn is_defined(self) -> bool {
        self.0 != 0
    }

    /// Adds to the series with these label values (in the definition's order; at most
    /// [`MAX_LABELS`]).
    pub fn add(self, label_values: &[&str], value: f64) {
        if let (Some(h), true) = (HOST.get(), self.0 != 0) {
            with_labels(label_values, |l| h.metric_add(self.0, l, value));
        }
    }

    /// Adds one to the series with these label values.
    pub fn inc(self, label_values: &[&str]) {
        self.add(label_values, 1.0);
    }

    /// Sets a gauge's series.
    pub fn set(self, label_values: &[&str], value: f64) {
        if let (Some(h), true) = (HOST.get(), self.0 != 0) {
            with_labels(label_values, |l| h.metric_set(self.0, l, value));
        }
    }
}

/// The most labels a metric may have.
pub const MAX_LABELS: usize = 8;

/// Label values as the ABI's slice, built on the stack.
fn with_labels(values: &[&str], f: impl FnOnce(RSlice<'_, RStr<'_>>)) {
    let mut buf = [RStr::from(""); MAX_LABELS];
    let n = values.len().min(MAX_LABELS);
    for (b, v) in buf.iter_mut().zip(values) {
        *b = RStr::from(*v);
    }
    f(RSlice::from_slice(&buf[..n]));
}

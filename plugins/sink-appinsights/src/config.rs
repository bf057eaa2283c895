//! The sink's configuration (the manifest entry's `config`) and its validation.

use std::path::PathBuf;
use std::time::Duration;

use outpost_plugin_sdk::serde::Deserialize;

use crate::connection_string::{self, ConnectionString};

/// The most items one request may carry (the documented ingestion limit).
pub const MAX_BATCH_ITEMS_LIMIT: usize = 64_000;

/// The cap on items sent a second unless configured: every request of a gateway serving up
/// to about 50 requests a second (a request item and a backend call each) is sent; a busier
/// gateway is sampled, as the classic ASP.NET SDKs (adaptive, about 5 items a second) and the
/// Java agent since 3.4 (5 requests a second) sample by default, keeping its cost to the
/// gateway and its ingestion volume bounded.
pub const DEFAULT_MAX_ITEMS_PER_SECOND: f64 = 100.0;

/// The most ingestion requests in flight at once.
pub const MAX_CONCURRENT_REQUESTS: usize = 32;

/// `appinsights` configuration, as written in the manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    /// The Application Insights connection string (every documented form; see the README).
    pub connection_string: String,
    /// Percentage of requests sent (0 to 100); failed requests are always sent.
    #[serde(default = "default_sampling")]
    pub sampling_percentage: f64,
    /// The most items a second the sink sends: past it, the sampling percentage is lowered
    /// (never raised above `sampling_percentage`). 0: no cap.
    #[serde(default = "default_max_items_per_second")]
    pub max_items_per_second: f64,
    /// Most items per ingestion request (1 to 64000).
    #[serde(default = "default_max_batch_items")]
    pub max_batch_items: usize,
    /// Most ingestion requests in flight at once (1 to 32). More than one only while full
    /// batches are waiting: what lets a distant endpoint keep up with a busy gateway.
    #[serde(default = "default_max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// A partial batch is sent after waiting this long.
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Deadline for one ingestion request (connect, send, answer).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Directory for batches the endpoint could not take (none: batches wait in memory).
    #[serde(default)]
    pub spool_dir: Option<PathBuf>,
    /// The most bytes the spool directory may hold; past it, the oldest batches are dropped.
    #[serde(default = "default_spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// Items waiting in memory at most (new and to be retried); past it the oldest are
    /// dropped.
    #[serde(default = "default_max_pending_items")]
    pub max_pending_items: usize,
    /// First retry delay; doubled per failed attempt.
    #[serde(default = "default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest retry delay of the backoff (a longer `Retry-After` is still honoured).
    #[serde(default = "default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// The `Region` custom property (as API Management sets it).
    #[serde(default)]
    pub region: Option<String>,
    /// Send a RemoteDependencyData per backend call.
    #[serde(default = "yes")]
    pub dependencies: bool,
    /// Send an ExceptionData per failed request.
    #[serde(default = "yes")]
    pub exceptions: bool,
    /// Send MetricData for metric snapshots.
    #[serde(default = "yes")]
    pub metrics: bool,
}

fn default_sampling() -> f64 {
    100.0
}
fn default_max_items_per_second() -> f64 {
    DEFAULT_MAX_ITEMS_PER_SECOND
}
fn default_max_batch_items() -> usize {
    512
}
fn default_max_concurrent_requests() -> usize {
    4
}
fn default_flush_interval_ms() -> u64 {
    1_000
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_spool_max_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_max_pending_items() -> usize {
    16_384
}
fn default_retry_initial_ms() -> u64 {
    1_000
}
fn default_retry_max_ms() -> u64 {
    60_000
}
fn yes() -> bool {
    true
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Parsed connection string.
    pub connection: ConnectionString,
    /// Sampling percentage, 0 to 100.
    pub sampling_percentage: f64,
    /// Items a second at most, kept by lowering the sampling percentage (none: no cap).
    pub max_items_per_second: Option<f64>,
    /// Items per request.
    pub max_batch_items: usize,
    /// Requests in flight at most.
    pub max_concurrent_requests: usize,
    /// Partial batch wait.
    pub flush_interval: Duration,
    /// Request deadline.
    pub timeout: Duration,
    /// Spool directory.
    pub spool_dir: Option<PathBuf>,
    /// Spool bound.
    pub spool_max_bytes: u64,
    /// In-memory bound.
    pub max_pending_items: usize,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Region property.
    pub region: Option<String>,
    /// Dependencies on.
    pub dependencies: bool,
    /// Exceptions on.
    pub exceptions: bool,
    /// Metrics on.
    pub metrics: bool,
}

impl Config {
    /// Checks every field (no I/O) and reports every problem at once, each naming its field.
    pub fn validate(self) -> Result<Settings, String> {
        let mut problems = Vec::new();
        let connection = match connection_string::parse(&self.connection_string) {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(format!("connection_string: {e}"));
                None
            }
        };
        if !(0.0..=100.0).contains(&self.sampling_percentage) {
            problems.push(format!(
                "sampling_percentage must be between 0 and 100 (got {})",
                self.sampling_percentage
            ));
        }
        let m = self.max_items_per_second;
        if !(m.is_finite() && m >= 0.0) {
            problems.push(format!(
                "max_items_per_second must be a positive number, or 0 for no cap (got {m})"
            ));
        }
        if self.max_batch_items == 0 || self.max_batch_items > MAX_BATCH_ITEMS_LIMIT {
            problems.push(format!(
                "max_batch_items must be between 1 and {MAX_BATCH_ITEMS_LIMIT} (got {})",
                self.max_batch_items
            ));
        }
        if !(1..=MAX_CONCURRENT_REQUESTS).contains(&self.max_concurrent_requests) {
            problems.push(format!(
                "max_concurrent_requests must be between 1 and {MAX_CONCURRENT_REQUESTS} (got {})",
                self.max_concurrent_requests
            ));
        }
        for (name, v) in [
            ("flush_interval_ms", self.flush_interval_ms),
            ("timeout_ms", self.timeout_ms),
            ("retry_initial_ms", self.retry_initial_ms),
            ("retry_max_ms", self.retry_max_ms),
            ("spool_max_bytes", self.spool_max_bytes),
        ] {
            if v == 0 {
                problems.push(format!("{name} must be positive"));
            }
        }
        if self.retry_max_ms < self.retry_initial_ms {
            problems.push("retry_max_ms must not be less than retry_initial_ms".into());
        }
        if self.max_pending_items < self.max_batch_items {
            problems.push(format!(
                "max_pending_items must be at least max_batch_items ({})",
                self.max_batch_items
            ));
        }
        if self
            .spool_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            problems.push("spool_dir must name a directory (leave it out for no spool)".into());
        }
        if let Some(r) = &self.region {
            if r.trim().is_empty() {
                problems.push("region must not be empty (leave it out instead)".into());
            }
        }
        match (connection, problems.is_empty()) {
            (Some(connection), true) => Ok(Settings {
                connection,
                sampling_percentage: self.sampling_percentage,
                max_items_per_second: (self.max_items_per_second > 0.0)
                    .then_some(self.max_items_per_second),
                max_batch_items: self.max_batch_items,
                max_concurrent_requests: self.max_concurrent_requests,
                flush_interval: Duration::from_millis(self.flush_interval_ms),
                timeout: Duration::from_millis(self.timeout_ms),
                spool_dir: self.spool_dir,
                spool_max_bytes: self.spool_max_bytes,
                max_pending_items: self.max_pending_items,
                retry_initial: Duration::from_millis(self.retry_initial_ms),
                retry_max: Duration::from_millis(self.retry_max_ms),
                region: self.region,
                dependencies: self.dependencies,
                exceptions: self.exceptions,
                metrics: self.metrics,
            }),
            _ => Err(problems.join("; ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::serde_json;

    fn config(json: &str) -> Result<Settings, String> {
        serde_json::from_str::<Config>(json)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn defaults_follow_the_documented_limits() {
        let s = config(
            r#"{"connection_string": "InstrumentationKey=00000000-1111-2222-3333-444455556666"}"#,
        )
        .expect("valid");
        assert_eq!(s.sampling_percentage, 100.0);
        assert_eq!(s.max_batch_items, 512);
        assert_eq!(s.max_concurrent_requests, 4);
        assert_eq!(s.flush_interval, Duration::from_secs(1));
        assert!(s.spool_dir.is_none());
        assert!(s.dependencies && s.exceptions && s.metrics);
        assert_eq!(s.max_items_per_second, Some(DEFAULT_MAX_ITEMS_PER_SECOND));
        let s = config(
            r#"{"connection_string": "InstrumentationKey=00000000-1111-2222-3333-444455556666",
                "max_items_per_second": 0}"#,
        )
        .expect("valid");
        assert_eq!(s.max_items_per_second, None, "0 is no cap");
    }

    #[test]
    fn every_problem_is_reported_with_its_field() {
        let err = config(
            r#"{"connection_string": "InstrumentationKey=nope", "sampling_percentage": 101,
                "max_batch_items": 64001, "max_concurrent_requests": 0, "timeout_ms": 0, "spool_dir": "", "region": " ",
                "max_items_per_second": -1}"#,
        )
        .unwrap_err();
        for field in [
            "connection_string: InstrumentationKey is not a GUID",
            "sampling_percentage must be between 0 and 100",
            "max_batch_items must be between 1 and 64000",
            "max_concurrent_requests must be between 1 and 32 (got 0)",
            "timeout_ms must be positive",
            "spool_dir must name a directory",
            "region must not be empty",
            "max_items_per_second must be a positive number, or 0 for no cap (got -1)",
        ] {
            assert!(err.contains(field), "{field}: {err}");
        }
        let err = config(r#"{"connection_string": "x", "colour": 1}"#).unwrap_err();
        assert!(err.contains("unknown field `colour`"), "{err}");
        let err = config(r#"{}"#).unwrap_err();
        assert!(err.contains("missing field `connection_string`"), "{err}");
    }

    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../README.md");
        let block = readme
            .split("```toml")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a toml block");
        let manifest: toml::Value = toml::from_str(block).expect("TOML");
        let config = &manifest["telemetry"]["sinks"][0]["config"];
        let json = serde_json::to_value(config).expect("JSON");
        let s = serde_json::from_value::<Config>(json)
            .expect("fields")
            .validate()
            .expect("valid");
        assert_eq!(s.sampling_percentage, 25.0);
        assert_eq!(
            s.connection.ingestion_endpoint,
            "https://westeurope-5.in.applicationinsights.azure.com"
        );
        assert_eq!(s.spool_max_bytes, 256 * 1024 * 1024);
    }
}

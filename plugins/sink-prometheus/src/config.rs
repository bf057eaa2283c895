//! The sink's configuration: serde types and their validation (pure: no socket, no file).

use std::net::SocketAddr;
use std::path::PathBuf;

use outpost_plugin_sdk::serde::Deserialize;

/// `prometheus` sink configuration (the manifest's `[[telemetry.sinks]] config`).
#[derive(Debug, Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    /// Address to serve on, `ip:port` (port 0: any free port).
    pub listen: String,
    /// Where the bound address is written once listening (for port 0).
    #[serde(default)]
    pub address_file: Option<PathBuf>,
    /// The path scrapes use. Default `/metrics`.
    #[serde(default = "default_path")]
    pub path: String,
    /// Upper bounds, in seconds, of the total and backend duration histograms.
    #[serde(default = "default_buckets")]
    pub buckets: Vec<f64>,
    /// Upper bounds, in seconds, of the gateway's own duration histogram.
    #[serde(default = "default_gateway_buckets")]
    pub gateway_buckets: Vec<f64>,
    /// Most label sets per metric; later ones are folded into `(other)`.
    #[serde(default = "default_max_series")]
    pub max_series: usize,
}

fn default_path() -> String {
    "/metrics".into()
}

/// OpenTelemetry's default HTTP server duration buckets, plus 30 s and 60 s for long
/// backends.
pub fn default_buckets() -> Vec<f64> {
    vec![
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
    ]
}

/// Fine buckets for the gateway's own time, which is usually well under a millisecond.
pub fn default_gateway_buckets() -> Vec<f64> {
    vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    ]
}

/// Default for [`Config::max_series`].
pub const DEFAULT_MAX_SERIES: usize = 1000;

fn default_max_series() -> usize {
    DEFAULT_MAX_SERIES
}

/// A configuration that passed validation.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Address to bind.
    pub listen: SocketAddr,
    /// Where to write the bound address.
    pub address_file: Option<PathBuf>,
    /// Scrape path.
    pub path: String,
    /// Total and backend duration buckets.
    pub buckets: Vec<f64>,
    /// Gateway duration buckets.
    pub gateway_buckets: Vec<f64>,
    /// Label sets per metric.
    pub max_series: usize,
}

fn check_buckets(field: &str, b: &[f64], problems: &mut Vec<String>) {
    if b.is_empty() {
        problems.push(format!("{field}: give at least one bucket"));
    } else if let Some(v) = b.iter().find(|v| !v.is_finite() || **v <= 0.0) {
        problems.push(format!(
            "{field}: {v} is not a positive number of seconds (+Inf is always added)"
        ));
    } else if let Some(w) = b.windows(2).find(|w| w[0] >= w[1]) {
        problems.push(format!(
            "{field}: buckets must increase strictly ({} then {})",
            w[0], w[1]
        ));
    }
}

impl Config {
    /// Checks every field and reports every problem at once, each naming its field.
    pub fn validate(self) -> Result<Settings, String> {
        let mut problems = Vec::new();
        let listen = match self.listen.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                problems.push(format!(
                    "listen: '{}' is not an address with a port (write ip:port, e.g. 127.0.0.1:9464 or [::]:9464)",
                    self.listen
                ));
                None
            }
        };
        if !self.path.starts_with('/') || self.path.contains(['?', '#', ' ']) {
            problems.push(format!(
                "path: '{}' must start with '/' and hold no query, fragment or space",
                self.path
            ));
        }
        check_buckets("buckets", &self.buckets, &mut problems);
        check_buckets("gateway_buckets", &self.gateway_buckets, &mut problems);
        if self.max_series == 0 {
            problems.push("max_series: must be at least 1".into());
        }
        if let Some(f) = &self.address_file {
            if f.as_os_str().is_empty() || f.file_name().is_none() {
                problems.push(format!("address_file: '{}' must name a file", f.display()));
            }
        }
        match (listen, problems.is_empty()) {
            (Some(listen), true) => Ok(Settings {
                listen,
                address_file: self.address_file,
                path: self.path,
                buckets: self.buckets,
                gateway_buckets: self.gateway_buckets,
                max_series: self.max_series,
            }),
            _ => Err(problems.join("; ")),
        }
    }
}

//! `prometheus`: a telemetry sink that serves the gateway's metrics for Prometheus to scrape,
//! in the text format 0.0.4, on a listener of its own.
//!
//! ```toml
//! [[telemetry.sinks]]
//! name = "prometheus"
//! provider = "prometheus"
//! config = { listen = "0.0.0.0:9464" }
//! ```
//!
//! It renders two kinds of families (README.md lists every one):
//!
//! * its own, aggregated from the request records the gateway exports: `outpost_http_*`
//!   (requests, durations, bytes) and `outpost_upstream_errors_total`, labelled by API and
//!   operation — never by raw path — with a per-metric cardinality guard (`max_series`);
//! * the gateway's metric snapshots as they arrive: the gateway's own `outpost_*` metrics and
//!   the metrics plugins define (such as `emit-metric`'s).
//!
//! The text is written by the `prometheus` crate's `TextEncoder` (escaping, `# HELP`/`# TYPE`,
//! cumulative `_bucket{le}` lines with `+Inf`, `_sum`, `_count`); the listener is hyper on a
//! single-threaded tokio runtime on its own thread.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_plugin_sdk::{export_plugin, host, level, Error, MetricSample, RequestRecord, Sink};
use prometheus::proto::MetricFamily;
use prometheus::{Encoder, TextEncoder};

pub mod config;
pub mod guard;
mod key;
pub mod requests;
pub mod server;
pub mod snapshot;

#[cfg(test)]
mod tests;

pub use config::{Config, Settings};
pub use server::CONTENT_TYPE_004;

use requests::Requests;
use server::{Render, Server};
use snapshot::Snapshots;

/// Everything a scrape shows.
pub struct Exposition {
    requests: Requests,
    snapshots: Mutex<Snapshots>,
    latest: Mutex<Arc<Vec<MetricFamily>>>,
}

impl Exposition {
    /// Empty metrics for these settings.
    pub fn new(s: &Settings) -> Result<Self, String> {
        Ok(Self {
            requests: Requests::new(s)?,
            snapshots: Mutex::new(Snapshots::new(s.max_series)),
            latest: Mutex::new(Arc::new(Vec::new())),
        })
    }

    /// Adds request records.
    pub fn records(&self, batch: &[RequestRecord<'_>]) {
        self.requests.records(batch);
    }

    /// Replaces the re-exported metrics with a new snapshot.
    pub fn snapshot(&self, batch: &[MetricSample<'_>]) {
        let families = self
            .snapshots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .build(batch);
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(families);
    }
}

impl Render for Exposition {
    fn render(&self) -> Result<Vec<u8>, String> {
        let latest = self
            .latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = Vec::with_capacity(16 * 1024);
        let encoder = TextEncoder::new();
        encoder
            .encode(&self.requests.gather(), &mut out)
            .map_err(|e| e.to_string())?;
        encoder
            .encode(&latest, &mut out)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// The sink: the metrics and the listener serving them (stopped when the sink is dropped).
/// The listener is bound when the gateway starts the sink (its first call), not when the sink
/// is created: `outpost check` creates sinks too, and must not take the port of a gateway
/// running beside it.
pub struct Prometheus {
    settings: Settings,
    exposition: Arc<Exposition>,
    /// The listener, once started.
    server: Mutex<Option<Server>>,
}

impl Prometheus {
    /// The address the listener is bound to, once it is.
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Server::addr)
    }

    /// Binds the listener and starts serving, on the first call (and on the next ones until
    /// that succeeds).
    fn start(&self) -> Result<(), Error> {
        let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if server.is_some() {
            return Ok(());
        }
        let s = &self.settings;
        let listener = std::net::TcpListener::bind(s.listen)
            .map_err(|e| Error::unavailable(format!("listen: cannot bind {}: {e}", s.listen)))?;
        let started = Server::start(listener, s.path.clone(), self.exposition.clone())
            .map_err(|e| Error::unavailable(format!("cannot start the listener: {e}")))?;
        let addr = started.addr();
        if let Some(f) = &s.address_file {
            write_address(f, addr).map_err(|e| {
                Error::unavailable(format!("address_file: cannot write {}: {e}", f.display()))
            })?;
        }
        host::log(
            level::INFO,
            &format!(
                "Prometheus sink serving http://{addr}{} (text format 0.0.4).",
                s.path
            ),
        );
        *server = Some(started);
        Ok(())
    }
}

/// Writes the bound address where tests and scripts look for it (whole or not at all).
fn write_address(path: &Path, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{addr}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Sink for Prometheus {
    type Config = Config;
    /// `export` aggregates into the sink's own series under a lock a scrape never takes;
    /// `export_metrics` swaps in a snapshot a scrape holds only to clone a pointer.
    const NEVER_BLOCKS: bool = true;

    fn new(c: Config) -> Result<Self, String> {
        let settings = c.validate()?;
        // The file is written when the sink starts; its directory can be looked at now, so
        // that `outpost check` reports a missing one.
        if let Some(f) = &settings.address_file {
            let dir = f
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(format!(
                    "address_file: {} is not a directory",
                    dir.display()
                ));
            }
        }
        let exposition = Arc::new(Exposition::new(&settings)?);
        Ok(Self {
            settings,
            exposition,
            server: Mutex::new(None),
        })
    }

    fn export(&self, batch: &[RequestRecord<'_>]) -> Result<(), Error> {
        // Counted even when the listener cannot start: a later call tries again, and a
        // scrape then shows every request.
        self.exposition.records(batch);
        self.start()
    }

    fn export_metrics(&self, batch: &[MetricSample<'_>]) -> Result<(), Error> {
        self.exposition.snapshot(batch);
        self.start()
    }

    fn flush(&self, _deadline: Duration) -> Result<(), Error> {
        // Prometheus pulls: nothing is held for delivery.
        Ok(())
    }
}

export_plugin! {
    name: "sink-prometheus",
    version: env!("CARGO_PKG_VERSION"),
    sinks: ["prometheus" => Prometheus],
}

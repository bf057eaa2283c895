//! `access-log`: a telemetry sink that writes one JSON object per line for every request, and
//! optionally one per metric series at every metrics snapshot.
//!
//! ```toml
//! [[telemetry.sinks]]
//! name = "access"
//! provider = "access-log"
//! config = { path = "/var/log/outpost/access.jsonl", metrics = false }
//! ```
//!
//! * `path`: the file (created if missing, appended to), or `-` for standard output.
//! * `metrics`: also write `{"metric": name, "labels": {...}, "value": v, ...}` lines.
//!
//! Rotation-friendly: before each batch the sink checks whether `path` still names the file it
//! has open (device and inode); after `logrotate` moves it away, the next batch goes to a new
//! file at `path`. Each batch is written and flushed as a whole.
//!
//! A request line has: `time` (RFC 3339, UTC, milliseconds), `request_id`, `trace_id`,
//! `span_id`, `parent_span_id`, `listener`, `client_ip`, `method`, `host`, `path`, `api`,
//! `operation`, `route`, `product`, `subscription`, `backend`, `backend_url`, `status`,
//! `backend_status`, `total_ms`, `backend_ms`, `bytes_in`, `bytes_out`, `cache`,
//! `error_source`, `error_reason`, `error_message`, `user_agent`, `gateway`, `instance`. Fields
//! that do not apply are left out.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use outpost_plugin_sdk::serde::{Deserialize, Serialize};
use outpost_plugin_sdk::serde_json::{json, Map, Value};
use outpost_plugin_sdk::{export_plugin, host, Error, MetricSample, RequestRecord, Sink};

/// `access-log` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    /// The file, or `-` for standard output.
    pub path: String,
    /// Write metric lines too.
    #[serde(default)]
    pub metrics: bool,
}

enum Out {
    Stdout,
    File {
        path: PathBuf,
        file: BufWriter<File>,
        id: (u64, u64),
    },
}

fn open(path: &PathBuf) -> std::io::Result<(BufWriter<File>, (u64, u64))> {
    let f = OpenOptions::new().create(true).append(true).open(path)?;
    let m = f.metadata()?;
    Ok((BufWriter::with_capacity(64 * 1024, f), (m.dev(), m.ino())))
}

/// The sink.
pub struct AccessLog {
    out: Mutex<Out>,
    metrics: bool,
}

impl AccessLog {
    fn write<L: Serialize>(&self, lines: impl Iterator<Item = L>) -> Result<(), Error> {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Out::File { path, file, id } = &mut *out {
            let moved = match std::fs::metadata(&*path) {
                Ok(m) => (m.dev(), m.ino()) != *id,
                Err(_) => true,
            };
            if moved {
                let (f, new_id) = open(path).map_err(|e| {
                    Error::unavailable(format!("cannot reopen {}: {e}", path.display()))
                })?;
                *file = f;
                *id = new_id;
            }
        }
        let mut buf = Vec::with_capacity(64 * 1024);
        for l in lines {
            outpost_plugin_sdk::serde_json::to_writer(&mut buf, &l)
                .map_err(|e| Error::from(e.to_string()))?;
            buf.push(b'\n');
        }
        match &mut *out {
            Out::Stdout => {
                let mut s = std::io::stdout().lock();
                s.write_all(&buf)?;
                s.flush()?;
            }
            Out::File { file, .. } => {
                file.write_all(&buf)?;
                file.flush()?;
            }
        }
        Ok(())
    }
}

/// RFC 3339 UTC with milliseconds, from Unix milliseconds.
pub fn rfc3339(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(t).to_string()
}

fn display<S: outpost_plugin_sdk::serde::Serializer>(
    t: &humantime::Rfc3339Timestamp,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(t)
}

fn empty(s: &&str) -> bool {
    s.is_empty()
}

fn zero(n: &u16) -> bool {
    *n == 0
}

/// One request line: borrowed from the record, serialised without building a JSON tree.
#[derive(Serialize)]
#[serde(crate = "outpost_plugin_sdk::serde")]
pub struct RequestLine<'a> {
    #[serde(serialize_with = "display")]
    time: humantime::Rfc3339Timestamp,
    #[serde(skip_serializing_if = "empty")]
    request_id: &'a str,
    #[serde(skip_serializing_if = "empty")]
    trace_id: &'a str,
    #[serde(skip_serializing_if = "empty")]
    span_id: &'a str,
    #[serde(skip_serializing_if = "empty")]
    parent_span_id: &'a str,
    #[serde(skip_serializing_if = "empty")]
    listener: &'a str,
    #[serde(skip_serializing_if = "empty")]
    client_ip: &'a str,
    #[serde(skip_serializing_if = "empty")]
    method: &'a str,
    #[serde(skip_serializing_if = "empty")]
    host: &'a str,
    #[serde(skip_serializing_if = "empty")]
    path: &'a str,
    #[serde(skip_serializing_if = "empty")]
    api: &'a str,
    #[serde(skip_serializing_if = "empty")]
    operation: &'a str,
    #[serde(skip_serializing_if = "empty")]
    route: &'a str,
    #[serde(skip_serializing_if = "empty")]
    product: &'a str,
    #[serde(skip_serializing_if = "empty")]
    subscription: &'a str,
    #[serde(skip_serializing_if = "empty")]
    backend: &'a str,
    #[serde(skip_serializing_if = "empty")]
    backend_url: &'a str,
    status: u16,
    #[serde(skip_serializing_if = "zero")]
    backend_status: u16,
    total_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend_ms: Option<f64>,
    bytes_in: u64,
    bytes_out: u64,
    #[serde(skip_serializing_if = "empty")]
    cache: &'a str,
    #[serde(skip_serializing_if = "empty")]
    error_source: &'a str,
    #[serde(skip_serializing_if = "empty")]
    error_reason: &'a str,
    #[serde(skip_serializing_if = "empty")]
    error_message: &'a str,
    #[serde(skip_serializing_if = "empty")]
    user_agent: &'a str,
    #[serde(skip_serializing_if = "empty")]
    gateway: &'a str,
    #[serde(skip_serializing_if = "empty")]
    instance: &'a str,
}

/// One request as a line.
pub fn request_line<'a>(r: &'a RequestRecord<'a>) -> RequestLine<'a> {
    RequestLine {
        time: humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(r.time_unix_ms),
        ),
        request_id: r.request_id.as_str(),
        trace_id: r.trace_id.as_str(),
        span_id: r.span_id.as_str(),
        parent_span_id: r.parent_span_id.as_str(),
        listener: r.listener.as_str(),
        client_ip: r.client_ip.as_str(),
        method: r.method.as_str(),
        host: r.host.as_str(),
        path: r.path.as_str(),
        api: r.api_id.as_str(),
        operation: r.operation_id.as_str(),
        route: r.route.as_str(),
        product: r.product_id.as_str(),
        subscription: r.subscription_id.as_str(),
        backend: r.backend_id.as_str(),
        backend_url: r.backend_url.as_str(),
        status: r.status,
        backend_status: r.backend_status,
        total_ms: r.total_us as f64 / 1000.0,
        backend_ms: (r.backend_status != 0).then(|| r.backend_us as f64 / 1000.0),
        bytes_in: r.bytes_in,
        bytes_out: r.bytes_out,
        cache: r.cache.as_str(),
        error_source: r.error_source.as_str(),
        error_reason: r.error_reason.as_str(),
        error_message: r.error_message.as_str(),
        user_agent: r.user_agent.as_str(),
        gateway: host::gateway_id(),
        instance: host::instance_id(),
    }
}

impl Sink for AccessLog {
    type Config = Config;

    fn new(c: Config) -> Result<Self, String> {
        let out = if c.path == "-" {
            Out::Stdout
        } else if c.path.is_empty() {
            return Err("path must name a file, or be - for standard output".into());
        } else {
            let path = PathBuf::from(&c.path);
            let (file, id) =
                open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            Out::File { path, file, id }
        };
        Ok(Self {
            out: Mutex::new(out),
            metrics: c.metrics,
        })
    }

    fn export(&self, batch: &[RequestRecord<'_>]) -> Result<(), Error> {
        self.write(batch.iter().map(request_line))
    }

    fn export_metrics(&self, batch: &[MetricSample<'_>]) -> Result<(), Error> {
        if !self.metrics || batch.is_empty() {
            return Ok(());
        }
        let time = rfc3339(host::now_unix_ms());
        let lines: Vec<Value> = batch
            .iter()
            .map(|s| {
                let labels: Map<String, Value> = s
                    .labels
                    .iter()
                    .map(|t| (t.0.to_string(), Value::String(t.1.to_string())))
                    .collect();
                json!({
                    "time": time,
                    "metric": s.name.as_str(),
                    "kind": if s.kind == outpost_plugin_sdk::api::metric::GAUGE { "gauge" } else { "counter" },
                    "labels": labels,
                    "value": s.value,
                })
            })
            .collect();
        self.write(lines.iter())
    }

    fn flush(&self, _deadline: Duration) -> Result<(), Error> {
        // Every batch is flushed as it is written.
        Ok(())
    }
}

export_plugin! {
    name: "sink-access-log",
    version: env!("CARGO_PKG_VERSION"),
    sinks: ["access-log" => AccessLog],
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::sink;

    #[test]
    fn dates_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_478_400_000), "2026-11-24T00:00:00.000Z");
    }

    fn record<'a>(path: &'a str) -> RequestRecord<'a> {
        RequestRecord {
            time_unix_ms: 1_795_478_400_000,
            request_id: "r1".into(),
            trace_id: "".into(),
            span_id: "".into(),
            parent_span_id: "".into(),
            listener: "http".into(),
            client_ip: "127.0.0.1".into(),
            method: "GET".into(),
            host: "h".into(),
            path: path.into(),
            api_id: "orders".into(),
            operation_id: "get".into(),
            route: "/{id}".into(),
            product_id: "".into(),
            subscription_id: "".into(),
            backend_id: "b".into(),
            backend_url: "http://b/1".into(),
            status: 200,
            backend_status: 200,
            total_us: 1500,
            backend_us: 1000,
            bytes_in: 0,
            bytes_out: 5,
            cache: "".into(),
            error_source: "".into(),
            error_reason: "".into(),
            error_message: "".into(),
            user_agent: "".into(),
        }
    }

    #[test]
    fn writes_a_line_per_record_and_follows_rotation() {
        let dir = std::env::temp_dir().join(format!("outpost-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.jsonl");
        let s = sink::<AccessLog>(&format!(r#"{{"path": "{}"}}"#, path.display())).expect("config");
        let batch = [record("/orders/1"), record("/orders/2")];
        assert!(s.export(batch.as_slice().into()).is_ok());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| outpost_plugin_sdk::serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["path"], "/orders/1");
        assert_eq!(lines[1]["route"], "/{id}");
        assert_eq!(lines[0]["total_ms"], 1.5);
        assert!(
            lines[0].get("product").is_none(),
            "empty fields are left out"
        );

        std::fs::rename(&path, dir.join("access.jsonl.1")).unwrap();
        assert!(s.export([record("/after")].as_slice().into()).is_ok());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1, "a new file after rotation");
        assert!(text.contains("/after"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(sink::<AccessLog>(r#"{}"#).is_err());
        assert!(sink::<AccessLog>(r#"{"path": ""}"#).is_err());
        assert!(sink::<AccessLog>(r#"{"path": "/nonexistent-dir/x/access.jsonl"}"#).is_err());
        assert!(sink::<AccessLog>(r#"{"path": "-", "colour": true}"#).is_err());
    }
}

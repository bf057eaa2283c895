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

use outpost_plugin_sdk::serde::Deserialize;
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
    fn write(&self, lines: &[Value]) -> Result<(), Error> {
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
        let mut buf = Vec::with_capacity(lines.len() * 400);
        for l in lines {
            outpost_plugin_sdk::serde_json::to_writer(&mut buf, l)
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

fn put(m: &mut Map<String, Value>, key: &str, value: &str) {
    if !value.is_empty() {
        m.insert(key.into(), Value::String(value.into()));
    }
}

/// RFC 3339 UTC with milliseconds, from Unix milliseconds.
pub fn rfc3339(unix_ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(unix_ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// One request as a JSON object.
pub fn request_line(r: &RequestRecord<'_>) -> Value {
    let mut m = Map::new();
    m.insert("time".into(), Value::String(rfc3339(r.time_unix_ms)));
    for (k, v) in [
        ("request_id", r.request_id),
        ("trace_id", r.trace_id),
        ("span_id", r.span_id),
        ("parent_span_id", r.parent_span_id),
        ("listener", r.listener),
        ("client_ip", r.client_ip),
        ("method", r.method),
        ("host", r.host),
        ("path", r.path),
        ("api", r.api_id),
        ("operation", r.operation_id),
        ("route", r.route),
        ("product", r.product_id),
        ("subscription", r.subscription_id),
        ("backend", r.backend_id),
        ("backend_url", r.backend_url),
        ("cache", r.cache),
        ("error_source", r.error_source),
        ("error_reason", r.error_reason),
        ("error_message", r.error_message),
        ("user_agent", r.user_agent),
    ] {
        put(&mut m, k, v.as_str());
    }
    m.insert("status".into(), json!(r.status));
    if r.backend_status != 0 {
        m.insert("backend_status".into(), json!(r.backend_status));
        m.insert("backend_ms".into(), json!(r.backend_us as f64 / 1000.0));
    }
    m.insert("total_ms".into(), json!(r.total_us as f64 / 1000.0));
    m.insert("bytes_in".into(), json!(r.bytes_in));
    m.insert("bytes_out".into(), json!(r.bytes_out));
    put(&mut m, "gateway", host::gateway_id());
    put(&mut m, "instance", host::instance_id());
    Value::Object(m)
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
        let lines: Vec<Value> = batch.iter().map(request_line).collect();
        self.write(&lines)
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
        self.write(&lines)
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

//! Telemetry: one record per request, offered to a bounded queue per sink (full: dropped and
//! counted, never waited for), exported in batches from a dedicated thread per sink, which
//! also hands sinks a snapshot of every metric on a schedule. At shutdown every sink gets the
//! rest of its queue and a flush, within a deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi_stable::std_types::{RResult, RStr, Tuple2};
use http::{HeaderValue, Method, Uri};
use outpost_config::Telemetry as Settings;
use outpost_plugin_api::{MetricSample, RequestRecord, SinkBox};

use crate::metrics::{
    self,
    gateway::{TELEMETRY_DROPPED, TELEMETRY_EXPORT_ERRORS},
};
use crate::plugins::PluginHost;

/// Now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One request, owned until its sinks have exported it. Built on every request while a sink
/// is configured, so its fields share what the request already holds (header values, the URI,
/// ids) instead of copying them into strings.
#[derive(Debug, Clone)]
pub struct Record {
    /// Arrival, Unix milliseconds.
    pub time_unix_ms: u64,
    /// Request id.
    pub request_id: HeaderValue,
    /// Trace id (32 lowercase hex), once known.
    pub trace_id: Option<[u8; 32]>,
    /// Span id towards the backend (16 hex), once known.
    pub span_id: Option<[u8; 16]>,
    /// The client's span id (16 hex), when it sent one.
    pub parent_span_id: Option<[u8; 16]>,
    /// Listener.
    pub listener: Arc<str>,
    /// Client IP.
    pub client_ip: HeaderValue,
    /// Method.
    pub method: Method,
    /// Host, as the client sent it.
    pub host: Option<HeaderValue>,
    /// The request's URI as the client sent it (the record shows its path).
    pub uri: Uri,
    /// API id.
    pub api_id: Option<Arc<str>>,
    /// Operation id.
    pub operation_id: Option<Arc<str>>,
    /// Operation template.
    pub route: Option<Arc<str>>,
    /// Product id.
    pub product_id: Option<Arc<str>>,
    /// Subscription id.
    pub subscription_id: Option<Arc<str>>,
    /// Backend id.
    pub backend_id: Option<Arc<str>>,
    /// Backend URL (scheme, authority and path).
    pub backend_url: String,
    /// Status to the client.
    pub status: u16,
    /// Backend status.
    pub backend_status: u16,
    /// Total time to the response head, µs.
    pub total_us: u64,
    /// Backend time, µs.
    pub backend_us: u64,
    /// Request bytes.
    pub bytes_in: u64,
    /// Response bytes.
    pub bytes_out: u64,
    /// Cache outcome.
    pub cache: Option<String>,
    /// Error source.
    pub error_source: &'static str,
    /// Error code.
    pub error_reason: &'static str,
    /// Error message.
    pub error_message: String,
    /// User agent.
    pub user_agent: Option<HeaderValue>,
}

fn s(o: &Option<Arc<str>>) -> RStr<'_> {
    o.as_deref().unwrap_or_default().into()
}

/// A header value as text: UTF-8 is enough for telemetry (sinks escape what they write), and
/// checking it is cheaper than `to_str`'s visible-ASCII scan, done per sink per record.
fn text(v: &HeaderValue) -> RStr<'_> {
    std::str::from_utf8(v.as_bytes()).unwrap_or_default().into()
}

fn hex(h: &Option<impl AsRef<[u8]>>) -> RStr<'_> {
    h.as_ref()
        .and_then(|b| std::str::from_utf8(b.as_ref()).ok())
        .unwrap_or_default()
        .into()
}

impl Record {
    /// The ABI view sinks receive.
    pub fn view(&self) -> RequestRecord<'_> {
        RequestRecord {
            time_unix_ms: self.time_unix_ms,
            request_id: text(&self.request_id),
            trace_id: hex(&self.trace_id),
            span_id: hex(&self.span_id),
            parent_span_id: hex(&self.parent_span_id),
            listener: self.listener.as_ref().into(),
            client_ip: text(&self.client_ip),
            method: self.method.as_str().into(),
            host: self.host.as_ref().map(text).unwrap_or_default(),
            path: self.uri.path().into(),
            api_id: s(&self.api_id),
            operation_id: s(&self.operation_id),
            route: s(&self.route),
            product_id: s(&self.product_id),
            subscription_id: s(&self.subscription_id),
            backend_id: s(&self.backend_id),
            backend_url: self.backend_url.as_str().into(),
            status: self.status,
            backend_status: self.backend_status,
            total_us: self.total_us,
            backend_us: self.backend_us,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            cache: self.cache.as_deref().unwrap_or_default().into(),
            error_source: self.error_source.into(),
            error_reason: self.error_reason.into(),
            error_message: self.error_message.as_str().into(),
            user_agent: self.user_agent.as_ref().map(text).unwrap_or_default(),
        }
    }
}

struct Worker {
    name: String,
    queue: SyncSender<Arc<Record>>,
    done: std::sync::Mutex<Receiver<()>>,
}

/// The sinks and their queues.
pub struct Telemetry {
    workers: Vec<Worker>,
    stop: Arc<AtomicBool>,
    shutdown_flush: Duration,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field(
                "sinks",
                &self.workers.iter().map(|w| &w.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Creates every `[[telemetry.sinks]]` entry and starts its thread. `None` without sinks
    /// (requests then build no record at all).
    pub fn start(
        settings: &Settings,
        plugins: &PluginHost,
    ) -> Result<Option<Telemetry>, Vec<String>> {
        let mut sinks = Vec::new();
        let mut problems = Vec::new();
        for (i, e) in settings.sinks.iter().enumerate() {
            match plugins.sink(&e.provider, &e.config) {
                Ok(sink) => sinks.push((e.name.clone(), sink)),
                Err(why) => problems.push(format!("telemetry.sinks[{i}] '{}': {why}", e.name)),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        if sinks.is_empty() {
            return Ok(None);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for (name, sink) in sinks {
            let (queue, rx) = sync_channel(settings.queue_capacity);
            let (done_tx, done) = sync_channel(1);
            let run = Run {
                name: name.clone(),
                sink,
                rx,
                stop: stop.clone(),
                batch_max: settings.batch_max,
                flush_every: Duration::from_millis(settings.flush_interval_ms),
                metrics_every: Duration::from_millis(settings.metrics_interval_ms),
                shutdown_flush: Duration::from_millis(settings.shutdown_flush_ms),
            };
            std::thread::Builder::new()
                .name(format!("outpost-sink-{name}"))
                .spawn(move || {
                    run.run();
                    let _ = done_tx.send(());
                })
                .map_err(|e| {
                    vec![format!(
                        "telemetry sink '{name}': cannot start its thread: {e}"
                    )]
                })?;
            workers.push(Worker {
                name,
                queue,
                done: std::sync::Mutex::new(done),
            });
        }
        Ok(Some(Telemetry {
            workers,
            stop,
            shutdown_flush: Duration::from_millis(settings.shutdown_flush_ms),
        }))
    }

    /// Offers a record to every sink; a full queue drops it for that sink and counts it.
    pub fn offer(&self, record: Record) {
        let record = Arc::new(record);
        for w in &self.workers {
            match w.queue.try_send(record.clone()) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => TELEMETRY_DROPPED.inc(&[&w.name]),
                Err(TrySendError::Disconnected(_)) => TELEMETRY_DROPPED.inc(&[&w.name]),
            }
        }
    }

    /// Stops the sinks: each exports what it has queued and flushes, within the deadline.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + self.shutdown_flush + Duration::from_millis(500);
        for w in &self.workers {
            let left = deadline.saturating_duration_since(Instant::now());
            let done = w.done.lock().unwrap_or_else(|e| e.into_inner());
            if done.recv_timeout(left).is_err() {
                tracing::warn!(sink = %w.name, "Telemetry sink did not finish in time; what it held is lost.");
            }
        }
    }
}

struct Run {
    name: String,
    sink: SinkBox,
    rx: Receiver<Arc<Record>>,
    stop: Arc<AtomicBool>,
    batch_max: usize,
    flush_every: Duration,
    metrics_every: Duration,
    shutdown_flush: Duration,
}

impl Run {
    /// The sink's loop. It never blocks on the queue: it wakes on a short tick and takes what
    /// has arrived, so a request's `try_send` never has to wake this thread (no context switch
    /// per request).
    fn run(self) {
        let mut batch: Vec<Arc<Record>> = Vec::with_capacity(self.batch_max);
        let mut batch_started = Instant::now();
        let mut next_metrics = Instant::now() + self.metrics_every;
        let tick = self.flush_every.min(Duration::from_millis(20));
        loop {
            let stopping = self.stop.load(Ordering::Relaxed);
            let mut disconnected = false;
            loop {
                match self.rx.try_recv() {
                    Ok(r) => {
                        if batch.is_empty() {
                            batch_started = Instant::now();
                        }
                        batch.push(r);
                        if batch.len() >= self.batch_max {
                            self.export(&mut batch);
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            if !batch.is_empty() && (stopping || batch_started.elapsed() >= self.flush_every) {
                self.export(&mut batch);
            }
            if Instant::now() >= next_metrics {
                self.export_metrics();
                next_metrics = Instant::now() + self.metrics_every;
            }
            if stopping || disconnected {
                break;
            }
            std::thread::sleep(tick);
        }
        self.export(&mut batch);
        self.export_metrics();
        if let RResult::RErr(e) = self.sink.flush(self.shutdown_flush.as_millis() as u64) {
            tracing::warn!(sink = %self.name, error = %e.message, "Telemetry sink flush failed.");
        }
    }

    fn export(&self, batch: &mut Vec<Arc<Record>>) {
        if batch.is_empty() {
            return;
        }
        let views: Vec<RequestRecord<'_>> = batch.iter().map(|r| r.view()).collect();
        if let RResult::RErr(e) = self.sink.export(views.as_slice().into()) {
            TELEMETRY_EXPORT_ERRORS.inc(&[&self.name]);
            tracing::warn!(sink = %self.name, records = views.len(), error = %e.message, "Telemetry sink export failed.");
        }
        drop(views);
        batch.clear();
    }

    fn export_metrics(&self) {
        let samples = metrics::global().snapshot();
        let labels: Vec<Vec<Tuple2<RStr<'_>, RStr<'_>>>> = samples
            .iter()
            .map(|s| {
                s.def
                    .labels
                    .iter()
                    .zip(s.label_values.iter())
                    .map(|(n, v)| Tuple2(n.as_str().into(), v.as_str().into()))
                    .collect()
            })
            .collect();
        let views: Vec<MetricSample<'_>> = samples
            .iter()
            .zip(labels.iter())
            .map(|(s, l)| MetricSample {
                name: s.def.name.as_str().into(),
                help: s.def.help.as_str().into(),
                kind: s.def.kind,
                labels: l.as_slice().into(),
                value: s.value,
            })
            .collect();
        if let RResult::RErr(e) = self.sink.export_metrics(views.as_slice().into()) {
            TELEMETRY_EXPORT_ERRORS.inc(&[&self.name]);
            tracing::warn!(sink = %self.name, error = %e.message, "Telemetry sink metrics export failed.");
        }
    }
}

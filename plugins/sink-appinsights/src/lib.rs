//! `appinsights`: a telemetry sink that sends Outpost's requests, backend calls, failures and
//! metrics to Azure Application Insights, speaking the ingestion protocol
//! (`POST {endpoint}/v2.1/track`, gzip NDJSON, per-item partial success, `Retry-After`).
//!
//! ```toml
//! [[telemetry.sinks]]
//! name = "appinsights"
//! provider = "appinsights"
//! config = { connection_string = "InstrumentationKey=…;IngestionEndpoint=https://westeurope-5.in.applicationinsights.azure.com/", spool_dir = "/var/lib/outpost/appinsights" }
//! ```
//!
//! The gateway's sink thread calls [`Sink::export`]: it turns each record into items
//! ([`envelope`]) and compresses them into the batch being filled, in a bounded buffer of
//! batches ([`sender::Queue`]). A thread of the sink's own ([`sender`]) sends the batches, resends what the endpoint asks to have resent and
//! spools batches to disk while the endpoint is unreachable ([`spool`]). See the README for
//! every field, the item mapping, the metrics and the failure behaviour.

// mimalloc, the allocator the gateway itself uses, rather than the system allocator a cdylib
// would otherwise get: it took the sink's cost per request from about 25 µs down
// (BENCHMARKS.md) when items were still `serde_json::Value` trees, each allocated on the
// gateway's sink thread and freed on the sending thread. Batches still cross those threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use outpost_plugin_sdk::{export_plugin, host, Error, MetricSample, RequestRecord, Sink};

pub mod adaptive;
pub mod config;
pub mod connection_string;
pub mod envelope;
pub mod sender;
pub mod spool;
pub mod transport;

#[cfg(test)]
mod cost;
#[cfg(test)]
mod tests;

use adaptive::Adaptive;
use config::{Config, Settings};
use envelope::{Encoder, Identity, Kinds, Scratch};
use sender::{Queue, Sender, Stats};
use transport::Reason;

/// The sink.
pub struct AppInsights {
    settings: Arc<Settings>,
    encoder: Encoder,
    /// Where items are written (calls to `export` never overlap, so it is never waited for).
    scratch: Mutex<Scratch>,
    queue: Arc<Queue>,
    stats: Arc<Stats>,
    thread: Mutex<Option<JoinHandle<()>>>,
    counters: Mutex<HashMap<String, f64>>,
    /// The cap on items a second, when configured.
    adaptive: Option<Mutex<Adaptive>>,
}

/// Creates the spool directory and checks that files can be written in it.
fn prepare_spool(dir: &Path) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("spool_dir: cannot use {}: {e}", dir.display());
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(fail)?;
    let _ = std::fs::remove_file(probe);
    Ok(())
}

impl AppInsights {
    /// The counts the sink keeps (the same as its metrics).
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Starts the sending thread on the first call (the gateway's start-up metrics snapshot):
    /// `outpost check` builds sinks without starting anything.
    fn start(&self) -> Result<(), Error> {
        let mut thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if thread.is_some() {
            return Ok(());
        }
        let sender = Sender::new(
            self.settings.clone(),
            self.queue.clone(),
            self.stats.clone(),
        )
        .map_err(|e| Error::unavailable(format!("cannot start sending: {e}")))?;
        host::log(
            outpost_plugin_sdk::level::INFO,
            &format!(
                "Sending telemetry to Application Insights at {} (key {}), {}.",
                self.settings.connection.ingestion_endpoint,
                self.settings.connection.redacted_key(),
                match self.settings.max_items_per_second {
                    Some(m) => format!("at most {m} items a second (max_items_per_second)"),
                    None => "with no cap on items a second".to_owned(),
                }
            ),
        );
        *thread = Some(
            std::thread::Builder::new()
                .name("outpost-appinsights".into())
                .spawn(move || sender.run())
                .map_err(|e| Error::unavailable(format!("cannot start its thread: {e}")))?,
        );
        Ok(())
    }

    /// Replaces the cap's window (tests: the real one is seconds long).
    #[cfg(test)]
    pub(crate) fn set_adaptive_window(&mut self, window: Duration) {
        if let Some(m) = self.settings.max_items_per_second {
            let pct = self.settings.sampling_percentage;
            self.adaptive = Some(Mutex::new(Adaptive::with_window(
                m,
                pct,
                window,
                Instant::now(),
            )));
        }
    }

    /// The sampling percentage in effect.
    pub fn sampling_percentage(&self) -> f64 {
        match &self.adaptive {
            Some(a) => a.lock().unwrap_or_else(|e| e.into_inner()).percentage(),
            None => self.settings.sampling_percentage,
        }
    }

    fn started(&self) -> bool {
        self.thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

impl Drop for AppInsights {
    fn drop(&mut self) {
        self.queue.stop();
        if let Some(t) = self
            .thread
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = t.join();
        }
    }
}

impl Sink for AppInsights {
    type Config = Config;
    /// `export` samples and compresses into the batch being built (bounded: past the
    /// buffer the oldest batches are dropped, counted); the sending thread does every
    /// exchange and the spool, and holds the batches' lock only to take or put one.
    const NEVER_BLOCKS: bool = true;

    fn new(config: Config) -> Result<Self, String> {
        let settings = config.validate()?;
        if let Some(dir) = &settings.spool_dir {
            prepare_spool(dir)?;
        }
        let identity = Identity::new(
            &settings.connection.instrumentation_key,
            host::gateway_id(),
            host::instance_id(),
            settings.region.clone(),
        );
        let kinds = Kinds {
            dependencies: settings.dependencies,
            exceptions: settings.exceptions,
        };
        let stats = Arc::new(Stats::new());
        stats.sampling_percentage(settings.sampling_percentage);
        let adaptive = settings.max_items_per_second.map(|m| {
            Mutex::new(Adaptive::new(
                m,
                settings.sampling_percentage,
                Instant::now(),
            ))
        });
        Ok(AppInsights {
            encoder: Encoder::new(&identity, kinds, settings.sampling_percentage),
            scratch: Mutex::new(Scratch::default()),
            queue: Arc::new(Queue::new(
                settings.max_pending_items,
                settings.max_batch_items,
            )),
            stats,
            thread: Mutex::new(None),
            counters: Mutex::new(HashMap::new()),
            adaptive,
            settings: Arc::new(settings),
        })
    }

    fn export(&self, batch: &[RequestRecord<'_>]) -> Result<(), Error> {
        self.start()?;
        let pct = self.sampling_percentage();
        let (mut sampled_out, mut too_large) = (0, 0);
        // What the batch would send at 100 %, and what its failures send: the cap's counts.
        let (mut offered, mut forced) = (0, 0);
        let mut scratch = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        // Each item is compressed into the batch being built as soon as it is written, while
        // it is still in this thread's cache.
        self.queue.append(&self.stats, |items| {
            for r in batch {
                let ids = envelope::operation_ids(r);
                let failure = envelope::is_failure(r);
                if !failure {
                    let items =
                        1 + usize::from(self.settings.dependencies && r.backend_status != 0);
                    offered += items;
                    if !envelope::sampled_in(&ids.operation, pct) {
                        sampled_out += items;
                        continue;
                    }
                }
                // A failure is sent whatever the sampling, so it stands for itself only.
                let rate = if failure { 100.0 } else { pct };
                self.encoder
                    .request_items(r, &ids, rate, &mut scratch, |item| {
                        forced += usize::from(failure);
                        if item.len() <= envelope::MAX_ITEM_BYTES {
                            items.item(item);
                        } else {
                            too_large += 1;
                        }
                    });
            }
        });
        drop(scratch);
        self.stats.dropped(Reason::Sampling, sampled_out);
        self.stats.dropped(Reason::TooLarge, too_large);
        if let Some(a) = &self.adaptive {
            let changed = a.lock().unwrap_or_else(|e| e.into_inner()).count(
                offered as u64,
                forced as u64,
                Instant::now(),
            );
            if let Some(now) = changed {
                self.stats.sampling_percentage(now);
                host::log(
                    outpost_plugin_sdk::level::INFO,
                    &format!(
                        "Application Insights sampling now {now:.3} % (from {pct:.3} %), to stay under max_items_per_second = {}.",
                        self.settings.max_items_per_second.unwrap_or_default()
                    ),
                );
            }
        }
        Ok(())
    }

    fn export_metrics(&self, batch: &[MetricSample<'_>]) -> Result<(), Error> {
        // The first call, as the gateway starts, starts the sending thread (which replays
        // what an earlier run spooled) whether or not metrics are sent.
        self.start()?;
        if !self.settings.metrics || batch.is_empty() {
            return Ok(());
        }
        let now = host::now_unix_ms();
        let mut last = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut items = Vec::with_capacity(batch.len());
        let mut too_large = 0;
        for s in batch {
            let value = if s.kind == outpost_plugin_sdk::api::metric::COUNTER {
                // Counters go as what they added since the previous snapshot.
                let mut key = s.name.to_string();
                for l in s.labels.iter() {
                    key.push('\u{1}');
                    key.push_str(l.0.as_str());
                    key.push('\u{2}');
                    key.push_str(l.1.as_str());
                }
                let before = last.insert(key, s.value).unwrap_or(0.0);
                let delta = if s.value >= before {
                    s.value - before
                } else {
                    s.value // reset
                };
                if delta == 0.0 {
                    continue;
                }
                delta
            } else {
                s.value
            };
            let item = self.encoder.metric_item(s, value, now);
            if item.len() <= envelope::MAX_ITEM_BYTES {
                items.push(item);
            } else {
                too_large += 1;
            }
        }
        drop(last);
        self.stats.dropped(Reason::TooLarge, too_large);
        self.queue.push(items, &self.stats);
        Ok(())
    }

    fn flush(&self, deadline: Duration) -> Result<(), Error> {
        if !self.started() && !self.queue.has_pending() {
            return Ok(());
        }
        self.start()?;
        let (done, wait) = sync_channel(1);
        // Keep a little of the deadline for handing back.
        let margin = (deadline / 10).min(Duration::from_millis(200));
        self.queue
            .flush(Instant::now() + deadline.saturating_sub(margin), done);
        wait.recv_timeout(deadline).map_err(|_| {
            Error::timeout("telemetry still in flight at the flush deadline; it is lost")
        })
    }
}

export_plugin! {
    name: "sink-appinsights",
    version: env!("CARGO_PKG_VERSION"),
    sinks: ["appinsights" => AppInsights],
}

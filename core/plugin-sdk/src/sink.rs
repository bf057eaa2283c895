//! Telemetry sinks: called off the request path with batches of records.

use std::time::Duration;

use crate::api::abi_stable::std_types::{RResult, RSlice};
use crate::api::{self, MetricSample, PluginError, RequestRecord};
use crate::{guard, Error};

/// A telemetry sink. The gateway calls it from a dedicated thread, never from a request:
/// blocking I/O is fine, but a slow sink delays its own next batch (and, once the gateway's
/// queue is full, makes the gateway drop and count records). A sink that never blocks says
/// so ([`Sink::NEVER_BLOCKS`]) and is called from the gateway's telemetry thread instead.
pub trait Sink: Send + Sync + Sized + 'static {
    /// The sink's configuration (the manifest entry's `config`), parsed strictly.
    type Config: serde::de::DeserializeOwned;

    /// Whether [`Sink::export`] and [`Sink::export_metrics`] return at once: no I/O, no
    /// waiting (a lock shared with the sink's own threads is held by them only briefly), and
    /// little work per record (delivery, if any, on a thread of the sink's own). When every
    /// sink of a library says so, the library tells the gateway
    /// ([`kinds::SINKS_NEVER_BLOCK`](crate::api::kinds::SINKS_NEVER_BLOCK)), and the gateway
    /// calls these sinks from its telemetry thread, a short run of records at a time while
    /// they are in that thread's cache, instead of from a thread per sink: cheaper per
    /// record, but a sink that blocks there holds up every sink called the same way.
    const NEVER_BLOCKS: bool = false;

    /// Builds the sink; an error stops the gateway from starting (or `outpost check` reports it).
    /// `outpost check` calls this too, and nothing else: validate here, and leave what has
    /// effects outside the process (binding a port, starting a thread) to the first call,
    /// [`Sink::export_metrics`] as the gateway starts. The gateway waits for that call: keep
    /// it short, and connect to remote services from a thread of the sink's own.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// A batch of request records, in the order their responses started.
    fn export(&self, batch: &[RequestRecord<'_>]) -> Result<(), Error>;

    /// The current value of every metric series: as the gateway starts (the sink's first
    /// call, before any [`Sink::export`]; an error then stops the gateway from starting), every
    /// `metrics_interval_ms`, and at shutdown.
    fn export_metrics(&self, batch: &[MetricSample<'_>]) -> Result<(), Error> {
        let _ = batch;
        Ok(())
    }

    /// Deliver what is buffered within `deadline` (at shutdown).
    fn flush(&self, deadline: Duration) -> Result<(), Error> {
        let _ = deadline;
        Ok(())
    }
}

pub(crate) struct Adapter<S>(pub(crate) S);

impl<S: Sink> api::TelemetrySink for Adapter<S> {
    fn export(&self, batch: RSlice<'_, RequestRecord<'_>>) -> RResult<(), PluginError> {
        guard(|| self.0.export(batch.as_slice()))
    }

    fn export_metrics(&self, batch: RSlice<'_, MetricSample<'_>>) -> RResult<(), PluginError> {
        guard(|| self.0.export_metrics(batch.as_slice()))
    }

    fn flush(&self, deadline_ms: u64) -> RResult<(), PluginError> {
        guard(|| self.0.flush(Duration::from_millis(deadline_ms)))
    }
}

//! Telemetry: one record per request, offered to a bounded queue (full: dropped and counted,
//! never waited for). The telemetry thread takes records off it in batches, builds the ABI
//! views of a batch once and hands the batch to every sink's thread (a sink that has too many
//! records pending loses the batch, counted); each sink's thread exports its batches and, on
//! a schedule, a snapshot of every metric. At shutdown every sink gets what is left and a
//! flush, within a deadline.

// Records stay boxed from the request to the batch and back: a record moves between threads
// and vectors as a pointer, and keeps its allocation for the next request.
#![allow(clippy::vec_box)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{
    channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi_stable::std_types::{RResult, RStr, Tuple2};
use http::{HeaderValue, Method};
use outpost_config::Telemetry as Settings;
use outpost_plugin_api::{ErrorKind, MetricSample, PluginError, RequestRecord, SinkBox};

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

/// The wall clock and the monotonic clock read together, to turn a record's arrival into
/// wall-clock time when it is exported: a request reads no wall clock (one clock read fewer
/// on the request path), and its time follows the wall clock as it is at export, a second
/// or so later.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    unix_ms: u64,
    at: Instant,
}

impl Clock {
    /// Now.
    pub fn now() -> Clock {
        Clock {
            unix_ms: unix_ms(),
            at: Instant::now(),
        }
    }

    /// The Unix milliseconds of `instant` (not after this clock's reading).
    pub fn unix_ms_at(&self, instant: Instant) -> u64 {
        let ago = self.at.saturating_duration_since(instant).as_millis() as u64;
        self.unix_ms.saturating_sub(ago)
    }
}

/// A span of [`Record::text`]: start and length.
#[derive(Debug, Clone, Copy, Default)]
struct Span(u32, u32);

/// The strings of a [`Record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Text {
    /// Request id.
    RequestId,
    /// Client IP.
    ClientIp,
    /// Host, as the client sent it.
    Host,
    /// Path.
    Path,
    /// User agent.
    UserAgent,
    /// Listener.
    Listener,
    /// Backend URL (scheme, authority and path).
    BackendUrl,
    /// API id.
    ApiId,
    /// Operation id.
    OperationId,
    /// Operation template.
    Route,
    /// Product id.
    ProductId,
    /// Subscription id.
    SubscriptionId,
    /// Backend id.
    BackendId,
    /// Cache outcome.
    Cache,
    /// Error message.
    ErrorMessage,
}

impl Text {
    const COUNT: usize = Text::ErrorMessage as usize + 1;
}

/// One request, owned until its sinks have exported it. Built on every request while a sink
/// is configured: its strings (from the request, from the configuration it matched, the
/// backend URL, the error) are copied into one buffer as they become known. A record is
/// one allocation besides its text, holds nothing of the connection's buffers, counts no
/// references to strings every request shares (which would have all the gateway's threads
/// writing to the same memory), and its text is checked as UTF-8 once instead of by every
/// sink. Once every sink is done with it, it serves another request ([`Telemetry::record`]),
/// text buffer included.
#[derive(Debug, Clone)]
pub struct Record {
    /// Arrival (turned into wall-clock time when the record is exported: see [`Clock`]).
    pub arrived: Instant,
    /// Every string of the record, one after the other.
    text: String,
    /// Where each [`Text`] is in `text` (empty until set).
    spans: [Span; Text::COUNT],
    /// Trace id (32 lowercase hex), once known.
    pub trace_id: Option<[u8; 32]>,
    /// Span id towards the backend (16 hex), once known.
    pub span_id: Option<[u8; 16]>,
    /// The client's span id (16 hex), once known, when the gateway continues the client's
    /// trace.
    pub parent_span_id: Option<[u8; 16]>,
    /// Method.
    pub method: Method,
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
    /// Error source.
    pub error_source: &'static str,
    /// Error code.
    pub error_reason: &'static str,
}

/// What a request tells its record when it arrives.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    /// Arrival.
    pub at: Instant,
    /// Request id.
    pub request_id: &'a HeaderValue,
    /// Client IP.
    pub client_ip: &'a HeaderValue,
    /// Host, as the client sent it.
    pub host: Option<&'a [u8]>,
    /// Path.
    pub path: &'a str,
    /// User agent.
    pub user_agent: Option<&'a HeaderValue>,
    /// Listener.
    pub listener: &'a str,
    /// Method.
    pub method: &'a Method,
    /// Request bytes (its declared length).
    pub bytes_in: u64,
}

/// Bytes as text when they are UTF-8 (header values nearly always are), else nothing:
/// telemetry does not carry what it cannot show.
fn utf8(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap_or_default()
}

fn hex(h: &Option<impl AsRef<[u8]>>) -> RStr<'_> {
    h.as_ref()
        .map(|b| utf8(b.as_ref()))
        .unwrap_or_default()
        .into()
}

impl Record {
    /// A record of a request that has just arrived.
    pub fn begin(a: Arrival<'_>) -> Record {
        let mut r = Record {
            arrived: a.at,
            text: String::new(),
            spans: [Span::default(); Text::COUNT],
            trace_id: None,
            span_id: None,
            parent_span_id: None,
            method: Method::GET,
            status: 0,
            backend_status: 0,
            total_us: 0,
            backend_us: 0,
            bytes_in: 0,
            bytes_out: 0,
            error_source: "",
            error_reason: "",
        };
        r.restart(a);
        r
    }

    /// Makes this record the record of a request that has just arrived, in its own
    /// allocations: nothing of what it held before is left.
    pub fn restart(&mut self, a: Arrival<'_>) {
        // Header values are checked as UTF-8 here, once; the path and the listener are text
        // already.
        let parts = [
            utf8(a.request_id.as_bytes()),
            utf8(a.client_ip.as_bytes()),
            utf8(a.host.unwrap_or_default()),
            a.path,
            utf8(a.user_agent.map(HeaderValue::as_bytes).unwrap_or_default()),
            a.listener,
        ];
        // Room for the backend URL too (scheme, authority and the path again) and the ids
        // the request matches, so that adding them seldom moves the text.
        let room = parts.iter().map(|p| p.len()).sum::<usize>() + a.path.len() + 160;
        self.text.clear();
        self.text.reserve(room);
        self.spans = [Span::default(); Text::COUNT];
        self.arrived = a.at;
        self.trace_id = None;
        self.span_id = None;
        self.parent_span_id = None;
        self.method = a.method.clone();
        self.status = 0;
        self.backend_status = 0;
        self.total_us = 0;
        self.backend_us = 0;
        self.bytes_in = a.bytes_in;
        self.bytes_out = 0;
        self.error_source = "";
        self.error_reason = "";
        let fields = [
            Text::RequestId,
            Text::ClientIp,
            Text::Host,
            Text::Path,
            Text::UserAgent,
            Text::Listener,
        ];
        for (field, part) in fields.into_iter().zip(parts) {
            self.set(field, part);
        }
    }

    /// Sets `field` to `parts` joined: appended to the text (a field set again shows its
    /// last value).
    fn set_joined(&mut self, field: Text, parts: &[&str]) {
        let start = self.text.len();
        for p in parts {
            self.text.push_str(p);
        }
        self.spans[field as usize] = Span(start as u32, (self.text.len() - start) as u32);
    }

    /// Sets `field` (a field set again shows its last value).
    pub fn set(&mut self, field: Text, value: &str) {
        self.set_joined(field, &[value]);
    }

    /// The backend URL: scheme, authority and path.
    pub fn set_backend_url(&mut self, scheme: &str, authority: &str, path: &str) {
        self.set_joined(Text::BackendUrl, &[scheme, "://", authority, path]);
    }

    /// A field's value (empty when it was never set).
    pub fn get(&self, field: Text) -> &str {
        let Span(start, len) = self.spans[field as usize];
        let start = start as usize;
        self.text
            .get(start..start + len as usize)
            .unwrap_or_default()
    }

    /// Asks for the record to be brought into the cache ahead of reading it.
    #[inline]
    fn prefetch_record(&self) {
        let at = (self as *const Record).cast::<u8>();
        for line in (0..std::mem::size_of::<Record>()).step_by(64) {
            prefetch_line(at.wrapping_add(line));
        }
    }

    /// Asks for the start of the room the record has for text to be brought into the cache
    /// ahead of writing it (this reads the record, to know where the text is).
    #[inline]
    fn prefetch_text_room(&self) {
        let text = self.text.as_ptr();
        for line in (0..self.text.capacity().min(256)).step_by(64) {
            prefetch_line(text.wrapping_add(line));
        }
    }

    /// Asks for the start of the record's text to be brought into the cache ahead of reading
    /// it (this reads the record, to know where the text is).
    #[inline]
    fn prefetch_text(&self) {
        let text = self.text.as_ptr();
        for line in (0..self.text.len().min(256)).step_by(64) {
            prefetch_line(text.wrapping_add(line));
        }
    }

    /// The ABI view sinks receive, its time read off `clock`.
    pub fn view(&self, clock: &Clock) -> RequestRecord<'_> {
        RequestRecord {
            time_unix_ms: clock.unix_ms_at(self.arrived),
            request_id: self.get(Text::RequestId).into(),
            trace_id: hex(&self.trace_id),
            span_id: hex(&self.span_id),
            parent_span_id: hex(&self.parent_span_id),
            listener: self.get(Text::Listener).into(),
            client_ip: self.get(Text::ClientIp).into(),
            method: self.method.as_str().into(),
            host: self.get(Text::Host).into(),
            path: self.get(Text::Path).into(),
            api_id: self.get(Text::ApiId).into(),
            operation_id: self.get(Text::OperationId).into(),
            route: self.get(Text::Route).into(),
            product_id: self.get(Text::ProductId).into(),
            subscription_id: self.get(Text::SubscriptionId).into(),
            backend_id: self.get(Text::BackendId).into(),
            backend_url: self.get(Text::BackendUrl).into(),
            status: self.status,
            backend_status: self.backend_status,
            total_us: self.total_us,
            backend_us: self.backend_us,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            cache: self.get(Text::Cache).into(),
            error_source: self.error_source.into(),
            error_reason: self.error_reason.into(),
            error_message: self.get(Text::ErrorMessage).into(),
            user_agent: self.get(Text::UserAgent).into(),
        }
    }
}

/// How many records ahead of the one being read a sink thread asks for its text (and twice
/// as many for the record itself).
const PREFETCH: usize = 4;

/// Asks for the cache line at `p` (a hint: nothing is read, and no fault can follow).
#[inline(always)]
#[allow(unsafe_code)] // the one intrinsic; it is `unsafe` only for its target feature
fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE, which `_mm_prefetch` needs, is part of every x86_64 target; a prefetch
    // does not dereference `p`, so any address is sound.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The longest the idle telemetry thread blocks on its queue before looking at the stop flag.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// A batch's views, borrowed from its records.
type Views<'a> = Vec<RequestRecord<'a>>;

self_cell::self_cell!(
    /// A batch of records and the ABI views of them, built once by the telemetry thread and
    /// shared by every sink's thread.
    struct Batch {
        owner: Vec<Box<Record>>,
        #[covariant]
        dependent: Views,
    }
);

/// A sink's end of the telemetry thread: the batches it has not exported yet.
struct Outlet {
    name: String,
    batches: Sender<Arc<Batch>>,
    /// Records handed to the sink and not exported yet (at most the queue capacity).
    pending: Arc<AtomicUsize>,
}

/// What runs a sink, until [`Telemetry::start`] starts the threads.
struct Waiting {
    dispatch: Dispatch,
    runs: Vec<(Run, SyncSender<()>)>,
}

/// The sinks, their threads and the queue in front of them.
pub struct Telemetry {
    /// Records for the telemetry thread.
    queue: SyncSender<Box<Record>>,
    /// Records every sink is done with, for requests to fill again: a request then neither
    /// allocates its record nor frees it on another thread (which costs the allocator more
    /// than the allocation).
    pool: Arc<Pool>,
    /// Each sink's name and its thread's done signal.
    sinks: Vec<(String, std::sync::Mutex<Receiver<()>>)>,
    stop: Arc<AtomicBool>,
    shutdown_flush: Duration,
    waiting: std::sync::Mutex<Option<Waiting>>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field(
                "sinks",
                &self.sinks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Creates every `[[telemetry.sinks]]` entry and the queue in front of them;
    /// [`Telemetry::start`] starts them. `None` without sinks (requests then build no record
    /// at all).
    pub fn new(
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
        let batch_max = batch_max(settings);
        let (returns, pool, spares) = Returns::new(batch_max);
        let (mut outlets, mut runs, mut done) = (Vec::new(), Vec::new(), Vec::new());
        for (name, sink) in sinks {
            let (batches, rx) = channel();
            let pending = Arc::new(AtomicUsize::new(0));
            let (done_tx, done_rx) = sync_channel(1);
            runs.push((
                Run {
                    name: name.clone(),
                    sink,
                    rx,
                    pending: pending.clone(),
                    returns: returns.clone(),
                    metrics_every: Duration::from_millis(settings.metrics_interval_ms),
                    shutdown_flush: Duration::from_millis(settings.shutdown_flush_ms),
                },
                done_tx,
            ));
            outlets.push(Outlet {
                name: name.clone(),
                batches,
                pending,
            });
            done.push((name, std::sync::Mutex::new(done_rx)));
        }
        let (queue, rx) = sync_channel(settings.queue_capacity);
        let dispatch = Dispatch {
            rx,
            returns,
            spares,
            outlets,
            stop: stop.clone(),
            capacity: settings.queue_capacity,
            batch_max,
            flush_every: Duration::from_millis(settings.flush_interval_ms),
        };
        Ok(Some(Telemetry {
            queue,
            pool,
            sinks: done,
            stop,
            shutdown_flush: Duration::from_millis(settings.shutdown_flush_ms),
            waiting: std::sync::Mutex::new(Some(Waiting { dispatch, runs })),
        }))
    }

    /// Starts the sinks, once the gateway is ready to serve: each sink starts on its first
    /// call (`outpost check` creates sinks and calls nothing, so that it binds and sends
    /// nothing), which is a snapshot of the metrics as they are then; a sink that cannot start
    /// (a listen port taken) stops the gateway from starting. Then each sink's thread starts,
    /// and the telemetry thread that feeds them.
    pub fn start(&self) -> Result<(), Vec<String>> {
        let Some(Waiting { dispatch, runs }) = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(());
        };
        let mut problems = Vec::new();
        for (i, (run, _)) in runs.iter().enumerate() {
            if let RResult::RErr(e) = export_snapshot(&run.sink) {
                let why = match e.kind {
                    ErrorKind::PANICKED => "panicked".to_string(),
                    _ => e.message.into_string(),
                };
                problems.push(format!(
                    "telemetry.sinks[{i}] '{}': cannot start: {why}",
                    run.name
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        for (run, done_tx) in runs {
            let name = run.name.clone();
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
        }
        std::thread::Builder::new()
            .name("outpost-telemetry".into())
            .spawn(move || dispatch.run())
            .map_err(|e| vec![format!("cannot start the telemetry thread: {e}")])?;
        Ok(())
    }

    /// The record of a request that has just arrived: one the sinks are done with, when
    /// there is one.
    ///
    /// A record comes back from the sinks a tick after it was written, and is often out of
    /// this core's nearest caches: filling it would wait on memory twice (the record, then
    /// its text). So each
    /// thread takes its records from the pool two requests ahead and asks for them to be
    /// brought into the cache meanwhile: the record one request ahead of the one after it, its
    /// text when the record is there to say where the text is.
    pub fn record(&self, a: Arrival<'_>) -> Box<Record> {
        let r = AHEAD
            .try_with(|ahead| {
                let [next, after] = &mut *ahead.borrow_mut();
                let r = next.take();
                *next = after.take();
                if let Some(n) = next {
                    n.prefetch_text_room();
                }
                *after = self.pool.take();
                if let Some(n) = after {
                    n.prefetch_record();
                }
                r
            })
            // A thread that is ending has no records ahead any more.
            .unwrap_or_else(|_| self.pool.take());
        match r {
            Some(mut r) => {
                r.restart(a);
                r
            }
            None => Box::new(Record::begin(a)),
        }
    }

    /// Offers a record to the sinks; a full queue drops it, counted for every sink.
    pub fn offer(&self, record: Box<Record>) {
        if self.queue.try_send(record).is_err() {
            for (name, _) in &self.sinks {
                TELEMETRY_DROPPED.inc(&[name]);
            }
        }
    }

    /// Stops the sinks: each exports what is queued for it and flushes, within the deadline.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        // Sinks never started have nothing to deliver.
        drop(
            self.waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
        let deadline = Instant::now() + self.shutdown_flush + Duration::from_millis(500);
        for (name, done) in &self.sinks {
            let left = deadline.saturating_duration_since(Instant::now());
            let done = done.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(RecvTimeoutError::Timeout) = done.recv_timeout(left) {
                tracing::warn!(sink = %name, "Telemetry sink did not finish in time; what it held is lost.");
            }
        }
    }
}

/// The telemetry thread: takes the records off the queue, builds their views once a batch,
/// and hands the batch to every sink's thread.
struct Dispatch {
    rx: Receiver<Box<Record>>,
    /// Where batches every sink is done with go.
    returns: Arc<Returns>,
    /// The allocations of batches every sink is done with (a busy gateway's batch of views is
    /// a few hundred KB: allocating it anew, the allocator would hand the gateway fresh pages
    /// to fault in every batch).
    spares: crossbeam_channel::Receiver<Spare>,
    outlets: Vec<Outlet>,
    stop: Arc<AtomicBool>,
    /// Most records a sink may have pending.
    capacity: usize,
    batch_max: usize,
    flush_every: Duration,
}

/// The most records per batch: `batch_max`, and at most a quarter of what a sink may hold (so
/// that a sink has room for a few batches: one batch that big would be refused by a sink
/// with anything pending).
fn batch_max(settings: &Settings) -> usize {
    settings.batch_max.min((settings.queue_capacity / 4).max(1))
}

/// Records a tick of the telemetry thread hands on without waiting for `flush_interval_ms`:
/// a busy gateway's sinks get a batch every tick, a quiet one's a batch now and then.
const HAND_ON: usize = 256;

/// Most batch allocations kept for the next batches.
const SPARES: usize = 2;

/// A batch's allocations, emptied.
type Spare = (Vec<Box<Record>>, Views<'static>);

/// Where a batch goes once every sink is done with it: its records back to the requests
/// ([`Telemetry::record`]), its allocations back to the telemetry thread for the next batch.
struct Returns {
    pool: Arc<Pool>,
    spares: crossbeam_channel::Sender<Spare>,
}

/// Records every sink is done with, for requests to fill again, the last given back on top.
///
/// Last in, first out: a request takes the record the sinks read last, the likeliest to be
/// in the cache still, and records below what a busy gateway cycles through lie untouched.
/// First in, first out, every record the pool ever held would take its turn, out of the
/// cache: and as a request allocates a record whenever the pool is empty, the records a
/// gateway holds only ever grow, up to the bound, with every delay of the telemetry thread.
struct Pool {
    records: std::sync::Mutex<Vec<Box<Record>>>,
    max: usize,
}

impl Pool {
    fn new(max: usize) -> Pool {
        Pool {
            records: std::sync::Mutex::new(Vec::new()),
            max,
        }
    }

    /// The record given back last, if any. Never waits: while a sink's thread is giving
    /// records back (or another request is taking one), the request allocates its record.
    fn take(&self) -> Option<Box<Record>> {
        match self.records.try_lock() {
            Ok(mut records) => records.pop(),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().pop(),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Adds `records` (emptied), the last on top; those past the bound, the first ones, are
    /// let go (once the pool is unlocked).
    fn put(&self, records: &mut Vec<Box<Record>>) {
        {
            let mut pool = self.records.lock().unwrap_or_else(|e| e.into_inner());
            let room = self.max.saturating_sub(pool.len()).min(records.len());
            pool.extend(records.drain(records.len() - room..));
        }
        records.clear();
    }
}

impl Returns {
    /// Where batches go, the pool requests take records from, and the spare allocations
    /// the telemetry thread builds batches in.
    fn new(batch_max: usize) -> (Arc<Returns>, Arc<Pool>, crossbeam_channel::Receiver<Spare>) {
        let pool = Arc::new(Pool::new(POOL_MAX.min(2 * batch_max)));
        let (spares_tx, spares) = crossbeam_channel::bounded(SPARES);
        let returns = Returns {
            pool: pool.clone(),
            spares: spares_tx,
        };
        (Arc::new(returns), pool, spares)
    }

    /// Lets go of `batch`, and gives it back if no one else holds it: the last sink to export
    /// it gives it back, as soon as it is done (a tick sooner than the telemetry thread
    /// would), or the telemetry thread, when no sink had room for it or every sink was done
    /// before it let go. A batch a slow sink holds keeps no other from coming back. Records
    /// past the pool's bound, or with room for a long text, are let go.
    fn give_back(&self, batch: Arc<Batch>) {
        let Some(mut batch) = Arc::into_inner(batch) else {
            return;
        };
        let mut views = Vec::new();
        batch.with_dependent_mut(|_, v| views = recycle(std::mem::take(v)));
        let mut records = batch.into_owner();
        // A record that held a long URL or message is let go, not kept that large.
        records.retain(|r| r.text.capacity() <= POOLED_TEXT_MAX);
        self.pool.put(&mut records);
        let _ = self.spares.try_send((records, views));
    }
}

impl Dispatch {
    /// The loop. While records arrive it never blocks on the queue: it wakes on a short tick
    /// and takes what has arrived, so a busy gateway's `try_send` never has to wake this
    /// thread (no context switch per request). Idle, it blocks on the queue instead, so an
    /// idle gateway's telemetry thread does not wake 50 times a second. When it stops, it
    /// hands on what is left and closes the sinks' queues, which ends their threads.
    fn run(mut self) {
        let mut batch: Vec<Box<Record>> = Vec::with_capacity(self.batch_max);
        let mut batch_started = Instant::now();
        let tick = self.flush_every.min(Duration::from_millis(20));
        loop {
            let stopping = self.stop.load(Ordering::Relaxed);
            let (mut disconnected, mut received) = (false, false);
            loop {
                match self.rx.try_recv() {
                    Ok(r) => {
                        received = true;
                        if batch.is_empty() {
                            batch_started = Instant::now();
                        }
                        batch.push(r);
                        if batch.len() >= self.batch_max {
                            self.dispatch(&mut batch);
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            // A busy gateway's records are handed on a tick at a time, in one batch: each
            // batch handed on wakes every sink's thread (two context switches each, on a
            // core the requests share), and records that wait longer are out of the cache
            // by the time they come back to the requests.
            if !batch.is_empty()
                && (stopping
                    || batch.len() >= HAND_ON
                    || batch_started.elapsed() >= self.flush_every)
            {
                self.dispatch(&mut batch);
            }
            if stopping || disconnected {
                break;
            }
            if batch.is_empty() && !received {
                // Idle: wait for the next record instead of ticking (its `try_send` wakes
                // this thread, once per idle spell), never so long that a stop waits.
                match self.rx.recv_timeout(IDLE_WAIT) {
                    Ok(r) => {
                        batch_started = Instant::now();
                        batch.push(r);
                        if batch.len() >= self.batch_max {
                            self.dispatch(&mut batch);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                std::thread::sleep(tick);
            }
        }
        self.dispatch(&mut batch);
        // Records offered after the last look (a request that outlived the drain) are lost:
        // counted, as a full queue's are.
        let late = self.rx.try_iter().count();
        if late > 0 {
            for o in &self.outlets {
                TELEMETRY_DROPPED.add(&[&o.name], late as f64);
            }
        }
    }

    /// Hands `records` to every sink that has room for them, as one batch (`records` is left
    /// empty).
    fn dispatch(&mut self, records: &mut Vec<Box<Record>>) {
        if records.is_empty() {
            return;
        }
        let (owner, views) = self.spares.try_recv().unwrap_or_default();
        let owner = std::mem::replace(records, owner);
        let n = owner.len();
        let clock = Clock::now();
        let batch = Arc::new(Batch::new(owner, |records| {
            let mut views = recycle(views);
            // Records were written by a request's thread a while ago and are seldom still in
            // this core's cache: asking for the next ones while this one is read overlaps
            // the misses. A record's text is asked for later than the record itself, which
            // says where the text is (by then it has arrived, and finding the text does not
            // wait for it).
            for r in records.iter().take(2 * PREFETCH) {
                r.prefetch_record();
            }
            for r in records.iter().take(PREFETCH) {
                r.prefetch_text();
            }
            views.extend(records.iter().enumerate().map(|(i, r)| {
                if let Some(ahead) = records.get(i + 2 * PREFETCH) {
                    ahead.prefetch_record();
                }
                if let Some(ahead) = records.get(i + PREFETCH) {
                    ahead.prefetch_text();
                }
                r.view(&clock)
            }));
            views
        }));
        for o in &self.outlets {
            // Only this thread adds, so the sum cannot pass the capacity in between.
            if o.pending.load(Ordering::Acquire) + n > self.capacity {
                TELEMETRY_DROPPED.add(&[&o.name], n as f64);
                continue;
            }
            o.pending.fetch_add(n, Ordering::AcqRel);
            if o.batches.send(batch.clone()).is_err() {
                o.pending.fetch_sub(n, Ordering::AcqRel);
                TELEMETRY_DROPPED.add(&[&o.name], n as f64);
            }
        }
        self.returns.give_back(batch);
    }
}

thread_local! {
    /// The records this thread fills next, taken from the pool ahead of time
    /// ([`Telemetry::record`]): the next one, and the one after it.
    static AHEAD: std::cell::RefCell<[Option<Box<Record>>; 2]> =
        const { std::cell::RefCell::new([None, None]) };
}

/// Most records kept for requests to fill again: what a busy gateway's requests take between
/// two looks of the telemetry thread (20 ms at 100 000 requests a second), with room to spare.
/// Past it, records are let go, so what a burst leaves held is bounded: 4096 records of about
/// 300 bytes, plus the text each has room for (at most [`POOLED_TEXT_MAX`], typically a few
/// hundred bytes).
const POOL_MAX: usize = 4096;

/// The most text a record going back to the requests may have room for.
const POOLED_TEXT_MAX: usize = 4096;

/// A sink's thread.
struct Run {
    name: String,
    sink: SinkBox,
    rx: Receiver<Arc<Batch>>,
    pending: Arc<AtomicUsize>,
    returns: Arc<Returns>,
    metrics_every: Duration,
    shutdown_flush: Duration,
}

/// `v` emptied, as a vector of another lifetime in the same allocation (collecting a
/// vector's own iterator into items of the same size reuses it).
#[allow(clippy::unnecessary_filter_map)] // `filter` could not change the items' lifetime
fn recycle<'a>(mut v: Vec<RequestRecord<'_>>) -> Vec<RequestRecord<'a>> {
    v.clear();
    v.into_iter().filter_map(|_| None).collect()
}

impl Run {
    /// The sink's loop: exports each batch as it comes, and the metrics on their schedule;
    /// between the two it sleeps. Once the telemetry thread has stopped and every batch is
    /// exported, a last metrics snapshot and a flush.
    fn run(self) {
        let mut next_metrics = Instant::now() + self.metrics_every;
        loop {
            let wait = next_metrics.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(batch) => {
                    self.export(&batch);
                    self.returns.give_back(batch);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_metrics {
                self.export_metrics();
                next_metrics = Instant::now() + self.metrics_every;
            }
        }
        self.export_metrics();
        if let RResult::RErr(e) = self.sink.flush(self.shutdown_flush.as_millis() as u64) {
            tracing::warn!(sink = %self.name, error = %e.message, "Telemetry sink flush failed.");
        }
    }

    fn export(&self, batch: &Batch) {
        let views = batch.borrow_dependent();
        if let RResult::RErr(e) = self.sink.export(views.as_slice().into()) {
            TELEMETRY_EXPORT_ERRORS.inc(&[&self.name]);
            tracing::warn!(sink = %self.name, records = views.len(), error = %e.message, "Telemetry sink export failed.");
        }
        self.pending.fetch_sub(views.len(), Ordering::AcqRel);
    }

    fn export_metrics(&self) {
        if let RResult::RErr(e) = export_snapshot(&self.sink) {
            TELEMETRY_EXPORT_ERRORS.inc(&[&self.name]);
            tracing::warn!(sink = %self.name, error = %e.message, "Telemetry sink metrics export failed.");
        }
    }
}

/// Hands a sink a snapshot of every metric.
fn export_snapshot(sink: &SinkBox) -> RResult<(), PluginError> {
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
    sink.export_metrics(views.as_slice().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycled_views_keep_their_allocation() {
        let text = String::from("a");
        let id = HeaderValue::from_static("r");
        let listener = "http";
        let r = Record::begin(Arrival {
            at: Instant::now(),
            request_id: &id,
            client_ip: &id,
            host: None,
            path: &text,
            user_agent: None,
            listener,
            method: &Method::GET,
            bytes_in: 0,
        });
        let mut views = Vec::with_capacity(512);
        let clock = Clock::now();
        views.extend((0..300).map(|_| r.view(&clock)));
        let (at, capacity) = (views.as_ptr() as usize, views.capacity());
        let again: Vec<RequestRecord<'static>> = recycle(views);
        assert!(again.is_empty());
        assert_eq!((again.as_ptr() as usize, again.capacity()), (at, capacity));
    }

    fn record(path: &str) -> Box<Record> {
        let id = HeaderValue::from_static("r");
        Box::new(Record::begin(Arrival {
            at: Instant::now(),
            request_id: &id,
            client_ip: &id,
            host: None,
            path,
            user_agent: None,
            listener: "http",
            method: &Method::GET,
            bytes_in: 0,
        }))
    }

    type SinkEnd = (Receiver<Arc<Batch>>, Arc<AtomicUsize>);

    /// A telemetry thread's state with `names` sinks that may each hold `capacity` records,
    /// the sinks' ends and the pool records come back to.
    fn dispatch_to(names: &[&str], capacity: usize) -> (Dispatch, Vec<SinkEnd>, Arc<Pool>) {
        let (d, _queue, sinks, pool) = running_to(names, capacity);
        (d, sinks, pool)
    }

    /// [`dispatch_to`], and the queue in front of the telemetry thread.
    fn running_to(
        names: &[&str],
        capacity: usize,
    ) -> (Dispatch, SyncSender<Box<Record>>, Vec<SinkEnd>, Arc<Pool>) {
        let (queue, rx) = sync_channel(1024);
        let mut outlets = Vec::new();
        let mut sinks = Vec::new();
        for name in names {
            let (batches, rx) = channel();
            let pending = Arc::new(AtomicUsize::new(0));
            outlets.push(Outlet {
                name: (*name).into(),
                batches,
                pending: pending.clone(),
            });
            sinks.push((rx, pending));
        }
        let (returns, pool, spares) = Returns::new(8);
        let d = Dispatch {
            rx,
            returns,
            spares,
            outlets,
            stop: Arc::new(AtomicBool::new(false)),
            capacity,
            batch_max: 8,
            flush_every: Duration::from_secs(1),
        };
        (d, queue, sinks, pool)
    }

    /// A sink's thread done with `batch`, as [`Run::run`] is.
    fn exported(d: &Dispatch, sink: &SinkEnd, batch: Arc<Batch>) {
        sink.1
            .fetch_sub(batch.borrow_dependent().len(), Ordering::AcqRel);
        d.returns.give_back(batch);
    }

    /// The paths of the records in the pool, in the order requests take them.
    fn paths(pool: &Pool) -> Vec<String> {
        std::iter::from_fn(|| pool.take())
            .map(|r| r.get(Text::Path).into())
            .collect()
    }

    #[test]
    fn a_batch_is_viewed_once_shared_by_every_sink_and_its_allocations_come_back() {
        let (mut d, sinks, pool) = dispatch_to(&["a", "b"], 4);
        let mut records = vec![record("/1"), record("/2"), record("/3")];
        d.dispatch(&mut records);
        assert!(records.is_empty());
        let mut got: Vec<Arc<Batch>> = sinks.iter().map(|(rx, _)| rx.try_recv().unwrap()).collect();
        assert!(Arc::ptr_eq(&got[0], &got[1]), "one batch for every sink");
        let paths_1: Vec<&str> = got[0]
            .borrow_dependent()
            .iter()
            .map(|v| v.path.as_str())
            .collect();
        assert_eq!(paths_1, ["/1", "/2", "/3"]);
        assert!(sinks.iter().all(|(_, p)| p.load(Ordering::Relaxed) == 3));
        let views_at = got[0].borrow_dependent().as_ptr() as usize;

        // Sink a exports its batch; sink b still holds three records, and two more would
        // pass its capacity of four: b loses the batch, a gets it.
        let held_by_b = got.pop().unwrap();
        exported(&d, &sinks[0], got.pop().unwrap());
        assert!(paths(&pool).is_empty(), "b still holds the first batch");
        d.dispatch(&mut vec![record("/4"), record("/5")]);
        let second = sinks[0].0.try_recv().unwrap();
        assert_eq!(second.borrow_dependent()[1].path.as_str(), "/5");
        assert!(sinks[1].0.try_recv().is_err(), "no room for it at b");
        assert_eq!(sinks[1].1.load(Ordering::Relaxed), 3);
        assert_eq!(sinks[0].1.load(Ordering::Relaxed), 2);
        // The first batch was still b's: the second has allocations of its own.
        assert_ne!(second.borrow_dependent().as_ptr() as usize, views_at);

        // The last sink done with a batch gives it back at once.
        exported(&d, &sinks[1], held_by_b);
        exported(&d, &sinks[0], second);
        // The record given back last is taken first.
        assert_eq!(paths(&pool), ["/5", "/4", "/3", "/2", "/1"]);
        assert!(sinks.iter().all(|(_, p)| p.load(Ordering::Relaxed) == 0));
        // The next batch is built in the allocations of the first one given back.
        d.dispatch(&mut vec![record("/6")]);
        let third = sinks[0].0.try_recv().unwrap();
        assert_eq!(third.borrow_dependent()[0].path.as_str(), "/6");
        assert_eq!(third.borrow_dependent().as_ptr() as usize, views_at);
    }

    #[test]
    fn a_tick_with_enough_records_hands_them_on_without_waiting_for_the_flush_interval() {
        let (mut d, queue, sinks, _pool) = running_to(&["a"], 4096);
        d.batch_max = 4096;
        d.flush_every = Duration::from_secs(3600);
        let stop = d.stop.clone();
        for i in 0..HAND_ON - 1 {
            queue.send(record(&format!("/{i}"))).unwrap();
        }
        let thread = std::thread::spawn(move || d.run());
        // Several ticks: fewer records than a tick hands on wait for the flush interval.
        std::thread::sleep(Duration::from_millis(300));
        assert!(sinks[0].0.try_recv().is_err(), "nothing handed on yet");
        queue.send(record("/last")).unwrap();
        let batch = sinks[0].0.recv_timeout(Duration::from_secs(30)).unwrap();
        let views = batch.borrow_dependent();
        assert_eq!(views.len(), HAND_ON, "one batch of every record");
        assert_eq!(views[0].path.as_str(), "/0");
        assert_eq!(views[HAND_ON - 1].path.as_str(), "/last");
        stop.store(true, Ordering::Relaxed);
        drop(queue);
        thread.join().unwrap();
    }

    #[test]
    fn batches_are_at_most_a_quarter_of_what_a_sink_may_hold_and_the_pool_is_bounded() {
        let settings = |queue_capacity, batch_max| Settings {
            queue_capacity,
            batch_max,
            ..Settings::default()
        };
        assert_eq!(batch_max(&Settings::default()), 4096);
        assert_eq!(batch_max(&settings(1000, 4096)), 250);
        assert_eq!(batch_max(&settings(1000, 100)), 100);
        assert_eq!(batch_max(&settings(2, 1)), 1);
        assert_eq!(batch_max(&settings(1, 4096)), 1);
        assert_eq!(Returns::new(8).1.max, 16);
        assert_eq!(Returns::new(4096).1.max, POOL_MAX);
        // Past the bound, the records given back first are let go.
        let pool = Pool::new(2);
        pool.put(&mut vec![record("/1"), record("/2"), record("/3")]);
        // A request that finds the pool busy does not wait for it.
        let busy = pool.records.lock().unwrap();
        assert!(pool.take().is_none());
        drop(busy);
        assert_eq!(paths(&pool), ["/3", "/2"]);
    }

    #[test]
    fn a_batch_no_sink_had_room_for_comes_back_at_once() {
        let (mut d, sinks, pool) = dispatch_to(&["full"], 1);
        d.dispatch(&mut vec![record("/1"), record("/2")]);
        assert!(sinks[0].0.try_recv().is_err());
        assert_eq!(paths(&pool), ["/2", "/1"]);
    }

    #[test]
    fn a_batch_a_slow_sink_holds_does_not_keep_later_batches_from_coming_back() {
        let (mut d, sinks, pool) = dispatch_to(&["slow"], 64);
        d.dispatch(&mut vec![record("/1")]);
        let held = sinks[0].0.try_recv().unwrap();
        d.dispatch(&mut vec![record("/2")]);
        exported(&d, &sinks[0], sinks[0].0.try_recv().unwrap());
        assert_eq!(
            paths(&pool),
            ["/2"],
            "the second batch came back past the held first"
        );
        exported(&d, &sinks[0], held);
        assert_eq!(paths(&pool), ["/1"]);
    }

    #[test]
    fn a_restarted_record_keeps_nothing_of_its_last_request() {
        let mut r = forwarded_record();
        r.span_id = Some(*b"00f067aa0ba902b7");
        r.set(Text::ApiId, "orders");
        r.set(Text::ErrorMessage, "backend said no");
        (
            r.status,
            r.backend_status,
            r.total_us,
            r.backend_us,
            r.bytes_out,
        ) = (502, 503, 9, 8, 7);
        (r.error_source, r.error_reason) = ("backend", "timeout");
        let text_at = r.text.as_ptr();

        let (id2, ip) = (
            HeaderValue::from_static("req-2"),
            HeaderValue::from_static("10.1.2.3"),
        );
        let mut next = arrival(&id2, &ip, None, "https");
        next.path = "/x";
        next.method = &Method::GET;
        next.bytes_in = 0;
        r.restart(next);
        assert_eq!(r.text.as_ptr(), text_at, "in the same allocation");
        let v = r.view(&Clock::now());
        assert_eq!(v.request_id.as_str(), "req-2");
        assert_eq!(v.path.as_str(), "/x");
        assert_eq!(v.listener.as_str(), "https");
        assert_eq!(v.method.as_str(), "GET");
        assert_eq!(v.host.as_str(), "api.example:8080");
        for empty in [
            v.user_agent,
            v.trace_id,
            v.span_id,
            v.parent_span_id,
            v.backend_url,
            v.api_id,
            v.error_message,
            v.error_source,
            v.error_reason,
        ] {
            assert_eq!(empty.as_str(), "");
        }
        assert_eq!(
            (
                v.status,
                v.backend_status,
                v.total_us,
                v.backend_us,
                v.bytes_in,
                v.bytes_out
            ),
            (0, 0, 0, 0, 0, 0)
        );
    }

    /// The record of `req-1` from 10.1.2.3 (`curl/8`) on `http`, told its trace id and then
    /// its backend URL.
    fn forwarded_record() -> Record {
        let (id, ip, agent) = (
            HeaderValue::from_static("req-1"),
            HeaderValue::from_static("10.1.2.3"),
            HeaderValue::from_static("curl/8"),
        );
        let mut r = Record::begin(arrival(&id, &ip, Some(&agent), "http"));
        r.trace_id = Some(*b"4bf92f3577b34da6a3ce929d0e0e4736");
        r.parent_span_id = Some(*b"b7ad6b7169203331");
        r.set_backend_url("http", "backend.internal:81", "/v1/orders/42");
        r
    }

    fn arrival<'a>(
        id: &'a HeaderValue,
        ip: &'a HeaderValue,
        agent: Option<&'a HeaderValue>,
        listener: &'a str,
    ) -> Arrival<'a> {
        Arrival {
            at: Instant::now(),
            request_id: id,
            client_ip: ip,
            host: Some(b"api.example:8080"),
            path: "/orders/42",
            user_agent: agent,
            listener,
            method: &Method::POST,
            bytes_in: 12,
        }
    }

    #[test]
    fn a_record_shows_what_it_was_told_as_it_learns_it() {
        // Strings added later land after the first ones and leave them as they were.
        let mut r = forwarded_record();
        r.set(Text::Cache, "hit");
        r.set(Text::ErrorMessage, "backend said \"no\" — twice");
        r.set(Text::ApiId, "orders");
        r.set(Text::OperationId, "get-order");
        r.set(Text::Route, "/orders/{id}");
        r.set(Text::ProductId, "gold");
        r.set(Text::SubscriptionId, "sub-1");
        r.set(Text::BackendId, "primary");
        r.set(Text::BackendId, "fallback");
        // The record's time is its arrival on the wall clock read at export.
        let clock = Clock {
            unix_ms: 1_795_478_400_373,
            at: r.arrived + Duration::from_millis(250),
        };
        let v = r.view(&clock);
        assert_eq!(v.api_id.as_str(), "orders");
        assert_eq!(v.operation_id.as_str(), "get-order");
        assert_eq!(v.route.as_str(), "/orders/{id}");
        assert_eq!(v.product_id.as_str(), "gold");
        assert_eq!(v.subscription_id.as_str(), "sub-1");
        assert_eq!(v.backend_id.as_str(), "fallback", "the last one set");
        assert_eq!(v.time_unix_ms, 1_795_478_400_123);
        assert_eq!(v.request_id.as_str(), "req-1");
        assert_eq!(v.client_ip.as_str(), "10.1.2.3");
        assert_eq!(v.host.as_str(), "api.example:8080");
        assert_eq!(v.path.as_str(), "/orders/42");
        assert_eq!(r.get(Text::Path), "/orders/42");
        assert_eq!(v.user_agent.as_str(), "curl/8");
        assert_eq!(v.method.as_str(), "POST");
        assert_eq!(v.listener.as_str(), "http");
        assert_eq!(v.bytes_in, 12);
        assert_eq!(v.parent_span_id.as_str(), "b7ad6b7169203331");
        assert_eq!(v.trace_id.as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v.span_id.as_str(), "");
        assert_eq!(
            v.backend_url.as_str(),
            "http://backend.internal:81/v1/orders/42"
        );
        assert_eq!(v.cache.as_str(), "hit");
        assert_eq!(v.error_message.as_str(), "backend said \"no\" — twice");
        // A clone is a record of its own.
        let copy = r.clone();
        drop(r);
        assert_eq!(
            copy.view(&Clock::now()).backend_url.as_str(),
            "http://backend.internal:81/v1/orders/42"
        );
    }

    #[test]
    fn header_values_that_are_not_utf8_are_left_empty() {
        let id = HeaderValue::from_static("req-2");
        let ip = HeaderValue::from_static("10.1.2.3");
        let agent = HeaderValue::from_bytes(b"agent \xff\xfe").expect("obs-text is allowed");
        let r = Record::begin(arrival(&id, &ip, Some(&agent), "http"));
        let v = r.view(&Clock::now());
        assert_eq!(v.user_agent.as_str(), "");
        assert_eq!(v.request_id.as_str(), "req-2");
        assert_eq!(v.host.as_str(), "api.example:8080");
        assert_eq!(v.backend_url.as_str(), "");
        assert_eq!(v.error_message.as_str(), "");
    }
}

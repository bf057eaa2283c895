//! Telemetry: one record per request. A request adds its record to a bounded chunk its thread
//! fills (full: dropped and counted, never waited for). The telemetry thread takes the
//! threads' chunks on its ticks and makes the records' ABI views once a chunk. It calls the
//! sinks whose library says they never block itself, a run of views at a time as it makes
//! them (while the records are in its cache), and hands each chunk, as one batch, to every
//! other sink's thread (a sink that has too many records pending loses the batch, counted).
//! Each sink gets its batches and, on a schedule, a snapshot of every metric. At shutdown
//! every sink gets what is left and a flush, within a deadline.

// Records stay boxed from the request to the batch and back: a record moves between threads
// and vectors as a pointer, and keeps its allocation for the next request.
#![allow(clippy::vec_box)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender};
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
/// wall-clock time when its view is made: a request reads no wall clock (one clock read
/// fewer on the request path), and its time follows the wall clock as it is when the
/// telemetry thread takes the record, a tick or so later.
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

    /// The Unix milliseconds of `instant` (not after this clock's reading: views are made
    /// after their records were offered).
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

/// Records a request thread has offered, in the order it offered them, and (once the
/// telemetry thread has taken them) their ABI views: what the sinks get as one batch.
///
/// A request only adds its record's pointer, and reads nothing of the record: by the time a
/// request ends, its record has usually left the core's nearest caches (the requests served
/// while it waited for its backend pushed it out), and reading it there would stall the
/// request. The telemetry thread makes the views, asking for the records ahead of the one it
/// reads so that their misses overlap ([`Chunk::make_views`]), and the sinks then read views
/// that were just written.
pub struct Chunk {
    /// The records' views, in the records' order. Declared first, so dropped first: a view
    /// borrows from its record (see [`Chunk::make_views`]).
    views: Vec<RequestRecord<'static>>,
    records: Vec<Box<Record>>,
    /// When the first record was added.
    started: Instant,
}

// SAFETY: the views borrow only from the records the chunk owns (and from static strings),
// which nothing changes while the chunk holds them; a shared chunk is only read.
#[allow(unsafe_code)]
unsafe impl Send for Chunk {}
#[allow(unsafe_code)]
unsafe impl Sync for Chunk {}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunk")
            .field("records", &self.records.len())
            .finish_non_exhaustive()
    }
}

/// How many records ahead of the one being read the telemetry thread asks for its text (and
/// twice as many for the record itself).
const PREFETCH: usize = 4;

/// Most records the telemetry thread hands at once to a sink it calls itself: their views
/// (about 25 KB) and what they point to are still in the nearest caches when the sink reads
/// them, and again when the next sink does.
const RUN: usize = 64;

impl Chunk {
    fn new() -> Chunk {
        Chunk {
            views: Vec::new(),
            records: Vec::new(),
            started: Instant::now(),
        }
    }

    /// How many records it holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The views of its records, in order (once made).
    pub fn views(&self) -> &[RequestRecord<'_>] {
        &self.views
    }

    /// Adds `record` (without reading it).
    fn push(&mut self, record: Box<Record>) {
        if self.records.is_empty() {
            self.started = Instant::now();
        }
        self.records.push(record);
    }

    /// Makes the records' views, their times read off `clock`, and hands them to `each` in
    /// runs of at most [`RUN`] as they are made, while the records and their text are in
    /// this core's cache. With `keep` the chunk keeps every view (for sinks with threads of
    /// their own, which read them later); without, only the last run's.
    ///
    /// Records were written by a request's thread a while ago and are seldom still in this
    /// core's cache: asking for the next ones while this one is read overlaps the misses. A
    /// record's text is asked for later than the record itself, which says where the text is
    /// (by then it has arrived, and finding the text does not wait for it).
    #[allow(unsafe_code)]
    fn make_views(
        &mut self,
        clock: &Clock,
        keep: bool,
        mut each: impl FnMut(&[RequestRecord<'_>]),
    ) {
        let records = &self.records;
        let views = &mut self.views;
        views.clear();
        if keep {
            views.reserve(records.len());
        }
        for r in records.iter().take(2 * PREFETCH) {
            r.prefetch_record();
        }
        for r in records.iter().take(PREFETCH) {
            r.prefetch_text();
        }
        let mut run = 0;
        for (i, r) in records.iter().enumerate() {
            if let Some(ahead) = records.get(i + 2 * PREFETCH) {
                ahead.prefetch_record();
            }
            if let Some(ahead) = records.get(i + PREFETCH) {
                ahead.prefetch_text();
            }
            let view = r.view(clock);
            // SAFETY: the view borrows from the record's allocation and its text's (or from
            // static strings). Both stay where they are while the chunk owns the record: a
            // record is only ever moved as a `Box` (which moves the pointer, not the
            // record), nothing changes a record the chunk holds, and the views are cleared
            // (or dropped, first) before any record leaves the chunk
            // ([`Chunk::take_records`]). `each` gets them for the length of its call only.
            views.push(unsafe {
                std::mem::transmute::<RequestRecord<'_>, RequestRecord<'static>>(view)
            });
            if views.len() - run == RUN || i + 1 == records.len() {
                each(&views[run..]);
                if keep {
                    run = views.len();
                } else {
                    views.clear();
                }
            }
        }
    }

    /// Its records, its views cleared first (the chunk keeps the views' allocation).
    fn take_records(&mut self) -> Vec<Box<Record>> {
        self.views.clear();
        std::mem::take(&mut self.records)
    }
}

/// The longest the idle telemetry thread sleeps before looking at the stop flag.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// What a request thread has offered and the telemetry thread has not taken yet.
#[derive(Debug)]
struct Filling {
    /// The chunk records are added to.
    chunk: Chunk,
    /// Chunks that reached `batch_max`, oldest first.
    full: Vec<Chunk>,
    /// The telemetry thread has stopped: records offered now are dropped.
    closed: bool,
}

impl Filling {
    fn held(&self, batch_max: usize) -> usize {
        self.chunk.len() + self.full.len() * batch_max
    }
}

/// A request thread's end of the intake. Only that thread adds to it, and the telemetry
/// thread looks at it once a tick: its lock is the thread's own, not one every request of
/// the gateway takes.
#[derive(Debug)]
struct Slot(std::sync::Mutex<Filling>);

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Filling> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where requests offer their records: a slot per request thread, which the telemetry thread
/// empties on its ticks.
struct Intake {
    /// Tells this intake's slots from another gateway's in the same process.
    id: u64,
    slots: std::sync::Mutex<Vec<Arc<Slot>>>,
    /// Most records a slot holds.
    capacity: usize,
    batch_max: usize,
    /// The telemetry thread is asleep until a record comes: the first record of an empty
    /// slot wakes it.
    idle: AtomicBool,
    telemetry_thread: std::sync::OnceLock<std::thread::Thread>,
    /// The allocations of chunks every sink is done with.
    spares: crossbeam_channel::Receiver<Chunk>,
}

/// Gives each [`Intake`] an id of its own.
static INTAKES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// This thread's slot in each intake it has offered records to (one, but for tests that
    /// run several gateways in one process).
    static SLOTS: std::cell::RefCell<Vec<(u64, Arc<Slot>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Intake {
    fn new(
        capacity: usize,
        batch_max: usize,
        spares: crossbeam_channel::Receiver<Chunk>,
    ) -> Intake {
        Intake {
            id: INTAKES.fetch_add(1, Ordering::Relaxed),
            slots: std::sync::Mutex::new(Vec::new()),
            capacity,
            batch_max,
            idle: AtomicBool::new(false),
            telemetry_thread: std::sync::OnceLock::new(),
            spares,
        }
    }

    /// An empty chunk, in the allocations of one every sink is done with when there is one.
    fn spare(&self) -> Chunk {
        self.spares.try_recv().unwrap_or_else(|_| Chunk::new())
    }

    /// Runs `f` on this thread's slot, made the first time the thread offers a record
    /// (`None` on a thread that is ending).
    fn with_slot<R>(&self, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        SLOTS
            .try_with(|slots| {
                let mut slots = slots.borrow_mut();
                if let Some((_, s)) = slots.iter().find(|(id, _)| *id == self.id) {
                    return f(s);
                }
                // Slots of intakes that have stopped are let go here.
                slots.retain(|(_, s)| !s.lock().closed);
                let slot = Arc::new(Slot(std::sync::Mutex::new(Filling {
                    chunk: Chunk::new(),
                    full: Vec::new(),
                    closed: false,
                })));
                self.slots
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(slot.clone());
                let r = f(&slot);
                slots.push((self.id, slot));
                r
            })
            .ok()
    }

    /// Adds `record` to this thread's slot; `false` when it was dropped (the slot is full,
    /// or the telemetry thread has stopped).
    fn offer(&self, record: Box<Record>) -> bool {
        let added = self.with_slot(|slot| {
            let mut f = slot.lock();
            if f.closed || f.held(self.batch_max) >= self.capacity {
                return None;
            }
            if f.chunk.len() >= self.batch_max {
                let next = self.spare();
                let full = std::mem::replace(&mut f.chunk, next);
                f.full.push(full);
            }
            let first = f.chunk.is_empty() && f.full.is_empty();
            f.chunk.push(record);
            Some(first)
        });
        let Some(Some(first)) = added else {
            return false;
        };
        if first && self.idle.load(Ordering::SeqCst) {
            self.idle.store(false, Ordering::SeqCst);
            if let Some(t) = self.telemetry_thread.get() {
                t.unpark();
            }
        }
        true
    }

    /// Takes, into `out`, what the slots hold once any of them is due: a slot with a full
    /// chunk, with a chunk of `hand_on` records or whose first has waited `wait`, or whose
    /// thread has ended (its slot is then let go). Every slot's chunk goes in the same look,
    /// so that no record is handed on a look after a record offered later on another thread.
    /// Returns whether any slot still holds records, and how many slots gave chunks.
    fn take(&self, hand_on: usize, wait: Duration, out: &mut Vec<Chunk>) -> (bool, usize) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let due = slots.iter().any(|slot| {
            // Only this list holds the slot: its thread has ended.
            let ended = Arc::strong_count(slot) == 1;
            let f = slot.lock();
            !f.full.is_empty()
                || (!f.chunk.is_empty()
                    && (ended || f.chunk.len() >= hand_on || f.chunk.started.elapsed() >= wait))
        });
        let (mut held, mut from) = (false, 0);
        slots.retain(|slot| {
            let ended = Arc::strong_count(slot) == 1;
            let mut f = slot.lock();
            if due && !f.chunk.is_empty() {
                let next = if ended { Chunk::new() } else { self.spare() };
                out.append(&mut f.full);
                out.push(std::mem::replace(&mut f.chunk, next));
                from += 1;
            } else if due && !f.full.is_empty() {
                out.append(&mut f.full);
                from += 1;
            }
            held |= !f.chunk.is_empty();
            // A slot is let go once its thread has ended and it is empty.
            !(ended && f.chunk.is_empty() && f.full.is_empty())
        });
        (held, from)
    }

    /// Closes every slot (records offered from now on are dropped) and takes what they held.
    /// Returns how many slots gave chunks.
    fn close(&self, out: &mut Vec<Chunk>) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut from = 0;
        for slot in slots.iter() {
            let mut f = slot.lock();
            f.closed = true;
            let before = out.len();
            out.append(&mut f.full);
            if !f.chunk.is_empty() {
                out.push(std::mem::replace(&mut f.chunk, Chunk::new()));
            }
            from += usize::from(out.len() > before);
        }
        from
    }

    /// Whether any slot holds a record.
    fn holds_any(&self) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.iter().any(|s| {
            let f = s.lock();
            !f.chunk.is_empty() || !f.full.is_empty()
        })
    }
}

/// A sink's end of the telemetry thread: the batches it has not exported yet.
struct Outlet {
    name: String,
    batches: Sender<Arc<Chunk>>,
    /// Records handed to the sink and not exported yet (at most the queue capacity).
    pending: Arc<AtomicUsize>,
}

/// A sink the telemetry thread calls itself, in runs of records as it makes their views: its
/// library says its sinks never block, and the manifest did not ask for a thread of its own.
struct Inline {
    /// Its place in `[[telemetry.sinks]]`.
    entry: usize,
    name: String,
    sink: SinkBox,
    /// Signalled once the telemetry thread has flushed it, at shutdown.
    done: SyncSender<()>,
    /// Records in the runs that failed during the current chunk, and the first failure's
    /// message: warned about once a chunk, not once a run.
    failed: usize,
    error: Option<String>,
}

impl Inline {
    fn export(&mut self, views: &[RequestRecord<'_>]) {
        if let RResult::RErr(e) = self.sink.export(views.into()) {
            self.failed += views.len();
            self.error.get_or_insert_with(|| e.message.into_string());
        }
    }

    /// Counts and logs the failures of the chunk just handed on, as one failed export.
    fn chunk_done(&mut self) {
        if let Some(error) = self.error.take() {
            TELEMETRY_EXPORT_ERRORS.inc(&[&self.name]);
            tracing::warn!(sink = %self.name, records = self.failed, error = %error, "Telemetry sink export failed.");
            self.failed = 0;
        }
    }

    fn export_metrics(&self) {
        export_metrics(&self.name, &self.sink);
    }
}

/// What runs a sink, until [`Telemetry::start`] starts the threads.
struct Waiting {
    dispatch: Dispatch,
    runs: Vec<(Run, SyncSender<()>)>,
}

/// The sinks, their threads and the intake in front of them.
pub struct Telemetry {
    /// Where requests offer their records.
    intake: Arc<Intake>,
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
    /// Creates every `[[telemetry.sinks]]` entry and the intake in front of them;
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
                Ok(sink) => {
                    let inline = !e.own_thread && plugins.sink_never_blocks(&e.provider);
                    sinks.push((i, e.name.clone(), sink, inline));
                }
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
        let intake = Arc::new(Intake::new(settings.queue_capacity, batch_max, spares));
        let (mut outlets, mut runs, mut done) = (Vec::new(), Vec::new(), Vec::new());
        let mut inline = Vec::new();
        for (entry, name, sink, called_inline) in sinks {
            if called_inline {
                let (done_tx, done_rx) = sync_channel(1);
                inline.push(Inline {
                    entry,
                    name: name.clone(),
                    sink,
                    done: done_tx,
                    failed: 0,
                    error: None,
                });
                done.push((name, std::sync::Mutex::new(done_rx)));
                continue;
            }
            let (batches, rx) = channel();
            let pending = Arc::new(AtomicUsize::new(0));
            let (done_tx, done_rx) = sync_channel(1);
            runs.push((
                Run {
                    entry,
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
        let dispatch = Dispatch {
            intake: intake.clone(),
            returns,
            outlets,
            inline,
            stop: stop.clone(),
            capacity: settings.queue_capacity,
            flush_every: Duration::from_millis(settings.flush_interval_ms),
            metrics_every: Duration::from_millis(settings.metrics_interval_ms),
            shutdown_flush: Duration::from_millis(settings.shutdown_flush_ms),
        };
        Ok(Some(Telemetry {
            intake,
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
        let mut sinks: Vec<_> = runs
            .iter()
            .map(|(run, _)| (run.entry, &run.name, &run.sink))
            .chain(dispatch.inline.iter().map(|s| (s.entry, &s.name, &s.sink)))
            .collect();
        sinks.sort_by_key(|s| s.0);
        for (i, name, sink) in sinks {
            if let RResult::RErr(e) = export_snapshot(sink) {
                let why = match e.kind {
                    ErrorKind::PANICKED => "panicked".to_string(),
                    _ => e.message.into_string(),
                };
                problems.push(format!(
                    "telemetry.sinks[{i}] '{name}': cannot start: {why}"
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

    /// Offers a record to the sinks; a full slot drops it, counted for every sink.
    pub fn offer(&self, record: Box<Record>) {
        if !self.intake.offer(record) {
            for (name, _) in &self.sinks {
                TELEMETRY_DROPPED.inc(&[name]);
            }
        }
    }

    /// Stops the sinks: each exports what was offered before and flushes, within the
    /// deadline.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.intake.telemetry_thread.get() {
            t.unpark();
        }
        // Sinks never started have nothing to deliver: what requests offered is dropped,
        // counted.
        let never_started = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if never_started.is_some() {
            let mut held = Vec::new();
            self.intake.close(&mut held);
            let n: usize = held.iter().map(Chunk::len).sum();
            if n > 0 {
                for (name, _) in &self.sinks {
                    TELEMETRY_DROPPED.add(&[name], n as f64);
                }
            }
        }
        drop(never_started);
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

/// The telemetry thread: takes the request threads' chunks off their slots, hands them in
/// runs to the sinks it calls itself and each whole to every other sink's thread.
struct Dispatch {
    intake: Arc<Intake>,
    /// Where batches every sink is done with go.
    returns: Arc<Returns>,
    outlets: Vec<Outlet>,
    /// The sinks this thread calls itself (their metrics and their flush at shutdown too).
    inline: Vec<Inline>,
    stop: Arc<AtomicBool>,
    /// Most records a sink may have pending.
    capacity: usize,
    flush_every: Duration,
    metrics_every: Duration,
    shutdown_flush: Duration,
}

/// The most records per batch: `batch_max`, and at most a quarter of what a sink may hold (so
/// that a sink has room for a few batches: one batch that big would be refused by a sink
/// with anything pending).
fn batch_max(settings: &Settings) -> usize {
    settings.batch_max.min((settings.queue_capacity / 4).max(1))
}

/// How often a busy gateway's telemetry thread looks at the slots (at most; `flush_interval_ms`
/// when shorter). Each look that hands on a chunk wakes every sink thread, and each wake-up
/// costs the core the requests run on two context switches and the caches they refill. In
/// the bench, a look every 100 ms instead of every 20 ms took 1.0 % (small) and 1.3 % (16 KiB)
/// less CPU per request with two sinks, medians of 50 paired rounds whose intervals reach just
/// past zero (BENCHMARKS.md); the sinks get their records up to 0.1 s later.
const TICK: Duration = Duration::from_millis(100);

/// Records a slot's chunk holds when a tick of the telemetry thread hands it on without
/// waiting for `flush_interval_ms`: a busy gateway's sinks get a batch every tick, a quiet
/// one's a batch now and then.
const HAND_ON: usize = 256;

/// Most chunk allocations kept for the next chunks.
const SPARES: usize = 4;

/// Where a batch goes once every sink is done with it: its records back to the requests
/// ([`Telemetry::record`]), its allocations back to the intake for the next chunks.
struct Returns {
    pool: Arc<Pool>,
    spares: crossbeam_channel::Sender<Chunk>,
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
    /// Where batches go, the pool requests take records from, and the spare chunk
    /// allocations.
    fn new(batch_max: usize) -> (Arc<Returns>, Arc<Pool>, crossbeam_channel::Receiver<Chunk>) {
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
    fn give_back(&self, batch: Arc<Chunk>) {
        let Some(mut chunk) = Arc::into_inner(batch) else {
            return;
        };
        let mut records = chunk.take_records();
        // A record that held a long URL or message is let go, not kept that large.
        records.retain(|r| r.text.capacity() <= POOLED_TEXT_MAX);
        self.pool.put(&mut records);
        // The records' vector goes back with the chunk, to be filled again.
        chunk.records = records;
        let _ = self.spares.try_send(chunk);
    }
}

/// Puts the chunks one look took from several worker threads in one order, the order the
/// requests' response heads were ready, as the sinks got them when one queue held every
/// record: batches of at most `batch_max`. Each chunk is in that order already, so the stable
/// sort only merges them (it reads every record: a gateway with one worker thread, whose
/// chunks are in order already, never comes here).
fn in_order(ready: &mut Vec<Chunk>, batch_max: usize, returns: &Returns) {
    if ready.len() < 2 {
        return;
    }
    let mut records = Vec::with_capacity(ready.iter().map(Chunk::len).sum());
    let mut started = Instant::now();
    for mut c in ready.drain(..) {
        started = started.min(c.started);
        records.append(&mut c.records);
        // The emptied chunk's allocations serve the next chunks.
        let _ = returns.spares.try_send(c);
    }
    records.sort_by_key(|r| r.arrived + Duration::from_micros(r.total_us));
    let mut rest = records;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(batch_max.max(1)));
        ready.push(Chunk {
            views: Vec::new(),
            records: rest,
            started,
        });
        rest = tail;
    }
}

impl Dispatch {
    /// The loop. While records arrive it wakes on a short tick and takes the chunks that are
    /// ready, so a busy gateway's requests never have to wake this thread (no context switch
    /// per request). Idle, it sleeps until a request offers a record to an empty slot, so an
    /// idle gateway's telemetry thread does not wake 50 times a second. When it stops, it
    /// closes the slots, hands on what they held and closes the sinks' queues, which ends
    /// their threads.
    fn run(mut self) {
        // Set before the first look at the slots: a request that finds the thread idle can
        // always wake it.
        let _ = self.intake.telemetry_thread.set(std::thread::current());
        let tick = self.flush_every.min(TICK);
        let mut ready = Vec::new();
        let mut next_metrics = Instant::now() + self.metrics_every;
        loop {
            let stopping = self.stop.load(Ordering::SeqCst);
            if stopping {
                let from = self.intake.close(&mut ready);
                self.dispatch_all(&mut ready, from);
                break;
            }
            let (held, from) = self.intake.take(HAND_ON, self.flush_every, &mut ready);
            let handed = !ready.is_empty();
            self.dispatch_all(&mut ready, from);
            if !self.inline.is_empty() && Instant::now() >= next_metrics {
                for s in &self.inline {
                    s.export_metrics();
                }
                next_metrics = Instant::now() + self.metrics_every;
            }
            if held || handed {
                std::thread::sleep(tick);
                continue;
            }
            // Idle: sleep until a request offers a record to an empty slot (it sees the flag
            // and wakes this thread), never so long that a stop waits. The flag is set before
            // the slots are looked at again, so a record offered in between is either seen
            // here or wakes the thread.
            self.intake.idle.store(true, Ordering::SeqCst);
            if !self.intake.holds_any() && !self.stop.load(Ordering::SeqCst) {
                std::thread::park_timeout(IDLE_WAIT);
            }
            self.intake.idle.store(false, Ordering::SeqCst);
        }
        // The sinks with threads of their own end theirs (their queues close) while this
        // one finishes the sinks it calls: a last metrics snapshot and a flush each, within
        // one deadline.
        self.outlets.clear();
        let deadline = Instant::now() + self.shutdown_flush;
        for s in &self.inline {
            s.export_metrics();
            let left = deadline.saturating_duration_since(Instant::now());
            if let RResult::RErr(e) = s.sink.flush(left.as_millis() as u64) {
                tracing::warn!(sink = %s.name, error = %e.message, "Telemetry sink flush failed.");
            }
            let _ = s.done.send(());
        }
    }

    /// Hands on the chunks `from` slots gave, in one order when they are several threads'.
    fn dispatch_all(&mut self, ready: &mut Vec<Chunk>, from: usize) {
        if from > 1 {
            in_order(ready, self.intake.batch_max, &self.returns);
        }
        for chunk in ready.drain(..) {
            self.dispatch(chunk);
        }
    }

    /// Makes the views of `chunk`, handing them in runs to the sinks this thread calls as
    /// they are made, and hands the chunk to every other sink that has room for its records,
    /// as one batch.
    fn dispatch(&mut self, mut chunk: Chunk) {
        let n = chunk.len();
        if n > 0 {
            let inline = &mut self.inline;
            chunk.make_views(&Clock::now(), !self.outlets.is_empty(), |views| {
                for s in inline.iter_mut() {
                    s.export(views);
                }
            });
            for s in &mut self.inline {
                s.chunk_done();
            }
        }
        let batch = Arc::new(chunk);
        if n > 0 {
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

/// Most records kept for requests to fill again: what a worker thread at 40 000 requests a
/// second takes between two looks of the telemetry thread ([`TICK`]); a busier gateway
/// allocates the rest.
/// Past it, records are let go, so what a burst leaves held is bounded: 4096 records of about
/// 300 bytes, plus the text each has room for (at most [`POOLED_TEXT_MAX`], typically a few
/// hundred bytes).
const POOL_MAX: usize = 4096;

/// The most text a record going back to the requests may have room for.
const POOLED_TEXT_MAX: usize = 4096;

/// A sink's thread.
struct Run {
    /// Its place in `[[telemetry.sinks]]`.
    entry: usize,
    name: String,
    sink: SinkBox,
    rx: Receiver<Arc<Chunk>>,
    pending: Arc<AtomicUsize>,
    returns: Arc<Returns>,
    metrics_every: Duration,
    shutdown_flush: Duration,
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

    fn export(&self, batch: &Chunk) {
        let views = batch.views();
        if let RResult::RErr(e) = self.sink.export(views.into()) {
            TELEMETRY_EXPORT_ERRORS.inc(&[&self.name]);
            tracing::warn!(sink = %self.name, records = views.len(), error = %e.message, "Telemetry sink export failed.");
        }
        self.pending.fetch_sub(views.len(), Ordering::AcqRel);
    }

    fn export_metrics(&self) {
        export_metrics(&self.name, &self.sink);
    }
}

/// Hands a sink a snapshot of every metric; a failure is counted and logged.
fn export_metrics(name: &str, sink: &SinkBox) {
    if let RResult::RErr(e) = export_snapshot(sink) {
        TELEMETRY_EXPORT_ERRORS.inc(&[name]);
        tracing::warn!(sink = %name, error = %e.message, "Telemetry sink metrics export failed.");
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

    /// A chunk of `records`, as a request thread fills one.
    fn chunk(records: Vec<Box<Record>>) -> Chunk {
        let mut c = Chunk::new();
        for r in records {
            c.push(r);
        }
        c
    }

    type SinkEnd = (Receiver<Arc<Chunk>>, Arc<AtomicUsize>);

    /// A telemetry thread's state with `names` sinks that may each hold `capacity` records
    /// (as may each slot of its intake, in chunks of at most 8), the sinks' ends and the pool
    /// records come back to.
    fn dispatch_to(names: &[&str], capacity: usize) -> (Dispatch, Vec<SinkEnd>, Arc<Pool>) {
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
            intake: Arc::new(Intake::new(capacity, 8, spares)),
            returns,
            outlets,
            inline: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            capacity,
            flush_every: Duration::from_secs(1),
            metrics_every: Duration::from_secs(3600),
            shutdown_flush: Duration::from_secs(1),
        };
        (d, sinks, pool)
    }

    /// A sink's thread done with `batch`, as [`Run::run`] is.
    fn exported(d: &Dispatch, sink: &SinkEnd, batch: Arc<Chunk>) {
        sink.1.fetch_sub(batch.len(), Ordering::AcqRel);
        d.returns.give_back(batch);
    }

    /// The paths of the records in the pool, in the order requests take them.
    fn paths(pool: &Pool) -> Vec<String> {
        std::iter::from_fn(|| pool.take())
            .map(|r| r.get(Text::Path).into())
            .collect()
    }

    /// The paths of a batch's views.
    fn batch_paths(batch: &Chunk) -> Vec<&str> {
        batch.views().iter().map(|v| v.path.as_str()).collect()
    }

    /// The paths of the records of a chunk taken off a slot, its views made.
    fn ready_paths(chunk: &mut Chunk) -> Vec<&str> {
        chunk.make_views(&Clock::now(), true, |_| {});
        batch_paths(chunk)
    }

    #[test]
    fn a_batch_is_shared_by_every_sink_and_its_allocations_come_back() {
        let (mut d, sinks, pool) = dispatch_to(&["a", "b"], 4);
        d.dispatch(chunk(vec![record("/1"), record("/2"), record("/3")]));
        let mut got: Vec<Arc<Chunk>> = sinks.iter().map(|(rx, _)| rx.try_recv().unwrap()).collect();
        assert!(Arc::ptr_eq(&got[0], &got[1]), "one batch for every sink");
        assert_eq!(batch_paths(&got[0]), ["/1", "/2", "/3"]);
        assert!(sinks.iter().all(|(_, p)| p.load(Ordering::Relaxed) == 3));
        let views_at = got[0].views().as_ptr() as usize;

        // Sink a exports its batch; sink b still holds three records, and two more would
        // pass its capacity of four: b loses the batch, a gets it.
        let held_by_b = got.pop().unwrap();
        exported(&d, &sinks[0], got.pop().unwrap());
        assert!(paths(&pool).is_empty(), "b still holds the first batch");
        d.dispatch(chunk(vec![record("/4"), record("/5")]));
        let second = sinks[0].0.try_recv().unwrap();
        assert_eq!(batch_paths(&second), ["/4", "/5"]);
        assert!(sinks[1].0.try_recv().is_err(), "no room for it at b");
        assert_eq!(sinks[1].1.load(Ordering::Relaxed), 3);
        assert_eq!(sinks[0].1.load(Ordering::Relaxed), 2);

        // The last sink done with a batch gives it back at once.
        exported(&d, &sinks[1], held_by_b);
        exported(&d, &sinks[0], second);
        // The record given back last is taken first.
        assert_eq!(paths(&pool), ["/5", "/4", "/3", "/2", "/1"]);
        assert!(sinks.iter().all(|(_, p)| p.load(Ordering::Relaxed) == 0));
        // The next chunk is filled in the allocations of the first one given back.
        let mut next = d.intake.spare();
        assert!(next.is_empty());
        next.push(record("/6"));
        d.dispatch(next);
        let third = sinks[0].0.try_recv().unwrap();
        assert_eq!(batch_paths(&third), ["/6"]);
        assert_eq!(third.views().as_ptr() as usize, views_at);
    }

    #[test]
    fn a_tick_with_enough_records_hands_them_on_without_waiting_for_the_flush_interval() {
        let (mut d, sinks, _pool) = dispatch_to(&["a"], 4096);
        d.intake = Arc::new(Intake::new(4096, 4096, d.intake.spares.clone()));
        d.flush_every = Duration::from_secs(3600);
        let (stop, intake) = (d.stop.clone(), d.intake.clone());
        for i in 0..HAND_ON - 1 {
            assert!(intake.offer(record(&format!("/{i}"))));
        }
        let thread = std::thread::spawn(move || d.run());
        // Several ticks: fewer records than a tick hands on wait for the flush interval.
        std::thread::sleep(Duration::from_millis(300));
        assert!(sinks[0].0.try_recv().is_err(), "nothing handed on yet");
        assert!(intake.offer(record("/last")));
        let batch = sinks[0].0.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(batch.len(), HAND_ON, "one batch of every record");
        assert_eq!(batch.views()[0].path.as_str(), "/0");
        assert_eq!(batch.views()[HAND_ON - 1].path.as_str(), "/last");
        stop.store(true, Ordering::SeqCst);
        thread.join().unwrap();
        // Stopped: the slots are closed, and what is offered now is dropped.
        assert!(!intake.offer(record("/late")));
    }

    #[test]
    fn an_idle_telemetry_thread_wakes_for_the_next_record_and_hands_on_what_is_left_as_it_stops() {
        let (mut d, sinks, _pool) = dispatch_to(&["a"], 64);
        d.flush_every = Duration::from_millis(1);
        let (stop, intake) = (d.stop.clone(), d.intake.clone());
        let thread = std::thread::spawn(move || d.run());
        // Idle: the thread sleeps until a record comes, and the record is handed on once it
        // has waited the flush interval.
        for path in ["/1", "/2"] {
            std::thread::sleep(Duration::from_millis(250));
            assert!(intake.offer(record(path)));
            let batch = sinks[0].0.recv_timeout(Duration::from_secs(30)).unwrap();
            assert_eq!(batch_paths(&batch), [path]);
        }
        // A record offered just before the stop is handed on as the thread stops.
        let intake_2 = intake.clone();
        std::thread::spawn(move || assert!(intake_2.offer(record("/3"))))
            .join()
            .unwrap();
        stop.store(true, Ordering::SeqCst);
        intake.telemetry_thread.get().unwrap().unpark();
        thread.join().unwrap();
        let rest: Vec<String> = sinks[0]
            .0
            .try_iter()
            .flat_map(|b| {
                batch_paths(&b)
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(rest, ["/3"]);
    }

    /// What a sink the telemetry thread calls itself was given.
    #[derive(Default)]
    struct Calls {
        /// The paths of each `export`'s records.
        exports: Vec<Vec<String>>,
        metrics: usize,
        flushed: bool,
        /// Answer every `export` with an error.
        fail: bool,
    }

    #[derive(Clone, Default)]
    struct Recorder(Arc<std::sync::Mutex<Calls>>);

    impl outpost_plugin_api::TelemetrySink for Recorder {
        fn export(
            &self,
            batch: abi_stable::std_types::RSlice<'_, RequestRecord<'_>>,
        ) -> RResult<(), PluginError> {
            let mut c = self.0.lock().unwrap();
            c.exports
                .push(batch.iter().map(|r| r.path.as_str().to_owned()).collect());
            if c.fail {
                return RResult::RErr(PluginError {
                    kind: ErrorKind::INTERNAL,
                    message: "refused".into(),
                });
            }
            RResult::ROk(())
        }

        fn export_metrics(
            &self,
            _batch: abi_stable::std_types::RSlice<'_, MetricSample<'_>>,
        ) -> RResult<(), PluginError> {
            self.0.lock().unwrap().metrics += 1;
            RResult::ROk(())
        }

        fn flush(&self, _deadline_ms: u64) -> RResult<(), PluginError> {
            self.0.lock().unwrap().flushed = true;
            RResult::ROk(())
        }
    }

    /// A sink the telemetry thread calls itself, what it was given, and its done signal.
    fn inline_sink(name: &str) -> (Inline, Recorder, Receiver<()>) {
        let recorder = Recorder::default();
        let (done, done_rx) = sync_channel(1);
        let sink = Inline {
            entry: 0,
            name: name.into(),
            sink: outpost_plugin_api::TelemetrySink_TO::from_value(
                recorder.clone(),
                abi_stable::sabi_trait::TD_Opaque,
            ),
            done,
            failed: 0,
            error: None,
        };
        (sink, recorder, done_rx)
    }

    #[test]
    fn a_sink_that_never_blocks_gets_runs_of_records_its_metrics_and_its_flush_from_the_telemetry_thread(
    ) {
        let (mut d, sinks, _pool) = dispatch_to(&["threaded"], 4096);
        d.intake = Arc::new(Intake::new(4096, 4096, d.intake.spares.clone()));
        d.flush_every = Duration::from_millis(1);
        d.metrics_every = Duration::from_millis(20);
        let (sink, calls, done) = inline_sink("inline");
        d.inline.push(sink);
        let (stop, intake) = (d.stop.clone(), d.intake.clone());
        let offered: Vec<String> = (0..150).map(|i| format!("/{i}")).collect();
        for path in &offered {
            assert!(intake.offer(record(path)));
        }
        let thread = std::thread::spawn(move || d.run());
        // The sink with a thread of its own gets the chunk whole, every view kept.
        let batch = sinks[0].0.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(batch_paths(&batch), offered);
        // The one the telemetry thread calls got the same records in runs of at most `RUN`.
        let exports = calls.0.lock().unwrap().exports.clone();
        assert_eq!(
            exports.iter().map(Vec::len).collect::<Vec<_>>(),
            [RUN, RUN, 150 - 2 * RUN]
        );
        assert_eq!(exports.concat(), offered);
        // Its metrics come on their schedule.
        let deadline = Instant::now() + Duration::from_secs(30);
        while calls.0.lock().unwrap().metrics < 3 {
            assert!(Instant::now() < deadline, "metrics every 20 ms");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!calls.0.lock().unwrap().flushed);
        // At stop: what was offered last, a last snapshot and the flush, then done.
        assert!(intake.offer(record("/last")));
        stop.store(true, Ordering::SeqCst);
        intake.telemetry_thread.get().unwrap().unpark();
        thread.join().unwrap();
        done.recv_timeout(Duration::from_secs(30)).unwrap();
        let c = calls.0.lock().unwrap();
        assert_eq!(c.exports.last().unwrap(), &["/last"]);
        assert!(c.flushed);
    }

    #[test]
    fn records_only_sinks_the_telemetry_thread_calls_had_come_back_at_once_and_failures_count_once_a_chunk(
    ) {
        let (mut d, _none, pool) = dispatch_to(&[], 4096);
        let (ok, ok_calls, _) = inline_sink("inline-ok");
        let (failing, failing_calls, _) = inline_sink("inline-failing");
        failing_calls.0.lock().unwrap().fail = true;
        d.inline = vec![ok, failing];
        let errors = || {
            metrics::global()
                .value("outpost_telemetry_export_errors_total", &["inline-failing"])
                .unwrap_or(0.0)
        };
        let before = errors();
        let paths: Vec<String> = (0..2 * RUN + 1).map(|i| format!("/{i}")).collect();
        d.dispatch(chunk(paths.iter().map(|p| record(p)).collect()));
        // Both sinks got every run, the failing one too.
        assert_eq!(ok_calls.0.lock().unwrap().exports.concat(), paths);
        assert_eq!(failing_calls.0.lock().unwrap().exports.len(), 3);
        // Three failed runs, one failed export: the chunk's.
        assert_eq!(errors(), before + 1.0);
        assert_eq!(
            metrics::global().value("outpost_telemetry_export_errors_total", &["inline-ok"]),
            None
        );
        // No sink holds the records: they are back for requests to fill (as many as the
        // pool keeps, the last ones).
        let mut back = super::tests::paths(&pool);
        back.reverse();
        assert!(!back.is_empty());
        assert_eq!(back, paths[paths.len() - back.len()..]);
    }

    #[test]
    fn a_gateway_stopped_before_its_sinks_started_counts_what_was_offered_as_dropped() {
        const SINK: &str = "never-started";
        let (d, _sinks, pool) = dispatch_to(&[SINK], 64);
        let intake = d.intake.clone();
        // The sink's thread never ran: its done signal is gone, as it is with the thread's
        // part of `Waiting` when that is let go.
        let (done_tx, done_rx) = sync_channel(1);
        drop(done_tx);
        let telemetry = Telemetry {
            intake: intake.clone(),
            pool,
            sinks: vec![(SINK.into(), std::sync::Mutex::new(done_rx))],
            stop: d.stop.clone(),
            shutdown_flush: Duration::ZERO,
            waiting: std::sync::Mutex::new(Some(Waiting {
                dispatch: d,
                runs: Vec::new(),
            })),
        };
        let dropped = || {
            metrics::global()
                .value("outpost_telemetry_dropped_total", &[SINK])
                .unwrap_or(0.0)
        };
        for i in 0..3 {
            telemetry.offer(record(&format!("/{i}")));
        }
        assert_eq!(dropped(), 0.0);
        telemetry.shutdown();
        assert_eq!(dropped(), 3.0);
        assert!(!intake.holds_any());
        // Offered after the stop: dropped and counted at once.
        telemetry.offer(record("/late"));
        assert_eq!(dropped(), 4.0);
        assert!(!intake.holds_any());
    }

    #[test]
    fn a_slot_holds_at_most_the_queue_capacity_in_chunks_of_batch_max() {
        let intake = Intake::new(20, 8, crossbeam_channel::bounded(1).1);
        let offered: Vec<bool> = (0..22)
            .map(|i| intake.offer(record(&format!("/{i}"))))
            .collect();
        // Two full chunks of 8 and 4 in the third: the next one would make 21.
        assert_eq!(offered.iter().filter(|o| **o).count(), 20);
        assert!(offered[..20].iter().all(|o| *o) && !offered[20] && !offered[21]);
        let mut ready = Vec::new();
        // A look before the flush interval: the full chunks are due, and the one being
        // filled goes with them.
        assert_eq!(
            intake.take(HAND_ON, Duration::from_secs(3600), &mut ready),
            (false, 1)
        );
        assert_eq!(ready.iter().map(Chunk::len).collect::<Vec<_>>(), [8, 8, 4]);
        assert_eq!(ready_paths(&mut ready[1])[0], "/8");
        assert_eq!(ready_paths(&mut ready[2]), ["/16", "/17", "/18", "/19"]);
        // Room again; a chunk that is not due stays.
        assert!(intake.offer(record("/after")));
        ready.clear();
        assert_eq!(
            intake.take(HAND_ON, Duration::from_secs(3600), &mut ready),
            (true, 0)
        );
        assert_eq!(intake.take(HAND_ON, Duration::ZERO, &mut ready), (false, 1));
        assert_eq!(ready_paths(&mut ready[0]), ["/after"]);
    }

    #[test]
    fn each_thread_offers_to_a_slot_of_its_own_and_an_ended_threads_slot_is_emptied_and_let_go() {
        let intake = Arc::new(Intake::new(64, 8, crossbeam_channel::bounded(1).1));
        let other = Arc::new(Intake::new(64, 8, crossbeam_channel::bounded(1).1));
        assert!(intake.offer(record("/here")));
        assert!(other.offer(record("/other gateway")));
        let mut ready = Vec::new();
        // Nothing due yet.
        assert_eq!(
            intake.take(HAND_ON, Duration::from_secs(3600), &mut ready),
            (true, 0)
        );
        assert!(ready.is_empty());
        let there = intake.clone();
        std::thread::spawn(move || assert!(there.offer(record("/there"))))
            .join()
            .unwrap();
        assert_eq!(intake.slots.lock().unwrap().len(), 2);
        // The ended thread's slot is due, and every slot's chunk goes in the same look; the
        // ended thread's slot is let go.
        assert_eq!(
            intake.take(HAND_ON, Duration::from_secs(3600), &mut ready),
            (false, 2)
        );
        let mut paths: Vec<Vec<&str>> = ready.iter_mut().map(ready_paths).collect();
        paths.sort();
        assert_eq!(paths, [["/here"], ["/there"]]);
        assert_eq!(intake.slots.lock().unwrap().len(), 1);
        ready.clear();
        assert!(intake.offer(record("/here again")));
        assert_eq!(intake.close(&mut ready), 1);
        assert_eq!(ready_paths(&mut ready[0]), ["/here again"]);
        // Closed: this gateway drops what is offered; the other one is unaffected.
        assert!(!intake.offer(record("/late")));
        assert!(other.offer(record("/other again")));
        ready.clear();
        other.close(&mut ready);
        assert_eq!(
            ready_paths(&mut ready[0]),
            ["/other gateway", "/other again"]
        );
    }

    #[test]
    fn chunks_taken_in_one_look_go_on_in_the_order_the_responses_were_ready() {
        let (returns, _pool, _spares) = Returns::new(8);
        let at = Instant::now();
        let done = |path: &str, total_us: u64| {
            let mut r = record(path);
            (r.arrived, r.total_us) = (at, total_us);
            r
        };
        // Two threads' chunks, each in its own order.
        let mut ready = vec![
            chunk(vec![done("/a1", 10), done("/a2", 30), done("/a3", 31)]),
            chunk(vec![done("/b1", 20), done("/b2", 40)]),
        ];
        in_order(&mut ready, 3, &returns);
        let paths: Vec<Vec<&str>> = ready.iter_mut().map(ready_paths).collect();
        assert_eq!(paths, [vec!["/a1", "/b1", "/a2"], vec!["/a3", "/b2"]]);
        // One chunk is left as it was.
        let mut one = vec![chunk(vec![done("/late", 50), done("/early", 1)])];
        in_order(&mut one, 8, &returns);
        assert_eq!(ready_paths(&mut one[0]), ["/late", "/early"]);
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
        d.dispatch(chunk(vec![record("/1"), record("/2")]));
        assert!(sinks[0].0.try_recv().is_err());
        assert_eq!(paths(&pool), ["/2", "/1"]);
    }

    #[test]
    fn a_batch_a_slow_sink_holds_does_not_keep_later_batches_from_coming_back() {
        let (mut d, sinks, pool) = dispatch_to(&["slow"], 64);
        d.dispatch(chunk(vec![record("/1")]));
        let held = sinks[0].0.try_recv().unwrap();
        d.dispatch(chunk(vec![record("/2")]));
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

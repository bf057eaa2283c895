//! The sending thread: takes batches from the sink's bounded buffer, sends them on its own
//! schedule, resends what the endpoint asks to have resent (after `max(Retry-After,
//! backoff)`), spools batches to disk while the endpoint is unreachable and replays them,
//! oldest first, once it answers again. The gateway's thread builds items and compresses them
//! into the batch being built (see [`Queue`]); it never waits for the network.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_plugin_sdk::{host, level, Metric};

use crate::config::Settings;
use crate::spool::Spool;
use crate::transport::{self, Answer, Gzip, Reason, Transport};

/// The metrics the sink defines, and the same counts kept locally (for tests and logs).
#[derive(Debug)]
pub struct Stats {
    sent: AtomicU64,
    retried: AtomicU64,
    dropped: Mutex<HashMap<&'static str, u64>>,
    spool_bytes: AtomicU64,
    sent_metric: Metric,
    retried_metric: Metric,
    dropped_metric: Metric,
    spool_metric: Metric,
    sampling_metric: Metric,
}

/// Metric names (see the README).
pub mod names {
    /// Items the endpoint accepted.
    pub const SENT: &str = "appinsights_items_sent_total";
    /// Items dropped, by `reason`.
    pub const DROPPED: &str = "appinsights_items_dropped_total";
    /// Items scheduled to be sent again.
    pub const RETRIED: &str = "appinsights_items_retried_total";
    /// Bytes in the spool directory.
    pub const SPOOL_BYTES: &str = "appinsights_spool_bytes";
    /// The sampling percentage in effect.
    pub const SAMPLING: &str = "appinsights_sampling_percentage";
}

impl Stats {
    /// Defines the metrics with the gateway (inert without one).
    pub fn new() -> Stats {
        Stats {
            sent: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dropped: Mutex::new(HashMap::new()),
            spool_bytes: AtomicU64::new(0),
            sent_metric: Metric::counter(
                names::SENT,
                "Telemetry items the Application Insights endpoint accepted.",
                &[],
            ),
            retried_metric: Metric::counter(
                names::RETRIED,
                "Telemetry items scheduled to be sent to Application Insights again (throttled, failed, unreachable).",
                &[],
            ),
            dropped_metric: Metric::counter(
                names::DROPPED,
                "Telemetry items not delivered to Application Insights, by reason (invalid, quota, rejected, spool_full, spool_corrupt, buffer_full, sampling, too_large, shutdown).",
                &["reason"],
            ),
            spool_metric: Metric::gauge(
                names::SPOOL_BYTES,
                "Bytes of Application Insights batches waiting in the spool directory.",
                &[],
            ),
            sampling_metric: Metric::gauge(
                names::SAMPLING,
                "The sampling percentage in effect (below sampling_percentage while max_items_per_second holds it down).",
                &[],
            ),
        }
    }

    /// Counts accepted items.
    pub fn sent(&self, n: usize) {
        if n > 0 {
            self.sent.fetch_add(n as u64, Ordering::Relaxed);
            self.sent_metric.add(&[], n as f64);
        }
    }

    /// Counts items to be resent.
    pub fn retried(&self, n: usize) {
        if n > 0 {
            self.retried.fetch_add(n as u64, Ordering::Relaxed);
            self.retried_metric.add(&[], n as f64);
        }
    }

    /// Counts dropped items.
    pub fn dropped(&self, reason: Reason, n: usize) {
        if n > 0 {
            *self
                .dropped
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(reason.as_str())
                .or_default() += n as u64;
            self.dropped_metric.add(&[reason.as_str()], n as f64);
        }
    }

    /// Sets the sampling gauge.
    pub fn sampling_percentage(&self, percentage: f64) {
        self.sampling_metric.set(&[], percentage);
    }

    /// Sets the spool gauge.
    pub fn spool_bytes(&self, bytes: u64) {
        self.spool_bytes.store(bytes, Ordering::Relaxed);
        self.spool_metric.set(&[], bytes as f64);
    }

    /// Items accepted so far.
    pub fn sent_total(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Items scheduled for resending so far.
    pub fn retried_total(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// Items dropped so far for a reason.
    pub fn dropped_total(&self, reason: Reason) -> u64 {
        self.dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(reason.as_str())
            .copied()
            .unwrap_or(0)
    }

    /// Bytes in the spool now.
    pub fn spool_bytes_now(&self) -> u64 {
        self.spool_bytes.load(Ordering::Relaxed)
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

/// A flush request: deliver by the deadline, then answer.
struct Flush {
    deadline: Instant,
    done: SyncSender<()>,
}

/// Adds items to the batch being built (see [`Queue::append`]).
pub struct Appender<'a> {
    open: &'a mut Gzip,
    /// Batches filled meanwhile.
    closed: Vec<Batch>,
    /// Whether the batch being built now got its first item meanwhile.
    started: bool,
    max_batch: usize,
}

impl Appender<'_> {
    /// Adds an item (one NDJSON line, without its newline).
    pub fn item(&mut self, item: &[u8]) {
        self.open.push(item);
        if self.open.items() >= self.max_batch {
            let items = self.open.items();
            self.closed.push(Batch {
                body: Bytes::from(self.open.finish()),
                items,
            });
            self.started = true;
        }
    }
}

/// Items ready to send: a gzip NDJSON body and how many items it holds.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The gzip body.
    pub body: Bytes,
    /// Items in it.
    pub items: usize,
}

#[derive(Default)]
struct State {
    /// Batches ready to send, oldest first.
    pending: VecDeque<Batch>,
    /// Items in `pending`.
    pending_items: usize,
    /// When the batch being built got its first item (`None` while it has none).
    open_since: Option<Instant>,
    flush: Option<Flush>,
    flush_deadline: Option<Instant>,
    stop: bool,
}

/// The buffer between the gateway's thread and the sending thread. Items are compressed as
/// they arrive, on the gateway's thread, into the batch being built (while the thread that
/// wrote them still has them in its cache); a batch is closed when it is full, or by the
/// sending thread once its first item has waited `flush_interval`.
pub struct Queue {
    state: Mutex<State>,
    /// The batch being built. Lock order: `open`, then `state`.
    open: Mutex<Gzip>,
    wake: Condvar,
    max_pending: usize,
    max_batch: usize,
}

impl Queue {
    /// A buffer holding at most `max_pending` items in closed batches, besides the batch
    /// being filled.
    pub fn new(max_pending: usize, max_batch: usize) -> Queue {
        Queue {
            state: Mutex::new(State::default()),
            open: Mutex::new(Gzip::new()),
            wake: Condvar::new(),
            max_pending,
            max_batch,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_open(&self) -> MutexGuard<'_, Gzip> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends items; past `max_pending` items in closed batches the oldest batches are
    /// dropped and counted.
    pub fn push(&self, items: Vec<Vec<u8>>, stats: &Stats) {
        if !items.is_empty() {
            self.append(stats, |batch| items.iter().for_each(|i| batch.item(i)));
        }
    }

    /// Appends the items `fill` hands to its [`Appender`], compressing each as it comes;
    /// past `max_pending` items in closed batches the oldest batches are dropped and counted.
    pub fn append(&self, stats: &Stats, fill: impl FnOnce(&mut Appender<'_>)) {
        let mut open = self.lock_open();
        let mut appender = Appender {
            started: open.items() == 0,
            open: &mut open,
            closed: Vec::new(),
            max_batch: self.max_batch,
        };
        fill(&mut appender);
        let Appender {
            started, closed, ..
        } = appender;
        let open_items = open.items();
        let mut s = self.lock();
        let (had_pending, had_open) = (!s.pending.is_empty(), s.open_since.is_some());
        for b in closed {
            s.pending_items += b.items;
            s.pending.push_back(b);
        }
        if open_items == 0 {
            s.open_since = None;
        } else if started || s.open_since.is_none() {
            // (`None` with items: a previous `fill` panicked after adding some.)
            s.open_since = Some(Instant::now());
        }
        // The bound is on closed batches: the one being filled (fewer than `max_batch`
        // items) comes on top, so a bound of one batch still keeps a full batch waiting.
        let mut over = 0;
        while s.pending_items > self.max_pending {
            let Some(b) = s.pending.pop_front() else {
                break;
            };
            s.pending_items -= b.items;
            over += b.items;
        }
        drop(open);
        // The sending thread needs waking when a batch is ready and when its timer starts;
        // past that it comes back for more on its own (a wake is a system call).
        let wake = (!had_pending && !s.pending.is_empty()) || (!had_open && s.open_since.is_some());
        drop(s);
        if wake {
            self.wake.notify_all();
        }
        stats.dropped(Reason::BufferFull, over);
    }

    /// Closes the batch being built, if it has items, and lines it up to be sent.
    fn close_open(&self) {
        let mut open = self.lock_open();
        let items = open.items();
        let batch = (items > 0).then(|| Batch {
            body: Bytes::from(open.finish()),
            items,
        });
        let mut s = self.lock();
        if let Some(b) = batch {
            s.pending_items += b.items;
            s.pending.push_back(b);
        }
        s.open_since = None;
    }

    /// Whether items are waiting.
    pub fn has_pending(&self) -> bool {
        let s = self.lock();
        !s.pending.is_empty() || s.open_since.is_some()
    }

    /// Asks the sending thread to deliver everything by `deadline`; `done` is signalled after.
    pub fn flush(&self, deadline: Instant, done: SyncSender<()>) {
        let mut s = self.lock();
        s.flush = Some(Flush { deadline, done });
        s.flush_deadline = Some(deadline);
        drop(s);
        self.wake.notify_all();
    }

    /// Stops the sending thread (after any flush in progress).
    pub fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_all();
    }

    /// Whether an exchange in flight should be given up: stopping, or a flush needs the time
    /// left to keep what is unsent.
    fn hurry(&self) -> bool {
        let s = self.lock();
        s.stop
            || s.flush_deadline
                .is_some_and(|d| Instant::now() + Duration::from_millis(200) >= d)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// New items, never sent.
    Fresh,
    /// A batch kept in memory for resending (no spool).
    Memory,
    /// The oldest spooled batch.
    Spool,
}

/// How a round of requests went, to move the backoff once for all of them.
#[derive(Default)]
struct Round {
    /// Some request had items accepted.
    accepted: bool,
    /// Some answer redirected ingestion.
    redirected: bool,
    /// What failed, and what is to be sent again.
    failure: Option<Failure>,
}

/// The failures of a round.
struct Failure {
    /// "unreachable" or "asked for a retry" (the first failure's).
    what: &'static str,
    /// The first failure's answer, for the log.
    summary: String,
    /// The longest `Retry-After` asked for.
    asked: Duration,
    /// Items to be sent again.
    items: usize,
}

/// The sending thread's state.
pub struct Sender {
    settings: Arc<Settings>,
    queue: Arc<Queue>,
    stats: Arc<Stats>,
    transport: Transport,
    /// Compresses the items of a batch sent again in part.
    /// Made on the first partial resend: its state is hundreds of KB, and batches arrive
    /// compressed.
    gzip: Option<Gzip>,
    spool: Option<Spool>,
    /// Batches to send again (no spool), oldest first: at most one per request of a round.
    retry: VecDeque<Batch>,
    not_before: Instant,
    failures: u32,
    endpoint: String,
    redirects: u32,
}

/// The longest `Retry-After` honoured (a longer one is cut to this).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

fn log(level: u8, message: String) {
    host::log(level, &message);
}

impl Sender {
    /// Prepares the thread's state: the HTTP client and the spool (taking stock of what a
    /// previous run left).
    pub fn new(
        settings: Arc<Settings>,
        queue: Arc<Queue>,
        stats: Arc<Stats>,
    ) -> std::io::Result<Sender> {
        let transport = Transport::new()?;
        let spool = match &settings.spool_dir {
            Some(dir) => {
                let s = Spool::open(dir, settings.spool_max_bytes)?;
                if !s.is_empty() {
                    log(
                        level::INFO,
                        format!(
                            "Found {} spooled Application Insights batches ({} bytes) in {}; they are sent first.",
                            s.len(),
                            s.bytes(),
                            dir.display()
                        ),
                    );
                }
                stats.spool_bytes(s.bytes());
                Some(s)
            }
            None => None,
        };
        Ok(Sender {
            endpoint: settings.connection.ingestion_endpoint.clone(),
            settings,
            queue,
            stats,
            transport,
            gzip: None,
            spool,
            retry: VecDeque::new(),
            not_before: Instant::now(),
            failures: 0,
            redirects: 0,
        })
    }

    fn spooled(&self) -> bool {
        self.spool.as_ref().is_some_and(|s| !s.is_empty())
    }

    /// The thread's loop; returns when the queue is stopped.
    pub fn run(mut self) {
        let interval = self.settings.flush_interval;
        let lanes = self.settings.max_concurrent_requests;
        let queue = self.queue.clone();
        loop {
            let mut q = queue.lock();
            if let Some(flush) = q.flush.take() {
                drop(q);
                queue.close_open();
                let mut q = queue.lock();
                let pending = std::mem::take(&mut q.pending);
                q.pending_items = 0;
                drop(q);
                self.flush(pending, flush.deadline);
                queue.lock().flush_deadline = None;
                let _ = flush.done.send(());
                continue;
            }
            if q.stop {
                return;
            }
            let now = Instant::now();
            let sendable = now >= self.not_before;
            if q.pending.is_empty()
                && q.open_since
                    .is_some_and(|t| now.duration_since(t) >= interval)
            {
                // The batch being built has waited long enough: close it.
                drop(q);
                queue.close_open();
                continue;
            }
            let ready = !q.pending.is_empty();
            // What is spooled goes first; new batches line up behind it, on disk.
            if ready && self.spool.is_some() && (!sendable || self.spooled()) {
                if let Some(batch) = cut(&mut q) {
                    drop(q);
                    self.spool_push(batch);
                }
                continue;
            }
            if sendable {
                if let Some(batch) = self.retry.pop_front() {
                    drop(q);
                    self.deliver(batch, Origin::Memory, self.settings.timeout);
                    continue;
                }
                if self.spooled() {
                    drop(q);
                    self.deliver_spooled(self.settings.timeout);
                    continue;
                }
                if ready {
                    // One batch; more at once (up to the configured number of requests in
                    // flight) only while full ones are waiting: a backlog, or an endpoint
                    // far away.
                    let batches = std::iter::from_fn(|| cut(&mut q)).take(lanes).collect();
                    drop(q);
                    self.deliver_all(batches, Origin::Fresh, self.settings.timeout);
                    continue;
                }
            }
            let mut wake: Option<Instant> = None;
            if let Some(t) = q.open_since {
                if !ready {
                    wake = Some(t + interval);
                }
            }
            if !sendable && (!self.retry.is_empty() || self.spooled() || ready) {
                wake = Some(wake.map_or(self.not_before, |w| w.min(self.not_before)));
            }
            let wait = wake.map_or(Duration::from_secs(3600), |w| {
                w.saturating_duration_since(now)
            });
            let _ = queue
                .wake
                .wait_timeout(q, wait.max(Duration::from_millis(1)));
        }
    }

    /// The delay before the next attempt after `failures` failures in a row: doubling from
    /// `retry_initial`, capped at `retry_max`, with up to 10 % jitter.
    fn backoff(&self) -> Duration {
        let base = self
            .settings
            .retry_initial
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.settings.retry_max);
        base + base.mul_f64(fastrand::f64() * 0.1)
    }

    /// Sends a batch and acts on the answer.
    fn deliver(&mut self, batch: Batch, from: Origin, timeout: Duration) {
        self.deliver_all(vec![batch], from, timeout);
    }

    /// Sends batches at once (one request each) and acts on every answer, in order; the
    /// backoff moves once for the whole round.
    fn deliver_all(&mut self, batches: Vec<Batch>, from: Origin, timeout: Duration) {
        let queue = self.queue.clone();
        let bodies = batches.iter().map(|b| b.body.clone()).collect();
        let answers = self
            .transport
            .send_all(&self.endpoint, bodies, timeout, &|| queue.hurry());
        let mut round = Round::default();
        for (batch, answer) in batches.into_iter().zip(&answers) {
            self.settle(batch, from, answer, &mut round);
        }
        match round.failure {
            Some(failure) => {
                if round.accepted {
                    self.failures = 0;
                }
                let backoff = self.backoff();
                self.failures += 1;
                let delay = backoff.max(failure.asked);
                log(
                    if self.failures == 1 { level::WARN } else { level::DEBUG },
                    format!(
                        "Application Insights ingestion {} ({}); {} items are sent again in {} ms{}.",
                        failure.what,
                        failure.summary,
                        failure.items,
                        delay.as_millis(),
                        if self.spool.is_some() { ", spooled meanwhile" } else { "" }
                    ),
                );
                self.not_before = Instant::now() + delay;
            }
            None if round.redirected => self.not_before = Instant::now(),
            None => {
                if self.failures > 0 {
                    log(
                        level::INFO,
                        format!(
                            "Application Insights ingestion answers again at {}.",
                            self.endpoint
                        ),
                    );
                }
                self.failures = 0;
                self.redirects = 0;
                self.not_before = Instant::now();
            }
        }
    }

    /// Acts on one batch's answer: counts what was accepted and dropped, and keeps what is
    /// to be sent again (spooled, or in memory).
    fn settle(&mut self, batch: Batch, from: Origin, answer: &Answer, round: &mut Round) {
        let n = batch.items;
        let verdict = transport::judge(answer, n);
        self.stats.sent(verdict.accepted);
        round.accepted |= verdict.accepted > 0;
        for (reason, count) in &verdict.dropped {
            self.stats.dropped(*reason, *count);
            log(
                level::WARN,
                format!(
                    "Application Insights refused {count} items ({}); they are dropped: {}.",
                    reason.as_str(),
                    verdict.summary
                ),
            );
        }
        if verdict.resend.is_empty() {
            if from == Origin::Spool {
                self.pop_spooled();
            }
            return;
        }

        let rest = if verdict.resend.len() == n {
            batch
        } else {
            // Some items to send again: the batch's own, taken from its body.
            match transport::items(&batch.body) {
                Ok(mut items) if items.len() == n => {
                    let picked: Vec<Vec<u8>> = verdict
                        .resend
                        .iter()
                        .map(|&i| std::mem::take(&mut items[i]))
                        .collect();
                    Batch {
                        body: Bytes::from(self.gzip.get_or_insert_with(Gzip::new).body(&picked)),
                        items: picked.len(),
                    }
                }
                _ => {
                    // Not what was built: cannot happen; resend the whole batch rather
                    // than lose any of it.
                    log(
                        level::ERROR,
                        format!(
                            "A batch of {n} items no longer reads back; it is sent again whole."
                        ),
                    );
                    batch
                }
            }
        };
        self.stats.retried(rest.items);
        match (&verdict.redirect, self.redirects < 10) {
            (Some(to), true) => {
                if !round.redirected {
                    self.redirects += 1;
                    log(
                        level::INFO,
                        format!("Application Insights redirected ingestion to {to}."),
                    );
                    self.endpoint = to.clone();
                    round.redirected = true;
                }
            }
            _ => {
                let asked = verdict.retry_after.unwrap_or_default().min(MAX_RETRY_AFTER);
                let failure = round.failure.get_or_insert_with(|| Failure {
                    what: if matches!(answer, Answer::Failed(_)) {
                        "unreachable"
                    } else {
                        "asked for a retry"
                    },
                    summary: verdict.summary.clone(),
                    asked,
                    items: 0,
                });
                failure.asked = failure.asked.max(asked);
                failure.items += rest.items;
            }
        }
        match (from, self.spool.is_some()) {
            (Origin::Spool, _) => {
                if rest.items < n {
                    if let Some(s) = self.spool.as_mut() {
                        if let Err(e) = s.shrink_oldest(&rest.body, rest.items) {
                            log(
                                level::ERROR,
                                format!("Cannot rewrite a spooled batch: {e}."),
                            );
                        }
                        self.stats.spool_bytes(s.bytes());
                    }
                }
            }
            (_, true) => self.spool_push(rest),
            (_, false) => self.retry.push_back(rest),
        }
    }

    /// Sends the oldest spooled batch.
    fn deliver_spooled(&mut self, timeout: Duration) {
        let Some(spool) = self.spool.as_ref() else {
            return;
        };
        let Some(entry) = spool.oldest().cloned() else {
            return;
        };
        // Read back in full before it is sent, so that a corrupt file is dropped and counted
        // here rather than refused by the endpoint.
        let read = spool
            .read(&entry)
            .and_then(|gz| transport::items(&gz).map(|items| (gz, items.len())));
        match read {
            Ok((gz, items)) if items > 0 => self.deliver(
                Batch {
                    body: Bytes::from(gz),
                    items,
                },
                Origin::Spool,
                timeout,
            ),
            Ok(_) => self.pop_spooled(),
            Err(e) => {
                log(
                    level::ERROR,
                    format!(
                        "Spooled batch {} is unreadable ({e}); its {} items are dropped.",
                        entry.path.display(),
                        entry.items
                    ),
                );
                self.stats.dropped(Reason::SpoolCorrupt, entry.items);
                self.pop_spooled();
            }
        }
    }

    /// Deletes the oldest spooled batch.
    fn pop_spooled(&mut self) {
        if let Some(s) = self.spool.as_mut() {
            s.pop_oldest();
            self.stats.spool_bytes(s.bytes());
        }
    }

    /// Writes a batch to the spool (dropping the oldest past the bound).
    fn spool_push(&mut self, batch: Batch) {
        let Some(spool) = self.spool.as_mut() else {
            return;
        };
        let n = batch.items;
        match spool.push(&batch.body, n, host::now_unix_ms()) {
            Ok(dropped) => {
                if dropped > 0 {
                    log(
                        level::WARN,
                        format!("The Application Insights spool is full; {dropped} of the oldest items are dropped."),
                    );
                }
                self.stats.dropped(Reason::SpoolFull, dropped);
            }
            Err(e) => {
                log(
                    level::ERROR,
                    format!("Cannot write to the Application Insights spool ({e}); {n} items are dropped."),
                );
                self.stats.dropped(Reason::SpoolFull, n);
            }
        }
        self.stats.spool_bytes(spool.bytes());
    }

    /// Delivers what it can by the deadline, spooled batches first; what is left goes to the
    /// spool (or is dropped and counted without one) and is sent after the next start.
    fn flush(&mut self, mut pending: VecDeque<Batch>, deadline: Instant) {
        loop {
            let now = Instant::now();
            if now >= deadline || now < self.not_before {
                break;
            }
            let timeout = self
                .settings
                .timeout
                .min(deadline.saturating_duration_since(now));
            if let Some(batch) = self.retry.pop_front() {
                self.deliver(batch, Origin::Memory, timeout);
                continue;
            }
            if self.spooled() {
                self.deliver_spooled(timeout);
                continue;
            }
            if pending.is_empty() {
                break;
            }
            let n = pending.len().min(self.settings.max_concurrent_requests);
            let batches = pending.drain(..n).collect();
            self.deliver_all(batches, Origin::Fresh, timeout);
        }
        let mut left: Vec<Batch> = self.retry.drain(..).collect();
        left.extend(pending);
        if left.is_empty() {
            return;
        }
        if self.spool.is_some() {
            for batch in left {
                self.spool_push(batch);
            }
        } else {
            let n: usize = left.iter().map(|b| b.items).sum();
            log(
                level::WARN,
                format!(
                    "{n} Application Insights items were not delivered before shutdown and are dropped (no spool_dir)."
                ),
            );
            self.stats.dropped(Reason::Shutdown, n);
        }
    }
}

/// The oldest batch ready to send.
fn cut(state: &mut State) -> Option<Batch> {
    let batch = state.pending.pop_front()?;
    state.pending_items -= batch.items;
    Some(batch)
}

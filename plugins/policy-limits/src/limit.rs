//! The counting behind `rate-limit`, `rate-limit-by-key`, `quota` and `quota-by-key`: fixed
//! windows aligned to the Unix epoch, counters shared through the gateway's cache (or kept in
//! this process), and the answers.
//!
//! A request is counted in `on_request`: the counters (calls, and bytes for a bandwidth
//! quota) are increased first, through the cache (pause, then `on_resume`) or locally, and the
//! request is refused when the new values are past the limit. Response bytes, and calls under
//! an `increment_condition`, are counted when the response arrives: the step sets
//! `outpost.on-response` and counts in `on_response`.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use outpost_plugin_sdk::template::Template;
use outpost_plugin_sdk::{phase, Context, Flow, Head, HostStatus, Metric, Token};

use crate::clock;
use crate::config::{CounterScope, IncrementCondition, Limits, OnCacheFailure};
use crate::local::{self, Throttle};

/// Every shared counter key starts with this.
pub(crate) const KEY_PREFIX: &str = "outpost:limit:";

/// Counters live this much longer than their window: replicas whose clocks differ a little
/// still find the window's counter, and a local counter is not dropped while it is read.
pub(crate) const TTL_MARGIN_MS: u64 = 5_000;

/// The fallback metric's name.
pub(crate) const FALLBACK_METRIC: &str = "policy_limits_cache_fallback_total";

/// The host property asking for this step's `on_response`.
const ON_RESPONSE: &str = "outpost.on-response";

/// Which policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    RateLimit,
    RateLimitByKey,
    Quota,
    QuotaByKey,
}

impl Kind {
    /// The policy's name (also the metric label and part of the counter keys).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::RateLimit => "rate-limit",
            Kind::RateLimitByKey => "rate-limit-by-key",
            Kind::Quota => "quota",
            Kind::QuotaByKey => "quota-by-key",
        }
    }

    fn is_rate(self) -> bool {
        matches!(self, Kind::RateLimit | Kind::RateLimitByKey)
    }
}

/// The two counters a limit may keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counter {
    Calls = 0,
    Bytes = 1,
}

impl Counter {
    fn name(self) -> &'static str {
        match self {
            Counter::Calls => "calls",
            Counter::Bytes => "bytes",
        }
    }
}

/// How a request's counter key is made.
enum Keys {
    /// Per subscription (`rate-limit`, `quota`):
    /// `outpost:limit:<kind>:<fingerprint>:<counter>:<subscription>[:<api>[:<operation>]]:<window>`.
    /// The fingerprint (of the limit's numbers and scope) keeps two different limits from
    /// sharing a counter.
    Subscription { prefix: String, scope: CounterScope },
    /// By key (`*-by-key`): `outpost:limit:<kind>:<counter>:<period s>:<key>:<window>`. Steps
    /// with the same key share the counter, as APIM's do.
    Template { prefix: String, template: Template },
}

/// Where a rate limit reports (APIM's header and variable attributes).
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Header of the refusal carrying the seconds to wait.
    pub(crate) retry_after_header: String,
    /// Variable set to the seconds to wait when refused.
    pub(crate) retry_after_variable: Option<String>,
    /// Header name of the calls left.
    pub(crate) remaining_header: Option<String>,
    /// Variable set to the calls left.
    pub(crate) remaining_variable: Option<String>,
    /// Header name of the calls allowed.
    pub(crate) total_header: Option<String>,
    pub(crate) remaining_property: Option<String>,
    pub(crate) total_property: Option<String>,
}

impl Report {
    /// Precomputes the host properties of the headers.
    pub(crate) fn with_properties(mut self) -> Self {
        let property = |h: &Option<String>| {
            h.as_ref()
                .map(|h| format!("outpost.response-header.{}", h.to_ascii_lowercase()))
        };
        self.remaining_property = property(&self.remaining_header);
        self.total_property = property(&self.total_header);
        self
    }
}

/// Is the default cache (`""`) missing? Caches are fixed for the process's life (the manifest
/// is not reloaded), so once the host said so, no later request asks again.
static DEFAULT_CACHE_ABSENT: AtomicBool = AtomicBool::new(false);

/// Shared counters: where, and what to do when they fail.
pub(crate) struct Shared {
    policy: &'static str,
    cache: String,
    on_failure: OnCacheFailure,
    /// A named cache the host does not have (per instance: a named cache that is missing is
    /// a configuration mistake worth one warning per step).
    named_absent: AtomicBool,
    fallbacks: Metric,
}

/// What a shared counter answered.
enum Answer {
    Count(i64),
    /// Count in this process instead.
    Local,
    /// Fail closed.
    Unavailable,
}

static FALLBACK_WARNING: Throttle = Throttle::new();

impl Shared {
    pub(crate) fn new(policy: &'static str, cache: String, on_failure: OnCacheFailure) -> Self {
        Shared {
            policy,
            cache,
            on_failure,
            named_absent: AtomicBool::new(false),
            fallbacks: Metric::counter(
                FALLBACK_METRIC,
                "Requests a limit policy counted in this gateway because its shared counter failed or timed out.",
                &["policy"],
            ),
        }
    }

    fn absent(&self) -> &AtomicBool {
        if self.cache.is_empty() {
            &DEFAULT_CACHE_ABSENT
        } else {
            &self.named_absent
        }
    }

    /// Whether counters go through the cache.
    fn enabled(&self) -> bool {
        !self.absent().load(Ordering::Relaxed)
    }

    fn ask(&self, ctx: &mut Context<'_, '_>, key: &str, delta: i64, ttl_ms: u64) -> u32 {
        ctx.counter_add(
            &self.cache,
            key.as_bytes(),
            delta,
            Duration::from_millis(ttl_ms),
        )
        .0
    }

    fn answer(&self, ctx: &Context<'_, '_>, token: u32) -> Answer {
        let r = ctx.result(Token(token));
        match r.status {
            HostStatus::OK => Answer::Count(r.number),
            HostStatus::NOT_CONFIGURED => {
                if !self.absent().swap(true, Ordering::Relaxed) && !self.cache.is_empty() {
                    outpost_plugin_sdk::log(
                        outpost_plugin_sdk::level::WARN,
                        &format!(
                            "policy={} cache={}: The counter cache is not configured; this step counts in this gateway only.",
                            self.policy, self.cache
                        ),
                    );
                }
                Answer::Local
            }
            status => {
                self.fallbacks.inc(&[self.policy]);
                let error = r.error.as_str();
                FALLBACK_WARNING.warn(|| {
                    let what = match status {
                        HostStatus::TIMEOUT => "timed out",
                        _ => "failed",
                    };
                    format!(
                        "policy={} cache={:?} error={error:?}: The shared limit counter {what}; {}.",
                        self.policy,
                        self.cache,
                        match self.on_failure {
                            OnCacheFailure::Local => "counting in this gateway instead",
                            OnCacheFailure::FailClosed => "refusing the request (fail-closed)",
                        }
                    )
                });
                match self.on_failure {
                    OnCacheFailure::Local => Answer::Local,
                    OnCacheFailure::FailClosed => Answer::Unavailable,
                }
            }
        }
    }
}

/// The step's slot while it waits for the cache: a stage and the two counters' tokens.
mod slot {
    pub(super) const REQUEST: u8 = 1;
    pub(super) const RESPONSE: u8 = 2;
    const TOKEN_BITS: u32 = 28;
    const MASK: u64 = (1 << TOKEN_BITS) - 1;

    pub(super) fn encode(stage: u8, tokens: [u32; 2]) -> u64 {
        u64::from(stage) << 56
            | (u64::from(tokens[1]) & MASK) << TOKEN_BITS
            | (u64::from(tokens[0]) & MASK)
    }

    pub(super) fn decode(slot: u64) -> (u8, [u32; 2]) {
        (
            (slot >> 56) as u8,
            [(slot & MASK) as u32, ((slot >> TOKEN_BITS) & MASK) as u32],
        )
    }
}

/// A fixed window.
#[derive(Debug, Clone, Copy)]
struct Window {
    index: u64,
    /// When it ends (`u64::MAX`: never).
    end_ms: u64,
}

impl Window {
    fn at(now_ms: u64, period_ms: u64) -> Window {
        if period_ms == 0 {
            return Window {
                index: 0,
                end_ms: u64::MAX,
            };
        }
        let index = now_ms / period_ms;
        Window {
            index,
            end_ms: (index + 1).saturating_mul(period_ms),
        }
    }

    /// Whole seconds until the window renews (at least 1), `None` for one that never does.
    fn retry_after(self, now_ms: u64) -> Option<u64> {
        (self.end_ms != u64::MAX).then(|| self.end_ms.saturating_sub(now_ms).div_ceil(1000).max(1))
    }
}

/// Reused buffers for keys: rendering and key building allocate nothing once they are warm.
#[derive(Default)]
struct Buffers {
    base: String,
    key: String,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::default();
}

/// Gives every limit instance its own marker variable.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A configured limit.
pub(crate) struct Limit {
    kind: Kind,
    keys: Keys,
    limits: Limits,
    increment: i64,
    condition: Option<IncrementCondition>,
    report: Option<Report>,
    shared: Shared,
    /// The variable that carries this step's key base from the request to its response hook
    /// (set only when the step counts at the response).
    marker: String,
}

/// What one request adds to each counter at one stage.
type Deltas = [i64; 2];

impl Limit {
    /// A per-subscription limit.
    pub(crate) fn per_subscription(
        kind: Kind,
        limits: Limits,
        scope: CounterScope,
        report: Option<Report>,
        shared: Shared,
    ) -> Limit {
        let fingerprint = local::fnv1a(
            format!(
                "{:?}/{:?}/{}/{scope:?}",
                limits.calls, limits.bytes, limits.period_ms
            )
            .as_bytes(),
        );
        let prefix = format!("{KEY_PREFIX}{}:{fingerprint:016x}:", kind.name());
        Self::new(
            kind,
            Keys::Subscription { prefix, scope },
            limits,
            1,
            None,
            report,
            shared,
        )
    }

    /// A limit by key.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn by_key(
        kind: Kind,
        limits: Limits,
        template: Template,
        increment: i64,
        condition: Option<IncrementCondition>,
        report: Option<Report>,
        shared: Shared,
    ) -> Limit {
        let prefix = format!("{KEY_PREFIX}{}:", kind.name());
        Self::new(
            kind,
            Keys::Template { prefix, template },
            limits,
            increment,
            condition,
            report,
            shared,
        )
    }

    fn new(
        kind: Kind,
        keys: Keys,
        limits: Limits,
        increment: i64,
        condition: Option<IncrementCondition>,
        report: Option<Report>,
        shared: Shared,
    ) -> Limit {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Limit {
            kind,
            keys,
            limits,
            increment,
            condition,
            report,
            shared,
            marker: format!("policy-limits.{}.{id}", kind.name()),
        }
    }

    fn counters(&self) -> impl Iterator<Item = Counter> + '_ {
        [
            self.limits.calls.map(|_| Counter::Calls),
            self.limits.bytes.map(|_| Counter::Bytes),
        ]
        .into_iter()
        .flatten()
    }

    fn counts_at_response(&self) -> bool {
        self.limits.bytes.is_some() || self.condition.is_some()
    }

    fn ttl_ms(&self) -> u64 {
        match self.limits.period_ms {
            0 => 0,
            p => p + TTL_MARGIN_MS,
        }
    }

    /// The per-request part of the key: the rendered template (empty per subscription).
    fn base(&self, head: &Head<'_, '_>, ctx: &Context<'_, '_>, out: &mut String) {
        out.clear();
        if let Keys::Template { template, .. } = &self.keys {
            template.render(head, ctx, out);
        }
    }

    fn key(&self, c: Counter, base: &str, ctx: &Context<'_, '_>, window: u64, out: &mut String) {
        out.clear();
        let mut n = itoa::Buffer::new();
        match &self.keys {
            Keys::Subscription { prefix, scope } => {
                out.push_str(prefix);
                out.push_str(c.name());
                out.push(':');
                out.push_str(ctx.subscription_id());
                if *scope != CounterScope::Subscription {
                    out.push(':');
                    out.push_str(ctx.api_id());
                }
                if *scope == CounterScope::Operation {
                    out.push(':');
                    out.push_str(ctx.operation_id());
                }
            }
            Keys::Template { prefix, .. } => {
                out.push_str(prefix);
                out.push_str(c.name());
                out.push(':');
                out.push_str(n.format(self.limits.period_ms / 1000));
                out.push(':');
                push_key(out, base);
            }
        }
        out.push(':');
        out.push_str(n.format(window));
    }

    fn request_deltas(&self, head: &Head<'_, '_>) -> Deltas {
        [
            match self.condition {
                // Under a condition the request only reads the count; the response counts.
                Some(_) => 0,
                None => self.increment,
            },
            if self.limits.bytes.is_some() {
                content_length(head)
            } else {
                0
            },
        ]
    }

    fn response_deltas(&self, head: &Head<'_, '_>) -> Deltas {
        [
            match &self.condition {
                Some(c) if self.limits.calls.is_some() && c.matches(head.status()) => {
                    self.increment
                }
                _ => 0,
            },
            if self.limits.bytes.is_some() {
                content_length(head)
            } else {
                0
            },
        ]
    }

    /// Inbound (or backend) hook: count, then decide.
    pub(crate) fn on_request(&self, head: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        if matches!(self.keys, Keys::Subscription { .. }) && ctx.subscription_id().is_empty() {
            // As APIM: a per-subscription limit does not apply to a request without one.
            return Flow::CONTINUE;
        }
        let deltas = self.request_deltas(head);
        BUFFERS.with_borrow_mut(|b| {
            self.base(head, ctx, &mut b.base);
            let now = clock::now_ms();
            let window = Window::at(now, self.limits.period_ms);
            if self.shared.enabled() {
                let mut tokens = [0; 2];
                for c in self.counters() {
                    self.key(c, &b.base, ctx, window.index, &mut b.key);
                    tokens[c as usize] =
                        self.shared
                            .ask(ctx, &b.key, deltas[c as usize], self.ttl_ms());
                }
                ctx.set_slot(slot::encode(slot::REQUEST, tokens));
                return Flow::PAUSE;
            }
            let mut values = [0; 2];
            for c in self.counters() {
                values[c as usize] = self.count_locally(c, b, ctx, window, now, deltas);
            }
            self.decide(ctx, &b.base, values, deltas, now, window)
        })
    }

    /// Outbound hook (asked for with `outpost.on-response`): counts what the response adds.
    pub(crate) fn on_response(&self, head: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let deltas = self.response_deltas(head);
        BUFFERS.with_borrow_mut(|b| {
            // Not asked for by this step's request hook (placed in the outbound section, or
            // the request hook did not let it through): nothing to count.
            let Some(base) = ctx.variable(&self.marker) else {
                return Flow::CONTINUE;
            };
            b.base.clear();
            b.base.push_str(base);
            if deltas == [0, 0] {
                return Flow::CONTINUE;
            }
            let now = clock::now_ms();
            let window = Window::at(now, self.limits.period_ms);
            if self.shared.enabled() {
                let mut tokens = [0; 2];
                for c in self.counters().filter(|&c| deltas[c as usize] != 0) {
                    self.key(c, &b.base, ctx, window.index, &mut b.key);
                    tokens[c as usize] =
                        self.shared
                            .ask(ctx, &b.key, deltas[c as usize], self.ttl_ms());
                }
                ctx.set_slot(slot::encode(slot::RESPONSE, tokens));
                return Flow::PAUSE;
            }
            for c in self.counters().filter(|&c| deltas[c as usize] != 0) {
                self.count_locally(c, b, ctx, window, now, deltas);
            }
            Flow::CONTINUE
        })
    }

    /// After the cache answered.
    pub(crate) fn on_resume(&self, head: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        if ctx.phase() == phase::END {
            return Flow::CONTINUE;
        }
        let (stage, tokens) = slot::decode(ctx.slot());
        ctx.set_slot(0);
        match stage {
            slot::REQUEST => {
                let deltas = self.request_deltas(head);
                BUFFERS.with_borrow_mut(|b| {
                    self.base(head, ctx, &mut b.base);
                    let now = clock::now_ms();
                    let window = Window::at(now, self.limits.period_ms);
                    let mut values = [0; 2];
                    for c in self.counters() {
                        values[c as usize] = match self.shared.answer(ctx, tokens[c as usize]) {
                            Answer::Count(n) => n,
                            Answer::Local => self.count_locally(c, b, ctx, window, now, deltas),
                            Answer::Unavailable => return unavailable(ctx, self.kind),
                        };
                    }
                    self.decide(ctx, &b.base, values, deltas, now, window)
                })
            }
            slot::RESPONSE => {
                let deltas = self.response_deltas(head);
                BUFFERS.with_borrow_mut(|b| {
                    let Some(base) = ctx.variable(&self.marker) else {
                        return Flow::CONTINUE;
                    };
                    b.base.clear();
                    b.base.push_str(base);
                    let now = clock::now_ms();
                    let window = Window::at(now, self.limits.period_ms);
                    for c in self.counters().filter(|&c| tokens[c as usize] != 0) {
                        // The response already went through: a failure can only be counted
                        // locally, whatever `on_cache_failure` says.
                        if !matches!(
                            self.shared.answer(ctx, tokens[c as usize]),
                            Answer::Count(_)
                        ) {
                            self.count_locally(c, b, ctx, window, now, deltas);
                        }
                    }
                    Flow::CONTINUE
                })
            }
            _ => Flow::CONTINUE,
        }
    }

    fn count_locally(
        &self,
        c: Counter,
        b: &mut Buffers,
        ctx: &Context<'_, '_>,
        window: Window,
        now: u64,
        deltas: Deltas,
    ) -> i64 {
        self.key(c, &b.base, ctx, window.index, &mut b.key);
        local::counters().add(
            &b.key,
            deltas[c as usize],
            window.end_ms.saturating_add(TTL_MARGIN_MS),
            now,
        )
    }

    /// With the counters' new values: refuse, or let the request through and report.
    fn decide(
        &self,
        ctx: &mut Context<'_, '_>,
        base: &str,
        values: [i64; 2],
        deltas: Deltas,
        now: u64,
        window: Window,
    ) -> Flow {
        // Under a condition the request has not been counted yet: it needs room for itself.
        let pending = if self.condition.is_some() {
            self.increment
        } else {
            0
        };
        let used = values[Counter::Calls as usize].saturating_add(pending);
        let calls_out = self.limits.calls.is_some_and(|l| used > l as i64);
        // Bandwidth is known only as it is used: a request is refused once the quota is
        // spent before it, not for the size it brings.
        let bytes_out = self.limits.bytes.is_some_and(|l| {
            values[Counter::Bytes as usize].saturating_sub(deltas[Counter::Bytes as usize])
                >= l as i64
        });
        if calls_out || bytes_out {
            return self.refuse(ctx, calls_out, now, window);
        }
        if let (Some(r), Some(calls)) = (&self.report, self.limits.calls) {
            let remaining = (calls as i64).saturating_sub(used).max(0);
            let mut n = itoa::Buffer::new();
            let remaining = n.format(remaining);
            if let Some(p) = &r.remaining_property {
                ctx.set_variable(p, remaining);
            }
            if let Some(v) = &r.remaining_variable {
                ctx.set_variable(v, remaining);
            }
            if let Some(p) = &r.total_property {
                ctx.set_variable(p, itoa::Buffer::new().format(calls));
            }
        }
        if self.counts_at_response() {
            ctx.set_variable(&self.marker, base);
            ctx.set_variable(ON_RESPONSE, "1");
        }
        Flow::CONTINUE
    }

    fn refuse(&self, ctx: &mut Context<'_, '_>, calls_out: bool, now: u64, w: Window) -> Flow {
        let retry = w.retry_after(now);
        let mut n = itoa::Buffer::new();
        if self.kind.is_rate() {
            let secs = retry.unwrap_or(1);
            answer(
                ctx,
                429,
                "rate_limit_exceeded",
                &format!("Rate limit is exceeded. Try again in {secs} seconds."),
            );
            let secs = n.format(secs);
            let Some(r) = &self.report else {
                return Flow::RESPOND;
            };
            ctx.respond_header(&r.retry_after_header, secs.as_bytes());
            if let Some(h) = &r.remaining_header {
                ctx.respond_header(h, b"0");
            }
            if let Some(h) = &r.total_header {
                let total = self.limits.calls.unwrap_or(0);
                ctx.respond_header(h, itoa::Buffer::new().format(total).as_bytes());
            }
            if let Some(v) = &r.remaining_variable {
                ctx.set_variable(v, "0");
            }
            if let Some(v) = &r.retry_after_variable {
                ctx.set_variable(v, secs);
            }
            return Flow::RESPOND;
        }
        let what = if calls_out {
            "call volume"
        } else {
            "bandwidth"
        };
        let message = match retry {
            Some(secs) => format!(
                "Out of {what} quota. Quota will be replenished in {:02}:{:02}:{:02}.",
                secs / 3600,
                secs / 60 % 60,
                secs % 60
            ),
            None => format!("Out of {what} quota."),
        };
        answer(ctx, 403, "quota_exceeded", &message);
        if let Some(secs) = retry {
            ctx.respond_header("retry-after", n.format(secs).as_bytes());
        }
        Flow::RESPOND
    }
}

/// The body's length as its head says (0 when it does not: chunked bodies are not counted).
fn content_length(head: &Head<'_, '_>) -> i64 {
    head.header("content-length")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|s| s.trim().parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .unwrap_or(0)
}

/// The fail-closed answer.
fn unavailable(ctx: &mut Context<'_, '_>, kind: Kind) -> Flow {
    answer(
        ctx,
        503,
        "limit_unavailable",
        &format!(
            "The {} could not be checked: its shared counter is unavailable.",
            kind.name()
        ),
    );
    Flow::RESPOND
}

/// The longest rendered key kept as it is; longer ones are kept as a digest, so a client
/// cannot make counters (local or in the cache) as large as its headers.
const MAX_KEY_BYTES: usize = 64;

fn push_key(out: &mut String, key: &str) {
    if key.len() <= MAX_KEY_BYTES {
        out.push_str(key);
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    out.push('#');
    for b in &digest.as_ref()[..16] {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
}

/// Answers with the gateway's JSON error shape.
pub(crate) fn answer(ctx: &mut Context<'_, '_>, status: u16, code: &str, message: &str) {
    ctx.respond_error(status, code, message, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip() {
        let s = slot::encode(slot::RESPONSE, [7, 123_456]);
        assert_eq!(slot::decode(s), (slot::RESPONSE, [7, 123_456]));
        assert_ne!(slot::encode(slot::REQUEST, [0, 0]), 0);
    }

    #[test]
    fn windows_align_to_the_epoch() {
        let w = Window::at(61_500, 60_000);
        assert_eq!((w.index, w.end_ms), (1, 120_000));
        assert_eq!(w.retry_after(61_500), Some(59));
        assert_eq!(w.retry_after(119_999), Some(1));
        let forever = Window::at(5, 0);
        assert_eq!((forever.index, forever.retry_after(5)), (0, None));
    }
}

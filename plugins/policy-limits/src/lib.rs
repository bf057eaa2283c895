//! Limit policies, as APIM names them: `rate-limit`, `rate-limit-by-key`, `quota`,
//! `quota-by-key` and `limit-concurrency`.
//!
//! Windows are fixed and aligned to the Unix epoch (window = now in ms / period), so every
//! replica counts in the same window under the same key. Counters are shared through the
//! gateway's cache when one is configured (`counter_cache`, default: the default cache), and
//! kept in this process otherwise; a cache that fails or times out is replaced by the local
//! counter for that request (or, with `on_cache_failure: "fail-closed"`, the request is
//! refused). Concurrency permits are always local (see [`LimitConcurrency`]).
//!
//! Configuration, answers and metrics: the crate's README.md. Key templates: the SDK's
//! [`outpost_plugin_sdk::template`].

use outpost_plugin_sdk::{export_plugin, Context, Flow, Head, Policy};

mod clock;
mod concurrency;
pub mod config;
mod limit;
mod local;

pub use concurrency::LimitConcurrency;
use config::{QuotaByKeyConfig, QuotaConfig, RateLimitByKeyConfig, RateLimitConfig, ReportConfig};
use limit::{Kind, Limit, Report, Shared};

fn report(r: ReportConfig) -> Report {
    Report {
        retry_after_header: r
            .retry_after_header_name
            .unwrap_or_else(|| "retry-after".into()),
        retry_after_variable: r.retry_after_variable_name,
        remaining_header: r.remaining_calls_header_name,
        remaining_variable: r.remaining_calls_variable_name,
        total_header: r.total_calls_header_name,
        ..Report::default()
    }
    .with_properties()
}

macro_rules! delegate {
    () => {
        fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
            self.0.on_request(req, ctx)
        }
        fn on_response(&self, resp: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
            self.0.on_response(resp, ctx)
        }
        fn on_resume(&self, head: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
            self.0.on_resume(head, ctx)
        }
    };
}

/// `rate-limit`: calls per window per subscription; 429 past it.
pub struct RateLimit(Limit);

impl Policy for RateLimit {
    type Config = RateLimitConfig;

    fn new(c: Self::Config) -> Result<Self, String> {
        let r = c.report();
        let limits = config::rate(c.calls, c.renewal_period, &r)?;
        let kind = Kind::RateLimit;
        Ok(RateLimit(Limit::per_subscription(
            kind,
            limits,
            c.counter_scope,
            Some(report(r)),
            Shared::new(kind.name(), c.counter_cache, c.on_cache_failure),
        )))
    }

    delegate!();
}

/// `rate-limit-by-key`: calls per window per key; 429 past it.
pub struct RateLimitByKey(Limit);

impl Policy for RateLimitByKey {
    type Config = RateLimitByKeyConfig;

    fn new(c: Self::Config) -> Result<Self, String> {
        let r = c.report();
        let limits = config::rate(c.calls, c.renewal_period, &r)?;
        let kind = Kind::RateLimitByKey;
        Ok(RateLimitByKey(Limit::by_key(
            kind,
            limits,
            config::template("counter_key", &c.counter_key)?,
            config::increment(c.increment_count, c.calls)?,
            config::condition(c.increment_condition)?,
            Some(report(r)),
            Shared::new(kind.name(), c.counter_cache, c.on_cache_failure),
        )))
    }

    delegate!();
}

/// `quota`: calls and/or bandwidth per period per subscription; 403 past it.
pub struct Quota(Limit);

impl Policy for Quota {
    type Config = QuotaConfig;

    fn new(c: Self::Config) -> Result<Self, String> {
        let limits = config::quota(c.calls, c.bandwidth, c.renewal_period)?;
        let kind = Kind::Quota;
        Ok(Quota(Limit::per_subscription(
            kind,
            limits,
            c.counter_scope,
            None,
            Shared::new(kind.name(), c.counter_cache, c.on_cache_failure),
        )))
    }

    delegate!();
}

/// `quota-by-key`: calls and/or bandwidth per period per key; 403 past it.
pub struct QuotaByKey(Limit);

impl Policy for QuotaByKey {
    type Config = QuotaByKeyConfig;

    fn new(c: Self::Config) -> Result<Self, String> {
        let limits = config::quota(c.calls, c.bandwidth, c.renewal_period)?;
        if c.increment_condition.is_some() && c.calls.is_none() {
            return Err("increment_condition decides which calls count: give calls too".into());
        }
        let kind = Kind::QuotaByKey;
        Ok(QuotaByKey(Limit::by_key(
            kind,
            limits,
            config::template("counter_key", &c.counter_key)?,
            1,
            config::condition(c.increment_condition)?,
            None,
            Shared::new(kind.name(), c.counter_cache, c.on_cache_failure),
        )))
    }

    delegate!();
}

export_plugin! {
    name: "policy-limits",
    version: env!("CARGO_PKG_VERSION"),
    policies: [
        "rate-limit" => RateLimit,
        "rate-limit-by-key" => RateLimitByKey,
        "quota" => Quota,
        "quota-by-key" => QuotaByKey,
        "limit-concurrency" => LimitConcurrency,
    ],
}

#[cfg(test)]
mod tests;

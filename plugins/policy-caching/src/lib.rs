//! Caching policies, as APIM names them (every field is described in the crate's README):
//!
//! * `cache-lookup` (inbound) and `cache-store` (outbound) — response caching: a `GET` whose
//!   entry is in the cache is answered from it without calling the backend; on a miss the
//!   backend's `200` response is stored for `duration` seconds (capped by its
//!   `Cache-Control`).
//! * `cache-lookup-value`, `cache-store-value`, `cache-remove-value` — values under keys built
//!   from the request (templates, see [`outpost_plugin_sdk::template`]), read into variables.
//!
//! Entries live in a cache of the manifest (`[[caches]]`: the default one, or the one named by
//! `cache`), so gateways sharing a Redis cache share their entries. A cache that fails or
//! does not answer in time is a miss: the request is served by the backend, and the failure is
//! counted in `policy_caching_errors_total{policy}` — unless the step says `fail_closed`, then
//! the answer is `503 cache_unavailable`.

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{export_plugin, host, Context, Flow, HostStatus, Metric};

mod control;
mod entry;
mod response;
mod value;

pub use response::{
    CacheLookup, CacheLookupConfig, CacheStore, CacheStoreConfig, DownstreamCachingType, PENDING,
};
pub use value::{
    CacheLookupValue, CacheLookupValueConfig, CacheRemoveValue, CacheRemoveValueConfig,
    CacheStoreValue, CacheStoreValueConfig,
};

/// Which cache a step uses, as APIM's `caching-type` says it.
#[derive(Deserialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
#[serde(crate = "outpost_plugin_sdk::serde", rename_all = "kebab-case")]
pub enum CachingType {
    /// The cache named by `cache` (default: the manifest's default cache); a gateway without
    /// that cache does no caching, quietly.
    #[default]
    PreferExternal,
    /// The cache named by `cache` (default: the manifest's default cache); a gateway without
    /// it counts every use as a failure.
    External,
    /// The cache named by `cache` (default: the cache named `internal`, for example a
    /// `cache-memory`); a gateway without it counts every use as a failure.
    Internal,
}

/// The cache a step uses, and whether its absence is a failure.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The cache's name (empty: the manifest's default cache).
    name: Box<str>,
    /// A gateway without this cache counts uses as failures.
    required: bool,
}

impl Target {
    fn new(cache: Option<String>, caching_type: CachingType) -> Self {
        let name = match (cache, caching_type) {
            (Some(name), _) => name,
            (None, CachingType::Internal) => "internal".to_owned(),
            (None, _) => String::new(),
        };
        Target {
            name: name.into(),
            required: caching_type != CachingType::PreferExternal,
        }
    }

    /// How the cache answered a piece of work.
    fn outcome(&self, status: HostStatus) -> Outcome {
        match status {
            HostStatus::OK => Outcome::Ok,
            HostStatus::MISS => Outcome::Miss,
            HostStatus::NOT_CONFIGURED if !self.required => Outcome::Absent,
            _ => Outcome::Failed,
        }
    }

    /// The cache's name for messages.
    fn label(&self) -> &str {
        if self.name.is_empty() {
            "(default)"
        } else {
            &self.name
        }
    }
}

/// How the cache answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Done; for a lookup, found.
    Ok,
    /// Looked up, not found.
    Miss,
    /// No such cache on this gateway, and the step does not require it.
    Absent,
    /// An error, a timeout, or a required cache that is not configured.
    Failed,
}

/// `policy_caching_errors_total{policy}`, defined once per instance (the gateway hands every
/// definition of the same metric the same id).
fn errors_metric() -> Metric {
    Metric::counter(
        "policy_caching_errors_total",
        "Cache operations of caching policies that failed or timed out (a miss, unless fail_closed).",
        &["policy"],
    )
}

/// Counts and logs a failed cache operation.
fn failed(metric: Metric, policy: &str, target: &Target, ctx: &Context<'_, '_>, why: &str) {
    metric.inc(&[policy]);
    if host::log_enabled(outpost_plugin_sdk::level::DEBUG) {
        host::log(
            outpost_plugin_sdk::level::DEBUG,
            &format!(
                "{policy}: cache {} failed for request {}: {why}",
                target.label(),
                ctx.request_id()
            ),
        );
    }
}

/// Answers `503 cache_unavailable` in the gateway's JSON error shape.
fn unavailable(ctx: &mut Context<'_, '_>, target: &Target) -> Flow {
    let message = format!("The cache {} is unavailable.", target.label());
    ctx.respond_error(503, "cache_unavailable", &message, &[]);
    Flow::RESPOND
}

thread_local! {
    /// Buffers for keys and values: no allocation per request once they have grown.
    static SCRATCH: std::cell::RefCell<(String, String)> =
        const { std::cell::RefCell::new((String::new(), String::new())) };
}

/// Runs `f` with two cleared buffers of this thread.
fn with_scratch<T>(f: impl FnOnce(&mut String, &mut String) -> T) -> T {
    SCRATCH.with_borrow_mut(|(a, b)| {
        a.clear();
        b.clear();
        f(a, b)
    })
}

/// Checks a configured duration in seconds.
fn check_duration(field: &str, secs: u64) -> Result<(), String> {
    // Kept within what a cache's TTL in milliseconds and the slot's 30 bits can carry.
    const MAX: u64 = (1 << 30) - 1;
    if secs == 0 || secs > MAX {
        return Err(format!("{field}: must be between 1 and {MAX} seconds"));
    }
    Ok(())
}

export_plugin! {
    name: "policy-caching",
    version: env!("CARGO_PKG_VERSION"),
    policies: [
        "cache-lookup" => CacheLookup,
        "cache-store" => CacheStore,
        "cache-lookup-value" => CacheLookupValue,
        "cache-store-value" => CacheStoreValue,
        "cache-remove-value" => CacheRemoveValue,
    ],
}

#[cfg(test)]
mod tests;

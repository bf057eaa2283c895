//! The policies' configuration: serde types, parsed strictly, and their validation.

use outpost_plugin_sdk::serde::Deserialize as DeriveDeserialize;
use outpost_plugin_sdk::template::Template;

/// The longest renewal period accepted: ten years (the windows' arithmetic stays in range).
pub const MAX_PERIOD_SECS: u64 = 10 * 365 * 24 * 3600;

/// What a policy does when the shared counter (the cache) fails or times out.
#[derive(DeriveDeserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(crate = "outpost_plugin_sdk::serde", rename_all = "kebab-case")]
pub enum OnCacheFailure {
    /// Count the request in this gateway's memory instead (default).
    #[default]
    Local,
    /// Refuse the request: 503, `limit_unavailable`.
    FailClosed,
}

/// Which requests of a subscription share a `rate-limit` or `quota` counter.
#[derive(DeriveDeserialize, Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[serde(crate = "outpost_plugin_sdk::serde", rename_all = "snake_case")]
pub enum CounterScope {
    /// Every request of the subscription, whatever the API (a limit placed at product scope).
    Subscription,
    /// Per subscription and API (default; a limit placed at API scope).
    #[default]
    Api,
    /// Per subscription, API and operation (a limit placed at operation scope).
    Operation,
}

/// Which responses count a request (`increment_condition`).
#[derive(DeriveDeserialize, Debug, Clone)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct IncrementCondition {
    /// Inclusive status ranges, `[[200, 299]]`: only responses with such a status count.
    pub statuses: Vec<(u16, u16)>,
}

impl IncrementCondition {
    /// Whether a response status counts.
    pub fn matches(&self, status: u16) -> bool {
        self.statuses
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&status))
    }

    fn validate(&self) -> Result<(), String> {
        if self.statuses.is_empty() {
            return Err("increment_condition.statuses: give at least one [from, to] range".into());
        }
        for &(lo, hi) in &self.statuses {
            if !(100..=599).contains(&lo) || !(100..=599).contains(&hi) || lo > hi {
                return Err(format!(
                    "increment_condition.statuses: [{lo}, {hi}] is not a range of HTTP statuses (100 to 599, from <= to)"
                ));
            }
        }
        Ok(())
    }
}

/// Header and variable names a rate limit reports through (APIM's attributes).
#[derive(Debug, Clone, Default)]
pub struct ReportConfig {
    /// Header carrying the seconds to wait when refused; default `Retry-After`.
    pub retry_after_header_name: Option<String>,
    /// Variable set to the seconds to wait when refused.
    pub retry_after_variable_name: Option<String>,
    /// Header carrying the calls left in the window (on every response).
    pub remaining_calls_header_name: Option<String>,
    /// Variable set to the calls left in the window.
    pub remaining_calls_variable_name: Option<String>,
    /// Header carrying `calls` (on every response).
    pub total_calls_header_name: Option<String>,
}

impl ReportConfig {
    fn validate(&self) -> Result<(), String> {
        for (field, name) in [
            ("retry_after_header_name", &self.retry_after_header_name),
            (
                "remaining_calls_header_name",
                &self.remaining_calls_header_name,
            ),
            ("total_calls_header_name", &self.total_calls_header_name),
        ] {
            if let Some(n) = name {
                header_name(field, n)?;
            }
        }
        for (field, name) in [
            ("retry_after_variable_name", &self.retry_after_variable_name),
            (
                "remaining_calls_variable_name",
                &self.remaining_calls_variable_name,
            ),
        ] {
            if let Some(n) = name {
                variable_name(field, n)?;
            }
        }
        Ok(())
    }
}

/// `rate-limit` configuration.
#[derive(DeriveDeserialize, Debug, Clone)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Calls allowed per window.
    pub calls: u64,
    /// Window length in seconds.
    pub renewal_period: u64,
    /// Which requests of the subscription share the counter.
    #[serde(default)]
    pub counter_scope: CounterScope,
    /// Header carrying the seconds to wait when refused; default `Retry-After`.
    #[serde(default)]
    pub retry_after_header_name: Option<String>,
    /// Variable set to the seconds to wait when refused.
    #[serde(default)]
    pub retry_after_variable_name: Option<String>,
    /// Header carrying the calls left in the window (on every response).
    #[serde(default)]
    pub remaining_calls_header_name: Option<String>,
    /// Variable set to the calls left in the window.
    #[serde(default)]
    pub remaining_calls_variable_name: Option<String>,
    /// Header carrying `calls` (on every response).
    #[serde(default)]
    pub total_calls_header_name: Option<String>,
    /// The cache (`[[caches]]` name) holding shared counters; empty or left out: the default
    /// cache. Without that cache, counters are local to the gateway.
    #[serde(default)]
    pub counter_cache: String,
    /// `local` (default) or `fail-closed`.
    #[serde(default)]
    pub on_cache_failure: OnCacheFailure,
}

/// `rate-limit-by-key` configuration.
#[derive(DeriveDeserialize, Debug, Clone)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct RateLimitByKeyConfig {
    /// Calls allowed per window and key.
    pub calls: u64,
    /// Window length in seconds.
    pub renewal_period: u64,
    /// The key template.
    pub counter_key: String,
    /// Only responses matching this count the request.
    #[serde(default)]
    pub increment_condition: Option<IncrementCondition>,
    /// How much one request counts (default 1).
    #[serde(default = "one")]
    pub increment_count: u64,
    /// Header carrying the seconds to wait when refused; default `Retry-After`.
    #[serde(default)]
    pub retry_after_header_name: Option<String>,
    /// Variable set to the seconds to wait when refused.
    #[serde(default)]
    pub retry_after_variable_name: Option<String>,
    /// Header carrying the calls left in the window (on every response).
    #[serde(default)]
    pub remaining_calls_header_name: Option<String>,
    /// Variable set to the calls left in the window.
    #[serde(default)]
    pub remaining_calls_variable_name: Option<String>,
    /// Header carrying `calls` (on every response).
    #[serde(default)]
    pub total_calls_header_name: Option<String>,
    /// The cache (`[[caches]]` name) holding shared counters; empty or left out: the default
    /// cache. Without that cache, counters are local to the gateway.
    #[serde(default)]
    pub counter_cache: String,
    /// `local` (default) or `fail-closed`.
    #[serde(default)]
    pub on_cache_failure: OnCacheFailure,
}

/// `quota` configuration.
#[derive(DeriveDeserialize, Debug, Clone)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct QuotaConfig {
    /// Calls allowed per period.
    #[serde(default)]
    pub calls: Option<u64>,
    /// Kilobytes (1024 bytes) of request and response bodies allowed per period.
    #[serde(default)]
    pub bandwidth: Option<u64>,
    /// Period in seconds; 0: the quota never renews.
    pub renewal_period: u64,
    /// Which requests of the subscription share the counter.
    #[serde(default)]
    pub counter_scope: CounterScope,
    /// The cache (`[[caches]]` name) holding shared counters; empty or left out: the default
    /// cache. Without that cache, counters are local to the gateway.
    #[serde(default)]
    pub counter_cache: String,
    /// `local` (default) or `fail-closed`.
    #[serde(default)]
    pub on_cache_failure: OnCacheFailure,
}

/// `quota-by-key` configuration.
#[derive(DeriveDeserialize, Debug, Clone)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct QuotaByKeyConfig {
    /// Calls allowed per period and key.
    #[serde(default)]
    pub calls: Option<u64>,
    /// Kilobytes allowed per period and key.
    #[serde(default)]
    pub bandwidth: Option<u64>,
    /// Period in seconds; 0: the quota never renews.
    pub renewal_period: u64,
    /// The key template.
    pub counter_key: String,
    /// Only responses matching this count the call.
    #[serde(default)]
    pub increment_condition: Option<IncrementCondition>,
    /// The cache (`[[caches]]` name) holding shared counters; empty or left out: the default
    /// cache. Without that cache, counters are local to the gateway.
    #[serde(default)]
    pub counter_cache: String,
    /// `local` (default) or `fail-closed`.
    #[serde(default)]
    pub on_cache_failure: OnCacheFailure,
}

/// `limit-concurrency` configuration.
#[derive(DeriveDeserialize, Debug, Clone)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct LimitConcurrencyConfig {
    /// The key template: requests with the same key share the limit.
    pub key: String,
    /// Requests allowed in flight at once per key.
    pub max_count: u64,
}

macro_rules! report {
    ($($t:ty),*) => {$(
        impl $t {
            /// The header and variable names.
            pub fn report(&self) -> ReportConfig {
                ReportConfig {
                    retry_after_header_name: self.retry_after_header_name.clone(),
                    retry_after_variable_name: self.retry_after_variable_name.clone(),
                    remaining_calls_header_name: self.remaining_calls_header_name.clone(),
                    remaining_calls_variable_name: self.remaining_calls_variable_name.clone(),
                    total_calls_header_name: self.total_calls_header_name.clone(),
                }
            }
        }
    )*};
}
report!(RateLimitConfig, RateLimitByKeyConfig);

fn one() -> u64 {
    1
}

/// A validated limit, as the policies use it.
#[derive(Debug)]
pub struct Limits {
    /// Calls per window.
    pub calls: Option<u64>,
    /// Bytes per window.
    pub bytes: Option<u64>,
    /// Window length in milliseconds (0: never renews).
    pub period_ms: u64,
}

fn period(renewal_period: u64, zero_allowed: bool) -> Result<u64, String> {
    if renewal_period == 0 && !zero_allowed {
        return Err("renewal_period must be at least 1 second".into());
    }
    if renewal_period > MAX_PERIOD_SECS {
        return Err(format!(
            "renewal_period {renewal_period} is longer than {MAX_PERIOD_SECS} seconds (ten years)"
        ));
    }
    Ok(renewal_period * 1000)
}

fn calls(calls: u64) -> Result<u64, String> {
    if calls == 0 {
        return Err("calls must be at least 1".into());
    }
    if calls > i64::MAX as u64 {
        return Err(format!("calls {calls} is too large"));
    }
    Ok(calls)
}

/// Validates a rate limit's numbers.
pub fn rate(calls_: u64, renewal_period: u64, report: &ReportConfig) -> Result<Limits, String> {
    report.validate()?;
    Ok(Limits {
        calls: Some(calls(calls_)?),
        bytes: None,
        period_ms: period(renewal_period, false)?,
    })
}

/// Validates a quota's numbers.
pub fn quota(
    calls_: Option<u64>,
    bandwidth: Option<u64>,
    renewal_period: u64,
) -> Result<Limits, String> {
    if calls_.is_none() && bandwidth.is_none() {
        return Err("give calls, bandwidth (kilobytes), or both".into());
    }
    let calls_ = calls_.map(calls).transpose()?;
    let bytes = match bandwidth {
        Some(0) => return Err("bandwidth must be at least 1 (kilobyte)".into()),
        Some(kb) => Some(
            kb.checked_mul(1024)
                .filter(|&b| b <= i64::MAX as u64)
                .ok_or_else(|| format!("bandwidth {kb} is too large"))?,
        ),
        None => None,
    };
    Ok(Limits {
        calls: calls_,
        bytes,
        period_ms: period(renewal_period, true)?,
    })
}

/// Parses a key template, naming the field in the error.
pub fn template(field: &str, source: &str) -> Result<Template, String> {
    Template::parse(source).map_err(|e| format!("{field}: {e}"))
}

/// Validates the increment of a keyed rate limit.
pub fn increment(count: u64, calls: u64) -> Result<i64, String> {
    if count == 0 {
        return Err("increment_count must be at least 1".into());
    }
    if count > calls {
        return Err(format!(
            "increment_count {count} is larger than calls {calls}: every request would be refused"
        ));
    }
    Ok(count as i64)
}

/// Validates an increment condition, when there is one.
pub fn condition(c: Option<IncrementCondition>) -> Result<Option<IncrementCondition>, String> {
    if let Some(c) = &c {
        c.validate()?;
    }
    Ok(c)
}

fn header_name(field: &str, name: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("{field}: '{name}' is not a valid header name"));
    }
    Ok(())
}

fn variable_name(field: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{field}: the variable name is empty"));
    }
    if name.starts_with("outpost.") {
        return Err(format!(
            "{field}: '{name}' uses the 'outpost.' prefix, which is reserved for the gateway"
        ));
    }
    Ok(())
}

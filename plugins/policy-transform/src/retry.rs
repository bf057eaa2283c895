//! `retry`: asks the gateway to send the backend request again on chosen statuses or when
//! the backend cannot be reached, through the `outpost.retry` host property
//! (docs/host-properties.md).
//!
//! APIM's `retry` wraps child policies and re-runs them; Outpost retries the backend call
//! (APIM's most common use, `retry` around `forward-request`). The gateway resends only a
//! body it holds whole, so the policy first reads the request body (up to `max_body_bytes`);
//! a larger body is sent once, without retries.

use std::fmt;

use outpost_plugin_sdk::serde::de::{self, Deserializer, SeqAccess, Visitor};
use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::serde_json::json;
use outpost_plugin_sdk::{level, log, Context, Flow, Head, HostStatus, Policy, Token};

use crate::{yes, DEFAULT_MAX_BODY_BYTES};

/// Inclusive status range: `503` or `[500, 599]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange(u16, u16);

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StatusRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a status (503) or an inclusive range ([500, 599])")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StatusRange, E> {
                let s = u16::try_from(v).map_err(|_| E::custom(format!("{v} is not a status")))?;
                Ok(StatusRange(s, s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StatusRange, A::Error> {
                let lo = seq
                    .next_element::<u16>()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let hi = seq
                    .next_element::<u16>()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                if seq.next_element::<u16>()?.is_some() {
                    return Err(de::Error::invalid_length(3, &self));
                }
                Ok(StatusRange(lo, hi))
            }
        }
        d.deserialize_any(V)
    }
}

/// `condition`: when to retry.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct Condition {
    status_codes: Vec<StatusRange>,
}

/// `retry` configuration.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default)]
    condition: Option<Condition>,
    #[serde(default)]
    statuses: Option<Vec<StatusRange>>,
    count: u32,
    #[serde(default)]
    interval: Option<u64>,
    #[serde(default)]
    interval_ms: Option<u64>,
    #[serde(default)]
    max_interval: Option<u64>,
    #[serde(default)]
    max_interval_ms: Option<u64>,
    #[serde(default)]
    delta: Option<u64>,
    #[serde(default)]
    delta_ms: Option<u64>,
    #[serde(default)]
    first_fast_retry: bool,
    #[serde(default)]
    jitter: bool,
    #[serde(default = "yes")]
    on_connect_failure: bool,
    #[serde(default = "default_max_body_bytes")]
    max_body_bytes: u64,
}

fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}

/// The gateway's default `max_interval_ms`.
const DEFAULT_MAX_INTERVAL_MS: u64 = 30_000;

/// Sets the retry rule for the backend call (inbound and backend sections).
#[derive(Debug)]
pub struct Retry {
    /// The `outpost.retry` value, built once.
    rule: String,
    limit: u64,
}

/// One of two spellings of a duration (`name` in seconds, `name_ms`), in milliseconds.
fn millis(name: &str, secs: Option<u64>, ms: Option<u64>) -> Result<Option<u64>, String> {
    match (secs, ms) {
        (Some(_), Some(_)) => Err(format!("give `{name}` or `{name}_ms`, not both")),
        (Some(s), None) => s
            .checked_mul(1000)
            .map(Some)
            .ok_or_else(|| format!("{name}: too large")),
        (None, ms) => Ok(ms),
    }
}

/// Whether the request carries a body (HTTP/1.1 framing; an HTTP/2 body without
/// `Content-Length` counts as none, and the gateway then does not retry it).
fn has_body(req: &Head<'_, '_>) -> bool {
    match req.header("content-length") {
        Some(n) => n != b"0",
        None => req.header("transfer-encoding").is_some(),
    }
}

impl Retry {
    fn arm(&self, ctx: &mut Context<'_, '_>) -> Flow {
        ctx.set_variable("outpost.retry", &self.rule);
        Flow::CONTINUE
    }
}

impl Policy for Retry {
    type Config = RetryConfig;

    fn new(c: RetryConfig) -> Result<Self, String> {
        if !(1..=50).contains(&c.count) {
            return Err(format!("count: {} is not between 1 and 50", c.count));
        }
        let statuses = match (c.condition, c.statuses) {
            (Some(_), Some(_)) => return Err("give `condition` or `statuses`, not both".into()),
            (Some(cond), None) => cond.status_codes,
            (None, s) => s.unwrap_or_default(),
        };
        if let Some(StatusRange(lo, hi)) = statuses
            .iter()
            .find(|StatusRange(lo, hi)| lo > hi || *lo < 100 || *hi > 599)
        {
            return Err(format!(
                "status_codes: [{lo}, {hi}] is not a range of HTTP statuses (100-599, low first)"
            ));
        }
        if statuses.is_empty() && !c.on_connect_failure {
            return Err(
                "nothing to retry on: list status_codes, or keep on_connect_failure true".into(),
            );
        }
        let interval = millis("interval", c.interval, c.interval_ms)?;
        let max_interval = millis("max_interval", c.max_interval, c.max_interval_ms)?;
        let delta = millis("delta", c.delta, c.delta_ms)?;
        let exponential = delta.is_some_and(|d| d > 0);
        if exponential && max_interval.is_none() {
            return Err("delta: linear backoff (delta without max_interval) is not supported; give max_interval for exponential backoff".into());
        }
        // Outpost doubles the wait: APIM's `interval + (2^n - 1) * delta` with
        // delta = interval. Without an interval, delta is the first wait.
        let interval_ms = match (interval.unwrap_or(0), delta) {
            (0, Some(d)) if exponential => d,
            (i, _) => i,
        };
        let max_interval_ms = max_interval.unwrap_or(DEFAULT_MAX_INTERVAL_MS);
        if max_interval_ms < interval_ms {
            return Err(format!(
                "max_interval: {max_interval_ms} ms is less than the interval ({interval_ms} ms)"
            ));
        }
        if c.max_body_bytes == 0 {
            return Err("max_body_bytes: must be more than 0".into());
        }
        let ranges: Vec<[u16; 2]> = statuses.iter().map(|r| [r.0, r.1]).collect();
        let rule = json!({
            "count": c.count,
            "interval_ms": interval_ms,
            "max_interval_ms": max_interval_ms,
            "exponential": exponential,
            "jitter": c.jitter,
            "statuses": ranges,
            "on_connect_failure": c.on_connect_failure,
            "first_fast_retry": c.first_fast_retry,
        })
        .to_string();
        Ok(Retry {
            rule,
            limit: c.max_body_bytes,
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        if !has_body(req) {
            return self.arm(ctx);
        }
        let token = ctx.want_body(self.limit);
        ctx.set_slot(u64::from(token.0));
        Flow::PAUSE
    }

    fn on_resume(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let token = Token(u32::try_from(ctx.slot()).unwrap_or(0));
        let status = ctx.result(token).status;
        if status == HostStatus::OK {
            return self.arm(ctx);
        }
        if status == HostStatus::TOO_LARGE && outpost_plugin_sdk::host::log_enabled(level::DEBUG) {
            log(
                level::DEBUG,
                &format!(
                    "retry: the request body is larger than max_body_bytes ({}); it is sent once, without retries.",
                    self.limit
                ),
            );
        }
        Flow::CONTINUE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::serde_json::{self, Value};
    use outpost_plugin_sdk::testing::{
        on_request, on_resume, policy, TestAnswer, TestContext, TestHead, TestRequest,
    };

    fn rule(config: &str) -> Value {
        let p = policy::<Retry>(config).unwrap();
        let mut ctx = TestContext::default();
        assert_eq!(
            on_request(&p, &mut TestHead::request("GET", "/"), &mut ctx),
            Flow::CONTINUE
        );
        assert!(ctx.requests.is_empty(), "no body to read");
        serde_json::from_str(&ctx.variables["outpost.retry"]).unwrap()
    }

    #[test]
    fn apim_attributes_map_onto_the_gateway_rule() {
        // Fixed interval, APIM's seconds.
        assert_eq!(
            rule(r#"{"condition":{"status_codes":[[500,599],429]},"count":3,"interval":1}"#),
            serde_json::json!({"count":3,"interval_ms":1000,"max_interval_ms":30000,
                "exponential":false,"jitter":false,"statuses":[[500,599],[429,429]],
                "on_connect_failure":true,"first_fast_retry":false})
        );
        // Exponential: delta with max_interval; milliseconds spellings.
        assert_eq!(
            rule(
                r#"{"statuses":[503],"count":5,"interval_ms":100,"delta_ms":100,"max_interval_ms":2000,"jitter":true,"on_connect_failure":false}"#
            ),
            serde_json::json!({"count":5,"interval_ms":100,"max_interval_ms":2000,
                "exponential":true,"jitter":true,"statuses":[[503,503]],
                "on_connect_failure":false,"first_fast_retry":false})
        );
        // No interval: delta is the first wait.
        let r = rule(r#"{"count":2,"delta":1,"max_interval":10}"#);
        assert_eq!(
            (r["interval_ms"].as_u64(), r["max_interval_ms"].as_u64()),
            (Some(1000), Some(10000))
        );
        assert_eq!(r["statuses"], serde_json::json!([]));
        // APIM's first-fast-retry: the first retry does not wait.
        let r = rule(r#"{"count":2,"interval":1,"first_fast_retry":true}"#);
        assert_eq!(r["first_fast_retry"], true);
    }

    #[test]
    fn a_body_is_read_first_and_a_large_one_is_not_retried() {
        let p =
            policy::<Retry>(r#"{"statuses":[[500,599]],"count":2,"max_body_bytes":64}"#).unwrap();
        let mut req = TestHead::request("POST", "/").with_header("content-length", "5");
        let mut ctx = TestContext::default();
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::PAUSE);
        assert_eq!(ctx.requests, [TestRequest::Body { limit: 64 }]);
        assert!(ctx.variables.is_empty(), "armed only once the body is held");
        ctx.answer(Token(ctx.slot as u32), TestAnswer::value(b""));
        ctx.body = Some(b"hello".to_vec());
        assert_eq!(on_resume(&p, &mut req, &mut ctx), Flow::CONTINUE);
        assert!(ctx.variables.contains_key("outpost.retry"));

        let mut req = TestHead::request("POST", "/").with_header("transfer-encoding", "chunked");
        let mut ctx = TestContext::default();
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::PAUSE);
        let too_large = TestAnswer {
            status: HostStatus::TOO_LARGE.0,
            ..TestAnswer::default()
        };
        ctx.answer(Token(ctx.slot as u32), too_large);
        assert_eq!(on_resume(&p, &mut req, &mut ctx), Flow::CONTINUE);
        assert!(ctx.variables.is_empty(), "too large: no retries");

        // Content-Length: 0 is no body.
        let mut req = TestHead::request("POST", "/").with_header("content-length", "0");
        let mut ctx = TestContext::default();
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::CONTINUE);
        assert!(ctx.variables.contains_key("outpost.retry"));
    }

    #[test]
    fn bad_configs_are_refused() {
        for (config, needle) in [
            (
                r#"{"count":0,"statuses":[500]}"#,
                "count: 0 is not between 1 and 50",
            ),
            (r#"{"count":51,"statuses":[500]}"#, "count: 51"),
            (r#"{"statuses":[500]}"#, "count"),
            (r#"{"count":1,"statuses":[[599,500]]}"#, "[599, 500]"),
            (r#"{"count":1,"statuses":[700]}"#, "[700, 700]"),
            (r#"{"count":1,"statuses":[[1,2,3]]}"#, "invalid length 3"),
            (
                r#"{"count":1,"statuses":["500"]}"#,
                "a status (503) or an inclusive range",
            ),
            (
                r#"{"count":1,"statuses":[500],"condition":{"status_codes":[500]}}"#,
                "not both",
            ),
            (r#"{"count":1,"condition":{"status":[500]}}"#, "status"),
            (
                r#"{"count":1,"on_connect_failure":false}"#,
                "nothing to retry on",
            ),
            (
                r#"{"count":1,"interval":1,"interval_ms":5}"#,
                "`interval` or `interval_ms`",
            ),
            (r#"{"count":1,"delta":1}"#, "linear backoff"),
            (
                r#"{"count":1,"interval":5,"max_interval":1,"delta":1}"#,
                "max_interval: 1000 ms is less",
            ),
            (r#"{"count":1,"max_body_bytes":0}"#, "max_body_bytes"),
            (r#"{"count":1,"tries":2}"#, "tries"),
        ] {
            let e = policy::<Retry>(config).err().unwrap();
            assert!(e.message.contains(needle), "{config}: {}", e.message);
        }
    }
}

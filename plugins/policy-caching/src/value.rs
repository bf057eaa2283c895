//! `cache-lookup-value`, `cache-store-value`, `cache-remove-value`: values under keys built
//! from the request. Their keys live under `value:` in the cache, apart from responses.

use std::time::Duration;

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::template::Template;
use outpost_plugin_sdk::{Context, Flow, Head, Metric, Policy, Token};

use crate::{errors_metric, failed, unavailable, with_scratch, CachingType, Outcome, Target};

/// What every value step shares: its key, its cache and what a failure does.
struct Step {
    policy: &'static str,
    key: Template,
    target: Target,
    fail_closed: bool,
    errors: Metric,
}

impl Step {
    fn new(
        policy: &'static str,
        key: &str,
        cache: Option<String>,
        caching_type: CachingType,
        fail_closed: bool,
    ) -> Result<Step, String> {
        if key.is_empty() {
            return Err("key: must not be empty".into());
        }
        Ok(Step {
            policy,
            key: Template::parse(key).map_err(|e| format!("key: {e}"))?,
            target: Target::new(cache, caching_type),
            fail_closed,
            errors: errors_metric(),
        })
    }

    fn render_key(&self, head: &Head<'_, '_>, ctx: &Context<'_, '_>, out: &mut String) {
        out.push_str("value:");
        self.key.render(head, ctx, out);
    }

    /// After the work: `Ok(outcome)`, or the flow to return when the cache failed.
    fn finish(&self, ctx: &mut Context<'_, '_>, token: Token) -> Result<Outcome, Flow> {
        let result = ctx.result(token);
        let outcome = self.target.outcome(result.status);
        if outcome == Outcome::Failed {
            let why = result.error.as_str().to_owned();
            failed(self.errors, self.policy, &self.target, ctx, &why);
            if self.fail_closed {
                return Err(unavailable(ctx, &self.target));
            }
        }
        Ok(outcome)
    }
}

fn variable_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("variable_name: must not be empty".into());
    }
    if name.starts_with("outpost.") {
        return Err(format!(
            "variable_name: '{name}' uses the prefix 'outpost.', reserved for the gateway"
        ));
    }
    Ok(())
}

/// `cache-lookup-value` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct CacheLookupValueConfig {
    /// The key (a template).
    pub key: String,
    /// The variable that receives the value.
    pub variable_name: String,
    /// The variable's value when the key is not in the cache (or the cache fails); without
    /// it the variable is left unset.
    #[serde(default)]
    pub default_value: Option<String>,
    /// Which cache (APIM's `caching-type`).
    #[serde(default)]
    pub caching_type: CachingType,
    /// The cache's name.
    #[serde(default)]
    pub cache: Option<String>,
    /// A failing cache answers 503 instead of the default value.
    #[serde(default)]
    pub fail_closed: bool,
}

/// Reads a value into a variable.
pub struct CacheLookupValue {
    step: Step,
    variable: Box<str>,
    default: Option<Box<str>>,
}

impl CacheLookupValue {
    fn start(&self, head: &Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        with_scratch(|key, _| {
            self.step.render_key(head, ctx, key);
            let token = ctx.cache_get(&self.step.target.name, key.as_bytes());
            ctx.set_slot(u64::from(token.0));
        });
        Flow::PAUSE
    }
}

impl Policy for CacheLookupValue {
    type Config = CacheLookupValueConfig;

    fn new(c: CacheLookupValueConfig) -> Result<Self, String> {
        variable_name(&c.variable_name)?;
        Ok(CacheLookupValue {
            step: Step::new(
                "cache-lookup-value",
                &c.key,
                c.cache,
                c.caching_type,
                c.fail_closed,
            )?,
            variable: c.variable_name.into(),
            default: c.default_value.map(Into::into),
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.start(req, ctx)
    }

    fn on_response(&self, resp: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.start(resp, ctx)
    }

    fn on_resume(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let token = Token(ctx.slot() as u32);
        match self.step.finish(ctx, token) {
            Err(flow) => flow,
            Ok(Outcome::Ok) => {
                let value =
                    String::from_utf8_lossy(ctx.result(token).value.as_slice()).into_owned();
                ctx.set_variable(&self.variable, &value);
                Flow::CONTINUE
            }
            Ok(_) => {
                if let Some(d) = &self.default {
                    ctx.set_variable(&self.variable, d);
                }
                Flow::CONTINUE
            }
        }
    }
}

/// `cache-store-value` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct CacheStoreValueConfig {
    /// The key (a template).
    pub key: String,
    /// The value (a template).
    pub value: String,
    /// Seconds the value lives.
    pub duration: u64,
    /// Which cache (APIM's `caching-type`).
    #[serde(default)]
    pub caching_type: CachingType,
    /// The cache's name.
    #[serde(default)]
    pub cache: Option<String>,
    /// A failing cache answers 503 instead of carrying on.
    #[serde(default)]
    pub fail_closed: bool,
}

/// Stores a value.
pub struct CacheStoreValue {
    step: Step,
    value: Template,
    ttl: Duration,
}

impl CacheStoreValue {
    fn start(&self, head: &Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        with_scratch(|key, value| {
            self.step.render_key(head, ctx, key);
            self.value.render(head, ctx, value);
            let token = ctx.cache_set(
                &self.step.target.name,
                key.as_bytes(),
                value.as_bytes(),
                self.ttl,
            );
            ctx.set_slot(u64::from(token.0));
        });
        Flow::PAUSE
    }
}

impl Policy for CacheStoreValue {
    type Config = CacheStoreValueConfig;

    fn new(c: CacheStoreValueConfig) -> Result<Self, String> {
        crate::check_duration("duration", c.duration)?;
        Ok(CacheStoreValue {
            step: Step::new(
                "cache-store-value",
                &c.key,
                c.cache,
                c.caching_type,
                c.fail_closed,
            )?,
            value: Template::parse(&c.value).map_err(|e| format!("value: {e}"))?,
            ttl: Duration::from_secs(c.duration),
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.start(req, ctx)
    }

    fn on_response(&self, resp: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.start(resp, ctx)
    }

    fn on_resume(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let token = Token(ctx.slot() as u32);
        match self.step.finish(ctx, token) {
            Err(flow) => flow,
            Ok(_) => Flow::CONTINUE,
        }
    }
}

/// `cache-remove-value` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct CacheRemoveValueConfig {
    /// The key (a template).
    pub key: String,
    /// Which cache (APIM's `caching-type`).
    #[serde(default)]
    pub caching_type: CachingType,
    /// The cache's name.
    #[serde(default)]
    pub cache: Option<String>,
    /// A failing cache answers 503 instead of carrying on.
    #[serde(default)]
    pub fail_closed: bool,
}

/// Removes a value.
pub struct CacheRemoveValue {
    step: Step,
}

impl CacheRemoveValue {
    fn start(&self, head: &Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        with_scratch(|key, _| {
            self.step.render_key(head, ctx, key);
            let token = ctx.cache_delete(&self.step.target.name, key.as_bytes());
            ctx.set_slot(u64::from(token.0));
        });
        Flow::PAUSE
    }
}

impl Policy for CacheRemoveValue {
    type Config = CacheRemoveValueConfig;

    fn new(c: CacheRemoveValueConfig) -> Result<Self, String> {
        Ok(CacheRemoveValue {
            step: Step::new(
                "cache-remove-value",
                &c.key,
                c.cache,
                c.caching_type,
                c.fail_closed,
            )?,
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.start(req, ctx)
    }

    fn on_response(&self, resp: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.start(resp, ctx)
    }

    fn on_resume(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let token = Token(ctx.slot() as u32);
        match self.step.finish(ctx, token) {
            Err(flow) => flow,
            Ok(_) => Flow::CONTINUE,
        }
    }
}

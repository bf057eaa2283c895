//! `cache-lookup` and `cache-store`: response caching.
//!
//! `cache-lookup` builds the request's key, asks the cache, and on a hit answers with the
//! stored response. On a miss it leaves the key (with the cache's name and its settings) in
//! the variable [`PENDING`] for `cache-store`, which reads the backend's response body and
//! stores the response when it may.

use std::time::Duration;

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{host, Context, Flow, Head, HostStatus, Metric, Policy, Token};

use crate::control::Directives;
use crate::entry::{Entry, Stored};
use crate::{errors_metric, failed, unavailable, CachingType, Outcome, Target};

/// The variable through which `cache-lookup` hands a miss to `cache-store`: four flag
/// characters, the cache's name, a line feed, the key. Empty: nothing to store.
pub const PENDING: &str = "policy-caching.pending";

/// What `Cache-Control` a cached response tells the client (APIM's
/// `downstream-caching-type`).
#[derive(Deserialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
#[serde(crate = "outpost_plugin_sdk::serde", rename_all = "snake_case")]
pub enum DownstreamCachingType {
    /// The backend's own `Cache-Control` (if any) is passed on.
    #[default]
    None,
    /// `Cache-Control: private, max-age=<seconds left>`.
    Private,
    /// `Cache-Control: public, max-age=<seconds left>`.
    Public,
}

impl DownstreamCachingType {
    fn flag(self) -> char {
        match self {
            Self::None => 'n',
            Self::Private => 'p',
            Self::Public => 'u',
        }
    }

    fn from_flag(c: u8) -> Self {
        match c {
            b'p' => Self::Private,
            b'u' => Self::Public,
            _ => Self::None,
        }
    }

    /// The header value for a response fresh for `secs` more seconds.
    fn header(self, secs: u64, must_revalidate: bool) -> Option<String> {
        let kind = match self {
            Self::None => return None,
            Self::Private => "private",
            Self::Public => "public",
        };
        let revalidate = if must_revalidate {
            ", must-revalidate"
        } else {
            ""
        };
        Some(format!("{kind}, max-age={secs}{revalidate}"))
    }
}

/// `cache-lookup` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct CacheLookupConfig {
    /// Separate entries per subscription (APIM: per developer).
    #[serde(default)]
    pub vary_by_developer: bool,
    /// Request headers whose values separate entries.
    #[serde(default)]
    pub vary_by_header: Vec<String>,
    /// Query parameters whose values separate entries; `["*"]`: all of them.
    #[serde(default)]
    pub vary_by_query_parameter: Vec<String>,
    /// Cache requests that carry `Authorization`, and responses marked `private`.
    #[serde(default)]
    pub allow_private_response_caching: bool,
    /// What `Cache-Control` clients get.
    #[serde(default)]
    pub downstream_caching_type: DownstreamCachingType,
    /// Add `must-revalidate` to that `Cache-Control`.
    #[serde(default = "yes")]
    pub must_revalidate: bool,
    /// Which cache (APIM's `caching-type`).
    #[serde(default)]
    pub caching_type: CachingType,
    /// The cache's name (`[[caches]] name`); default: see `caching_type`.
    #[serde(default)]
    pub cache: Option<String>,
    /// A failing cache answers 503 instead of letting the request through to the backend.
    #[serde(default)]
    pub fail_closed: bool,
}

fn yes() -> bool {
    true
}

impl Default for CacheLookupConfig {
    fn default() -> Self {
        CacheLookupConfig {
            vary_by_developer: false,
            vary_by_header: Vec::new(),
            vary_by_query_parameter: Vec::new(),
            allow_private_response_caching: false,
            downstream_caching_type: DownstreamCachingType::None,
            must_revalidate: true,
            caching_type: CachingType::PreferExternal,
            cache: None,
            fail_closed: false,
        }
    }
}

/// Which query parameters separate entries.
enum QueryVary {
    Names(Box<[Box<str>]>),
    All,
}

/// Answers `GET` requests from the cache.
pub struct CacheLookup {
    vary_headers: Box<[Box<str>]>,
    vary_query: QueryVary,
    vary_by_developer: bool,
    allow_private: bool,
    downstream: DownstreamCachingType,
    must_revalidate: bool,
    target: Target,
    fail_closed: bool,
    errors: Metric,
    /// The flags part of [`PENDING`].
    flags: [u8; 4],
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Appends header bytes so that distinct values stay distinct: visible ASCII as it is, any
/// other byte (and `%`) percent-encoded.
fn push_escaped(out: &mut String, v: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in v {
        if (b' '..=b'~').contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

/// Query parameters as sent: (name, value) pairs, a name without `=` having an empty value.
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// Replaces key material with its digest: cache key names never carry the material
/// (credentials, subscription keys in queries) and stay short whatever the request.
pub(crate) fn digest_key(material: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = ring::digest::digest(&ring::digest::SHA256, material.as_bytes());
    material.clear();
    material.push_str("resp:");
    for b in &digest.as_ref()[..20] {
        material.push(char::from(HEX[usize::from(b >> 4)]));
        material.push(char::from(HEX[usize::from(b & 15)]));
    }
}

impl CacheLookup {
    /// The request's key: API, operation, method, path, then what the step varies by.
    fn key(&self, req: &Head<'_, '_>, ctx: &Context<'_, '_>, out: &mut String) {
        for part in [ctx.api_id(), ctx.operation_id(), req.method()] {
            out.push_str(part);
            out.push('\n');
        }
        out.push_str(req.path());
        let push_pair = |out: &mut String, n: &str, v: &str| {
            out.push_str("\nq:");
            out.push_str(n);
            out.push('=');
            out.push_str(v);
        };
        match &self.vary_query {
            QueryVary::Names(names) => {
                for name in names.iter() {
                    for (n, v) in query_pairs(req.query()).filter(|(n, _)| *n == &**name) {
                        push_pair(out, n, v);
                    }
                }
            }
            QueryVary::All => {
                // The order of names does not matter (`?a=1&b=2` and `?b=2&a=1` are one
                // entry); the order of a name's values does (a stable sort by name).
                let mut pairs: Vec<(&str, &str)> = query_pairs(req.query()).collect();
                pairs.sort_by(|a, b| a.0.cmp(b.0));
                for (n, v) in pairs {
                    push_pair(out, n, v);
                }
            }
        }
        for name in self.vary_headers.iter() {
            out.push_str("\nh:");
            out.push_str(name);
            for (i, v) in req.header_values(name).enumerate() {
                out.push(if i == 0 { '=' } else { ',' });
                push_escaped(out, v);
            }
        }
        if self.vary_by_developer {
            out.push_str("\nd:");
            out.push_str(ctx.subscription_id());
        }
        if self.allow_private {
            // Private responses are cached per caller, never shared between credentials.
            out.push_str("\na:");
            for v in req.header_values("authorization") {
                push_escaped(out, v);
                out.push(',');
            }
        }
        digest_key(out);
    }

    fn hit(&self, data: &[u8], ctx: &mut Context<'_, '_>) -> Option<Flow> {
        let entry = Entry::decode(data)?;
        let now = host::now_unix_ms();
        if entry.expires_ms <= now {
            return None; // the cache kept it a little longer than we would
        }
        ctx.respond(entry.status, entry.body);
        let downstream = self.downstream.header(
            (entry.expires_ms - now).div_ceil(1000),
            self.must_revalidate,
        );
        for (name, value) in entry.headers() {
            if downstream.is_none() || name != "cache-control" {
                ctx.respond_header(name, value);
            }
        }
        let mut age = itoa::Buffer::new();
        let age = age.format(now.saturating_sub(entry.stored_ms) / 1000);
        ctx.respond_header("age", age.as_bytes());
        if let Some(cc) = downstream {
            ctx.respond_header("cache-control", cc.as_bytes());
        }
        ctx.set_cache_status("hit");
        Some(Flow::RESPOND)
    }
}

impl Policy for CacheLookup {
    /// Every field is optional: a step without `config` (JSON `null`) takes the defaults.
    type Config = Option<CacheLookupConfig>;

    fn new(c: Option<CacheLookupConfig>) -> Result<Self, String> {
        let c = c.unwrap_or_default();
        let mut vary_headers = Vec::new();
        for h in &c.vary_by_header {
            if !is_token(h) {
                return Err(format!("vary_by_header: '{h}' is not a valid header name"));
            }
            let h = h.to_ascii_lowercase();
            if !vary_headers.contains(&h) {
                vary_headers.push(h);
            }
        }
        let vary_query = if c.vary_by_query_parameter.iter().any(|q| q == "*") {
            if c.vary_by_query_parameter.len() > 1 {
                return Err("vary_by_query_parameter: \"*\" (all parameters) must be alone".into());
            }
            QueryVary::All
        } else {
            let mut names: Vec<Box<str>> = Vec::new();
            for q in &c.vary_by_query_parameter {
                if q.is_empty() || q.contains(['&', '=', '#']) {
                    return Err(format!(
                        "vary_by_query_parameter: '{q}' is not a query parameter name"
                    ));
                }
                if !names.iter().any(|n| **n == **q) {
                    names.push(q.as_str().into());
                }
            }
            QueryVary::Names(names.into())
        };
        if c.cache.as_deref().is_some_and(|n| n.contains('\n')) {
            return Err("cache: not a cache name".into());
        }
        let target = Target::new(c.cache, c.caching_type);
        let bit = |b: bool| if b { b'1' } else { b'0' };
        Ok(CacheLookup {
            vary_headers: vary_headers.into_iter().map(Into::into).collect(),
            vary_query,
            vary_by_developer: c.vary_by_developer,
            allow_private: c.allow_private_response_caching,
            downstream: c.downstream_caching_type,
            must_revalidate: c.must_revalidate,
            flags: [
                c.downstream_caching_type.flag() as u8,
                bit(c.must_revalidate),
                bit(c.allow_private_response_caching),
                bit(target.required),
            ],
            target,
            fail_closed: c.fail_closed,
            errors: errors_metric(),
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        if req.method() != "GET" {
            return Flow::CONTINUE;
        }
        if !self.allow_private && req.header("authorization").is_some() {
            ctx.set_cache_status("bypass");
            return Flow::CONTINUE;
        }
        let mut cc = Directives::parse(req.header_values("cache-control"));
        if req
            .header_values("pragma")
            .any(|v| v.trim_ascii().eq_ignore_ascii_case(b"no-cache"))
        {
            cc.no_cache = true;
        }
        if cc.no_store {
            ctx.set_cache_status("bypass");
            return Flow::CONTINUE;
        }
        crate::with_scratch(|key, var| {
            self.key(req, ctx, key);
            var.extend(self.flags.iter().map(|&b| char::from(b)));
            var.push_str(&self.target.name);
            var.push('\n');
            // The headers the key varies by: cache-store refuses responses that vary by others.
            for (i, h) in self.vary_headers.iter().enumerate() {
                if i > 0 {
                    var.push(',');
                }
                var.push_str(h);
            }
            var.push('\n');
            var.push_str(key);
            ctx.set_variable(PENDING, var);
            if cc.no_cache {
                // The client wants a fresh answer: fetch it, and store it for others.
                ctx.set_cache_status("bypass");
                return Flow::CONTINUE;
            }
            let token = ctx.cache_get(&self.target.name, key.as_bytes());
            ctx.set_slot(u64::from(token.0));
            Flow::PAUSE
        })
    }

    fn on_resume(&self, _req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let token = Token(ctx.slot() as u32);
        let result = ctx.result(token);
        let (status, error) = (result.status, result.error.as_str());
        match self.target.outcome(status) {
            Outcome::Ok => {
                let data = result.value.as_slice().to_vec();
                if let Some(flow) = self.hit(&data, ctx) {
                    return flow;
                }
                if Entry::decode(&data).is_none() {
                    failed(
                        self.errors,
                        "cache-lookup",
                        &self.target,
                        ctx,
                        "the entry is not a cached response",
                    );
                }
                ctx.set_cache_status("miss");
            }
            Outcome::Miss => ctx.set_cache_status("miss"),
            Outcome::Absent => ctx.set_variable(PENDING, ""),
            Outcome::Failed => {
                let why = if status == HostStatus::NOT_CONFIGURED {
                    "not configured on this gateway".to_owned()
                } else {
                    error.to_owned()
                };
                failed(self.errors, "cache-lookup", &self.target, ctx, &why);
                // Storing would fail the same way and cost the client another deadline.
                ctx.set_variable(PENDING, "");
                if self.fail_closed {
                    return unavailable(ctx, &self.target);
                }
                ctx.set_cache_status("miss");
            }
        }
        Flow::CONTINUE
    }
}

/// `cache-store` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct CacheStoreConfig {
    /// Seconds an entry lives (at most: the response's `s-maxage` or `max-age` may say less).
    pub duration: u64,
    /// Store responses of any status, not only `200`.
    #[serde(default)]
    pub cache_response: bool,
    /// Larger response bodies are not stored.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
}

fn default_max_body_bytes() -> u64 {
    1024 * 1024
}

/// Stores the backend's response after a `cache-lookup` miss.
pub struct CacheStore {
    duration: u64,
    cache_response: bool,
    max_body_bytes: u64,
    errors: Metric,
}

/// What `cache-lookup` handed over.
struct Pending<'v> {
    downstream: DownstreamCachingType,
    must_revalidate: bool,
    allow_private: bool,
    required: bool,
    cache: &'v str,
    /// Header names (lower case, comma-separated) the key varies by.
    varied: &'v str,
    key: &'v str,
}

impl<'v> Pending<'v> {
    fn target(&self) -> Target {
        Target {
            name: self.cache.into(),
            required: self.required,
        }
    }

    fn read(ctx: &'v Context<'_, '_>) -> Option<Pending<'v>> {
        let v = ctx.variable(PENDING)?;
        let (flags, rest) = (v.as_bytes().get(..4)?, v.get(4..)?);
        let (cache, rest) = rest.split_once('\n')?;
        let (varied, key) = rest.split_once('\n')?;
        Some(Pending {
            downstream: DownstreamCachingType::from_flag(flags[0]),
            must_revalidate: flags[1] == b'1',
            allow_private: flags[2] == b'1',
            required: flags[3] == b'1',
            cache,
            varied,
            key,
        })
    }
}

/// Slot: state in bits 62–63, TTL seconds in bits 32–61, token in bits 0–31.
const READING: u64 = 1;
const STORING: u64 = 2;

fn slot(state: u64, ttl: u64, token: Token) -> u64 {
    state << 62 | (ttl & ((1 << 30) - 1)) << 32 | u64::from(token.0)
}

fn unslot(s: u64) -> (u64, u64, Token) {
    (s >> 62, (s >> 32) & ((1 << 30) - 1), Token(s as u32))
}

/// Response headers that are not stored: hop-by-hop, recomputed, or about this exchange only.
fn storable(name: &str) -> bool {
    !matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "age"
            | "date"
            | "set-cookie"
            | "x-request-id"
    )
}

impl Policy for CacheStore {
    type Config = CacheStoreConfig;

    fn new(c: CacheStoreConfig) -> Result<Self, String> {
        crate::check_duration("duration", c.duration)?;
        if c.max_body_bytes == 0 {
            return Err("max_body_bytes: must be positive".into());
        }
        Ok(CacheStore {
            duration: c.duration,
            cache_response: c.cache_response,
            max_body_bytes: c.max_body_bytes,
            errors: errors_metric(),
        })
    }

    fn on_response(&self, resp: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let Some(p) = Pending::read(ctx) else {
            return Flow::CONTINUE; // no lookup, a hit, or a failing cache
        };
        let status = resp.status();
        if !(status == 200 || self.cache_response && (200..=599).contains(&status) && status != 206)
        {
            return Flow::CONTINUE;
        }
        let cc = Directives::parse(resp.header_values("cache-control"));
        if cc.no_store || cc.no_cache || cc.private && !p.allow_private {
            return Flow::CONTINUE;
        }
        // Another client's cookie, or a response that varies on everything or on a request
        // header the key does not hold (Accept-Encoding, Cookie, …): never shared.
        if resp.header("set-cookie").is_some()
            || resp.header_values("vary").any(|v| {
                v.split(|&b| b == b',').any(|t| {
                    let t = t.trim_ascii();
                    !t.is_empty()
                        && !p
                            .varied
                            .split(',')
                            .any(|h| h.as_bytes().eq_ignore_ascii_case(t))
                })
            })
        {
            return Flow::CONTINUE;
        }
        let ttl = cc
            .shared_max_age()
            .map_or(self.duration, |m| m.min(self.duration));
        if ttl == 0 {
            return Flow::CONTINUE;
        }
        let token = ctx.want_body(self.max_body_bytes);
        ctx.set_slot(slot(READING, ttl, token));
        Flow::PAUSE
    }

    fn on_resume(&self, resp: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let (state, ttl, token) = unslot(ctx.slot());
        match state {
            READING => {
                if !ctx.ok(token) {
                    return Flow::CONTINUE; // larger than max_body_bytes: not stored
                }
                let Some(p) = Pending::read(ctx) else {
                    return Flow::CONTINUE;
                };
                let now = host::now_unix_ms();
                let stored = Stored {
                    status: resp.status(),
                    stored_ms: now,
                    expires_ms: now.saturating_add(ttl * 1000),
                };
                let headers = || resp.headers().filter(|(n, _)| storable(n));
                let Some(entry) = stored.encode(headers, ctx.body().unwrap_or_default()) else {
                    return Flow::CONTINUE;
                };
                let downstream = p.downstream.header(ttl, p.must_revalidate);
                let (cache, key) = (p.cache.to_owned(), p.key.to_owned());
                if let Some(cc) = downstream {
                    resp.set_header("cache-control", cc.as_bytes());
                }
                let token = ctx.cache_set(&cache, key.as_bytes(), &entry, Duration::from_secs(ttl));
                ctx.set_slot(slot(STORING, ttl, token));
                Flow::PAUSE
            }
            STORING => {
                let status = ctx.result(token).status;
                let Some(p) = Pending::read(ctx) else {
                    return Flow::CONTINUE;
                };
                let target = p.target();
                if target.outcome(status) == Outcome::Failed {
                    let why = ctx.result(token).error.as_str().to_owned();
                    failed(self.errors, "cache-store", &target, ctx, &why);
                }
                Flow::CONTINUE
            }
            _ => Flow::CONTINUE,
        }
    }
}

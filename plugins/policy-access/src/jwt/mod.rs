//! `validate-jwt`: validates a JSON Web Token and hands its claims to later policies.
//!
//! Keys come from the configuration (`issuer_signing_keys`) and/or from the network:
//! `jwks_uri`, or `openid_config_url` whose document names the `jwks_uri`. Fetched keys live in
//! the instance behind a `RwLock` (read per request, written only when a fetch completes). A
//! request fetches — through the host's HTTP callout, pausing — when:
//!
//! * no key set was ever fetched (concurrent first requests may each fetch; after a failed
//!   fetch, no new one for `min_refresh_interval_s`);
//! * the key set is older than `refresh_interval_s` (one request fetches, the others keep using
//!   the current keys);
//! * the token names a `kid` no key has, at most once per `min_refresh_interval_s`, so a flood
//!   of made-up key ids cannot hammer the identity provider.
//!
//! A failed fetch keeps the keys already known.

mod keys;
mod token;

#[cfg(test)]
mod tests;

use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{
    host, level, Callout, Context, Flow, Head, HostStatus, Policy, Token as HostToken,
};

pub use keys::KeyConfig;
use keys::{parse_jwks, parse_openid_configuration, Key};
use token::{variable_value, Alg, ClaimRules, Failure, Token};
pub use token::{ClaimMatch, RequiredClaim};

use crate::{check_status, refuse};

/// The most claims copied into `jwt.<claim>` variables.
const MAX_OUTPUT_CLAIMS: usize = 32;

/// Claims output before any other (within [`MAX_OUTPUT_CLAIMS`]).
const PRIORITY_CLAIMS: [&str; 16] = [
    "sub",
    "iss",
    "aud",
    "azp",
    "client_id",
    "appid",
    "tid",
    "oid",
    "upn",
    "email",
    "preferred_username",
    "name",
    "scope",
    "scp",
    "roles",
    "groups",
];

/// The algorithms accepted when `algorithms` is not given.
const ALL_ALGORITHMS: [Algorithm; 12] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::EdDSA,
];

/// `validate-jwt` configuration (every field is described in the README).
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct ValidateJwtConfig {
    #[serde(default)]
    header_name: Option<String>,
    #[serde(default = "default_scheme", alias = "scheme")]
    require_scheme: Option<String>,
    #[serde(default)]
    query_parameter_name: Option<String>,
    #[serde(default = "default_code")]
    failed_validation_httpcode: u16,
    #[serde(default)]
    failed_validation_error_message: Option<String>,
    #[serde(default = "yes")]
    require_expiration_time: bool,
    #[serde(default = "yes")]
    require_signed_tokens: bool,
    #[serde(default)]
    clock_skew_s: u32,
    #[serde(default)]
    issuers: Vec<String>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    required_claims: Vec<RequiredClaim>,
    #[serde(default)]
    algorithms: Vec<String>,
    #[serde(default)]
    issuer_signing_keys: Vec<KeyConfig>,
    #[serde(default)]
    jwks_uri: Option<String>,
    #[serde(default)]
    openid_config_url: Option<String>,
    #[serde(default = "default_refresh")]
    refresh_interval_s: u64,
    #[serde(default = "default_min_refresh")]
    min_refresh_interval_s: u64,
    #[serde(default)]
    fetch_timeout_ms: Option<u64>,
    #[serde(default = "yes")]
    output_claims: bool,
}

fn default_scheme() -> Option<String> {
    Some("Bearer".into())
}

fn default_code() -> u16 {
    401
}

fn yes() -> bool {
    true
}

fn default_refresh() -> u64 {
    3600
}

fn default_min_refresh() -> u64 {
    30
}

/// Where the token is.
enum Source {
    /// A header, with the scheme that must precede the token (none: the whole value).
    Header {
        name: String,
        scheme: Option<String>,
    },
    /// A query parameter.
    Query(String),
}

/// Where keys are fetched from.
enum Remote {
    Jwks(String),
    OpenId(String),
}

/// Fetched keys and the fetch bookkeeping.
#[derive(Default)]
struct KeyState {
    keys: Vec<Key>,
    /// When the current keys arrived (monotonic ns); `None` before the first success.
    fetched_ns: Option<u64>,
    /// When the last fetch started.
    attempt_ns: Option<u64>,
    /// Why the last fetch failed (cleared by a success).
    error: Option<String>,
}

/// Validates JSON Web Tokens.
pub struct ValidateJwt {
    source: Source,
    status: u16,
    message: Option<String>,
    require_signed: bool,
    algorithms: Vec<Algorithm>,
    rules: ClaimRules,
    keys: Vec<Key>,
    remote: Option<Remote>,
    state: RwLock<KeyState>,
    refresh_ns: u64,
    min_refresh_ns: u64,
    fetch_timeout: Option<Duration>,
    output_claims: bool,
}

/// Host work stages, kept in the slot's high half (the token in the low half).
const STAGE_OPENID: u64 = 1;
const STAGE_JWKS: u64 = 2;

/// Checks a URL the host will call.
fn check_url(field: &str, url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{field}: '{url}' is not an absolute http(s) URL"))?;
    if rest.is_empty() || rest.starts_with('/') || url.chars().any(char::is_whitespace) {
        return Err(format!("{field}: '{url}' is not an absolute http(s) URL"));
    }
    Ok(())
}

/// Monotonic time in nanoseconds (tests move it forward).
fn now_ns() -> u64 {
    let n = host::monotonic_ns();
    #[cfg(test)]
    let n = n + tests::clock_offset_ns();
    n
}

fn within(t: Option<u64>, now: u64, interval: u64) -> bool {
    t.is_some_and(|t| now.saturating_sub(t) < interval)
}

impl Policy for ValidateJwt {
    type Config = ValidateJwtConfig;

    fn new(c: ValidateJwtConfig) -> Result<Self, String> {
        check_status("failed_validation_httpcode", c.failed_validation_httpcode)?;
        let source = match (c.header_name, c.query_parameter_name) {
            (Some(_), Some(_)) => {
                return Err("give header_name or query_parameter_name, not both".into())
            }
            (_, Some(q)) if q.is_empty() => {
                return Err("query_parameter_name must not be empty".into())
            }
            (_, Some(q)) => Source::Query(q),
            (h, None) => {
                let name = h.unwrap_or_else(|| "Authorization".into());
                if name.is_empty() {
                    return Err("header_name must not be empty".into());
                }
                Source::Header {
                    name,
                    scheme: c.require_scheme.filter(|s| !s.is_empty()),
                }
            }
        };
        let algorithms = if c.algorithms.is_empty() {
            ALL_ALGORITHMS.to_vec()
        } else {
            c.algorithms
                .iter()
                .map(|a| {
                    a.parse::<Algorithm>().map_err(|_| {
                        format!(
                            "algorithms: '{a}' is not supported (RS256/384/512, PS256/384/512, \
                             ES256/384, HS256/384/512, EdDSA)"
                        )
                    })
                })
                .collect::<Result<_, _>>()?
        };
        let keys = c
            .issuer_signing_keys
            .into_iter()
            .enumerate()
            .map(|(i, k)| Key::from_config(i, k))
            .collect::<Result<Vec<_>, _>>()?;
        let remote = match (c.jwks_uri, c.openid_config_url) {
            (Some(_), Some(_)) => return Err("give jwks_uri or openid_config_url, not both".into()),
            (Some(u), None) => {
                check_url("jwks_uri", &u)?;
                Some(Remote::Jwks(u))
            }
            (None, Some(u)) => {
                check_url("openid_config_url", &u)?;
                Some(Remote::OpenId(u))
            }
            (None, None) => None,
        };
        if keys.is_empty() && remote.is_none() && c.require_signed_tokens {
            return Err(
                "no signing keys: give issuer_signing_keys, jwks_uri or openid_config_url".into(),
            );
        }
        if c.refresh_interval_s == 0 {
            return Err("refresh_interval_s must be at least 1".into());
        }
        for (i, rc) in c.required_claims.iter().enumerate() {
            if rc.name.is_empty() {
                return Err(format!("required_claims[{i}].name must not be empty"));
            }
        }
        Ok(ValidateJwt {
            source,
            status: c.failed_validation_httpcode,
            message: c.failed_validation_error_message,
            require_signed: c.require_signed_tokens,
            algorithms,
            rules: ClaimRules {
                require_exp: c.require_expiration_time,
                skew_s: i64::from(c.clock_skew_s),
                issuers: c.issuers,
                audiences: c.audiences,
                required: c.required_claims,
            },
            keys,
            remote,
            state: RwLock::new(KeyState::default()),
            refresh_ns: c.refresh_interval_s.saturating_mul(1_000_000_000),
            min_refresh_ns: c.min_refresh_interval_s.saturating_mul(1_000_000_000),
            fetch_timeout: c.fetch_timeout_ms.map(Duration::from_millis),
            output_claims: c.output_claims,
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let token = match self.raw_token(req).and_then(Token::parse) {
            Ok(t) => t,
            Err(f) => return self.fail(ctx, f),
        };
        if let Some(remote) = &self.remote {
            if self.claim_fetch(&token) {
                let (stage, url) = match remote {
                    Remote::Jwks(u) => (STAGE_JWKS, u.as_str()),
                    Remote::OpenId(u) => (STAGE_OPENID, u.as_str()),
                };
                return self.fetch(ctx, stage, url);
            }
        }
        self.finish(&token, ctx)
    }

    fn on_resume(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let slot = ctx.slot();
        let stage = slot >> 32;
        let t = HostToken(slot as u32);
        let r = ctx.result(t);
        let answer = match r.status {
            HostStatus::OK if r.http_status == 200 => Ok(r.value.as_slice()),
            HostStatus::OK => Err(format!("it answered HTTP {}", r.http_status)),
            HostStatus::TIMEOUT => Err(format!("no answer in time ({})", r.error)),
            HostStatus::TOO_LARGE => Err("the document is too large".to_string()),
            _ => Err(format!("the request failed ({})", r.error)),
        };
        let what = match (&self.remote, stage) {
            (Some(Remote::OpenId(u)), STAGE_OPENID) => format!("OpenID configuration {u}"),
            (Some(Remote::Jwks(u)), _) => format!("JWKS {u}"),
            _ => "JWKS".to_string(),
        };
        let outcome = match answer {
            Ok(body) if stage == STAGE_OPENID => match parse_openid_configuration(body) {
                // Keys named by a configuration fetched over https must come over https too.
                Ok(jwks)
                    if matches!(&self.remote, Some(Remote::OpenId(u)) if u.starts_with("https://"))
                        && !jwks.starts_with("https://") =>
                {
                    Err(format!("its jwks_uri '{jwks}' is not https"))
                }
                Ok(jwks) => return self.fetch(ctx, STAGE_JWKS, &jwks),
                Err(e) => Err(e),
            },
            Ok(body) => parse_jwks(body),
            Err(e) => Err(e),
        };
        match outcome {
            Ok((keys, skipped)) => self.store(keys, skipped),
            Err(e) => self.fetch_failed(format!("{what}: {e}")),
        }
        match self.raw_token(req).and_then(Token::parse) {
            Ok(token) => self.finish(&token, ctx),
            Err(f) => self.fail(ctx, f),
        }
    }
}

impl ValidateJwt {
    /// The token's text, from the header or the query.
    fn raw_token<'h>(&self, req: &'h Head<'_, '_>) -> Result<&'h str, Failure> {
        let missing = |m: String| Failure::new("missing_token", m);
        let raw = match &self.source {
            Source::Header { name, scheme } => {
                let v = req
                    .header(name)
                    .ok_or_else(|| missing(format!("The request has no {name} header.")))?;
                // A second value would reach the backend unchecked.
                if req.header_values(name).nth(1).is_some() {
                    return Err(Failure::new(
                        "malformed",
                        format!("The request has more than one {name} header."),
                    ));
                }
                let v = std::str::from_utf8(v)
                    .map_err(|_| {
                        Failure::new("malformed", format!("The {name} header is not text."))
                    })?
                    .trim();
                match scheme {
                    None => v,
                    Some(s) => {
                        let (given, rest) = v.split_once(' ').unwrap_or((v, ""));
                        if !given.eq_ignore_ascii_case(s) {
                            return Err(missing(format!(
                                "The {name} header does not carry a {s} token."
                            )));
                        }
                        rest.trim()
                    }
                }
            }
            Source::Query(q) => req
                .query()
                .split('&')
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k == q)
                .map(|(_, v)| v)
                .unwrap_or_default(),
        };
        if raw.is_empty() {
            return Err(missing(match &self.source {
                Source::Header { name, .. } => format!("The {name} header carries no token."),
                Source::Query(q) => format!("The request has no {q} query parameter."),
            }));
        }
        Ok(raw)
    }

    /// Whether this request should fetch keys now; records the attempt when it should.
    fn claim_fetch(&self, token: &Token<'_>) -> bool {
        let now = now_ns();
        let decide = |st: &KeyState| -> bool {
            if st.fetched_ns.is_none() {
                // Nothing fetched yet: fetch, unless a fetch failed a moment ago.
                return !(st.error.is_some() && within(st.attempt_ns, now, self.min_refresh_ns));
            }
            if within(st.attempt_ns, now, self.min_refresh_ns) {
                return false;
            }
            let stale = !within(st.fetched_ns, now, self.refresh_ns);
            let unknown_kid = token.kid.as_deref().is_some_and(|kid| {
                !self
                    .keys
                    .iter()
                    .chain(&st.keys)
                    .any(|k| k.kid.as_deref() == Some(kid))
            });
            stale || unknown_kid
        };
        if !decide(&self.state.read().unwrap_or_else(PoisonError::into_inner)) {
            return false;
        }
        // Decide again under the write lock: another request may have just claimed it.
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if !decide(&st) {
            return false;
        }
        st.attempt_ns = Some(now);
        true
    }

    fn fetch(&self, ctx: &mut Context<'_, '_>, stage: u64, url: &str) -> Flow {
        let t = ctx.http_call(&Callout {
            method: "GET",
            url,
            headers: &[("accept", b"application/json")],
            body: b"",
            timeout: self.fetch_timeout,
        });
        ctx.set_slot((stage << 32) | u64::from(t.0));
        Flow::PAUSE
    }

    fn store(&self, keys: Vec<Key>, skipped: usize) {
        if host::log_enabled(level::DEBUG) {
            host::log(
                level::DEBUG,
                &format!(
                    "validate-jwt: fetched {} signing key(s), skipped {skipped}.",
                    keys.len()
                ),
            );
        }
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        st.keys = keys;
        st.fetched_ns = Some(now_ns());
        st.error = None;
    }

    fn fetch_failed(&self, error: String) {
        host::log(
            level::WARN,
            &format!("validate-jwt: fetching signing keys failed; keeping the keys known: {error}"),
        );
        let mut st = self.state.write().unwrap_or_else(PoisonError::into_inner);
        st.error = Some(error);
    }

    /// Verifies the signature, then the claims; answers or continues.
    fn finish(&self, token: &Token<'_>, ctx: &mut Context<'_, '_>) -> Flow {
        if let Err(f) = self.verify(token) {
            return self.fail(ctx, f);
        }
        let now = i64::try_from(host::now_unix_ms() / 1000).unwrap_or(i64::MAX);
        if let Err(f) = self.rules.check(&token.claims, now) {
            return self.fail(ctx, f);
        }
        if self.output_claims {
            let mut name = String::with_capacity(32);
            // The registered and common identity claims first, so a token with many claims
            // never loses `sub` (an empty `{jwt.sub}` would merge callers' limits and keys).
            let first = PRIORITY_CLAIMS
                .iter()
                .filter_map(|k| token.claims.get_key_value(*k));
            let rest = token
                .claims
                .iter()
                .filter(|(k, _)| !PRIORITY_CLAIMS.contains(&k.as_str()));
            for (claim, value) in first
                .chain(rest)
                .filter_map(|(k, v)| Some((k, variable_value(v)?)))
                .take(MAX_OUTPUT_CLAIMS)
            {
                name.clear();
                name.push_str("jwt.");
                name.push_str(claim);
                ctx.set_variable(&name, &value);
            }
        }
        Flow::CONTINUE
    }

    fn verify(&self, token: &Token<'_>) -> Result<(), Failure> {
        let alg = match token.alg {
            Alg::None if self.require_signed => {
                return Err(Failure::new("unsigned", "The token is not signed."))
            }
            Alg::None if !token.signature.is_empty() => {
                return Err(Failure::new(
                    "malformed",
                    "An unsigned token has a signature.",
                ))
            }
            Alg::None => return Ok(()),
            Alg::Signed(a) => a,
        };
        if !self.algorithms.contains(&alg) {
            return Err(Failure::new(
                "algorithm_not_allowed",
                format!("The token's algorithm {alg:?} is not allowed."),
            ));
        }
        let st = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let all = || self.keys.iter().chain(&st.keys);
        // A token naming a key is checked with that key; keys without an id stand in when
        // none has it. A token naming none is checked with every key that fits.
        let mut candidates = 0;
        let mut check = |k: &Key| {
            candidates += 1;
            k.verify(alg, token.message, token.signature)
        };
        let ok = match token.kid.as_deref() {
            Some(kid) => {
                let named = all().any(|k| k.kid.as_deref() == Some(kid));
                if named {
                    all()
                        .filter(|k| k.kid.as_deref() == Some(kid))
                        .any(&mut check)
                } else {
                    all()
                        .filter(|k| k.kid.is_none() && k.fits(alg))
                        .any(&mut check)
                }
            }
            None => all().filter(|k| k.fits(alg)).any(&mut check),
        };
        if ok {
            return Ok(());
        }
        if candidates > 0 {
            return Err(Failure::new(
                "bad_signature",
                "The token's signature is not valid.",
            ));
        }
        // The fetch error itself is logged, not told to the client.
        if st.fetched_ns.is_none() && st.error.is_some() {
            return Err(Failure::new(
                "keys_unavailable",
                "The signing keys could not be fetched.",
            ));
        }
        Err(Failure::new(
            "unknown_key",
            match token.kid.as_deref() {
                Some(kid) => format!("No signing key has the token's key id '{kid}'."),
                None => format!("No signing key suits the token's algorithm {alg:?}."),
            },
        ))
    }

    fn fail(&self, ctx: &mut Context<'_, '_>, f: Failure) -> Flow {
        let message = self.message.as_deref().unwrap_or(&f.message);
        let flow = refuse(
            ctx,
            self.status,
            "jwt_invalid",
            message,
            &[("reason", f.reason)],
        );
        if self.status == 401 {
            // RFC 6750 §3: no error code when the request carried no token at all.
            let value = if f.reason == "missing_token" {
                "Bearer".to_string()
            } else {
                let description: String = message
                    .chars()
                    .filter(|c| *c != '"' && *c != '\\' && (' '..='~').contains(c))
                    .collect();
                format!("Bearer error=\"invalid_token\", error_description=\"{description}\"")
            };
            ctx.respond_header("www-authenticate", value.as_bytes());
        }
        flow
    }
}

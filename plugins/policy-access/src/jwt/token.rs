//! A compact JWS token taken apart, and why one is refused.

use std::str::FromStr;

use jsonwebtoken::Algorithm;
use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::serde_json::{self, Map, Value};

use super::keys::b64url;

/// Why a token was refused: a short machine code (the body's `reason`) and a message.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(reason: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            reason,
            message: message.into(),
        }
    }

    fn malformed(message: impl Into<String>) -> Failure {
        Failure::new("malformed", message)
    }
}

/// The signature algorithm, or none (`alg: none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Alg {
    None,
    Signed(Algorithm),
}

/// A token: its header's algorithm and key id, its claims, and the parts to verify.
#[derive(Debug)]
pub(crate) struct Token<'t> {
    pub(crate) alg: Alg,
    pub(crate) kid: Option<String>,
    pub(crate) claims: Map<String, Value>,
    /// `header.payload`, what the signature covers.
    pub(crate) message: &'t str,
    pub(crate) signature: &'t str,
}

#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde")]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
    #[serde(default)]
    enc: Option<Value>,
}

impl<'t> Token<'t> {
    /// Takes a compact JWS apart (no signature or claim checks).
    pub(crate) fn parse(raw: &'t str) -> Result<Token<'t>, Failure> {
        let (message, signature) = raw.rsplit_once('.').ok_or_else(|| {
            Failure::malformed("The token is not a JWT (header.payload.signature).")
        })?;
        let (header, payload) = message.split_once('.').ok_or_else(|| {
            Failure::malformed("The token is not a JWT (header.payload.signature).")
        })?;
        if payload.contains('.') {
            return Err(Failure::malformed(
                "Encrypted tokens (JWE) are not supported.",
            ));
        }
        let header: Header = b64url(header)
            .and_then(|h| serde_json::from_slice(&h).ok())
            .ok_or_else(|| Failure::malformed("The token's header is not base64url JSON."))?;
        if header.enc.is_some() {
            return Err(Failure::malformed(
                "Encrypted tokens (JWE) are not supported.",
            ));
        }
        if header.crit.is_some() {
            return Err(Failure::malformed(
                "The token has critical header extensions (crit) this gateway does not know.",
            ));
        }
        let alg = if header.alg.eq_ignore_ascii_case("none") {
            Alg::None
        } else {
            Alg::Signed(Algorithm::from_str(&header.alg).map_err(|_| {
                Failure::new(
                    "algorithm_not_allowed",
                    format!("The token's algorithm {} is not supported.", header.alg),
                )
            })?)
        };
        let claims = b64url(payload)
            .and_then(|p| serde_json::from_slice::<Value>(&p).ok())
            .and_then(|v| match v {
                Value::Object(m) => Some(m),
                _ => None,
            })
            .ok_or_else(|| {
                Failure::malformed("The token's payload is not a base64url JSON object.")
            })?;
        Ok(Token {
            alg,
            kid: header.kid,
            claims,
            message,
            signature,
        })
    }
}

/// How a required claim's values must match.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", rename_all = "snake_case")]
pub enum ClaimMatch {
    /// Every listed value must be present.
    #[default]
    All,
    /// At least one listed value must be present.
    Any,
}

/// A claim the token must carry (APIM's `required-claims/claim`).
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct RequiredClaim {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) values: Vec<String>,
    #[serde(default, rename = "match")]
    pub(crate) match_: ClaimMatch,
    #[serde(default)]
    pub(crate) separator: Option<String>,
}

/// The claim checks, fixed at configuration time.
pub(crate) struct ClaimRules {
    pub(crate) require_exp: bool,
    pub(crate) skew_s: i64,
    pub(crate) issuers: Vec<String>,
    pub(crate) audiences: Vec<String>,
    pub(crate) required: Vec<RequiredClaim>,
}

fn numeric(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, Failure> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_f64().map(|f| Some(f.floor() as i64)).ok_or_else(|| {
            Failure::malformed(format!("The token's {name} claim is not a number."))
        }),
    }
}

/// A claim's values as text: a string (split by `separator` when given), a number, a boolean,
/// or an array of those.
fn claim_values<'v>(
    v: &'v Value,
    separator: Option<&'v str>,
    out: &mut Vec<std::borrow::Cow<'v, str>>,
) {
    use std::borrow::Cow;
    match v {
        Value::String(s) => match separator {
            Some(sep) if !sep.is_empty() => out.extend(
                s.split(sep)
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(Cow::Borrowed),
            ),
            _ => out.push(Cow::Borrowed(s)),
        },
        Value::Number(n) => out.push(Cow::Owned(n.to_string())),
        Value::Bool(b) => out.push(Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Array(items) => {
            for i in items {
                if !i.is_array() {
                    claim_values(i, separator, out);
                }
            }
        }
        _ => {}
    }
}

impl ClaimRules {
    /// Checks the claims against the rules at `now` (Unix seconds).
    pub(crate) fn check(&self, claims: &Map<String, Value>, now: i64) -> Result<(), Failure> {
        match numeric(claims, "exp")? {
            Some(exp) if now >= exp.saturating_add(self.skew_s) => {
                return Err(Failure::new("expired", "The token has expired."));
            }
            None if self.require_exp => {
                return Err(Failure::new(
                    "missing_claim",
                    "The token has no expiration time (exp).",
                ));
            }
            _ => {}
        }
        if let Some(nbf) = numeric(claims, "nbf")? {
            if now.saturating_add(self.skew_s) < nbf {
                return Err(Failure::new(
                    "not_yet_valid",
                    "The token is not valid yet (nbf).",
                ));
            }
        }
        if !self.issuers.is_empty() {
            let ok = claims
                .get("iss")
                .and_then(Value::as_str)
                .is_some_and(|iss| self.issuers.iter().any(|i| i == iss));
            if !ok {
                return Err(Failure::new(
                    "wrong_issuer",
                    "The token's issuer (iss) is not accepted.",
                ));
            }
        }
        if !self.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => self.audiences.iter().any(|x| x == a),
                Some(Value::Array(list)) => list
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| self.audiences.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return Err(Failure::new(
                    "wrong_audience",
                    "The token's audience (aud) is not accepted.",
                ));
            }
        }
        let mut values = Vec::new();
        for rc in &self.required {
            let Some(v) = claims.get(&rc.name) else {
                return Err(Failure::new(
                    "missing_claim",
                    format!("The token has no {} claim.", rc.name),
                ));
            };
            if rc.values.is_empty() {
                continue;
            }
            values.clear();
            claim_values(v, rc.separator.as_deref(), &mut values);
            let has = |want: &String| values.iter().any(|have| have.as_ref() == want.as_str());
            let ok = match rc.match_ {
                ClaimMatch::All => rc.values.iter().all(has),
                ClaimMatch::Any => rc.values.iter().any(has),
            };
            if !ok {
                return Err(Failure::new(
                    "missing_claim",
                    format!(
                        "The token's {} claim lacks {} of the required values.",
                        rc.name,
                        if rc.match_ == ClaimMatch::All {
                            "some"
                        } else {
                            "all"
                        }
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A top-level claim as a variable value: strings, numbers and booleans as text, arrays of
/// those joined with `,`; other shapes have none.
pub(crate) fn variable_value(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Array(items) => {
            let mut out = String::new();
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                match item {
                    Value::String(s) => out.push_str(s),
                    Value::Number(n) => out.push_str(&n.to_string()),
                    Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
                    _ => return None,
                }
            }
            Some(out)
        }
        _ => None,
    }
}

//! `rewrite-uri`: changes the path and query sent to the backend, from a template that uses
//! the operation's URL template parameters.
//!
//! The request path includes the API's path, which a policy does not see; the operation's
//! template (`ctx.operation_template()`, e.g. `/users/{id}`) matches the part after it. A
//! template without `*` has a fixed number of segments, so it is aligned with the *end* of
//! the request path: exact. A template ending in `*` is aligned at the first place from the
//! start of the path where its segments match: exact when it starts with a literal segment
//! that the API's path does not end in (the usual `/files/{id}/*`); a template that starts
//! with a parameter before `*` would take the API path's first segment.

use std::borrow::Cow;

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{Context, Flow, Head, Policy};

use crate::query::{
    decode_query, decode_segment, pair_name, push_encoded, query_value, QUERY, SEGMENT,
};
use crate::{fail, yes};

/// `rewrite-uri` configuration.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct RewriteUriConfig {
    template: String,
    #[serde(default = "yes")]
    copy_unmatched_params: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Param(String),
}

/// A query parameter of the new template: its name (as written, already encoded), the name
/// decoded (to compare), and its value (`None`: `?flag` without `=`).
#[derive(Debug)]
struct QueryPart {
    raw_name: String,
    name: String,
    value: Option<Vec<Piece>>,
}

/// Rewrites the backend request's path and query (inbound and backend sections).
#[derive(Debug)]
pub struct RewriteUri {
    path: Vec<Piece>,
    query: Vec<QueryPart>,
    copy_unmatched: bool,
}

/// Characters a template may hold as they are (anything else must be percent-encoded):
/// RFC 3986 unreserved and sub-delims, `:`, `@`, `/`, `%`, and `?` in the query.
fn allowed(b: u8, in_query: bool) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b) || (in_query && b == b'?')
}

/// Splits text with `{name}` placeholders into pieces.
fn pieces(text: &str, in_query: bool) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (lit, after) = match rest.find('{') {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        if let Some(b) = lit.bytes().find(|&b| !allowed(b, in_query)) {
            return Err(format!(
                "template: '{}' must be percent-encoded",
                (b as char).escape_default()
            ));
        }
        if !lit.is_empty() {
            out.push(Piece::Literal(lit.to_owned()));
        }
        let Some(after) = after else { break };
        let end = after
            .find('}')
            .ok_or("template: a '{' is not closed by '}'")?;
        let name = &after[..end];
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "template: parameter '{{{name}}}' needs a name of letters, digits, '_' or '-'"
            ));
        }
        out.push(Piece::Param(name.to_owned()));
        rest = &after[end + 1..];
    }
    Ok(out)
}

/// Where a parameter's value comes from, as it appears in the request (still encoded).
#[derive(Debug, Clone, Copy)]
enum Value<'r> {
    Segment(&'r str),
    Query(&'r str),
}

impl Value<'_> {
    fn push_into_path(self, out: &mut String) {
        match self {
            Value::Segment(s) => out.push_str(s),
            Value::Query(q) => push_encoded(out, &decode_query(q), SEGMENT),
        }
    }

    fn push_into_query(self, out: &mut String) {
        match self {
            Value::Segment(s) => push_encoded(out, &decode_segment(s), QUERY),
            Value::Query(q) => out.push_str(q),
        }
    }
}

/// The operation template matched against the request, for parameter lookups.
struct Bound<'r> {
    op_path: &'r str,
    op_query: &'r str,
    segments: Vec<&'r str>,
    /// Index in `segments` where the template's first segment is.
    start: usize,
}

fn op_segments(op_path: &str) -> impl Iterator<Item = &str> {
    op_path.split('/').filter(|s| !s.is_empty())
}

impl<'r> Bound<'r> {
    fn new(op_template: &'r str, path: &'r str) -> Option<Self> {
        let (op_path, op_query) = op_template.split_once('?').unwrap_or((op_template, ""));
        let trimmed = path.strip_suffix('/').unwrap_or(path);
        let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
        let n = op_segments(op_path).filter(|s| *s != "*").count();
        let rest = op_segments(op_path).last() == Some("*");
        let fits = |start: usize| {
            op_segments(op_path)
                .filter(|s| *s != "*")
                .zip(&segments[start..])
                .all(|(t, s)| !s.is_empty() && (t.starts_with('{') || t == *s))
        };
        let start = if rest {
            (0..=segments.len().checked_sub(n)?).find(|&i| fits(i))?
        } else {
            let start = segments.len().checked_sub(n)?;
            fits(start).then_some(start)?
        };
        Some(Bound {
            op_path,
            op_query,
            segments,
            start,
        })
    }

    /// The value of `{name}`, and the request query parameter it used (not copied on).
    fn lookup(&self, name: &str, query: &'r str) -> Option<(Value<'r>, Option<&'r str>)> {
        let mut params = op_segments(self.op_path).filter(|s| *s != "*");
        if let Some(i) =
            params.position(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) == Some(name))
        {
            return Some((Value::Segment(self.segments[self.start + i]), None));
        }
        for pair in self.op_query.split('&') {
            if let Some((key, v)) = pair.split_once('=') {
                if v.strip_prefix('{').and_then(|v| v.strip_suffix('}')) == Some(name) {
                    let value = query_value(query, key)?;
                    return Some((Value::Query(value), Some(key)));
                }
            }
        }
        // Not in the template: a query parameter of the same name.
        let (name_raw, value) = query
            .split('&')
            .filter(|p| !p.is_empty())
            .find(|p| pair_name(p) == name)
            .map(|p| p.split_once('=').unwrap_or((p, "")))?;
        Some((Value::Query(value), Some(name_raw)))
    }

    /// Query parameters of the operation template (APIM's "matched" parameters).
    fn template_query_names(&self) -> impl Iterator<Item = Cow<'r, str>> {
        self.op_query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(pair_name)
    }
}

impl Policy for RewriteUri {
    type Config = RewriteUriConfig;

    fn new(c: RewriteUriConfig) -> Result<Self, String> {
        if !c.template.starts_with('/') {
            return Err(format!(
                "template: '{}' must start with '/' (a path, without scheme and host)",
                c.template
            ));
        }
        if c.template.contains('#') {
            return Err("template: a fragment ('#') is never sent to a backend".into());
        }
        let (path, query) = c.template.split_once('?').unwrap_or((&c.template, ""));
        if path
            .split('/')
            .any(|s| !s.is_empty() && s.bytes().all(|b| b == b'.'))
        {
            return Err("template: '.' and '..' segments are not allowed".into());
        }
        let path_pieces = pieces(path, false)?;
        let mut query_parts = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (raw_name, value) = match pair.split_once('=') {
                Some((n, v)) => (n, Some(pieces(v, true)?)),
                None => (pair, None),
            };
            if raw_name.contains(['{', '}']) || raw_name.is_empty() {
                return Err(format!(
                    "template: query parameter name '{raw_name}' must be a non-empty literal"
                ));
            }
            pieces(raw_name, true)?;
            query_parts.push(QueryPart {
                raw_name: raw_name.to_owned(),
                name: decode_query(raw_name).into_owned(),
                value,
            });
        }
        Ok(RewriteUri {
            path: path_pieces,
            query: query_parts,
            copy_unmatched: c.copy_unmatched_params,
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let rewritten = self.rewrite(ctx.operation_template(), req.path(), req.query());
        match rewritten {
            Ok((path, query)) if req.set_path(&path) && req.set_query(&query) => Flow::CONTINUE,
            Ok((path, query)) => {
                let message = format!(
                    "rewrite-uri: the gateway refused the path '{path}' or query '{query}'"
                );
                fail(ctx, &message)
            }
            Err(message) => fail(ctx, &message),
        }
    }
}

/// The value of `{name}`; a request query parameter it used is added to `used`.
fn resolve<'r>(
    bound: &Bound<'r>,
    query: &'r str,
    op: &str,
    name: &str,
    used: &mut Vec<&'r str>,
) -> Result<Value<'r>, String> {
    match bound.lookup(name, query) {
        Some((v, key)) => {
            used.extend(key);
            Ok(v)
        }
        None => Err(format!(
            "rewrite-uri: no value for '{{{name}}}': the operation template '{op}' has no such parameter and the query has no '{name}'"
        )),
    }
}

impl RewriteUri {
    /// The new path and query, or why there are none.
    fn rewrite<'r>(
        &self,
        op: &'r str,
        path: &'r str,
        query: &'r str,
    ) -> Result<(String, String), String> {
        let bound = Bound::new(op, path).ok_or_else(|| {
            format!("rewrite-uri: the path '{path}' does not match the operation template '{op}'")
        })?;
        let mut used: Vec<&'r str> = Vec::new();
        let mut new_path = String::with_capacity(64);
        for piece in &self.path {
            match piece {
                Piece::Literal(l) => new_path.push_str(l),
                Piece::Param(p) => {
                    resolve(&bound, query, op, p, &mut used)?.push_into_path(&mut new_path)
                }
            }
        }
        let mut new_query = String::new();
        for part in &self.query {
            if !new_query.is_empty() {
                new_query.push('&');
            }
            new_query.push_str(&part.raw_name);
            let Some(pieces) = &part.value else { continue };
            new_query.push('=');
            for piece in pieces {
                match piece {
                    Piece::Literal(l) => new_query.push_str(l),
                    Piece::Param(p) => {
                        resolve(&bound, query, op, p, &mut used)?.push_into_query(&mut new_query)
                    }
                }
            }
        }
        if self.copy_unmatched {
            let skip = |n: &str| {
                bound.template_query_names().any(|t| t == n)
                    || used.iter().any(|u| decode_query(u) == n)
                    || self.query.iter().any(|q| q.name == n)
            };
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                if !skip(&pair_name(pair)) {
                    if !new_query.is_empty() {
                        new_query.push('&');
                    }
                    new_query.push_str(pair);
                }
            }
        }
        Ok((new_path, new_query))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::{on_request, policy, TestContext, TestHead};

    fn run(config: &str, op: &str, path: &str, query: &str) -> Result<(String, String), String> {
        let p = policy::<RewriteUri>(config).unwrap();
        let mut req = TestHead::request("GET", path);
        req.query = query.into();
        let mut ctx = TestContext {
            operation_template: op.into(),
            ..TestContext::default()
        };
        match on_request(&p, &mut req, &mut ctx) {
            Flow::CONTINUE => Ok((req.backend_path.unwrap(), req.query)),
            Flow::ERROR => Err(ctx.error),
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn path_parameters_come_from_the_end_of_the_path() {
        let c = r#"{"template":"/v2/accounts/{id}/detail?x=1"}"#;
        assert_eq!(
            run(c, "/users/{id}", "/svc/users/42", "a=1&b=2"),
            Ok(("/v2/accounts/42/detail".into(), "x=1&a=1&b=2".into()))
        );
        // The API path may itself look like the template: alignment is from the end.
        assert_eq!(
            run(c, "/users/{id}", "/users/users/7/", ""),
            Ok(("/v2/accounts/7/detail".into(), "x=1".into()))
        );
        // A trailing slash and an API at the root.
        assert_eq!(
            run(c, "/users/{id}", "/users/9", ""),
            Ok(("/v2/accounts/9/detail".into(), "x=1".into()))
        );
    }

    #[test]
    fn values_are_encoded_for_where_they_go() {
        // A path segment into the query: '&' and '=' must not split it.
        let c = r#"{"template":"/find?name={name}","copy_unmatched_params":false}"#;
        assert_eq!(
            run(c, "/people/{name}", "/svc/people/a&b=c%20d", "drop=1"),
            Ok(("/find".into(), "name=a%26b%3Dc%20d".into()))
        );
        // A query value into the path: '/' must not add a segment.
        let c = r#"{"template":"/cities/{city}"}"#;
        assert_eq!(
            run(
                c,
                "/weather?city={city}",
                "/svc/weather",
                "city=New+York%2FNY&units=c"
            ),
            Ok(("/cities/New%20York%2FNY".into(), "units=c".into()))
        );
    }

    #[test]
    fn query_parameters_matched_used_or_set_by_the_template_are_not_copied() {
        let c = r#"{"template":"/v2/{id}?region={region}&mode=fast"}"#;
        assert_eq!(
            run(
                c,
                "/items/{id}?r={region}",
                "/api/items/5",
                "r=eu&keep=1&mode=slow&other=x%20y"
            ),
            Ok((
                "/v2/5".into(),
                "region=eu&mode=fast&keep=1&other=x%20y".into()
            ))
        );
        // A parameter the operation template does not have: a query parameter of that name.
        let c = r#"{"template":"/search/{q}"}"#;
        assert_eq!(
            run(c, "/search", "/svc/search", "q=rust&page=2"),
            Ok(("/search/rust".into(), "page=2".into()))
        );
        // Without copying, only the template's query is left.
        let c = r#"{"template":"/plain","copy_unmatched_params":false}"#;
        assert_eq!(
            run(c, "/*", "/svc/a/b", "page=2"),
            Ok(("/plain".into(), String::new()))
        );
    }

    #[test]
    fn rest_templates_align_at_the_first_match() {
        let c = r#"{"template":"/store/{id}"}"#;
        assert_eq!(
            run(c, "/files/{id}/*", "/svc/files/9/a/b", ""),
            Ok(("/store/9".into(), String::new()))
        );
        assert_eq!(
            run(c, "/files/{id}/*", "/files/files/3", ""),
            Ok(("/store/files".into(), String::new())),
            "documented: the first alignment from the start wins"
        );
    }

    #[test]
    fn failures_name_the_cause() {
        let c = r#"{"template":"/v2/{nope}"}"#;
        let e = run(c, "/users/{id}", "/svc/users/1", "").unwrap_err();
        assert!(e.contains("no value for '{nope}'"), "{e}");
        assert!(e.contains("/users/{id}"), "{e}");
        let c = r#"{"template":"/v2/{id}"}"#;
        let e = run(c, "/users/{id}/x", "/svc/users", "").unwrap_err();
        assert!(e.contains("does not match"), "{e}");
    }

    #[test]
    fn bad_templates_are_refused() {
        for (config, needle) in [
            (r#"{"template":"v2/x"}"#, "must start with '/'"),
            (r#"{"template":"/a#b"}"#, "fragment"),
            (r#"{"template":"/a/../b"}"#, "'..'"),
            (r#"{"template":"/a/{id"}"#, "not closed"),
            (r#"{"template":"/a/{}"}"#, "needs a name"),
            (r#"{"template":"/a b"}"#, "' ' must be percent-encoded"),
            (r#"{"template":"/a?{k}=1"}"#, "must be a non-empty literal"),
            (
                r#"{"template":"/a","copy_unmatched":true}"#,
                "copy_unmatched",
            ),
            (r#"{}"#, "template"),
        ] {
            let e = policy::<RewriteUri>(config).err().unwrap();
            assert!(e.message.contains(needle), "{config}: {}", e.message);
        }
    }
}

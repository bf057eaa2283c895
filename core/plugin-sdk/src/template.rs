//! Key templates: literal text with `{expression}` parts filled from the request, parsed once
//! when a policy is created and rendered per request into the caller's buffer.
//!
//! Policies use them wherever APIM takes a policy expression that builds a key (a rate limit's
//! `counter_key`, a concurrency limit's `key`, a cache key):
//!
//! ```text
//! {client.ip}
//! orders:{subscription.id}:{header.x-tenant}
//! {jwt.sub}@{api.id}
//! ```
//!
//! # Syntax
//!
//! Text outside braces is copied as it is. `{{` and `}}` stand for a literal `{` and `}`. An
//! expression is a name between single braces (spaces around it are ignored):
//!
//! | Expression | Value |
//! |---|---|
//! | `client.ip` | The client's IP address as the gateway sees it. |
//! | `subscription.id` | The subscription's id (empty for a request without one). |
//! | `product.id` | The subscription's product id (empty when none). |
//! | `api.id` | The API's id. |
//! | `operation.id` | The operation's id. |
//! | `request.method` | The request method (`GET`). |
//! | `request.path` | The request path as the client sent it, without the query. |
//! | `header.<name>` | The first value of request header `<name>` (any case); bytes that are not UTF-8 become U+FFFD. |
//! | `query.<name>` | The first value of query parameter `<name>`, percent-decoded (`+` is a space); bytes that are not UTF-8 become U+FFFD. |
//! | `var.<name>` | The context variable `<name>`, as an earlier policy set it. |
//! | `jwt.<claim>` | The variable `jwt.<claim>`, which `validate-jwt` sets for a validated token's claims. |
//!
//! A value that is missing renders as nothing: `{header.x-tenant}` without the header renders
//! as the empty string. Anything else between braces is refused by [`Template::parse`], with an
//! error naming it.
//!
//! # Cost
//!
//! [`Template::parse`] does all the allocation. [`Template::render`] appends to a `String` the
//! caller owns and reuses: it allocates nothing itself (the buffer grows only while it is
//! smaller than the longest key seen).
//!
//! ```
//! use outpost_plugin_sdk::template::Template;
//!
//! let t = Template::parse("orders:{header.x-tenant}:{client.ip}").expect("valid");
//! assert!(!t.is_constant());
//! assert!(Template::parse("{header.}").unwrap_err().contains("{header.}"));
//! assert!(Template::parse("{{literal}}").unwrap().is_constant());
//! ```

use std::fmt;

use crate::policy::{Context, Head};

/// A parsed key template (see the [module documentation](self) for the language).
#[derive(Clone, PartialEq, Eq)]
pub struct Template {
    source: Box<str>,
    parts: Box<[Part]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(Box<str>),
    ClientIp,
    SubscriptionId,
    ProductId,
    ApiId,
    OperationId,
    RequestMethod,
    RequestPath,
    Header(Box<str>),
    Query(Box<str>),
    Variable(Box<str>),
}

/// The expressions without a name part, for errors.
const KNOWN: &str = "client.ip, subscription.id, product.id, api.id, operation.id, \
                     request.method, request.path, header.<name>, query.<name>, var.<name>, jwt.<claim>";

impl Template {
    /// Parses a template. The error names the part that is wrong: an unknown or incomplete
    /// expression, a `{` never closed, or a `}` that closes nothing.
    pub fn parse(source: &str) -> Result<Template, String> {
        let bytes = source.as_bytes();
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut start = 0; // start of the literal run not yet copied into `text`
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'{' if bytes.get(i + 1) == Some(&b'{') => {
                    text.push_str(&source[start..=i]);
                    i += 2;
                    start = i;
                }
                b'}' if bytes.get(i + 1) == Some(&b'}') => {
                    text.push_str(&source[start..=i]);
                    i += 2;
                    start = i;
                }
                b'{' => {
                    text.push_str(&source[start..i]);
                    let rest = &source[i + 1..];
                    let Some(len) = rest
                        .find(['{', '}'])
                        .filter(|&n| rest.as_bytes()[n] == b'}')
                    else {
                        return Err(format!(
                            "'{{' at position {i} is not closed by '}}' (write '{{{{' for a literal brace) in '{source}'"
                        ));
                    };
                    let expr = &rest[..len];
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text).into()));
                    }
                    parts.push(expression(expr)?);
                    i += len + 2;
                    start = i;
                }
                b'}' => {
                    return Err(format!(
                        "'}}' at position {i} closes nothing (write '}}}}' for a literal brace) in '{source}'"
                    ));
                }
                _ => i += 1,
            }
        }
        text.push_str(&source[start..]);
        if !text.is_empty() {
            parts.push(Part::Text(text.into()));
        }
        Ok(Template {
            source: source.into(),
            parts: parts.into(),
        })
    }

    /// The text the template was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template has no expression: it renders the same text for every request.
    pub fn is_constant(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// Appends the template's value for this request to `out` (which is not cleared: clear it
    /// first to reuse it). `head` is the request; in a response hook, request-derived
    /// expressions (`request.*`, `header.*`, `query.*`) read the response head instead, where
    /// method, path and query are empty.
    pub fn render(&self, head: &Head<'_, '_>, ctx: &Context<'_, '_>, out: &mut String) {
        for part in &*self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::ClientIp => out.push_str(ctx.client_ip()),
                Part::SubscriptionId => out.push_str(ctx.subscription_id()),
                Part::ProductId => out.push_str(ctx.product_id()),
                Part::ApiId => out.push_str(ctx.api_id()),
                Part::OperationId => out.push_str(ctx.operation_id()),
                Part::RequestMethod => out.push_str(head.method()),
                Part::RequestPath => out.push_str(head.path()),
                Part::Header(name) => {
                    if let Some(v) = head.header(name) {
                        push_lossy(out, v);
                    }
                }
                Part::Query(name) => {
                    if let Some(v) = query_value(head.query(), name) {
                        if v.contains(&b'%') || v.contains(&b'+') {
                            push_lossy_iter(out, Decoded(v));
                        } else {
                            push_lossy(out, v);
                        }
                    }
                }
                Part::Variable(name) => {
                    if let Some(v) = ctx.variable(name) {
                        out.push_str(v);
                    }
                }
            }
        }
    }
}

impl fmt::Debug for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Template").field(&self.source).finish()
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl std::str::FromStr for Template {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Template::parse(s)
    }
}

/// One expression (the text between braces).
fn expression(raw: &str) -> Result<Part, String> {
    let e = raw.trim_matches([' ', '\t']);
    let named = |prefix: &str| e.strip_prefix(prefix);
    let part = match e {
        "client.ip" => Part::ClientIp,
        "subscription.id" => Part::SubscriptionId,
        "product.id" => Part::ProductId,
        "api.id" => Part::ApiId,
        "operation.id" => Part::OperationId,
        "request.method" => Part::RequestMethod,
        "request.path" => Part::RequestPath,
        _ => {
            let (kind, name) = if let Some(n) = named("header.") {
                ("header", n)
            } else if let Some(n) = named("query.") {
                ("query", n)
            } else if let Some(n) = named("var.") {
                ("var", n)
            } else if let Some(n) = named("jwt.") {
                ("jwt", n)
            } else {
                return Err(format!("unknown expression '{{{raw}}}' (known: {KNOWN})"));
            };
            if name.is_empty() {
                return Err(format!(
                    "expression '{{{raw}}}' needs a name after '{kind}.'"
                ));
            }
            match kind {
                "header" => {
                    if !name.bytes().all(is_token) {
                        return Err(format!(
                            "expression '{{{raw}}}': '{name}' is not a valid header name"
                        ));
                    }
                    Part::Header(name.to_ascii_lowercase().into())
                }
                "query" => Part::Query(name.into()),
                "var" => Part::Variable(name.into()),
                _ => Part::Variable(format!("jwt.{name}").into()),
            }
        }
    };
    Ok(part)
}

/// An HTTP token character (RFC 9110 §5.6.2).
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The raw (still encoded) value of the first query parameter whose decoded name is `name`;
/// a parameter without `=` has an empty value.
fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q [u8]> {
    query.as_bytes().split(|&b| b == b'&').find_map(|pair| {
        let (n, v) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        Decoded(n).eq(name.bytes()).then_some(v)
    })
}

/// Percent-decodes bytes (`+` is a space; a `%` not followed by two hex digits stays).
struct Decoded<'a>(&'a [u8]);

impl Iterator for Decoded<'_> {
    type Item = u8;
    fn next(&mut self) -> Option<u8> {
        let (&b, tail) = self.0.split_first()?;
        self.0 = tail;
        match b {
            b'+' => Some(b' '),
            b'%' => match tail {
                [h, l, rest @ ..] => match (hex(*h), hex(*l)) {
                    (Some(h), Some(l)) => {
                        self.0 = rest;
                        Some(h << 4 | l)
                    }
                    _ => Some(b'%'),
                },
                _ => Some(b'%'),
            },
            b => Some(b),
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends bytes as UTF-8, each invalid sequence as U+FFFD.
fn push_lossy(out: &mut String, bytes: &[u8]) {
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        if !chunk.invalid().is_empty() {
            out.push(char::REPLACEMENT_CHARACTER);
        }
    }
}

/// [`push_lossy`] for a stream of bytes, through a small stack buffer; a character split
/// across two fills of the buffer is kept whole.
fn push_lossy_iter(out: &mut String, bytes: impl Iterator<Item = u8>) {
    let mut buf = [0u8; 64];
    let mut n = 0;
    for b in bytes {
        buf[n] = b;
        n += 1;
        if n == buf.len() {
            n = flush(out, &mut buf, n, false);
        }
    }
    flush(out, &mut buf, n, true);
}

/// Appends `buf[..n]`; unless `last`, an incomplete character at the end is moved to the
/// front of `buf` and its length returned.
fn flush(out: &mut String, buf: &mut [u8; 64], n: usize, last: bool) -> usize {
    let mut at = 0;
    loop {
        match std::str::from_utf8(&buf[at..n]) {
            Ok(s) => {
                out.push_str(s);
                return 0;
            }
            Err(e) => {
                let valid = at + e.valid_up_to();
                push_lossy(out, &buf[at..valid]);
                match e.error_len() {
                    Some(len) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        at = valid + len;
                    }
                    None if last => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        return 0;
                    }
                    None => {
                        buf.copy_within(valid..n, 0);
                        return n - valid;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::abi_stable::sabi_trait::TD_Opaque;
    use crate::api::abi_stable::sabi_types::RMut;
    use crate::api::{HttpHead_TO, RequestContext_TO};
    use crate::testing::{TestContext, TestHead};

    fn render_with(template: &str, head: &mut TestHead, ctx: &mut TestContext) -> String {
        let t = Template::parse(template).expect("valid template");
        let mut h = HttpHead_TO::from_ptr(RMut::new(head), TD_Opaque);
        let mut c = RequestContext_TO::from_ptr(RMut::new(ctx), TD_Opaque);
        let (h, c) = (Head::new(&mut h), Context::new(&mut c));
        let mut out = String::from("kept:");
        t.render(&h, &c, &mut out);
        out
    }

    fn context() -> TestContext {
        let mut ctx = TestContext {
            api_id: "orders".into(),
            operation_id: "list".into(),
            product_id: "gold".into(),
            subscription_id: "sub-1".into(),
            client_ip: "192.0.2.7".into(),
            ..TestContext::default()
        };
        ctx.variables.insert("tenant".into(), "acme".into());
        ctx.variables.insert("jwt.sub".into(), "alice".into());
        ctx
    }

    #[test]
    fn every_expression_renders_its_value() {
        let mut head = TestHead::request("POST", "/orders/7").with_header("X-Tenant", "t1");
        head.query = "a=1&name=J%C3%BCrgen+K&name=second".into();
        let out = render_with(
            "{client.ip}|{subscription.id}|{product.id}|{api.id}|{operation.id}|\
             {request.method}|{request.path}|{header.x-tenant}|{header.X-TENANT}|{query.name}|\
             {query.a}|{var.tenant}|{jwt.sub}",
            &mut head,
            &mut context(),
        );
        assert_eq!(
            out,
            "kept:192.0.2.7|sub-1|gold|orders|list|POST|/orders/7|t1|t1|Jürgen K|1|acme|alice"
        );
    }

    #[test]
    fn missing_values_render_empty_and_braces_escape() {
        let mut head = TestHead::request("GET", "/");
        head.query = "flag&x=".into();
        let out = render_with(
            "{{{header.absent}}}-{query.nope}-{var.nope}-{jwt.nope}-[{query.flag}]-[{query.x}]-}}",
            &mut head,
            &mut TestContext::default(),
        );
        assert_eq!(out, "kept:{}----[]-[]-}");
    }

    #[test]
    fn invalid_utf8_is_replaced_and_encoded_names_match() {
        let mut head = TestHead::request("GET", "/");
        head.headers.push(("x-raw".into(), vec![b'a', 0xff, b'b']));
        // `%E2%82` is an incomplete character; `%zz` is not an escape.
        head.query = "k%65y=%E2%82x%zz&long=".to_owned() + &"%E2%82%AC".repeat(30);
        let out = render_with(
            "{header.x-raw}|{query.key}|{query.long}",
            &mut head,
            &mut TestContext::default(),
        );
        assert_eq!(
            out,
            format!("kept:a\u{FFFD}b|\u{FFFD}x%zz|{}", "€".repeat(30))
        );
    }

    #[test]
    fn constant_templates_are_known() {
        assert!(Template::parse("fixed").unwrap().is_constant());
        assert!(Template::parse("").unwrap().is_constant());
        assert!(Template::parse("{{x}}").unwrap().is_constant());
        assert!(!Template::parse("a{client.ip}").unwrap().is_constant());
        let t = Template::parse(" { api.id } ").unwrap();
        assert_eq!(t.source(), " { api.id } ");
        assert_eq!(
            render_with(" { api.id } ", &mut TestHead::default(), &mut context()),
            "kept: orders "
        );
    }

    #[test]
    fn errors_name_the_bad_part() {
        let cases = [
            ("{client.port}", "{client.port}"),
            ("a{header.}b", "{header.}"),
            ("{header.bad name}", "bad name"),
            ("{query.}", "{query.}"),
            ("{var.}", "{var.}"),
            ("{jwt.}", "{jwt.}"),
            ("{}", "{}"),
            ("open {client.ip", "not closed"),
            ("{a{b}", "not closed"),
            ("x}y", "closes nothing"),
        ];
        for (template, needle) in cases {
            let e = Template::parse(template).expect_err(template);
            assert!(e.contains(needle), "{template}: {e}");
        }
        assert!(Template::parse("{nope}")
            .unwrap_err()
            .contains("known: client.ip"));
    }

    #[test]
    fn rendering_reuses_the_buffer() {
        let t = Template::parse("k:{header.x-id}:{client.ip}").unwrap();
        let mut head = TestHead::request("GET", "/").with_header("x-id", "abc");
        let mut ctx = context();
        let mut h = HttpHead_TO::from_ptr(RMut::new(&mut head), TD_Opaque);
        let mut c = RequestContext_TO::from_ptr(RMut::new(&mut ctx), TD_Opaque);
        let (h, c) = (Head::new(&mut h), Context::new(&mut c));
        let mut out = String::with_capacity(64);
        let ptr = out.as_ptr();
        for _ in 0..3 {
            out.clear();
            t.render(&h, &c, &mut out);
            assert_eq!(out, "k:abc:192.0.2.7");
        }
        assert_eq!(out.as_ptr(), ptr, "no reallocation");
    }
}

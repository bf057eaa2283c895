//! `set-query-parameter`: sets, appends or removes a query parameter of the backend request;
//! and the percent-encoding rules the URI policies share.

use std::borrow::Cow;
use std::fmt;

use outpost_plugin_sdk::serde::de::{self, Deserializer, SeqAccess, Visitor};
use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{Context, Flow, Head, Policy};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::fail;
use crate::header::ExistsAction;

/// What is encoded in a query name or value: everything but RFC 3986's unreserved characters
/// (as JavaScript's `encodeURIComponent`, plus `!'()*`), so a value can hold `&`, `=`, `+`,
/// `#` and spaces.
pub(crate) const QUERY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// What is encoded in a path segment: as [`QUERY`], but RFC 3986's other `pchar`s stay.
/// `/` is encoded, so a value never adds segments.
pub(crate) const SEGMENT: &AsciiSet = &QUERY
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'@');

/// A query component as text: `+` is a space (HTML forms), `%XX` decoded, invalid UTF-8
/// replaced. Borrows when there is nothing to decode.
pub(crate) fn decode_query(raw: &str) -> Cow<'_, str> {
    if !raw.contains(['%', '+']) {
        return Cow::Borrowed(raw);
    }
    let spaced = raw.replace('+', " ");
    Cow::Owned(percent_decode_str(&spaced).decode_utf8_lossy().into_owned())
}

/// A path segment as text (`+` stays a plus).
pub(crate) fn decode_segment(raw: &str) -> Cow<'_, str> {
    percent_decode_str(raw).decode_utf8_lossy()
}

/// Appends `text` percent-encoded with `set`.
pub(crate) fn push_encoded(out: &mut String, text: &str, set: &'static AsciiSet) {
    out.extend(utf8_percent_encode(text, set));
}

/// The name of a raw `name=value` pair, decoded.
pub(crate) fn pair_name(pair: &str) -> Cow<'_, str> {
    decode_query(pair.split('=').next().unwrap_or_default())
}

/// The raw value of the first parameter called `name` in a raw query.
pub(crate) fn query_value<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .find(|p| pair_name(p) == name)
        .map(|p| p.split_once('=').map_or("", |(_, v)| v))
}

/// One value or a list of them.
#[derive(Debug, Default)]
pub struct Values(Vec<String>);

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Values;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Values, E> {
                Ok(Values(vec![v.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Values, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element::<String>()? {
                    out.push(v);
                }
                Ok(Values(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// `set-query-parameter` configuration.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct SetQueryParameterConfig {
    name: String,
    #[serde(default)]
    value: Option<Values>,
    #[serde(default)]
    exists_action: ExistsAction,
}

/// Sets, appends or removes a query parameter of the request sent to the backend (inbound
/// and backend sections); the other parameters stay as the client sent them, in order.
#[derive(Debug)]
pub struct SetQueryParameter {
    name: String,
    action: ExistsAction,
    /// `name=v1&name=v2`, encoded once.
    pairs: String,
}

impl SetQueryParameter {
    /// The new query, or `None` when nothing changes.
    fn apply(&self, query: &str) -> Option<String> {
        let is_ours = |pair: &str| pair_name(pair) == self.name.as_str();
        let present = query.split('&').any(|p| !p.is_empty() && is_ours(p));
        match (self.action, present) {
            (ExistsAction::Skip, true) | (ExistsAction::Delete, false) => return None,
            _ => {}
        }
        let mut out = String::with_capacity(query.len() + self.pairs.len() + 1);
        let push = |out: &mut String, s: &str| {
            if !out.is_empty() {
                out.push('&');
            }
            out.push_str(s);
        };
        let mut written = false;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            if !is_ours(pair) {
                push(&mut out, pair);
                continue;
            }
            match self.action {
                // The new values take the place of the first old one.
                ExistsAction::Override => {
                    if !written {
                        push(&mut out, &self.pairs);
                        written = true;
                    }
                }
                ExistsAction::Delete => {}
                ExistsAction::Append | ExistsAction::Skip => push(&mut out, pair),
            }
        }
        if !written && self.action != ExistsAction::Delete {
            push(&mut out, &self.pairs);
        }
        Some(out)
    }
}

impl Policy for SetQueryParameter {
    type Config = SetQueryParameterConfig;

    fn new(c: SetQueryParameterConfig) -> Result<Self, String> {
        if c.name.is_empty() {
            return Err("name: must not be empty".into());
        }
        let values = c.value.unwrap_or_default().0;
        if c.exists_action != ExistsAction::Delete && values.is_empty() {
            return Err(
                "value: required (a string or a non-empty list) unless exists_action is \"delete\""
                    .into(),
            );
        }
        let mut pairs = String::new();
        for v in &values {
            if !pairs.is_empty() {
                pairs.push('&');
            }
            push_encoded(&mut pairs, &c.name, QUERY);
            pairs.push('=');
            push_encoded(&mut pairs, v, QUERY);
        }
        Ok(SetQueryParameter {
            name: c.name,
            action: c.exists_action,
            pairs,
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let Some(query) = self.apply(req.query()) else {
            return Flow::CONTINUE;
        };
        if req.set_query(&query) {
            Flow::CONTINUE
        } else {
            fail(
                ctx,
                "set-query-parameter: the gateway refused the new query",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::{on_request, on_response, policy, TestContext, TestHead};

    fn run(config: &str, query: &str) -> String {
        let p = policy::<SetQueryParameter>(config).unwrap();
        let mut req = TestHead::request("GET", "/svc/x");
        req.query = query.into();
        assert_eq!(
            on_request(&p, &mut req, &mut TestContext::default()),
            Flow::CONTINUE
        );
        req.query
    }

    #[test]
    fn override_replaces_in_place_and_encodes() {
        let c = r#"{"name":"q","value":"a b&c=d/é"}"#;
        assert_eq!(
            run(c, "x=1&q=old&y=2&q=older"),
            "x=1&q=a%20b%26c%3Dd%2F%C3%A9&y=2"
        );
        assert_eq!(run(c, ""), "q=a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(run(c, "x=1"), "x=1&q=a%20b%26c%3Dd%2F%C3%A9");
        // The name matches encoded and form-encoded spellings.
        let c = r#"{"name":"my key","value":"v"}"#;
        assert_eq!(run(c, "my+key=1&my%20key=2&z"), "my%20key=v&z");
    }

    #[test]
    fn several_values_skip_append_delete() {
        let c = r#"{"name":"tag","value":["a","b"]}"#;
        assert_eq!(run(c, "tag=z&k=1"), "tag=a&tag=b&k=1");
        let c = r#"{"name":"tag","value":"b","exists_action":"append"}"#;
        assert_eq!(run(c, "tag=a&k=1"), "tag=a&k=1&tag=b");
        let c = r#"{"name":"tag","value":"b","exists_action":"skip"}"#;
        assert_eq!(run(c, "k=1&tag=a"), "k=1&tag=a");
        assert_eq!(run(c, "k=1"), "k=1&tag=b");
        let c = r#"{"name":"tag","exists_action":"delete"}"#;
        assert_eq!(run(c, "tag=a&k=1&tag&tags=3"), "k=1&tags=3");
        assert_eq!(run(c, "k=1"), "k=1");
        assert_eq!(run(c, "tag=1"), "");
    }

    #[test]
    fn responses_are_left_alone() {
        let p = policy::<SetQueryParameter>(r#"{"name":"q","value":"1"}"#).unwrap();
        let mut resp = TestHead::response(200);
        assert_eq!(
            on_response(&p, &mut resp, &mut TestContext::default()),
            Flow::CONTINUE
        );
        assert_eq!(resp.query, "");
    }

    #[test]
    fn bad_configs_are_refused() {
        for (config, needle) in [
            (r#"{"name":"","value":"x"}"#, "name: must not be empty"),
            (r#"{"name":"q"}"#, "value: required"),
            (r#"{"name":"q","value":[]}"#, "value: required"),
            (r#"{"name":"q","value":7}"#, "a string or a list of strings"),
            (
                r#"{"name":"q","value":"x","exists_action":"merge"}"#,
                "merge",
            ),
            (r#"{"name":"q","values":"x"}"#, "values"),
        ] {
            let e = policy::<SetQueryParameter>(config).err().unwrap();
            assert!(e.message.contains(needle), "{config}: {}", e.message);
        }
    }

    #[test]
    fn helpers() {
        assert_eq!(query_value("a=1&b=x%20y&b=2", "b"), Some("x%20y"));
        assert_eq!(query_value("a&b=2", "a"), Some(""));
        assert_eq!(query_value("a=1", "c"), None);
        assert_eq!(decode_query("a+b%2B"), "a b+");
        assert_eq!(decode_segment("a+b%20"), "a+b ");
        let mut s = String::new();
        push_encoded(&mut s, "a b/c:d", SEGMENT);
        assert_eq!(s, "a%20b%2Fc:d");
    }
}

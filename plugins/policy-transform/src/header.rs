//! `set-header`: sets, appends or removes a request or response header.

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{Context, Flow, Head, Policy};

use crate::text::Text;
use crate::{is_header_value, is_token};

/// What `set-header` (and `set-query-parameter`) does when the name is already there.
#[derive(Deserialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
#[serde(crate = "outpost_plugin_sdk::serde", rename_all = "snake_case")]
pub enum ExistsAction {
    /// Replace it (or add it).
    #[default]
    Override,
    /// Leave an existing one alone; add it when absent.
    Skip,
    /// Add another value.
    Append,
    /// Remove it.
    Delete,
}

/// `set-header` configuration.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct SetHeaderConfig {
    name: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    exists_action: ExistsAction,
}

/// Sets, appends or removes a header: on the request in the inbound and backend sections, on
/// the response in outbound. The value may use the SDK's template expressions
/// (`{var.tier}`, `{header.x-user}`, …).
#[derive(Debug)]
pub struct SetHeader {
    name: String,
    /// `None` for `delete`.
    value: Option<Text>,
    action: ExistsAction,
}

impl SetHeader {
    fn apply(&self, head: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let name = self.name.as_str();
        let Some(value) = &self.value else {
            head.remove_header(name);
            return Flow::CONTINUE;
        };
        if self.action == ExistsAction::Skip && head.header(name).is_some() {
            return Flow::CONTINUE;
        }
        // A rendered value that is not a valid header value (control characters from a
        // variable) is not set; with override, the header the client sent is removed rather
        // than passed on as if it had been replaced.
        value.with(head, ctx, |head, _, v| match self.action {
            ExistsAction::Append => head.append_header(name, v.as_bytes()),
            _ => {
                head.set_header(name, v.as_bytes()) || {
                    head.remove_header(name);
                    false
                }
            }
        });
        Flow::CONTINUE
    }
}

impl Policy for SetHeader {
    type Config = SetHeaderConfig;

    fn new(config: SetHeaderConfig) -> Result<Self, String> {
        if !is_token(&config.name) {
            return Err(format!(
                "name: '{}' is not a valid header name",
                config.name
            ));
        }
        let value = match (config.exists_action, config.value) {
            (ExistsAction::Delete, _) => None,
            (_, None) => return Err("value: required unless exists_action is \"delete\"".into()),
            (_, Some(v)) => {
                if !is_header_value(&v) {
                    return Err("value: control characters are not allowed in a header".into());
                }
                Some(Text::parse("value", &v)?)
            }
        };
        Ok(SetHeader {
            name: config.name,
            value,
            action: config.exists_action,
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.apply(req, ctx)
    }

    fn on_response(&self, resp: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.apply(resp, ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::{on_request, on_response, policy, TestContext, TestHead};

    #[test]
    fn an_invalid_rendered_value_removes_the_clients_header() {
        let p = policy::<SetHeader>(r#"{"name":"x-tenant","value":"{query.t}"}"#).unwrap();
        let mut req = TestHead::request("GET", "/").with_header("x-tenant", "admin");
        req.query = "t=a%0Ab".into();
        on_request(&p, &mut req, &mut TestContext::default());
        assert_eq!(req.header_str("x-tenant"), None);
    }

    #[test]
    fn set_header_actions() {
        let p = policy::<SetHeader>(r#"{"name":"x-env","value":"prod"}"#).unwrap();
        let mut req = TestHead::request("GET", "/").with_header("x-env", "dev");
        assert_eq!(
            on_request(&p, &mut req, &mut TestContext::default()),
            Flow::CONTINUE
        );
        assert_eq!(req.header_str("x-env"), Some("prod"));

        let p = policy::<SetHeader>(r#"{"name":"x-env","value":"prod","exists_action":"skip"}"#)
            .unwrap();
        let mut req = TestHead::request("GET", "/").with_header("x-env", "dev");
        on_request(&p, &mut req, &mut TestContext::default());
        assert_eq!(req.header_str("x-env"), Some("dev"));
        let mut req = TestHead::request("GET", "/");
        on_request(&p, &mut req, &mut TestContext::default());
        assert_eq!(req.header_str("x-env"), Some("prod"));

        let p = policy::<SetHeader>(r#"{"name":"x-env","value":"b","exists_action":"append"}"#)
            .unwrap();
        let mut req = TestHead::request("GET", "/").with_header("x-env", "a");
        on_request(&p, &mut req, &mut TestContext::default());
        let values: Vec<_> = req
            .headers
            .iter()
            .filter(|(n, _)| n == "x-env")
            .map(|(_, v)| v.as_slice())
            .collect();
        assert_eq!(values, [&b"a"[..], &b"b"[..]]);

        // Templates: a variable an earlier policy set, a request header; `{{` is a brace.
        let p =
            policy::<SetHeader>(r#"{"name":"x-who","value":"{var.user} via {header.host} {{1}}"}"#)
                .unwrap();
        let mut req = TestHead::request("GET", "/").with_header("host", "gw");
        let mut ctx = TestContext::default();
        ctx.variables.insert("user".into(), "ann".into());
        on_request(&p, &mut req, &mut ctx);
        assert_eq!(req.header_str("x-who"), Some("ann via gw {1}"));

        let p = policy::<SetHeader>(r#"{"name":"server","exists_action":"delete"}"#).unwrap();
        let mut resp = TestHead::response(200).with_header("server", "x");
        on_response(&p, &mut resp, &mut TestContext::default());
        assert_eq!(resp.header_str("server"), None);
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let e = policy::<SetHeader>(r#"{"name":"bad name","value":"x"}"#)
            .err()
            .unwrap();
        assert!(
            e.message.contains("not a valid header name"),
            "{}",
            e.message
        );
        let e = policy::<SetHeader>(r#"{"name":"x"}"#).err().unwrap();
        assert!(e.message.contains("value"), "{}", e.message);
        let e = policy::<SetHeader>(r#"{"name":"x","value":"a\r\nb: c"}"#)
            .err()
            .unwrap();
        assert!(e.message.contains("control characters"), "{}", e.message);
        let e = policy::<SetHeader>(r#"{"name":"x","value":"{var.}"}"#)
            .err()
            .unwrap();
        assert!(
            e.message.contains("value: expression '{var.}'"),
            "{}",
            e.message
        );
        let e = policy::<SetHeader>(r#"{"name":"x","value":"y","colour":1}"#)
            .err()
            .unwrap();
        assert!(e.message.contains("colour"), "{}", e.message);
        let e = policy::<SetHeader>(r#"{"name":"x","value":"y","exists_action":"merge"}"#)
            .err()
            .unwrap();
        assert!(e.message.contains("merge"), "{}", e.message);
    }
}

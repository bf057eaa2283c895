//! Transformation and routing policies, as APIM names them:
//!
//! * `set-header` — `{"name": "x-env", "value": "prod", "exists_action": "override"}`
//!   (`override` (default), `skip`, `append`, `delete`). On the request in inbound/backend
//!   sections, on the response in outbound.
//! * `return-response` — `{"status": 200, "body": "…", "headers": {"content-type": "…"}}`:
//!   answers without calling the backend.

use std::collections::BTreeMap;

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{export_plugin, Context, Flow, Head, Policy};

/// What `set-header` does when the header exists.
#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(crate = "outpost_plugin_sdk::serde", rename_all = "snake_case")]
pub enum ExistsAction {
    /// Replace it (or add it).
    #[default]
    Override,
    /// Leave an existing header alone; add it when absent.
    Skip,
    /// Add another value.
    Append,
    /// Remove it.
    Delete,
}

/// `set-header` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct SetHeaderConfig {
    name: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    exists_action: ExistsAction,
}

/// Sets, appends or removes a header.
pub struct SetHeader(SetHeaderConfig);

impl SetHeader {
    fn apply(&self, head: &mut Head<'_, '_>) -> Flow {
        let c = &self.0;
        let value = c.value.as_deref().unwrap_or_default().as_bytes();
        match c.exists_action {
            ExistsAction::Override => {
                head.set_header(&c.name, value);
            }
            ExistsAction::Skip => {
                if head.header(&c.name).is_none() {
                    head.set_header(&c.name, value);
                }
            }
            ExistsAction::Append => {
                head.append_header(&c.name, value);
            }
            ExistsAction::Delete => {
                head.remove_header(&c.name);
            }
        }
        Flow::CONTINUE
    }
}

impl Policy for SetHeader {
    type Config = SetHeaderConfig;

    fn new(config: SetHeaderConfig) -> Result<Self, String> {
        if config.name.is_empty()
            || !config
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(format!("'{}' is not a valid header name", config.name));
        }
        if config.exists_action != ExistsAction::Delete && config.value.is_none() {
            return Err("`value` is required unless exists_action is \"delete\"".into());
        }
        Ok(SetHeader(config))
    }

    fn on_request(&self, req: &mut Head<'_, '_>, _: &mut Context<'_, '_>) -> Flow {
        self.apply(req)
    }

    fn on_response(&self, resp: &mut Head<'_, '_>, _: &mut Context<'_, '_>) -> Flow {
        self.apply(resp)
    }
}


/// `return-response` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct ReturnResponseConfig {
    #[serde(default = "default_status")]
    status: u16,
    #[serde(default)]
    body: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn default_status() -> u16 {
    200
}

/// Answers without calling the backend.
pub struct ReturnResponse(ReturnResponseConfig);

impl Policy for ReturnResponse {
    type Config = ReturnResponseConfig;

    fn new(config: ReturnResponseConfig) -> Result<Self, String> {
        if !(100..=599).contains(&config.status) {
            return Err(format!("status {} is not an HTTP status", config.status));
        }
        Ok(ReturnResponse(config))
    }

    fn on_request(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.respond(ctx)
    }

    fn on_response(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.respond(ctx)
    }
}

impl ReturnResponse {
    fn respond(&self, ctx: &mut Context<'_, '_>) -> Flow {
        ctx.respond(self.0.status, self.0.body.as_bytes());
        for (k, v) in &self.0.headers {
            ctx.respond_header(k, v.as_bytes());
        }
        Flow::RESPOND
    }
}

export_plugin! {
    name: "policy-transform",
    version: env!("CARGO_PKG_VERSION"),
    policies: [
        "set-header" => SetHeader,
        "return-response" => ReturnResponse,
    ],
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::{on_request, on_response, policy, TestContext, TestHead};

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
        let e = policy::<SetHeader>(r#"{"name":"x","value":"y","colour":1}"#)
            .err()
            .unwrap();
        assert!(e.message.contains("colour"), "{}", e.message);
    }

    #[test]
    fn return_response_answers() {
        let p = policy::<ReturnResponse>(
            r#"{"status":418,"body":"teapot","headers":{"x-why":"because"}}"#,
        )
        .unwrap();
        let mut ctx = TestContext::default();
        let mut req = TestHead::request("GET", "/");
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::RESPOND);
        let (status, headers, body) = ctx.response.unwrap();
        assert_eq!((status, body.as_slice()), (418, &b"teapot"[..]));
        assert_eq!(headers, vec![("x-why".to_string(), b"because".to_vec())]);
    }
}

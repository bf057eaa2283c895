//! Basic header and response policies, as APIM names them:
//!
//! * `set-header` — `{"name": "x-env", "value": "prod", "exists_action": "override"}`
//!   (`override` (default), `skip`, `append`, `delete`). On the request in inbound/backend
//!   sections, on the response in outbound.
//! * `check-header` — `{"name": "x-client", "values": ["a", "b"], "ignore_case": true,
//!   "failed_check_httpcode": 401, "failed_check_error_message": "…"}`: answers with that
//!   status when the header is missing or (with `values`) has another value.
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

/// `check-header` configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct CheckHeaderConfig {
    name: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    ignore_case: bool,
    #[serde(default = "default_code")]
    failed_check_httpcode: u16,
    #[serde(default)]
    failed_check_error_message: Option<String>,
}

fn default_code() -> u16 {
    401
}

/// Refuses requests whose header is missing or not one of the allowed values.
pub struct CheckHeader(CheckHeaderConfig);

impl Policy for CheckHeader {
    type Config = CheckHeaderConfig;

    fn new(config: CheckHeaderConfig) -> Result<Self, String> {
        if !(400..=599).contains(&config.failed_check_httpcode) {
            return Err("failed_check_httpcode must be between 400 and 599".into());
        }
        Ok(CheckHeader(config))
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let c = &self.0;
        let ok = match req.header(&c.name) {
            None => false,
            Some(_) if c.values.is_empty() => true,
            Some(v) => c.values.iter().any(|allowed| {
                if c.ignore_case {
                    allowed.as_bytes().eq_ignore_ascii_case(v)
                } else {
                    allowed.as_bytes() == v
                }
            }),
        };
        if ok {
            return Flow::CONTINUE;
        }
        let message = c.failed_check_error_message.clone().unwrap_or_else(|| {
            format!(
                "Header '{}' is missing or has a value that is not allowed.",
                c.name
            )
        });
        let body = format!(
            "{{\"statusCode\":{},\"error\":\"header_check_failed\",\"message\":{}}}",
            c.failed_check_httpcode,
            json_string(&message)
        );
        ctx.respond(c.failed_check_httpcode, body.as_bytes());
        ctx.respond_header("content-type", b"application/json");
        Flow::RESPOND
    }
}

fn json_string(s: &str) -> String {
    outpost_plugin_sdk::serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
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
    name: "policy-basic",
    version: env!("CARGO_PKG_VERSION"),
    policies: [
        "set-header" => SetHeader,
        "check-header" => CheckHeader,
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
        let e = policy::<CheckHeader>(r#"{"name":"x","failed_check_httpcode":200}"#)
            .err()
            .unwrap();
        assert!(e.message.contains("400"), "{}", e.message);
    }

    #[test]
    fn check_header_refuses_and_passes() {
        let p = policy::<CheckHeader>(
            r#"{"name":"x-client","values":["Alpha"],"ignore_case":true,"failed_check_httpcode":403}"#,
        )
        .unwrap();
        let mut ctx = TestContext::default();
        let mut ok = TestHead::request("GET", "/").with_header("X-Client", "alpha");
        assert_eq!(on_request(&p, &mut ok, &mut ctx), Flow::CONTINUE);
        let mut bad = TestHead::request("GET", "/").with_header("x-client", "beta");
        assert_eq!(on_request(&p, &mut bad, &mut ctx), Flow::RESPOND);
        let (status, headers, body) = ctx.response.clone().unwrap();
        assert_eq!(status, 403);
        assert_eq!(headers[0].0, "content-type");
        assert!(String::from_utf8(body)
            .unwrap()
            .contains("header_check_failed"));
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

//! Access policies, as APIM names them:
//!
//! * `check-header` — `{"name": "x-client", "values": ["a", "b"], "ignore_case": true,
//!   "failed_check_httpcode": 401, "failed_check_error_message": "…"}`: answers with that
//!   status when the header is missing or (with `values`) has another value.

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{export_plugin, Context, Flow, Head, Policy};

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

export_plugin! {
    name: "policy-access",
    version: env!("CARGO_PKG_VERSION"),
    policies: [
        "check-header" => CheckHeader,
    ],
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::{on_request, policy, TestContext, TestHead};

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
    fn check_header_bad_config() {
        let e = policy::<CheckHeader>(r#"{"name":"x","failed_check_httpcode":200}"#)
            .err()
            .unwrap();
        assert!(e.message.contains("400"), "{}", e.message);
    }
}

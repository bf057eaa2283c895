//! `check-header`: refuses requests whose header is missing or not one of the allowed values.

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{Context, Flow, Head, Policy};

use crate::{check_status, refuse};

/// `check-header` configuration: `{"name": "x-client", "values": ["a", "b"],
/// "ignore_case": true, "failed_check_httpcode": 401, "failed_check_error_message": "…"}`.
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
pub struct CheckHeader {
    config: CheckHeaderConfig,
    message: String,
}

impl Policy for CheckHeader {
    type Config = CheckHeaderConfig;

    fn new(config: CheckHeaderConfig) -> Result<Self, String> {
        check_status("failed_check_httpcode", config.failed_check_httpcode)?;
        if config.name.is_empty() {
            return Err("name must not be empty".into());
        }
        let message = config
            .failed_check_error_message
            .clone()
            .unwrap_or_else(|| {
                format!(
                    "Header '{}' is missing or has a value that is not allowed.",
                    config.name
                )
            });
        Ok(CheckHeader { config, message })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let c = &self.config;
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
        refuse(
            ctx,
            c.failed_check_httpcode,
            "header_check_failed",
            &self.message,
            &[],
        )
    }
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

        // Case matters without ignore_case; a missing header is refused with the default 401.
        let p = policy::<CheckHeader>(r#"{"name":"x-client","values":["Alpha"]}"#).unwrap();
        let mut ctx = TestContext::default();
        let mut lower = TestHead::request("GET", "/").with_header("x-client", "alpha");
        assert_eq!(on_request(&p, &mut lower, &mut ctx), Flow::RESPOND);
        let mut none = TestHead::request("GET", "/");
        assert_eq!(on_request(&p, &mut none, &mut ctx), Flow::RESPOND);
        assert_eq!(ctx.response.as_ref().unwrap().0, 401);
    }

    #[test]
    fn check_header_bad_config() {
        let e = policy::<CheckHeader>(r#"{"name":"x","failed_check_httpcode":200}"#)
            .err()
            .unwrap();
        assert!(e.message.contains("failed_check_httpcode"), "{}", e.message);
        let e = policy::<CheckHeader>(r#"{"name":""}"#).err().unwrap();
        assert!(e.message.contains("name"), "{}", e.message);
    }
}

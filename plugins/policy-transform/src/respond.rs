//! `return-response` and `mock-response`: answer without (or instead of) the backend.

use std::collections::BTreeMap;

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::serde_json::Value;
use outpost_plugin_sdk::{Context, Flow, Head, Policy};

use crate::{is_header_value, is_token};

/// `return-response` configuration.
#[derive(Deserialize, Debug)]
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

fn check_status(field: &str, status: u16) -> Result<(), String> {
    if (100..=599).contains(&status) {
        Ok(())
    } else {
        Err(format!("{field}: {status} is not an HTTP status (100-599)"))
    }
}

/// Answers with a fixed response, without calling the backend (in inbound or backend), or
/// instead of the backend's response (in outbound and on-error).
#[derive(Debug)]
pub struct ReturnResponse(ReturnResponseConfig);

impl Policy for ReturnResponse {
    type Config = ReturnResponseConfig;

    fn new(config: ReturnResponseConfig) -> Result<Self, String> {
        check_status("status", config.status)?;
        for (name, value) in &config.headers {
            if !is_token(name) {
                return Err(format!("headers: '{name}' is not a valid header name"));
            }
            if !is_header_value(value) {
                return Err(format!(
                    "headers: the value of '{name}' has control characters"
                ));
            }
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

/// `mock-response` configuration.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct MockResponseConfig {
    #[serde(default = "default_status")]
    status_code: u16,
    #[serde(default = "default_content_type")]
    content_type: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    example: Option<Value>,
}

fn default_content_type() -> String {
    "application/json".into()
}

/// Answers with a sample response, as APIM's `mock-response`: APIM takes the sample from the
/// operation's documented examples; Outpost has no API description, so the sample is in the
/// configuration (`example`, a JSON value, or `body`, text).
#[derive(Debug)]
pub struct MockResponse {
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

impl Policy for MockResponse {
    type Config = MockResponseConfig;

    fn new(c: MockResponseConfig) -> Result<Self, String> {
        check_status("status_code", c.status_code)?;
        if c.content_type.is_empty() || !is_header_value(&c.content_type) {
            return Err("content_type: must be a non-empty header value".into());
        }
        let body = match (c.body, c.example) {
            (Some(_), Some(_)) => return Err("give `body` or `example`, not both".into()),
            (Some(b), None) => b.into_bytes(),
            (None, Some(e)) => e.to_string().into_bytes(),
            (None, None) => Vec::new(),
        };
        Ok(MockResponse {
            status: c.status_code,
            content_type: c.content_type,
            body,
        })
    }

    fn on_request(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.respond(ctx)
    }

    fn on_response(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.respond(ctx)
    }
}

impl MockResponse {
    fn respond(&self, ctx: &mut Context<'_, '_>) -> Flow {
        ctx.respond(self.status, &self.body);
        if !self.body.is_empty() {
            ctx.respond_header("content-type", self.content_type.as_bytes());
        }
        Flow::RESPOND
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::{on_request, on_response, policy, TestContext, TestHead};

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

    #[test]
    fn return_response_refuses_bad_configs() {
        for (config, needle) in [
            (r#"{"status":99}"#, "status: 99"),
            (
                r#"{"headers":{"a b":"x"}}"#,
                "'a b' is not a valid header name",
            ),
            (r#"{"headers":{"x":"a\nb"}}"#, "control characters"),
            (r#"{"code":200}"#, "code"),
        ] {
            let e = policy::<ReturnResponse>(config).err().unwrap();
            assert!(e.message.contains(needle), "{config}: {}", e.message);
        }
    }

    #[test]
    fn mock_response_answers_with_the_example() {
        let p = policy::<MockResponse>(r#"{"status_code":201,"example":{"id":7}}"#).unwrap();
        let mut ctx = TestContext::default();
        assert_eq!(
            on_request(&p, &mut TestHead::request("POST", "/"), &mut ctx),
            Flow::RESPOND
        );
        let (status, headers, body) = ctx.response.unwrap();
        assert_eq!(status, 201);
        assert_eq!(body, br#"{"id":7}"#);
        assert_eq!(
            headers,
            vec![("content-type".to_string(), b"application/json".to_vec())]
        );

        // Defaults: 200, no body, so no content type; also replaces a backend response.
        let p = policy::<MockResponse>("{}").unwrap();
        let mut ctx = TestContext::default();
        assert_eq!(
            on_response(&p, &mut TestHead::response(500), &mut ctx),
            Flow::RESPOND
        );
        assert_eq!(ctx.response, Some((200, Vec::new(), Vec::new())));

        let p = policy::<MockResponse>(r#"{"content_type":"text/plain","body":"hi"}"#).unwrap();
        let mut ctx = TestContext::default();
        on_request(&p, &mut TestHead::request("GET", "/"), &mut ctx);
        let (_, headers, body) = ctx.response.unwrap();
        assert_eq!(body, b"hi");
        assert_eq!(headers[0].1, b"text/plain");
    }

    #[test]
    fn mock_response_refuses_bad_configs() {
        for (config, needle) in [
            (r#"{"status_code":700}"#, "status_code: 700"),
            (r#"{"body":"a","example":1}"#, "not both"),
            (r#"{"content_type":""}"#, "content_type"),
            (r#"{"status":200}"#, "status"),
        ] {
            let e = policy::<MockResponse>(config).err().unwrap();
            assert!(e.message.contains(needle), "{config}: {}", e.message);
        }
    }
}

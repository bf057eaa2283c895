//! `set-method`, `set-status` and `set-body`: change the request's method, the response's
//! status, and either message's body.

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{phase, Context, Flow, Head, Policy};

use crate::{fail, is_header_value, is_token};

/// `set-method` configuration.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct SetMethodConfig {
    method: String,
}

/// Changes the method of the request sent to the backend (inbound and backend sections).
#[derive(Debug)]
pub struct SetMethod(String);

impl Policy for SetMethod {
    type Config = SetMethodConfig;

    fn new(c: SetMethodConfig) -> Result<Self, String> {
        if !is_token(&c.method) {
            return Err(format!("method: '{}' is not an HTTP method", c.method));
        }
        Ok(SetMethod(c.method))
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        if req.set_method(&self.0) {
            Flow::CONTINUE
        } else {
            fail(ctx, "set-method: the gateway refused the method")
        }
    }
}

/// `set-status` configuration.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct SetStatusConfig {
    code: u16,
    #[serde(default)]
    reason: Option<String>,
}

/// Sets the status of the response. In outbound it changes the backend's response; where
/// there is no response to change — inbound, backend, on-error — it answers with the status
/// and an empty body (in inbound and backend at once; in on-error the later on-error steps
/// still run and may replace the answer, e.g. `return-response`).
#[derive(Debug)]
pub struct SetStatus(u16);

impl SetStatus {
    fn answer(&self, ctx: &mut Context<'_, '_>) -> Flow {
        ctx.respond(self.0, b"");
        if ctx.phase() == phase::ON_ERROR {
            // The gateway sends the answer once the on-error section is done.
            Flow::CONTINUE
        } else {
            Flow::RESPOND
        }
    }
}

impl Policy for SetStatus {
    type Config = SetStatusConfig;

    fn new(c: SetStatusConfig) -> Result<Self, String> {
        if !(100..=599).contains(&c.code) {
            return Err(format!("code: {} is not an HTTP status (100-599)", c.code));
        }
        if c.reason.as_deref().is_some_and(|r| !is_header_value(r)) {
            return Err("reason: control characters are not allowed".into());
        }
        Ok(SetStatus(c.code))
    }

    fn on_request(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.answer(ctx)
    }

    fn on_response(&self, resp: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        if ctx.phase() == phase::ON_ERROR {
            return self.answer(ctx);
        }
        if resp.set_status(self.0) {
            Flow::CONTINUE
        } else {
            fail(ctx, "set-status: the gateway refused the status")
        }
    }
}

/// `set-body` configuration.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct SetBodyConfig {
    body: String,
    #[serde(default)]
    content_type: Option<String>,
}

/// Replaces the body of the request (inbound, backend) or of the response (outbound); the
/// gateway sets `Content-Length` to the new length.
#[derive(Debug)]
pub struct SetBody(SetBodyConfig);

impl SetBody {
    fn apply(&self, head: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        ctx.set_body(self.0.body.as_bytes());
        if let Some(ct) = &self.0.content_type {
            head.set_header("content-type", ct.as_bytes());
        }
        Flow::CONTINUE
    }
}

impl Policy for SetBody {
    type Config = SetBodyConfig;

    fn new(c: SetBodyConfig) -> Result<Self, String> {
        if c.content_type
            .as_deref()
            .is_some_and(|t| t.is_empty() || !is_header_value(t))
        {
            return Err("content_type: must be a non-empty header value".into());
        }
        Ok(SetBody(c))
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
    fn set_method_changes_the_request() {
        let p = policy::<SetMethod>(r#"{"method":"PATCH"}"#).unwrap();
        let mut req = TestHead::request("GET", "/");
        assert_eq!(
            on_request(&p, &mut req, &mut TestContext::default()),
            Flow::CONTINUE
        );
        assert_eq!(req.method, "PATCH");
        for (config, needle) in [
            (r#"{"method":"GE T"}"#, "'GE T' is not an HTTP method"),
            (r#"{"method":""}"#, "method"),
            (r#"{}"#, "method"),
        ] {
            let e = policy::<SetMethod>(config).err().unwrap();
            assert!(e.message.contains(needle), "{config}: {}", e.message);
        }
    }

    #[test]
    fn set_status_changes_the_response_or_answers() {
        let p = policy::<SetStatus>(r#"{"code":202,"reason":"Accepted"}"#).unwrap();
        let mut resp = TestHead::response(200);
        let mut ctx = TestContext::default();
        assert_eq!(on_response(&p, &mut resp, &mut ctx), Flow::CONTINUE);
        assert_eq!(resp.status, 202);
        assert!(ctx.response.is_none());

        // Inbound: no response yet, so it answers.
        let mut ctx = TestContext::default();
        assert_eq!(
            on_request(&p, &mut TestHead::request("GET", "/"), &mut ctx),
            Flow::RESPOND
        );
        assert_eq!(ctx.response, Some((202, Vec::new(), Vec::new())));

        // On-error, before or after the backend answered: it sets the answer and lets the
        // section go on.
        for response in [false, true] {
            let mut ctx = TestContext {
                phase: phase::ON_ERROR,
                ..TestContext::default()
            };
            let mut head = match response {
                true => TestHead::response(500),
                false => TestHead::request("GET", "/"),
            };
            assert_eq!(on_error(&p, &mut head, &mut ctx, response), Flow::CONTINUE);
            assert_eq!(ctx.response, Some((202, Vec::new(), Vec::new())));
        }
    }

    /// Calls a hook the way the gateway's on-error section does: the section's hook, phase
    /// ON_ERROR (the SDK's `on_request`/`on_response` helpers set their own phase).
    fn on_error(
        p: &outpost_plugin_sdk::api::PolicyBox,
        head: &mut TestHead,
        ctx: &mut TestContext,
        response: bool,
    ) -> Flow {
        use outpost_plugin_sdk::api::abi_stable::sabi_trait::TD_Opaque;
        use outpost_plugin_sdk::api::abi_stable::sabi_types::RMut;
        use outpost_plugin_sdk::api::{HttpHead_TO, RequestContext_TO};
        let mut h = HttpHead_TO::from_ptr(RMut::new(head), TD_Opaque);
        let mut c = RequestContext_TO::from_ptr(RMut::new(ctx), TD_Opaque);
        if response {
            p.on_response(&mut h, &mut c)
        } else {
            p.on_request(&mut h, &mut c)
        }
    }

    #[test]
    fn set_status_refuses_bad_configs() {
        for (config, needle) in [
            (r#"{"code":99}"#, "code: 99"),
            (r#"{"code":200,"reason":"a\r\nb"}"#, "reason"),
            (r#"{"status":200}"#, "status"),
        ] {
            let e = policy::<SetStatus>(config).err().unwrap();
            assert!(e.message.contains(needle), "{config}: {}", e.message);
        }
    }

    #[test]
    fn set_body_replaces_either_body() {
        let p =
            policy::<SetBody>(r#"{"body":"{\"a\":1}","content_type":"application/json"}"#).unwrap();
        let mut req = TestHead::request("POST", "/").with_header("content-type", "text/plain");
        let mut ctx = TestContext::default();
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::CONTINUE);
        assert_eq!(ctx.body.as_deref(), Some(&br#"{"a":1}"#[..]));
        assert_eq!(req.header_str("content-type"), Some("application/json"));

        let p = policy::<SetBody>(r#"{"body":""}"#).unwrap();
        let mut resp = TestHead::response(200).with_header("content-type", "text/plain");
        let mut ctx = TestContext {
            body: Some(b"old".to_vec()),
            ..TestContext::default()
        };
        on_response(&p, &mut resp, &mut ctx);
        assert_eq!(ctx.body.as_deref(), Some(&b""[..]));
        assert_eq!(resp.header_str("content-type"), Some("text/plain"));

        for (config, needle) in [
            (r#"{}"#, "body"),
            (r#"{"body":"x","content_type":""}"#, "content_type"),
        ] {
            let e = policy::<SetBody>(config).err().unwrap();
            assert!(e.message.contains(needle), "{config}: {}", e.message);
        }
    }
}

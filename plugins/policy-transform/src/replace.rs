//! `find-and-replace`: replaces every occurrence of a string in the request or response
//! body.

use memchr::memmem::Finder;
use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{Context, Flow, Head, HostStatus, Policy, Token};

use crate::DEFAULT_MAX_BODY_BYTES;

fn default_max_body_bytes() -> u64 {
    DEFAULT_MAX_BODY_BYTES
}

/// `find-and-replace` configuration.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct FindAndReplaceConfig {
    from: String,
    to: String,
    #[serde(default = "default_max_body_bytes")]
    max_body_bytes: u64,
}

/// Reads the body of the message of its section (request in inbound/backend, response in
/// outbound), up to `max_body_bytes`, and replaces every occurrence of `from` with `to`.
/// A larger body, or one with a `Content-Encoding` (compressed bytes), is left alone.
#[derive(Debug)]
pub struct FindAndReplace {
    from: Finder<'static>,
    to: Vec<u8>,
    limit: u64,
}

impl FindAndReplace {
    fn ask(&self, head: &Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let encoded = head
            .header("content-encoding")
            .is_some_and(|e| !e.eq_ignore_ascii_case(b"identity"));
        if encoded {
            return Flow::CONTINUE;
        }
        let token = ctx.want_body(self.limit);
        ctx.set_slot(u64::from(token.0));
        Flow::PAUSE
    }

    /// The body with every occurrence replaced, or `None` when there is none.
    fn replace(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut hits = self.from.find_iter(body).peekable();
        hits.peek()?;
        let n = self.from.needle().len();
        let mut out = Vec::with_capacity(body.len() + self.to.len());
        let mut at = 0;
        for hit in hits {
            out.extend_from_slice(&body[at..hit]);
            out.extend_from_slice(&self.to);
            at = hit + n;
        }
        out.extend_from_slice(&body[at..]);
        Some(out)
    }
}

impl Policy for FindAndReplace {
    type Config = FindAndReplaceConfig;

    fn new(c: FindAndReplaceConfig) -> Result<Self, String> {
        if c.from.is_empty() {
            return Err("from: must not be empty".into());
        }
        if c.max_body_bytes == 0 {
            return Err("max_body_bytes: must be more than 0".into());
        }
        Ok(FindAndReplace {
            from: Finder::new(c.from.as_bytes()).into_owned(),
            to: c.to.into_bytes(),
            limit: c.max_body_bytes,
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.ask(req, ctx)
    }

    fn on_response(&self, resp: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.ask(resp, ctx)
    }

    fn on_resume(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        let token = Token(u32::try_from(ctx.slot()).unwrap_or(0));
        // Too large (or not readable): the body goes on unchanged.
        if ctx.result(token).status != HostStatus::OK {
            return Flow::CONTINUE;
        }
        if let Some(new) = ctx.body().and_then(|b| self.replace(b)) {
            ctx.set_body(&new);
        }
        Flow::CONTINUE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::{
        on_request, on_response, on_resume, policy, TestAnswer, TestContext, TestHead, TestRequest,
    };

    fn run(config: &str, body: &[u8], answer: TestAnswer) -> (Flow, TestContext) {
        let p = policy::<FindAndReplace>(config).unwrap();
        let mut req = TestHead::request("POST", "/");
        let mut ctx = TestContext::default();
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::PAUSE);
        assert_eq!(ctx.requests, [TestRequest::Body { limit: 1024 * 1024 }]);
        ctx.answer(Token(ctx.slot as u32), answer);
        ctx.body = Some(body.to_vec());
        let flow = on_resume(&p, &mut req, &mut ctx);
        (flow, ctx)
    }

    #[test]
    fn replaces_every_occurrence() {
        let c = r#"{"from":"cat","to":"dog"}"#;
        let (flow, ctx) = run(c, b"cat, concat, cats", TestAnswer::value(b""));
        assert_eq!(flow, Flow::CONTINUE);
        assert_eq!(ctx.body.as_deref(), Some(&b"dog, condog, dogs"[..]));
        // Longer and shorter replacements, and removal.
        let c = r#"{"from":"aa","to":""}"#;
        let (_, ctx) = run(c, b"aaaab", TestAnswer::value(b""));
        assert_eq!(ctx.body.as_deref(), Some(&b"b"[..]));
    }

    #[test]
    fn a_body_without_it_or_too_large_is_left_alone() {
        let c = r#"{"from":"cat","to":"dog"}"#;
        let (flow, ctx) = run(c, b"bird", TestAnswer::value(b""));
        assert_eq!(flow, Flow::CONTINUE);
        assert_eq!(ctx.body.as_deref(), Some(&b"bird"[..]));
        let too_large = TestAnswer {
            status: HostStatus::TOO_LARGE.0,
            ..TestAnswer::default()
        };
        let (flow, ctx) = run(c, b"cat", too_large);
        assert_eq!(flow, Flow::CONTINUE);
        assert_eq!(ctx.body.as_deref(), Some(&b"cat"[..]));
    }

    #[test]
    fn responses_too_but_not_compressed_ones() {
        let p = policy::<FindAndReplace>(r#"{"from":"a","to":"b","max_body_bytes":10}"#).unwrap();
        let mut resp = TestHead::response(200);
        let mut ctx = TestContext::default();
        assert_eq!(on_response(&p, &mut resp, &mut ctx), Flow::PAUSE);
        assert_eq!(ctx.requests, [TestRequest::Body { limit: 10 }]);
        ctx.answer(Token(ctx.slot as u32), TestAnswer::value(b""));
        ctx.body = Some(b"aXa".to_vec());
        assert_eq!(on_resume(&p, &mut resp, &mut ctx), Flow::CONTINUE);
        assert_eq!(ctx.body.as_deref(), Some(&b"bXb"[..]));

        let mut resp = TestHead::response(200).with_header("content-encoding", "gzip");
        let mut ctx = TestContext::default();
        assert_eq!(on_response(&p, &mut resp, &mut ctx), Flow::CONTINUE);
        assert!(ctx.requests.is_empty());
    }

    #[test]
    fn bad_configs_are_refused() {
        for (config, needle) in [
            (r#"{"from":"","to":"x"}"#, "from: must not be empty"),
            (
                r#"{"from":"a","to":"b","max_body_bytes":0}"#,
                "max_body_bytes",
            ),
            (r#"{"from":"a"}"#, "to"),
            (r#"{"from":"a","to":"b","limit":3}"#, "limit"),
        ] {
            let e = policy::<FindAndReplace>(config).err().unwrap();
            assert!(e.message.contains(needle), "{config}: {}", e.message);
        }
    }
}

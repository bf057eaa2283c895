//! `acme-tag`: stamps requests with a tenant tag and refuses those a blocklist header marks.
//!
//! Configuration: `{"tag": "blue", "block_header": "x-acme-block"}`.

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{export_plugin, level, log, Context, Flow, Head, Policy};

/// The policy's configuration.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct Config {
    /// Value of the `x-acme-tag` header added to every request.
    tag: String,
    /// Requests carrying this header are refused with 403.
    #[serde(default = "default_block")]
    block_header: String,
}

fn default_block() -> String {
    "x-acme-block".into()
}

/// Tags and filters requests.
pub struct AcmeTag(Config);

impl Policy for AcmeTag {
    type Config = Config;

    fn new(config: Config) -> Result<Self, String> {
        if config.tag.is_empty() {
            return Err("`tag` must not be empty".into());
        }
        log(
            level::INFO,
            &format!("acme-tag ready with tag '{}'", config.tag),
        );
        Ok(AcmeTag(config))
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        if req.header(&self.0.block_header).is_some() {
            ctx.respond(403, b"blocked by acme-tag");
            return Flow::RESPOND;
        }
        req.set_header("x-acme-tag", self.0.tag.as_bytes());
        Flow::CONTINUE
    }

    fn on_response(&self, resp: &mut Head<'_, '_>, _: &mut Context<'_, '_>) -> Flow {
        resp.set_header("x-acme-seen", b"1");
        Flow::CONTINUE
    }
}

export_plugin! {
    name: "acme",
    version: env!("CARGO_PKG_VERSION"),
    policies: ["acme-tag" => AcmeTag],
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::{on_request, policy, TestContext, TestHead};

    #[test]
    fn tags_and_blocks() {
        let p = policy::<AcmeTag>(r#"{"tag":"blue"}"#).unwrap();
        let mut req = TestHead::request("GET", "/");
        assert_eq!(
            on_request(&p, &mut req, &mut TestContext::default()),
            Flow::CONTINUE
        );
        assert_eq!(req.header_str("x-acme-tag"), Some("blue"));
        let mut ctx = TestContext::default();
        let mut blocked = TestHead::request("GET", "/").with_header("x-acme-block", "1");
        assert_eq!(on_request(&p, &mut blocked, &mut ctx), Flow::RESPOND);
        assert_eq!(ctx.response.unwrap().0, 403);
    }
}

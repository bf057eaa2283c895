//! `set-variable`: sets a context variable that later policies read.

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{Context, Flow, Head, Policy};

use crate::text::Text;

/// `set-variable` configuration.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct SetVariableConfig {
    name: String,
    value: String,
}

/// Sets a variable, in any section, to a value that may use the SDK's template expressions
/// (`{header.x-tenant}`, `{var.other}`, `{client.ip}`, …).
#[derive(Debug)]
pub struct SetVariable {
    name: String,
    value: Text,
}

impl SetVariable {
    fn apply(&self, head: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        self.value
            .with(head, ctx, |_, ctx, v| ctx.set_variable(&self.name, v));
        Flow::CONTINUE
    }
}

impl Policy for SetVariable {
    type Config = SetVariableConfig;

    fn new(c: SetVariableConfig) -> Result<Self, String> {
        if c.name.is_empty() || c.name.chars().any(char::is_control) {
            return Err("name: must be non-empty, without control characters".into());
        }
        if c.name
            .get(..8)
            .is_some_and(|p| p.eq_ignore_ascii_case("outpost."))
        {
            return Err(format!(
                "name: '{}' is reserved: names starting with 'outpost.' are the gateway's host properties",
                c.name
            ));
        }
        Ok(SetVariable {
            value: Text::parse("value", &c.value)?,
            name: c.name,
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
    fn sets_literal_and_templated_values() {
        let p = policy::<SetVariable>(r#"{"name":"tier","value":"gold {{x}}"}"#).unwrap();
        let mut ctx = TestContext::default();
        assert_eq!(
            on_request(&p, &mut TestHead::request("GET", "/"), &mut ctx),
            Flow::CONTINUE
        );
        assert_eq!(ctx.variables["tier"], "gold {x}");

        let p = policy::<SetVariable>(
            r#"{"name":"who","value":"{header.x-user}@{var.tier}/{client.ip}"}"#,
        )
        .unwrap();
        let mut req = TestHead::request("GET", "/").with_header("x-user", "ann");
        ctx.client_ip = "192.0.2.1".into();
        on_request(&p, &mut req, &mut ctx);
        assert_eq!(ctx.variables["who"], "ann@gold {x}/192.0.2.1");
        // In outbound, header expressions read the response.
        let mut resp = TestHead::response(200).with_header("x-user", "backend");
        on_response(&p, &mut resp, &mut ctx);
        assert_eq!(ctx.variables["who"], "backend@gold {x}/192.0.2.1");
    }

    #[test]
    fn bad_configs_are_refused() {
        for (config, needle) in [
            (r#"{"name":"outpost.backend","value":"x"}"#, "reserved"),
            (r#"{"name":"OUTPOST.retry","value":"x"}"#, "reserved"),
            (r#"{"name":"","value":"x"}"#, "name: must be non-empty"),
            (
                r#"{"name":"a","value":"{nope}"}"#,
                "value: unknown expression",
            ),
            (r#"{"name":"a"}"#, "value"),
        ] {
            let e = policy::<SetVariable>(config).err().unwrap();
            assert!(e.message.contains(needle), "{config}: {}", e.message);
        }
    }
}

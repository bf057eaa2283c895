//! `authentication-basic`: sends HTTP Basic credentials to the backend.

use base64::Engine as _;
use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{Context, Flow, Head, Policy};

/// `authentication-basic` configuration: `{"username": "…", "password": "…"}`.
#[derive(Deserialize)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct AuthenticationBasicConfig {
    username: String,
    password: String,
}

/// Sets `Authorization: Basic base64(username:password)` on the backend request, replacing
/// whatever the client sent.
pub struct AuthenticationBasic {
    /// The whole header value, built once.
    value: Vec<u8>,
}

impl Policy for AuthenticationBasic {
    type Config = AuthenticationBasicConfig;

    fn new(c: AuthenticationBasicConfig) -> Result<Self, String> {
        if c.username.is_empty() {
            return Err("username must not be empty".into());
        }
        // RFC 7617: the user-id cannot contain a colon; control characters break the header.
        if c.username.contains(':') {
            return Err("username must not contain ':' (RFC 7617)".into());
        }
        if c.username.chars().any(char::is_control) || c.password.chars().any(char::is_control) {
            return Err("username and password must not contain control characters".into());
        }
        let credentials = format!("{}:{}", c.username, c.password);
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        );
        Ok(AuthenticationBasic {
            value: value.into_bytes(),
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, _: &mut Context<'_, '_>) -> Flow {
        req.set_header("authorization", &self.value);
        Flow::CONTINUE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::{on_request, policy, TestContext, TestHead};

    #[test]
    fn replaces_the_clients_authorization() {
        let p = policy::<AuthenticationBasic>(r#"{"username":"Aladdin","password":"open sesame"}"#)
            .unwrap();
        let mut req = TestHead::request("GET", "/")
            .with_header("authorization", "Bearer client-token")
            .with_header("Authorization", "Basic second");
        assert_eq!(
            on_request(&p, &mut req, &mut TestContext::default()),
            Flow::CONTINUE
        );
        let values: Vec<_> = req
            .headers
            .iter()
            .filter(|(n, _)| n == "authorization")
            .collect();
        assert_eq!(values.len(), 1);
        // The RFC 7617 example.
        assert_eq!(
            req.header_str("authorization"),
            Some("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        for (config, field) in [
            (r#"{"username":"","password":"p"}"#, "username"),
            (r#"{"username":"a:b","password":"p"}"#, "username"),
            (r#"{"username":"a","password":"p\n"}"#, "password"),
            (r#"{"username":"a"}"#, "password"),
            (r#"{"username":"a","password":"p","realm":"x"}"#, "realm"),
        ] {
            let e = policy::<AuthenticationBasic>(config).err().unwrap();
            assert!(e.message.contains(field), "{config}: {}", e.message);
        }
    }
}

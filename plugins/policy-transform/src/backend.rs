//! `set-backend-service`: sends the request to another backend of the configuration, or to
//! another base URL, through the gateway's `outpost.backend` / `outpost.backend-url` host
//! properties (docs/host-properties.md).

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{Context, Flow, Head, Policy};
use url::Url;

use crate::is_header_value;

/// `set-backend-service` configuration.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct SetBackendServiceConfig {
    #[serde(default)]
    backend_id: Option<String>,
    #[serde(default)]
    base_url: Option<String>,
}

/// Which host property to set, and its value.
#[derive(Debug)]
enum Target {
    Backend(String),
    BaseUrl(String),
}

/// Changes the backend of the request (inbound and backend sections).
#[derive(Debug)]
pub struct SetBackendService(Target);

/// Checks a base URL: absolute `http` or `https`, a host, no credentials, query or fragment.
/// Returns it without trailing slashes (the gateway appends the path after the API's
/// prefix, which starts with one).
fn base_url(raw: &str) -> Result<String, String> {
    let url = Url::parse(raw).map_err(|e| format!("base_url: '{raw}' is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "base_url: '{raw}' must be http:// or https://, not {}://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("base_url: '{raw}' has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "base_url: '{raw}' must not have a query or a fragment"
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "base_url: '{raw}' must not carry credentials (use set-header for Authorization)"
        ));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

impl Policy for SetBackendService {
    type Config = SetBackendServiceConfig;

    fn new(c: SetBackendServiceConfig) -> Result<Self, String> {
        match (c.backend_id, c.base_url) {
            (Some(_), Some(_)) => Err("give `backend_id` or `base_url`, not both".into()),
            (None, None) => Err("one of `backend_id` or `base_url` is required".into()),
            (Some(id), None) => {
                if id.is_empty() || !is_header_value(&id) {
                    return Err("backend_id: must be a non-empty backend id".into());
                }
                Ok(SetBackendService(Target::Backend(id)))
            }
            (None, Some(url)) => Ok(SetBackendService(Target::BaseUrl(base_url(&url)?))),
        }
    }

    fn on_request(&self, _: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        match &self.0 {
            Target::Backend(id) => ctx.set_variable("outpost.backend", id),
            Target::BaseUrl(url) => ctx.set_variable("outpost.backend-url", url),
        }
        Flow::CONTINUE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::{on_request, on_response, policy, TestContext, TestHead};

    fn vars(config: &str) -> TestContext {
        let p = policy::<SetBackendService>(config).unwrap();
        let mut ctx = TestContext::default();
        assert_eq!(
            on_request(&p, &mut TestHead::request("GET", "/svc"), &mut ctx),
            Flow::CONTINUE
        );
        ctx
    }

    #[test]
    fn sets_the_host_property() {
        let ctx = vars(r#"{"backend_id":"green"}"#);
        assert_eq!(ctx.variables["outpost.backend"], "green");
        assert!(!ctx.variables.contains_key("outpost.backend-url"));

        let ctx = vars(r#"{"base_url":"https://api.example.com:8443/v2/"}"#);
        assert_eq!(
            ctx.variables["outpost.backend-url"],
            "https://api.example.com:8443/v2"
        );
        assert!(!ctx.variables.contains_key("outpost.backend"));
    }

    #[test]
    fn responses_are_too_late() {
        let p = policy::<SetBackendService>(r#"{"backend_id":"green"}"#).unwrap();
        let mut ctx = TestContext::default();
        on_response(&p, &mut TestHead::response(200), &mut ctx);
        assert!(ctx.variables.is_empty());
    }

    #[test]
    fn bad_configs_are_refused() {
        for (config, needle) in [
            (r#"{}"#, "is required"),
            (r#"{"backend_id":"a","base_url":"http://x"}"#, "not both"),
            (r#"{"backend_id":""}"#, "backend_id"),
            (r#"{"base_url":"/relative"}"#, "is not a URL"),
            (r#"{"base_url":"ftp://x/"}"#, "not ftp://"),
            (r#"{"base_url":"http://x/?a=1"}"#, "query or a fragment"),
            (r#"{"base_url":"http://x/#top"}"#, "query or a fragment"),
            (r#"{"base_url":"http://u:p@x/"}"#, "credentials"),
            (r#"{"backend":"a"}"#, "backend"),
        ] {
            let e = policy::<SetBackendService>(config).err().unwrap();
            assert!(e.message.contains(needle), "{config}: {}", e.message);
        }
    }
}

//! Transformation and routing policies, with the names and semantics of Azure API
//! Management's: headers, query parameters, the URI, the backend, the method, the status, the
//! body, local answers, CORS, retries and variables. README.md documents every policy and
//! field.
//!
//! | Policy | Module |
//! |---|---|
//! | `set-header` | [`header`] |
//! | `set-query-parameter` | [`query`] |
//! | `rewrite-uri` | [`rewrite`] |
//! | `set-backend-service` | [`backend`] |
//! | `set-method`, `set-status`, `set-body` | [`message`] |
//! | `find-and-replace` | [`replace`] |
//! | `return-response`, `mock-response` | [`respond`] |
//! | `cors` | [`cors`] |
//! | `retry` | [`retry`] |
//! | `set-variable` | [`variable`] |

use outpost_plugin_sdk::{export_plugin, Context, Flow};

pub mod backend;
pub mod cors;
pub mod header;
pub mod message;
pub mod query;
pub mod replace;
pub mod respond;
pub mod retry;
pub mod rewrite;
mod text;
pub mod variable;

pub use backend::SetBackendService;
pub use cors::Cors;
pub use header::SetHeader;
pub use message::{SetBody, SetMethod, SetStatus};
pub use query::SetQueryParameter;
pub use replace::FindAndReplace;
pub use respond::{MockResponse, ReturnResponse};
pub use retry::Retry;
pub use rewrite::RewriteUri;
pub use variable::SetVariable;

/// The default for `max_body_bytes` of the policies that read a body: 1 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;

/// Whether `s` is an HTTP token (RFC 9110 §5.6.2): header names, methods.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `s` may be sent as a header value: no control characters but tab.
pub(crate) fn is_header_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Records why the request fails and sends it to the on-error section (without an answer
/// there, the gateway answers 500 `policy_failed`).
pub(crate) fn fail(ctx: &mut Context<'_, '_>, message: &str) -> Flow {
    ctx.set_error(message);
    Flow::ERROR
}

/// Serde default `true`.
pub(crate) fn yes() -> bool {
    true
}

export_plugin! {
    name: "policy-transform",
    version: env!("CARGO_PKG_VERSION"),
    policies: [
        "set-header" => SetHeader,
        "return-response" => ReturnResponse,
        "set-query-parameter" => SetQueryParameter,
        "rewrite-uri" => RewriteUri,
        "set-backend-service" => SetBackendService,
        "set-method" => SetMethod,
        "set-status" => SetStatus,
        "set-body" => SetBody,
        "find-and-replace" => FindAndReplace,
        "mock-response" => MockResponse,
        "cors" => Cors,
        "retry" => Retry,
        "set-variable" => SetVariable,
    ],
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::api::PolicyBox;
    use outpost_plugin_sdk::serde_json::{self, Value};
    use outpost_plugin_sdk::testing::policy;

    fn build(name: &str, config: &str) -> Result<PolicyBox, String> {
        let built = match name {
            "set-header" => policy::<SetHeader>(config),
            "set-query-parameter" => policy::<SetQueryParameter>(config),
            "rewrite-uri" => policy::<RewriteUri>(config),
            "set-backend-service" => policy::<SetBackendService>(config),
            "set-method" => policy::<SetMethod>(config),
            "set-status" => policy::<SetStatus>(config),
            "set-body" => policy::<SetBody>(config),
            "find-and-replace" => policy::<FindAndReplace>(config),
            "return-response" => policy::<ReturnResponse>(config),
            "mock-response" => policy::<MockResponse>(config),
            "cors" => policy::<Cors>(config),
            "retry" => policy::<Retry>(config),
            "set-variable" => policy::<SetVariable>(config),
            other => return Err(format!("README names unknown policy '{other}'")),
        };
        built.map_err(|e| e.message.into_string())
    }

    /// Every ```json block of the README is one policy step this library builds, and every
    /// policy the library exports has one.
    #[test]
    fn readme_examples_are_valid_steps() {
        let readme = include_str!("../README.md");
        let mut seen = Vec::new();
        let mut rest = readme;
        while let Some(start) = rest.find("```json\n") {
            let after = &rest[start + "```json\n".len()..];
            let end = after.find("```").expect("closed block");
            let step: Value = serde_json::from_str(&after[..end])
                .unwrap_or_else(|e| panic!("{e}: {}", &after[..end]));
            let obj = step.as_object().expect("a step object");
            assert!(obj.keys().all(|k| k == "policy" || k == "config"), "{step}");
            let name = step["policy"].as_str().expect("policy name");
            let config = step.get("config").cloned().unwrap_or(Value::Null);
            build(name, &config.to_string()).unwrap_or_else(|e| panic!("{name}: {e}"));
            seen.push(name.to_owned());
            rest = &after[end + 3..];
        }
        for name in [
            "set-header",
            "set-query-parameter",
            "rewrite-uri",
            "set-backend-service",
            "set-method",
            "set-status",
            "set-body",
            "find-and-replace",
            "return-response",
            "mock-response",
            "cors",
            "retry",
            "set-variable",
        ] {
            assert_eq!(
                seen.iter().filter(|s| *s == name).count(),
                1,
                "one README example for {name}"
            );
        }
    }

    #[test]
    fn tokens_and_values() {
        assert!(is_token("x-env"));
        assert!(is_token("PATCH"));
        assert!(!is_token(""));
        assert!(!is_token("bad name"));
        assert!(!is_token("a:b"));
        assert!(is_header_value("a\tb ü"));
        assert!(!is_header_value("a\r\nb"));
    }
}

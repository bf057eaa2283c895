//! `cors`: answers CORS preflight requests and adds the CORS headers to the answers of
//! cross-origin requests from allowed origins (APIM's `cors` policy, inbound section).
//!
//! The headers of an actual request's answer go through the `outpost.response-header.*` host
//! properties, so the client gets them on whatever answer it receives: the backend's, a
//! policy's, or the gateway's own error.

use outpost_plugin_sdk::serde::Deserialize;
use outpost_plugin_sdk::{Context, Flow, Head, Policy};
use url::Url;

use crate::{is_token, yes};

/// `cors` configuration.
#[derive(Deserialize, Debug)]
#[serde(crate = "outpost_plugin_sdk::serde", deny_unknown_fields)]
pub struct CorsConfig {
    allowed_origins: Vec<String>,
    #[serde(default = "default_methods")]
    allowed_methods: Vec<String>,
    #[serde(default)]
    allowed_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    #[serde(default)]
    allow_credentials: bool,
    #[serde(default)]
    preflight_result_max_age: Option<u32>,
    #[serde(default = "yes")]
    terminate_unmatched_request: bool,
}

fn default_methods() -> Vec<String> {
    vec!["GET".into(), "POST".into()]
}

/// Answers preflights and marks cross-origin answers, per the configured origins, methods
/// and headers.
#[derive(Debug)]
pub struct Cors {
    /// `None`: any origin (`*`).
    origins: Option<Vec<String>>,
    /// `None`: any method.
    methods: Option<Vec<String>>,
    methods_joined: String,
    /// `None`: any header. Lower case.
    headers: Option<Vec<String>>,
    headers_joined: String,
    expose: String,
    credentials: bool,
    max_age: Option<String>,
    terminate: bool,
}

/// `https://example.com:8443` as browsers send it in `Origin` (lower case, no default port,
/// no path).
fn origin(raw: &str) -> Result<String, String> {
    let url = Url::parse(raw).map_err(|e| {
        format!("allowed_origins: '{raw}' is not an origin (scheme://host[:port]): {e}")
    })?;
    let bare = url.path() == "/" || url.path().is_empty();
    if !bare
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.host_str().is_none()
    {
        return Err(format!(
            "allowed_origins: '{raw}' is not an origin (scheme://host[:port], without path, query or credentials)"
        ));
    }
    Ok(url.origin().ascii_serialization())
}

/// `*` alone means any; otherwise every entry must be a token.
fn tokens(field: &str, list: Vec<String>) -> Result<Option<Vec<String>>, String> {
    if list.iter().any(|s| s == "*") {
        return Ok(None);
    }
    if let Some(bad) = list.iter().find(|s| !is_token(s)) {
        return Err(format!("{field}: '{bad}' is not a valid name"));
    }
    Ok(Some(list))
}

impl Cors {
    fn origin_allowed(&self, origin: &[u8]) -> bool {
        match &self.origins {
            None => true,
            Some(list) => list
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin)),
        }
    }

    fn method_allowed(&self, method: &[u8]) -> bool {
        match &self.methods {
            None => true,
            Some(list) => list
                .iter()
                .any(|m| m.as_bytes().eq_ignore_ascii_case(method)),
        }
    }

    fn headers_allowed(&self, requested: &[u8]) -> bool {
        match &self.headers {
            None => true,
            Some(list) => requested
                .split(|&b| b == b',')
                .map(|h| h.trim_ascii())
                .filter(|h| !h.is_empty())
                .all(|h| list.iter().any(|a| a.as_bytes().eq_ignore_ascii_case(h))),
        }
    }

    /// Whether `Access-Control-Allow-Origin` is the request's origin (then the answer varies
    /// by `Origin`) rather than `*` (any origin; credentials are refused with it).
    fn echoes_origin(&self) -> bool {
        self.origins.is_some()
    }

    fn preflight(&self, req: &Head<'_, '_>, ctx: &mut Context<'_, '_>, origin: &[u8]) -> Flow {
        let method = req
            .header("access-control-request-method")
            .unwrap_or_default();
        let requested = req.header("access-control-request-headers");
        let matched = self.origin_allowed(origin)
            && self.method_allowed(method)
            && requested.is_none_or(|h| self.headers_allowed(h));
        if !matched {
            if self.terminate {
                // APIM: an empty 200 without CORS headers; the browser blocks the request.
                ctx.respond(200, b"");
                return Flow::RESPOND;
            }
            return Flow::CONTINUE;
        }
        ctx.respond(200, b"");
        let varies = self.echoes_origin();
        let allow = if varies { origin } else { b"*" };
        ctx.respond_header("access-control-allow-origin", allow);
        if self.credentials {
            ctx.respond_header("access-control-allow-credentials", b"true");
        }
        let methods = match self.methods {
            None => method,
            Some(_) => self.methods_joined.as_bytes(),
        };
        ctx.respond_header("access-control-allow-methods", methods);
        if let Some(requested) = requested {
            let headers = match self.headers {
                None => requested,
                Some(_) => self.headers_joined.as_bytes(),
            };
            ctx.respond_header("access-control-allow-headers", headers);
        }
        if let Some(age) = &self.max_age {
            ctx.respond_header("access-control-max-age", age.as_bytes());
        }
        if varies {
            ctx.respond_header("vary", b"Origin");
        }
        Flow::RESPOND
    }
}

impl Policy for Cors {
    type Config = CorsConfig;

    fn new(c: CorsConfig) -> Result<Self, String> {
        if c.allowed_origins.is_empty() {
            return Err("allowed_origins: list at least one origin, or \"*\"".into());
        }
        let origins = if c.allowed_origins.iter().any(|o| o == "*") {
            None
        } else {
            Some(
                c.allowed_origins
                    .iter()
                    .map(|o| origin(o))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        };
        if origins.is_none() && c.allow_credentials {
            return Err(
                "allow_credentials: browsers refuse credentials with any origin (\"*\"); list the origins"
                    .into(),
            );
        }
        let methods = tokens("allowed_methods", c.allowed_methods)?;
        let headers = tokens("allowed_headers", c.allowed_headers)?.map(|h| {
            h.into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect::<Vec<_>>()
        });
        if c.expose_headers.iter().any(|h| h != "*" && !is_token(h)) {
            return Err("expose_headers: every entry must be a header name".into());
        }
        Ok(Cors {
            methods_joined: methods.as_deref().unwrap_or_default().join(", "),
            headers_joined: headers.as_deref().unwrap_or_default().join(", "),
            origins,
            methods,
            headers,
            expose: c.expose_headers.join(", "),
            credentials: c.allow_credentials,
            max_age: c.preflight_result_max_age.map(|s| s.to_string()),
            terminate: c.terminate_unmatched_request,
        })
    }

    fn on_request(&self, req: &mut Head<'_, '_>, ctx: &mut Context<'_, '_>) -> Flow {
        // With a list of origins the answer depends on Origin, whatever this request sent:
        // say so to caches (added to the backend's own Vary, never replacing it).
        if self.echoes_origin() {
            ctx.set_variable("outpost.response-header-add.vary", "Origin");
        }
        let Some(origin) = req.header("origin") else {
            return Flow::CONTINUE;
        };
        // The header as text; an origin that is not ASCII matches nothing.
        let Ok(origin) = std::str::from_utf8(origin) else {
            return Flow::CONTINUE;
        };
        if req.method() == "OPTIONS" && req.header("access-control-request-method").is_some() {
            return self.preflight(req, ctx, origin.as_bytes());
        }
        if !self.origin_allowed(origin.as_bytes()) {
            if self.terminate && matches!(req.method(), "GET" | "HEAD") {
                ctx.respond(200, b"");
                return Flow::RESPOND;
            }
            return Flow::CONTINUE;
        }
        let varies = self.echoes_origin();
        let allow = if varies { origin } else { "*" };
        ctx.set_variable("outpost.response-header.access-control-allow-origin", allow);
        if self.credentials {
            ctx.set_variable(
                "outpost.response-header.access-control-allow-credentials",
                "true",
            );
        }
        if !self.expose.is_empty() {
            ctx.set_variable(
                "outpost.response-header.access-control-expose-headers",
                &self.expose,
            );
        }
        Flow::CONTINUE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_plugin_sdk::testing::{on_request, policy, TestContext, TestHead};

    /// A list of origins always adds `Vary: Origin`, and nothing else here.
    fn only_vary(ctx: &TestContext) -> bool {
        ctx.variables.len() == 1 && ctx.variables["outpost.response-header-add.vary"] == "Origin"
    }

    const CONFIG: &str = r#"{
        "allowed_origins": ["https://app.example.com", "http://localhost:3000"],
        "allowed_methods": ["GET", "PUT"],
        "allowed_headers": ["Content-Type", "X-Trace"],
        "expose_headers": ["x-request-id", "etag"],
        "allow_credentials": true,
        "preflight_result_max_age": 600
    }"#;

    fn header<'a>(r: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a str> {
        r.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    fn preflight(
        config: &str,
        origin: &str,
        method: &str,
        headers: Option<&str>,
    ) -> (Flow, TestContext) {
        let p = policy::<Cors>(config).unwrap();
        let mut req = TestHead::request("OPTIONS", "/svc/items")
            .with_header("origin", origin)
            .with_header("access-control-request-method", method);
        if let Some(h) = headers {
            req = req.with_header("access-control-request-headers", h);
        }
        let mut ctx = TestContext::default();
        let flow = on_request(&p, &mut req, &mut ctx);
        (flow, ctx)
    }

    #[test]
    fn an_allowed_preflight_is_answered_with_the_cors_headers() {
        let (flow, ctx) = preflight(
            CONFIG,
            "https://app.example.com",
            "PUT",
            Some("content-type, x-trace"),
        );
        assert_eq!(flow, Flow::RESPOND);
        let (status, h, body) = ctx.response.unwrap();
        assert_eq!((status, body.len()), (200, 0));
        assert_eq!(
            header(&h, "access-control-allow-origin"),
            Some("https://app.example.com")
        );
        assert_eq!(header(&h, "access-control-allow-credentials"), Some("true"));
        assert_eq!(header(&h, "access-control-allow-methods"), Some("GET, PUT"));
        assert_eq!(
            header(&h, "access-control-allow-headers"),
            Some("content-type, x-trace")
        );
        assert_eq!(header(&h, "access-control-max-age"), Some("600"));
        assert_eq!(header(&h, "vary"), Some("Origin"));
    }

    #[test]
    fn an_unmatched_preflight_gets_an_empty_200_or_goes_on() {
        for (origin, method, headers) in [
            ("https://evil.example", "PUT", None),
            ("https://app.example.com", "DELETE", None),
            ("https://app.example.com", "GET", Some("x-other")),
        ] {
            let (flow, ctx) = preflight(CONFIG, origin, method, headers);
            assert_eq!(flow, Flow::RESPOND, "{origin} {method}");
            assert_eq!(ctx.response, Some((200, Vec::new(), Vec::new())));
        }
        let lenient =
            r#"{"allowed_origins":["https://a.example"],"terminate_unmatched_request":false}"#;
        let (flow, ctx) = preflight(lenient, "https://b.example", "GET", None);
        assert_eq!(flow, Flow::CONTINUE);
        assert!(ctx.response.is_none());
    }

    #[test]
    fn wildcards_reflect_the_request() {
        let any = r#"{"allowed_origins":["*"],"allowed_methods":["*"],"allowed_headers":["*"]}"#;
        let (flow, ctx) = preflight(any, "https://x.example", "PATCH", Some("X-A, X-B"));
        assert_eq!(flow, Flow::RESPOND);
        let (_, h, _) = ctx.response.unwrap();
        assert_eq!(header(&h, "access-control-allow-origin"), Some("*"));
        assert_eq!(header(&h, "access-control-allow-methods"), Some("PATCH"));
        assert_eq!(header(&h, "access-control-allow-headers"), Some("X-A, X-B"));
        assert_eq!(header(&h, "vary"), None);
        assert_eq!(header(&h, "access-control-max-age"), None);
        assert_eq!(header(&h, "access-control-allow-credentials"), None);
    }

    #[test]
    fn an_actual_request_from_an_allowed_origin_gets_response_headers() {
        let p = policy::<Cors>(CONFIG).unwrap();
        let mut req =
            TestHead::request("POST", "/svc/items").with_header("origin", "http://localhost:3000");
        let mut ctx = TestContext::default();
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::CONTINUE);
        let v = &ctx.variables;
        assert_eq!(
            v["outpost.response-header.access-control-allow-origin"],
            "http://localhost:3000"
        );
        assert_eq!(
            v["outpost.response-header.access-control-allow-credentials"],
            "true"
        );
        assert_eq!(
            v["outpost.response-header.access-control-expose-headers"],
            "x-request-id, etag"
        );
        assert_eq!(v["outpost.response-header-add.vary"], "Origin");
        assert!(ctx.response.is_none());

        // Without Origin: not a CORS request.
        let mut ctx = TestContext::default();
        let mut req = TestHead::request("GET", "/svc/items");
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::CONTINUE);
        assert!(only_vary(&ctx), "{:?}", ctx.variables);
        // OPTIONS without Access-Control-Request-Method is not a preflight.
        let mut req = TestHead::request("OPTIONS", "/svc/items")
            .with_header("origin", "https://app.example.com");
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::CONTINUE);
        assert!(ctx.response.is_none());
    }

    #[test]
    fn an_actual_request_from_another_origin() {
        let p = policy::<Cors>(CONFIG).unwrap();
        // GET and HEAD are ended with an empty 200 (APIM's terminate_unmatched_request).
        let mut req =
            TestHead::request("GET", "/svc/items").with_header("origin", "https://evil.example");
        let mut ctx = TestContext::default();
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::RESPOND);
        assert_eq!(ctx.response, Some((200, Vec::new(), Vec::new())));
        assert!(only_vary(&ctx), "{:?}", ctx.variables);
        // Other methods go on, without CORS headers.
        let mut req =
            TestHead::request("POST", "/svc/items").with_header("origin", "https://evil.example");
        let mut ctx = TestContext::default();
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::CONTINUE);
        assert!(only_vary(&ctx) && ctx.response.is_none());
        // Any origin without credentials: `*`, no Vary.
        let p = policy::<Cors>(r#"{"allowed_origins":["*"]}"#).unwrap();
        let mut req = TestHead::request("GET", "/").with_header("origin", "https://evil.example");
        let mut ctx = TestContext::default();
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::CONTINUE);
        assert_eq!(
            ctx.variables["outpost.response-header.access-control-allow-origin"],
            "*"
        );
        assert!(!ctx
            .variables
            .contains_key("outpost.response-header-add.vary"));
    }

    #[test]
    fn origins_are_compared_as_browsers_send_them() {
        let p = policy::<Cors>(r#"{"allowed_origins":["HTTPS://App.Example.com:443"]}"#).unwrap();
        let mut req =
            TestHead::request("GET", "/").with_header("origin", "https://app.example.com");
        let mut ctx = TestContext::default();
        assert_eq!(on_request(&p, &mut req, &mut ctx), Flow::CONTINUE);
        assert_eq!(
            ctx.variables["outpost.response-header.access-control-allow-origin"],
            "https://app.example.com"
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        for (config, needle) in [
            (
                r#"{"allowed_origins":[]}"#,
                "allowed_origins: list at least one",
            ),
            (
                r#"{"allowed_origins":["app.example.com"]}"#,
                "is not an origin",
            ),
            (
                r#"{"allowed_origins":["https://a.example/path"]}"#,
                "without path",
            ),
            (
                r#"{"allowed_origins":["*"],"allow_credentials":true}"#,
                "allow_credentials",
            ),
            (
                r#"{"allowed_origins":["*"],"allowed_methods":["G T"]}"#,
                "allowed_methods: 'G T'",
            ),
            (
                r#"{"allowed_origins":["*"],"allowed_headers":["a:b"]}"#,
                "allowed_headers: 'a:b'",
            ),
            (
                r#"{"allowed_origins":["*"],"expose_headers":["a b"]}"#,
                "expose_headers",
            ),
            (r#"{"allowed_origins":["*"],"max_age":5}"#, "max_age"),
            (r#"{}"#, "allowed_origins"),
        ] {
            let e = policy::<Cors>(config).err().unwrap();
            assert!(e.message.contains(needle), "{config}: {}", e.message);
        }
    }
}

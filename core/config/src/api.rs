//! The API configuration (JSON): APIs, operations, products, subscriptions, backends, named
//! values and policy documents. Dynamic: it arrives from a watched file (and later from the
//! management plane) and is swapped atomically while traffic flows.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::error::{deserialize_into, Report};
use crate::manifest::check_hostname_pattern;
use crate::template::UrlTemplate;

/// A complete API configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Free-form version label, reported in logs and status.
    #[serde(default)]
    pub version: Option<String>,
    /// The APIs served.
    #[serde(default)]
    pub apis: Vec<Api>,
    /// Products: groups of APIs that subscriptions can be scoped to.
    #[serde(default)]
    pub products: Vec<Product>,
    /// Subscriptions and their keys.
    #[serde(default)]
    pub subscriptions: Vec<Subscription>,
    /// Backend services APIs forward to.
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// Named values referenced by policies.
    #[serde(default)]
    pub named_values: Vec<NamedValue>,
    /// The global policy document (applies to every API).
    #[serde(default)]
    pub policies: Option<PolicyDocument>,
}

/// An API: a path prefix (and optionally host names) mapped to a backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Api {
    /// Unique id.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Path prefix (`/orders`; `/` or empty for the root). Matched on whole segments.
    pub path: String,
    /// Host names this API answers on (exact or `*.example.com`). Empty: any host.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Id of the backend requests are forwarded to.
    pub backend: String,
    /// Whether callers must present a subscription key. Default true, as APIM.
    #[serde(default = "yes")]
    pub subscription_required: bool,
    /// Where the subscription key is read from.
    #[serde(default)]
    pub subscription_key: SubscriptionKeyNames,
    /// The operations; a request matching none is answered 404.
    #[serde(default)]
    pub operations: Vec<Operation>,
    /// API-scope policy document.
    #[serde(default)]
    pub policies: Option<PolicyDocument>,
}

fn yes() -> bool {
    true
}

/// Header and query parameter names carrying the subscription key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionKeyNames {
    /// Header name. Default `Ocp-Apim-Subscription-Key`.
    pub header: String,
    /// Query parameter name, read when the header is absent. Default `subscription-key`.
    pub query: String,
}

impl Default for SubscriptionKeyNames {
    fn default() -> Self {
        Self {
            header: "Ocp-Apim-Subscription-Key".into(),
            query: "subscription-key".into(),
        }
    }
}

/// An operation: method + URL template relative to the API's path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// Unique within the API.
    pub id: String,
    /// HTTP method, or `*` for any.
    pub method: String,
    /// URL template, e.g. `/users/{id}` or `/*`.
    pub url_template: String,
    /// Operation-scope policy document.
    #[serde(default)]
    pub policies: Option<PolicyDocument>,
}

/// A product: a set of APIs offered together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Product {
    /// Unique id.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Ids of the APIs in the product.
    #[serde(default)]
    pub apis: Vec<String>,
    /// Product-scope policy document.
    #[serde(default)]
    pub policies: Option<PolicyDocument>,
}

/// A subscription: a pair of keys granting access to a scope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subscription {
    /// Unique id.
    pub id: String,
    /// What the keys give access to.
    pub scope: SubscriptionScope,
    /// Primary key.
    pub primary_key: String,
    /// Secondary key (for rotation).
    #[serde(default)]
    pub secondary_key: Option<String>,
    /// `active` (default) or `suspended` (403).
    #[serde(default)]
    pub state: SubscriptionState,
}

/// The scope of a subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum SubscriptionScope {
    /// Every API in the product.
    Product {
        /// Product id.
        id: String,
    },
    /// One API.
    Api {
        /// API id.
        id: String,
    },
    /// Every API.
    All,
}

/// Whether a subscription's keys are honoured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionState {
    /// Keys work.
    #[default]
    Active,
    /// Keys are recognised and refused with 403.
    Suspended,
}

/// A backend service: one or more base URLs, used round-robin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// Unique id.
    pub id: String,
    /// Base URLs (`http://` or `https://`), with an optional base path.
    pub urls: Vec<String>,
    /// Speak HTTP/2 to the backend: over TLS it is negotiated by ALPN anyway; on cleartext this
    /// forces prior-knowledge h2c (needed for gRPC backends). Default false.
    #[serde(default)]
    pub http2: bool,
    /// Send the client's `Host` header instead of the backend URL's host. Default false.
    #[serde(default)]
    pub preserve_host: bool,
    /// TLS settings for `https://` URLs.
    #[serde(default)]
    pub tls: Option<BackendTls>,
}

/// TLS towards a backend.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTls {
    /// PEM CA certificates to trust instead of the system roots.
    #[serde(default)]
    pub ca_pem: Option<String>,
    /// PEM client certificate chain presented to the backend.
    #[serde(default)]
    pub client_cert_pem: Option<String>,
    /// PEM private key of the client certificate.
    #[serde(default)]
    pub client_key_pem: Option<String>,
}

/// A named value policies can refer to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedValue {
    /// Unique id.
    pub id: String,
    /// The value.
    pub value: String,
    /// Never shown in logs or listings.
    #[serde(default)]
    pub secret: bool,
}

/// A policy document: four sections, each an ordered list of steps. A section left out
/// inherits the parent scope's section whole (as `[{"policy": "base"}]`); a section given,
/// even empty, replaces it unless it contains a `base` step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    /// Runs on the request before it is forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Vec<PolicyStep>>,
    /// Runs just before the request goes to the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Vec<PolicyStep>>,
    /// Runs on the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<Vec<PolicyStep>>,
    /// Runs when any section fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<Vec<PolicyStep>>,
}

/// One step of a section: a policy and its configuration. The policy `base` splices the
/// parent scope's same section in at that point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyStep {
    /// Policy name (`base`, `set-header`, …).
    pub policy: String,
    /// The policy's own configuration.
    #[serde(default)]
    pub config: serde_json::Value,
}

/// Methods an operation may name.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "*",
];

impl ApiConfig {
    /// Parses and validates a JSON document; every problem is reported at once.
    pub fn parse(text: &str, origin: &str) -> Result<ApiConfig, Report> {
        let mut report = Report::new(origin);
        let mut de = serde_json::Deserializer::from_str(text);
        let Some(cfg) = deserialize_into::<ApiConfig, _>(&mut de, "", &mut report) else {
            return Err(report);
        };
        if let Err(e) = de.end() {
            report.push("", format!("trailing characters after the document: {e}"));
            return Err(report);
        }
        cfg.validate_into(&mut report);
        report.into_result(cfg)
    }

    /// Validates references, uniqueness and formats. Pure: no I/O.
    pub fn validate(&self, origin: &str) -> Result<(), Report> {
        let mut report = Report::new(origin);
        self.validate_into(&mut report);
        report.into_result(())
    }

    fn validate_into(&self, r: &mut Report) {
        let backends = unique_ids(self.backends.iter().map(|b| b.id.as_str()), "backends", r);
        let apis = unique_ids(self.apis.iter().map(|a| a.id.as_str()), "apis", r);
        let products = unique_ids(self.products.iter().map(|p| p.id.as_str()), "products", r);
        unique_ids(
            self.subscriptions.iter().map(|s| s.id.as_str()),
            "subscriptions",
            r,
        );
        unique_ids(
            self.named_values.iter().map(|n| n.id.as_str()),
            "named_values",
            r,
        );

        let mut routes: HashMap<(String, String), &str> = HashMap::new();
        for (i, api) in self.apis.iter().enumerate() {
            let at = format!("apis[{i}]");
            if let Err(e) = check_api_path(&api.path) {
                r.push(format!("{at}.path"), e);
            }
            for (j, h) in api.hostnames.iter().enumerate() {
                if let Err(e) = check_hostname_pattern(h) {
                    r.push(format!("{at}.hostnames[{j}]"), e);
                }
            }
            let prefix = normalize_prefix(&api.path);
            let hosts: Vec<String> = if api.hostnames.is_empty() {
                vec![String::new()]
            } else {
                api.hostnames
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect()
            };
            for host in hosts {
                let key = (host.clone(), prefix.to_string());
                if let Some(other) = routes.insert(key, &api.id) {
                    let on = if host.is_empty() {
                        "any host".to_string()
                    } else {
                        format!("host '{host}'")
                    };
                    r.push(
                        format!("{at}.path"),
                        format!("API '{other}' already serves path '{}' on {on}", api.path),
                    );
                }
            }
            if !backends.contains(api.backend.as_str()) {
                r.push(
                    format!("{at}.backend"),
                    format!("unknown backend '{}'", api.backend),
                );
            }
            for (what, name) in [
                ("header", &api.subscription_key.header),
                ("query", &api.subscription_key.query),
            ] {
                let valid = !name.is_empty()
                    && (what == "query" || http::HeaderName::from_bytes(name.as_bytes()).is_ok());
                if !valid {
                    r.push(
                        format!("{at}.subscription_key.{what}"),
                        format!("'{name}' is not a valid {what} name"),
                    );
                }
            }
            if api.operations.is_empty() {
                r.push(
                    format!("{at}.operations"),
                    "an API needs at least one operation (use method \"*\" and url_template \"/*\" to pass everything)",
                );
            }
            let mut op_ids = HashSet::new();
            for (j, op) in api.operations.iter().enumerate() {
                let at = format!("{at}.operations[{j}]");
                if !op_ids.insert(op.id.as_str()) {
                    r.push(
                        format!("{at}.id"),
                        format!("duplicate operation id '{}'", op.id),
                    );
                }
                if !METHODS.contains(&op.method.as_str()) {
                    r.push(
                        format!("{at}.method"),
                        format!("'{}' is not one of {}", op.method, METHODS.join(", ")),
                    );
                }
                if let Err(e) = UrlTemplate::parse(&op.url_template) {
                    r.push(format!("{at}.url_template"), e);
                }
                check_policies(op.policies.as_ref(), &format!("{at}.policies"), true, r);
            }
            check_policies(api.policies.as_ref(), &format!("{at}.policies"), true, r);
        }

        for (i, p) in self.products.iter().enumerate() {
            for (j, a) in p.apis.iter().enumerate() {
                if !apis.contains(a.as_str()) {
                    r.push(
                        format!("products[{i}].apis[{j}]"),
                        format!("unknown API '{a}'"),
                    );
                }
            }
            check_policies(
                p.policies.as_ref(),
                &format!("products[{i}].policies"),
                true,
                r,
            );
        }

        let mut keys: HashMap<&str, &str> = HashMap::new();
        for (i, s) in self.subscriptions.iter().enumerate() {
            let at = format!("subscriptions[{i}]");
            match &s.scope {
                SubscriptionScope::Product { id } if !products.contains(id.as_str()) => {
                    r.push(format!("{at}.scope.id"), format!("unknown product '{id}'"))
                }
                SubscriptionScope::Api { id } if !apis.contains(id.as_str()) => {
                    r.push(format!("{at}.scope.id"), format!("unknown API '{id}'"))
                }
                _ => {}
            }
            let named = [
                ("primary_key", Some(&s.primary_key)),
                ("secondary_key", s.secondary_key.as_ref()),
            ];
            for (field, key) in named {
                let Some(key) = key else { continue };
                if key.len() < 8 || !key.bytes().all(|b| b.is_ascii_graphic()) {
                    r.push(
                        format!("{at}.{field}"),
                        "must be at least 8 printable ASCII characters without spaces",
                    );
                } else if let Some(other) = keys.insert(key.as_str(), s.id.as_str()) {
                    r.push(
                        format!("{at}.{field}"),
                        format!("the same key is already used by subscription '{other}'"),
                    );
                }
            }
        }

        for (i, b) in self.backends.iter().enumerate() {
            let at = format!("backends[{i}]");
            if b.urls.is_empty() {
                r.push(format!("{at}.urls"), "at least one URL is required");
            }
            for (j, u) in b.urls.iter().enumerate() {
                if let Err(e) = check_backend_url(u) {
                    r.push(format!("{at}.urls[{j}]"), e);
                }
            }
            if let Some(tls) = &b.tls {
                if tls.client_cert_pem.is_some() != tls.client_key_pem.is_some() {
                    r.push(
                        format!("{at}.tls"),
                        "client_cert_pem and client_key_pem go together",
                    );
                }
            }
        }

        check_policies(self.policies.as_ref(), "policies", false, r);
    }
}

fn unique_ids<'a>(
    ids: impl Iterator<Item = &'a str>,
    list: &str,
    r: &mut Report,
) -> HashSet<&'a str> {
    let mut seen = HashSet::new();
    for (i, id) in ids.enumerate() {
        if id.trim().is_empty() {
            r.push(format!("{list}[{i}].id"), "must not be empty");
        } else if !seen.insert(id) {
            r.push(format!("{list}[{i}].id"), format!("duplicate id '{id}'"));
        }
    }
    seen
}

fn check_api_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path == "/" {
        return Ok(());
    }
    if !path.starts_with('/') {
        return Err(format!("'{path}' must start with '/'"));
    }
    if path.contains(['?', '#', '{', '}', '*']) || path.contains("//") {
        return Err(format!(
            "'{path}' must be a plain path prefix (no '?', '#', '{{', '}}', '*' or '//')"
        ));
    }
    Ok(())
}

/// The form a path prefix is matched in: no trailing slash; the root is empty.
pub fn normalize_prefix(path: &str) -> &str {
    path.trim_end_matches('/')
}

fn check_backend_url(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("'{url}' is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("'{url}' must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("'{url}' has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("'{url}' must not have a query string"));
    }
    Ok(())
}

fn check_policies(doc: Option<&PolicyDocument>, at: &str, base_allowed: bool, r: &mut Report) {
    let Some(doc) = doc else { return };
    let sections = [
        ("inbound", &doc.inbound),
        ("backend", &doc.backend),
        ("outbound", &doc.outbound),
        ("on_error", &doc.on_error),
    ];
    for (name, steps) in sections {
        let mut bases = 0;
        for (i, step) in steps.iter().flatten().enumerate() {
            if step.policy.trim().is_empty() {
                r.push(format!("{at}.{name}[{i}].policy"), "must not be empty");
            }
            if step.policy == "base" {
                bases += 1;
                if !base_allowed {
                    r.push(
                        format!("{at}.{name}[{i}]"),
                        "'base' has no parent at global scope",
                    );
                } else if bases > 1 {
                    r.push(
                        format!("{at}.{name}[{i}]"),
                        "'base' may appear once per section",
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "version": "1",
        "backends": [{"id": "b", "urls": ["http://127.0.0.1:9000/base"]}],
        "apis": [{
            "id": "users", "path": "/users", "backend": "b",
            "operations": [{"id": "get", "method": "GET", "url_template": "/{id}"}],
            "policies": {"inbound": [{"policy": "base"}, {"policy": "set-header", "config": {"name": "x"}}]}
        }],
        "products": [{"id": "p", "apis": ["users"]}],
        "subscriptions": [{"id": "s", "scope": {"type": "product", "id": "p"}, "primary_key": "0123456789abcdef"}]
    }"#;

    #[test]
    fn a_good_config_parses() {
        let cfg = ApiConfig::parse(GOOD, "api.json").expect("valid");
        assert_eq!(
            cfg.apis[0].subscription_key.header,
            "Ocp-Apim-Subscription-Key"
        );
        assert!(cfg.apis[0].subscription_required);
        assert_eq!(cfg.subscriptions[0].state, SubscriptionState::Active);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        let text = GOOD.replace("\"url_template\"", "\"colour\": 1, \"url_template\"");
        let report = ApiConfig::parse(&text, "api.json").expect_err("invalid");
        assert_eq!(report.issues.len(), 1);
        assert_eq!(report.issues[0].path, "apis[0].operations[0].colour");
        assert!(report.issues[0].message.contains("colour"), "{report}");
    }

    #[test]
    fn every_semantic_problem_is_reported() {
        let text = r#"{
            "backends": [{"id": "b", "urls": ["ftp://x", "http://ok"]}, {"id": "b", "urls": []}],
            "apis": [
                {"id": "a", "path": "x", "backend": "nope", "operations": [
                    {"id": "o", "method": "FETCH", "url_template": "/{}"},
                    {"id": "o", "method": "GET", "url_template": "/"}
                ]},
                {"id": "c", "path": "/", "backend": "b", "operations": []},
                {"id": "d", "path": "", "backend": "b", "operations": [{"id": "o", "method": "*", "url_template": "/*"}]}
            ],
            "products": [{"id": "p", "apis": ["zzz"]}],
            "subscriptions": [
                {"id": "s1", "scope": {"type": "product", "id": "q"}, "primary_key": "short"},
                {"id": "s2", "scope": {"type": "all"}, "primary_key": "0123456789", "secondary_key": "0123456789"}
            ],
            "policies": {"inbound": [{"policy": "base"}]}
        }"#;
        let report = ApiConfig::parse(text, "api.json").expect_err("invalid");
        let paths: Vec<&str> = report.issues.iter().map(|i| i.path.as_str()).collect();
        for want in [
            "backends[1].id",
            "backends[0].urls[0]",
            "backends[1].urls",
            "apis[0].path",
            "apis[0].backend",
            "apis[0].operations[0].method",
            "apis[0].operations[0].url_template",
            "apis[0].operations[1].id",
            "apis[1].operations",
            "apis[2].path",
            "products[0].apis[0]",
            "subscriptions[0].scope.id",
            "subscriptions[0].primary_key",
            "subscriptions[1].secondary_key",
            "policies.inbound[0]",
        ] {
            assert!(paths.contains(&want), "missing {want} in {report}");
        }
    }

    #[test]
    fn trailing_garbage_is_an_error() {
        let report = ApiConfig::parse("{} x", "api.json").expect_err("invalid");
        assert!(report.issues[0].message.contains("trailing"), "{report}");
    }

    #[test]
    fn prefixes_normalize() {
        assert_eq!(normalize_prefix("/"), "");
        assert_eq!(normalize_prefix("/a/"), "/a");
        assert_eq!(normalize_prefix("/a"), "/a");
    }
}

//! End-to-end tests: the real `outpost` binary, real sockets on port 0, real TLS.

mod access;
mod appinsights;
mod caching;
mod host_props;
mod host_work;
mod lifecycle;
mod limits;
mod plane;
mod plugins;
mod policy_docs;
mod policy_limits;
mod prometheus;
mod protocols;
mod replicas;
mod routing;
mod stores;
mod tls;
mod transform;

use serde_json::{json, Value};

/// An API configuration with one backend and these APIs.
pub fn config(backend_url: &str, apis: Value) -> Value {
    json!({
        "version": "v1",
        "backends": [{ "id": "b", "urls": [backend_url] }],
        "apis": apis,
    })
}

/// One open API at `/svc` forwarding everything to the backend.
pub fn open_api(backend_url: &str) -> Value {
    config(
        backend_url,
        json!([{
            "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
            "operations": [{ "id": "any", "method": "*", "url_template": "/*" }]
        }]),
    )
}

/// One open API `svc` at `/svc` on backend `a`, a second backend `b`, and these operations.
pub fn two_backend_api(a: &str, b: &str, operations: Value) -> Value {
    json!({
        "version": "t1",
        "backends": [{ "id": "a", "urls": [a] }, { "id": "b", "urls": [b] }],
        "apis": [{ "id": "svc", "path": "/svc", "backend": "a", "subscription_required": false,
                   "operations": operations }],
    })
}

/// An operation with its inbound and outbound policy steps.
pub fn op(id: &str, method: &str, template: &str, inbound: Value, outbound: Value) -> Value {
    json!({ "id": id, "method": method, "url_template": template,
            "policies": { "inbound": inbound, "outbound": outbound } })
}

/// A plain HTTP client that does not pool (each test sees its own connections).
pub fn client() -> reqwest::Client {
    outpost_tests::init_crypto();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// Asserts a gateway error answer: status, JSON code, and the request id echoed.
pub async fn assert_error(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    let rid = resp
        .headers()
        .get("x-request-id")
        .expect("x-request-id")
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.expect("json error body");
    assert_eq!(body["error"], code, "{body}");
    assert_eq!(body["statusCode"], status, "{body}");
    assert_eq!(body["requestId"], rid.as_str(), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    body
}

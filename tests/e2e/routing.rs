//! Routing, operations, subscriptions and the headers the backend sees.

use outpost_tests::{Backend, Gateway, GatewaySpec};
use serde_json::{json, Value};

use crate::{assert_error, client, config, open_api};

fn routing_config(backend: &str) -> Value {
    config(
        backend,
        json!([
            { "id": "root", "path": "/", "backend": "b", "subscription_required": false,
              "operations": [{ "id": "root-any", "method": "*", "url_template": "/*" }] },
            { "id": "orders", "path": "/orders", "backend": "b", "subscription_required": false,
              "operations": [
                { "id": "catch-all", "method": "*", "url_template": "/*" },
                { "id": "get-order", "method": "GET", "url_template": "/{id}/echo" },
                { "id": "list", "method": "GET", "url_template": "/echo" }
              ] },
            { "id": "orders-archive", "path": "/orders/archive", "backend": "b",
              "subscription_required": false,
              "operations": [{ "id": "arch", "method": "GET", "url_template": "/echo" }] },
            { "id": "orders-a", "path": "/orders", "hostnames": ["a.test"], "backend": "b",
              "subscription_required": false,
              "operations": [{ "id": "a-any", "method": "*", "url_template": "/*" }] },
            { "id": "wild", "path": "/w", "hostnames": ["*.wild.test"], "backend": "b",
              "subscription_required": false,
              "operations": [{ "id": "w-any", "method": "*", "url_template": "/*" }] }
        ]),
    )
}

async fn route_of(c: &reqwest::Client, url: String, host: Option<&str>) -> (u16, Value) {
    let mut req = c.get(url);
    if let Some(h) = host {
        req = req.header("host", h);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn host_and_longest_prefix_select_the_api_and_templates_the_operation() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(routing_config(&backend.url(false))));
    let c = client();

    // Longest prefix on segment boundaries; the API prefix is stripped.
    let (s, v) = route_of(&c, gw.url("/orders/42/echo?x=1"), None).await;
    assert_eq!(s, 200);
    assert_eq!(v["uri"], "/42/echo?x=1");
    let (s, v) = route_of(&c, gw.url("/orders/archive/echo"), None).await;
    assert_eq!(s, 200);
    assert_eq!(v["uri"], "/echo");
    // `/ordersx` is not under `/orders`: the root API takes it.
    let (s, v) = route_of(&c, gw.url("/ordersx/echo"), None).await;
    assert_eq!(s, 200);
    assert_eq!(v["uri"], "/ordersx/echo");
    // A host-bound API wins over the any-host one, whatever the case and port.
    let (s, v) = route_of(&c, gw.url("/orders/zzz/echo"), Some("A.Test:8443")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["uri"], "/zzz/echo");
    // Wildcard host.
    let (s, v) = route_of(&c, gw.url("/w/echo"), Some("x.wild.test")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["uri"], "/echo");

    // The most specific operation wins over the catch-all (seen in the access log).
    let (s, _) = route_of(&c, gw.url("/orders/echo"), None).await;
    assert_eq!(s, 200);
    let (s, _) = route_of(&c, gw.url("/orders/7/echo"), None).await;
    assert_eq!(s, 200);
    let (s, _) = route_of(&c, gw.url("/orders/7/else/echo"), None).await;
    assert_eq!(s, 200);
    let logs = gw.wait_for_log("Request.", 8);
    let ops: Vec<&str> = logs[5..8]
        .iter()
        .map(|l| l["operation"].as_str().unwrap())
        .collect();
    assert_eq!(ops, ["list", "get-order", "catch-all"]);

    // No operation: method mismatch and template mismatch both 404 with a JSON body naming it.
    let resp = c
        .post(gw.url("/orders/archive/echo"))
        .send()
        .await
        .expect("send");
    let body = assert_error(resp, 404, "operation_not_found").await;
    assert!(body["message"].as_str().unwrap().contains("orders-archive"));
    let resp = c
        .get(gw.url("/orders/archive/other"))
        .send()
        .await
        .expect("send");
    assert_error(resp, 404, "operation_not_found").await;
}

#[tokio::test]
async fn no_api_is_a_404_that_says_so() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(open_api(&backend.url(false))));
    let resp = client()
        .get(gw.url("/elsewhere"))
        .send()
        .await
        .expect("send");
    let body = assert_error(resp, 404, "api_not_found").await;
    assert!(body["message"].as_str().unwrap().contains("/elsewhere"));
    assert_eq!(backend.requests(), 0);
}

#[tokio::test]
async fn forwarding_headers_request_id_traceparent_and_hop_by_hop() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(open_api(&backend.url(false))));
    let c = client();

    let resp = c
        .get(gw.url("/svc/echo"))
        .header("host", "public.example")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "must not pass")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "203.0.113.9")
        .header("x-kept", "yes")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(rid.len(), 36, "generated UUID: {rid}");
    let v: Value = resp.json().await.unwrap();
    let h = &v["headers"];
    for gone in ["x-secret", "keep-alive", "proxy-authorization"] {
        assert!(h.get(gone).is_none(), "{gone} forwarded: {h}");
    }
    assert_eq!(h["x-kept"][0], "yes");
    assert_eq!(h["x-forwarded-for"][0], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(h["x-forwarded-host"][0], "public.example");
    assert_eq!(
        h["forwarded"][0],
        "for=127.0.0.1;proto=http;host=\"public.example\""
    );
    assert_eq!(h["x-request-id"][0], rid.as_str());
    // The backend sees its own authority as Host (preserve_host is off).
    assert_eq!(h["host"][0], backend.addr.to_string().as_str());
    let tp = h["traceparent"][0].as_str().unwrap();
    assert_eq!(tp.len(), 55);
    assert!(tp.starts_with("00-"));

    // A client's request id and trace are continued.
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let resp = c
        .get(gw.url("/svc/echo"))
        .header("x-request-id", "client-id-1")
        .header("traceparent", incoming)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-id-1");
    let v: Value = resp.json().await.unwrap();
    let tp = v["headers"]["traceparent"][0].as_str().unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert_ne!(tp, incoming, "a new parent span id");
    assert_eq!(v["headers"]["x-request-id"][0], "client-id-1");
}

#[tokio::test]
async fn keep_alive_connections_to_the_backend_are_pooled() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(open_api(&backend.url(false))));
    let c = client();
    for _ in 0..50 {
        let r = c.get(gw.url("/svc/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert!(
        backend.connections() <= 2,
        "{} connections for 50 requests",
        backend.connections()
    );
}

fn subscription_config(backend: &str) -> Value {
    json!({
        "backends": [{ "id": "b", "urls": [backend] }],
        "apis": [
            { "id": "a", "path": "/a", "backend": "b",
              "operations": [{ "id": "a-any", "method": "*", "url_template": "/*" }] },
            { "id": "b", "path": "/b", "backend": "b",
              "subscription_key": { "header": "X-Api-Key", "query": "key" },
              "operations": [{ "id": "b-any", "method": "*", "url_template": "/*" }] },
            { "id": "c", "path": "/c", "backend": "b",
              "operations": [{ "id": "c-any", "method": "*", "url_template": "/*" }] },
            { "id": "open", "path": "/open", "backend": "b", "subscription_required": false,
              "operations": [{ "id": "o-any", "method": "*", "url_template": "/*" }] }
        ],
        "products": [{ "id": "p", "apis": ["a", "b"] }],
        "subscriptions": [
            { "id": "prod", "scope": { "type": "product", "id": "p" },
              "primary_key": "prod-primary", "secondary_key": "prod-secondary" },
            { "id": "only-c", "scope": { "type": "api", "id": "c" }, "primary_key": "c-key-123" },
            { "id": "all", "scope": { "type": "all" }, "primary_key": "all-key-123" },
            { "id": "gone", "scope": { "type": "all" }, "primary_key": "suspended-key",
              "state": "suspended" }
        ]
    })
}

#[tokio::test]
async fn subscription_keys_as_apim_does_them() {
    let backend = Backend::start().await;
    let gw = Gateway::start(GatewaySpec::http(subscription_config(&backend.url(false))));
    let c = client();
    let get = |path: &str, header: Option<(&str, &str)>| {
        let mut r = c.get(gw.url(path));
        if let Some((k, v)) = header {
            r = r.header(k, v);
        }
        r.send()
    };

    // Default header name; the key does not reach the backend.
    let r = get(
        "/a/echo",
        Some(("Ocp-Apim-Subscription-Key", "prod-primary")),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["headers"].get("ocp-apim-subscription-key").is_none(),
        "{v}"
    );
    // Secondary key, default query name, stripped from the forwarded query.
    let r = get("/a/echo?x=1&subscription-key=prod-secondary&y=2", None)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["uri"], "/echo?x=1&y=2");
    // Names configured per API.
    let r = get("/b/echo", Some(("X-Api-Key", "prod-primary")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = get("/b/echo?key=prod-primary", None).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = get(
        "/b/echo",
        Some(("Ocp-Apim-Subscription-Key", "prod-primary")),
    )
    .await
    .unwrap();
    assert_error(r, 401, "subscription_key_missing").await;
    // Scopes: the product covers a and b, not c; the API scope covers c only; all covers all.
    let r = get(
        "/c/echo",
        Some(("Ocp-Apim-Subscription-Key", "prod-primary")),
    )
    .await
    .unwrap();
    assert_error(r, 401, "subscription_key_invalid").await;
    let r = get("/c/echo", Some(("Ocp-Apim-Subscription-Key", "c-key-123")))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = get("/a/echo", Some(("Ocp-Apim-Subscription-Key", "c-key-123")))
        .await
        .unwrap();
    assert_error(r, 401, "subscription_key_invalid").await;
    // (b reads its key from `key`; the default header is ignored there.)
    for p in ["/a/echo", "/b/echo?key=all-key-123", "/c/echo"] {
        let r = get(p, Some(("Ocp-Apim-Subscription-Key", "all-key-123")))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{p}");
    }
    // Missing, unknown, suspended.
    let r = get("/a/echo", None).await.unwrap();
    assert_error(r, 401, "subscription_key_missing").await;
    let r = get("/a/echo", Some(("Ocp-Apim-Subscription-Key", "nope")))
        .await
        .unwrap();
    assert_error(r, 401, "subscription_key_invalid").await;
    let r = get(
        "/a/echo",
        Some(("Ocp-Apim-Subscription-Key", "suspended-key")),
    )
    .await
    .unwrap();
    assert_error(r, 403, "subscription_suspended").await;
    // Open APIs need none.
    let r = get("/open/echo", None).await.unwrap();
    assert_eq!(r.status(), 200);
}

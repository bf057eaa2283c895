//! Transformation and routing policies (`plugins/policy-transform`) against the real gateway
//! and the echo backend: what the backend receives (method, URI, headers, body), which
//! backend answers, what the client gets back, CORS, and retries counted at the backend.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_tests::gateway::{plugin_library, LISTENER_HTTP};
use outpost_tests::{closed_port, Backend, Gateway, GatewaySpec};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use crate::{assert_error, client, op, two_backend_api};

fn manifest() -> String {
    format!(
        "{LISTENER_HTTP}\n[[plugins]]\nname = \"transform\"\npath = \"{}\"\n\n[[plugins]]\nname = \"fixtures\"\npath = \"{}\"\n",
        plugin_library("outpost_policy_transform").display(),
        plugin_library("outpost_fixture_policies").display(),
    )
}

fn step(policy: &str, config: Value) -> Value {
    json!({ "policy": policy, "config": config })
}

/// Backends `a` (the API's) and `b`; one open API `svc` at `/svc` with these operations.
fn spec(a: &str, b: &str, operations: Value) -> GatewaySpec {
    GatewaySpec {
        manifest: manifest(),
        api: two_backend_api(a, b, operations),
        files: Vec::new(),
        watch_ms: 100,
    }
}

async fn echo(r: reqwest::Response) -> Value {
    assert_eq!(r.status(), 200, "not the echo answer");
    r.json().await.expect("echo JSON")
}

/// GET through the gateway; the echo backend's JSON.
async fn get_echo(c: &reqwest::Client, gw: &Gateway, path: &str) -> Value {
    echo(c.get(gw.url(path)).send().await.unwrap()).await
}

#[tokio::test]
async fn uri_query_and_method_policies_change_what_the_backend_sees() {
    let a = Backend::start().await;
    let gw = Gateway::start(spec(
        &a.url(false),
        &a.url(false),
        json!([
            op(
                "query",
                "GET",
                "/query/echo",
                json!([step(
                    "set-query-parameter",
                    json!({ "name": "q", "value": "a b&c" })
                ),]),
                json!([])
            ),
            op(
                "tags",
                "GET",
                "/tags/echo",
                json!([step(
                    "set-query-parameter",
                    json!({ "name": "tag", "value": ["x", "y"], "exists_action": "append" })
                ),]),
                json!([])
            ),
            op(
                "delete",
                "GET",
                "/delete/echo",
                json!([step(
                    "set-query-parameter",
                    json!({ "name": "secret", "exists_action": "delete" })
                ),]),
                json!([])
            ),
            op(
                "rewrite",
                "GET",
                "/users/{id}",
                json!([step(
                    "rewrite-uri",
                    json!({ "template": "/echo/accounts/{id}?view={view}&x=1" })
                ),]),
                json!([])
            ),
            op(
                "rewrite-only",
                "GET",
                "/items/{id}",
                json!([step(
                    "rewrite-uri",
                    json!({ "template": "/echo/{id}", "copy_unmatched_params": false })
                ),]),
                json!([])
            ),
            op(
                "rewrite-bad",
                "GET",
                "/broken/{id}",
                json!([step("rewrite-uri", json!({ "template": "/echo/{nope}" })),]),
                json!([])
            ),
            op(
                "method",
                "GET",
                "/method/echo",
                json!([step("set-method", json!({ "method": "PATCH" })),]),
                json!([])
            ),
        ]),
    ));
    let c = client();

    // Override keeps the other parameters and their order; the value is encoded.
    let v = get_echo(&c, &gw, "/svc/query/echo?keep=1&q=old&z=2").await;
    assert_eq!(v["uri"], "/query/echo?keep=1&q=a%20b%26c&z=2", "{v}");
    let v = get_echo(&c, &gw, "/svc/query/echo").await;
    assert_eq!(v["uri"], "/query/echo?q=a%20b%26c", "{v}");
    let v = get_echo(&c, &gw, "/svc/tags/echo?tag=w").await;
    assert_eq!(v["uri"], "/tags/echo?tag=w&tag=x&tag=y", "{v}");
    let v = get_echo(&c, &gw, "/svc/delete/echo?secret=s&a=1&secret=t").await;
    assert_eq!(v["uri"], "/delete/echo?a=1", "{v}");
    let v = get_echo(&c, &gw, "/svc/delete/echo?secret=s").await;
    assert_eq!(v["uri"], "/delete/echo", "{v}");

    // rewrite-uri: the template parameter from the path, a query parameter it uses, the
    // template's own query, and the rest of the client's query copied.
    let v = get_echo(&c, &gw, "/svc/users/42?view=full&page=3").await;
    assert_eq!(v["uri"], "/echo/accounts/42?view=full&x=1&page=3", "{v}");
    let v = get_echo(&c, &gw, "/svc/items/7?page=3").await;
    assert_eq!(v["uri"], "/echo/7", "{v}");
    let body = assert_error(
        c.get(gw.url("/svc/broken/1")).send().await.unwrap(),
        500,
        "policy_failed",
    )
    .await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no value for '{nope}'"),
        "{body}"
    );

    let v = get_echo(&c, &gw, "/svc/method/echo").await;
    assert_eq!(v["method"], "PATCH", "{v}");
}

/// Two query steps in a row: the second sees the first's query. Needs the gateway's
/// `HttpHead::query` to return the query a policy set (as the SDK's test head does).
#[tokio::test]
async fn query_steps_in_a_row_build_on_each_other() {
    let a = Backend::start().await;
    let gw = Gateway::start(spec(
        &a.url(false),
        &a.url(false),
        json!([op(
            "both",
            "GET",
            "/both/echo",
            json!([
                step(
                    "set-query-parameter",
                    json!({ "name": "added", "value": "1" })
                ),
                step(
                    "set-query-parameter",
                    json!({ "name": "secret", "exists_action": "delete" })
                ),
            ]),
            json!([])
        )]),
    ));
    let v = echo(
        client()
            .get(gw.url("/svc/both/echo?secret=s&keep=k"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["uri"], "/both/echo?keep=k&added=1", "{v}");
}

#[tokio::test]
async fn set_backend_service_sends_the_request_elsewhere() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let gw = Gateway::start(spec(
        &a.url(false),
        &b.url(false),
        json!([
            op(
                "by-id",
                "GET",
                "/by-id/echo",
                json!([step("set-backend-service", json!({ "backend_id": "b" })),]),
                json!([])
            ),
            op(
                "by-url",
                "GET",
                "/by-url/echo",
                json!([step(
                    "set-backend-service",
                    json!({ "base_url": format!("{}/base/", b.url(false)) })
                ),]),
                json!([])
            ),
            op(
                "unknown",
                "GET",
                "/unknown/echo",
                json!([step("set-backend-service", json!({ "backend_id": "nope" })),]),
                json!([])
            ),
            op("plain", "GET", "/plain/echo", json!([]), json!([])),
        ]),
    ));
    let c = client();

    let v = get_echo(&c, &gw, "/svc/by-id/echo").await;
    assert_eq!(v["uri"], "/by-id/echo");
    assert_eq!((a.requests(), b.requests()), (0, 1), "b answered");

    let v = get_echo(&c, &gw, "/svc/by-url/echo?q=1").await;
    assert_eq!(v["uri"], "/base/by-url/echo?q=1", "{v}");
    assert_eq!(
        (a.requests(), b.requests()),
        (0, 2),
        "b answered, under its base path"
    );

    get_echo(&c, &gw, "/svc/plain/echo").await;
    assert_eq!(
        (a.requests(), b.requests()),
        (1, 2),
        "without the policy: a"
    );

    let body = assert_error(
        c.get(gw.url("/svc/unknown/echo")).send().await.unwrap(),
        500,
        "policy_failed",
    )
    .await;
    assert!(body["message"].as_str().unwrap().contains("nope"), "{body}");
    assert_eq!((a.requests(), b.requests()), (1, 2));
}

#[tokio::test]
async fn statuses_bodies_and_local_answers() {
    let a = Backend::start().await;
    let gw = Gateway::start(spec(
        &a.url(false),
        &a.url(false),
        json!([
            op(
                "status",
                "GET",
                "/status-set/echo",
                json!([]),
                json!([step(
                    "set-status",
                    json!({ "code": 202, "reason": "Accepted" })
                ),])
            ),
            op(
                "status-in",
                "GET",
                "/status-in/echo",
                json!([step("set-status", json!({ "code": 204 })),]),
                json!([])
            ),
            op(
                "body-in",
                "POST",
                "/body-in/echo",
                json!([step(
                    "set-body",
                    json!({ "body": "{\"replaced\":true}", "content_type": "application/json" })
                ),]),
                json!([])
            ),
            op(
                "body-out",
                "GET",
                "/body-out/echo",
                json!([]),
                json!([step(
                    "set-body",
                    json!({ "body": "short", "content_type": "text/plain" })
                ),])
            ),
            op(
                "replace-in",
                "POST",
                "/replace-in/echo",
                json!([step(
                    "find-and-replace",
                    json!({ "from": "cat", "to": "tiger" })
                ),]),
                json!([])
            ),
            op(
                "replace-out",
                "GET",
                "/replace-out/echo",
                json!([]),
                json!([step(
                    "find-and-replace",
                    json!({ "from": "\"method\":\"GET\"", "to": "\"method\":\"FOUND-AND-REPLACED\"" })
                ),])
            ),
            op(
                "replace-small",
                "POST",
                "/replace-small/echo",
                json!([step(
                    "find-and-replace",
                    json!({ "from": "cat", "to": "dog", "max_body_bytes": 8 })
                ),]),
                json!([])
            ),
            op(
                "mock",
                "GET",
                "/mock",
                json!([step(
                    "mock-response",
                    json!({ "status_code": 201, "example": { "id": 7, "mock": true } })
                ),]),
                json!([])
            ),
        ]),
    ));
    let c = client();

    let r = c.get(gw.url("/svc/status-set/echo")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["uri"], "/status-set/echo", "the backend's body stays");

    let before = a.requests();
    let r = c.get(gw.url("/svc/status-in/echo")).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(a.requests(), before, "answered in inbound");

    let v = echo(
        c.post(gw.url("/svc/body-in/echo"))
            .header("content-type", "text/plain")
            .body("original body that is longer")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["body"], "{\"replaced\":true}", "{v}");
    assert_eq!(v["headers"]["content-type"], json!(["application/json"]));
    assert_eq!(v["headers"]["content-length"], json!(["17"]));

    let r = c.get(gw.url("/svc/body-out/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.headers()["content-length"], "5");
    assert_eq!(r.text().await.unwrap(), "short");

    let v = echo(
        c.post(gw.url("/svc/replace-in/echo"))
            .body("cat, concat, cats")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["body"], "tiger, contiger, tigers", "{v}");
    assert_eq!(v["body_len"], 23);

    let r = c.get(gw.url("/svc/replace-out/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("the response is still whole JSON");
    assert_eq!(v["method"], "FOUND-AND-REPLACED", "{v}");

    // Over max_body_bytes: the body goes on unchanged.
    let v = echo(
        c.post(gw.url("/svc/replace-small/echo"))
            .body("a cat longer than eight bytes")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["body"], "a cat longer than eight bytes", "{v}");

    let before = a.requests();
    let r = c.get(gw.url("/svc/mock")).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["content-type"], "application/json");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v, json!({ "id": 7, "mock": true }));
    assert_eq!(a.requests(), before, "no backend call");
}

#[tokio::test]
async fn set_variable_is_read_by_later_policies() {
    let a = Backend::start().await;
    let gw = Gateway::start(spec(
        &a.url(false),
        &a.url(false),
        json!([op(
            "vars",
            "GET",
            "/vars/echo",
            json!([
                step(
                    "set-variable",
                    json!({ "name": "tier", "value": "{header.x-plan}-{{gold}}" })
                ),
                step(
                    "set-header",
                    json!({ "name": "x-tier", "value": "tier={var.tier}" })
                ),
                step(
                    "var-to-header",
                    json!({ "name": "tier", "header": "x-from-fixture" })
                ),
            ]),
            json!([step(
                "set-header",
                json!({ "name": "x-tier-out", "value": "{var.tier}" })
            ),])
        )]),
    ));
    let r = client()
        .get(gw.url("/svc/vars/echo"))
        .header("x-plan", "pro")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-tier-out"],
        "pro-{gold}",
        "visible in outbound"
    );
    let v = echo(r).await;
    assert_eq!(v["headers"]["x-tier"], json!(["tier=pro-{gold}"]), "{v}");
    assert_eq!(v["headers"]["x-from-fixture"], json!(["pro-{gold}"]), "{v}");
}

/// An API at `/web` that needs a subscription key, with `cors` at the API scope; and `/lax`,
/// whose `cors` lets unmatched requests go on.
fn cors_spec(backend: &str) -> GatewaySpec {
    let cors = step(
        "cors",
        json!({
            "allowed_origins": ["https://app.example.com"],
            "allowed_methods": ["GET", "PUT"],
            "allowed_headers": ["content-type", "x-trace"],
            "expose_headers": ["x-request-id"],
            "allow_credentials": true,
            "preflight_result_max_age": 600
        }),
    );
    GatewaySpec {
        manifest: manifest(),
        api: json!({
            "version": "c1",
            "backends": [{ "id": "a", "urls": [backend] }],
            "apis": [
                { "id": "web", "path": "/web", "backend": "a",
                  "policies": { "inbound": [cors] },
                  "operations": [
                      { "id": "echo", "method": "GET", "url_template": "/echo" },
                      { "id": "put", "method": "PUT", "url_template": "/echo" },
                      { "id": "fail", "method": "GET", "url_template": "/fail",
                        "policies": { "inbound": [{ "policy": "base" },
                            step("rewrite-uri", json!({ "template": "/{missing}" }))] } },
                      { "id": "down", "method": "GET", "url_template": "/down",
                        "policies": { "inbound": [{ "policy": "base" },
                            step("set-backend-service", json!({ "base_url": format!("http://127.0.0.1:{}", closed_port()) }))] } }
                  ] },
                { "id": "lax", "path": "/lax", "backend": "a", "subscription_required": false,
                  "policies": { "inbound": [step("cors", json!({
                      "allowed_origins": ["*"], "terminate_unmatched_request": false }))] },
                  "operations": [{ "id": "echo", "method": "GET", "url_template": "/echo" }] }
            ],
            "subscriptions": [{ "id": "s", "scope": { "type": "all" }, "primary_key": "web-key-123" }]
        }),
        files: Vec::new(),
        watch_ms: 100,
    }
}

const ORIGIN: &str = "https://app.example.com";

fn header<'r>(r: &'r reqwest::Response, name: &str) -> Option<&'r str> {
    r.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn cors_answers_preflights_at_the_api_scope() {
    let a = Backend::start().await;
    let gw = Gateway::start(cors_spec(&a.url(false)));
    let c = client();
    let preflight = |path: &str, origin: &str, method: &str| {
        c.request(reqwest::Method::OPTIONS, gw.url(path))
            .header("origin", origin)
            .header("access-control-request-method", method)
    };

    // Allowed: answered without a subscription key (browsers send none) and without the
    // backend, for an operation path and for a path no operation has.
    for path in ["/web/echo", "/web/no/such/operation"] {
        let r = preflight(path, ORIGIN, "PUT")
            .header("access-control-request-headers", "Content-Type, X-Trace")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(header(&r, "access-control-allow-origin"), Some(ORIGIN));
        assert_eq!(header(&r, "access-control-allow-credentials"), Some("true"));
        assert_eq!(header(&r, "access-control-allow-methods"), Some("GET, PUT"));
        assert_eq!(
            header(&r, "access-control-allow-headers"),
            Some("content-type, x-trace")
        );
        assert_eq!(header(&r, "access-control-max-age"), Some("600"));
        assert_eq!(header(&r, "vary"), Some("Origin"));
        assert!(r.text().await.unwrap().is_empty());
    }
    assert_eq!(a.requests(), 0);

    // A disallowed origin, method or header: an empty 200 without CORS headers.
    for (origin, method, headers) in [
        ("https://evil.example", "GET", None),
        (ORIGIN, "DELETE", None),
        (ORIGIN, "GET", Some("x-secret")),
    ] {
        let mut req = preflight("/web/echo", origin, method);
        if let Some(h) = headers {
            req = req.header("access-control-request-headers", h);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200, "{origin} {method}");
        assert_eq!(header(&r, "access-control-allow-origin"), None);
        assert_eq!(header(&r, "access-control-allow-methods"), None);
    }

    // `/lax`: any origin (`*`, no credentials); without terminate_unmatched_request nothing
    // answers a preflight for a method it does not allow, and no operation takes OPTIONS: the
    // gateway's 404.
    let r = preflight("/lax/echo", "https://any.example", "GET")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "access-control-allow-origin"), Some("*"));
    assert_eq!(header(&r, "vary"), None);
    let r = preflight("/lax/echo", ORIGIN, "DELETE")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    assert_error(r, 404, "operation_not_found").await;
    assert_eq!(a.requests(), 0);
}

#[tokio::test]
async fn cors_headers_reach_every_answer_of_an_allowed_origin() {
    let a = Backend::start().await;
    let gw = Gateway::start(cors_spec(&a.url(false)));
    let c = client();
    let get = |path: &str, origin: &str| {
        c.get(gw.url(path))
            .header("origin", origin)
            .header("ocp-apim-subscription-key", "web-key-123")
    };
    let assert_cors = |r: &reqwest::Response| {
        assert_eq!(header(r, "access-control-allow-origin"), Some(ORIGIN));
        assert_eq!(header(r, "access-control-allow-credentials"), Some("true"));
        assert_eq!(
            header(r, "access-control-expose-headers"),
            Some("x-request-id")
        );
        assert!(
            r.headers()
                .get_all("vary")
                .iter()
                .any(|v| v.to_str().unwrap().contains("Origin")),
            "{:?}",
            r.headers()
        );
    };

    // The backend's answer.
    let r = get("/web/echo", ORIGIN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_cors(&r);
    assert_eq!(a.requests(), 1);

    // The gateway's own error answers after the policy ran: a later step failed (500), the
    // backend is down (502).
    let r = get("/web/fail", ORIGIN).send().await.unwrap();
    assert_cors(&r);
    assert_error(r, 500, "policy_failed").await;
    let r = get("/web/down", ORIGIN).send().await.unwrap();
    assert_cors(&r);
    assert_error(r, 502, "backend_unreachable").await;

    // Another origin: a GET is ended with an empty 200 (APIM's terminate_unmatched_request),
    // without CORS headers or a backend call.
    let r = get("/web/echo", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    assert!(r.text().await.unwrap().is_empty());
    assert_eq!(a.requests(), 1);

    // Without Origin: no CORS at all.
    let r = c
        .get(gw.url("/web/echo"))
        .header("ocp-apim-subscription-key", "web-key-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    assert_eq!(a.requests(), 2);
}

#[tokio::test]
async fn retry_until_the_backend_succeeds_only_on_listed_statuses() {
    let a = Backend::start().await;
    let retry = |statuses: Value, count: u32| {
        step(
            "retry",
            json!({ "condition": { "status_codes": statuses }, "count": count, "interval_ms": 20 }),
        )
    };
    let gw = Gateway::start(spec(
        &a.url(false),
        &a.url(false),
        json!([
            op(
                "flaky",
                "GET",
                "/flaky/{n}",
                json!([retry(json!([[500, 599]]), 3)]),
                json!([])
            ),
            op(
                "other",
                "GET",
                "/status/{code}",
                json!([retry(json!([[500, 599]]), 3)]),
                json!([])
            ),
            op(
                "exhausted",
                "GET",
                "/gone/status/{code}",
                json!([retry(json!([503]), 2)]),
                json!([])
            ),
        ]),
    ));
    let c = client();

    // 503 twice, then the answer: three attempts.
    let r = c.get(gw.url("/svc/flaky/2")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["attempt"], 3, "{v}");
    assert_eq!(a.flaky_attempts(), 3);

    // A status the condition does not list is answered at once.
    let before = a.requests();
    let r = c.get(gw.url("/svc/status/404")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(a.requests(), before + 1, "not retried");

    // Still failing after count retries: the last answer.
    let before = a.requests();
    let r = c.get(gw.url("/svc/gone/status/503")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(a.requests(), before + 3, "1 + 2 retries");
}

#[tokio::test]
async fn retry_resends_the_same_body() {
    let a = Backend::start().await;
    let gw = Gateway::start(spec(
        &a.url(false),
        &a.url(false),
        json!([
            op(
                "post",
                "POST",
                "/flaky/{n}",
                json!([step(
                    "retry",
                    json!({ "statuses": [503], "count": 2, "interval_ms": 10 })
                ),]),
                json!([])
            ),
            op(
                "big",
                "POST",
                "/big/flaky/{n}",
                json!([step(
                    "retry",
                    json!({ "statuses": [503], "count": 2, "max_body_bytes": 8 })
                ),]),
                json!([])
            ),
        ]),
    ));
    let c = client();
    let payload = "{\"order\":\"same body every time\"}";
    let r = c
        .post(gw.url("/svc/flaky/2"))
        .body(payload)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["attempt"].as_u64(), v["body"].as_str()),
        (Some(3), Some(payload)),
        "{v}"
    );

    // A body larger than max_body_bytes is sent once, without retries.
    let before = a.flaky_attempts();
    let r = c
        .post(gw.url("/svc/big/flaky/99"))
        .body("more than eight bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(a.flaky_attempts(), before + 1);
}

/// A backend that reads each request head and hangs up without answering: the gateway sees a
/// failed backend connection; the count is the number of attempts.
async fn hang_up_backend() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (url, count)
}

#[tokio::test]
async fn retry_on_connect_failure_then_the_gateway_error() {
    let a = Backend::start().await;
    let (hang_up, attempts) = hang_up_backend().await;
    let closed = format!("http://127.0.0.1:{}", closed_port());
    let retry = |on: bool| {
        step(
            "retry",
            json!({ "statuses": [503], "count": 2, "interval_ms": 300, "on_connect_failure": on }),
        )
    };
    let gw = Gateway::start(spec(
        &a.url(false),
        &a.url(false),
        json!([
            op(
                "closed",
                "GET",
                "/closed",
                json!([
                    step("set-backend-service", json!({ "base_url": closed })),
                    retry(true),
                ]),
                json!([])
            ),
            op(
                "hang-up",
                "GET",
                "/hang-up",
                json!([
                    step("set-backend-service", json!({ "base_url": hang_up })),
                    retry(true),
                ]),
                json!([])
            ),
            op(
                "hang-up-once",
                "GET",
                "/hang-up-once",
                json!([
                    step("set-backend-service", json!({ "base_url": hang_up })),
                    retry(false),
                ]),
                json!([])
            ),
        ]),
    ));
    let c = client();

    // Refused connections: two waits of 300 ms, then 502.
    let started = Instant::now();
    let r = c.get(gw.url("/svc/closed")).send().await.unwrap();
    assert_error(r, 502, "backend_unreachable").await;
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "retried twice: {:?}",
        started.elapsed()
    );

    // A backend that hangs up: three attempts, then 502.
    let r = c.get(gw.url("/svc/hang-up")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    // Without on_connect_failure: one attempt.
    let r = c.get(gw.url("/svc/hang-up-once")).send().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
}

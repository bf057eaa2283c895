//! Host properties (docs/host-properties.md): what policies ask of the gateway through the
//! reserved `outpost.` variables — another backend, retries, response headers — set here by
//! the fixtures' `set-var` policy, so the gateway side is tested on its own.

use outpost_tests::gateway::{plugin_library, LISTENER_HTTP};
use outpost_tests::{closed_port, Backend, Gateway, GatewaySpec};
use serde_json::{json, Value};

use crate::{assert_error, client, op, two_backend_api};

fn manifest() -> String {
    format!(
        "{LISTENER_HTTP}\n[[plugins]]\nname = \"fixtures\"\npath = \"{}\"\n",
        plugin_library("outpost_fixture_policies").display(),
    )
}

fn set(name: &str, value: &str) -> Value {
    json!({ "policy": "set-var", "config": { "name": name, "value": value } })
}

/// Two backends (`a`, the API's, and `b`), one open API with an operation per case.
fn spec(a: &str, b: &str, operations: Value) -> GatewaySpec {
    GatewaySpec {
        manifest: manifest(),
        api: two_backend_api(a, b, operations),
        files: Vec::new(),
        watch_ms: 100,
    }
}

/// An operation with inbound steps only.
fn inbound(id: &str, method: &str, template: &str, steps: Value) -> Value {
    op(id, method, template, steps, json!([]))
}

#[tokio::test]
async fn policies_choose_the_backend_by_id_or_url() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let gw = Gateway::start(spec(
        &a.url(false),
        &b.url(false),
        json!([
            inbound(
                "by-id",
                "GET",
                "/by-id/echo",
                json!([set("outpost.backend", "b")])
            ),
            inbound(
                "by-url",
                "GET",
                "/by-url/echo",
                json!([set(
                    "outpost.backend-url",
                    &format!("{}/base", b.url(false))
                )])
            ),
            inbound(
                "unknown",
                "GET",
                "/unknown/echo",
                json!([set("outpost.backend", "zzz")])
            ),
            inbound(
                "bad-url",
                "GET",
                "/bad-url/echo",
                json!([set("outpost.backend-url", "ftp://x")])
            ),
            inbound("plain", "GET", "/plain/echo", json!([])),
        ]),
    ));
    let c = client();

    let r = c.get(gw.url("/svc/by-id/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!((a.requests(), b.requests()), (0, 1));

    let r = c.get(gw.url("/svc/by-url/echo?q=1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["uri"], "/base/by-url/echo?q=1", "{body}");
    assert_eq!((a.requests(), b.requests()), (0, 2));

    let r = c.get(gw.url("/svc/plain/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!((a.requests(), b.requests()), (1, 2));

    let body = assert_error(
        c.get(gw.url("/svc/unknown/echo")).send().await.unwrap(),
        500,
        "policy_failed",
    )
    .await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no backend 'zzz'"),
        "{body}"
    );
    let body = assert_error(
        c.get(gw.url("/svc/bad-url/echo")).send().await.unwrap(),
        500,
        "policy_failed",
    )
    .await;
    assert!(
        body["message"].as_str().unwrap().contains("not an http"),
        "{body}"
    );
    assert_eq!((a.requests(), b.requests()), (1, 2));
}

#[tokio::test]
async fn retries_follow_the_rule_and_resend_the_same_body() {
    let a = Backend::start().await;
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let rule = |count: u32, statuses: Value| {
        json!({ "count": count, "interval_ms": 20, "exponential": true, "jitter": true,
                "statuses": statuses })
        .to_string()
    };
    let gw = Gateway::start(spec(
        &a.url(false),
        &dead,
        json!([
            inbound(
                "flaky",
                "*",
                "/flaky/{n}",
                // The body is read whole first (here upper-cased), so it can be sent again.
                json!([{ "policy": "body-upper", "config": { "limit": 1024 } },
                       set("outpost.retry", &rule(3, json!([[500, 599]])))])
            ),
            inbound(
                "streamed",
                "POST",
                "/streamed/flaky/{n}",
                json!([set("outpost.retry", &rule(3, json!([[500, 599]])))])
            ),
            inbound(
                "other",
                "GET",
                "/other/flaky/{n}",
                json!([set("outpost.retry", &rule(3, json!([[429, 429]])))])
            ),
            inbound(
                "dead",
                "GET",
                "/dead",
                json!([
                    set("outpost.backend", "b"),
                    set("outpost.retry", &rule(2, json!([])))
                ])
            ),
            inbound(
                "bad",
                "GET",
                "/bad",
                json!([set("outpost.retry", "{\"count\": \"many\"}")])
            ),
        ]),
    ));
    let c = client();

    // Two 503s, then the answer: the third attempt is what the client gets.
    let r = c
        .post(gw.url("/svc/flaky/2"))
        .body("the same body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["attempt"], 3, "{body}");
    assert_eq!(body["body"], "THE SAME BODY", "{body}");
    assert_eq!(a.flaky_attempts(), 3);

    // A streamed body cannot be sent twice: no retry, the backend's 503 is the answer.
    let r = c
        .post(gw.url("/svc/streamed/flaky/100"))
        .body("streamed")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(a.flaky_attempts(), 4);

    // More failures than retries: the last answer (503) is passed on after 1 + 3 attempts.
    let r = c.get(gw.url("/svc/flaky/100")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(a.flaky_attempts(), 4 + 4);

    // A status the rule does not name is not retried.
    let r = c.get(gw.url("/svc/other/flaky/100")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(a.flaky_attempts(), 4 + 4 + 1);

    // A backend that cannot be reached: retried, then the gateway's own 502.
    let started = std::time::Instant::now();
    assert_error(
        c.get(gw.url("/svc/dead")).send().await.unwrap(),
        502,
        "backend_unreachable",
    )
    .await;
    // Two waits of at least 10 ms (jitter draws from [wait/2, wait]) happened.
    assert!(started.elapsed() >= std::time::Duration::from_millis(20));

    let body = assert_error(
        c.get(gw.url("/svc/bad")).send().await.unwrap(),
        500,
        "policy_failed",
    )
    .await;
    assert!(
        body["message"].as_str().unwrap().contains("outpost.retry"),
        "{body}"
    );
}

#[tokio::test]
async fn response_headers_reach_every_answer() {
    let a = Backend::start().await;
    let dead = format!("http://127.0.0.1:{}", closed_port());
    let gw = Gateway::start(spec(
        &a.url(false),
        &dead,
        json!([
            inbound(
                "ok",
                "GET",
                "/ok/echo",
                json!([
                    set("outpost.response-header.x-added", "yes"),
                    set("outpost.response-header.bad header", "ignored"),
                    // Replaces the backend's own header; additions keep it.
                    set(
                        "outpost.response-header.content-type",
                        "application/x-replaced"
                    ),
                    set("outpost.response-header-add.x-multi", "one"),
                    set("outpost.response-header-add.x-multi", "two")
                ])
            ),
            inbound(
                "down",
                "GET",
                "/down",
                json!([
                    set("outpost.response-header.x-added", "also"),
                    set("outpost.backend", "b")
                ])
            ),
            inbound(
                "readonly",
                "GET",
                "/readonly/echo",
                json!([set("outpost.client-cert", "forged"),
                       { "policy": "var-to-header", "config": { "name": "outpost.client-cert", "header": "x-cert" } }])
            ),
        ]),
    ));
    let c = client();
    let r = c.get(gw.url("/svc/ok/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-added"], "yes");
    let types: Vec<_> = r.headers().get_all("content-type").iter().collect();
    assert_eq!(types, ["application/x-replaced"]);
    let multi: Vec<_> = r.headers().get_all("x-multi").iter().collect();
    assert_eq!(multi.len(), 2, "{multi:?}");
    let body: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    // A response header is not sent to the backend.
    assert!(body["headers"].get("x-added").is_none(), "{body}");

    // The gateway's own error answer carries it too.
    let r = c.get(gw.url("/svc/down")).send().await.unwrap();
    assert_eq!(r.headers()["x-added"], "also");
    assert_error(r, 502, "backend_unreachable").await;

    // Read-only properties cannot be forged: without a client certificate there is none.
    let r = c.get(gw.url("/svc/readonly/echo")).send().await.unwrap();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["headers"]["x-cert"][0], "(unset)", "{body}");
}

#[tokio::test]
async fn a_body_replaced_by_one_step_is_what_the_next_step_reads() {
    let a = Backend::start().await;
    let mut spec = spec(
        &a.url(false),
        &a.url(false),
        json!([inbound(
            "chain",
            "POST",
            "/chain/echo",
            json!([
                { "policy": "set-body", "config": { "body": "replaced by a policy" } },
                { "policy": "body-upper", "config": { "limit": 1024 } }
            ])
        )]),
    );
    spec.manifest = format!(
        "{}\n[[plugins]]\nname = \"transform\"\npath = \"{}\"\n",
        spec.manifest,
        plugin_library("outpost_policy_transform").display()
    );
    let gw = Gateway::start(spec);
    let r = client()
        .post(gw.url("/svc/chain/echo"))
        .body("the client's body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["body"], "REPLACED BY A POLICY", "{body}");
}

#[tokio::test]
async fn a_first_fast_retry_does_not_wait() {
    let a = Backend::start().await;
    // One retry after a 30 s interval, unless the first retry is fast.
    let rule = json!({ "count": 1, "interval_ms": 30000, "statuses": [[503, 503]],
                       "first_fast_retry": true })
    .to_string();
    let gw = Gateway::start(spec(
        &a.url(false),
        &a.url(false),
        json!([inbound(
            "fast",
            "GET",
            "/fast/flaky/{n}",
            json!([set("outpost.retry", &rule)])
        )]),
    ));
    let r = client()
        .get(gw.url("/svc/fast/flaky/1"))
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .expect("answered without waiting the interval");
    assert_eq!(r.status(), 200);
    assert_eq!(a.flaky_attempts(), 2);
}

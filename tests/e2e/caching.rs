//! Caching policies (`plugins/policy-caching`) on the memory and Redis caches, in the real
//! gateway: hits that never reach the backend, entries separated by query and header, what
//! `Cache-Control` keeps out, expiry, stored values, and a Redis outage served by the backend
//! and counted, then healed.

use std::path::Path;
use std::time::{Duration, Instant};

use outpost_tests::gateway::{plugin_library, LISTENER_HTTP};
use outpost_tests::{Backend, Gateway, GatewaySpec, RedisServer};
use serde_json::{json, Value};

use crate::client;

/// The caching, transform and access-log libraries and both cache plugins, with `caches`
/// and an access log (with metric lines every 100 ms) at `log`.
fn manifest(caches: &str, log: &Path) -> String {
    format!(
        "{LISTENER_HTTP}\n\
         [[plugins]]\nname = \"caching\"\npath = \"{}\"\n\n\
         [[plugins]]\nname = \"transform\"\npath = \"{}\"\n\n\
         [[plugins]]\nname = \"memory\"\npath = \"{}\"\n\n\
         [[plugins]]\nname = \"redis\"\npath = \"{}\"\n\n\
         [[plugins]]\nname = \"access\"\npath = \"{}\"\n\n\
         {caches}\n\
         [telemetry]\nflush_interval_ms = 50\nmetrics_interval_ms = 100\n\n\
         [[telemetry.sinks]]\nname = \"access\"\nprovider = \"access-log\"\nconfig = {{ path = \"{}\", metrics = true }}\n",
        plugin_library("outpost_policy_caching").display(),
        plugin_library("outpost_policy_transform").display(),
        plugin_library("outpost_cache_memory").display(),
        plugin_library("outpost_cache_redis").display(),
        plugin_library("outpost_sink_access_log").display(),
        log.display(),
    )
}

const MEMORY: &str = "[[caches]]\nname = \"local\"\nprovider = \"cache-memory\"\n";

/// `cache-redis` as the default cache, with a deadline generous enough for a loaded machine
/// (a refused connection answers at once anyway).
fn redis_cache(redis: &RedisServer) -> String {
    format!(
        "[[caches]]\nname = \"shared\"\nprovider = \"cache-redis\"\ntimeout_ms = 1000\nconfig = {{ url = \"{}\", command_timeout_ms = 800 }}\n",
        redis.url()
    )
}

fn op(id: &str, method: &str, template: &str, inbound: Value, outbound: Value) -> Value {
    json!({ "id": id, "method": method, "url_template": template,
            "policies": { "inbound": inbound, "outbound": outbound } })
}

fn api(backend: &str) -> Value {
    let lookup = json!({ "policy": "cache-lookup", "config": {
        "vary_by_query_parameter": ["v"], "vary_by_header": ["x-tenant"] } });
    let store = |secs: u64| json!({ "policy": "cache-store", "config": { "duration": secs } });
    let colour_key = "colour:{header.x-user}";
    json!({
        "version": "c1",
        "backends": [{ "id": "b", "urls": [backend] }],
        "apis": [{ "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
          "operations": [
            op("cached", "*", "/cached/*", json!([lookup]), json!([store(3600)])),
            op("short", "GET", "/short/*", json!([{ "policy": "cache-lookup" }]), json!([store(1)])),
            op("nostore", "GET", "/nostore/*", json!([{ "policy": "cache-lookup" }]),
               json!([{ "policy": "set-header", "config": { "name": "cache-control", "value": "no-store" } },
                      store(3600)])),
            op("get-value", "GET", "/value/get/*",
               json!([{ "policy": "cache-lookup-value", "config": {
                          "key": colour_key, "variable_name": "colour", "default_value": "none" } },
                      { "policy": "set-header", "config": { "name": "x-colour", "value": "{var.colour}" } }]),
               json!([])),
            op("set-value", "GET", "/value/set/*",
               json!([{ "policy": "cache-store-value", "config": {
                          "key": colour_key, "value": "{header.x-colour}", "duration": 3600 } }]),
               json!([])),
            op("remove-value", "GET", "/value/remove/*",
               json!([{ "policy": "cache-remove-value", "config": { "key": colour_key } }]),
               json!([])),
          ] }],
    })
}

fn start(caches: &str, log: &Path, backend: &Backend) -> Gateway {
    Gateway::start(GatewaySpec {
        manifest: manifest(caches, log),
        api: api(&backend.url(false)),
        files: Vec::new(),
        watch_ms: 100,
    })
}

/// One answer: status, `Age` (present on hits only), body.
struct Answer {
    status: u16,
    age: Option<String>,
    content_type: Option<String>,
    body: String,
}

async fn send(gw: &Gateway, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = client().request(method.parse().expect("method"), gw.url(path));
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let r = req.send().await.expect("answered");
    let header = |n: &str| {
        r.headers()
            .get(n)
            .map(|v| v.to_str().expect("ascii").to_owned())
    };
    Answer {
        status: r.status().as_u16(),
        age: header("age"),
        content_type: header("content-type"),
        body: r.text().await.expect("body"),
    }
}

/// Sends a GET and checks whether the backend saw it.
async fn expect(
    gw: &Gateway,
    backend: &Backend,
    path: &str,
    headers: &[(&str, &str)],
    reaches_backend: bool,
) -> Answer {
    let before = backend.requests();
    let a = send(gw, "GET", path, headers).await;
    assert_eq!(a.status, 200, "{path}: {}", a.body);
    let reached = backend.requests() - before;
    assert_eq!(
        reached,
        usize::from(reaches_backend),
        "{path} {headers:?}: backend calls"
    );
    assert_eq!(
        a.age.is_some(),
        !reaches_backend,
        "{path}: Age on hits only"
    );
    a
}

/// The colour the backend was told (`x-colour` set from the looked-up variable).
async fn colour(gw: &Gateway, user: &str) -> String {
    let a = send(gw, "GET", "/svc/value/get/echo", &[("x-user", user)]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let v: Value = serde_json::from_str(&a.body).expect("echo");
    v["headers"]["x-colour"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// What every cache must do.
async fn responses_and_values_are_cached(gw: &Gateway, backend: &Backend) {
    let t1 = [("x-tenant", "t1")];
    let first = expect(gw, backend, "/svc/cached/echo?v=1&other=a", &t1, true).await;
    let hit = expect(gw, backend, "/svc/cached/echo?v=1&other=a", &t1, false).await;
    assert_eq!(hit.body, first.body, "the stored response");
    assert_eq!(hit.content_type.as_deref(), Some("application/json"));
    let age: u64 = hit.age.expect("Age").parse().expect("seconds");
    assert!(age <= 2, "Age {age}");
    // A parameter that is not varied by shares the entry; a varied one, a header, or its
    // absence does not.
    expect(gw, backend, "/svc/cached/echo?other=b&v=1", &t1, false).await;
    expect(gw, backend, "/svc/cached/echo?v=2", &t1, true).await;
    expect(gw, backend, "/svc/cached/echo?v=2", &t1, false).await;
    expect(
        gw,
        backend,
        "/svc/cached/echo?v=1",
        &[("x-tenant", "t2")],
        true,
    )
    .await;
    expect(gw, backend, "/svc/cached/echo?v=1", &[], true).await;
    expect(gw, backend, "/svc/cached/echo?v=1", &[], false).await;
    // The client's Cache-Control: no-cache fetches (and stores) a fresh answer, no-store
    // bypasses the cache.
    let fresh = [("x-tenant", "t1"), ("cache-control", "no-cache")];
    expect(gw, backend, "/svc/cached/echo?v=1", &fresh, true).await;
    let none = [("x-tenant", "t1"), ("cache-control", "no-store")];
    expect(gw, backend, "/svc/cached/echo?v=1", &none, true).await;
    expect(gw, backend, "/svc/cached/echo?v=1", &t1, false).await;
    // Only GET.
    for _ in 0..2 {
        let before = backend.requests();
        let a = send(gw, "POST", "/svc/cached/echo?v=1", &t1).await;
        assert_eq!((a.status, backend.requests()), (200, before + 1));
    }
    // A response that says no-store is not stored.
    expect(gw, backend, "/svc/nostore/echo", &[], true).await;
    expect(gw, backend, "/svc/nostore/echo", &[], true).await;
    // Entries expire after `duration`.
    expect(gw, backend, "/svc/short/echo", &[], true).await;
    expect(gw, backend, "/svc/short/echo", &[], false).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    expect(gw, backend, "/svc/short/echo", &[], true).await;
    expect(gw, backend, "/svc/short/echo", &[], false).await;

    // Values: stored, read into a variable, per key, removed.
    assert_eq!(colour(gw, "ann").await, "none", "the default");
    let a = send(
        gw,
        "GET",
        "/svc/value/set/echo",
        &[("x-user", "ann"), ("x-colour", "teal")],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(colour(gw, "ann").await, "teal");
    assert_eq!(colour(gw, "bob").await, "none", "another key");
    let a = send(gw, "GET", "/svc/value/remove/echo", &[("x-user", "ann")]).await;
    assert_eq!(a.status, 200);
    assert_eq!(colour(gw, "ann").await, "none", "removed");
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The latest value of a metric series in the access log's metric lines.
fn metric(path: &Path, name: &str, labels: &[(&str, &str)]) -> f64 {
    lines(path)
        .iter()
        .rev()
        .find(|l| l["metric"] == name && labels.iter().all(|(k, v)| l["labels"][*k] == *v))
        .and_then(|l| l["value"].as_f64())
        .unwrap_or(0.0)
}

/// Waits until a metric series reaches `at_least` (metrics are written every 100 ms).
async fn metric_reaches(path: &Path, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(path, name, labels);
        if v >= at_least {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} stayed at {v} (wanted {at_least})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Cache outcomes the access log recorded for an operation.
fn outcomes(path: &Path, operation: &str) -> Vec<String> {
    lines(path)
        .iter()
        .filter(|l| l.get("metric").is_none() && l["operation"] == operation)
        .filter_map(|l| l["cache"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn responses_and_values_are_cached_in_memory() {
    let backend = Backend::start().await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.jsonl");
    let gw = start(MEMORY, &log, &backend);
    responses_and_values_are_cached(&gw, &backend).await;
    // Telemetry says which requests were hits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let short = outcomes(&log, "short");
    assert_eq!(short, ["miss", "hit", "miss", "hit"], "{short:?}");
}

#[tokio::test]
async fn responses_and_values_are_cached_in_redis_and_a_redis_outage_is_a_miss() {
    let mut redis = RedisServer::start();
    let backend = Backend::start().await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.jsonl");
    let gw = start(&redis_cache(&redis), &log, &backend);
    responses_and_values_are_cached(&gw, &backend).await;

    // The entries are in Redis, under the cache's prefix.
    let a = send(
        &gw,
        "GET",
        "/svc/value/set/echo",
        &[("x-user", "cy"), ("x-colour", "red")],
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(redis
        .command(&["GET", "outpost:value:colour:cy"])
        .contains("\r\nred\r\n"));
    let warm = [("x-tenant", "t9")];
    expect(&gw, &backend, "/svc/cached/echo?v=9", &warm, true).await;
    expect(&gw, &backend, "/svc/cached/echo?v=9", &warm, false).await;
    // Response entries are named by a digest of their key material: nothing of the request
    // (credentials, subscription keys) shows in Redis's key names.
    let keys = redis.command(&["KEYS", "outpost:resp:*"]);
    assert!(!keys.contains("*0\r\n"), "{keys:?}");
    assert!(!keys.contains("t9") && !keys.contains("v=9"), "{keys:?}");

    // Redis down: every request is still answered, by the backend; values fall back to their
    // default and stores carry on; every failure is counted.
    redis.stop();
    let errors_before = metric(
        &log,
        "outpost_cache_errors_total",
        &[("cache", "shared"), ("reason", "error")],
    );
    for _ in 0..3 {
        expect(&gw, &backend, "/svc/cached/echo?v=9", &warm, true).await;
    }
    assert_eq!(colour(&gw, "cy").await, "none");
    let a = send(
        &gw,
        "GET",
        "/svc/value/set/echo",
        &[("x-user", "cy"), ("x-colour", "blue")],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    metric_reaches(
        &log,
        "outpost_cache_errors_total",
        &[("cache", "shared"), ("reason", "error")],
        errors_before + 5.0,
    )
    .await;
    for (policy, n) in [
        ("cache-lookup", 3.0),
        ("cache-lookup-value", 1.0),
        ("cache-store-value", 1.0),
    ] {
        metric_reaches(
            &log,
            "policy_caching_errors_total",
            &[("policy", policy)],
            n,
        )
        .await;
    }
    // A failed lookup does not try to store (no second deadline for the client).
    assert_eq!(
        metric(
            &log,
            "policy_caching_errors_total",
            &[("policy", "cache-store")]
        ),
        0.0
    );

    // Back (empty: the test server keeps nothing): the next request is a miss that is stored,
    // the one after it a hit.
    redis.restart();
    expect(&gw, &backend, "/svc/cached/echo?v=9", &warm, true).await;
    expect(&gw, &backend, "/svc/cached/echo?v=9", &warm, false).await;
    assert_eq!(colour(&gw, "cy").await, "none");
    let a = send(
        &gw,
        "GET",
        "/svc/value/set/echo",
        &[("x-user", "cy"), ("x-colour", "green")],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(colour(&gw, "cy").await, "green");
}

#[tokio::test]
async fn a_gateway_starts_while_redis_is_down_and_caches_once_it_is_up() {
    let mut redis = RedisServer::start();
    redis.stop();
    let backend = Backend::start().await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.jsonl");
    let gw = start(&redis_cache(&redis), &log, &backend);
    for _ in 0..2 {
        expect(&gw, &backend, "/svc/short/echo", &[], true).await;
    }
    redis.restart();
    expect(&gw, &backend, "/svc/short/echo", &[], true).await;
    expect(&gw, &backend, "/svc/short/echo", &[], false).await;
}

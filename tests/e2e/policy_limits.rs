//! Limit policies (`plugins/policy-limits`) against the real gateway: rate limits by key and
//! per subscription (local counters, counters in `cache-memory`, counters in Redis shared by
//! two gateways), quotas, concurrency limits, the fallback when the shared counter fails, and
//! configurations `outpost check` refuses.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_tests::gateway::{plugin_library, run_cli, LISTENER_HTTP};
use outpost_tests::{Backend, Gateway, GatewaySpec, RedisServer};
use serde_json::{json, Value};

use crate::{assert_error, client};

/// The limits library, and whatever else the test adds.
fn manifest(extra: &str) -> String {
    format!(
        "{LISTENER_HTTP}\n[[plugins]]\nname = \"limits\"\npath = \"{}\"\n\n{extra}\n",
        plugin_library("outpost_policy_limits").display(),
    )
}

/// `cache-memory` as the default cache.
fn memory_cache() -> String {
    format!(
        "[[plugins]]\nname = \"memory\"\npath = \"{}\"\n\n[[caches]]\nname = \"counters\"\nprovider = \"cache-memory\"\n",
        plugin_library("outpost_cache_memory").display(),
    )
}

fn spec(manifest: String, api: Value) -> GatewaySpec {
    GatewaySpec {
        manifest,
        api,
        files: Vec::new(),
        watch_ms: 100,
    }
}

/// One open API at `/svc` whose operations are `(id, url template, inbound steps)`.
fn open_api(backend: &str, operations: &[(&str, &str, Value)]) -> Value {
    let operations: Vec<Value> = operations
        .iter()
        .map(|(id, template, inbound)| {
            json!({ "id": id, "method": "*", "url_template": template,
                    "policies": { "inbound": inbound } })
        })
        .collect();
    json!({
        "backends": [{ "id": "b", "urls": [backend] }],
        "apis": [{ "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
                   "operations": operations }],
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Seconds until the current window of `period` seconds ends (windows align to the epoch).
fn seconds_left(period: u64) -> u64 {
    let p = period * 1000;
    (p - now_ms() % p).div_ceil(1000)
}

/// Waits out the end of the current window when it is near, so a test's requests all fall in
/// one window.
async fn clear_of_window_end(period: u64) {
    let p = period * 1000;
    let left = p - now_ms() % p;
    if left < 15_000 {
        tokio::time::sleep(Duration::from_millis(left + 200)).await;
    }
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().expect("ascii").to_owned())
}

fn by_key(calls: u64) -> Value {
    json!([{ "policy": "rate-limit-by-key", "config": {
        "calls": calls, "renewal_period": 3600, "counter_key": "{header.x-client}",
        "remaining_calls_header_name": "x-ratelimit-remaining",
        "total_calls_header_name": "x-ratelimit-limit",
    } }])
}

/// Three calls per client pass with the remaining count going down, the fourth is 429 with
/// `Retry-After`, and another client has its own count.
async fn three_per_client(manifest: String) {
    let backend = Backend::start().await;
    let gw = Gateway::start(spec(
        manifest,
        open_api(&backend.url(false), &[("any", "/*", by_key(3))]),
    ));
    clear_of_window_end(3600).await;
    let c = client();
    let get = |who: &'static str| c.get(gw.url("/svc/echo")).header("x-client", who).send();
    for left in ["2", "1", "0"] {
        let r = get("alice").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some(left));
        assert_eq!(header(&r, "x-ratelimit-limit").as_deref(), Some("3"));
    }
    let before = backend.requests();
    let r = get("alice").await.unwrap();
    let retry: u64 = header(&r, "retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!(
        (1..=3600).contains(&retry) && retry.abs_diff(seconds_left(3600)) <= 2,
        "Retry-After {retry}: the seconds until the window renews ({})",
        seconds_left(3600)
    );
    assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some("0"));
    assert_eq!(header(&r, "x-ratelimit-limit").as_deref(), Some("3"));
    let body = assert_error(r, 429, "rate_limit_exceeded").await;
    assert!(
        body["message"].as_str().unwrap().contains("Try again in"),
        "{body}"
    );
    assert_eq!(backend.requests(), before, "refused before the backend");

    let r = get("bob").await.unwrap();
    assert_eq!(r.status(), 200, "another key has its own count");
    assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some("2"));
    let r = get("alice").await.unwrap();
    assert_eq!(r.status(), 429, "still refused");
}

#[tokio::test]
async fn rate_limit_by_key_counts_locally_without_a_cache() {
    three_per_client(manifest("")).await;
}

#[tokio::test]
async fn rate_limit_by_key_counts_in_the_cache_when_there_is_one() {
    three_per_client(manifest(&memory_cache())).await;
}

#[tokio::test]
async fn two_gateways_share_counters_through_redis() {
    let redis = RedisServer::start();
    let backend = Backend::start().await;
    let extra = format!(
        "[[plugins]]\nname = \"redis\"\npath = \"{}\"\n\n[[caches]]\nname = \"shared\"\nprovider = \"cache-redis\"\nconfig = {{ url = \"{}\" }}\n",
        plugin_library("outpost_cache_redis").display(),
        redis.url()
    );
    let api = open_api(&backend.url(false), &[("any", "/*", by_key(4))]);
    let gws = [
        Gateway::start(spec(manifest(&extra), api.clone())),
        Gateway::start(spec(manifest(&extra), api)),
    ];
    clear_of_window_end(3600).await;
    let c = client();
    // Four calls in all, alternating between the replicas: one count.
    for (i, left) in ["3", "2", "1", "0"].into_iter().enumerate() {
        let r = c
            .get(gws[i % 2].url("/svc/echo"))
            .header("x-client", "carol")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some(left));
    }
    for gw in &gws {
        let r = c
            .get(gw.url("/svc/echo"))
            .header("x-client", "carol")
            .send()
            .await
            .unwrap();
        assert_error(r, 429, "rate_limit_exceeded").await;
    }
    let keys = redis.command(&[
        "KEYS",
        "*outpost:limit:rate-limit-by-key:calls:3600:carol:*",
    ]);
    let window = now_ms() / 3_600_000;
    assert!(
        keys.contains(&format!("rate-limit-by-key:calls:3600:carol:{window}")),
        "the counter is in Redis under its window: {keys}"
    );
}

fn subscription_config(backend: &str) -> Value {
    let rate = json!([{ "policy": "rate-limit", "config": {
        "calls": 2, "renewal_period": 3600,
        "remaining_calls_header_name": "x-ratelimit-remaining",
    } }]);
    let quota = json!([{ "policy": "quota", "config": { "calls": 2, "renewal_period": 86400 } }]);
    json!({
        "backends": [{ "id": "b", "urls": [backend] }],
        "apis": [
            { "id": "a", "path": "/a", "backend": "b",
              "operations": [{ "id": "a-any", "method": "*", "url_template": "/*" }],
              "policies": { "inbound": rate } },
            { "id": "q", "path": "/q", "backend": "b",
              "operations": [{ "id": "q-any", "method": "*", "url_template": "/*" }],
              "policies": { "inbound": quota } },
            { "id": "open", "path": "/open", "backend": "b", "subscription_required": false,
              "operations": [{ "id": "o-any", "method": "*", "url_template": "/*" }],
              "policies": { "inbound": rate } }
        ],
        "subscriptions": [
            { "id": "one", "scope": { "type": "all" }, "primary_key": "key-one-123" },
            { "id": "two", "scope": { "type": "all" }, "primary_key": "key-two-123" }
        ]
    })
}

#[tokio::test]
async fn rate_limit_counts_per_subscription() {
    let backend = Backend::start().await;
    let gw = Gateway::start(spec(manifest(""), subscription_config(&backend.url(false))));
    clear_of_window_end(3600).await;
    let c = client();
    let get = |path: &'static str, key: Option<&'static str>| {
        let mut r = c.get(gw.url(path));
        if let Some(k) = key {
            r = r.header("Ocp-Apim-Subscription-Key", k);
        }
        r.send()
    };
    for left in ["1", "0"] {
        let r = get("/a/echo", Some("key-one-123")).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some(left));
    }
    let r = get("/a/echo", Some("key-one-123")).await.unwrap();
    assert!(header(&r, "retry-after").is_some());
    assert_error(r, 429, "rate_limit_exceeded").await;
    let r = get("/a/echo", Some("key-two-123")).await.unwrap();
    assert_eq!(r.status(), 200, "another subscription has its own count");
    assert_eq!(header(&r, "x-ratelimit-remaining").as_deref(), Some("1"));
    // An open API without a key: the per-subscription limit does not apply (as APIM).
    for _ in 0..4 {
        let r = get("/open/echo", None).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-remaining"), None);
    }
}

#[tokio::test]
async fn quota_answers_403_once_used_up() {
    let backend = Backend::start().await;
    let gw = Gateway::start(spec(manifest(""), subscription_config(&backend.url(false))));
    clear_of_window_end(86400).await;
    let c = client();
    let get = |key: &'static str| {
        c.get(gw.url("/q/echo"))
            .header("Ocp-Apim-Subscription-Key", key)
            .send()
    };
    for _ in 0..2 {
        assert_eq!(get("key-one-123").await.unwrap().status(), 200);
    }
    let r = get("key-one-123").await.unwrap();
    let retry: u64 = header(&r, "retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(retry.abs_diff(seconds_left(86400)) <= 2, "{retry}");
    let body = assert_error(r, 403, "quota_exceeded").await;
    assert!(
        body["message"].as_str().unwrap().contains("call volume"),
        "{body}"
    );
    assert_eq!(get("key-two-123").await.unwrap().status(), 200);
}

#[tokio::test]
async fn bandwidth_quota_counts_response_bytes() {
    let backend = Backend::start().await;
    let quota = json!([{ "policy": "quota-by-key", "config": {
        "bandwidth": 1, "renewal_period": 3600, "counter_key": "{header.x-client}",
    } }]);
    let gw = Gateway::start(spec(
        manifest(""),
        open_api(&backend.url(false), &[("any", "/*", quota)]),
    ));
    clear_of_window_end(3600).await;
    let c = client();
    // The echo of a 1500-byte header is a response of more than 1 KB: the first request
    // passes (nothing used before it), its response uses the quota up.
    let pad = "p".repeat(1500);
    let get = |who: &'static str| {
        c.get(gw.url("/svc/echo"))
            .header("x-client", who)
            .header("x-pad", pad.as_str())
            .send()
    };
    let r = get("dave").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.content_length().is_some_and(|n| n > 1024));
    let r = get("dave").await.unwrap();
    let body = assert_error(r, 403, "quota_exceeded").await;
    assert!(
        body["message"].as_str().unwrap().contains("bandwidth"),
        "{body}"
    );
    assert_eq!(get("erin").await.unwrap().status(), 200);
}

#[tokio::test]
async fn limit_concurrency_refuses_past_max_and_releases_permits() {
    let backend = Backend::start().await;
    let limit = json!([{ "policy": "limit-concurrency", "config": {
        "key": "{header.x-client}", "max_count": 2,
    } }]);
    let gw = Gateway::start(spec(
        manifest(""),
        open_api(&backend.url(false), &[("any", "/*", limit)]),
    ));
    let c = client();
    let slow = |who: &'static str, ms: u32| {
        c.get(gw.url(&format!("/svc/slow/{ms}")))
            .header("x-client", who)
            .send()
    };
    // Two slow requests in flight.
    let first = tokio::spawn(slow("frank", 1500));
    let second = tokio::spawn(slow("frank", 1500));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while backend.requests() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow requests never arrived"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The third is refused at once; another key is not.
    let r = c
        .get(gw.url("/svc/echo"))
        .header("x-client", "frank")
        .send()
        .await
        .unwrap();
    assert_error(r, 429, "concurrency_limit_exceeded").await;
    let r = c
        .get(gw.url("/svc/echo"))
        .header("x-client", "grace")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Once they are answered, their permits are back: two at once again.
    for h in [first, second] {
        let r = h.await.unwrap().unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "slow");
    }
    let (a, b) = tokio::join!(slow("frank", 200), slow("frank", 200));
    assert_eq!(
        (a.unwrap().status().as_u16(), b.unwrap().status().as_u16()),
        (200, 200)
    );

    // A client that goes away gives its permit back too (the backend is still busy).
    let gone = |who: &'static str| {
        c.get(gw.url("/svc/slow/20000"))
            .header("x-client", who)
            .timeout(Duration::from_millis(300))
            .send()
    };
    let (a, b) = tokio::join!(gone("heidi"), gone("heidi"));
    assert!(a.is_err() && b.is_err(), "the client gave up");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = c
            .get(gw.url("/svc/echo"))
            .header("x-client", "heidi")
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert_eq!(r.status(), 429);
        assert!(
            std::time::Instant::now() < deadline,
            "the permits of requests whose client went away were never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_failing_shared_counter_falls_back_and_is_counted() {
    let backend = Backend::start().await;
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.jsonl");
    let extra = format!(
        "[[plugins]]\nname = \"fixtures\"\npath = \"{}\"\n\n[[plugins]]\nname = \"access\"\npath = \"{}\"\n\n\
         [[caches]]\nname = \"slow\"\nprovider = \"cache-slow\"\ntimeout_ms = 50\nconfig = {{ delay_ms = 2000 }}\n\n\
         [telemetry]\nmetrics_interval_ms = 60000\n\n\
         [[telemetry.sinks]]\nname = \"access\"\nprovider = \"access-log\"\nconfig = {{ path = \"{}\", metrics = true }}\n",
        plugin_library("outpost_fixture_policies").display(),
        plugin_library("outpost_sink_access_log").display(),
        log.display()
    );
    let limit = |failure: &str| {
        json!([{ "policy": "rate-limit-by-key", "config": {
            "calls": 2, "renewal_period": 3600, "counter_key": "fallback:{header.x-client}",
            "counter_cache": "slow", "on_cache_failure": failure,
        } }])
    };
    let mut gw = Gateway::start(spec(
        manifest(&extra),
        open_api(
            &backend.url(false),
            &[
                ("local", "/local/*", limit("local")),
                ("closed", "/closed/*", limit("fail-closed")),
            ],
        ),
    ));
    clear_of_window_end(3600).await;
    let c = client();
    let get = |path: &'static str| c.get(gw.url(path)).header("x-client", "ivan").send();
    // The cache times out every time: counted in the gateway, the limit still holds.
    assert_eq!(get("/svc/local/echo").await.unwrap().status(), 200);
    assert_eq!(get("/svc/local/echo").await.unwrap().status(), 200);
    let r = get("/svc/local/echo").await.unwrap();
    assert_error(r, 429, "rate_limit_exceeded").await;
    // Fail-closed: refused.
    let r = get("/svc/closed/echo").await.unwrap();
    assert_error(r, 503, "limit_unavailable").await;

    // One warning for the four failures (at most one per 10 s).
    let warnings = gw
        .json_logs()
        .into_iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("The shared limit counter timed out"))
        })
        .count();
    assert_eq!(warnings, 1, "{:?}", gw.logs());

    // Each failure is in the metric, labelled with the policy.
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)).success());
    let lines: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let value = lines
        .iter()
        .rev()
        .find(|l| {
            l["metric"] == "policy_limits_cache_fallback_total"
                && l["labels"]["policy"] == "rate-limit-by-key"
        })
        .and_then(|l| l["value"].as_f64());
    assert_eq!(value, Some(4.0), "{lines:?}");
}

#[test]
fn outpost_check_rejects_bad_limit_configs_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("outpost.toml");
    std::fs::write(
        &m,
        format!(
            "{}\n[config]\ntype = \"file\"\npath = \"api.json\"\n",
            manifest("")
        ),
    )
    .unwrap();
    let api = json!({
        "backends": [{ "id": "b", "urls": ["http://127.0.0.1:9"] }],
        "apis": [{ "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
                   "operations": [{ "id": "any", "method": "*", "url_template": "/*" }],
                   "policies": { "inbound": [
                       { "policy": "rate-limit-by-key", "config": {
                           "calls": 0, "renewal_period": 60, "counter_key": "{client.ip}" } },
                       { "policy": "rate-limit-by-key", "config": {
                           "calls": 5, "renewal_period": 60, "counter_key": "{client.port}" } },
                       { "policy": "quota", "config": { "renewal_period": 60 } },
                       { "policy": "limit-concurrency", "config": { "key": "k", "max_count": 1, "timeout": 5 } }
                   ] } }]
    });
    std::fs::write(dir.path().join("api.json"), api.to_string()).unwrap();
    let (ok, _, err) = run_cli(&["check", "--manifest", m.to_str().unwrap()]);
    assert!(!ok, "{err}");
    for needle in [
        "calls must be at least 1",
        "counter_key: unknown expression '{client.port}'",
        "give calls, bandwidth",
        "unknown field `timeout`",
    ] {
        assert!(err.contains(needle), "missing '{needle}' in:\n{err}");
    }
    assert!(
        err.contains("inbound[0]") && err.contains("inbound[3]"),
        "{err}"
    );
}

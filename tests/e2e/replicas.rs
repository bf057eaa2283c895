//! Several gateway replicas sharing one real redis-server through `cache-redis`: a rate limit
//! that holds across all of them, that keeps limiting (per replica) while Redis is down and
//! is shared again once it is back, and responses cached by one replica answered by another.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use outpost_tests::gateway::{plugin_library, LISTENER_HTTP};
use outpost_tests::{Backend, Gateway, GatewaySpec, RedisServer};
use serde_json::{json, Value};

use crate::client;

/// Calls allowed per window and key.
const N: usize = 5;
/// The window: an hour, so that no window boundary falls inside the test (see
/// [`clear_of_window_end`]).
const PERIOD_SECS: u64 = 3600;
const REPLICAS: usize = 3;

/// The same manifest for every replica (but for its access log): the limits and caching
/// policies, Redis as the default cache, metric lines every 100 ms.
fn manifest(redis: &RedisServer, log: &Path) -> String {
    format!(
        "{LISTENER_HTTP}\n\
         [[plugins]]\nname = \"limits\"\npath = \"{}\"\n\n\
         [[plugins]]\nname = \"caching\"\npath = \"{}\"\n\n\
         [[plugins]]\nname = \"redis\"\npath = \"{}\"\n\n\
         [[plugins]]\nname = \"access\"\npath = \"{}\"\n\n\
         [[caches]]\nname = \"shared\"\nprovider = \"cache-redis\"\ntimeout_ms = 1000\nconfig = {{ url = \"{}\", command_timeout_ms = 800 }}\n\n\
         [telemetry]\nflush_interval_ms = 50\nmetrics_interval_ms = 100\n\n\
         [[telemetry.sinks]]\nname = \"access\"\nprovider = \"access-log\"\nconfig = {{ path = \"{}\", metrics = true }}\n",
        plugin_library("outpost_policy_limits").display(),
        plugin_library("outpost_policy_caching").display(),
        plugin_library("outpost_cache_redis").display(),
        plugin_library("outpost_sink_access_log").display(),
        redis.url(),
        log.display(),
    )
}

fn api(backend: &str) -> Value {
    json!({
        "version": "r1",
        "backends": [{ "id": "b", "urls": [backend] }],
        "apis": [{ "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
          "operations": [
            { "id": "limited", "method": "GET", "url_template": "/limited/*",
              "policies": { "inbound": [{ "policy": "rate-limit-by-key", "config": {
                  "calls": N, "renewal_period": PERIOD_SECS, "counter_key": "{header.x-client}" } }] } },
            { "id": "cached", "method": "GET", "url_template": "/cached/*",
              "policies": {
                "inbound": [{ "policy": "cache-lookup", "config": { "vary_by_query_parameter": ["*"] } }],
                "outbound": [{ "policy": "cache-store", "config": { "duration": 3600 } }] } },
          ] }],
    })
}

/// Three replicas of one configuration, each with its own access log.
struct Replicas {
    gws: Vec<Gateway>,
    logs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

fn start(redis: &RedisServer, backend: &Backend) -> Replicas {
    let dir = tempfile::tempdir().unwrap();
    let logs: Vec<PathBuf> = (0..REPLICAS)
        .map(|i| dir.path().join(format!("access-{i}.jsonl")))
        .collect();
    let gws = logs
        .iter()
        .map(|log| {
            Gateway::start(GatewaySpec {
                manifest: manifest(redis, log),
                api: api(&backend.url(false)),
                files: Vec::new(),
                watch_ms: 100,
            })
        })
        .collect();
    Replicas {
        gws,
        logs,
        _dir: dir,
    }
}

fn seconds_left() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    PERIOD_SECS - now % PERIOD_SECS
}

/// Windows are aligned to the Unix epoch: when the current one ends within a minute, wait
/// for the next, so that every count of the test falls in one window.
async fn clear_of_window_end() {
    let left = seconds_left();
    if left < 60 {
        tokio::time::sleep(Duration::from_secs(left + 1)).await;
    }
}

/// Sends `count` limited requests for `key`, round-robin over the replicas (starting with
/// the first); answers (replica, status) in order.
async fn limited(r: &Replicas, key: &str, count: usize) -> Vec<(usize, u16)> {
    let c = client();
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let gw = i % r.gws.len();
        let resp = c
            .get(r.gws[gw].url("/svc/limited/echo"))
            .header("x-client", key)
            .send()
            .await
            .expect("answered");
        let status = resp.status().as_u16();
        if status == 429 {
            assert!(
                resp.headers().contains_key("retry-after"),
                "a refusal says when to come back"
            );
        }
        out.push((gw, status));
    }
    out
}

/// Asserts that exactly the first `N` of `answers` passed, the rest were refused.
fn exactly_first_n_pass(answers: &[(usize, u16)], what: &str) {
    let statuses: Vec<u16> = answers.iter().map(|(_, s)| *s).collect();
    let mut expected = vec![200u16; N];
    expected.resize(answers.len(), 429);
    assert_eq!(statuses, expected, "{what}");
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn metric(path: &Path, name: &str, labels: &[(&str, &str)]) -> f64 {
    lines(path)
        .iter()
        .rev()
        .find(|l| l["metric"] == name && labels.iter().all(|(k, v)| l["labels"][*k] == *v))
        .and_then(|l| l["value"].as_f64())
        .unwrap_or(0.0)
}

/// Waits until a metric series of one replica reaches `at_least`, then for one more
/// snapshot, and answers its value.
async fn settled_metric(path: &Path, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(path, name, labels) < at_least {
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} in {} stayed at {} (wanted {at_least})",
            path.display(),
            metric(path, name, labels)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    metric(path, name, labels)
}

const FALLBACK: &str = "policy_limits_cache_fallback_total";
const BY_KEY: [(&str, &str); 1] = [("policy", "rate-limit-by-key")];

#[tokio::test]
async fn a_rate_limit_holds_across_replicas_survives_a_redis_outage_and_is_shared_again() {
    let mut redis = RedisServer::start();
    let backend = Backend::start().await;
    let r = start(&redis, &backend);
    clear_of_window_end().await;

    // Shared: 3N requests round-robin over the three replicas; exactly the first N pass.
    // Tolerance zero: every request increments one Redis counter with INCRBY inside
    // MULTI/EXEC (atomic, never lost or doubled), the window is aligned to the Unix epoch so
    // every replica uses the same key, and the hour-long window cannot end inside the test.
    let before = backend.requests();
    let answers = limited(&r, "dave", 3 * N).await;
    exactly_first_n_pass(&answers, "one count for all replicas");
    assert_eq!(
        backend.requests() - before,
        N,
        "refusals never reach the backend"
    );
    for log in &r.logs {
        assert_eq!(
            metric(log, FALLBACK, &BY_KEY),
            0.0,
            "no fallback while Redis is up"
        );
    }

    // Redis killed: every request is still answered (no 5xx), and each replica limits on its
    // own: N per replica for a new key. Every one of these requests was counted locally, and
    // the fallback metric of each replica says so.
    redis.stop();
    let answers = limited(&r, "erin", REPLICAS * (N + 1)).await;
    for gw in 0..REPLICAS {
        let mine: Vec<(usize, u16)> = answers.iter().copied().filter(|(g, _)| *g == gw).collect();
        exactly_first_n_pass(&mine, &format!("replica {gw} counts alone"));
    }
    let answers = limited(&r, "dave", REPLICAS).await;
    assert!(
        answers.iter().all(|(_, s)| *s == 200 || *s == 429),
        "no failure answers: {answers:?}"
    );
    for log in &r.logs {
        let fallbacks = settled_metric(log, FALLBACK, &BY_KEY, (N + 2) as f64).await;
        assert_eq!(fallbacks, (N + 2) as f64, "{}", log.display());
        assert!(metric(log, "outpost_cache_errors_total", &[("cache", "shared")]) >= 1.0);
    }

    // Redis back. The test server keeps nothing on disk, so the counters it held are gone:
    // shared counting starts again from zero — for a new key, and for "dave" too (with
    // persistence, dave's count would have continued from its pre-outage value and he would
    // stay refused). What is asserted: exactly N of 3N pass across all replicas for each
    // key, and no request falls back any more.
    redis.restart();
    exactly_first_n_pass(&limited(&r, "frank", 3 * N).await, "shared again");
    exactly_first_n_pass(
        &limited(&r, "dave", 3 * N).await,
        "dave's shared count restarted with the empty Redis",
    );
    for log in &r.logs {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            metric(log, FALLBACK, &BY_KEY),
            (N + 2) as f64,
            "{}: no fallback after Redis came back",
            log.display()
        );
    }
}

#[tokio::test]
async fn a_response_cached_through_one_replica_is_a_hit_on_the_others() {
    let redis = RedisServer::start();
    let backend = Backend::start().await;
    let r = start(&redis, &backend);
    let c = client();
    let get = |gw: usize, path: &str| c.get(r.gws[gw].url(path)).send();

    for (first, path) in [(0, "/svc/cached/echo?a=1"), (2, "/svc/cached/echo?a=2")] {
        let before = backend.requests();
        let miss = get(first, path).await.unwrap();
        assert_eq!(miss.status(), 200);
        assert!(miss.headers().get("age").is_none());
        let body = miss.text().await.unwrap();
        assert_eq!(backend.requests(), before + 1);
        for gw in (0..REPLICAS).filter(|g| *g != first) {
            let hit = get(gw, path).await.unwrap();
            assert_eq!(hit.status(), 200);
            assert!(hit.headers().contains_key("age"), "replica {gw}: a hit");
            assert_eq!(
                hit.text().await.unwrap(),
                body,
                "replica {gw}: the stored answer"
            );
        }
        assert_eq!(
            backend.requests(),
            before + 1,
            "{path}: one backend call in all"
        );
    }
}

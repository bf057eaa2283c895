//! Plugin kinds beyond policies, and the host work policies ask for: caches (the
//! `cache-memory` plugin and a slow cache on its own runtime), shared counters, request and
//! response bodies, HTTP calls, rewrites, telemetry sinks (the `access-log` plugin) with the
//! queue that drops instead of blocking, and metrics plugins define.

use std::path::Path;
use std::time::Duration;

use outpost_tests::gateway::{plugin_library, run_cli, run_cli_env, LISTENER_HTTP};
use outpost_tests::{closed_port, Backend, Gateway, GatewaySpec};
use serde_json::{json, Value};

use crate::{assert_error, client};

/// Fixture policies, and whatever else the test adds (caches, sinks, more libraries).
fn manifest(extra: &str) -> String {
    format!(
        "{LISTENER_HTTP}\n[[plugins]]\nname = \"fixtures\"\npath = \"{}\"\n\n[[plugins]]\nname = \"memory\"\npath = \"{}\"\n\n[[plugins]]\nname = \"access\"\npath = \"{}\"\n\n{extra}\n",
        plugin_library("outpost_fixture_policies").display(),
        plugin_library("outpost_cache_memory").display(),
        plugin_library("outpost_sink_access_log").display(),
    )
}

/// A file in a temporary directory for the `access-log` sink to write to (a `Path`).
struct AccessLog {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl AccessLog {
    fn new() -> AccessLog {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.jsonl");
        AccessLog { _dir: dir, path }
    }

    /// The sink's `[[telemetry.sinks]]` entry (a line per metric series when `metrics`).
    fn sink(&self, metrics: bool) -> String {
        format!(
            "[[telemetry.sinks]]\nname = \"access\"\nprovider = \"access-log\"\nconfig = {{ path = \"{}\", metrics = {metrics} }}\n",
            self.path.display()
        )
    }
}

impl std::ops::Deref for AccessLog {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

/// One open API at `/svc` with these operations (each `{id, method, url_template, policies}`).
fn api(backend: &str, operations: Value) -> Value {
    json!({
        "version": "w1",
        "backends": [{ "id": "b", "urls": [backend] }],
        "apis": [{ "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
                   "operations": operations }],
    })
}

fn op(id: &str, method: &str, template: &str, inbound: Value, outbound: Value) -> Value {
    json!({ "id": id, "method": method, "url_template": template,
            "policies": { "inbound": inbound, "outbound": outbound } })
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// Waits until the access log has `n` request lines.
async fn wait_lines(path: &Path, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let l: Vec<Value> = lines(path)
            .into_iter()
            .filter(|l| l.get("metric").is_none())
            .collect();
        if l.len() >= n {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the access log never reached {n} request lines: {:?}",
        lines(path)
    );
}

fn metric(lines: &[Value], name: &str, label: (&str, &str)) -> Option<f64> {
    lines
        .iter()
        .rev()
        .find(|l| l["metric"] == name && l["labels"][label.0] == label.1)
        .and_then(|l| l["value"].as_f64())
}

#[tokio::test]
async fn counters_and_values_go_through_the_cache_plugin_and_requests_reach_the_sink() {
    let backend = Backend::start().await;
    let log = AccessLog::new();
    let extra = format!(
        "[[caches]]\nname = \"local\"\nprovider = \"cache-memory\"\nconfig = {{ max_bytes = 1048576 }}\n\n\
         [telemetry]\nflush_interval_ms = 50\nmetrics_interval_ms = 60000\n\n{}",
        log.sink(true)
    );
    let ops = json!([
        op(
            "gate",
            "GET",
            "/gate/echo",
            json!([{ "policy": "metric-bump", "config": { "name": "fixture_gate_requests_total" } },
                  { "policy": "counter-gate", "config": { "limit": 3, "window_ms": 60000 } }]),
            json!([])
        ),
        op(
            "values",
            "GET",
            "/values",
            json!([{ "policy": "cache-value", "config": { "cache": "local" } }]),
            json!([])
        ),
        op(
            "elsewhere",
            "GET",
            "/elsewhere",
            json!([{ "policy": "cache-value", "config": { "cache": "nope" } }]),
            json!([])
        ),
    ]);
    let mut gw = Gateway::start(GatewaySpec {
        manifest: manifest(&extra),
        api: api(&backend.url(false), ops),
        files: Vec::new(),
        watch_ms: 100,
    });
    let c = client();

    // The counter lives in the cache plugin: three calls per client pass, the fourth is 429;
    // another client has its own count.
    for n in 1..=3 {
        let r = c
            .get(gw.url("/svc/gate/echo"))
            .header("x-client", "a")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["headers"]["x-count"], json!([n.to_string()]));
    }
    let before = backend.requests();
    let r = c
        .get(gw.url("/svc/gate/echo"))
        .header("x-client", "a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-count"], "4");
    assert_eq!(backend.requests(), before, "refused before the backend");
    let r = c
        .get(gw.url("/svc/gate/echo"))
        .header("x-client", "b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Values: miss, store, hit.
    let get = |k: &'static str| c.get(gw.url("/svc/values")).header("x-key", k).send();
    let r = get("colour").await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-cache-result"], "miss");
    let r = c
        .get(gw.url("/svc/values"))
        .header("x-key", "colour")
        .header("x-value", "teal")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = get("colour").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-cache-result"], "ok");
    assert_eq!(r.text().await.unwrap(), "teal");
    // A cache name the manifest does not have is an error the policy sees, not a crash.
    let r = c
        .get(gw.url("/svc/elsewhere"))
        .header("x-key", "k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("no cache named 'nope'"));

    // Every request reached the sink, with what it matched.
    let recorded = wait_lines(&log, 9).await;
    assert_eq!(recorded.len(), 9, "{recorded:?}");
    let refused = recorded
        .iter()
        .find(|l| l["status"] == 429)
        .expect("the 429 is recorded");
    assert_eq!(refused["api"], "svc");
    assert_eq!(refused["operation"], "gate");
    assert_eq!(refused["route"], "/gate/echo");
    assert!(refused.get("backend_status").is_none(), "no backend call");
    let passed = recorded
        .iter()
        .find(|l| l["status"] == 200 && l["operation"] == "gate")
        .unwrap();
    assert_eq!(passed["backend_status"], 200);
    assert_eq!(passed["backend"], "b");
    assert_eq!(passed["trace_id"].as_str().map(str::len), Some(32));
    assert!(passed["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert_eq!(passed["gateway"], "outpost");
    let hit = recorded
        .iter()
        .find(|l| l["status"] == 200 && l["operation"] == "values")
        .unwrap();
    assert_eq!(hit["cache"], "hit");

    // At shutdown the sink gets the last metrics snapshot: the plugin-defined counter counted
    // every request of its operation.
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)).success());
    let all = lines(&log);
    assert_eq!(
        metric(&all, "fixture_gate_requests_total", ("api", "svc")),
        Some(5.0),
        "{all:?}"
    );
}

#[tokio::test]
async fn a_slow_or_missing_cache_is_an_answer_for_the_policy_not_a_failed_request() {
    let backend = Backend::start().await;
    let log = AccessLog::new();
    let extra = format!(
        "[[caches]]\nname = \"slow\"\nprovider = \"cache-slow\"\ntimeout_ms = 50\nconfig = {{ delay_ms = 2000 }}\n\n\
         [[caches]]\nname = \"quick\"\nprovider = \"cache-slow\"\nconfig = {{ delay_ms = 1 }}\n\n\
         [telemetry]\nmetrics_interval_ms = 60000\n\n{}",
        log.sink(true)
    );
    let ops = json!([
        op(
            "slow",
            "GET",
            "/slow-gate/echo",
            json!([{ "policy": "counter-gate", "config": { "limit": 1, "window_ms": 1000, "cache": "slow" } }]),
            json!([])
        ),
        op(
            "quick",
            "GET",
            "/quick-gate/echo",
            json!([{ "policy": "counter-gate", "config": { "limit": 1, "window_ms": 1000, "cache": "quick" } }]),
            json!([])
        ),
        op(
            "forever",
            "GET",
            "/forever",
            json!([{ "policy": "pause-forever" }]),
            json!([])
        ),
    ]);
    let mut gw = Gateway::start(GatewaySpec {
        manifest: manifest(&extra),
        api: api(&backend.url(false), ops),
        files: Vec::new(),
        watch_ms: 100,
    });
    let c = client();
    // The default cache (the first) times out at 50 ms: the policy sees a timeout and, as it
    // chooses, lets the request through.
    for _ in 0..2 {
        let r = c.get(gw.url("/svc/slow-gate/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["headers"]["x-count"], json!(["timeout"]));
    }
    // A cache answering from its own runtime in time counts.
    let r = c.get(gw.url("/svc/quick-gate/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(gw.url("/svc/quick-gate/echo")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    // A policy that never stops asking is stopped: 500, the gateway carries on.
    let r = c.get(gw.url("/svc/forever")).send().await.unwrap();
    let body = assert_error(r, 500, "policy_failed").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("paused more than 16 times"),
        "{body}"
    );
    let r = c
        .get(gw.url("/svc/quick-gate/echo"))
        .header("x-client", "z")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(10)).success());
    let all = lines(&log);
    let timeouts = all
        .iter()
        .rev()
        .find(|l| {
            l["metric"] == "outpost_cache_errors_total"
                && l["labels"]["cache"] == "slow"
                && l["labels"]["reason"] == "timeout"
        })
        .and_then(|l| l["value"].as_f64());
    // Two gate calls, and the 16 lookups the gateway performed for the pause-forever policy
    // before stopping it went to the default cache.
    assert_eq!(timeouts, Some(2.0 + 16.0), "{all:?}");
}

#[tokio::test]
async fn policies_read_and_replace_request_and_response_bodies() {
    let backend = Backend::start().await;
    let ops = json!([
        op(
            "upper",
            "POST",
            "/upper/echo",
            json!([{ "policy": "body-upper", "config": { "limit": 1024 } }]),
            json!([])
        ),
        op(
            "big",
            "POST",
            "/big/echo",
            json!([{ "policy": "body-upper", "config": { "limit": 1048576 } }]),
            json!([])
        ),
        op(
            "down",
            "GET",
            "/bytes/*",
            json!([]),
            json!([{ "policy": "body-upper", "config": { "limit": 1024 } }])
        ),
    ]);
    let gw = Gateway::start(GatewaySpec {
        manifest: manifest("[limits]\nmax_body_bytes = 4096\n"),
        api: api(&backend.url(false), ops),
        files: Vec::new(),
        watch_ms: 100,
    });
    let c = client();

    let r = c
        .post(gw.url("/svc/upper/echo"))
        .body("hello, body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["body"], "HELLO, BODY");
    assert_eq!(v["headers"]["content-length"], json!(["11"]));
    assert_eq!(v["headers"]["x-body"], json!(["upper"]));

    // A body of unknown length (chunked) is read and sent on with its exact length.
    let chunks = futures_util::stream::iter(vec![Ok::<_, std::io::Error>("abc"), Ok("def")]);
    let r = c
        .post(gw.url("/svc/upper/echo"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["body"], "ABCDEF");
    assert_eq!(v["headers"]["content-length"], json!(["6"]));
    assert!(v["headers"].get("transfer-encoding").is_none());

    // Past the policy's limit: the policy is told, and the whole body still reaches the
    // backend unchanged.
    let long = "y".repeat(2000);
    let r = c
        .post(gw.url("/svc/upper/echo"))
        .body(long.clone())
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-body"], json!(["too-large"]));
    assert_eq!(v["body_len"], 2000);
    assert_eq!(v["body"], long);

    // Past the gateway's own body limit, a policy's larger limit does not help: 413.
    let r = c
        .post(gw.url("/svc/big/echo"))
        .body("z".repeat(8000))
        .send()
        .await
        .unwrap();
    assert_error(r, 413, "body_too_large").await;

    // Response bodies: read and replaced, with the new length.
    let r = c.get(gw.url("/svc/bytes/100")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-body"], "upper");
    assert_eq!(r.headers()["content-length"], "100");
    assert_eq!(r.text().await.unwrap(), "X".repeat(100));
}

#[tokio::test]
async fn policies_call_out_rewrite_the_request_and_change_the_status() {
    let backend = Backend::start().await;
    let callee = Backend::start().await;
    let ops = json!([
        op(
            "call",
            "GET",
            "/call/echo",
            json!([{ "policy": "callout", "config": { "url": callee.url(false) + "/echo/called" } }]),
            json!([])
        ),
        op(
            "closed",
            "GET",
            "/closed/echo",
            json!([{ "policy": "callout", "config": { "url": format!("http://127.0.0.1:{}/x", closed_port()) } }]),
            json!([])
        ),
        op(
            "slow",
            "GET",
            "/slowcall/echo",
            json!([{ "policy": "callout", "config": { "url": callee.url(false) + "/slow/2000", "timeout_ms": 100 } }]),
            json!([])
        ),
        op(
            "moved",
            "GET",
            "/moved",
            json!([{ "policy": "rewrite", "config": { "path": "/echo/rewritten", "query": "a=1&b=2", "method": "PUT" } }]),
            json!([{ "policy": "rewrite", "config": { "status": 203 } }])
        ),
        op(
            "bad",
            "GET",
            "/bad",
            json!([{ "policy": "rewrite", "config": { "path": "/../etc" } }]),
            json!([])
        ),
    ]);
    let gw = Gateway::start(GatewaySpec {
        manifest: manifest(""),
        api: api(&backend.url(false), ops),
        files: Vec::new(),
        watch_ms: 100,
    });
    let c = client();

    let r = c.get(gw.url("/svc/call/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-callout-status"], json!(["200"]));
    assert_eq!(v["headers"]["x-callout-type"], json!(["application/json"]));
    let called = v["headers"]["x-callout-body"][0].as_str().unwrap();
    assert!(
        called.contains("\"method\":\"POST\"") && called.contains("/echo/called"),
        "{called}"
    );
    assert_eq!(callee.requests(), 1);

    let r = c.get(gw.url("/svc/closed/echo")).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-callout-error"], json!(["error"]));
    let r = c.get(gw.url("/svc/slowcall/echo")).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["headers"]["x-callout-error"], json!(["timeout"]));

    let r = c.get(gw.url("/svc/moved")).send().await.unwrap();
    assert_eq!(r.status(), 203);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["method"], "PUT");
    assert_eq!(v["uri"], "/echo/rewritten?a=1&b=2");

    // A rewrite that could escape the API is refused to the policy (which fails the request).
    let r = c.get(gw.url("/svc/bad")).send().await.unwrap();
    let body = assert_error(r, 500, "policy_failed").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("rewrite refused"),
        "{body}"
    );
}

#[tokio::test]
async fn telemetry_drops_and_counts_instead_of_blocking_requests() {
    let backend = Backend::start().await;
    let log = AccessLog::new();
    let extra = format!(
        "[telemetry]\nqueue_capacity = 2\nbatch_max = 1\nflush_interval_ms = 10\nmetrics_interval_ms = 60000\nshutdown_flush_ms = 1000\n\n\
         [[telemetry.sinks]]\nname = \"stuck\"\nprovider = \"sink-slow\"\nconfig = {{ delay_ms = 300 }}\n\n{}",
        log.sink(true)
    );
    let mut gw = Gateway::start(GatewaySpec {
        manifest: manifest(&extra),
        api: crate::open_api(&backend.url(false)),
        files: Vec::new(),
        watch_ms: 100,
    });
    let c = client();
    let total = 40;
    for _ in 0..total {
        let r = c.get(gw.url("/svc/echo")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(15)).success());
    let all = lines(&log);
    let requests = all.iter().filter(|l| l.get("metric").is_none()).count() as f64;
    let dropped =
        |sink| metric(&all, "outpost_telemetry_dropped_total", ("sink", sink)).unwrap_or(0.0);
    // The stuck sink fell behind and lost records, counted; the other sink's records and
    // drops add up to every request exactly.
    assert!(dropped("stuck") > 0.0, "{all:?}");
    assert!(dropped("stuck") > dropped("access"), "{all:?}");
    assert_eq!(requests + dropped("access"), f64::from(total), "{all:?}");
}

/// Context switches of the gateway's thread named `name` (as `/proc` shows it, 15 bytes).
fn thread_switches(pid: u32, name: &str) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap();
            return status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                .sum();
        }
    }
    panic!("no thread named {name} in process {pid}");
}

#[tokio::test]
async fn idle_telemetry_threads_sleep_until_records_arrive() {
    let backend = Backend::start().await;
    let log = AccessLog::new();
    let extra = format!(
        "[telemetry]\nflush_interval_ms = 50\nmetrics_interval_ms = 60000\n\n{}",
        log.sink(false)
    );
    let gw = Gateway::start(GatewaySpec {
        manifest: manifest(&extra),
        api: crate::open_api(&backend.url(false)),
        files: Vec::new(),
        watch_ms: 100,
    });
    let c = client();
    let r = c.get(gw.url("/svc/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    wait_lines(&log, 1).await;
    // Idle for 2 s: a thread ticking every 20 ms would switch 100 times or more. The idle
    // telemetry thread wakes only to look at the stop flag (every 100 ms); the sink's thread
    // only for the next batch or metrics snapshot (a minute away).
    let threads = ["outpost-telemet", "outpost-sink-ac"];
    let before = threads.map(|t| thread_switches(gw.pid(), t));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle: Vec<u64> = threads
        .iter()
        .zip(before)
        .map(|(t, b)| thread_switches(gw.pid(), t) - b)
        .collect();
    assert!(idle[0] <= 50, "{idle:?} context switches in 2 s of idling");
    assert!(idle[1] <= 5, "{idle:?} context switches in 2 s of idling");
    // The next record wakes it.
    let r = c.get(gw.url("/svc/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(wait_lines(&log, 2).await.len(), 2);
}

#[tokio::test]
async fn caches_and_sinks_from_the_manifest_are_checked_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("outpost.toml");
    std::fs::write(dir.path().join("api.json"), r#"{"version":"v","apis":[]}"#).unwrap();
    let bad = format!(
        "{}\n[[caches]]\nname = \"a\"\nprovider = \"cache-redis\"\n\n[[caches]]\nname = \"b\"\nprovider = \"cache-memory\"\nconfig = {{ shards = 0 }}\n\n\
         [[telemetry.sinks]]\nname = \"s\"\nprovider = \"access-log\"\nconfig = {{ colour = true }}\n\n[config]\ntype = \"file\"\npath = \"api.json\"\n",
        manifest("")
    );
    std::fs::write(&m, &bad).unwrap();
    let (ok, _, err) = run_cli(&["check", "--manifest", m.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains(
            "caches[0] 'a': unknown cache 'cache-redis' (loaded: cache-memory, cache-slow)"
        ),
        "{err}"
    );
    assert!(err.contains("caches[1] 'b': cache 'cache-memory' rejected its config: shards must be between 1 and 1024"), "{err}");
    assert!(
        err.contains(
            "telemetry.sinks[0] 's': sink 'access-log' rejected its config: unknown field `colour`"
        ),
        "{err}"
    );

    std::fs::write(
        &m,
        format!(
            "{}\n[config]\ntype = \"file\"\npath = \"api.json\"\n",
            manifest("")
        ),
    )
    .unwrap();
    let (ok, out, err) = run_cli(&["plugins", "--manifest", m.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("memory: cache-memory 0.1.0 (api level 2, kinds: cache) caches: cache-memory"),
        "{out}"
    );
    assert!(
        out.contains("access: sink-access-log 0.1.0 (api level 2, kinds: sink) sinks: access-log"),
        "{out}"
    );
    assert!(
        out.contains("(api level 2, kinds: policy, sink, cache, backup) policies: noop, panic")
            && out.contains("sinks: sink-slow; caches: cache-slow; stores: store-memory"),
        "{out}"
    );
}

#[test]
fn a_library_whose_init_fails_or_panics_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("outpost.toml");
    std::fs::write(dir.path().join("api.json"), r#"{"version":"v","apis":[]}"#).unwrap();
    std::fs::write(
        &m,
        format!(
            "{}\n[config]\ntype = \"file\"\npath = \"api.json\"\n",
            manifest("")
        ),
    )
    .unwrap();
    let lib = plugin_library("outpost_fixture_policies");
    for (mode, why) in [
        (
            "fail",
            "initialisation failed: told to fail by OUTPOST_FIXTURE_INIT",
        ),
        ("panic", "initialisation panicked"),
    ] {
        let (ok, _, err) = run_cli_env(
            &["check", "--manifest", m.to_str().unwrap()],
            &[("OUTPOST_FIXTURE_INIT", mode)],
        );
        assert!(!ok, "{mode}");
        let expected = format!("plugins[0] 'fixtures' ({}): {why}", lib.display());
        assert!(err.contains(&expected), "{mode}: {err}");
        // The other libraries loaded; the process reported and exited normally.
        assert!(
            !err.contains("plugins[1]") && !err.contains("plugins[2]"),
            "{err}"
        );
    }
}

#[tokio::test]
async fn host_work_misuse_and_reserved_names_fail_only_the_request() {
    let backend = Backend::start().await;
    let extra = "[[caches]]\nname = \"local\"\nprovider = \"cache-memory\"\n";
    let config = json!({
        "version": "m1",
        "backends": [{ "id": "b", "urls": [backend.url(false)] }],
        "apis": [
            { "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
              "operations": [
                op("stray", "GET", "/stray/echo",
                   json!([{ "policy": "stray-pause", "config": { "ask": true } },
                          { "policy": "stray-pause", "config": { "ask": false } }]), json!([])),
                op("reserved", "GET", "/reserved/echo",
                   json!([{ "policy": "metric-bump", "config": { "name": "outpost_plugin_panics_total" } }]), json!([])),
                op("panics", "GET", "/panics/echo", json!([{ "policy": "panic" }]), json!([])),
              ] },
            { "id": "keyed", "path": "/keyed", "backend": "b",
              "operations": [op("q", "GET", "/echo",
                  json!([{ "policy": "rewrite", "config": { "query": "subscription-key=k-123456&x=1" } }]), json!([]))] }
        ],
        "subscriptions": [{ "id": "s", "scope": { "type": "all" }, "primary_key": "k-123456" }]
    });
    let gw = Gateway::start(GatewaySpec {
        manifest: manifest(extra),
        api: config,
        files: Vec::new(),
        watch_ms: 100,
    });
    let c = client();
    // Work asked for by a step that did not pause is dropped: the next step's empty pause is
    // its own mistake, not a resume with someone else's answers.
    let r = c.get(gw.url("/svc/stray/echo")).send().await.unwrap();
    let body = assert_error(r, 500, "policy_failed").await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("paused without asking"),
        "{body}"
    );

    // A plugin cannot define a metric under the gateway's prefix: the definition is inert,
    // and the gateway's own metric keeps working when it is bumped.
    let r = c.get(gw.url("/svc/reserved/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    gw.wait_for_log("metric outpost_plugin_panics_total defined: false", 1);
    let r = c
        .get(gw.url("/svc/panics/echo"))
        .header("x-panic", "1")
        .send()
        .await
        .unwrap();
    assert_error(r, 500, "policy_failed").await;
    let r = c.get(gw.url("/svc/reserved/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);

    // A query a policy sets never carries the subscription key to the backend.
    let r = c
        .get(gw.url("/keyed/echo"))
        .header("Ocp-Apim-Subscription-Key", "k-123456")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["uri"], "/echo?x=1");
}

#[tokio::test]
async fn a_record_names_what_its_request_matched_as_far_as_it_got() {
    let backend = Backend::start().await;
    let log = AccessLog::new();
    let extra = format!(
        "[telemetry]\nflush_interval_ms = 50\nmetrics_interval_ms = 60000\n\n{}",
        log.sink(false)
    );
    let config = json!({
        "version": "m1",
        "backends": [{ "id": "b", "urls": [backend.url(false)] }],
        "apis": [{ "id": "keyed", "path": "/keyed", "backend": "b",
                   "operations": [op("q", "GET", "/echo", json!([]), json!([]))] }],
        "products": [{ "id": "p", "apis": ["keyed"] }],
        "subscriptions": [{ "id": "s", "scope": { "type": "product", "id": "p" },
                            "primary_key": "k-123456" }]
    });
    let gw = Gateway::start(GatewaySpec {
        manifest: manifest(&extra),
        api: config,
        files: Vec::new(),
        watch_ms: 100,
    });
    let c = client();
    let key = "Ocp-Apim-Subscription-Key";
    let r = c.get(gw.url("/keyed/echo")).header(key, "k-123456");
    assert_eq!(r.send().await.unwrap().status(), 200);
    let r = c.get(gw.url("/keyed/echo?wrong")).header(key, "k-000000");
    assert_eq!(r.send().await.unwrap().status(), 401);
    let r = c.get(gw.url("/keyed/nope")).header(key, "k-123456");
    assert_eq!(r.send().await.unwrap().status(), 404);
    assert_eq!(
        c.get(gw.url("/elsewhere")).send().await.unwrap().status(),
        404
    );

    let lines = wait_lines(&log, 4).await;
    let line = |path: &str, status: u16| {
        lines
            .iter()
            .find(|l| l["path"] == path && l["status"] == status)
            .unwrap_or_else(|| panic!("no line for {path} {status}: {lines:?}"))
    };
    let field = |l: &Value, k: &str| l.get(k).and_then(Value::as_str).map(str::to_owned);
    let some = |v: &str| Some(v.to_owned());
    // Served: the API, the operation, the subscription and its product.
    let ok = line("/keyed/echo", 200);
    assert_eq!(field(ok, "api"), some("keyed"));
    assert_eq!(field(ok, "operation"), some("q"));
    assert_eq!(field(ok, "subscription"), some("s"));
    assert_eq!(field(ok, "product"), some("p"));
    // Refused at the key: the API and the operation, no subscription.
    let refused = line("/keyed/echo", 401);
    assert_eq!(field(refused, "api"), some("keyed"));
    assert_eq!(field(refused, "operation"), some("q"));
    assert_eq!(field(refused, "subscription"), None);
    // No operation: the API only. No API: nothing matched.
    let no_op = line("/keyed/nope", 404);
    assert_eq!(field(no_op, "api"), some("keyed"));
    assert_eq!(field(no_op, "operation"), None);
    let no_api = line("/elsewhere", 404);
    assert_eq!(field(no_api, "api"), None);
}

#[tokio::test]
async fn gateway_gauges_reach_sinks_computed_at_each_snapshot() {
    let backend = Backend::start().await;
    let log = AccessLog::new();
    let extra = format!(
        "[telemetry]\nflush_interval_ms = 50\nmetrics_interval_ms = 100\n\n{}",
        log.sink(true)
    );
    let ops = json!([op("slow", "GET", "/slow/{ms}", json!([]), json!([]))]);
    let gw = Gateway::start(GatewaySpec {
        manifest: manifest(&extra),
        api: api(&backend.url(false), ops),
        files: Vec::new(),
        watch_ms: 100,
    });
    let c = client();
    // Two requests held by the backend: the in-flight gauge sees them.
    let url = gw.url("/svc/slow/1500");
    let held: Vec<_> = (0..2).map(|_| tokio::spawn(c.get(&url).send())).collect();
    let mut seen_in_flight = 0.0_f64;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(v) = lines(&log)
            .iter()
            .rev()
            .find(|l| l["metric"] == "outpost_requests_in_flight")
            .and_then(|l| l["value"].as_f64())
        {
            seen_in_flight = seen_in_flight.max(v);
            if v >= 2.0 {
                break;
            }
        }
    }
    assert_eq!(seen_in_flight, 2.0);
    for h in held {
        assert_eq!(h.await.unwrap().unwrap().status(), 200);
    }
    // Back to zero once answered; the configuration is described by its version and source.
    let mut last = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = lines(&log);
        let in_flight = last
            .iter()
            .rev()
            .find(|l| l["metric"] == "outpost_requests_in_flight")
            .and_then(|l| l["value"].as_f64());
        if in_flight == Some(0.0) {
            break;
        }
    }
    assert_eq!(
        metric(&last, "outpost_config_info", ("version", "w1")),
        Some(1.0),
        "{last:?}"
    );
    let info = last
        .iter()
        .rev()
        .find(|l| l["metric"] == "outpost_config_info")
        .unwrap();
    assert_eq!(info["labels"]["source"], "file");
    let age = last
        .iter()
        .rev()
        .find(|l| l["metric"] == "outpost_config_age_seconds")
        .and_then(|l| l["value"].as_f64())
        .expect("config age");
    assert!((0.0..600.0).contains(&age), "{age}");
}

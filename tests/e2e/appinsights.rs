//! The `appinsights` sink in a real gateway against the fake ingestion endpoint: every item
//! valid and correlated with the client's `traceparent`, partial success resending only the
//! retryable items, `Retry-After`, an outage with the spool (nothing lost up to its bound,
//! exactly the counted items lost past it), configuration refused by `outpost check`, and
//! sampling that keeps failures.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use outpost_tests::gateway::{plugin_library, run_cli, LISTENER_HTTP};
use outpost_tests::{closed_port, Backend, Gateway, GatewaySpec, Ingestion, Reply};
use serde_json::{json, Value};

use crate::client;

const WAIT: Duration = Duration::from_secs(30);

/// A gateway with the appinsights sink (and the access-log sink, for reading metrics, when
/// `access_log` is given).
fn gateway(
    backend: &Backend,
    sink_config: &str,
    telemetry: &str,
    access_log: Option<&Path>,
) -> Gateway {
    let mut manifest = format!(
        "[gateway]\nid = \"edge-e2e\"\n\n{LISTENER_HTTP}\n[[plugins]]\nname = \"appinsights\"\npath = \"{}\"\n\n[[plugins]]\nname = \"access\"\npath = \"{}\"\n\n\
         [telemetry]\nflush_interval_ms = 50\nshutdown_flush_ms = 5000\n{telemetry}\n\n\
         [[telemetry.sinks]]\nname = \"ai\"\nprovider = \"appinsights\"\nconfig = {{ {sink_config} }}\n",
        plugin_library("outpost_sink_appinsights").display(),
        plugin_library("outpost_sink_access_log").display(),
    );
    if let Some(log) = access_log {
        manifest.push_str(&format!(
            "\n[[telemetry.sinks]]\nname = \"access\"\nprovider = \"access-log\"\nconfig = {{ path = \"{}\", metrics = true }}\n",
            log.display()
        ));
    }
    Gateway::start(GatewaySpec {
        manifest,
        api: api(&backend.url(false)),
        files: Vec::new(),
        watch_ms: 100,
    })
}

/// `/shop/items/{id}` and `/shop/status/{code}` on the backend; `/down/*` on a closed port.
fn api(backend: &str) -> Value {
    json!({
        "version": "ai1",
        "backends": [
            { "id": "b", "urls": [backend] },
            { "id": "down", "urls": [format!("http://127.0.0.1:{}", closed_port())] },
        ],
        "apis": [
            { "id": "shop", "path": "/shop", "backend": "b", "subscription_required": false,
              "operations": [
                { "id": "get-item", "method": "GET", "url_template": "/items/{id}" },
                { "id": "status", "method": "GET", "url_template": "/status/{code}" },
              ] },
            { "id": "down", "path": "/down", "backend": "down", "subscription_required": false,
              "operations": [{ "id": "any", "method": "*", "url_template": "/*" }] },
        ],
    })
}

fn sink_config(fake: &Ingestion, extra: &str) -> String {
    let flush = if extra.contains("flush_interval_ms") {
        ""
    } else {
        ", flush_interval_ms = 50"
    };
    format!(
        "connection_string = \"{}\", retry_initial_ms = 100, retry_max_ms = 500{flush}{}{extra}",
        fake.connection_string(),
        if extra.is_empty() { "" } else { ", " }
    )
}

fn base(item: &Value) -> &Value {
    &item["data"]["baseData"]
}

fn stop(gw: &mut Gateway) {
    gw.signal("TERM");
    assert!(
        gw.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        gw.logs().join("\n")
    );
}

/// Sends GET requests and returns each answer's `x-request-id`.
async fn get(gw: &Gateway, path: &str, n: usize, status: u16) -> Vec<String> {
    let c = client();
    let mut ids = Vec::new();
    for _ in 0..n {
        let r = c.get(gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), status, "{path}");
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_owned());
    }
    ids
}

fn request_ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .filter(|i| i["data"]["baseType"] == "RequestData")
        .map(|i| {
            base(i)["properties"]["Request Id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

fn assert_all_valid(fake: &Ingestion) {
    assert!(
        fake.invalid().is_empty(),
        "invalid items: {:?}",
        fake.invalid()
    );
    assert!(
        fake.protocol_errors().is_empty(),
        "{:?}",
        fake.protocol_errors()
    );
    for r in fake.requests() {
        assert!(r.gzip, "gzip bodies");
        assert_eq!(r.path, "/v2.1/track");
        assert_eq!(r.content_type, "application/x-json-stream");
    }
}

/// Items in the spool directory, from the file names (`<ms>-<seq>-<items>.ndjson.gz`).
fn spooled_items(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".ndjson.gz")?
                    .rsplit('-')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .sum()
        })
        .unwrap_or(0)
}

/// The latest value of a metric series in the access log's metric lines.
fn logged_metric(log: &Path, name: &str, label: Option<(&str, &str)>) -> Option<f64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["metric"] == name && label.is_none_or(|(k, v)| l["labels"][k] == v))
        .and_then(|l| l["value"].as_f64())
}

fn wait_for(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn every_item_is_valid_and_correlated_with_the_clients_trace() {
    let fake = Ingestion::start();
    let backend = Backend::start().await;
    let mut gw = gateway(
        &backend,
        &sink_config(&fake, "region = \"West Europe\""),
        "metrics_interval_ms = 60000",
        None,
    );
    let c = client();
    let mut sent = Vec::new();
    for i in 0..5u32 {
        let trace = format!("{:032x}", 0xabc0_0000u64 + u64::from(i));
        let parent = format!("{:016x}", 0x1000 + i);
        let r = c
            .get(gw.url("/shop/items/echo"))
            .header("traceparent", format!("00-{trace}-{parent}-01"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let to_backend = v["headers"]["traceparent"][0].as_str().unwrap().to_owned();
        let span = to_backend.split('-').nth(2).unwrap().to_owned();
        sent.push((trace, parent, span));
    }
    get(&gw, "/down/x", 2, 502).await;
    // Delivered while running (so the sink's own counter is above zero at the last snapshot).
    fake.wait_until(WAIT, |a| {
        a.iter()
            .filter(|i| i["data"]["baseType"] == "RequestData")
            .count()
            == 7
    });
    stop(&mut gw);

    assert_all_valid(&fake);
    let requests = fake.accepted_of("RequestData");
    let deps = fake.accepted_of("RemoteDependencyData");
    let exceptions = fake.accepted_of("ExceptionData");
    assert_eq!(requests.len(), 7, "{requests:?}");
    assert_eq!(deps.len(), 7, "five answered calls, two failed ones");
    assert_eq!(exceptions.len(), 2, "one per 502");

    for (trace, parent, span) in &sent {
        let req = requests
            .iter()
            .find(|r| r["tags"]["ai.operation.id"] == trace.as_str())
            .unwrap_or_else(|| panic!("no request for trace {trace}"));
        assert_eq!(req["tags"]["ai.operation.parentId"], parent.as_str());
        assert_eq!(base(req)["id"], span.as_str(), "the span the backend saw");
        assert_eq!(base(req)["name"], "GET /items/{id}");
        assert_eq!(base(req)["responseCode"], "200");
        assert_eq!(base(req)["success"], true);
        assert_eq!(req["tags"]["ai.cloud.role"], "edge-e2e");
        assert!(req["tags"]["ai.cloud.roleInstance"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
        let p = &base(req)["properties"];
        assert_eq!(p["API Name"], "shop");
        assert_eq!(p["Operation Name"], "get-item");
        assert_eq!(p["Region"], "West Europe");
        assert_eq!(p["Cache"], "None");
        let dep = deps
            .iter()
            .find(|d| d["tags"]["ai.operation.id"] == trace.as_str())
            .expect("its dependency");
        assert_eq!(dep["tags"]["ai.operation.parentId"], span.as_str());
        assert_eq!(base(dep)["type"], "HTTP");
        assert_eq!(base(dep)["resultCode"], "200");
        assert_eq!(base(dep)["target"], backend.addr.to_string());
    }
    for e in &exceptions {
        let op = &e["tags"]["ai.operation.id"];
        let req = requests
            .iter()
            .find(|r| &r["tags"]["ai.operation.id"] == op)
            .expect("the failed request");
        assert_eq!(base(req)["responseCode"], "502");
        assert_eq!(base(req)["success"], false);
        assert_eq!(e["tags"]["ai.operation.parentId"], base(req)["id"]);
        let dep = deps
            .iter()
            .find(|d| &d["tags"]["ai.operation.id"] == op)
            .expect("the failed call");
        assert_eq!(base(dep)["success"], false);
    }
    // The last metric snapshot: the gateway's metrics and the sink's own.
    let metrics = fake.accepted_of("MetricData");
    let metric = |name: &str| {
        metrics
            .iter()
            .rev()
            .find(|m| base(m)["metrics"][0]["name"] == name)
            .map(|m| base(m)["metrics"][0]["value"].as_f64().unwrap())
    };
    assert_eq!(
        metric("outpost_config_from_backup"),
        Some(0.0),
        "{metrics:?}"
    );
    assert!(metric("appinsights_items_sent_total").is_some_and(|v| v > 0.0));
}

#[tokio::test]
async fn partial_success_resends_only_the_retryable_items() {
    let fake = Ingestion::start();
    fake.script([Reply::Partial(vec![(0, 500), (1, 400), (2, 429)])]);
    let backend = Backend::start().await;
    let mut gw = gateway(
        &backend,
        &sink_config(
            &fake,
            "max_batch_items = 4, flush_interval_ms = 60000, dependencies = false, metrics = false",
        ),
        "metrics_interval_ms = 60000",
        None,
    );
    let ids = get(&gw, "/shop/items/echo", 4, 200).await;
    let requests = fake.wait_requests(2, WAIT);
    assert_eq!(requests[0].items.len(), 4);
    assert_eq!(requests[0].status, 206);
    assert_eq!(
        requests[1].items,
        [requests[0].items[0].clone(), requests[0].items[2].clone()],
        "exactly the 500 and the 429 again, in order"
    );
    stop(&mut gw);
    assert_eq!(fake.requests().len(), 2, "nothing more was sent");
    let accepted = request_ids(&fake.accepted());
    let want: HashSet<&String> = [&ids[0], &ids[2], &ids[3]].into_iter().collect();
    assert_eq!(accepted.len(), 3, "no duplicates: {accepted:?}");
    assert_eq!(
        accepted.iter().collect::<HashSet<_>>(),
        want,
        "the 400 was dropped"
    );
    assert_all_valid(&fake);
}

#[tokio::test]
async fn throttling_is_honoured_with_retry_after() {
    let fake = Ingestion::start();
    fake.script([Reply::retry_after(429, "2")]);
    let backend = Backend::start().await;
    let mut gw = gateway(
        &backend,
        &sink_config(
            &fake,
            "max_batch_items = 2, flush_interval_ms = 60000, dependencies = false, metrics = false",
        ),
        "metrics_interval_ms = 60000",
        None,
    );
    get(&gw, "/shop/items/echo", 2, 200).await;
    let r = fake.wait_requests(2, WAIT);
    assert_eq!(r[0].status, 429);
    let gap = r[1].at - r[0].at;
    assert!(gap >= Duration::from_secs(2), "resent after {gap:?}");
    assert_eq!(r[1].items, r[0].items);
    stop(&mut gw);
    assert_eq!(fake.accepted().len(), 2);
    assert_all_valid(&fake);
}

#[tokio::test]
async fn an_outage_loses_nothing_up_to_the_spool_bound() {
    let fake = Ingestion::start();
    let spool = tempfile::tempdir().unwrap();
    let backend = Backend::start().await;
    let mut gw = gateway(
        &backend,
        &sink_config(
            &fake,
            &format!(
                "max_batch_items = 5, dependencies = false, metrics = false, spool_dir = \"{}\"",
                spool.path().display()
            ),
        ),
        "metrics_interval_ms = 60000",
        None,
    );
    let mut ids = get(&gw, "/shop/items/echo", 5, 200).await;
    fake.wait_until(WAIT, |a| a.len() == 5);

    fake.stop();
    ids.extend(get(&gw, "/shop/items/echo", 20, 200).await);
    wait_for("twenty items spooled", || spooled_items(spool.path()) == 20);

    fake.restart();
    ids.extend(get(&gw, "/shop/items/echo", 5, 200).await);
    let accepted = fake.wait_until(WAIT, |a| a.len() >= 30);
    wait_for("the spool emptied", || spooled_items(spool.path()) == 0);
    stop(&mut gw);
    assert_eq!(
        request_ids(&fake.accepted()),
        ids,
        "every item once, in order"
    );
    assert_eq!(accepted.len(), 30);
    assert_all_valid(&fake);
}

#[tokio::test]
async fn what_is_unsent_at_shutdown_is_spooled_and_sent_after_the_next_start() {
    let fake = Ingestion::start();
    let spool = tempfile::tempdir().unwrap();
    let backend = Backend::start().await;
    let config = sink_config(
        &fake,
        &format!(
            "flush_interval_ms = 60000, dependencies = false, metrics = false, spool_dir = \"{}\"",
            spool.path().display()
        ),
    );
    fake.stop();
    let mut gw = gateway(&backend, &config, "metrics_interval_ms = 60000", None);
    let mut ids = get(&gw, "/shop/items/echo", 3, 200).await;
    stop(&mut gw);
    assert_eq!(
        spooled_items(spool.path()),
        3,
        "flushed to the spool at shutdown"
    );

    fake.restart();
    let mut gw = gateway(&backend, &config, "metrics_interval_ms = 60000", None);
    ids.extend(get(&gw, "/shop/items/echo", 1, 200).await);
    // The first export starts the sink, which replays the spool before anything new.
    fake.wait_until(WAIT, |a| a.len() == 3);
    stop(&mut gw);
    assert_eq!(
        request_ids(&fake.accepted()),
        ids,
        "the spooled items first, then the new one"
    );
    assert_eq!(spooled_items(spool.path()), 0);
    assert_all_valid(&fake);
}

#[tokio::test]
async fn past_the_spool_bound_exactly_the_counted_items_are_missing() {
    let fake = Ingestion::start();
    let spool = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.jsonl");
    let backend = Backend::start().await;
    let mut gw = gateway(
        &backend,
        &sink_config(
            &fake,
            &format!(
                "max_batch_items = 3, dependencies = false, metrics = false, spool_dir = \"{}\", spool_max_bytes = 2000",
                spool.path().display()
            ),
        ),
        "metrics_interval_ms = 100",
        Some(&log),
    );
    fake.stop();
    let ids = get(&gw, "/shop/items/echo", 30, 200).await;
    let dropped = || {
        logged_metric(
            &log,
            "appinsights_items_dropped_total",
            Some(("reason", "spool_full")),
        )
        .unwrap_or(0.0) as usize
    };
    wait_for("every item spooled or counted", || {
        dropped() + spooled_items(spool.path()) == 30
    });
    let lost = dropped();
    assert!(
        lost > 0 && lost < 30,
        "the bound held some and dropped some: {lost}"
    );

    fake.restart();
    fake.wait_until(WAIT, |a| a.len() + lost == 30);
    wait_for("the spool emptied", || spooled_items(spool.path()) == 0);
    stop(&mut gw);
    let accepted = request_ids(&fake.accepted());
    assert_eq!(
        accepted,
        ids[lost..],
        "the oldest {lost} were dropped, the rest arrived once"
    );
    assert_eq!(dropped(), lost, "the metric counts exactly what is missing");
    assert_all_valid(&fake);
}

#[test]
fn a_malformed_connection_string_is_refused_by_check() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.json"), r#"{"version":"v","apis":[]}"#).unwrap();
    let m = dir.path().join("outpost.toml");
    std::fs::write(
        &m,
        format!(
            "{LISTENER_HTTP}\n[[plugins]]\nname = \"appinsights\"\npath = \"{}\"\n\n\
             [[telemetry.sinks]]\nname = \"bad-key\"\nprovider = \"appinsights\"\nconfig = {{ connection_string = \"InstrumentationKey=not-a-guid;IngestionEndpoint=http://127.0.0.1:1/\" }}\n\n\
             [[telemetry.sinks]]\nname = \"bad-endpoint\"\nprovider = \"appinsights\"\nconfig = {{ connection_string = \"InstrumentationKey=11111111-2222-3333-4444-555555555555;IngestionEndpoint=ftp://h\", sampling_percentage = 150 }}\n\n\
             [[telemetry.sinks]]\nname = \"good\"\nprovider = \"appinsights\"\nconfig = {{ connection_string = \"instrumentationkey=11111111-2222-3333-4444-555555555555;\" }}\n\n\
             [config]\ntype = \"file\"\npath = \"api.json\"\n",
            plugin_library("outpost_sink_appinsights").display()
        ),
    )
    .unwrap();
    let (ok, _, err) = run_cli(&["check", "--manifest", m.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("telemetry.sinks[0] 'bad-key': sink 'appinsights' rejected its config: connection_string: InstrumentationKey is not a GUID"),
        "{err}"
    );
    assert!(
        err.contains("telemetry.sinks[1] 'bad-endpoint': sink 'appinsights' rejected its config: connection_string: IngestionEndpoint 'ftp://h' must start with http:// or https://; sampling_percentage must be between 0 and 100"),
        "{err}"
    );
    assert!(
        !err.contains("telemetry.sinks[2]"),
        "the good one passes: {err}"
    );
}

#[tokio::test]
async fn sampling_at_zero_still_sends_every_failure() {
    let fake = Ingestion::start();
    let backend = Backend::start().await;
    let mut gw = gateway(
        &backend,
        &sink_config(&fake, "sampling_percentage = 0, metrics = false"),
        "metrics_interval_ms = 60000",
        None,
    );
    get(&gw, "/shop/items/echo", 5, 200).await;
    let failed: HashSet<String> = get(&gw, "/down/x", 2, 502)
        .await
        .into_iter()
        .chain(get(&gw, "/shop/status/500", 1, 500).await)
        .collect();
    stop(&mut gw);
    let requests = fake.accepted_of("RequestData");
    let got: HashSet<String> = request_ids(&requests).into_iter().collect();
    assert_eq!(got, failed, "only the failures, all of them");
    assert!(requests.iter().all(|r| r["sampleRate"] == 100.0));
    assert_eq!(
        fake.accepted_of("ExceptionData").len(),
        2,
        "the two gateway-side failures"
    );
    assert!(
        fake.accepted_of("RemoteDependencyData")
            .iter()
            .all(|d| base(d)["success"] == false),
        "no dependency of a sampled-out request"
    );
    assert_all_valid(&fake);
}

#[tokio::test]
async fn emit_metric_reaches_both_sinks() {
    let fake = Ingestion::start();
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let addr_file = dir.path().join("metrics.addr");
    let manifest = format!(
        "[gateway]\nid = \"edge-e2e\"\n\n{LISTENER_HTTP}\n\
         [[plugins]]\nname = \"appinsights\"\npath = \"{}\"\n\n\
         [[plugins]]\nname = \"prometheus\"\npath = \"{}\"\n\n\
         [[plugins]]\nname = \"telemetry\"\npath = \"{}\"\n\n\
         [telemetry]\nflush_interval_ms = 50\nmetrics_interval_ms = 100\nshutdown_flush_ms = 5000\n\n\
         [[telemetry.sinks]]\nname = \"ai\"\nprovider = \"appinsights\"\nconfig = {{ {} }}\n\n\
         [[telemetry.sinks]]\nname = \"prom\"\nprovider = \"prometheus\"\nconfig = {{ listen = \"127.0.0.1:0\", address_file = \"{}\" }}\n",
        plugin_library("outpost_sink_appinsights").display(),
        plugin_library("outpost_sink_prometheus").display(),
        plugin_library("outpost_policy_telemetry").display(),
        sink_config(&fake, "dependencies = false"),
        addr_file.display(),
    );
    let mut api = api(&backend.url(false));
    api["apis"][0]["operations"][0]["policies"] = json!({ "inbound": [{
        "policy": "emit-metric",
        "config": { "name": "orders_seen", "dimensions": [{ "name": "tenant", "value": "{header.x-tenant}" }] }
    }] });
    let mut gw = Gateway::start(GatewaySpec {
        manifest,
        api,
        files: Vec::new(),
        watch_ms: 100,
    });
    let c = client();
    for tenant in ["acme", "acme", "acme", "globex"] {
        let r = c
            .get(gw.url("/shop/items/echo"))
            .header("x-tenant", tenant)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    // Prometheus: the counter with its dimension.
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let addr = std::fs::read_to_string(&addr_file).unwrap_or_default();
        if !addr.trim().is_empty() {
            let t = c
                .get(format!("http://{}/metrics", addr.trim()))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            if t.contains("orders_seen_total{tenant=\"globex\"} 1") {
                break t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no emit-metric series in /metrics"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        text.contains("orders_seen_total{tenant=\"acme\"} 3"),
        "{text}"
    );

    // Application Insights: the same counter as MetricData, with the dimension.
    stop(&mut gw);
    assert_all_valid(&fake);
    let metrics = fake.accepted_of("MetricData");
    let total = |tenant: &str| -> f64 {
        metrics
            .iter()
            .filter(|m| {
                base(m)["metrics"][0]["name"] == "orders_seen_total"
                    && base(m)["properties"]["tenant"] == tenant
            })
            .map(|m| base(m)["metrics"][0]["value"].as_f64().unwrap())
            .sum()
    };
    assert_eq!(total("acme"), 3.0, "{metrics:?}");
    assert_eq!(total("globex"), 1.0, "{metrics:?}");
}

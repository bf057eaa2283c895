//! The `prometheus` sink and the `emit-metric` policy in a real gateway: a known mix of traffic,
//! then `/metrics` scraped and parsed by a real parser (the Prometheus Python client's, from
//! Debian's `python3-prometheus-client`) and its numbers checked against the traffic sent.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use outpost_tests::gateway::{plugin_library, run_cli, LISTENER_HTTP};
use outpost_tests::{closed_port, Backend, Gateway, GatewaySpec};
use serde_json::{json, Value};

use crate::client;

/// The content type of the text format 0.0.4, exactly.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The plugins, fast telemetry (records every 50 ms, snapshots every 100 ms) and these sinks.
fn manifest(sinks: &str) -> String {
    format!(
        "{LISTENER_HTTP}\n[[plugins]]\nname = \"prometheus\"\npath = \"{}\"\n\n\
         [[plugins]]\nname = \"telemetry\"\npath = \"{}\"\n\n\
         [telemetry]\nflush_interval_ms = 50\nmetrics_interval_ms = 100\n\n{sinks}\n",
        plugin_library("outpost_sink_prometheus").display(),
        plugin_library("outpost_policy_telemetry").display(),
    )
}

fn sink(name: &str, config: &str) -> String {
    format!(
        "[[telemetry.sinks]]\nname = \"{name}\"\nprovider = \"prometheus\"\nconfig = {config}\n\n"
    )
}

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

/// Waits for a sink to write the address it bound.
fn bound_address(file: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(a) = std::fs::read_to_string(file) {
            return a.trim().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Python 3 that has the Prometheus client (`OUTPOST_PYTHON`, `python3`, or Debian's own
/// `/usr/bin/python3` when `python3` is another installation).
fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let candidates = std::env::var("OUTPOST_PYTHON")
            .into_iter()
            .chain(["python3".to_owned(), "/usr/bin/python3".to_owned()]);
        for p in candidates {
            let ok = Command::new(&p)
                .args(["-c", "import prometheus_client.parser"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return p;
            }
        }
        panic!(
            "no python3 with the Prometheus client's parser: apt-get install -y python3-prometheus-client"
        )
    })
}

/// Parses an exposition with `prometheus_client.parser` (any parse error fails the test) and
/// checks what the parser does not: one group per family, a TYPE for each, histogram buckets in
/// increasing `le` order, cumulative, ending with `+Inf` equal to `_count`, and the final
/// newline. Answers the families as JSON: `[{name, type, samples: [{name, labels, value}]}]`.
const CHECK: &str = r#"
import json, math, sys
from prometheus_client.parser import text_string_to_metric_families

text = sys.stdin.read()
problems = []
if text and not text.endswith("\n"):
    problems.append("the exposition does not end with a newline")
families = list(text_string_to_metric_families(text))
names = [f.name for f in families]
for n in sorted(set(names)):
    if names.count(n) > 1:
        problems.append("family %s appears %d times" % (n, names.count(n)))
out = []
for f in families:
    if f.type not in ("counter", "gauge", "histogram"):
        problems.append("%s has type %s" % (f.name, f.type))
    if f.type == "histogram":
        series = {}
        for s in f.samples:
            key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            h = series.setdefault(key, {"le": [], "counts": [], "count": None, "sum": None})
            if s.name.endswith("_bucket"):
                h["le"].append(float(s.labels["le"]))
                h["counts"].append(s.value)
            elif s.name.endswith("_count"):
                h["count"] = s.value
            elif s.name.endswith("_sum"):
                h["sum"] = s.value
        for key, h in series.items():
            where = "%s%s" % (f.name, dict(key))
            if h["le"] != sorted(set(h["le"])):
                problems.append("%s: buckets not in increasing order: %s" % (where, h["le"]))
            if any(b < a for a, b in zip(h["counts"], h["counts"][1:])):
                problems.append("%s: buckets not cumulative: %s" % (where, h["counts"]))
            if not h["le"] or h["le"][-1] != math.inf:
                problems.append("%s: no +Inf bucket" % where)
            elif h["counts"][-1] != h["count"]:
                problems.append("%s: +Inf %s != _count %s" % (where, h["counts"][-1], h["count"]))
            if h["sum"] is None:
                problems.append("%s: no _sum" % where)
    out.append({"name": f.name, "type": f.type,
                "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]})
if problems:
    sys.exit("\n".join(problems))
print(json.dumps(out))
"#;

/// One scrape, parsed and checked.
struct Scrape {
    text: String,
    families: Vec<Value>,
}

impl Scrape {
    fn parse(text: String) -> Scrape {
        let mut child = Command::new(python())
            .args(["-c", CHECK])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run python3");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write the exposition");
        let out = child.wait_with_output().expect("python3 finishes");
        assert!(
            out.status.success(),
            "the exposition does not parse or check:\n{}\n---\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        let families: Vec<Value> = serde_json::from_slice(&out.stdout).expect("the script's JSON");
        Scrape { text, families }
    }

    /// A family by the parser's name (counters lose their `_total`).
    fn family(&self, name: &str) -> Option<&Value> {
        self.families.iter().find(|f| f["name"] == name)
    }

    /// Every sample of this exposition name: (labels, value).
    fn series(&self, sample: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.families
            .iter()
            .flat_map(|f| f["samples"].as_array().expect("samples"))
            .filter(|s| s["name"] == sample)
            .map(|s| {
                let labels = s["labels"]
                    .as_object()
                    .expect("labels")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().expect("text").to_owned()))
                    .collect();
                (labels, s["value"].as_f64().expect("a number"))
            })
            .collect()
    }

    /// The value of the sample with exactly these labels.
    fn value(&self, sample: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.series(sample)
            .into_iter()
            .find(|(l, _)| *l == want)
            .map(|(_, v)| v)
    }

    fn total(&self, sample: &str) -> f64 {
        self.series(sample).iter().map(|(_, v)| v).sum()
    }
}

/// The sum of a metric's sample lines, read without a parser (for waiting only).
fn quick_total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn scrape_text(url: &str) -> String {
    let r = client().get(url).send().await.expect("scrape");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], CONTENT_TYPE);
    r.text().await.expect("body")
}

/// Scrapes until `ready` holds for the text, then parses it.
async fn scrape_when(url: &str, ready: impl Fn(&str) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape_text(url).await;
        if ready(&text) {
            return Scrape::parse(text);
        }
        assert!(
            Instant::now() < deadline,
            "the metrics never reached the expected state:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn api(backend: &str) -> Value {
    json!({
        "version": "prom-1",
        "backends": [
            { "id": "b", "urls": [backend] },
            { "id": "dead", "urls": [format!("http://127.0.0.1:{}", closed_port())] }
        ],
        "apis": [
            { "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
              "operations": [
                { "id": "get-item", "method": "GET", "url_template": "/items/{id}/echo",
                  "policies": { "inbound": [{ "policy": "emit-metric", "config": {
                      "name": "orders_seen",
                      "dimensions": [
                          { "name": "API ID" },
                          { "name": "Operation ID" },
                          { "name": "tenant", "value": "{header.x-tenant}" }
                      ] } }] } },
                { "id": "status", "method": "GET", "url_template": "/status/{code}" },
                { "id": "catch", "method": "GET", "url_template": "/catch/*" }
              ] },
            { "id": "down", "path": "/down", "backend": "dead", "subscription_required": false,
              "operations": [{ "id": "any", "method": "*", "url_template": "/*" }] }
        ]
    })
}

#[tokio::test]
async fn metrics_match_the_traffic_and_parse_with_a_real_parser() {
    let backend = Backend::start().await;
    let files = tempfile::tempdir().unwrap();
    let main_file = files.path().join("main.addr");
    let tight_file = files.path().join("tight.addr");
    let sinks = format!(
        "{}{}",
        sink(
            "prom",
            &format!(
                "{{ listen = \"127.0.0.1:0\", address_file = \"{}\" }}",
                main_file.display()
            )
        ),
        // The same sink on a thread of its own: the numbers must not depend on it.
        sink(
            "tight",
            &format!(
                "{{ listen = \"127.0.0.1:0\", address_file = \"{}\", path = \"/m\", max_series = 2 }}",
                tight_file.display()
            )
        )
        .replace("provider = ", "own_thread = true\nprovider = "),
    );
    let gw = Gateway::start(GatewaySpec {
        manifest: manifest(&sinks),
        api: api(&backend.url(false)),
        files: Vec::new(),
        watch_ms: 0,
    });
    let main = format!("http://{}/metrics", bound_address(&main_file));
    let tight = format!("http://{}/m", bound_address(&tight_file));
    // "prom" is called from the telemetry thread (its library says its sinks never block);
    // "tight" asked for a thread of its own (thread names are cut at 15 bytes).
    let threads = thread_names(gw.pid());
    assert!(
        threads.iter().any(|t| t == "outpost-telemet"),
        "{threads:?}"
    );
    assert!(
        threads.iter().any(|t| t == "outpost-sink-ti"),
        "{threads:?}"
    );
    assert!(
        !threads.iter().any(|t| t.starts_with("outpost-sink-pr")),
        "{threads:?}"
    );
    // The bound address is logged too.
    gw.wait_for_log(
        &format!("Prometheus sink serving {main} (text format 0.0.4)."),
        1,
    );

    // The traffic: 7 × 200 on get-item (5 for tenant acme, 2 for globex), 3 × 404 from the
    // backend, 2 × 404 for an unknown API, 1 × 502 from a backend that is down (a POST of
    // 1 234 bytes), and 30 × 200
    // on one catch-all operation through 30 distinct raw paths.
    let c = client();
    for i in 1..=7 {
        let tenant = if i <= 5 { "acme" } else { "globex" };
        let r = c
            .get(gw.url(&format!("/svc/items/{i}/echo")))
            .header("x-tenant", tenant)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for _ in 0..3 {
        let r = c.get(gw.url("/svc/status/404")).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
    for i in 0..2 {
        let r = c.get(gw.url(&format!("/nope/{i}"))).send().await.unwrap();
        assert_eq!(r.status(), 404);
    }
    let r = c
        .post(gw.url("/down/x"))
        .body(vec![b'x'; 1234])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    for i in 0..30 {
        let r = c
            .get(gw.url(&format!("/svc/catch/r{i}-{}/echo?q={i}", i * 7919)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let sent = 7.0 + 3.0 + 2.0 + 1.0 + 30.0;

    let s = scrape_when(&main, |t| {
        quick_total(t, "outpost_http_requests_total") >= sent
            && quick_total(t, "orders_seen_total") >= 7.0
    })
    .await;

    // Requests by API, operation, method and status.
    let requests_by = |api: &str, op: &str, method: &str, status: &str| {
        s.value(
            "outpost_http_requests_total",
            &[
                ("api", api),
                ("operation", op),
                ("method", method),
                ("status", status),
            ],
        )
    };
    let requests = |api: &str, op: &str, status: &str| requests_by(api, op, "GET", status);
    assert_eq!(requests("svc", "get-item", "200"), Some(7.0), "{}", s.text);
    assert_eq!(requests("svc", "status", "404"), Some(3.0));
    assert_eq!(
        requests("(none)", "(none)", "404"),
        Some(2.0),
        "no API: (none)"
    );
    assert_eq!(requests_by("down", "any", "POST", "502"), Some(1.0));
    assert_eq!(requests("svc", "catch", "200"), Some(30.0));
    assert_eq!(s.total("outpost_http_requests_total"), sent);
    assert_eq!(
        s.family("outpost_http_requests").map(|f| &f["type"]),
        Some(&json!("counter"))
    );

    // Thirty raw paths, one label set; no raw path anywhere.
    let catch: Vec<_> = s
        .series("outpost_http_requests_total")
        .into_iter()
        .filter(|(l, _)| l["operation"] == "catch")
        .collect();
    assert_eq!(catch.len(), 1, "{catch:?}");
    for f in &s.families {
        for sample in f["samples"].as_array().unwrap() {
            for v in sample["labels"].as_object().unwrap().values() {
                let v = v.as_str().unwrap();
                assert!(
                    !v.contains("/catch/") && !v.contains("/items/") && !v.contains("/nope"),
                    "a raw path became a label: {sample}"
                );
            }
        }
    }

    // Histograms: one observation per request; backend time only where the backend answered.
    let op = |api: &'static str, op: &'static str| [("api", api), ("operation", op)];
    let d = "outpost_http_request_duration_seconds";
    assert_eq!(
        s.value(&format!("{d}_count"), &op("svc", "get-item")),
        Some(7.0)
    );
    assert_eq!(
        s.value(&format!("{d}_count"), &op("svc", "catch")),
        Some(30.0)
    );
    assert_eq!(
        s.value(&format!("{d}_count"), &op("(none)", "(none)")),
        Some(2.0)
    );
    assert!(
        s.value(&format!("{d}_sum"), &op("svc", "get-item"))
            .unwrap()
            > 0.0
    );
    assert_eq!(s.total(&format!("{d}_count")), sent);
    let b = "outpost_http_backend_duration_seconds";
    assert_eq!(
        s.value(&format!("{b}_count"), &op("svc", "get-item")),
        Some(7.0)
    );
    assert_eq!(
        s.value(&format!("{b}_count"), &op("svc", "status")),
        Some(3.0)
    );
    assert_eq!(
        s.value(&format!("{b}_count"), &op("down", "any")),
        None,
        "the backend never answered"
    );
    assert_eq!(
        s.value(&format!("{b}_count"), &op("(none)", "(none)")),
        None
    );
    let g = "outpost_http_gateway_duration_seconds";
    assert_eq!(
        s.value(&format!("{g}_count"), &op("down", "any")),
        Some(1.0)
    );
    assert_eq!(s.total(&format!("{g}_count")), sent);
    for h in [d, b, g] {
        assert_eq!(
            s.family(h).map(|f| &f["type"]),
            Some(&json!("histogram")),
            "{h}"
        );
    }
    assert!(
        s.value("outpost_http_response_bytes_total", &op("svc", "get-item"))
            .unwrap()
            > 0.0,
        "echo answers have a length"
    );
    assert_eq!(
        s.value("outpost_http_request_bytes_total", &op("svc", "get-item")),
        Some(0.0)
    );
    assert_eq!(
        s.value("outpost_http_request_bytes_total", &op("down", "any")),
        Some(1234.0),
        "the declared length of a request, even one the backend never saw"
    );

    // Upstream errors by kind: the one request to the closed port.
    assert_eq!(
        s.value(
            "outpost_upstream_errors_total",
            &[("api", "down"), ("kind", "backend_unreachable")]
        ),
        Some(1.0)
    );
    assert_eq!(s.total("outpost_upstream_errors_total"), 1.0);

    // emit-metric's counter, through the gateway's snapshot: one per request through the
    // operation, by dimension.
    let seen = |tenant: &str| {
        s.value(
            "orders_seen_total",
            &[
                ("api_id", "svc"),
                ("operation_id", "get-item"),
                ("tenant", tenant),
            ],
        )
    };
    assert_eq!(seen("acme"), Some(5.0), "{}", s.text);
    assert_eq!(seen("globex"), Some(2.0));
    assert_eq!(s.total("orders_seen_total"), 7.0);
    assert_eq!(
        s.family("orders_seen").map(|f| &f["type"]),
        Some(&json!("counter"))
    );

    // The gateway's own metrics, as they come.
    assert_eq!(
        s.family("outpost_config_sync_errors").map(|f| &f["type"]),
        Some(&json!("counter"))
    );
    assert_eq!(s.value("outpost_config_from_backup", &[]), Some(0.0));
    assert_eq!(
        s.family("outpost_requests_in_flight").map(|f| &f["type"]),
        Some(&json!("gauge"))
    );
    let info = s.series("outpost_config_info");
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(info[0].0["version"], "prom-1");
    assert_eq!(info[0].0["source"], "file");
    assert_eq!(info[0].1, 1.0);
    let age = s
        .value("outpost_config_age_seconds", &[])
        .expect("config age");
    assert!((0.0..60.0).contains(&age), "{age}");

    // The second sink keeps two label sets per metric and folds the rest into (other),
    // counting what it folded; nothing is lost. Records arrive in the order sent.
    let t = scrape_when(&tight, |t| {
        quick_total(t, "outpost_http_requests_total") >= sent
    })
    .await;
    let tight_requests = t.series("outpost_http_requests_total");
    assert_eq!(tight_requests.len(), 5, "{tight_requests:?}");
    let folded = |method: &str, status: &str| {
        t.value(
            "outpost_http_requests_total",
            &[
                ("api", "(other)"),
                ("operation", "(other)"),
                ("method", method),
                ("status", status),
            ],
        )
    };
    assert_eq!(folded("GET", "404"), Some(2.0));
    assert_eq!(folded("POST", "502"), Some(1.0));
    assert_eq!(folded("GET", "200"), Some(30.0));
    assert_eq!(t.total("outpost_http_requests_total"), sent);
    assert_eq!(
        t.value(
            "outpost_prometheus_folded_total",
            &[("metric", "outpost_http_requests_total")]
        ),
        Some(33.0)
    );
    assert_eq!(t.series(&format!("{d}_count")).len(), 3);

    // The endpoint: HEAD answers the head only; other paths 404; other methods 405.
    let r = c.head(&main).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], CONTENT_TYPE);
    let length: usize = r.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(length > 0);
    assert!(r.bytes().await.unwrap().is_empty());
    let other = main.replace("/metrics", "/other");
    assert_eq!(c.get(&other).send().await.unwrap().status(), 404);
    assert_eq!(
        c.get(tight.replace("/m", "/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let r = c.post(&main).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD");

    // Counters never go down between scrapes.
    let again = Scrape::parse(scrape_text(&main).await);
    for (labels, v) in s.series("outpost_http_requests_total") {
        let pairs: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert!(
            again
                .value("outpost_http_requests_total", &pairs)
                .unwrap_or(0.0)
                >= v,
            "{labels:?} went down"
        );
    }
}

fn write_check(dir: &Path, sink_config: &str, api: &Value) -> PathBuf {
    let m = dir.join("outpost.toml");
    std::fs::write(
        &m,
        format!(
            "{}\n[config]\ntype = \"file\"\npath = \"api.json\"\n",
            manifest(&sink("prom", sink_config))
        ),
    )
    .unwrap();
    std::fs::write(dir.join("api.json"), api.to_string()).unwrap();
    m
}

fn emit_api(steps: Value) -> Value {
    json!({
        "version": "check",
        "backends": [{ "id": "b", "urls": ["http://127.0.0.1:9"] }],
        "apis": [{ "id": "svc", "path": "/svc", "backend": "b", "subscription_required": false,
                   "operations": [{ "id": "op", "method": "GET", "url_template": "/x",
                                    "policies": { "inbound": steps } }] }],
    })
}

#[test]
fn check_reports_a_bad_listen_address_and_bad_emit_metric_configs() {
    let dir = tempfile::tempdir().unwrap();
    let good = emit_api(json!([{ "policy": "emit-metric", "config": {
        "name": "orders", "dimensions": [{ "name": "API ID" }, { "name": "tenant", "value": "{header.x-tenant}" }] } }]));
    let m = write_check(dir.path(), "{ listen = \"127.0.0.1:0\" }", &good);
    let (ok, out, err) = run_cli(&["check", "--manifest", m.to_str().unwrap()]);
    assert!(ok, "a good configuration passes:\n{out}\n{err}");
    // The library says its sinks never block; the policy library has no sinks to say it of.
    let (ok, out, err) = run_cli(&["plugins", "--manifest", m.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("prometheus: sink-prometheus 0.1.0 (api level 2, kinds: sink, sinks never block) sinks: prometheus ["),
        "{out}"
    );
    assert!(
        out.contains("(api level 2, kinds: policy) policies: "),
        "{out}"
    );

    let bad = emit_api(json!([
        { "policy": "emit-metric", "config": { "name": "orders-count" } },
        { "policy": "emit-metric", "config": { "name": "outpost_requests_total" } },
        { "policy": "emit-metric", "config": { "name": "orders", "dimensions": [{ "name": "User ID" }] } },
        { "policy": "emit-metric", "config": { "name": "orders", "value": "lots" } },
    ]));
    let m = write_check(
        dir.path(),
        "{ listen = \"localhost\", buckets = [1, 0.5] }",
        &bad,
    );
    let (ok, out, err) = run_cli(&["check", "--manifest", m.to_str().unwrap()]);
    assert!(!ok, "{out}");
    for needle in [
        "telemetry.sinks[0] 'prom'",
        "listen: 'localhost' is not an address with a port",
        "buckets: buckets must increase strictly",
        "not a valid Prometheus metric name",
        "reserved for the gateway",
        "'User ID' needs a value",
        "value: 'lots'",
    ] {
        assert!(err.contains(needle), "'{needle}' not reported:\n{err}");
    }
    for i in 0..4 {
        let at = format!("apis[0].operations[0].policies.inbound[{i}]");
        assert!(err.contains(&at), "{at} not reported:\n{err}");
    }
}

#[test]
fn a_taken_port_stops_the_gateway_from_starting_but_not_the_check() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = format!("{{ listen = \"{addr}\" }}");

    // `outpost check` makes the sink without starting it: it passes beside whatever holds the
    // port (a gateway already running with this manifest, say).
    let dir = tempfile::tempdir().unwrap();
    let m = write_check(dir.path(), &config, &emit_api(json!([])));
    let (ok, out, err) = run_cli(&["check", "--manifest", m.to_str().unwrap()]);
    assert!(ok, "the check binds nothing:\n{out}\n{err}");

    // `outpost run` starts the sink before it serves, and refuses to start without it.
    let spec = GatewaySpec {
        manifest: manifest(&sink("prom", &config)),
        api: emit_api(json!([])),
        files: Vec::new(),
        watch_ms: 0,
    };
    let Err((status, logs)) = Gateway::try_start(spec) else {
        panic!("started with the sink's port taken");
    };
    assert!(status.is_some_and(|s| !s.success()));
    let logs = logs.join("\n");
    assert!(
        logs.contains(&format!(
            "telemetry.sinks[0] 'prom': cannot start: listen: cannot bind {addr}"
        )),
        "{logs}"
    );
}

#[tokio::test]
async fn the_first_scrape_shows_the_configuration_being_served() {
    // Snapshots an hour apart: what a scrape shows at first is the one given at start, which
    // is taken once the configuration is applied.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("addr");
    let manifest = manifest(&sink(
        "prom",
        &format!(
            "{{ listen = \"127.0.0.1:0\", address_file = \"{}\" }}",
            file.display()
        ),
    ))
    .replace("metrics_interval_ms = 100", "metrics_interval_ms = 3600000");
    let _gw = Gateway::start(GatewaySpec {
        manifest,
        api: emit_api(json!([])),
        files: Vec::new(),
        watch_ms: 0,
    });
    let text = scrape_text(&format!("http://{}/metrics", bound_address(&file))).await;
    let info = text
        .lines()
        .find(|l| l.starts_with("outpost_config_info{"))
        .unwrap_or_else(|| panic!("no outpost_config_info:\n{text}"));
    assert!(info.contains("version=\"check\""), "{info}");
    assert!(info.contains("source=\"file\""), "{info}");
    assert!(info.ends_with(" 1"), "{info}");
}

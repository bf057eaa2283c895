use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use outpost_plugin_sdk::api::abi_stable::std_types::{RSlice, RStr, Tuple2};
use outpost_plugin_sdk::api::metric;
use outpost_plugin_sdk::testing::sink;

use super::*;

fn settings(extra: &str) -> Settings {
    let json = format!(r#"{{"listen": "127.0.0.1:0"{extra}}}"#);
    outpost_plugin_sdk::serde_json::from_str::<Config>(&json)
        .expect("config parses")
        .validate()
        .expect("config validates")
}

/// A record for `api`/`operation` (empty: none), answered `status`, with these times.
fn record<'a>(
    api: &'a str,
    operation: &'a str,
    method: &'a str,
    status: u16,
    total_us: u64,
    backend_us: u64,
) -> RequestRecord<'a> {
    RequestRecord {
        time_unix_ms: 1_795_478_400_000,
        request_id: "r".into(),
        trace_id: "".into(),
        span_id: "".into(),
        parent_span_id: "".into(),
        listener: "http".into(),
        client_ip: "127.0.0.1".into(),
        method: method.into(),
        host: "h".into(),
        path: "/raw/path/42".into(),
        api_id: api.into(),
        operation_id: operation.into(),
        route: "".into(),
        product_id: "".into(),
        subscription_id: "".into(),
        backend_id: "b".into(),
        backend_url: "".into(),
        status,
        backend_status: if backend_us > 0 { status } else { 0 },
        total_us,
        backend_us,
        bytes_in: 3,
        bytes_out: 10,
        cache: "".into(),
        error_source: "".into(),
        error_reason: "".into(),
        error_message: "".into(),
        user_agent: "".into(),
    }
}

fn render(e: &Exposition) -> String {
    String::from_utf8(e.render().expect("renders")).expect("utf-8")
}

/// The value of the sample line that starts with `series` (name and labels, exactly).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().expect("a number"))
}

fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .collect()
}

#[test]
fn requests_are_counted_by_api_operation_method_and_status() {
    let e = Exposition::new(&settings("")).unwrap();
    let mut batch = vec![record("orders", "get", "GET", 200, 2_000, 1_500); 3];
    batch.push(record("orders", "get", "GET", 404, 1_000, 800));
    batch.push(record("", "", "GET", 404, 50, 0));
    batch.push(record("orders", "get", "BREW", 200, 1_000, 500));
    let mut by_route = record("orders", "", "DELETE", 204, 1_000, 500);
    by_route.route = "/orders/{id}".into();
    batch.push(by_route);
    e.records(&batch);
    let t = render(&e);
    let r = |labels: &str| value(&t, &format!("outpost_http_requests_total{{{labels}}}"));
    assert_eq!(
        r(r#"api="orders",method="GET",operation="get",status="200""#),
        Some(3.0),
        "{t}"
    );
    assert_eq!(
        r(r#"api="orders",method="GET",operation="get",status="404""#),
        Some(1.0)
    );
    assert_eq!(
        r(r#"api="(none)",method="GET",operation="(none)",status="404""#),
        Some(1.0),
        "no API: (none), never the raw path"
    );
    assert_eq!(
        r(r#"api="orders",method="OTHER",operation="get",status="200""#),
        Some(1.0),
        "unknown methods are OTHER"
    );
    assert_eq!(
        r(r#"api="orders",method="DELETE",operation="/orders/{id}",status="204""#),
        Some(1.0),
        "no operation id: the route template"
    );
    assert!(!t.contains("/raw/path"), "raw paths never become labels");
    assert!(t.contains("# TYPE outpost_http_requests_total counter\n"));
    assert!(t.ends_with('\n'));
}

#[test]
fn histograms_are_cumulative_with_inf_equal_to_count() {
    let e = Exposition::new(&settings(r#", "buckets": [0.001, 0.01, 0.1]"#)).unwrap();
    // Totals of 0.5 ms, 5 ms, 5 ms, 50 ms and 2 s; the backend answered all but the last.
    let batch = [
        record("a", "op", "GET", 200, 500, 100),
        record("a", "op", "GET", 200, 5_000, 4_000),
        record("a", "op", "GET", 200, 5_000, 4_000),
        record("a", "op", "GET", 200, 50_000, 49_000),
        record("a", "op", "GET", 502, 2_000_000, 0),
    ];
    e.records(&batch);
    let t = render(&e);
    let d = "outpost_http_request_duration_seconds";
    let l = r#"api="a",operation="op""#;
    let bucket = |name: &str, le: &str| value(&t, &format!("{name}_bucket{{{l},le=\"{le}\"}}"));
    assert_eq!(bucket(d, "0.001"), Some(1.0), "{t}");
    assert_eq!(bucket(d, "0.01"), Some(3.0));
    assert_eq!(bucket(d, "0.1"), Some(4.0));
    assert_eq!(bucket(d, "+Inf"), Some(5.0));
    assert_eq!(value(&t, &format!("{d}_count{{{l}}}")), Some(5.0));
    let sum = value(&t, &format!("{d}_sum{{{l}}}")).unwrap();
    assert!((sum - 2.0605).abs() < 1e-9, "{sum}");
    // Every bucket line is in increasing order and never decreases.
    let counts: Vec<f64> = samples(&t, &format!("{d}_bucket"))
        .iter()
        .map(|s| s.rsplit(' ').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(counts, [1.0, 3.0, 4.0, 5.0]);

    // The backend histogram counts only the requests the backend answered.
    let b = "outpost_http_backend_duration_seconds";
    assert_eq!(value(&t, &format!("{b}_count{{{l}}}")), Some(4.0));
    assert_eq!(bucket(b, "+Inf"), Some(4.0));
    // The gateway's own time is total minus backend: 0.4 ms, 1 ms, 1 ms, 1 ms and 2 s.
    let g = "outpost_http_gateway_duration_seconds";
    assert_eq!(value(&t, &format!("{g}_count{{{l}}}")), Some(5.0));
    let own = value(&t, &format!("{g}_sum{{{l}}}")).unwrap();
    assert!((own - 2.0034).abs() < 1e-9, "{own}");
    assert_eq!(
        bucket(g, "0.0005"),
        Some(1.0),
        "gateway buckets are the fine defaults"
    );
    assert_eq!(
        value(&t, &format!("outpost_http_response_bytes_total{{{l}}}")),
        Some(50.0)
    );
    assert_eq!(
        value(&t, &format!("outpost_http_request_bytes_total{{{l}}}")),
        Some(15.0)
    );
}

#[test]
fn upstream_errors_are_counted_by_kind() {
    let e = Exposition::new(&settings("")).unwrap();
    let mut down = record("a", "op", "GET", 502, 1_000, 0);
    down.error_source = "backend".into();
    down.error_reason = "backend_unreachable".into();
    let mut slow = record("a", "op", "GET", 504, 1_000, 0);
    slow.error_source = "backend".into();
    slow.error_reason = "backend_timeout".into();
    let mut refused = record("a", "op", "GET", 401, 1_000, 0);
    refused.error_source = "client".into();
    refused.error_reason = "subscription_key_missing".into();
    e.records(&[down, down, slow, refused]);
    let t = render(&e);
    let u = |kind: &str| {
        value(
            &t,
            &format!("outpost_upstream_errors_total{{api=\"a\",kind=\"{kind}\"}}"),
        )
    };
    assert_eq!(u("backend_unreachable"), Some(2.0), "{t}");
    assert_eq!(u("backend_timeout"), Some(1.0));
    assert_eq!(
        samples(&t, "outpost_upstream_errors_total").len(),
        2,
        "client errors are not upstream errors"
    );
}

#[test]
fn the_cardinality_guard_folds_new_label_sets_into_other_and_counts_them() {
    let e = Exposition::new(&settings(r#", "max_series": 2"#)).unwrap();
    let ops: Vec<String> = (0..50).map(|i| format!("op{i}")).collect();
    let batch: Vec<RequestRecord<'_>> = ops
        .iter()
        .map(|o| record("a", o, "GET", 200, 1_000, 500))
        .collect();
    e.records(&batch);
    e.records(&batch[..1]); // an admitted label set keeps its own series
    let t = render(&e);
    let requests = samples(&t, "outpost_http_requests_total");
    assert_eq!(requests.len(), 3, "two label sets and (other): {t}");
    let r = |labels: &str| value(&t, &format!("outpost_http_requests_total{{{labels}}}"));
    assert_eq!(
        r(r#"api="a",method="GET",operation="op0",status="200""#),
        Some(2.0)
    );
    assert_eq!(
        r(r#"api="(other)",method="GET",operation="(other)",status="200""#),
        Some(48.0),
        "folded, but still counted"
    );
    assert_eq!(
        value(
            &t,
            r#"outpost_prometheus_folded_total{metric="outpost_http_requests_total"}"#
        ),
        Some(48.0)
    );
    // Every family keeps to the bound.
    assert_eq!(
        samples(&t, "outpost_http_request_duration_seconds_count").len(),
        3
    );
    let total: f64 = samples(&t, "outpost_http_request_duration_seconds_count")
        .iter()
        .map(|s| s.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(total, 51.0, "no observation is lost");
}

fn metric_sample<'a>(
    name: &'a str,
    help: &'a str,
    kind: u8,
    labels: &'a [Tuple2<RStr<'a>, RStr<'a>>],
    value: f64,
) -> MetricSample<'a> {
    MetricSample {
        name: name.into(),
        help: help.into(),
        kind,
        labels: RSlice::from_slice(labels),
        value,
    }
}

#[test]
fn snapshots_are_rendered_as_they_come_with_escaping() {
    let e = Exposition::new(&settings("")).unwrap();
    let tricky = [
        Tuple2("plugin".into(), "back\\slash \"quoted\"\nnewline".into()),
        Tuple2("policy".into(), "p".into()),
    ];
    let config = [
        Tuple2("version".into(), "v7".into()),
        Tuple2("source".into(), "file".into()),
    ];
    let batch = [
        metric_sample(
            "outpost_plugin_panics_total",
            "Panics \\ caught\nin plugins.",
            metric::COUNTER,
            &tricky,
            3.0,
        ),
        metric_sample(
            "outpost_requests_in_flight",
            "Requests in flight.",
            metric::GAUGE,
            &[],
            2.0,
        ),
        metric_sample(
            "outpost_config_info",
            "The configuration served.",
            metric::GAUGE,
            &config,
            1.0,
        ),
        // A clash with the sink's own families is left out rather than rendered twice.
        metric_sample(
            "outpost_http_requests_total",
            "",
            metric::COUNTER,
            &[],
            99.0,
        ),
    ];
    e.snapshot(&batch);
    let t = render(&e);
    assert!(
        t.contains("# HELP outpost_plugin_panics_total Panics \\\\ caught\\nin plugins.\n"),
        "{t}"
    );
    assert!(t.contains("# TYPE outpost_plugin_panics_total counter\n"));
    assert!(t.contains(
        "outpost_plugin_panics_total{plugin=\"back\\\\slash \\\"quoted\\\"\\nnewline\",policy=\"p\"} 3\n"
    ));
    assert!(t.contains("# TYPE outpost_requests_in_flight gauge\noutpost_requests_in_flight 2\n"));
    assert!(t.contains("outpost_config_info{source=\"file\",version=\"v7\"} 1\n"));
    assert!(!t.contains(" 99\n"), "{t}");

    // The next snapshot replaces the last one.
    e.snapshot(&batch[1..2]);
    let t = render(&e);
    assert!(!t.contains("outpost_plugin_panics_total"));
    assert!(t.contains("outpost_requests_in_flight 2\n"));
}

#[test]
fn snapshot_series_past_the_guard_are_summed_for_counters_and_left_out_for_gauges() {
    let e = Exposition::new(&settings(r#", "max_series": 2"#)).unwrap();
    let tenants: Vec<String> = (0..5).map(|i| format!("t{i}")).collect();
    let labels: Vec<[Tuple2<RStr<'_>, RStr<'_>>; 1]> = tenants
        .iter()
        .map(|t| [Tuple2("tenant".into(), t.as_str().into())])
        .collect();
    let mut batch: Vec<MetricSample<'_>> = labels
        .iter()
        .map(|l| metric_sample("orders_total", "Orders.", metric::COUNTER, l, 10.0))
        .collect();
    batch.extend(
        labels
            .iter()
            .map(|l| metric_sample("queue_depth", "Depth.", metric::GAUGE, l, 1.0)),
    );
    e.snapshot(&batch);
    let t = render(&e);
    assert_eq!(value(&t, r#"orders_total{tenant="t0"}"#), Some(10.0), "{t}");
    assert_eq!(value(&t, r#"orders_total{tenant="t1"}"#), Some(10.0));
    assert_eq!(value(&t, r#"orders_total{tenant="(other)"}"#), Some(30.0));
    assert_eq!(samples(&t, "queue_depth").len(), 2);
    assert_eq!(
        value(
            &t,
            r#"outpost_prometheus_folded_series{metric="orders_total"}"#
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &t,
            r#"outpost_prometheus_folded_series{metric="queue_depth"}"#
        ),
        Some(3.0)
    );
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    for (config, needle) in [
        (r#"{"listen": "nowhere"}"#, "listen: 'nowhere'"),
        (r#"{"listen": "localhost:9464"}"#, "listen:"),
        (r#"{"listen": "127.0.0.1:0", "path": "metrics"}"#, "path:"),
        (
            r#"{"listen": "127.0.0.1:0", "buckets": [0.1, 0.05]}"#,
            "buckets: buckets must increase strictly",
        ),
        (r#"{"listen": "127.0.0.1:0", "buckets": []}"#, "buckets:"),
        (
            r#"{"listen": "127.0.0.1:0", "gateway_buckets": [-1]}"#,
            "gateway_buckets:",
        ),
        (
            r#"{"listen": "127.0.0.1:0", "max_series": 0}"#,
            "max_series:",
        ),
        (r#"{"listen": "127.0.0.1:0", "colour": "red"}"#, "colour"),
        (r#"{}"#, "listen"),
    ] {
        let e = sink::<Prometheus>(config).err().expect(config);
        assert!(e.message.contains(needle), "{config}: {}", e.message);
    }
    // Every problem at once.
    let e = sink::<Prometheus>(r#"{"listen": "x", "path": "y", "max_series": 0}"#)
        .err()
        .unwrap();
    for field in ["listen:", "path:", "max_series:"] {
        assert!(e.message.contains(field), "{}", e.message);
    }
}

/// One HTTP/1.1 exchange over a plain socket: (status line, headers, body).
fn http(addr: SocketAddr, method: &str, path: &str) -> (String, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head");
    let mut lines = head.lines();
    let status = lines.next().unwrap().to_owned();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn serves_get_and_head_on_its_path_with_the_exact_content_type_and_404_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("addr");
    let config = format!(
        r#"{{"listen": "127.0.0.1:0", "address_file": "{}", "path": "/prom"}}"#,
        file.display()
    );
    let s = sink::<Prometheus>(&config).expect("made");
    // Made, the sink has bound nothing (as when `outpost check` makes it); its first call
    // starts it.
    assert!(!file.exists(), "no address before the first call");
    let none: [MetricSample<'_>; 0] = [];
    assert!(s.export_metrics(none.as_slice().into()).is_ok());
    let addr: SocketAddr = std::fs::read_to_string(&file)
        .expect("the address is written")
        .trim()
        .parse()
        .expect("an address");
    assert_ne!(addr.port(), 0);
    let batch = [record("a", "op", "GET", 200, 1_000, 500)];
    assert!(s.export(batch.as_slice().into()).is_ok());

    let (status, headers, body) = http(addr, "GET", "/prom");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        header(&headers, "content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert!(body.contains(
        "outpost_http_requests_total{api=\"a\",method=\"GET\",operation=\"op\",status=\"200\"} 1\n"
    ));
    let length = body.len().to_string();

    let (status, headers, body) = http(addr, "HEAD", "/prom");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(
        header(&headers, "content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(header(&headers, "content-length"), Some(length.as_str()));
    assert!(body.is_empty());

    let (status, _, _) = http(addr, "GET", "/metrics");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = http(addr, "GET", "/prom/x");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, headers, _) = http(addr, "POST", "/prom");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert_eq!(header(&headers, "allow"), Some("GET, HEAD"));
    let (status, _, _) = http(addr, "GET", "/prom?x=1");
    assert_eq!(status, "HTTP/1.1 200 OK", "a query string is ignored");

    // Dropping the sink stops the listener and frees the port.
    drop(s);
    assert!(
        TcpStream::connect(addr).is_err(),
        "nothing listens any more"
    );
    assert!(std::net::TcpListener::bind(addr).is_ok());
}

#[test]
fn a_port_in_use_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    // Making the sink binds nothing: it succeeds, as `outpost check` does beside a running
    // gateway.
    let s = sink::<Prometheus>(&format!(r#"{{"listen": "{addr}"}}"#)).expect("made");
    // Starting it (its first call) fails, and says why; so does every call until it starts.
    let none: [MetricSample<'_>; 0] = [];
    for _ in 0..2 {
        let e = s
            .export_metrics(none.as_slice().into())
            .into_result()
            .expect_err("cannot start");
        assert!(
            e.message.contains(&format!("listen: cannot bind {addr}")),
            "{}",
            e.message
        );
    }
    // Once the port is free, the next call starts it.
    drop(taken);
    assert!(s.export_metrics(none.as_slice().into()).is_ok());
    assert!(TcpStream::connect(addr).is_ok(), "it listens now");
}

#[test]
fn the_readme_examples_validate() {
    let readme = include_str!("../README.md");
    let mut seen = 0;
    for block in readme.split("```toml\n").skip(1) {
        let block = &block[..block.find("```").expect("a closed block")];
        let doc: toml::Value = toml::from_str(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        let Some(sinks) = doc.get("telemetry").and_then(|t| t.get("sinks")) else {
            continue;
        };
        for entry in sinks.as_array().expect("[[telemetry.sinks]]") {
            if entry["provider"].as_str() != Some("prometheus") {
                continue;
            }
            let c: Config = entry["config"]
                .clone()
                .try_into()
                .unwrap_or_else(|e| panic!("{e}\n{block}"));
            c.validate().expect("the README example validates");
            seen += 1;
        }
    }
    assert!(seen >= 2, "README examples of the sink: {seen}");
}

/// CPU per record on the export path, printed (never asserted: timed tests are not allowed).
/// `cargo test --release -p outpost-sink-prometheus -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a test: run it in release mode with --nocapture"]
fn measure_export_cost_per_record() {
    const RECORDS: usize = 200_000;
    const BATCH: usize = 512;
    // A realistic mix: three APIs with a few operations each, mostly 200s, some 201/404/500,
    // a backend that is sometimes down, requests without an API, and a stray method.
    let apis = [
        ("orders", ["list", "get", "create", "delete"]),
        ("users", ["get", "update", "search", "me"]),
        ("billing", ["invoice", "pay", "refund", "status"]),
    ];
    let mut pool = Vec::new();
    for i in 0..4096u64 {
        let (api, ops) = apis[(i % 3) as usize];
        let op = ops[(i / 3 % 4) as usize];
        let method = ["GET", "GET", "POST", "PUT", "DELETE", "GET", "PATCH"][(i % 7) as usize];
        let total = 300 + (i * 7919) % 200_000;
        let mut r = match i % 50 {
            0 => record("", "", "GET", 404, 40, 0),
            1 => {
                let mut r = record(api, op, method, 502, total, 0);
                r.error_source = "backend".into();
                r.error_reason = "backend_unreachable".into();
                r
            }
            2 | 3 => record(api, op, method, 500, total, total - 100),
            4..=8 => record(api, op, method, 404, total, total - 80),
            9..=14 => record(api, op, method, 201, total, total - 90),
            _ => record(api, op, method, 200, total, total - 120),
        };
        r.bytes_in = i % 4096;
        r.bytes_out = 100 + i % 9000;
        pool.push(r);
    }
    let batches: Vec<&[RequestRecord<'_>]> = pool.chunks(BATCH).collect();

    // Rounds on one exposition: the first one also creates the series.
    const ROUNDS: usize = 5;
    let e = Exposition::new(&settings("")).unwrap();
    let mut per_record = Vec::new();
    for round in 1..=ROUNDS {
        let start = std::time::Instant::now();
        let mut sent = 0;
        for b in batches.iter().cycle() {
            if sent >= RECORDS {
                break;
            }
            let b = &b[..b.len().min(RECORDS - sent)];
            e.records(b);
            sent += b.len();
        }
        let ns = start.elapsed().as_nanos() as f64 / RECORDS as f64;
        println!("sink-prometheus: round {round}: {RECORDS} records in batches of {BATCH}: {ns:.1} ns per record");
        per_record.push(ns);
    }
    let t = render(&e);
    let counted: f64 = samples(&t, "outpost_http_requests_total")
        .iter()
        .map(|s| s.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(
        counted,
        (ROUNDS * RECORDS) as f64,
        "every record is counted"
    );
    per_record.sort_by(f64::total_cmp);
    println!(
        "sink-prometheus: median of {ROUNDS} rounds: {:.1} ns per record",
        per_record[ROUNDS / 2]
    );
}

#[test]
fn an_address_file_in_a_missing_directory_is_a_config_error() {
    let e = sink::<Prometheus>(
        r#"{"listen": "127.0.0.1:0", "address_file": "/nonexistent-outpost-dir/addr"}"#,
    )
    .err()
    .expect("refused");
    assert!(
        e.message
            .contains("address_file: /nonexistent-outpost-dir is not a directory"),
        "{}",
        e.message
    );
}

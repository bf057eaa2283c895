//! The sink against the fake ingestion endpoint (a real HTTP server speaking the protocol),
//! without a gateway: batching, partial success, throttling, no answer, the spool.

use std::path::Path;
use std::time::Duration;

use outpost_plugin_sdk::serde_json::{json, Value};
use outpost_plugin_sdk::{RequestRecord, Sink};
use outpost_tests::appinsights::{Ingestion, Reply};

use crate::transport::Reason;
use crate::AppInsights;

const WAIT: Duration = Duration::from_secs(20);

fn sink(fake: &Ingestion, extra: Value) -> AppInsights {
    let mut c = json!({
        "connection_string": fake.connection_string(),
        "max_batch_items": 3,
        "flush_interval_ms": 20,
        "timeout_ms": 2000,
        "retry_initial_ms": 50,
        "retry_max_ms": 200,
        "dependencies": false,
        "exceptions": false,
        "metrics": false,
    });
    for (k, v) in extra.as_object().expect("object") {
        c[k] = v.clone();
    }
    let config = outpost_plugin_sdk::serde_json::from_value(c).expect("config");
    AppInsights::new(config).expect("valid")
}

/// Span ids `0000000000000001`, ... (the RequestData ids).
fn spans(from: usize, n: usize) -> Vec<String> {
    (from..from + n).map(|i| format!("{i:016x}")).collect()
}

fn record(span: &str) -> RequestRecord<'_> {
    RequestRecord {
        time_unix_ms: outpost_plugin_sdk::host::now_unix_ms(),
        request_id: "r".into(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        span_id: span.into(),
        parent_span_id: "".into(),
        listener: "http".into(),
        client_ip: "127.0.0.1".into(),
        method: "GET".into(),
        host: "h".into(),
        path: "/x".into(),
        api_id: "a".into(),
        operation_id: "o".into(),
        route: "/x".into(),
        product_id: "".into(),
        subscription_id: "".into(),
        backend_id: "b".into(),
        backend_url: "http://b/x".into(),
        status: 200,
        backend_status: 200,
        total_us: 1000,
        backend_us: 800,
        bytes_in: 0,
        bytes_out: 1,
        cache: "".into(),
        error_source: "".into(),
        error_reason: "".into(),
        error_message: "".into(),
        user_agent: "".into(),
    }
}

fn export(s: &AppInsights, spans: &[String]) {
    let batch: Vec<RequestRecord<'_>> = spans.iter().map(|s| record(s)).collect();
    s.export(&batch).expect("export");
}

fn ids(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .map(|i| {
            i["data"]["baseData"]["id"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect()
}

fn wait(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + WAIT;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spool_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".ndjson.gz"))
            })
            .count()
        })
        .unwrap_or(0)
}

#[test]
fn partial_success_resends_only_the_retryable_items() {
    let fake = Ingestion::start();
    fake.script([
        Reply::Partial(vec![(1, 400), (7, 408), (8, 408), (9, 408)]),
        Reply::Partial(vec![(2, 429)]),
    ]);
    let s = sink(&fake, json!({ "max_batch_items": 10 }));
    let sent = spans(1, 10);
    export(&s, &sent);
    let accepted = fake.wait_until(WAIT, |a| a.len() >= 9);
    let requests = fake.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");
    assert!(requests.iter().all(|r| r.gzip && r.path == "/v2.1/track"));
    assert_eq!(requests[0].items.len(), 10);
    assert_eq!(ids(&requests[1].items), sent[7..10], "only the 408s again");
    assert_eq!(ids(&requests[2].items), sent[9..10], "only the 429 again");
    let mut got = ids(&accepted);
    got.sort();
    let mut want: Vec<String> = sent.clone();
    want.remove(1);
    assert_eq!(got, want, "each accepted once, the 400 never resent");
    assert_eq!(s.stats().sent_total(), 9);
    assert_eq!(s.stats().retried_total(), 4);
    assert_eq!(s.stats().dropped_total(Reason::Invalid), 1);
    assert!(fake.invalid().is_empty(), "{:?}", fake.invalid());
}

#[test]
fn throttling_waits_for_retry_after_and_quota_drops() {
    let fake = Ingestion::start();
    fake.script([Reply::retry_after(429, "1")]);
    let s = sink(&fake, json!({}));
    export(&s, &spans(1, 3));
    fake.wait_until(WAIT, |a| a.len() == 3);
    let r = fake.requests();
    assert_eq!(r.len(), 2);
    let gap = r[1].at - r[0].at;
    assert!(
        gap >= Duration::from_secs(1),
        "Retry-After honoured: {gap:?}"
    );
    // Quota: dropped and counted, not resent.
    fake.script([Reply::status(439)]);
    export(&s, &spans(4, 3));
    wait("quota drop", || s.stats().dropped_total(Reason::Quota) == 3);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.requests().len(), 3);
    assert_eq!(fake.accepted().len(), 3);
}

#[test]
fn no_answer_is_a_failure_to_retry() {
    let fake = Ingestion::start();
    fake.script([Reply::Hang]);
    let s = sink(&fake, json!({ "timeout_ms": 300 }));
    export(&s, &spans(1, 3));
    let accepted = fake.wait_until(WAIT, |a| a.len() == 3);
    assert_eq!(ids(&accepted), spans(1, 3));
    assert_eq!(fake.requests().len(), 2);
    assert_eq!(s.stats().retried_total(), 3);
}

#[test]
fn an_outage_spools_and_replays_oldest_first_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Ingestion::start();
    fake.stop();
    let s = sink(&fake, json!({ "spool_dir": dir.path() }));
    let sent = spans(1, 15);
    for chunk in sent.chunks(3) {
        export(&s, chunk);
        std::thread::sleep(Duration::from_millis(30));
    }
    wait("five spooled batches", || spool_files(dir.path()) == 5);
    assert!(s.stats().spool_bytes_now() > 0);
    fake.restart();
    let accepted = fake.wait_until(WAIT, |a| a.len() >= 15);
    assert_eq!(ids(&accepted), sent, "everything once, oldest first");
    wait("spool emptied", || spool_files(dir.path()) == 0);
    wait("gauge at zero", || s.stats().spool_bytes_now() == 0);
    // New data flows directly again.
    export(&s, &spans(100, 3));
    fake.wait_until(WAIT, |a| a.len() == 18);
    assert_eq!(s.stats().dropped_total(Reason::SpoolFull), 0);
}

#[test]
fn past_the_spool_bound_the_oldest_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Ingestion::start();
    fake.stop();
    // Room for about two batches of three items.
    let s = sink(
        &fake,
        json!({ "spool_dir": dir.path(), "spool_max_bytes": 1400 }),
    );
    let sent = spans(1, 30);
    for chunk in sent.chunks(3) {
        export(&s, chunk);
        std::thread::sleep(Duration::from_millis(30));
    }
    wait("all ten batches handled", || {
        let dropped = s.stats().dropped_total(Reason::SpoolFull) as usize;
        dropped + spool_files(dir.path()) * 3 == 30
    });
    let dropped = s.stats().dropped_total(Reason::SpoolFull) as usize;
    assert!(dropped > 0 && dropped < 30 && dropped % 3 == 0, "{dropped}");
    fake.restart();
    let accepted = fake.wait_until(WAIT, |a| a.len() + dropped == 30);
    wait("spool emptied", || spool_files(dir.path()) == 0);
    assert_eq!(
        ids(&accepted),
        sent[dropped..],
        "exactly the oldest were dropped"
    );
    assert_eq!(s.stats().dropped_total(Reason::SpoolFull) as usize, dropped);
}

#[test]
fn flush_spools_what_it_cannot_send_and_a_new_sink_replays_it() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Ingestion::start();
    fake.stop();
    let s = sink(
        &fake,
        json!({ "spool_dir": dir.path(), "flush_interval_ms": 60000, "max_batch_items": 100 }),
    );
    export(&s, &spans(1, 4));
    s.flush(Duration::from_secs(2)).expect("flushed in time");
    assert_eq!(spool_files(dir.path()), 1);
    drop(s);

    fake.restart();
    let s = sink(&fake, json!({ "spool_dir": dir.path() }));
    export(&s, &[]);
    let accepted = fake.wait_until(WAIT, |a| a.len() == 4);
    assert_eq!(ids(&accepted), spans(1, 4));
    wait("spool emptied", || spool_files(dir.path()) == 0);

    // Without a spool, what is unsent at shutdown is counted.
    fake.stop();
    let s = sink(
        &fake,
        json!({ "flush_interval_ms": 60000, "max_batch_items": 100 }),
    );
    export(&s, &spans(10, 2));
    s.flush(Duration::from_secs(2)).expect("flushed in time");
    assert_eq!(s.stats().dropped_total(Reason::Shutdown), 2);
}

#[test]
fn flush_sends_a_partial_batch_at_once() {
    let fake = Ingestion::start();
    let s = sink(
        &fake,
        json!({ "flush_interval_ms": 60000, "max_batch_items": 100 }),
    );
    export(&s, &spans(1, 2));
    s.flush(Duration::from_secs(5)).expect("flushed");
    assert_eq!(fake.accepted().len(), 2, "delivered before flush returned");
}

#[test]
fn sampling_keeps_failures() {
    let fake = Ingestion::start();
    let s = sink(
        &fake,
        json!({ "sampling_percentage": 0, "exceptions": true }),
    );
    let sent = spans(1, 4);
    let mut batch: Vec<RequestRecord<'_>> = sent.iter().map(|s| record(s)).collect();
    batch[1].status = 503;
    batch[3].status = 502;
    batch[3].error_source = "backend".into();
    s.export(&batch).unwrap();
    s.flush(Duration::from_secs(5)).unwrap();
    let requests = fake.accepted_of("RequestData");
    assert_eq!(ids(&requests), [sent[1].clone(), sent[3].clone()]);
    assert!(requests.iter().all(|r| r["sampleRate"] == 100.0));
    assert_eq!(fake.accepted_of("ExceptionData").len(), 1);
    assert_eq!(s.stats().dropped_total(Reason::Sampling), 2);
}

#[test]
fn a_backlog_goes_out_in_concurrent_requests_and_one_failure_is_retried_alone() {
    let fake = Ingestion::start();
    // A slow endpoint: one request at a time would take a second per batch.
    let slow = Reply::Slow(Duration::from_millis(1000));
    fake.script([slow.clone(), slow.clone(), slow.clone(), slow]);
    let s = sink(&fake, json!({}));
    let sent = spans(1, 12);
    export(&s, &sent);
    let accepted = fake.wait_until(WAIT, |a| a.len() >= 12);
    assert_eq!(fake.requests().len(), 4, "four batches of three");
    assert_eq!(fake.max_in_flight(), 4, "all four in flight at once");
    let mut got = ids(&accepted);
    got.sort();
    assert_eq!(got, sent, "each accepted once");

    // In a round where one request is throttled, only its batch is sent again.
    fake.script([
        Reply::Slow(Duration::from_millis(300)),
        Reply::status(503),
        Reply::Slow(Duration::from_millis(300)),
    ]);
    let more = spans(100, 9);
    export(&s, &more);
    let accepted = fake.wait_until(WAIT, |a| a.len() >= 21);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fake.accepted().len(), 21, "nothing twice");
    let mut got = ids(&accepted[12..]);
    got.sort();
    assert_eq!(got, more);
    assert_eq!(s.stats().retried_total(), 3, "the throttled batch only");
    assert_eq!(fake.requests().len(), 4 + 3 + 1);
    assert!(fake.invalid().is_empty(), "{:?}", fake.invalid());
}

#[test]
fn one_request_at_a_time_when_configured() {
    let fake = Ingestion::start();
    fake.script((0..3).map(|_| Reply::Slow(Duration::from_millis(200))));
    let s = sink(&fake, json!({ "max_concurrent_requests": 1 }));
    export(&s, &spans(1, 9));
    fake.wait_until(WAIT, |a| a.len() >= 9);
    assert_eq!(fake.requests().len(), 3);
    assert_eq!(fake.max_in_flight(), 1);
}

#[test]
fn past_max_pending_items_the_oldest_batches_are_dropped_and_counted() {
    let fake = Ingestion::start();
    fake.script([Reply::Slow(Duration::from_millis(1500))]);
    let s = sink(
        &fake,
        json!({ "max_pending_items": 6, "max_concurrent_requests": 1 }),
    );
    // The first batch goes out and is held up by the endpoint.
    export(&s, &spans(1, 3));
    wait("the first batch in flight", || fake.max_in_flight() == 1);
    // Meanwhile three more full batches (9 items): past 6 waiting, the oldest waiting batch
    // goes, whole. Two more items start a batch, which does not count against the bound.
    export(&s, &spans(4, 9));
    assert_eq!(s.stats().dropped_total(Reason::BufferFull), 3);
    export(&s, &spans(13, 2));
    assert_eq!(s.stats().dropped_total(Reason::BufferFull), 3);
    let accepted = fake.wait_until(WAIT, |a| a.len() >= 11);
    let mut got = ids(&accepted);
    got.sort();
    let mut want = spans(1, 3);
    want.extend(spans(7, 8));
    assert_eq!(
        got, want,
        "the first batch, the two newest full ones and the partial one"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fake.accepted().len(), 11, "nothing else arrives");
    assert_eq!(s.stats().sent_total(), 11);
    assert!(fake.invalid().is_empty(), "{:?}", fake.invalid());
}

#[test]
fn max_items_per_second_lowers_the_sampling_percentage_and_sample_rate_says_so() {
    let fake = Ingestion::start();
    let mut s = sink(
        &fake,
        json!({ "max_items_per_second": 100, "max_batch_items": 500 }),
    );
    s.set_adaptive_window(Duration::from_millis(200));
    assert_eq!(s.sampling_percentage(), 100.0);
    // Distinct operations, so that sampling has something to choose between.
    let traces: Vec<String> = (0..2000u64)
        .map(|i| format!("{:032x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        .collect();
    let span_ids = spans(1, 2000);
    let records = |from: usize, to: usize| -> Vec<RequestRecord<'_>> {
        (from..to)
            .map(|i| {
                let mut r = record(&span_ids[i]);
                r.trace_id = traces[i].as_str().into();
                r
            })
            .collect()
    };

    // The first batch goes out whole: a new percentage applies from the next batch on. The
    // window ends with it when that took long enough (it has sent far more than its 20 items'
    // share), or else with the next batch.
    s.export(&records(0, 1000)).unwrap();
    std::thread::sleep(Duration::from_millis(250));
    let second = s.sampling_percentage();
    s.export(&records(1000, 1001)).unwrap();
    let pct = s.sampling_percentage();
    assert!(
        (crate::adaptive::MIN_PERCENTAGE..100.0).contains(&pct),
        "1001 items in about 0.25 s are far over 100 a second: {pct}"
    );
    // 100 / (100 / n) is n only up to rounding (100 / (100 / 981) is 981.0000000000001).
    let share = 100.0 / pct;
    assert!((share - share.round()).abs() < 1e-9, "a whole share: {pct}");

    // The rest goes out at that percentage, but for a failure.
    let mut rest = records(1001, 2000);
    rest[0].status = 503;
    s.export(&rest).unwrap();
    s.flush(Duration::from_secs(5)).unwrap();

    let requests = fake.accepted_of("RequestData");
    let rate_of = |span: &str| {
        requests
            .iter()
            .find(|r| r["data"]["baseData"]["id"] == span)
            .map(|r| r["sampleRate"].as_f64().expect("a number"))
    };
    for span in &span_ids[..1000] {
        assert_eq!(rate_of(span), Some(100.0), "{span}");
    }
    let mut dropped = 0;
    if crate::envelope::sampled_in(&traces[1000], second) {
        assert_eq!(rate_of(&span_ids[1000]), Some(second));
    } else {
        assert_eq!(rate_of(&span_ids[1000]), None);
        dropped += 1;
    }
    for i in 1001..2000 {
        let want = if i == 1001 {
            Some(100.0)
        } else if crate::envelope::sampled_in(&traces[i], pct) {
            Some(pct)
        } else {
            dropped += 1;
            None
        };
        assert_eq!(rate_of(&span_ids[i]), want, "record {i}");
    }
    assert!(dropped > 900, "{dropped} of 999 sampled out at {pct} %");
    assert_eq!(s.stats().dropped_total(Reason::Sampling), dropped);
    assert_eq!(requests.len() as u64, 2000 - dropped);
}

//! What building and compressing items costs per record: a measurement to run by hand
//! (`cargo test --release -p outpost-sink-appinsights -- --ignored --nocapture`), not a check.

use std::time::{Duration, Instant};

use outpost_plugin_sdk::RequestRecord;

use crate::envelope::{self, Encoder, Identity, Kinds, Scratch};
use crate::transport;

const RECORDS: usize = 200_000;
const BATCH_ITEMS: usize = 500;

/// The strings of one record that vary from request to request.
struct Varying {
    trace: String,
    span: String,
    request: String,
    path: String,
    backend_url: String,
}

fn varying(i: usize) -> Varying {
    Varying {
        trace: format!("{:032x}", fastrand::u128(..)),
        span: format!("{:016x}", fastrand::u64(..)),
        request: format!("{:08x}-7d4a-4e1b-9c3f-{:012x}", i, fastrand::u64(..) >> 16),
        path: format!("/orders/{}", i % 5000),
        backend_url: format!("http://backend.internal:8081/v1/orders/{}", i % 5000),
    }
}

fn record(i: usize, v: &Varying) -> RequestRecord<'_> {
    let total_us = fastrand::u64(300..40_000);
    RequestRecord {
        time_unix_ms: 1_795_478_400_123 + i as u64 / 4,
        request_id: v.request.as_str().into(),
        trace_id: v.trace.as_str().into(),
        span_id: v.span.as_str().into(),
        parent_span_id: "b7ad6b7169203331".into(),
        listener: "http".into(),
        client_ip: "10.1.2.3".into(),
        method: "GET".into(),
        host: "api.example:8080".into(),
        path: v.path.as_str().into(),
        api_id: "orders".into(),
        operation_id: "get-order".into(),
        route: "/orders/{id}".into(),
        product_id: "gold".into(),
        subscription_id: "sub-1".into(),
        backend_id: "orders-backend".into(),
        backend_url: v.backend_url.as_str().into(),
        status: 200,
        backend_status: 200,
        total_us,
        backend_us: total_us - fastrand::u64(100..300),
        bytes_in: 0,
        bytes_out: fastrand::u64(100..20_000),
        cache: "".into(),
        error_source: "".into(),
        error_reason: "".into(),
        error_message: "".into(),
        user_agent: "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36".into(),
    }
}

fn identity() -> Identity {
    Identity::new(
        "00000000-1111-2222-3333-444455556666",
        "edge-1",
        "3f2a9c1e-0d4b-4c5e-8f6a-7b8c9d0e1f2a",
        Some("West Europe".into()),
    )
}

/// Builds the items of [`RECORDS`] records, and then builds them again compressing each into
/// a batch as it is written, as the sink does (a batch closed every [`BATCH_ITEMS`] items);
/// prints the time per record of building and of compressing (the difference), in five
/// rounds and the best.
#[test]
#[ignore = "a measurement, run by hand in release mode"]
fn cost_per_record() {
    fastrand::seed(7);
    let strings: Vec<Varying> = (0..RECORDS).map(varying).collect();
    let records: Vec<RequestRecord<'_>> = strings
        .iter()
        .enumerate()
        .map(|(i, v)| record(i, v))
        .collect();
    let kinds = Kinds {
        dependencies: true,
        exceptions: true,
    };
    let encoder = Encoder::new(&identity(), kinds, 100.0);
    let mut scratch = Scratch::default();
    let mut gzip = transport::Gzip::new();
    let per = |d: Duration| d.as_nanos() as f64 / RECORDS as f64;
    let (mut best_build, mut best_gzip) = (Duration::MAX, Duration::MAX);
    for round in 1..=5 {
        let (mut json_bytes, mut n) = (0, 0);
        let start = Instant::now();
        for r in &records {
            let ids = envelope::operation_ids(r);
            encoder.request_items(r, &ids, 100.0, &mut scratch, |item| {
                json_bytes += item.len() + 1;
                n += 1;
            });
        }
        let built = start.elapsed();
        let (mut gz_bytes, mut kept, mut bodies) = (0, Vec::new(), Vec::new());
        let start = Instant::now();
        for r in &records {
            let ids = envelope::operation_ids(r);
            encoder.request_items(r, &ids, 100.0, &mut scratch, |item| {
                gzip.push(item);
                if round == 1 {
                    kept.push(item.to_vec());
                }
            });
            if gzip.items() >= BATCH_ITEMS {
                let body = gzip.finish();
                gz_bytes += body.len();
                if round == 1 {
                    bodies.push(body);
                }
            }
        }
        let body = gzip.finish();
        gz_bytes += body.len();
        let both = start.elapsed();
        if round == 1 {
            bodies.push(body);
            let mut read = Vec::new();
            for b in &bodies {
                read.extend(transport::items(b).expect("gzip"));
            }
            assert_eq!(read, kept);
        }
        let gzipped = both.saturating_sub(built);
        println!(
            "round {round}: {n} items of {:.0} bytes on average (gzip to {:.1} %); per record: build {:.0} ns, gzip in batches of {BATCH_ITEMS} items {:.0} ns",
            json_bytes as f64 / n as f64,
            100.0 * gz_bytes as f64 / json_bytes as f64,
            per(built),
            per(gzipped),
        );
        best_build = best_build.min(built);
        best_gzip = best_gzip.min(gzipped);
    }
    println!(
        "best: build {:.0} ns, gzip {:.0} ns per record",
        per(best_build),
        per(best_gzip)
    );
}
